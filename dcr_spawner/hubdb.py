"""The hub's own records: jobs granted and the audit log, in a database the hub owns (SQLAlchemy 2).

SQLite by default, PostgreSQL by URL (``postgresql+psycopg://...``). The tables are DCR's, never
JupyterHub's: they may live in the same server as the hub's database but are created and read only here.
Their names start with ``dcr_hub_`` so they never clash with the user server's job store (``dcr_jobs``)
when an admin points both at one database.

- ``dcr_hub_jobs``: one row per grant issued (grant id, job id, user, bundle digest, times).
- ``dcr_hub_job_datasets``: the datasets each grant names (for per-dataset quotas).
- ``dcr_hub_audit``: every grant issued and every refusal, with who asked, the outcome and why; the airlock
  appends its approvals and rejections here too.

Times are integer Unix seconds (UTC) so both databases compare them the same way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dcr_enclave.formats.errors import DCRError

#: Bumped when the tables change; a database written by a newer DCR is refused rather than misread.
SCHEMA_VERSION: Final = 1
_DAY: Final = 86400


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "dcr_hub_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class JobRecord(Base):
    """A job the hub granted."""

    __tablename__ = "dcr_hub_jobs"
    grant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    bundle_digest: Mapped[str] = mapped_column(String(80))
    output_public_key: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[int] = mapped_column(BigInteger, index=True)
    #: When the job's time limit ends: until then the job counts as running for the concurrency quota.
    ends_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)


class JobDataset(Base):
    __tablename__ = "dcr_hub_job_datasets"
    grant_id: Mapped[str] = mapped_column(ForeignKey("dcr_hub_jobs.grant_id"), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(80))
    release: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_dcr_hub_job_datasets_dataset_time", "dataset", "issued_at"),)


class JobEnd(Base):
    """When the hub learnt from the platform that a granted job had ended (it stops counting as running)."""

    __tablename__ = "dcr_hub_job_ends"
    grant_id: Mapped[str] = mapped_column(ForeignKey("dcr_hub_jobs.grant_id"), primary_key=True)
    ended_at: Mapped[int] = mapped_column(BigInteger)


class AuditRecord(Base):
    """One audit event: a grant issued or refused, an output approved or rejected, ..."""

    __tablename__ = "dcr_hub_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[int] = mapped_column(BigInteger, index=True)
    event: Mapped[str] = mapped_column(String(64))
    #: The hub user who asked, when known (a request without a valid token has none).
    user: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    status: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    grant_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    #: JSON object with whatever else the event carries (datasets asked for, remote address, ...).
    detail: Mapped[str] = mapped_column(Text, default="{}")


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: int
    event: str
    user: str | None
    status: int
    job_id: str | None
    grant_id: str | None
    reason: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    """What a user (and the datasets they ask for) used, as the quotas count it."""

    #: Grant requests of the user (granted or refused) in the last 60 seconds.
    requests_last_minute: int
    #: The user's jobs whose time limit has not ended.
    running_jobs: int
    #: The user's grants in the last 24 hours.
    jobs_last_day: int
    #: Grants naming each dataset (all users) in the last 24 hours.
    dataset_jobs_last_day: dict[str, int]


@dataclass(frozen=True)
class GrantedJob:
    grant_id: str
    job_id: str
    user: str
    bundle_digest: str
    output_public_key: str
    issued_at: int
    ends_at: int
    expires_at: int
    #: ``(dataset ref, version, release)`` for each granted dataset.
    datasets: tuple[tuple[str, str, str], ...]


class HubDB:
    """The hub's DCR records. Methods are synchronous and short: the hub calls them on its event loop."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise DCRError(f"c.DCRPolicy.db_url {url!r} is not a database URL") from None
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise DCRError(
                f"c.DCRPolicy.db_url uses {parsed.get_backend_name()!r}",
                hint="use sqlite:///path/to/dcr.sqlite or postgresql+psycopg://user@host/db",
            )
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise DCRError(
                "c.DCRPolicy.db_url names an in-memory SQLite database: the hub's records would be lost",
                hint="give a file, e.g. sqlite:////srv/jupyterhub/dcr-hub.sqlite",
            )
        self.url = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            _owner_only(Path(parsed.database))
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if parsed.get_backend_name() == "postgresql":
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (ArgumentError, ImportError) as e:
            raise DCRError(f"cannot use c.DCRPolicy.db_url {self.url}: {e}") from None
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def setup(self) -> None:
        """Create the tables if missing and check the schema version; refuse a database it cannot use."""
        try:
            Base.metadata.create_all(self.engine)
            with self.session() as s:
                row = s.get(Meta, "schema_version")
                if row is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(row.value) > SCHEMA_VERSION:
                    raise DCRError(
                        f"the DCR hub database {self.url} has schema version {row.value}, newer than this "
                        f"DCR's {SCHEMA_VERSION}",
                        hint="upgrade DCR on the hub",
                    )
        except SQLAlchemyError as e:
            raise DCRError(
                f"cannot open the DCR hub database {self.url}: {e.__class__.__name__}: {e}"
            ) from None

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    # Writing ------------------------------------------------------------------------------------------

    def audit(
        self,
        event: str,
        *,
        status: int,
        user: str | None = None,
        job_id: str | None = None,
        grant_id: str | None = None,
        reason: str = "",
        detail: dict[str, Any] | None = None,
        at: int | None = None,
    ) -> None:
        with self.session() as s:
            s.add(self._audit_row(event, status, user, job_id, grant_id, reason, detail, at))

    @staticmethod
    def _audit_row(
        event: str,
        status: int,
        user: str | None,
        job_id: str | None,
        grant_id: str | None,
        reason: str,
        detail: dict[str, Any] | None,
        at: int | None,
    ) -> AuditRecord:
        return AuditRecord(
            at=int(time.time()) if at is None else at,
            event=event,
            user=user,
            status=status,
            job_id=job_id,
            grant_id=grant_id,
            reason=reason[:2000],
            detail=json.dumps(detail or {}, sort_keys=True, default=str),
        )

    def record_grant(self, job: GrantedJob, detail: dict[str, Any] | None = None) -> None:
        """Store a granted job and its audit event in one transaction.

        Raises :class:`DCRError` if the job id was granted before (job ids are single-use).
        """
        try:
            with self.session() as s:
                s.add(
                    JobRecord(
                        grant_id=job.grant_id,
                        job_id=job.job_id,
                        user=job.user,
                        bundle_digest=job.bundle_digest,
                        output_public_key=job.output_public_key,
                        issued_at=job.issued_at,
                        ends_at=job.ends_at,
                        expires_at=job.expires_at,
                    )
                )
                s.flush()  # the job row first: the dataset rows reference it
                for ref, version, release in job.datasets:
                    s.add(
                        JobDataset(
                            grant_id=job.grant_id,
                            dataset=ref,
                            version=version,
                            release=release,
                            issued_at=job.issued_at,
                        )
                    )
                s.add(
                    self._audit_row(
                        "grant.issued",
                        201,
                        job.user,
                        job.job_id,
                        job.grant_id,
                        "",
                        {"datasets": [ref for ref, _, _ in job.datasets], **(detail or {})},
                        job.issued_at,
                    )
                )
        except IntegrityError:
            raise DCRError(
                f"job {job.job_id} already has a grant", hint="each job id is granted once"
            ) from None

    # Reading ------------------------------------------------------------------------------------------

    def usage(self, user: str, refs: Iterable[str], now: int) -> Usage:
        """Everything the quotas and the rate limit look at, read in one transaction."""
        wanted = list(refs)
        with self.session() as s:
            requests = s.scalar(
                select(func.count()).where(
                    AuditRecord.user == user,
                    AuditRecord.at > now - 60,
                    AuditRecord.event.startswith("grant."),
                )
            )
            ended = select(JobEnd.grant_id)
            running = s.scalar(
                select(func.count()).where(
                    JobRecord.user == user, JobRecord.ends_at > now, JobRecord.grant_id.not_in(ended)
                )
            )
            today = s.scalar(
                select(func.count()).where(JobRecord.user == user, JobRecord.issued_at > day_ago(now))
            )
            per_dataset: dict[str, int] = {}
            if wanted:
                q = (
                    select(JobDataset.dataset, func.count())
                    .where(JobDataset.dataset.in_(wanted), JobDataset.issued_at > day_ago(now))
                    .group_by(JobDataset.dataset)
                )
                per_dataset = {str(ref): int(n) for ref, n in s.execute(q)}
        return Usage(
            requests_last_minute=int(requests or 0),
            running_jobs=int(running or 0),
            jobs_last_day=int(today or 0),
            dataset_jobs_last_day={ref: per_dataset.get(ref, 0) for ref in wanted},
        )

    def unended_grants(self, user: str, now: int) -> list[str]:
        """Grant ids of the user's jobs within their time limit that the hub has not seen end."""
        with self.session() as s:
            q = select(JobRecord.grant_id).where(
                JobRecord.user == user,
                JobRecord.ends_at > now,
                JobRecord.grant_id.not_in(select(JobEnd.grant_id)),
            )
            return [str(g) for g in s.scalars(q)]

    def record_ends(self, grant_ids: Iterable[str], at: int) -> None:
        """Note that these granted jobs have ended (idempotent)."""
        with self.session() as s:
            known = set(s.scalars(select(JobEnd.grant_id).where(JobEnd.grant_id.in_(list(grant_ids)))))
            s.add_all(JobEnd(grant_id=g, ended_at=at) for g in set(grant_ids) - known)

    def job_exists(self, job_id: str) -> bool:
        with self.session() as s:
            return s.scalar(select(func.count()).where(JobRecord.job_id == job_id)) != 0

    def job(self, job_id: str) -> GrantedJob | None:
        with self.session() as s:
            row = s.scalar(select(JobRecord).where(JobRecord.job_id == job_id))
            if row is None:
                return None
            ds = s.execute(
                select(JobDataset.dataset, JobDataset.version, JobDataset.release)
                .where(JobDataset.grant_id == row.grant_id)
                .order_by(JobDataset.dataset)
            ).all()
            return GrantedJob(
                grant_id=row.grant_id,
                job_id=row.job_id,
                user=row.user,
                bundle_digest=row.bundle_digest,
                output_public_key=row.output_public_key,
                issued_at=row.issued_at,
                ends_at=row.ends_at,
                expires_at=row.expires_at,
                datasets=tuple((str(d), str(v), str(r)) for d, v, r in ds),
            )

    def events(
        self, *, user: str | None = None, event: str | None = None, limit: int = 1000
    ) -> list[AuditEvent]:
        """Audit events, oldest first, optionally for one user or one event kind."""
        with self.session() as s:
            q = select(AuditRecord).order_by(AuditRecord.id)
            if user is not None:
                q = q.where(AuditRecord.user == user)
            if event is not None:
                q = q.where(AuditRecord.event == event)
            rows = s.scalars(q.limit(limit)).all()
            return [
                AuditEvent(
                    id=r.id,
                    at=r.at,
                    event=r.event,
                    user=r.user,
                    status=r.status,
                    job_id=r.job_id,
                    grant_id=r.grant_id,
                    reason=r.reason,
                    detail=json.loads(r.detail or "{}"),
                )
                for r in rows
            ]


def _owner_only(path: Path) -> None:
    """Create the SQLite file owner-only before SQLite would create it with the umask's mode (0644), and
    take other accounts' access away from one an earlier version created: it holds every job's record."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return  # no such directory: SQLite's own error says so when the hub connects
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: a commit is one fsync of the log instead of several of the journal and the database (the
    # grant path commits once per grant), and readers never wait for the writer. synchronous=FULL keeps
    # every committed audit event durable across a power loss.
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def day_ago(now: int) -> int:
    """Start of the rolling 24-hour window the per-day quotas count in."""
    return now - _DAY
