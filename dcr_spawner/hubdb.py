"""The hub's own records: jobs granted and the audit log, in a database the hub owns (SQLAlchemy 2).

SQLite by default, PostgreSQL by URL (``postgresql+psycopg://...``). The tables are DCR's, never
JupyterHub's: they may live in the same server as the hub's database but are created and read only here.
Their names start with ``dcr_hub_`` so they never clash with the user server's job store (``dcr_jobs``)
when an admin points both at one database.

- ``dcr_hub_jobs``: one row per grant issued (grant id, job id, user, bundle digest, times).
- ``dcr_hub_job_datasets``: the datasets each grant names (for per-dataset quotas).
- ``dcr_hub_audit``: every grant issued and every refusal, with who asked, the outcome and why; the airlock
  appends its approvals and rejections here too, and the hub copies the enclave platform's job events in
  (launch, key released or refused, end). Each row names the datasets it concerns (``datasets``, so a
  provider's events can be selected) and is **hash-chained**: ``hash`` is the SHA-256 of the row's fields
  (:data:`CHAINED_FIELDS`, canonical JSON) and the previous row's hash (``prev_hash``; 64 zeros for the
  first). The chain's head (last id, last hash, row count) is kept in ``dcr_hub_meta`` and moves in the
  same transaction as every append, so an altered, deleted or inserted row, and the last rows deleted, are
  all found by :meth:`HubDB.verify_audit`. Every row is added by :meth:`HubDB._append` (serialised by a
  lock in the process and, on PostgreSQL, an advisory lock in the transaction).
- ``dcr_hub_meta``: the schema version, the chain's head, the enclave platform's event cursor.

Times are integer Unix seconds (UTC) so both databases compare them the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dcr_enclave.formats.errors import DCRError

#: Bumped when the tables change; a database written by a newer DCR is refused rather than misread.
#: 2: the audit hash chain (``prev_hash``, ``hash``, the head in ``dcr_hub_meta``) and ``datasets``.
SCHEMA_VERSION: Final = 2
_DAY: Final = 86400
#: The first row's ``prev_hash``.
GENESIS_HASH: Final = "0" * 64
#: The fields of an audit row its hash covers (with ``prev_hash``), in the canonical JSON's key order.
CHAINED_FIELDS: Final = (
    "id",
    "at",
    "event",
    "user",
    "status",
    "job_id",
    "grant_id",
    "reason",
    "detail",
    "datasets",
)
#: ``dcr_hub_meta`` keys of the chain's head and of the enclave platform's event cursor.
HEAD_ID: Final = "audit_head_id"
HEAD_HASH: Final = "audit_head_hash"
HEAD_COUNT: Final = "audit_count"
PLATFORM_CURSOR: Final = "platform_event_cursor"
#: The PostgreSQL advisory lock every audit append holds for its transaction ("DCRAUDIT").
_PG_AUDIT_LOCK: Final = 0x4443524155444954 & 0x7FFFFFFFFFFFFFFF


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
    #: The ``provider/dataset`` references the event concerns, sorted, comma-separated ("" for none).
    datasets: Mapped[str] = mapped_column(Text, default="", server_default="")
    #: The previous row's ``hash`` (:data:`GENESIS_HASH` for the first row).
    prev_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")
    #: SHA-256 (hex) of this row's :data:`CHAINED_FIELDS` and ``prev_hash`` (:func:`audit_hash`).
    hash: Mapped[str] = mapped_column(String(64), default="", server_default="")


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
    #: ``provider/dataset`` references the event concerns.
    datasets: tuple[str, ...] = ()
    prev_hash: str = ""
    hash: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "event": self.event,
            "user": self.user,
            "status": self.status,
            "job_id": self.job_id,
            "grant_id": self.grant_id,
            "reason": self.reason,
            "detail": self.detail,
            "datasets": list(self.datasets),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class NewAuditEvent:
    """An audit event to append (:meth:`HubDB.append_audit`); id, time default and hashes are the
    database's."""

    event: str
    status: int
    user: str | None = None
    job_id: str | None = None
    grant_id: str | None = None
    reason: str = ""
    detail: Mapping[str, Any] | None = None
    #: ``provider/dataset`` references; ``None``: taken from ``detail["datasets"]`` when that is a list.
    datasets: Iterable[str] | None = None
    at: int | None = None


@dataclass(frozen=True)
class AuditVerification:
    """What :meth:`HubDB.verify_audit` found."""

    ok: bool
    #: Rows read and checked.
    rows: int
    #: The chain's head as ``dcr_hub_meta`` records it: ``(last id, last hash, row count)``.
    head: tuple[int, str, int]
    #: The first row found wrong (for a head mismatch, the last row present, or None in an empty table).
    bad_id: int | None = None
    #: ``"altered"`` (a row's fields or hash changed), ``"missing_link"`` (a row before it was deleted,
    #: or one inserted or moved), ``"head_mismatch"`` (the last rows deleted, or the head changed).
    problem: str | None = None
    #: One sentence for a person.
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "head": {"id": self.head[0], "hash": self.head[1], "count": self.head[2]},
            "bad_id": self.bad_id,
            "problem": self.problem,
            "message": self.message,
        }


def audit_hash(row: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of an audit row's :data:`CHAINED_FIELDS` (values as stored: ``detail`` is its JSON
    text, ``datasets`` the comma-joined references) and ``prev_hash``, as canonical JSON (sorted keys, no
    spaces, ASCII)."""
    doc = {name: row[name] for name in CHAINED_FIELDS}
    doc["prev_hash"] = prev_hash
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def join_datasets(refs: Iterable[str]) -> str:
    """The ``datasets`` column of a list of ``provider/dataset`` references (sorted, unique)."""
    return ",".join(sorted({str(r) for r in refs if r}))


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
    """The hub's DCR records. Methods are synchronous and short: the hub calls them on its event loop.

    ``create=False`` opens only an existing DCR database and changes nothing on opening it (the ``dcr
    audit`` commands): a missing SQLite file is an error instead of a new database.
    """

    def __init__(self, url: str, *, echo: bool = False, create: bool = True) -> None:
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
        self.backend = parsed.get_backend_name()
        if self.backend == "sqlite" and parsed.database:
            if create:
                _owner_only(Path(parsed.database))
            elif not Path(parsed.database).is_file():
                raise DCRError(
                    f"no DCR hub database at {parsed.database}",
                    hint="check the path (a relative one is relative to the hub's working directory)",
                )
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.backend == "postgresql":
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (ArgumentError, ImportError) as e:
            raise DCRError(f"cannot use c.DCRPolicy.db_url {self.url}: {e}") from None
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas if create else _sqlite_reader_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        #: Serialises the audit appends of this process (the hub writes from several threads).
        self._append_lock = threading.RLock()

    def setup(self) -> None:
        """Create the tables if missing, check the schema version and bring a version-1 database to this
        one (the audit chain over its rows, oldest first); refuse a database it cannot use."""
        try:
            Base.metadata.create_all(self.engine)
            with self._append_lock, self.session() as s:
                self._lock_audit(s)
                row = s.get(Meta, "schema_version")
                if row is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                    self._set_head(s, 0, GENESIS_HASH, 0)
                elif int(row.value) > SCHEMA_VERSION:
                    raise DCRError(
                        f"the DCR hub database {self.url} has schema version {row.value}, newer than this "
                        f"DCR's {SCHEMA_VERSION}",
                        hint="upgrade DCR on the hub",
                    )
                elif int(row.value) < SCHEMA_VERSION:
                    self._migrate(s, int(row.value))
                    row.value = str(SCHEMA_VERSION)
        except SQLAlchemyError as e:
            raise DCRError(
                f"cannot open the DCR hub database {self.url}: {e.__class__.__name__}: {e}"
            ) from None

    def check_existing(self) -> int:
        """For readers that must change nothing (``dcr audit``): the schema version of an existing DCR
        database, or :class:`DCRError` saying why this is not one."""
        try:
            tables = set(inspect(self.engine).get_table_names())
            if not {"dcr_hub_meta", "dcr_hub_audit"} <= tables:
                raise DCRError(
                    f"{self.url} is not a DCR hub database (it has no dcr_hub_meta and dcr_hub_audit tables)",
                    hint="give the database c.DCRPolicy.db_url names",
                )
            with self.session() as s:
                row = s.get(Meta, "schema_version")
        except SQLAlchemyError as e:
            raise DCRError(
                f"cannot read the DCR hub database {self.url}: {e.__class__.__name__}: {e}"
            ) from None
        if row is None:
            raise DCRError(f"{self.url} is not a DCR hub database (no schema version)")
        version = int(row.value)
        if version > SCHEMA_VERSION:
            raise DCRError(
                f"the DCR hub database {self.url} has schema version {version}, newer than this DCR's "
                f"{SCHEMA_VERSION}",
                hint="use the DCR version the hub runs",
            )
        if version < SCHEMA_VERSION:
            raise DCRError(
                f"the DCR hub database {self.url} has schema version {version}: it has no audit chain yet",
                hint="start the hub once with this DCR version: it adds the chain over the existing rows",
            )
        return version

    def _migrate(self, s: Session, version: int) -> None:
        """Version 1 -> 2: add ``datasets``, ``prev_hash`` and ``hash`` and chain the rows in id order (their
        datasets taken from ``detail["datasets"]``, which version 1 wrote for grants and refusals)."""
        if version != 1:
            raise DCRError(f"the DCR hub database {self.url} has unknown schema version {version}")
        have = {c["name"] for c in inspect(s.connection()).get_columns(AuditRecord.__tablename__)}
        for name, kind in (("datasets", "TEXT"), ("prev_hash", "VARCHAR(64)"), ("hash", "VARCHAR(64)")):
            if name not in have:
                s.execute(text(f"ALTER TABLE dcr_hub_audit ADD COLUMN {name} {kind} NOT NULL DEFAULT ''"))
        prev, last, count = GENESIS_HASH, 0, 0
        for r in s.scalars(select(AuditRecord).order_by(AuditRecord.id)):
            r.datasets = join_datasets(_detail_datasets(_loads(r.detail)))
            r.prev_hash = prev
            r.hash = prev = audit_hash(_row_fields(r), prev)
            last, count = r.id, count + 1
        self._set_head(s, last, prev, count)

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
        datasets: Iterable[str] | None = None,
    ) -> AuditEvent:
        """Append one audit event (chained) and return it as stored.

        ``datasets``: the ``provider/dataset`` references the event concerns (a provider's reviewers see
        the events naming their datasets); when ``None``, ``detail["datasets"]`` if that is a list.
        """
        (row,) = self.append_audit(
            [NewAuditEvent(event, status, user, job_id, grant_id, reason, detail, datasets, at)]
        )
        return row

    def append_audit(
        self, events: Sequence[NewAuditEvent], *, meta: Mapping[str, str] | None = None
    ) -> list[AuditEvent]:
        """Append ``events`` in order, in one transaction, with ``meta`` (``dcr_hub_meta`` entries) written
        in the same transaction."""
        with self._append_lock, self.session() as s:
            rows = self._append(s, events)
            for key, value in (meta or {}).items():
                _set_meta(s, key, value)
        return [_event(r) for r in rows]

    def _lock_audit(self, s: Session) -> None:
        """Hold the audit chain for the rest of the transaction ``s`` (other processes included): on
        PostgreSQL an advisory transaction lock; on SQLite a first write, which takes the database's write
        lock before the head is read."""
        if self.backend == "postgresql":
            s.execute(select(func.pg_advisory_xact_lock(_PG_AUDIT_LOCK)))
        else:
            s.execute(update(Meta).where(Meta.key == HEAD_ID).values(value=Meta.value))

    def _head(self, s: Session) -> tuple[int, str, int]:
        values = {
            m.key: m.value
            for m in s.scalars(select(Meta).where(Meta.key.in_([HEAD_ID, HEAD_HASH, HEAD_COUNT])))
        }
        return (
            int(values.get(HEAD_ID, 0)),
            values.get(HEAD_HASH, GENESIS_HASH),
            int(values.get(HEAD_COUNT, 0)),
        )

    def _set_head(self, s: Session, last_id: int, last_hash: str, count: int) -> None:
        _set_meta(s, HEAD_ID, str(last_id))
        _set_meta(s, HEAD_HASH, last_hash)
        _set_meta(s, HEAD_COUNT, str(count))

    def _append(self, s: Session, events: Iterable[NewAuditEvent]) -> list[AuditRecord]:
        """The one way a row enters ``dcr_hub_audit``: each event gets the next id, chains to the head, and
        the head moves, all in the caller's transaction ``s`` (the caller holds ``_append_lock``)."""
        self._lock_audit(s)
        last_id, prev, count = self._head(s)
        top = s.scalar(select(func.max(AuditRecord.id))) or 0
        next_id = max(last_id, int(top)) + 1
        now = int(time.time())
        rows = []
        for e in events:
            detail = dict(e.detail or {})
            refs = e.datasets if e.datasets is not None else _detail_datasets(detail)
            row = AuditRecord(
                id=next_id,
                at=now if e.at is None else int(e.at),
                event=e.event,
                user=e.user,
                status=int(e.status),
                job_id=e.job_id,
                grant_id=e.grant_id,
                reason=(e.reason or "")[:2000],
                detail=json.dumps(detail, sort_keys=True, default=str),
                datasets=join_datasets(refs),
            )
            row.prev_hash = prev
            row.hash = prev = audit_hash(_row_fields(row), prev)
            s.add(row)
            rows.append(row)
            last_id, next_id, count = next_id, next_id + 1, count + 1
        s.flush()
        self._set_head(s, last_id, prev, count)
        return rows

    def record_grant(self, job: GrantedJob, detail: dict[str, Any] | None = None) -> None:
        """Store a granted job and its audit event in one transaction.

        Raises :class:`DCRError` if the job id was granted before (job ids are single-use).
        """
        try:
            with self._append_lock, self.session() as s:
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
                s.flush()  # a job id granted before fails here, before the audit chain moves
                refs = [ref for ref, _, _ in job.datasets]
                self._append(
                    s,
                    [
                        NewAuditEvent(
                            "grant.issued",
                            201,
                            job.user,
                            job.job_id,
                            job.grant_id,
                            "",
                            {"datasets": refs, **(detail or {})},
                            refs,
                            job.issued_at,
                        )
                    ],
                )
        except IntegrityError:
            raise DCRError(
                f"job {job.job_id} already has a grant", hint="each job id is granted once"
            ) from None

    def ingest_platform_events(
        self, events: Sequence[NewAuditEvent], *, expected_cursor: str, new_cursor: str
    ) -> int | None:
        """Append the enclave platform's events read after ``expected_cursor`` and move the stored cursor to
        ``new_cursor``, in one transaction; ``None`` (nothing written) when the stored cursor is no longer
        ``expected_cursor`` (another ingestion got there first): each platform event is recorded once."""
        with self._append_lock, self.session() as s:
            self._lock_audit(s)
            row = s.get(Meta, PLATFORM_CURSOR)
            if (row.value if row is not None else "") != expected_cursor:
                return None
            self._append(s, events)
            _set_meta(s, PLATFORM_CURSOR, new_cursor)
        return len(events)

    def platform_cursor(self) -> str:
        with self.session() as s:
            row = s.get(Meta, PLATFORM_CURSOR)
            return row.value if row is not None else ""

    def job_grants(self, job_ids: Iterable[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
        """``job id -> (grant id, its dataset references)`` of the jobs this hub granted."""
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        with self.session() as s:
            jobs = dict(
                s.execute(select(JobRecord.job_id, JobRecord.grant_id).where(JobRecord.job_id.in_(ids))).all()
            )
            refs: dict[str, list[str]] = {}
            if jobs:
                for g, ref in s.execute(
                    select(JobDataset.grant_id, JobDataset.dataset).where(
                        JobDataset.grant_id.in_(list(jobs.values()))
                    )
                ):
                    refs.setdefault(str(g), []).append(str(ref))
        return {str(j): (str(g), tuple(sorted(refs.get(str(g), [])))) for j, g in jobs.items()}

    # Verifying ----------------------------------------------------------------------------------------

    def audit_head(self) -> tuple[int, str, int]:
        """The chain's head as recorded: ``(last id, last hash, row count)``."""
        with self.session() as s:
            return self._head(s)

    def verify_audit(self, *, batch: int = 5000) -> AuditVerification:
        """Walk the whole audit chain, oldest first (in one read transaction), and say whether every row
        still hashes to its ``hash``, links to the row before, and ends at the recorded head."""
        with self.session() as s:
            head = self._head(s)
            prev, rows, last, after = GENESIS_HASH, 0, None, 0
            while True:
                chunk = s.execute(
                    select(*(getattr(AuditRecord, n) for n in (*CHAINED_FIELDS, "prev_hash", "hash")))
                    .where(AuditRecord.id > after)
                    .order_by(AuditRecord.id)
                    .limit(batch)
                ).all()
                if not chunk:
                    break
                for r in chunk:
                    fields = r._asdict()
                    rows += 1
                    if fields["prev_hash"] != prev:
                        what = "the first row" if prev == GENESIS_HASH else f"row {last}"
                        return AuditVerification(
                            False,
                            rows,
                            head,
                            r.id,
                            "missing_link",
                            f"row {r.id} does not follow {what} in the chain: a row before it was deleted, "
                            "or it was inserted or moved",
                        )
                    if audit_hash(fields, prev) != fields["hash"]:
                        return AuditVerification(
                            False, rows, head, r.id, "altered", f"row {r.id} was altered after it was written"
                        )
                    prev, last = fields["hash"], r.id
                after = chunk[-1].id
        if (last or 0, prev, rows) != head:
            return AuditVerification(
                False,
                rows,
                head,
                last,
                "head_mismatch",
                f"the chain ends at row {last or 0} ({rows} rows) but the recorded head is row {head[0]} "
                f"({head[2]} rows): the last row(s) were deleted, or the head was changed",
            )
        return AuditVerification(True, rows, head, message=f"{rows} audit rows verified, head row {head[0]}")

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
        """Note that these granted jobs have ended (idempotent, also when two writers note the same end)."""
        wanted = set(grant_ids)
        for attempt in (1, 2):
            try:
                with self.session() as s:
                    known = set(s.scalars(select(JobEnd.grant_id).where(JobEnd.grant_id.in_(list(wanted)))))
                    s.add_all(JobEnd(grant_id=g, ended_at=at) for g in wanted - known)
                return
            except IntegrityError:
                if attempt == 2:  # not another writer's row: something else is wrong
                    raise
                # Another writer noted one of these ends between the read and the write: read again.

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
        self,
        *,
        user: str | None = None,
        event: str | None = None,
        limit: int = 1000,
        providers: Iterable[str] | None = None,
        after_id: int = 0,
    ) -> list[AuditEvent]:
        """Audit events, oldest first, optionally for one user, one event kind, or the datasets of some
        providers (``providers``: the events naming at least one of their datasets), after ``after_id``."""
        with self.session() as s:
            q = select(AuditRecord).where(AuditRecord.id > after_id).order_by(AuditRecord.id)
            if user is not None:
                q = q.where(AuditRecord.user == user)
            if event is not None:
                q = q.where(AuditRecord.event == event)
            if providers is not None:
                padded = literal(",") + AuditRecord.datasets + literal(",")
                names = sorted(set(providers))
                if not names:
                    return []
                q = q.where(or_(*(padded.contains(f",{p}/", autoescape=True) for p in names)))
            return [_event(r) for r in s.scalars(q.limit(limit)).all()]


def _row_fields(r: AuditRecord) -> dict[str, Any]:
    return {name: getattr(r, name) for name in CHAINED_FIELDS}


def _event(r: AuditRecord) -> AuditEvent:
    return AuditEvent(
        id=r.id,
        at=r.at,
        event=r.event,
        user=r.user,
        status=r.status,
        job_id=r.job_id,
        grant_id=r.grant_id,
        reason=r.reason,
        detail=_loads(r.detail),
        datasets=tuple(d for d in (r.datasets or "").split(",") if d),
        prev_hash=r.prev_hash,
        hash=r.hash,
    )


def _loads(detail: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(detail or "{}")
    except json.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _detail_datasets(detail: Mapping[str, Any]) -> list[str]:
    refs = detail.get("datasets")
    if isinstance(refs, list):
        return [r for r in refs if isinstance(r, str)]
    return []


def _set_meta(s: Session, key: str, value: str) -> None:
    row = s.get(Meta, key)
    if row is None:
        s.add(Meta(key=key, value=value))
    else:
        row.value = value


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


def _sqlite_reader_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # A reader that must change nothing (``dcr audit``) sets no journal mode.
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def day_ago(now: int) -> int:
    """Start of the rolling 24-hour window the per-day quotas count in."""
    return now - _DAY
