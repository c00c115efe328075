"""The hub's tamper-evident audit trail: the hash chain in the records database (SQLite and a real
PostgreSQL), ``dcr audit verify`` / ``export``, the v1 -> v2 migration, concurrent appends, and the audit API
and page of a real JupyterHub (who may read what).

Everything here runs in the CPU lane: databases and a hub of its own on free ports, no enclave host (the
platform's events are ingested from a real enclave host in ``test_audit_host.py``).
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hub_harness import GENEROUS_QUOTAS as GENEROUS
from hub_harness import Hub, Stores, dataset_entry, make_stores, policy_config
from sqlalchemy import text

from dcr_enclave.formats import contract, sealing
from dcr_spawner import DCRPolicy, GrantService
from dcr_spawner.audit import ingest_platform_events
from dcr_spawner.grant_service import Refusal
from dcr_spawner.hubdb import GENESIS_HASH, SCHEMA_VERSION, HubDB, NewAuditEvent
from dcr_spawner.platform import EnclavePlatform

BUNDLE = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    return make_stores(tmp_path_factory.mktemp("audit-stores"), rows=120)


def _datasets(s: Stores) -> dict[str, Any]:
    return {
        "acme/insurance": dataset_entry(s.insurance, s.root, users=["alice"], groups=["analysts"]),
        "globex/visits": dataset_entry(s.visits, s.root, users=["alice"], release="auto"),
    }


def _body(datasets: list[str] | None = None) -> bytes:
    _, public = sealing.generate_keypair()
    return json.dumps(
        {
            "job_id": contract.new_job_id(),
            "bundle_digest": BUNDLE,
            "datasets": datasets or [],
            "output_public_key": base64.urlsafe_b64encode(public).rstrip(b"=").decode(),
        }
    ).encode()


@pytest.fixture
def service(stores: Stores, tmp_path: Path, db_url: str) -> Iterator[GrantService]:
    policy = DCRPolicy(datasets=_datasets(stores), db_url=db_url, time_limit=600, quotas=GENEROUS)
    s = GrantService.start(policy, {"analysts"}, base_dir=tmp_path)
    yield s
    s.db.dispose()


def _grants_and_refusals(service: GrantService) -> None:
    service.issue("alice", set(), _body(["acme/insurance"]))
    service.issue("alice", set(), _body(["globex/visits"]))
    service.issue("bob", {"analysts"}, _body())
    for user, body in [
        ("carol", _body(["acme/insurance"])),
        ("bob", b"not json"),
        ("bob", _body(["globex/visits"])),
    ]:
        with pytest.raises(Refusal):
            service.issue(user, {"analysts"} if user == "bob" else set(), body)


def _verify(url: str, run_cli: Callable[..., Any]) -> Any:
    return run_cli("audit", "verify", "--db-url", url)


def _sql(url: str, statement: str) -> None:
    db = HubDB(url, create=False)
    try:
        with db.engine.begin() as c:
            c.execute(text(statement))
    finally:
        db.dispose()


# ---------------------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------------------


def test_grants_and_refusals_are_chained(service: GrantService) -> None:
    """Every grant and refusal of the real grant service is a chained row naming its datasets; the chain
    verifies, and its head is the last row."""
    _grants_and_refusals(service)
    events = service.db.events()
    assert [e.event for e in events] == ["grant.issued"] * 3 + ["grant.refused"] * 3
    assert events[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
    assert len({e.hash for e in events}) == len(events)
    assert events[0].datasets == ("acme/insurance",)
    assert events[2].datasets == ("acme/insurance",)  # bob: the analysts' dataset
    assert events[3].datasets == ("acme/insurance",) and events[3].user == "carol"
    assert events[4].datasets == ()  # not JSON: no datasets
    result = service.db.verify_audit()
    assert result.ok and result.rows == 6, result
    assert result.head == (events[-1].id, events[-1].hash, 6)
    acme = service.db.events(providers=["acme"])
    assert [e.id for e in acme] == [events[i].id for i in (0, 2, 3)]
    assert [e.id for e in service.db.events(providers=["globex"])] == [events[1].id, events[5].id]
    assert service.db.events(providers=["acm"]) == []  # a provider name, not a prefix
    assert service.db.events(providers=[]) == []


@pytest.mark.parametrize(
    "tamper, problem",
    [
        ("UPDATE dcr_hub_audit SET reason = 'nothing to see' WHERE id = {third}", "altered"),
        ("DELETE FROM dcr_hub_audit WHERE id = {third}", "missing_link"),
        ("DELETE FROM dcr_hub_audit WHERE id = {last}", "head_mismatch"),
    ],
    ids=["update-reason", "delete-middle", "delete-last"],
)
def test_verify_finds_the_tampered_row(
    service: GrantService, db_url: str, run_cli: Callable[..., Any], tamper: str, problem: str
) -> None:
    """``dcr audit verify`` passes, then fails naming the row after one row's reason is changed, a middle row
    is deleted, or the last row is deleted; the database is not changed by verifying."""
    _grants_and_refusals(service)
    ids = [e.id for e in service.db.events()]
    code, out, err = _verify(db_url, run_cli)
    assert code == 0, err
    assert f"audit chain OK: {len(ids)} rows verified" in out and f"head row {ids[-1]}" in out
    _sql(db_url, tamper.format(third=ids[2], last=ids[-1]))
    code, out, err = _verify(db_url, run_cli)
    assert code == 1, (out, err)
    bad = {"altered": ids[2], "missing_link": ids[3], "head_mismatch": ids[-2]}[problem]
    assert f"audit chain BROKEN at row {bad} ({problem})" in err
    assert "keep a copy as evidence" in err
    result = service.db.verify_audit()
    assert (result.ok, result.bad_id, result.problem) == (False, bad, problem)
    # A new append does not hide it: the chain still breaks where it was broken.
    service.db.audit("test.after", status=200)
    later = service.db.verify_audit()
    assert not later.ok and later.bad_id == (ids[-1] + 1 if problem == "head_mismatch" else bad)


def test_rewriting_a_row_with_its_hash_breaks_the_next_link(service: GrantService, db_url: str) -> None:
    """Recomputing the altered row's hash moves the break to the next row's link."""
    from dcr_spawner.hubdb import audit_hash

    _grants_and_refusals(service)
    events = service.db.events()
    victim = events[1]
    fields = {**victim.to_json(), "reason": "rewritten", "detail": json.dumps(victim.detail, sort_keys=True)}
    fields["datasets"] = ",".join(victim.datasets)
    forged = audit_hash(fields, victim.prev_hash)
    _sql(db_url, f"UPDATE dcr_hub_audit SET reason = 'rewritten', hash = '{forged}' WHERE id = {victim.id}")  # noqa: S608
    result = service.db.verify_audit()
    assert (result.ok, result.bad_id, result.problem) == (False, events[2].id, "missing_link")


def test_concurrent_appends_keep_the_chain(db_url: str) -> None:
    """Threads appending at once through two HubDB objects (as two hub processes would: separate locks,
    separate connections) leave one unbroken chain with every event in it."""
    dbs = [HubDB(db_url), HubDB(db_url)]
    dbs[0].setup()
    dbs[1].setup()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(15):
                db = dbs[(n + i) % 2]
                if i % 3 == 0:
                    db.append_audit([NewAuditEvent("t.batch", 200, f"u{n}", reason=str(i)) for _ in range(2)])
                else:
                    db.audit("t.one", status=200, user=f"u{n}", reason=str(i), datasets=[f"p{n}/d"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    result = dbs[0].verify_audit()
    assert result.ok and result.rows == 6 * (10 + 5 * 2), result
    ids = [e.id for e in dbs[1].events(limit=10_000)]
    assert ids == list(range(1, len(ids) + 1))
    for db in dbs:
        db.dispose()


# ---------------------------------------------------------------------------------------------------------
# Migration from schema version 1
# ---------------------------------------------------------------------------------------------------------

_V1_AUDIT = """CREATE TABLE dcr_hub_audit (
    id {id} PRIMARY KEY, at BIGINT NOT NULL, event VARCHAR(64) NOT NULL, "user" VARCHAR(255),
    status INTEGER NOT NULL, job_id VARCHAR(64), grant_id VARCHAR(64), reason TEXT NOT NULL,
    detail TEXT NOT NULL)"""


def test_a_version_1_database_is_migrated_in_place(db_url: str, run_cli: Callable[..., Any]) -> None:
    """A version-1 database (no chain): ``dcr audit verify`` refuses it and changes nothing; the hub's
    setup adds the columns, chains the existing rows in id order (their datasets from the detail), and
    later appends continue the chain; tampering with a migrated row is found."""
    serial = "SERIAL" if db_url.startswith("postgresql") else "INTEGER"
    raw = HubDB(db_url)
    with raw.engine.begin() as c:
        c.execute(
            text("CREATE TABLE dcr_hub_meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(255) NOT NULL)")
        )
        c.execute(text("INSERT INTO dcr_hub_meta VALUES ('schema_version', '1')"))
        c.execute(text(_V1_AUDIT.format(id=serial)))
        for i, (event, detail) in enumerate(
            [
                ("grant.issued", {"datasets": ["acme/insurance"], "remote": "1.2.3.4"}),
                ("grant.refused", {"datasets": ["globex/visits", "acme/x"]}),
                ("airlock.approved", {}),
            ]
        ):
            c.execute(
                text(
                    'INSERT INTO dcr_hub_audit (at, event, "user", status, job_id, grant_id, reason, detail) '
                    "VALUES (:at, :event, 'alice', 200, NULL, NULL, :reason, :detail)"
                ),
                {"at": 1000 + i, "event": event, "reason": f"r{i}", "detail": json.dumps(detail)},
            )
    raw.dispose()
    code, _out, err = _verify(db_url, run_cli)
    assert code == 2 and "schema version 1" in err and "start the hub once" in err, err
    db = HubDB(db_url)
    db.setup()
    events = db.events()
    assert [(e.id, e.event, e.reason) for e in events] == [
        (1, "grant.issued", "r0"),
        (2, "grant.refused", "r1"),
        (3, "airlock.approved", "r2"),
    ]
    assert [e.datasets for e in events] == [("acme/insurance",), ("acme/x", "globex/visits"), ()]
    assert events[0].prev_hash == GENESIS_HASH and events[1].prev_hash == events[0].hash
    assert db.verify_audit().ok
    with db.session() as s:
        version = s.execute(text("SELECT value FROM dcr_hub_meta WHERE key = 'schema_version'")).scalar()
    assert version == str(SCHEMA_VERSION)
    added = db.audit("grant.refused", status=403, user="bob", detail={"datasets": ["acme/insurance"]})
    assert added.id == 4 and added.prev_hash == events[-1].hash
    db.setup()  # again: nothing to migrate, the chain unchanged
    assert db.verify_audit().ok and db.audit_head()[0] == 4
    code, out, _err = _verify(db_url, run_cli)
    assert code == 0 and "4 rows verified" in out
    _sql(db_url, "UPDATE dcr_hub_audit SET \"user\" = 'mallory' WHERE id = 1")
    code, _out, err = _verify(db_url, run_cli)
    assert code == 1 and "BROKEN at row 1 (altered)" in err
    db.dispose()


# ---------------------------------------------------------------------------------------------------------
# dcr audit: export and bad input
# ---------------------------------------------------------------------------------------------------------


def test_export_csv_and_json(
    service: GrantService, db_url: str, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """JSON: the head and every event with every field and its hashes; CSV: a header row and one row per
    event; ``--provider`` keeps the events naming that provider's datasets; ``--output`` is owner-only."""
    _grants_and_refusals(service)
    events = service.db.events()
    code, out, err = run_cli("audit", "export", "--db-url", db_url, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["head"] == {"id": events[-1].id, "hash": events[-1].hash, "count": len(events)}
    assert [e["id"] for e in doc["events"]] == [e.id for e in events]
    first = doc["events"][0]
    assert set(first) >= {
        "id", "at", "time", "event", "user", "status", "job_id", "grant_id", "reason", "detail",
        "datasets", "prev_hash", "hash",
    }  # fmt: skip
    assert first["hash"] == events[0].hash and first["datasets"] == ["acme/insurance"]
    assert first["detail"]["remote"] == "127.0.0.1" or "remote" in first["detail"]

    target = tmp_path / "acme.csv"
    code, out, err = run_cli(
        "audit", "export", "--db-url", db_url, "--format", "csv", "--provider", "acme", "--output", target
    )
    assert code == 0, err
    assert f"3 audit events written to {target}" in out
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert rows[0] == [
        "id", "at", "time", "event", "user", "status", "job_id", "grant_id", "datasets", "reason",
        "detail", "prev_hash", "hash",
    ]  # fmt: skip
    assert [int(r[0]) for r in rows[1:]] == [events[i].id for i in (0, 2, 3)]
    assert rows[1][3] == "grant.issued" and rows[1][4] == "alice" and rows[1][8] == "acme/insurance"
    assert rows[3][9] == events[3].reason and rows[3][12] == events[3].hash
    code, out, _ = run_cli("audit", "export", "--db-url", db_url, "--format", "csv", "--provider", "nobody")
    assert code == 0 and out.strip().count("\n") == 0  # the header only


def test_bad_input_is_refused_and_nothing_changes(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """A missing database file is not created; a SQLite file that is not a DCR database is not changed; a
    configuration without ``db_url`` means the hub's default, relative to the configuration's directory."""
    missing = tmp_path / "nope.sqlite"
    code, _out, err = run_cli("audit", "verify", "--db-url", f"sqlite:///{missing}")
    assert code == 2 and "no DCR hub database at" in err
    assert not missing.exists()

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE things (x INTEGER)")
    before = other.read_bytes()
    for args in (["verify"], ["export", "--format", "csv"]):
        code, out, err = run_cli("audit", *args, "--db-url", f"sqlite:///{other}")
        assert code == 2 and "is not a DCR hub database" in err and out == ""
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]

    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    config = hub_dir / "jupyterhub_config.py"
    config.write_text("c = get_config()  # noqa\nimport dcr_spawner\ndcr_spawner.enable(c)\n")
    code, _out, err = run_cli("audit", "verify", "--config", config)
    assert code == 2 and f"no DCR hub database at {hub_dir / 'dcr-hub.sqlite'}" in err
    db = HubDB(f"sqlite:///{hub_dir / 'dcr-hub.sqlite'}")
    db.setup()
    db.audit("t", status=200)
    db.dispose()
    code, out, err = run_cli("audit", "verify", "--config", config)
    assert code == 0 and "1 rows verified" in out, err
    code, _out, err = run_cli("audit", "verify", "--config", tmp_path / "missing_config.py")
    assert code == 2 and "no hub configuration file" in err
    code, _out, err = run_cli("audit", "verify", "--db-url", "mysql://localhost/x")
    assert code == 2 and "mysql" in err


# ---------------------------------------------------------------------------------------------------------
# Platform events, without a platform: the ingestion's bookkeeping
# ---------------------------------------------------------------------------------------------------------


class ScriptedPlatform(EnclavePlatform):
    """A platform whose event journal is a list: pages of two, cursor = index."""

    def __init__(self, events: list[dict[str, Any]], **kw: Any) -> None:
        super().__init__(**kw)
        self.journal = events
        self.reads = 0

    def audit_events(self, cursor: str) -> tuple[list[dict[str, Any]], str, bool]:
        self.reads += 1
        start = int(cursor or 0)
        page = self.journal[start : start + 2]
        return page, str(start + len(page)), start + len(page) < len(self.journal)


def test_platform_events_are_recorded_once(service: GrantService) -> None:
    """Paged platform events become ``enclave.*`` rows once each, with the hub's grant id and datasets
    for a job it granted; reading again records nothing; concurrent ingestions record each event once."""
    out = service.issue("alice", set(), _body(["acme/insurance"]))
    job, grant = out["job_id"], out["grant_id"]
    t = time.time()
    journal = [
        {"event": "launch", "job_id": job, "grant_id": grant, "user": "alice", "time": t, "seq": 1,
         "datasets": ["acme/insurance"]},
        {"event": "key_released", "job_id": job, "grant_id": grant, "dataset": "acme/insurance",
         "version": BUNDLE, "time": t, "seq": 2},
        {"event": "key_refused", "job_id": job, "dataset": "acme/insurance", "reason_code": "condition",
         "time": t, "seq": 3},
        {"event": "end", "job_id": job, "grant_id": grant, "state": "failed", "reason_code": "cell_failed",
         "time": t, "seq": 4},
        {"event": "launch", "job_id": "job-" + "f" * 24, "grant_id": "grant-x", "datasets": ["globex/visits"],
         "time": t, "seq": 5},
    ]  # fmt: skip
    platform = ScriptedPlatform(journal)
    assert ingest_platform_events(service.db, platform) == 5
    assert ingest_platform_events(service.db, platform) == 0
    rows = [e for e in service.db.events() if e.event.startswith("enclave.")]
    assert [(e.event, e.job_id, e.grant_id, e.datasets, e.reason) for e in rows] == [
        ("enclave.launch", job, grant, ("acme/insurance",), ""),
        ("enclave.key_released", job, grant, ("acme/insurance",), ""),
        ("enclave.key_refused", job, grant, ("acme/insurance",), "condition"),
        ("enclave.end", job, grant, ("acme/insurance",), "cell_failed"),
        ("enclave.launch", "job-" + "f" * 24, "grant-x", ("globex/visits",), ""),
    ]
    assert rows[3].status == 500 and rows[3].detail["state"] == "failed"
    assert rows[4].detail["unknown_job"] is True
    assert service.db.platform_cursor() == "5"
    journal += [{"event": "end", "job_id": job, "state": "succeeded", "time": t, "seq": 6}] * 7
    threads = [threading.Thread(target=ingest_platform_events, args=(service.db, platform)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(service.db.events(event="enclave.end")) == 8
    assert service.db.verify_audit().ok


def test_the_host_journal_pages_and_survives_restarts(tmp_path: Path) -> None:
    """The enclave host's journal (owner-only JSON lines): structured fields only, a sequence over the
    whole file, a new run id at each start with the same journal id, a torn last line cut off; readers page
    with a cursor, a cursor of another journal reads from the start, a cursor past the end is refused."""
    from dcr_enclave.platform.journal import HostJournal

    path = tmp_path / "events.jsonl"
    j = HostJournal(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    j.append("launch", job_id="job-1", grant_id="g1", user="u", datasets=["acme/x"], owner_uid=0)
    j.append("cancel", job_id="job-1")  # not a journalled event
    j.append("key_refused", job_id="job-1", provider="acme", dataset="x", version="v", reason="free text",
             reason_code="condition")  # fmt: skip
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["event"] for d in docs] == ["launch", "key_refused"]
    assert "owner_uid" not in docs[0] and "reason" not in docs[1] and "version" not in docs[1]
    assert docs[1]["dataset"] == "acme/x" and docs[1]["reason_code"] == "condition"
    with path.open("ab") as f:
        f.write(b'{"torn": ')  # a host killed mid-write
    again = HostJournal(path)
    assert (again.journal_id, again.seq) == (j.journal_id, 2) and again.run_id != j.run_id
    for i in range(5):
        again.append("end", job_id=f"job-{i}", state="succeeded")
    first = again.read(None, limit=3)
    assert [e["seq"] for e in first["events"]] == [1, 2, 3] and first["more"] is True
    rest = again.read(first["cursor"])
    assert [e["seq"] for e in rest["events"]] == [4, 5, 6, 7] and rest["more"] is False
    assert {e["run"] for e in rest["events"]} == {again.run_id}
    assert again.read(rest["cursor"]) == {"events": [], "cursor": rest["cursor"], "more": False}
    assert len(again.read("otherjournal:3:120")["events"]) == 7
    with pytest.raises(Exception, match="past the end"):
        again.read(f"{again.journal_id}:99:99999")
    with pytest.raises(Exception, match="malformed"):
        again.read("nonsense")


# ---------------------------------------------------------------------------------------------------------
# The audit API and page of a real hub
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_hub(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    work = tmp_path_factory.mktemp("audit-hub")
    config = policy_config(
        _datasets(stores),
        quotas=GENEROUS,
        providers={
            "acme": {"name": "ACME", "reviewers": {"users": ["rita"]}},
            "globex": {"name": "Globex", "reviewers": {"groups": ["globex-reviewers"]}},
        },
    )
    hub = Hub(
        work / "hub",
        config=config,
        groups={"analysts": ["bob"], "globex-reviewers": ["gina"]},
        admin_users=["root-admin"],
    )
    with hub:
        yield hub


def test_the_audit_api_answers_admins_and_reviewers_only(audit_hub: Hub, run_cli: Callable[..., Any]) -> None:
    """Admins read every event, a provider's reviewer (by user or by group) only the events of that
    provider's datasets, a plain user and a request without login get 403; JSON carries the hashes and
    receipt links, CSV a header row; the page shows the chain's state and links to the downloads."""
    hub = audit_hub
    for user, datasets in [
        ("alice", ["acme/insurance"]),
        ("alice", ["globex/visits"]),
        ("carol", ["acme/insurance"]),
    ]:
        token = hub.new_token(user)
        r = hub.api("POST", "/dcr/grants", token=token, data=_body(datasets))
        assert r.status_code in (201, 403), r.text
    tokens = {u: hub.new_token(u) for u in ("root-admin", "rita", "gina", "bob")}

    def get(user: str | None, query: str = "") -> requests.Response:
        return hub.api("GET", f"/dcr/audit{query}", token=tokens[user] if user else "")

    r = get("root-admin")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["verification"]["ok"] is True and doc["providers"] is None
    all_events = doc["events"]
    assert [e["event"] for e in all_events] == ["grant.issued", "grant.issued", "grant.refused"]
    granted = all_events[0]
    assert granted["hash"] and granted["prev_hash"] == "0" * 64
    assert granted["receipt_url"] == f"/hub/dcr/receipts/{granted['job_id']}"
    assert doc["head"]["hash"] == all_events[-1]["hash"]

    rita = get("rita").json()["events"]
    assert [e["id"] for e in rita] == [all_events[0]["id"], all_events[2]["id"]]
    gina = get("gina").json()["events"]
    assert [e["id"] for e in gina] == [all_events[1]["id"]]
    assert get("gina", "?provider=acme").status_code == 403
    assert get("root-admin", "?provider=globex").json()["events"] == gina
    assert get("bob").status_code == 403
    assert get(None).status_code == 403
    assert get("root-admin", "?format=xml").status_code == 400

    r = get("rita", "?format=csv")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0][0] == "id" and rows[0][-1] == "receipt_url" and len(rows) == 3

    # The page: login cookie; a reviewer sees their events, the chain's state and the download links.
    session = hub.login("rita")
    page = session.get(f"{hub.url}/hub/dcr/audit", timeout=30)
    assert page.status_code == 200, page.text[:500]
    assert 'data-ok="true"' in page.text and "Chain verified: 3 rows" in page.text
    assert (
        "/hub/api/dcr/audit?format=csv" in page.text and f'data-id="{all_events[1]["id"]}"' not in page.text
    )
    assert f'data-id="{all_events[0]["id"]}"' in page.text
    assert session.get(f"{hub.url}/hub/api/dcr/audit?format=json", timeout=30).status_code == 200
    bob = hub.login("bob")
    assert bob.get(f"{hub.url}/hub/dcr/audit", timeout=30).status_code == 403
    anon = requests.get(f"{hub.url}/hub/dcr/audit", timeout=30, allow_redirects=False)
    assert anon.status_code == 302 and "/hub/login" in anon.headers["Location"]

    # The hub's own configuration leads `dcr audit verify` to its records; an altered row shows on the page.
    code, out, err = run_cli("audit", "verify", "--config", hub.config_file)
    assert code == 0 and "3 rows verified" in out, err
    with sqlite3.connect(hub.workdir / "dcr-hub.sqlite") as c:
        c.execute("UPDATE dcr_hub_audit SET reason = '' WHERE event = 'grant.refused'")
    page = session.get(f"{hub.url}/hub/dcr/audit", timeout=30)
    assert 'data-ok="false"' in page.text and f"at row {all_events[2]['id']}" in page.text
    assert get("root-admin").json()["verification"]["problem"] == "altered"
