"""The user's job store: one table of :class:`~dcr_server_ext.model.Job` records behind a small API.

SQLAlchemy 2 (Core, no ORM) on any database URL; by default a SQLite file in the user's data directory, on
the home volume so it survives pod replacement. The schema is managed by the Alembic migrations shipped in
``dcr_server_ext/migrations/``: opening a store upgrades its database to the newest revision this version
knows, and refuses a database written by a newer version rather than guess at its layout.

The store is a convenience for the user: nothing security-relevant depends on it (grants are checked by
the enclave, outputs are sealed to keys only the user's server holds). The table and the Alembic version
table carry a ``dcr_`` prefix so that the store can share a database with other applications (JupyterHub
itself keeps an ``alembic_version`` table).
"""

from __future__ import annotations

import builtins
import json
import os
import time
import types
import typing
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from dcr_enclave.formats.contract import JOB_STATES, TERMINAL_STATES, check_job_id
from dcr_enclave.formats.errors import DCRError

from .errors import Conflict, NotFound, Unavailable
from .model import UNFINISHED_STATES, Job, may_precede

#: The Alembic scripts (``env.py`` and ``versions/``), shipped as package data.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
TABLE_NAME = "dcr_jobs"
#: Alembic's bookkeeping table (one row: the revision the database is at).
VERSION_TABLE = "dcr_alembic_version"
#: How long a writer waits for another writer's lock on a SQLite file before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
#: Key of the PostgreSQL advisory lock that serialises migrations of several servers sharing a database.
_PG_MIGRATION_LOCK = zlib.crc32(b"dcr_server_ext.jobstore.migrate")
#: Execution option asking the SQLite ``begin`` hook for a write lock up front (``BEGIN IMMEDIATE``).
_SQLITE_WRITE = "dcr_sqlite_write"

METADATA = sa.MetaData()

#: The table as the newest migration leaves it (the migrations are the source of truth; a test compares).
JOBS = sa.Table(
    TABLE_NAME,
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("notebook", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Column("bundle_digest", sa.String(80), nullable=False),
    sa.Column("bundle_files", sa.Integer, nullable=False),
    sa.Column("bundle_bytes", sa.BigInteger, nullable=False),
    sa.Column("datasets", sa.JSON(none_as_null=True), nullable=False),
    sa.Column("grant_id", sa.String(64), nullable=True),
    sa.Column("backend", sa.Text, nullable=False),
    sa.Column("backend_ref", sa.JSON(none_as_null=True), nullable=False),
    sa.Column("cell", sa.Integer, nullable=True),
    sa.Column("cells", sa.Integer, nullable=True),
    sa.Column("failure", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("outputs_path", sa.Text, nullable=True),
    sa.Column("receipt", sa.Boolean, nullable=False),
    sa.Column("enclave", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("review", sa.JSON(none_as_null=True), nullable=True),
    # ``id`` breaks ties between jobs created in the same instant, so pages never overlap or skip.
    sa.Index("ix_dcr_jobs_created", "created", "id"),
    sa.Index("ix_dcr_jobs_state", "state"),
)


class JobEnded(Conflict):
    """The job has ended (a terminal state): its state is final and the store refuses to change it."""


class StateBehind(Conflict):
    """The job is already past the state asked for: states only move forward (``model.LIFECYCLE_STEP``)."""


#: Fields ``update`` may change; ``updated`` is the store's to set, ``id`` and ``created`` never change.
UPDATABLE_FIELDS = frozenset(Job.__dataclass_fields__) - {"id", "created", "updated"}


def _runtime_types(hint: Any) -> tuple[type, ...]:
    """``str | None`` → ``(str, NoneType)``, ``list[dict[str, Any]]`` → ``(list,)``; floats accept ints."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    out: list[type] = []
    for a in args:
        cls = typing.get_origin(a) or a
        out.extend((float, int) if cls is float else (cls,))
    return tuple(out)


#: What each field of :class:`Job` may hold, from the dataclass's own annotations (kept in step with it).
FIELD_TYPES = {name: _runtime_types(hint) for name, hint in typing.get_type_hints(Job).items()}


class JobStore:
    """Jobs in a SQL database; thread-safe (one engine, a pool of connections).

    ``url`` is any SQLAlchemy URL (``sqlite:////path/jobs.sqlite``, ``postgresql+psycopg://...``). A
    SQLite file and its missing parent directories are created owner-only (0600 in 0700 directories).
    """

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except (exc.ArgumentError, ValueError):
            # The URL is not echoed: it may hold a password.
            raise DCRError(
                "the job store URL is not a SQLAlchemy database URL",
                hint="use e.g. sqlite:////path/to/jobs.sqlite or postgresql+psycopg://user@host/db",
            ) from None
        #: The URL with any password masked, for messages and logs.
        self.url = parsed.render_as_string(hide_password=True)
        self._sqlite = parsed.get_backend_name() == "sqlite"
        self._engine = self._make_engine(parsed)
        self.url = self._engine.url.render_as_string(hide_password=True)
        # Writers on SQLite take the database lock when their transaction begins (see _install_sqlite_hooks).
        self._write_engine = self._engine.execution_options(**{_SQLITE_WRITE: True})
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    # -- the API -------------------------------------------------------------------------------------------

    def create(self, job: Job) -> None:
        """Store a new job; :class:`~dcr_server_ext.errors.Conflict` if its id is taken."""
        check_job_id(job.id)
        record = job.to_record()
        _check_values(record)
        try:
            with self._db(), self._write_engine.begin() as conn:
                conn.execute(JOBS.insert().values(**record))
        except exc.IntegrityError:
            raise Conflict(f"job {job.id} already exists in the job store") from None

    def get(self, job_id: str) -> Job | None:
        with self._db(), self._engine.connect() as conn:
            row = conn.execute(sa.select(JOBS).where(JOBS.c.id == job_id)).one_or_none()
        return _job(row) if row is not None else None

    def update(self, job_id: str, **fields: Any) -> Job:
        """Change some fields of one job and stamp ``updated``; return the job as stored afterwards.

        One ``UPDATE ... RETURNING`` statement: concurrent updates of different fields never undo each
        other, and the returned job is exactly the row this update produced.

        A job's state only moves forward along the lifecycle (``model.LIFECYCLE_STEP``) or stays: setting
        the state of a job that has ended raises :class:`JobEnded`, an earlier state than the stored one
        :class:`StateBehind`, and neither changes anything. The check is part of the statement, so no
        writer can slip in between a check and the write. Other fields of an ended job may still be
        written (the manager records where a job cancelled mid-launch ran).
        """
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise DCRError(
                f"cannot update job field(s) {', '.join(sorted(unknown))}",
                hint=f"updatable fields: {', '.join(sorted(UPDATABLE_FIELDS))}",
            )
        _check_values(fields)
        values = {**fields, "updated": time.time()}
        stmt = sa.update(JOBS).where(JOBS.c.id == job_id)
        if "state" in fields:
            stmt = stmt.where(JOBS.c.state.in_(may_precede(fields["state"])))
        stmt = stmt.values(**values).returning(*JOBS.c)
        with self._db(), self._write_engine.begin() as conn:
            row = conn.execute(stmt).one_or_none()
        if row is None:
            current = self.get(job_id)
            if current is None or "state" not in fields:
                raise NotFound(f"no job {job_id} in the job store")
            if current.state in TERMINAL_STATES:
                raise JobEnded(
                    f"job {job_id} has already ended ({current.state}); its state cannot change to "
                    f"{fields['state']!r}"
                )
            raise StateBehind(
                f"job {job_id} is already {current.state}; it cannot go back to {fields['state']!r}"
            )
        return _job(row)

    def delete(self, job_id: str, *, state: str | None = None) -> bool:
        """Remove one job's record; with ``state``, only while the job is in that state. Returns whether
        a record was removed (``False``: no such job, or it has moved on from ``state``).

        For submissions that never became jobs (the grant was refused): the condition is part of the
        statement, so a job cancelled meanwhile is kept.
        """
        stmt = sa.delete(JOBS).where(JOBS.c.id == job_id)
        if state is not None:
            stmt = stmt.where(JOBS.c.state == state)
        with self._db(), self._write_engine.begin() as conn:
            removed = conn.execute(stmt).rowcount
        return bool(removed)

    def unfinished(self) -> builtins.list[Job]:
        """Jobs the reconciler still has work on (``model.UNFINISHED_STATES``), oldest first."""
        stmt = (
            sa.select(JOBS)
            .where(JOBS.c.state.in_(UNFINISHED_STATES))
            .order_by(JOBS.c.created.asc(), JOBS.c.id.asc())
        )
        with self._db(), self._engine.connect() as conn:
            return [_job(r) for r in conn.execute(stmt)]

    def in_review(self) -> builtins.list[Job]:
        """Jobs the hub's airlock has (or should have) and has not decided: ``held`` jobs, and failed ones
        whose sealed failure detail waits for the reviewers; oldest first."""
        stmt = (
            sa.select(JOBS)
            .where(
                sa.or_(JOBS.c.state == "held", sa.and_(JOBS.c.state == "failed", JOBS.c.review.is_not(None)))
            )
            .order_by(JOBS.c.created.asc(), JOBS.c.id.asc())
        )
        with self._db(), self._engine.connect() as conn:
            jobs = [_job(r) for r in conn.execute(stmt)]
        return [
            j for j in jobs if j.state == "held" or (j.review or {}).get("status") in ("unsent", "waiting")
        ]

    def count(self) -> int:
        with self._db(), self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(JOBS)).scalar_one())

    def list(self, offset: int = 0, limit: int = 50) -> tuple[builtins.list[Job], int]:
        """One page of jobs, newest first, and the total number of jobs (both from one snapshot)."""
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, limit)):
            raise DCRError(f"offset and limit must be non-negative integers, not {offset!r} and {limit!r}")
        page = sa.select(JOBS).order_by(JOBS.c.created.desc(), JOBS.c.id.desc()).offset(offset).limit(limit)
        with self._db(), self._engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # READ COMMITTED would let a commit land between the count and the page.
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                total = int(conn.execute(sa.select(sa.func.count()).select_from(JOBS)).scalar_one())
                jobs = [_job(r) for r in conn.execute(page)] if offset < total and limit else []
        return jobs, total

    def revision(self) -> str | None:
        """The schema revision the database is at (``None`` only if it was never migrated)."""
        with self._db(), self._engine.connect() as conn:
            heads = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE}
            ).get_current_heads()
        return heads[0] if heads else None

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening -------------------------------------------------------------------------------------------

    def _make_engine(self, url: URL) -> Engine:
        kwargs: dict[str, Any] = {}
        if self._sqlite:
            database = url.database or ""
            if database in ("", ":memory:"):
                # One shared connection, or every pooled connection would see its own empty database.
                kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
            else:
                if not database.startswith("file:"):
                    # Absolute, so that pooled connections opened later do not depend on the working directory.
                    url = url.set(database=str(_prepare_sqlite_file(Path(database))))
                kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        try:
            engine = sa.create_engine(url, **kwargs)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
            raise DCRError(
                f"cannot use the job store URL {self.url}: {e}",
                hint="check the dialect name and that its database driver is installed",
            ) from None
        if self._sqlite:
            _install_sqlite_hooks(engine)
        return engine

    def _migrate(self) -> None:
        """Bring the database to the newest revision; a no-op when it is there already."""
        script = ScriptDirectory(str(MIGRATIONS_DIR))
        known = {rev.revision for rev in script.walk_revisions()}
        heads = set(script.get_heads())
        with self._db(opening=True), self._write_engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                # Several servers may open one database at once; the first migrates, the others wait.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            current = set(ctx.get_current_heads())
            strangers = sorted(current - known)
            if strangers:
                raise DCRError(
                    f"the job store at {self.url} is at schema revision {', '.join(strangers)}, "
                    "which this version of jupyterhub-dcr does not know",
                    hint="it was written by a newer jupyterhub-dcr: upgrade jupyterhub-dcr, or point "
                    "c.DCRExtension.db_url at another database",
                )
            if current == heads:
                return
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            # env.py runs the migrations on this connection, inside this transaction.
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")

    @contextmanager
    def _db(self, *, opening: bool = False) -> Iterator[None]:
        """Turn a database that cannot be reached or read into a refusal that names the store."""
        try:
            yield
        except (exc.DBAPIError, CommandError) as e:
            reason = _reason(e) if isinstance(e, exc.DBAPIError) else str(e)
            if opening:
                # Unreachable server, bad credentials, or e.g. a dcr_jobs table no migration of ours made.
                raise DCRError(
                    f"the job store at {self.url} cannot be opened: {reason}",
                    hint="check c.DCRExtension.db_url and the database server",
                ) from None
            if isinstance(e, exc.OperationalError):
                raise Unavailable(f"the job store at {self.url} cannot be used: {reason}") from None
            raise


def _install_sqlite_hooks(engine: Engine) -> None:
    """WAL, a busy timeout, and transactions that really begin when SQLAlchemy begins them.

    Python's sqlite3 module (3.11) opens transactions lazily, before the first write only, so a read
    followed by a write is not one transaction. Autocommit at the driver level plus an explicit ``BEGIN``
    restores SQLAlchemy's semantics; writers use ``BEGIN IMMEDIATE`` so that they wait for the lock
    (busy timeout) at the start instead of failing halfway when a reader would have to upgrade.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            # Readers never block the writer and the writer never blocks readers.
            cur.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL is corruption-safe; a power cut may lose the last commits only.
            cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_SQLITE_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _prepare_sqlite_file(path: Path) -> Path:
    """Create missing parent directories 0700 and the database file 0600 before SQLite opens it."""
    path = path.expanduser().absolute()
    try:
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:  # another process opening the same store got there first
                continue
            os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
        # O_EXCL: an existing file keeps its content and mode; a fresh one is owner-only from the start.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if not path.is_file():
            raise DCRError(f"the job store path {path} exists and is not a file") from None
        return path
    except OSError as e:
        raise DCRError(f"cannot create the job store at {path}: {e.strerror}") from None
    os.fchmod(fd, 0o600)
    os.close(fd)
    return path


def _check_values(values: dict[str, Any]) -> None:
    """Refuse what the database might store anyway (SQLite's columns take any type) but Job cannot hold."""
    for name, value in values.items():
        allowed = FIELD_TYPES[name]
        # bool is an int to Python, never to the schema.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise DCRError(f"job field {name!r} must be {names}, not {type(value).__name__}")
        if isinstance(value, list | dict):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise DCRError(f"job field {name!r} is not plain JSON: {e}") from None
    if "state" in values and values["state"] not in JOB_STATES:
        raise DCRError(f"unknown job state {values['state']!r}", hint=f"one of {', '.join(JOB_STATES)}")


def _job(row: sa.Row[Any]) -> Job:
    return Job.from_record(dict(row._mapping))


def _reason(e: exc.DBAPIError) -> str:
    return str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
