"""The user's job store (dcr_server_ext.jobstore), its migrations, the job JSON schema and the job event.

The store tests run twice: on a SQLite file and on a real PostgreSQL server that the ``pg_server`` fixture
starts itself (initdb into a temporary directory, a unix socket only, no TCP), one fresh schema per test.

Fixtures (module-local for now):

- ``pg_server``: a running PostgreSQL server for the session; fails (never skips) without the binaries.
- ``pg_url``: a SQLAlchemy URL of a fresh, empty schema on it (first on the connections' search path).
- ``db_url``: parametrized over ``sqlite`` and ``postgresql``.
- ``jobstore``: an open :class:`JobStore` on ``db_url``.
"""

from __future__ import annotations

import getpass
import io
import json
import logging
import os
import pwd
import secrets
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, replace
from glob import glob
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import jsonschema
import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from jupyter_events import EventLogger

from dcr_enclave.formats.contract import JOB_STATES, TERMINAL_STATES, new_job_id
from dcr_enclave.formats.errors import DCRError
from dcr_server_ext import jobstore as jobstore_mod
from dcr_server_ext.errors import Conflict, NotFound
from dcr_server_ext.events import EVENT_SCHEMA_ID, EVENT_SCHEMA_PATH, EVENT_SCHEMA_VERSION, job_event
from dcr_server_ext.jobstore import JOBS, METADATA, MIGRATIONS_DIR, VERSION_TABLE, JobEnded, JobStore
from dcr_server_ext.model import UNFINISHED_STATES, Job

REPO = Path(__file__).resolve().parents[1]
JOB_SCHEMA_PATH = Path(jobstore_mod.__file__).parent / "schemas" / "job.schema.json"
DIGEST = "sha256:" + "ab" * 32

# ---------------------------------------------------------------------------------------------------------
# A real PostgreSQL server
# ---------------------------------------------------------------------------------------------------------


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        pytest.fail(
            f"PostgreSQL server binary {name!r} not found (PATH, /usr/lib/postgresql/*/bin): "
            "install the Debian package 'postgresql' (make test does), the job store is tested against it"
        )
    return found


@dataclass
class PgServer:
    socket_dir: Path
    port: int
    user: str

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=self.user, dbname=dbname, autocommit=True
        )

    def url(self, schema: str) -> str:
        """A URL whose connections work in ``schema`` (first on the search path) of the ``postgres`` database."""
        return (
            f"postgresql+psycopg://{self.user}@/postgres?host={self.socket_dir}&port={self.port}"
            f"&options=-csearch_path%3D{schema}"
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    # initdb refuses to run as root: as root the cluster belongs to the 'postgres' system account.
    as_root = os.geteuid() == 0
    if as_root:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, but there is no 'postgres' account to own the test cluster")
        user, run_as = "postgres", account.pw_uid
    else:
        user, run_as = getpass.getuser(), None
    # Not under pytest's tmp_path: that is private to root, and the server's account must reach it.
    base = Path(tempfile.mkdtemp(prefix="dcr-pg-"))
    if as_root:
        os.chown(base, account.pw_uid, account.pw_gid)
    data = base / "data"

    def run(*args: str | Path) -> None:
        proc = subprocess.run(
            [str(a) for a in args], cwd=base, user=run_as, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            pytest.fail(
                f"{Path(str(args[0])).name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )

    try:
        run(initdb, "-D", data, "-U", user, "--auth=trust", "-E", "UTF8", "--locale=C")
        with open(data / "postgresql.conf", "a") as conf:
            # Unix socket only: nothing listens on any network address. Durability is not under test.
            conf.write(
                f"listen_addresses = ''\nunix_socket_directories = '{base}'\nport = 5432\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 50\n"
            )
        run(pg_ctl, "-D", data, "-l", base / "server.log", "-w", "-t", "60", "start")
        try:
            yield PgServer(base, 5432, user)
        finally:
            run(pg_ctl, "-D", data, "-m", "fast", "-w", "-t", "60", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    # A schema per test: as empty as a new database, and much quicker to make than one.
    name = "dcr_" + secrets.token_hex(6)
    with pg_server.connect() as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    yield pg_server.url(name)
    with pg_server.connect() as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/data/dcr/jobs.sqlite"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def jobstore(db_url: str) -> Iterator[JobStore]:
    store = JobStore(db_url)
    yield store
    store.close()


def make_job(**fields: Any) -> Job:
    base: dict[str, Any] = {
        "id": new_job_id(),
        "notebook": "analysis/charges.ipynb",
        "bundle_digest": DIGEST,
        "bundle_files": 3,
        "bundle_bytes": 4096,
        "backend": "dcr_server_ext.backends.local.LocalBackend",
    }
    return Job(**{**base, **fields})


def raw_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------------
# CRUD
# ---------------------------------------------------------------------------------------------------------


def test_create_get_round_trip(jobstore: JobStore) -> None:
    """Every field of a job, JSON lists and dicts included, reads back exactly as it was stored."""
    job = make_job(
        state="running",
        created=1_700_000_000.125,
        updated=1_700_000_001.5,
        bundle_bytes=5 * 2**31,  # beyond a 32-bit integer
        datasets=[{"provider": "acme", "dataset": "insurance", "version": DIGEST, "release": "review"}],
        grant_id="grant-" + "0" * 32,
        backend_ref={"host_job": "x", "nested": {"a": [1, 2, None]}},
        cell=2,
        cells=7,
        failure={"reason": "ValueError in cell 2", "cell": 2, "ename": "ValueError"},
        outputs_path="dcr-jobs/x",
        receipt=True,
        enclave={"kind": "local", "simulated": True, "image_digest": DIGEST},
    )
    jobstore.create(job)
    assert jobstore.get(job.id) == job
    assert jobstore.get(new_job_id()) is None


def test_create_refuses_duplicate_id(jobstore: JobStore) -> None:
    """A second job with a taken id is a Conflict and leaves the first one as it was."""
    job = make_job()
    jobstore.create(job)
    with pytest.raises(Conflict, match=job.id):
        jobstore.create(replace(job, notebook="other.ipynb"))
    assert jobstore.get(job.id) == job
    assert jobstore.count() == 1


@pytest.mark.parametrize(
    "bad",
    [{"id": "job-123"}, {"id": "../etc"}, {"state": "exploded"}, {"cell": 1.5}, {"datasets": {"a": 1}}],
    ids=["short-id", "path-id", "state", "float-cell", "dict-datasets"],
)
def test_create_refuses_bad_job(jobstore: JobStore, bad: dict[str, Any]) -> None:
    """A job with a malformed id, an unknown state or a mistyped field is refused and nothing is stored."""
    with pytest.raises(DCRError):
        jobstore.create(make_job(**bad))
    assert jobstore.count() == 0


def test_update_returns_fresh_job_and_stamps_updated(jobstore: JobStore) -> None:
    """update changes only the given fields, stamps ``updated`` and returns the job as now stored."""
    job = make_job(created=1_700_000_000.0, updated=1_700_000_000.0)
    jobstore.create(job)
    new = jobstore.update(job.id, state="running", cell=0, cells=4, backend_ref={"pid": 42})
    assert new == jobstore.get(job.id)
    assert (new.state, new.cell, new.cells, new.backend_ref) == ("running", 0, 4, {"pid": 42})
    assert new.updated > job.updated
    assert replace(new, state=job.state, cell=None, cells=None, backend_ref={}, updated=job.updated) == job
    cleared = jobstore.update(job.id, cell=None, failure=None, enclave=None)
    assert cleared.cell is None and cleared.failure is None and cleared.cells == 4


def test_update_unknown_job_is_not_found(jobstore: JobStore) -> None:
    """Updating a job the store does not have raises NotFound (HTTP 404) and creates nothing."""
    with pytest.raises(NotFound):
        jobstore.update(new_job_id(), state="running")
    assert jobstore.count() == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"id": "job-" + "1" * 24},
        {"created": 0.0},
        {"updated": 0.0},
        {"colour": "red"},
        {"state": "exploded"},
        {"cells": "7"},
        {"receipt": 1},
        {"bundle_files": True},
        {"backend_ref": ["not", "a", "dict"]},
        {"failure": {"reason": object()}},
        {"enclave": {"kind": float("nan")}},
    ],
    ids=[
        "id", "created", "updated", "unknown", "bad-state", "str-for-int", "int-for-bool", "bool-for-int",
        "list-for-dict", "not-json", "nan",
    ],
)  # fmt: skip
def test_update_refuses_bad_fields(jobstore: JobStore, fields: dict[str, Any]) -> None:
    """Immutable, unknown or invalid fields are refused with a DCRError and the job is unchanged."""
    job = make_job()
    jobstore.create(job)
    with pytest.raises(DCRError):
        jobstore.update(job.id, cell=3, **fields)
    assert jobstore.get(job.id) == job


@pytest.mark.parametrize("ended", sorted(TERMINAL_STATES))
def test_ended_job_keeps_its_state(jobstore: JobStore, ended: str) -> None:
    """The state of a job in a terminal state never changes again: any other state (an earlier one or
    another terminal one) is refused with JobEnded (a 409 Conflict naming the job and its state), in one
    statement with the fields that came with it, and the record stays as it was. Writing the same state
    again, or another field, is allowed (the manager records where a job cancelled mid-launch ran)."""
    job = make_job(state=ended)
    jobstore.create(job)
    for state in JOB_STATES:
        if state == ended:
            continue
        with pytest.raises(JobEnded, match=rf"{job.id} has already ended \({ended}\)") as info:
            jobstore.update(job.id, state=state, cell=1, backend_ref={"late": True})
        assert isinstance(info.value, Conflict) and info.value.status == 409
        assert jobstore.get(job.id) == job
    again = jobstore.update(job.id, state=ended)
    assert again.state == ended
    noted = jobstore.update(job.id, backend_ref={"host_job": job.id})
    assert (noted.state, noted.backend_ref) == (ended, {"host_job": job.id})


def test_unfinished_job_may_end(jobstore: JobStore) -> None:
    """Until it ends, a job moves freely (a cancel may land in any state); once cancelled it stays so."""
    job = make_job(state="granted")
    jobstore.create(job)
    assert jobstore.update(job.id, state="cancelled").state == "cancelled"
    with pytest.raises(JobEnded):
        jobstore.update(job.id, state="launching")
    assert jobstore.get(job.id) == replace(job, state="cancelled", updated=ANY)


def test_delete_removes_a_record_only_in_the_given_state(jobstore: JobStore) -> None:
    """delete removes one job's record and says so; with ``state`` only while the job is in that state
    (a submission cancelled meanwhile keeps its record); an unknown job is False and nothing changes."""
    kept, gone, cancelled = make_job(), make_job(), make_job()
    for j in (kept, gone, cancelled):
        jobstore.create(j)
    jobstore.update(cancelled.id, state="cancelled")
    assert jobstore.delete(cancelled.id, state="submitted") is False
    assert jobstore.get(cancelled.id) is not None
    assert jobstore.delete(gone.id, state="submitted") is True
    assert jobstore.get(gone.id) is None
    assert jobstore.delete(gone.id) is False
    assert jobstore.delete(new_job_id()) is False
    assert jobstore.delete(cancelled.id) is True
    assert [j.id for j in jobstore.list()[0]] == [kept.id]
    assert jobstore.get(kept.id) == kept


def test_list_is_newest_first_with_total(jobstore: JobStore) -> None:
    """list pages through jobs newest first (ties broken by id), each page with the total count."""
    times = [100.0, 300.0, 200.0, 300.0, 50.0, 300.0, 250.0]
    jobs = [make_job(created=t, updated=t) for t in times]
    for j in jobs:
        jobstore.create(j)
    expected = sorted(jobs, key=lambda j: (j.created, j.id), reverse=True)
    pages = [jobstore.list(offset, 3) for offset in range(0, len(jobs), 3)]
    assert all(total == len(jobs) for _, total in pages)
    assert [j for page, _ in pages for j in page] == expected
    assert jobstore.list(0, 50) == (expected, len(jobs))
    assert jobstore.list(len(jobs), 10) == ([], len(jobs))
    assert jobstore.list(2, 0) == ([], len(jobs))


@pytest.mark.parametrize("offset,limit", [(-1, 10), (0, -5), ("0", 10)])
def test_list_refuses_bad_page(jobstore: JobStore, offset: Any, limit: Any) -> None:
    """A negative or non-integer offset or limit is a DCRError."""
    with pytest.raises(DCRError):
        jobstore.list(offset, limit)


def test_unfinished_and_count(jobstore: JobStore) -> None:
    """unfinished() returns exactly the jobs in UNFINISHED_STATES, oldest first; count() counts all."""
    jobs = [make_job(state=s, created=1000.0 - i) for i, s in enumerate(JOB_STATES)]
    for j in jobs:
        jobstore.create(j)
    want = sorted((j for j in jobs if j.state in UNFINISHED_STATES), key=lambda j: j.created)
    assert want, "the lifecycle has unfinished states"
    assert jobstore.unfinished() == want
    assert jobstore.count() == len(JOB_STATES)
    jobstore.update(want[0].id, state="cancelled")
    assert [j.id for j in jobstore.unfinished()] == [j.id for j in want[1:]]


def test_concurrent_updates_from_threads(jobstore: JobStore) -> None:
    """Threads updating different fields of one job never undo each other; creates from threads all land.

    Each thread owns one field and sets it to 0..N-1; every returned job shows the value that thread just
    set, and at the end every field holds its thread's last value.
    """
    job = make_job()
    jobstore.create(job)
    rounds = 25
    owned = ["cell", "cells", "bundle_files", "bundle_bytes"]
    start = threading.Barrier(len(owned) + 2)

    def updater(field: str) -> None:
        start.wait()
        for i in range(rounds):
            fresh = jobstore.update(job.id, **{field: i})
            assert getattr(fresh, field) == i

    created: list[str] = []

    def creator() -> None:
        start.wait()
        for _ in range(rounds):
            j = make_job()
            jobstore.create(j)
            created.append(j.id)

    with ThreadPoolExecutor(max_workers=len(owned) + 2) as pool:
        futures = [pool.submit(updater, f) for f in owned] + [pool.submit(creator) for _ in range(2)]
        for f in futures:
            f.result()
    final = jobstore.get(job.id)
    assert final is not None
    assert all(getattr(final, f) == rounds - 1 for f in owned)
    assert jobstore.count() == 1 + len(created) == 1 + 2 * rounds
    assert all(jobstore.get(i) is not None for i in created)


# ---------------------------------------------------------------------------------------------------------
# SQLite specifics
# ---------------------------------------------------------------------------------------------------------


def test_sqlite_file_is_owner_only(tmp_path: Path) -> None:
    """The SQLite file, its WAL files and every directory created for it are owner-only, whatever the umask."""
    path = tmp_path / "home" / "data" / "dcr" / "jobs.sqlite"
    old = os.umask(0)
    try:
        store = JobStore(f"sqlite:///{path}")
    finally:
        os.umask(old)
    try:
        store.create(make_job())
        files = [path, *(Path(f"{path}{s}") for s in ("-wal", "-shm"))]
        assert all(p.exists() for p in files), "WAL mode keeps -wal and -shm beside the open database"
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
        for d in (tmp_path / "home", tmp_path / "home" / "data", path.parent):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    finally:
        store.close()


def test_sqlite_uses_wal_and_waits_for_locks(tmp_path: Path) -> None:
    """The database is in WAL mode, and a write waits for another writer's lock instead of failing."""
    path = tmp_path / "jobs.sqlite"
    store = JobStore(f"sqlite:///{path}")
    try:
        job = make_job()
        store.create(job)
        other = sqlite3.connect(path, isolation_level=None)
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        result: dict[str, Any] = {}
        writer = threading.Thread(target=lambda: result.update(job=store.update(job.id, cell=5)))
        writer.start()
        writer.join(0.3)
        other.execute("COMMIT")
        other.close()
        writer.join()
        assert result["job"].cell == 5
        assert store.get(job.id).cell == 5  # type: ignore[union-attr]
    finally:
        store.close()


def test_sqlite_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative SQLite path is resolved once, at open: a later change of directory does not move the store."""
    monkeypatch.chdir(tmp_path)
    with JobStore("sqlite:///rel/jobs.sqlite") as store:
        path = tmp_path / "rel" / "jobs.sqlite"
        assert store.url == f"sqlite:///{path}"
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        jobs = [make_job() for _ in range(4)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(store.create, jobs))
        assert store.count() == 4
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM dcr_jobs").fetchone() == (4,)
    assert not (tmp_path / "elsewhere" / "rel").exists()


def test_sqlite_in_memory_url(tmp_path: Path) -> None:
    """An in-memory SQLite URL works and is shared by all threads of the store."""
    with JobStore("sqlite://") as store:
        job = make_job()
        store.create(job)
        with ThreadPoolExecutor(max_workers=2) as pool:
            assert pool.submit(store.get, job.id).result() == job


# ---------------------------------------------------------------------------------------------------------
# Opening and migrations
# ---------------------------------------------------------------------------------------------------------


def test_open_migrates_to_head_and_reopen_is_noop(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A new database is migrated to the newest revision; opening it again runs no migration, keeps data."""
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    with caplog.at_level(logging.INFO, logger="alembic"):
        with JobStore(db_url) as store:
            assert store.revision() == head
            job = make_job()
            store.create(job)
        assert any("Running upgrade" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with JobStore(db_url) as store:
            assert store.revision() == head
            assert store.list(0, 10) == ([job], 1)
    assert not [r for r in caplog.records if "Running upgrade" in r.getMessage()]
    assert raw_rows(db_url, "SELECT version_num FROM dcr_alembic_version") == [(head,)]


def test_concurrent_first_opens_from_processes(db_url: str) -> None:
    """Processes opening one new database at once all succeed: one creates and migrates it, the others wait."""
    code = "import sys; from dcr_server_ext.jobstore import JobStore; JobStore(sys.argv[1]).close()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, db_url], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outcomes = [(p.wait(), p.communicate()[1]) for p in procs]
    assert outcomes == [(0, "")] * len(procs)
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert raw_rows(db_url, "SELECT version_num FROM dcr_alembic_version") == [(head,)]


def test_migrations_match_the_model(jobstore: JobStore, db_url: str) -> None:
    """The table the migrations build is the table the store's code uses (Alembic finds no difference)."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
            )
            assert compare_metadata(ctx, METADATA) == []
            index_names = {ix["name"] for ix in sa.inspect(conn).get_indexes(JOBS.name)}
    finally:
        engine.dispose()
    assert {"ix_dcr_jobs_created", "ix_dcr_jobs_state"} <= index_names


def test_unknown_revision_is_refused(db_url: str) -> None:
    """A database at a revision this version does not know is refused with a DCRError naming it; untouched."""
    with JobStore(db_url) as store:
        job = make_job()
        store.create(job)
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE dcr_alembic_version SET version_num = 'f00d_from_the_future'"))
    engine.dispose()
    with pytest.raises(DCRError, match="f00d_from_the_future") as err:
        JobStore(db_url)
    assert "newer" in str(err.value)
    assert raw_rows(db_url, "SELECT version_num FROM dcr_alembic_version") == [("f00d_from_the_future",)]
    assert raw_rows(db_url, "SELECT id FROM dcr_jobs") == [(job.id,)]


SECOND_REVISION = '''
"""Test-only second revision: a nullable column the store's code does not know."""
import sqlalchemy as sa
from alembic import op

revision = "0002_test_note"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dcr_jobs") as batch:
        batch.add_column(sa.Column("note", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dcr_jobs") as batch:
        batch.drop_column("note")
'''


def test_old_database_is_upgraded_and_newer_is_refused(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a later revision available, an existing database is upgraded in place (jobs kept); the version
    without that revision then refuses the upgraded database, naming the revision."""
    with JobStore(db_url) as store:
        old_head = store.revision()
        job = make_job()
        store.create(job)
    newer = tmp_path / "migrations-newer"
    shutil.copytree(MIGRATIONS_DIR, newer, ignore=shutil.ignore_patterns("__pycache__"))
    (newer / "versions" / "0002_test_note.py").write_text(SECOND_REVISION.format(down=old_head))
    with monkeypatch.context() as m:
        m.setattr(jobstore_mod, "MIGRATIONS_DIR", newer)
        with JobStore(db_url) as store:
            assert store.revision() == "0002_test_note"
            assert store.get(job.id) == job
            store.update(job.id, state="running")
    assert raw_rows(db_url, "SELECT note FROM dcr_jobs") == [(None,)]
    with pytest.raises(DCRError, match="0002_test_note"):
        JobStore(db_url)


def test_foreign_table_is_refused(db_url: str) -> None:
    """A database holding a dcr_jobs table that no migration created is refused with a DCRError, untouched."""
    database = sa.make_url(db_url).database
    if db_url.startswith("sqlite") and database:
        Path(database).parent.mkdir(parents=True)
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE dcr_jobs (something INTEGER)"))
    engine.dispose()
    with pytest.raises(DCRError, match=r"cannot be opened: .*already exists"):
        JobStore(db_url)
    assert raw_rows(db_url, "SELECT count(*) FROM dcr_jobs") == [(0,)]
    with pytest.raises(sa.exc.DBAPIError):
        raw_rows(db_url, "SELECT version_num FROM dcr_alembic_version")


def test_bad_urls_are_refused_without_leaking_passwords(tmp_path: Path) -> None:
    """Malformed URLs, unknown dialects and unreachable servers are DCRErrors; a password never shows."""
    with pytest.raises(DCRError, match="not a SQLAlchemy database URL"):
        JobStore("this is not a url")
    with pytest.raises(DCRError, match="nosuchdb"):
        JobStore("nosuchdb://u@h/x")
    with pytest.raises(DCRError) as err:
        JobStore(f"postgresql+psycopg://dcr:s3cret@/jobs?host={tmp_path / 'no-server'}&port=5432")
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    (tmp_path / "a-dir.sqlite").mkdir()
    with pytest.raises(DCRError, match="not a file"):
        JobStore(f"sqlite:///{tmp_path / 'a-dir.sqlite'}")


# ---------------------------------------------------------------------------------------------------------
# The job JSON schema
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(JOB_SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


ENCLAVE = {"kind": "local", "simulated": True, "image_digest": DIGEST}
API_CASES: dict[str, dict[str, Any]] = {
    "submitted": {
        "datasets": [{"provider": "acme", "dataset": "insurance", "version": None, "release": None}]
    },
    "granted": {
        "state": "granted",
        "grant_id": "grant-" + "1" * 32,
        "datasets": [{"provider": "acme", "dataset": "insurance", "version": DIGEST, "release": "auto"}],
    },
    "running-before-first-cell": {"state": "running", "cells": 6, "enclave": ENCLAVE},
    "running-progress": {"state": "running", "cell": 3, "cells": 6, "enclave": ENCLAVE},
    "failed": {
        "state": "failed",
        "cell": 2,
        "cells": 6,
        "failure": {"reason": "ZeroDivisionError in cell 2", "cell": 2, "ename": "ZeroDivisionError"},
    },
    "failed-before-launch": {
        "state": "failed",
        "failure": {"reason": "grant refused", "cell": None, "ename": None},
    },
    "succeeded": {
        "state": "succeeded",
        "cell": 5,
        "cells": 6,
        "outputs_path": "dcr-jobs/job-x",
        "receipt": True,
        "enclave": {"kind": "confidential_space", "simulated": False, "image_digest": None},
    },
    "cancelled": {"state": "cancelled", "created": 0.0, "updated": 1.999},
}


@pytest.mark.parametrize("fields", API_CASES.values(), ids=API_CASES.keys())
def test_job_api_json_matches_schema(
    job_validator: jsonschema.Draft202012Validator, fields: dict[str, Any]
) -> None:
    """Job.to_api() validates against schemas/job.schema.json in every state, with progress and failures."""
    doc = make_job(**fields).to_api()
    job_validator.validate(doc)
    assert json.loads(json.dumps(doc)) == doc


def test_job_api_json_from_store_matches_schema(
    jobstore: JobStore, job_validator: jsonschema.Draft202012Validator
) -> None:
    """Jobs read back from the store (JSON columns decoded) still produce schema-valid API JSON."""
    for fields in API_CASES.values():
        jobstore.create(make_job(**fields))
    jobs, total = jobstore.list(0, 50)
    assert total == len(API_CASES)
    for job in jobs:
        job_validator.validate(job.to_api())


@pytest.mark.parametrize(
    "path,value",
    [
        (("failure",), {"reason": "x", "cell": 1, "ename": "E", "traceback": "row 17: alice, 52"}),
        (("state",), "exploded"),
        (("id",), "job-1"),
        (("progress",), {"cell": 1, "cells": 2, "output": "data"}),
        (("stdout",), "anything"),
    ],
    ids=["failure-with-data", "state", "id", "progress-with-data", "extra-field"],
)
def test_job_schema_rejects_unknown_content(
    job_validator: jsonschema.Draft202012Validator, path: tuple[str, ...], value: Any
) -> None:
    """The job schema admits no extra fields (nowhere for data to hide) and no unknown states or ids."""
    doc = make_job(state="failed", cells=2, failure={"reason": "x", "cell": 1, "ename": "E"}).to_api()
    doc[path[0]] = value
    assert not job_validator.is_valid(doc)


# ---------------------------------------------------------------------------------------------------------
# The job event
# ---------------------------------------------------------------------------------------------------------


def test_event_schema_registers_with_jupyter_events() -> None:
    """The event schema file loads in a real EventLogger under EVENT_SCHEMA_ID, with no warnings."""
    logger = EventLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.register_event_schema(EVENT_SCHEMA_PATH)
    schema = logger.schemas.get(EVENT_SCHEMA_ID)
    # jupyter_events types ``version`` as int but requires a string (it warns on, then coerces, an int).
    assert (schema.id, str(schema.version)) == (EVENT_SCHEMA_ID, EVENT_SCHEMA_VERSION)
    assert set(schema.properties) == {"job_id", "state", "cell", "cells", "reason"}


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"state": "submitted"}, {"cell": None, "cells": None, "reason": None}),
        ({"state": "running", "cell": 2, "cells": 9}, {"cell": 2, "cells": 9, "reason": None}),
        (
            {
                "state": "failed",
                "cell": 4,
                "cells": 9,
                "failure": {"reason": "KeyError", "cell": 4, "ename": "KeyError"},
            },
            {"cell": 4, "cells": 9, "reason": "KeyError"},
        ),
    ],
    ids=["submitted", "progress", "failed"],
)
def test_job_event_is_emitted(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    """job_event(job) validates against the registered schema and is emitted on the bus as built."""
    logger = EventLogger()
    logger.register_event_schema(EVENT_SCHEMA_PATH)
    sink = io.StringIO()
    logger.register_handler(logging.StreamHandler(sink))
    job = make_job(**fields)
    data = job_event(job)
    assert data == {"job_id": job.id, "state": job.state, **expected}
    logger.emit(schema_id=EVENT_SCHEMA_ID, data=data)
    (line,) = sink.getvalue().splitlines()
    event = json.loads(line)
    assert event["__schema__"] == EVENT_SCHEMA_ID
    assert event["__schema_version__"] == EVENT_SCHEMA_VERSION
    assert {k: v for k, v in event.items() if not k.startswith("__")} == data


@pytest.mark.parametrize(
    "change",
    [{"output": "alice,52,smoker"}, {"state": "exploded"}, {"cell": "2"}, {"job_id": "nope"}],
    ids=["extra-field", "state", "cell-type", "job-id"],
)
def test_job_event_schema_refuses_other_content(change: dict[str, Any]) -> None:
    """An event with an extra field (data) or a malformed value is refused by the event logger."""
    logger = EventLogger()
    logger.register_event_schema(EVENT_SCHEMA_PATH)
    sink = io.StringIO()
    logger.register_handler(logging.StreamHandler(sink))
    data = {**job_event(make_job(state="running", cell=0, cells=3)), **change}
    with pytest.raises(jsonschema.ValidationError):
        logger.emit(schema_id=EVENT_SCHEMA_ID, data=data)
    assert sink.getvalue() == ""
