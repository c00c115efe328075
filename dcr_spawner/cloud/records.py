"""The hub's record of cloud launches: one row per grant launched (``dcr_hub_cloud_launches``).

A row is written **before** the instance is inserted, keyed by the grant id (``jti``, the primary key):
a second launch of the same grant finds the row and inserts with the same Compute ``requestId``, so a
grant starts one VM however often it is sent and whenever the hub restarts. The row says when the job's
VM must be gone (``deadline``) and, once the job ended, how (``end_state``, ``reason``): the
concurrent-jobs quota and the reconciler read it.

The table sits beside the hub's other DCR records (same ``Base`` as :mod:`dcr_spawner.hubdb`, SQLite or
PostgreSQL); it is new in this version, so :func:`setup` creates it on a database that lacks it and
nothing else changes (the schema version of the other tables stays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import BigInteger, String, Text, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from ..hubdb import Base, HubDB

#: ``launching``: recorded, the insert may or may not have reached Compute; ``running``: the insert's
#: operation finished; ``ended``: the job ended (``end_state``) and its VM is deleted or being deleted.
STATES: Final = ("launching", "running", "ended")


class LaunchRecord(Base):
    __tablename__ = "dcr_hub_cloud_launches"
    grant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    instance: Mapped[str] = mapped_column(String(63))
    zone: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: When the VM must be gone whatever it does (the grant's time limit plus the margin).
    deadline: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    ended_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: The job's terminal state as the hub saw it end (``succeeded``, ``failed``, ``cancelled``, ...).
    end_state: Mapped[str] = mapped_column(String(16), default="")
    reason: Mapped[str] = mapped_column(Text, default="")


@dataclass(frozen=True)
class Launch:
    grant_id: str
    job_id: str
    user: str
    instance: str
    zone: str
    state: str
    deadline: int
    created_at: int
    ended_at: int | None = None
    end_state: str = ""
    reason: str = ""

    @property
    def ended(self) -> bool:
        return self.state == "ended"


def _launch(r: LaunchRecord) -> Launch:
    return Launch(
        r.grant_id,
        r.job_id,
        r.user,
        r.instance,
        r.zone,
        r.state,
        r.deadline,
        r.created_at,
        r.ended_at,
        r.end_state or "",
        r.reason or "",
    )


def setup(db: HubDB) -> None:
    """Create the table if this database has none yet (SQLite and PostgreSQL alike)."""
    LaunchRecord.__table__.create(db.engine, checkfirst=True)  # type: ignore[attr-defined]


class Launches:
    """Reads and writes of ``dcr_hub_cloud_launches``; each call is one short transaction."""

    def __init__(self, db: HubDB) -> None:
        self.db = db

    def claim(self, launch: Launch) -> tuple[Launch, bool]:
        """Record ``launch`` unless its grant (or job) has one already: ``(the record, whether new)``."""
        try:
            with self.db.session() as s:
                s.add(
                    LaunchRecord(
                        grant_id=launch.grant_id,
                        job_id=launch.job_id,
                        user=launch.user,
                        instance=launch.instance,
                        zone=launch.zone,
                        state="launching",
                        deadline=launch.deadline,
                        created_at=launch.created_at,
                    )
                )
            return launch, True
        except IntegrityError:
            existing = self.by_grant(launch.grant_id) or self.by_job(launch.job_id)
            assert existing is not None
            return existing, False

    def by_grant(self, grant_id: str) -> Launch | None:
        with self.db.session() as s:
            r = s.get(LaunchRecord, grant_id)
            return _launch(r) if r is not None else None

    def by_job(self, job_id: str) -> Launch | None:
        with self.db.session() as s:
            r = s.scalar(select(LaunchRecord).where(LaunchRecord.job_id == job_id))
            return _launch(r) if r is not None else None

    def mark_running(self, grant_id: str) -> None:
        with self.db.session() as s:
            s.execute(
                update(LaunchRecord)
                .where(LaunchRecord.grant_id == grant_id, LaunchRecord.state == "launching")
                .values(state="running")
            )

    def end(self, grant_id: str, end_state: str, reason: str, at: int) -> bool:
        """Record the job's end once; ``True`` if this call ended it (the caller audits it then)."""
        with self.db.session() as s:
            result = s.execute(
                update(LaunchRecord)
                .where(LaunchRecord.grant_id == grant_id, LaunchRecord.state != "ended")
                .values(state="ended", end_state=end_state, reason=reason[:2000], ended_at=at)
            )
        return bool(getattr(result, "rowcount", 0))  # a conditional update: 1 only for the first end

    def live(self) -> list[Launch]:
        with self.db.session() as s:
            return [_launch(r) for r in s.scalars(select(LaunchRecord).where(LaunchRecord.state != "ended"))]

    def by_instances(self, names: list[str]) -> dict[str, Launch]:
        if not names:
            return {}
        with self.db.session() as s:
            rows = s.scalars(select(LaunchRecord).where(LaunchRecord.instance.in_(names)))
            return {r.instance: _launch(r) for r in rows}

    def ended_among(self, grant_ids: list[str]) -> set[str]:
        if not grant_ids:
            return set()
        with self.db.session() as s:
            q = select(LaunchRecord.grant_id).where(
                LaunchRecord.grant_id.in_(grant_ids), LaunchRecord.state == "ended"
            )
            return {str(g) for g in s.scalars(q)}
