"""The hub's grant service: grants, refusals, quotas and records, on SQLite and a real PostgreSQL, in the
service itself and in a real JupyterHub (real proxy, real single-user server, the server extension's
``HubGrantSource``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import stat
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
from hub_harness import (
    GENEROUS_QUOTAS as GENEROUS,
)
from hub_harness import (
    Hub,
    PostgresServer,
    Stores,
    dataset_entry,
    free_port,
    make_csv,
    make_stores,
    policy_config,
    register_dataset,
    write_fidelity_reports,
)
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dcr_enclave.formats import contract, sealing
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import DisclosureRules, Grant, verify_grant
from dcr_enclave.pack.store import Store
from dcr_server_ext.errors import Unavailable
from dcr_server_ext.grant_sources import GrantRefused, HubGrantSource
from dcr_spawner import DCRPolicy, GrantService
from dcr_spawner.grant_service import Refusal
from dcr_spawner.hubdb import GrantedJob, HubDB, JobEnd, Meta
from dcr_spawner.hubkey import load_or_create_hub_key
from dcr_spawner.platform import EnclavePlatform

#: The service clock starts now: grants issued at T0 verify against the real clock.
T0 = int(time.time())
BUNDLE = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    base = tmp_path_factory.mktemp("grant-stores")
    args = ("--protection", "dp", "--epsilon", "1.5", "--mechanism", "mst")
    return make_stores(base, *args, rows=300, seeds=(11, 12))


def _datasets(s: Stores) -> dict[str, Any]:
    return {
        "acme/insurance": dataset_entry(s.insurance, s.root, users=["alice"], groups=["analysts"]),
        "globex/visits": dataset_entry(s.visits, s.root, groups=["researchers"], release="auto"),
    }


def _key() -> tuple[bytes, str]:
    _, public = sealing.generate_keypair()
    return public, base64.urlsafe_b64encode(public).rstrip(b"=").decode()


def _body(datasets: list[str] | None = None, job_id: str | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "job_id": job_id or contract.new_job_id(),
        "bundle_digest": BUNDLE,
        "datasets": datasets or [],
        "output_public_key": _key()[1],
    }
    doc.update(extra)
    return doc


def _raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _verify(token: str, jwks: dict[str, Any], **kw: Any) -> Grant:
    return verify_grant(token, jwks["keys"], hub_key_thumbprint=jwks["thumbprint"], **kw)


# ---------------------------------------------------------------------------------------------------------
# The service on its own (SQLite and PostgreSQL), with a controlled clock
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Clocked:
    service: GrantService
    now: list[int]

    def issue(self, user: str, groups: set[str], doc: Any) -> dict[str, Any]:
        return self.service.issue(
            user, groups, _raw(doc) if not isinstance(doc, bytes) else doc, remote="127.0.0.1"
        )

    def refused(self, user: str, groups: set[str], doc: Any) -> Refusal:
        with pytest.raises(Refusal) as info:
            self.issue(user, groups, doc)
        return info.value


@pytest.fixture
def make_service(stores: Stores, tmp_path: Path, db_url: str) -> Iterator[Callable[..., Clocked]]:
    made: list[GrantService] = []

    def make(**traits: Any) -> Clocked:
        # Generous quotas unless a test sets its own: each test exercises one limit at a time.
        traits["quotas"] = {**GENEROUS, **traits.get("quotas", {})}
        policy = DCRPolicy(datasets=_datasets(stores), db_url=db_url, time_limit=600, **traits)
        service = GrantService.start(policy, {"analysts", "researchers"}, base_dir=tmp_path)
        now = [T0]
        service.clock = lambda: now[0]
        made.append(service)
        return Clocked(service, now)

    yield make
    for s in made:
        s.db.dispose()


def test_grant_binds_user_job_datasets_and_limits(make_service: Callable[..., Clocked]) -> None:
    """A grant names the caller, the job, the bundle, each dataset at its pinned version and release mode,
    the policy's limits and the job's output key; review datasets add the airlock key; the expiry is the
    time limit plus ten minutes; the job and an audit event are recorded."""
    c = make_service(output_limits={"max_files": 7, "allowed_suffixes": [".csv"]}, memory_limit="2G")
    public, b64 = _key()
    doc = {**_body(), "output_public_key": b64}
    out = c.issue("alice", {"researchers"}, doc)
    jwks = c.service.hub_key.jwks()
    g = _verify(out["grant"], jwks, job_id=doc["job_id"], bundle_digest=BUNDLE, now=T0)
    assert (g.user, g.job_id, g.grant_id) == ("alice", doc["job_id"], out["grant_id"])
    policy = c.service.policy
    assert {(d.key, d.version, d.release) for d in g.datasets} == {
        ("acme/insurance", policy.spec("acme/insurance").version, "review"),  # type: ignore[union-attr]
        ("globex/visits", policy.spec("globex/visits").version, "auto"),  # type: ignore[union-attr]
    }
    assert base64.urlsafe_b64decode(g.output_public_key + "=") == public
    assert (
        g.airlock_public_key == base64.urlsafe_b64encode(c.service.airlock_key.public).rstrip(b"=").decode()
    )
    assert (g.output_limits.max_files, g.output_limits.allowed_suffixes) == (7, (".csv",))
    assert (g.time_limit, g.memory_bytes) == (600, 2 * 2**30)
    assert (g.issued_at, g.expires_at) == (T0, T0 + 600 + 600)
    assert out["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(g.expires_at))
    assert out["hub_key_thumbprint"] == jwks["thumbprint"]

    job = c.service.db.job(doc["job_id"])
    assert job is not None and (job.grant_id, job.user, job.ends_at) == (out["grant_id"], "alice", T0 + 600)
    assert [d[0] for d in job.datasets] == ["acme/insurance", "globex/visits"]
    (event,) = c.service.db.events(user="alice")
    assert (event.event, event.status, event.grant_id) == ("grant.issued", 201, out["grant_id"])


def test_auto_only_grant_carries_the_airlock_key_and_disclosure_thresholds(
    make_service: Callable[..., Clocked],
) -> None:
    """A grant over ``auto`` datasets only carries the airlock key too (outputs with disclosure findings
    are held for review) and the policy's disclosure thresholds, the dataset's own over the global ones."""
    c = make_service(disclosure_checks={"min_cell_count": 7, "allow_extremes": True})
    out = c.issue("bob", {"researchers"}, _body(["globex/visits"]))
    g = _verify(out["grant"], c.service.hub_key.jwks(), now=T0)
    assert g.release_mode == "auto"
    assert (
        g.airlock_public_key == base64.urlsafe_b64encode(c.service.airlock_key.public).rstrip(b"=").decode()
    )
    assert g.disclosure == DisclosureRules(
        min_cell_count=7, dominance_min_contributors=3, allow_extremes=True
    )
    assert g.claims()["disclosure"] == {
        "min_cell_count": 7,
        "dominance_min_contributors": 3,
        "allow_extremes": True,
    }


def test_grant_ids_are_unique(make_service: Callable[..., Clocked]) -> None:
    """Every grant has its own id, even for the same user, bundle and datasets."""
    c = make_service()
    ids = {c.issue("alice", set(), _body())["grant_id"] for _ in range(5)}
    assert len(ids) == 5 and all(contract.GRANT_ID_RE.match(i) for i in ids)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (_raw([1, 2]), "JSON object"),
        (_raw(_body(user="alice")), "unknown field(s) ['user']"),
        (_raw(_body(job_id="job-1")), '"job_id"'),
        (_raw({**_body(), "bundle_digest": "md5:00"}), '"bundle_digest"'),
        (_raw({**_body(), "datasets": "acme/insurance"}), '"datasets"'),
        (_raw({**_body(), "output_public_key": "AAAA"}), "32-byte X25519"),
        (_raw({**_body(), "output_public_key": "!!not base64!!"}), "32-byte X25519"),
        (b"x" * 70_000, "larger than"),
    ],
)
def test_malformed_requests_are_refused_and_recorded(
    make_service: Callable[..., Clocked], body: bytes, message: str
) -> None:
    """A malformed grant request is refused with 400 and a message saying what is wrong, and recorded."""
    c = make_service()
    r = c.refused("carol", set(), body)
    assert r.status == 400 and message in r.message
    (event,) = c.service.db.events(user="carol")
    assert (event.event, event.status, event.reason) == ("grant.refused", 400, r.message)


ADMIN = "ask the hub's administrator for access"


def test_entitlement_refusals_do_not_reveal_datasets(make_service: Callable[..., Clocked]) -> None:
    """Without entitlement the answer is 403 naming the datasets asked for and whom to ask; a dataset that
    does not exist and one that exists but is not entitled get the same answer; each refusal is recorded
    with the datasets asked for."""
    c = make_service()
    assert c.refused("carol", set(), _body()).message == (
        "you are not entitled to any dataset: ask the hub's administrator for access to the datasets you need"
    )
    # A user entitled to nothing who names datasets is told which ones, like anyone else.
    assert c.refused("carol", set(), _body(["acme/insurance"])).message == (
        f"you are not entitled to acme/insurance: {ADMIN}"
    )
    other = c.refused("bob", {"analysts"}, _body(["globex/visits"]))
    missing = c.refused("bob", {"analysts"}, _body(["acme/none"]))
    assert (other.status, missing.status) == (403, 403)
    assert other.message == f"you are not entitled to globex/visits: {ADMIN}"
    assert missing.message == f"you are not entitled to acme/none: {ADMIN}"
    # An entitled dataset asked for beside one that is not: the whole request is refused, naming only the
    # one outside the entitlement, in whatever order they come.
    for wanted in (["acme/insurance", "globex/visits"], ["globex/visits", "acme/insurance"]):
        mixed = c.refused("bob", {"analysts"}, _body(wanted))
        assert (mixed.status, mixed.message) == (403, f"you are not entitled to globex/visits: {ADMIN}")
    events = c.service.db.events(user="bob")
    assert [e.detail["datasets"] for e in events] == [
        ["globex/visits"],
        ["acme/none"],
        ["acme/insurance", "globex/visits"],
        ["globex/visits", "acme/insurance"],
    ]
    assert c.service.db.job_exists("job-" + "0" * 24) is False


def test_refusals_name_the_declared_provider(make_service: Callable[..., Clocked]) -> None:
    """With c.DCRPolicy.providers giving display names, a refusal names the provider of each dataset asked
    for, whether or not that dataset exists (the same answer for both); a provider declared without a
    display name and an unknown provider add nothing."""
    c = make_service(providers={"acme": {"name": "ACME Insurance"}, "globex": {}})
    secret = c.refused("carol", set(), _body(["acme/insurance"]))
    none = c.refused("carol", set(), _body(["acme/no-such"]))
    assert (
        secret.message == f"you are not entitled to acme/insurance: {ADMIN} (data provider: ACME Insurance)"
    )
    assert none.message == secret.message.replace("acme/insurance", "acme/no-such")
    assert c.refused("carol", set(), _body(["globex/visits"])).message == (
        f"you are not entitled to globex/visits: {ADMIN}"
    )
    mixed = c.refused("carol", set(), _body(["acme/insurance", "initech/tps"]))
    assert mixed.message == (
        f"you are not entitled to acme/insurance, initech/tps: {ADMIN} "
        "(data providers: ACME Insurance for acme/insurance)"
    )


def test_dry_run_answers_as_the_real_request_and_records_nothing(
    make_service: Callable[..., Clocked],
) -> None:
    """A dry run (``"dry_run": true``, no job id or key needed) answers 200 with what would be granted, or
    raises the very refusal the real request gets (entitlement, quotas); it records no job and no audit
    entry and does not count toward the request rate, which it still enforces."""
    c = make_service(quotas={"concurrent_jobs_per_user": 1, "grant_requests_per_minute": 3})
    dry = {"bundle_digest": BUNDLE, "datasets": ["globex/visits"], "dry_run": True}
    out = c.issue("bob", {"researchers"}, dry)
    assert out["dry_run"] is True and out["user"] == "bob"
    version = c.service.policy.spec("globex/visits").version  # type: ignore[union-attr]
    assert out["datasets"] == [
        {"provider": "globex", "dataset": "visits", "version": version, "release": "auto"}
    ]
    assert out["hub_key_thumbprint"] == c.service.hub_key.thumbprint and "grant" not in out
    for user, groups, datasets in (("carol", set(), ["acme/insurance"]), ("carol", set(), [])):
        as_dry = c.refused(user, groups, {**dry, "datasets": datasets})
        real = c.refused(user, groups, _body(datasets))
        assert as_dry.status == real.status == 403 and as_dry.message == real.message
    assert [e.event for e in c.service.db.events()] == ["grant.refused", "grant.refused"]  # the real ones
    assert c.service.db.usage("bob", [], c.now[0]).jobs_last_day == 0

    granted = _body(["globex/visits"])
    c.issue("bob", {"researchers"}, granted)
    over_dry = c.refused("bob", {"researchers"}, dry)
    over = c.refused("bob", {"researchers"}, _body(["globex/visits"]))
    assert (over_dry.status, over_dry.message) == (over.status, over.message) and over.status == 429
    # bob has made 2 real requests this minute (the limit is 3): dry runs do not count, so none tips him
    # over, and once a real request does, the dry run gets the same 429 with Retry-After.
    assert c.refused("bob", {"researchers"}, dry).status == 429 and "at once" in over_dry.message
    c.refused("bob", {"researchers"}, _body(["globex/visits"]))
    rate = c.refused("bob", {"researchers"}, dry)
    assert (rate.status, rate.headers) == (429, {"Retry-After": "60"})
    assert len(c.service.db.events(user="bob")) == 3
    assert c.service.db.usage("bob", [], c.now[0]).jobs_last_day == 1
    # A job id a dry run names must still be free; a malformed dry run is answered, not recorded.
    taken = c.refused("dave", {"researchers"}, {**dry, "job_id": granted["job_id"]})
    assert (taken.status, taken.message) == (409, f"job {granted['job_id']} already has a grant")
    assert c.refused("dave", set(), {**dry, "bundle_digest": "md5:0"}).status == 400
    assert c.service.db.events(user="dave") == []


def test_job_ids_are_granted_once(make_service: Callable[..., Clocked]) -> None:
    """A job id already granted is refused (409), also to another user: no one takes over a job."""
    c = make_service()
    doc = _body()
    c.issue("alice", set(), doc)
    assert c.refused("alice", set(), doc).status == 409
    r = c.refused("bob", {"analysts"}, {**_body(), "job_id": doc["job_id"]})
    assert r.status == 409 and "already has a grant" in r.message


def test_version_retired_while_the_hub_runs_gets_no_new_grant(tmp_path: Path) -> None:
    """A provider retiring the pinned version while the hub runs stops new grants for it at once (403,
    recorded), without a hub restart; grants already issued are untouched."""
    root = tmp_path / "retire-store"
    real = make_csv(tmp_path / "src" / "real" / "t.csv", 50, seed=3)
    synthetic = make_csv(tmp_path / "src" / "synthetic" / "t.csv", 50, seed=4)
    version = register_dataset(root, "initech", "tps", [(real, synthetic)])
    policy = DCRPolicy(
        datasets={"initech/tps": dataset_entry(version, root, users=["alice"], release="auto")},
        db_url=f"sqlite:///{tmp_path / 'hub.sqlite'}",
        time_limit=600,
        quotas=GENEROUS,
    )
    service = GrantService.start(policy, set(), base_dir=tmp_path)
    try:
        first = service.issue("alice", set(), _raw(_body()), remote="127.0.0.1")
        Store(root).retire("initech", "tps", version.version)
        with pytest.raises(Refusal) as info:
            service.issue("alice", set(), _raw(_body()), remote="127.0.0.1")
        assert info.value.status == 403 and "retired" in info.value.message
        assert first["grant"]
        assert any(e.reason and "retired" in e.reason for e in service.db.events())
    finally:
        service.db.dispose()


def test_quotas(make_service: Callable[..., Clocked]) -> None:
    """Concurrent jobs (until their time limit passes), jobs per user per day and jobs per dataset per
    day are enforced with 429, each refusal recorded."""
    c = make_service(
        quotas={"concurrent_jobs_per_user": 2, "jobs_per_day_per_user": 3, "jobs_per_day_per_dataset": 4}
    )
    ins = ["acme/insurance"]
    c.issue("alice", set(), _body(ins))
    c.issue("alice", set(), _body(ins))
    r = c.refused("alice", set(), _body(ins))
    assert r.status == 429 and "at once" in r.message
    c.now[0] = T0 + 601  # the first two jobs' time limit has passed
    c.issue("alice", set(), _body(ins))
    r = c.refused("alice", set(), _body(ins))
    assert r.status == 429 and "last 24 hours" in r.message and "you have had 3" in r.message
    c.now[0] = T0 + 86_400 + 1  # the first two fell out of the 24-hour window
    c.issue("alice", set(), _body(ins))

    # Per dataset, over all users: 4 grants on globex/visits, then the fifth is refused whoever asks.
    for user in ("bob", "bob", "carol", "carol"):
        c.issue(user, {"researchers"}, _body(["globex/visits"]))
    r = c.refused("dave", {"researchers"}, _body(["globex/visits"]))
    assert r.status == 429 and "globex/visits has had 4" in r.message
    refused = c.service.db.events(event="grant.refused")
    assert [(e.user, e.status) for e in refused] == [("alice", 429), ("alice", 429), ("dave", 429)]


class EndedPlatform(EnclavePlatform):
    """A platform that reports the grants a test names as ended (and remembers what the hub asked)."""

    ended_grants: ClassVar[set[str]] = set()
    asked: ClassVar[list[list[str]]] = []

    def ended(self, grant_ids: Sequence[str]) -> set[str]:
        EndedPlatform.asked.append(sorted(grant_ids))
        return set(grant_ids) & self.ended_grants


def test_a_job_that_ended_stops_counting_at_once(make_service: Callable[..., Clocked]) -> None:
    """The hub asks the platform (swapped through c.DCRPolicy.platform_class) which of the user's running
    jobs have ended: an ended job frees its concurrent-jobs slot at once, a job not yet ended (or one the
    platform cannot tell about) keeps counting until its time limit; each end is recorded once."""
    EndedPlatform.ended_grants, EndedPlatform.asked = set(), []
    c = make_service(quotas={"concurrent_jobs_per_user": 1}, platform_class=EndedPlatform)
    ins = ["acme/insurance"]
    first = c.issue("alice", set(), _body(ins))["grant_id"]
    assert c.refused("alice", set(), _body(ins)).status == 429  # the first still runs
    assert EndedPlatform.asked[-1] == [first]
    EndedPlatform.ended_grants = {first}  # e.g. it failed in its first cell
    second = c.issue("alice", set(), _body(ins))["grant_id"]
    assert EndedPlatform.asked[-1] == [first]
    r = c.refused("alice", set(), _body(ins))
    assert r.status == 429 and "running" in r.message
    assert EndedPlatform.asked[-1] == [second]  # an ended job is never asked about again
    assert c.service.db.unended_grants("alice", c.now[0]) == [second]


def test_request_rate_limit(make_service: Callable[..., Clocked]) -> None:
    """Every request of a user counts toward the per-minute limit, refused ones included; past it the
    answer is 429 with Retry-After, and a minute later requests are served again."""
    c = make_service(quotas={"grant_requests_per_minute": 3})
    for _ in range(3):
        assert c.refused("alice", set(), b"junk").status == 400
    r = c.refused("alice", set(), _body())
    assert r.status == 429 and r.headers == {"Retry-After": "60"}
    assert c.refused("bob", {"analysts"}, b"junk").status == 400  # other users are not affected
    c.now[0] = T0 + 61
    assert c.issue("alice", set(), _body())["grant_id"]


def test_records_database_checks(db_url: str, tmp_path: Path) -> None:
    """The records database is created on first use, keeps its data across reopening, counts a job as
    running until its time limit ends, refuses a job id twice, and refuses a database written by a newer
    DCR."""
    db = HubDB(db_url)
    db.setup()
    job = GrantedJob(
        "grant-" + "1" * 32,
        "job-" + "1" * 24,
        "alice",
        BUNDLE,
        "k",
        T0,
        T0 + 60,
        T0 + 660,
        (("a/b", BUNDLE, "auto"),),
    )
    db.record_grant(job)
    with pytest.raises(DCRError, match="already has a grant"):
        db.record_grant(job)
    db.dispose()
    again = HubDB(db_url)
    again.setup()
    assert again.job(job.job_id) == job
    usage = again.usage("alice", ["a/b", "c/d"], T0 + 1)
    assert (usage.running_jobs, usage.jobs_last_day, usage.dataset_jobs_last_day) == (
        1,
        1,
        {"a/b": 1, "c/d": 0},
    )
    assert again.usage("alice", [], T0 + 61).running_jobs == 0  # its time limit has ended
    with again.session() as s:
        s.execute(update(Meta).where(Meta.key == "schema_version").values(value="99"))
    with pytest.raises(DCRError, match="schema version 99"):
        again.setup()
    again.dispose()


def test_job_ends_are_noted_once_also_by_two_writers(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ends given as any iterable are all noted; noting them again changes nothing; and when another
    writer (a second hub process) notes one of the same ends between this one's read and its write, both
    succeed and the end is noted once, with the first writer's time."""
    db, other = HubDB(db_url), HubDB(db_url)
    db.setup()
    grants = [f"grant-{n}" + "0" * 31 for n in range(3)]
    for n, g in enumerate(grants):
        db.record_grant(GrantedJob(g, f"job-{n}" + "0" * 23, "alice", BUNDLE, "k", T0, T0 + 60, T0 + 660, ()))
    assert sorted(db.unended_grants("alice", T0)) == grants
    db.record_ends((g for g in grants[:2]), T0 + 1)  # a generator is read once
    db.record_ends(grants[:1], T0 + 5)
    assert db.unended_grants("alice", T0) == [grants[2]]

    add_all = Session.add_all
    raced: list[bool] = []

    def add_after_the_other_writer(session: Session, rows: Any) -> None:
        if not raced:
            raced.append(True)
            other.record_ends([grants[2]], T0 + 7)  # commits between this writer's read and its write
        add_all(session, rows)

    monkeypatch.setattr(Session, "add_all", add_after_the_other_writer)
    db.record_ends([grants[2]], T0 + 9)
    assert raced and db.unended_grants("alice", T0) == []
    with db.session() as s:
        assert s.scalar(select(JobEnd.ended_at).where(JobEnd.grant_id == grants[2])) == T0 + 7
    other.dispose()
    db.dispose()


def test_a_records_file_is_owner_only(tmp_path: Path) -> None:
    """The SQLite file of the hub's records is created 0600 whatever the umask (it holds every job's
    record), and one left readable by an earlier version loses other accounts' access when opened."""
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.sqlite"
        db = HubDB(f"sqlite:///{fresh}")
        db.setup()
        db.dispose()
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
        earlier = tmp_path / "earlier.sqlite"
        earlier.touch(mode=0o644)
        HubDB(f"sqlite:///{earlier}").dispose()
        assert stat.S_IMODE(earlier.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_records_database_url_is_checked(tmp_path: Path) -> None:
    """Only SQLite files and PostgreSQL are accepted for the hub's records (an in-memory database would lose
    them), and the refusal names the trait."""
    with pytest.raises(DCRError, match=r"c\.DCRPolicy\.db_url"):
        HubDB("mysql://localhost/dcr")
    with pytest.raises(DCRError, match=r"c\.DCRPolicy\.db_url"):
        HubDB("not a url")
    with pytest.raises(DCRError, match="in-memory"):
        HubDB("sqlite://")


# ---------------------------------------------------------------------------------------------------------
# A real JupyterHub (SQLite records), a real single-user server
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RealHub:
    hub: Hub
    stores: Stores
    #: The file acme/insurance's ``fidelity_report`` names (a copy of the researchers' HTML report).
    report: Path
    #: Both reports as dcr_provider wrote them: ``{"<audience>.<html|json>": path}``.
    reports: dict[str, Path]

    @property
    def db(self) -> HubDB:
        return HubDB(f"sqlite:///{self.hub.workdir / 'dcr-hub.sqlite'}")

    def jwks(self) -> dict[str, Any]:
        r = self.hub.api("GET", "/dcr/jwks", token="")
        assert r.status_code == 200
        return dict(r.json())

    def grant(self, token: str, doc: Any, **kw: Any) -> requests.Response:
        data = doc if isinstance(doc, bytes) else _raw(doc)
        return self.hub.api("POST", "/dcr/grants", token=token, data=data, **kw)


@pytest.fixture(scope="module")
def real_hub(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealHub]:
    work = tmp_path_factory.mktemp("grant-hub")
    # The single-user servers load the DCR server extension with the hub's grant source; the enclave
    # backend points at no enclave host, so a granted job stays "granted".
    server_config = work / "server-config"
    server_config.mkdir()
    (server_config / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "ServerApp": {"jpserver_extensions": {"dcr_server_ext": True}},
                "DCRExtension": {"grant_source_class": "dcr_server_ext.grant_sources.HubGrantSource"},
                "LocalBackend": {"socket_path": str(work / "no-enclave-host.sock")},
            }
        )
    )
    reports = write_fidelity_reports(work / "reports")
    report = work / "served" / reports["researchers.html"].name
    report.parent.mkdir()
    shutil.copy(reports["researchers.html"], report)
    datasets = _datasets(stores)
    datasets["acme/insurance"] = {**datasets["acme/insurance"], "fidelity_report": str(report)}
    config = policy_config(
        datasets,
        time_limit=900,
        quotas={
            "concurrent_jobs_per_user": 50,
            "jobs_per_day_per_user": 500,
            "jobs_per_day_per_dataset": 5000,
            "grant_requests_per_minute": 500,
        },
    ) + textwrap.dedent(
        f"""
        c.Spawner.environment = {{"JUPYTER_CONFIG_DIR": {str(server_config)!r}}}
        """
    )
    hub = Hub(work / "hub", config=config, groups={"analysts": ["bob"], "researchers": ["alice"]})
    with hub:
        yield RealHub(hub, stores, report, reports)


def test_real_hub_grants_entitled_datasets(real_hub: RealHub) -> None:
    """Through the real hub and proxy, a user's token gets a grant for every entitled dataset, which
    verifies against the JWKS the hub publishes (whose thumbprint is the hub key file's, a 0600 file the
    hub generated); the job and the grant event are in the hub's records."""
    hub = real_hub.hub
    key_file = hub.workdir / "dcr-hub-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    jwks = real_hub.jwks()
    assert jwks["thumbprint"] == load_or_create_hub_key(key_file).thumbprint

    doc = _body()
    r = real_hub.grant(hub.new_token("alice"), doc)
    assert r.status_code == 201, r.text
    out = r.json()
    g = _verify(out["grant"], jwks, job_id=doc["job_id"], bundle_digest=BUNDLE)
    assert g.user == "alice" and g.grant_id == out["grant_id"]
    s = real_hub.stores
    assert [(d.key, d.version, d.release) for d in g.datasets] == [
        ("acme/insurance", s.insurance.version, "review"),
        ("globex/visits", s.visits.version, "auto"),
    ]
    assert g.expires_at == g.issued_at + 900 + 600 and g.airlock_public_key
    db = real_hub.db
    job = db.job(doc["job_id"])
    assert job is not None and (job.user, job.grant_id) == ("alice", out["grant_id"])
    assert any(e.grant_id == out["grant_id"] and e.event == "grant.issued" for e in db.events(user="alice"))
    db.dispose()


def _refusal_cases() -> list[tuple[str, Callable[[RealHub], tuple[requests.Response, str | None]], int, str]]:
    def no_token(h: RealHub) -> tuple[requests.Response, str | None]:
        return h.grant("", _body()), None

    def bad_token(h: RealHub) -> tuple[requests.Response, str | None]:
        return h.grant("0" * 32, _body()), None

    def not_entitled(h: RealHub) -> tuple[requests.Response, str | None]:
        return h.grant(h.hub.new_token("carol"), _body(["acme/insurance"])), "carol"

    def outside_entitlement(h: RealHub) -> tuple[requests.Response, str | None]:
        return h.grant(h.hub.new_token("bob"), _body(["globex/visits"])), "bob"

    def service_token(h: RealHub) -> tuple[requests.Response, str | None]:
        return h.grant(h.hub.admin_token, _body()), None

    def narrowed_token(h: RealHub) -> tuple[requests.Response, str | None]:
        return h.grant(h.hub.new_token("alice", scopes=["read:users:name!user"]), _body()), "alice"

    def another_users_job(h: RealHub) -> tuple[requests.Response, str | None]:
        doc = _body(["acme/insurance"])
        assert h.grant(h.hub.new_token("alice"), doc).status_code == 201
        return h.grant(h.hub.new_token("bob"), {**_body(), "job_id": doc["job_id"]}), "bob"

    def another_user_named(h: RealHub) -> tuple[requests.Response, str | None]:
        return h.grant(h.hub.new_token("carol"), _body(user="alice")), "carol"

    def browser_cookie(h: RealHub) -> tuple[requests.Response, str | None]:
        session = h.hub.login("alice")
        r = session.post(
            f"{h.hub.api_url}/dcr/grants",
            data=_raw(_body()),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        return r, "alice"

    return [
        ("no token", no_token, 401, "no valid hub API token"),
        ("invalid token", bad_token, 401, "no valid hub API token"),
        ("not entitled", not_entitled, 403, f"not entitled to acme/insurance: {ADMIN}"),
        ("outside the entitlement", outside_entitlement, 403, "not entitled to globex/visits"),
        ("service token", service_token, 403, "a service token cannot"),
        ("token without users:activity", narrowed_token, 403, "lacks users:activity"),
        ("another user's job", another_users_job, 409, "already has a grant"),
        ("another user named in the body", another_user_named, 400, "unknown field(s) ['user']"),
        ("browser cookie", browser_cookie, 401, "must carry a hub API token"),
    ]


@pytest.mark.parametrize(
    ("case", "call", "status", "message"), _refusal_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_real_hub_refusals_are_json_and_recorded(
    real_hub: RealHub, case: str, call: Callable[[RealHub], Any], status: int, message: str
) -> None:
    """Each refused grant request gets its 4xx status and a JSON ``{"error": ...}`` saying why, and the
    refusal is in the hub's audit log with the user the token belongs to (none without a valid token)."""
    db = real_hub.db
    before = {e.id for e in db.events(event="grant.refused", limit=100_000)}
    r, user = call(real_hub)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert message in r.json()["error"]
    new = [e for e in db.events(event="grant.refused", limit=100_000) if e.id not in before]
    assert [(e.status, e.user) for e in new] == [(status, user)]
    assert message in new[0].reason
    db.dispose()


def test_real_hub_group_removal_takes_dataset_from_next_grant(real_hub: RealHub) -> None:
    """A user in an entitled group gets the dataset; once removed from the group through the hub's REST
    API, the next grant request for it is refused and it is gone from their datasets."""
    hub = real_hub.hub
    hub.add_to_group("analysts", ["erin"])
    token = hub.new_token("erin")
    r = real_hub.grant(token, _body(["acme/insurance"]))
    assert r.status_code == 201, r.text
    listed = hub.api("GET", "/dcr/datasets", token=token).json()["datasets"]
    assert [(d["provider"], d["dataset"]) for d in listed] == [("acme", "insurance")]

    hub.remove_from_group("analysts", ["erin"])
    r = real_hub.grant(token, _body(["acme/insurance"]))
    assert r.status_code == 403 and "not entitled" in r.json()["error"]
    assert hub.api("GET", "/dcr/datasets", token=token).json()["datasets"] == []


def test_real_hub_lists_datasets_and_publishes_jwks(real_hub: RealHub) -> None:
    """``/hub/api/dcr/datasets`` lists the caller's entitled datasets with version, release mode,
    protection and ε and their /data paths; the JWKS is public and holds only public key material."""
    hub = real_hub.hub
    doc = hub.api("GET", "/dcr/datasets", token=hub.new_token("alice")).json()
    by_ref = {f"{d['provider']}/{d['dataset']}": d for d in doc["datasets"]}
    assert set(by_ref) == {"acme/insurance", "globex/visits"}
    visits = by_ref["globex/visits"]
    assert (visits["protection"], visits["epsilon"], visits["mechanism"], visits["release"]) == (
        "dp",
        1.5,
        "mst",
        "auto",
    )
    assert visits["version"] == real_hub.stores.visits.version
    assert visits["files"][0]["path"] == "/data/globex/visits/visits.csv"
    assert hub.api("GET", "/dcr/datasets", token=hub.new_token("carol")).json()["datasets"] == []
    assert hub.api("GET", "/dcr/datasets", token="").status_code == 401

    jwks = real_hub.jwks()
    assert all("d" not in k for k in jwks["keys"]) and jwks["keys"][0]["kid"] == jwks["thumbprint"]


REPORT_LINK = "/hub/api/dcr/datasets/acme/insurance/fidelity-report"
#: What a browser sends when the user follows a link.
NAVIGATION = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "document"}


def test_real_hub_serves_the_fidelity_report_to_entitled_users(real_hub: RealHub) -> None:
    """A dataset whose policy names a researcher-facing fidelity report is listed with a link to the hub;
    an entitled user's browser (the hub's login cookie) following it gets the report's bytes as an inert
    page (a sandboxing Content-Security-Policy, nosniff, not cached); a user who is not entitled, a dataset
    without a report and a request without credentials get nothing of it."""
    hub = real_hub.hub
    listed = hub.api("GET", "/dcr/datasets", token=hub.new_token("alice")).json()["datasets"]
    links = {f"{d['provider']}/{d['dataset']}": d["fidelity_report"] for d in listed}
    assert links == {"acme/insurance": REPORT_LINK, "globex/visits": None}

    browser = hub.login("alice")
    r = browser.get(hub.url + REPORT_LINK, headers=NAVIGATION, timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == real_hub.report.read_bytes()
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp.split(";")[-1] and "script-src" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Cache-Control"] == "no-store"
    assert b"Audience: researchers." in r.content

    # bob is entitled through his group and may use a token; carol is entitled to nothing.
    r = hub.api("GET", "/dcr/datasets/acme/insurance/fidelity-report", token=hub.new_token("bob"))
    assert r.status_code == 200 and r.content == real_hub.report.read_bytes()
    for token, path in [
        (hub.new_token("carol"), "/dcr/datasets/acme/insurance/fidelity-report"),
        (hub.new_token("alice"), "/dcr/datasets/globex/visits/fidelity-report"),
        (hub.new_token("alice"), "/dcr/datasets/acme/secret/fidelity-report"),
    ]:
        r = hub.api("GET", path, token=token)
        assert r.status_code == 404 and "no fidelity report" in r.json()["error"], r.text
        assert b"Audience" not in r.content
    r = requests.get(hub.url + REPORT_LINK, headers=NAVIGATION, timeout=30, allow_redirects=False)
    assert r.status_code == 401 and b"Audience" not in r.content


def test_real_hub_stops_serving_a_report_that_became_provider_only(real_hub: RealHub) -> None:
    """If the named report file is replaced after the hub started by the provider-only report (computed
    from the real rows), the hub refuses to serve it (503, the reason in the hub's log) instead of showing
    it to researchers; once the researchers' report is back it is served again."""
    hub = real_hub.hub
    token = hub.new_token("alice")
    original = real_hub.report.read_bytes()
    shutil.copy(real_hub.reports["provider-only.html"], real_hub.report)
    try:
        r = hub.api("GET", "/dcr/datasets/acme/insurance/fidelity-report", token=token)
        assert r.status_code == 503 and "not available" in r.json()["error"]
        assert b"provider-only" not in r.content and b"Audience" not in r.content
        assert "is the provider-only fidelity report" in hub.log()
    finally:
        real_hub.report.write_bytes(original)
    r = hub.api("GET", "/dcr/datasets/acme/insurance/fidelity-report", token=token)
    assert r.status_code == 200 and r.content == original


@pytest.fixture(scope="module")
def alice_server(real_hub: RealHub) -> dict[str, str]:
    real_hub.hub.spawn("alice")
    return real_hub.hub.server_env("alice")


def test_server_token_gets_grant(real_hub: RealHub, alice_server: dict[str, str]) -> None:
    """The hub API token of alice's running single-user server (what a real server sends) gets a grant for
    alice at the server's JUPYTERHUB_API_URL, both from outside and from a kernel in that server."""
    token, api_url = alice_server["JUPYTERHUB_API_TOKEN"], alice_server["JUPYTERHUB_API_URL"]
    me = requests.get(f"{api_url}/user", headers={"Authorization": f"token {token}"}, timeout=30).json()
    assert me["name"] == "alice" and "access:servers!server=alice/" in me["scopes"]
    r = requests.post(
        f"{api_url}/dcr/grants", headers={"Authorization": f"token {token}"}, data=_raw(_body()), timeout=30
    )
    assert r.status_code == 201, r.text
    assert _verify(r.json()["grant"], real_hub.jwks()).user == "alice"

    code = textwrap.dedent(
        f"""
        import json, os, urllib.request
        req = urllib.request.Request(
            os.environ["JUPYTERHUB_API_URL"] + "/dcr/grants",
            data=json.dumps({json.dumps(_body(["globex/visits"]))}).encode(),
            headers={{"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]}},
            method="POST",
        )
        with urllib.request.urlopen(req) as resp:
            print(resp.status, json.loads(resp.read())["grant"])
        """
    )
    user_token = real_hub.hub.new_token("alice")
    result = real_hub.hub.run_code("alice", code, token=user_token)
    assert result.error is None, result
    status, grant = result.stdout.split()
    assert status == "201"
    g = _verify(grant, real_hub.jwks())
    assert g.user == "alice" and [d.key for d in g.datasets] == ["globex/visits"]


def test_server_extension_gets_grants_from_the_hub(real_hub: RealHub, alice_server: dict[str, str]) -> None:
    """Alice's real server, with the DCR server extension using ``HubGrantSource``, submits a job through
    its own REST API and gets the hub's grant (the job is "granted", with the hub's versions and release
    modes, and recorded by the hub, bound to the server's bundle); a refusal by the hub reaches the caller with the hub's status and
    message."""
    hub = real_hub.hub
    token = hub.new_token("alice")
    hub.put_notebook(
        "alice",
        "analysis.ipynb",
        ["import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')"],
        token=token,
    )

    r = hub.server_api(
        "alice",
        "POST",
        "dcr/api/jobs",
        token=token,
        json_body={"path": "analysis.ipynb", "datasets": ["acme/insurance"]},
    )
    assert r.status_code == 201, r.text
    job = r.json()
    # Granted; the server then tries the enclave backend (none here), so the job may be "launching".
    assert job["state"] in ("granted", "launching")
    assert job["datasets"] == [
        {
            "provider": "acme",
            "dataset": "insurance",
            "version": real_hub.stores.insurance.version,
            "release": "review",
        }
    ]
    db = real_hub.db
    record = db.job(job["id"])
    assert record is not None and record.user == "alice" and record.bundle_digest == job["bundle"]["digest"]

    r = hub.server_api(
        "alice",
        "POST",
        "dcr/api/jobs",
        token=token,
        json_body={"path": "analysis.ipynb", "datasets": ["acme/secret"]},
    )
    assert r.status_code == 403 and "not entitled to acme/secret" in r.json()["error"]
    assert db.events(user="alice", event="grant.refused")[-1].detail["datasets"] == ["acme/secret"]
    db.dispose()


def test_server_dry_run_asks_the_hub_and_records_nothing(
    real_hub: RealHub, alice_server: dict[str, str]
) -> None:
    """Alice's real server's dry run (``POST /dcr/api/jobs?dry_run=1``) asks the hub the grant's policy
    questions: for a dataset she is not entitled to it answers the status and message the real submission
    gets, for an entitled one 200 with the hub's versions and release modes; the hub's records (jobs and
    audit log) are unchanged by either dry run."""
    hub = real_hub.hub
    token = hub.new_token("alice")
    r = hub.server_api("alice", "PUT", "api/contents/dry", token=token, json_body={"type": "directory"})
    assert r.status_code in (200, 201), r.text
    hub.put_notebook(
        "alice",
        "dry/dry.ipynb",
        ["import pandas as pd\npd.read_csv('/data/globex/visits/visits.csv')"],
        token=token,
    )

    def records() -> tuple[int, int]:
        db = real_hub.db
        try:
            return len(db.events(limit=100_000)), db.usage("alice", [], int(time.time())).jobs_last_day
        finally:
            db.dispose()

    def submit(datasets: list[str] | None, dry_run: bool) -> requests.Response:
        body: dict[str, Any] = {"path": "dry/dry.ipynb"}
        if datasets is not None:
            body["datasets"] = datasets
        path = "dcr/api/jobs" + ("?dry_run=1" if dry_run else "")
        return hub.server_api("alice", "POST", path, token=token, json_body=body)

    before = records()
    dry = submit(["acme/secret"], dry_run=True)
    assert records() == before
    real = submit(["acme/secret"], dry_run=False)
    assert (dry.status_code, dry.json()) == (real.status_code, real.json())
    assert real.status_code == 403
    assert real.json()["error"] == f"you are not entitled to acme/secret: {ADMIN}"

    before = records()
    ok = submit(None, dry_run=True)  # the dataset the notebook mentions
    assert ok.status_code == 200, ok.text
    assert ok.json()["datasets"] == ["globex/visits"]
    assert ok.json()["grant"] == {
        "datasets": [
            {
                "provider": "globex",
                "dataset": "visits",
                "version": real_hub.stores.visits.version,
                "release": "auto",
            }
        ]
    }
    assert records() == before


def test_server_extension_lists_the_fidelity_report_link(
    real_hub: RealHub, alice_server: dict[str, str]
) -> None:
    """Alice's real server, with ``HubGrantSource``, lists her datasets for the JupyterLab datasets view
    with the hub's fidelity report link unchanged (a same-origin path through the proxy, which her browser
    can open with its hub login), and none for a dataset without a report."""
    hub = real_hub.hub
    r = hub.server_api("alice", "GET", "dcr/api/datasets", token=hub.new_token("alice"))
    assert r.status_code == 200, r.text
    links = {f"{d['provider']}/{d['dataset']}": d["fidelity_report"] for d in r.json()["datasets"]}
    assert links == {"acme/insurance": REPORT_LINK, "globex/visits": None}
    browser = hub.login("alice")
    report = browser.get(hub.url + links["acme/insurance"], headers=NAVIGATION, timeout=30)
    assert report.status_code == 200 and report.content == real_hub.report.read_bytes()


def test_hub_grant_source_maps_answers(real_hub: RealHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HubGrantSource`` returns the hub's grant for the server's user, turns the hub's refusals into
    ``GrantRefused`` with the hub's status (a rejected token as 403), and an unreachable hub into
    ``Unavailable``."""
    hub = real_hub.hub
    monkeypatch.setenv("JUPYTERHUB_API_URL", f"http://127.0.0.1:{hub.hub_port}/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.new_token("bob"))
    public, _ = _key()
    source = HubGrantSource()

    def request(job_id: str, datasets: list[tuple[str, str]]) -> str:
        return asyncio.run(
            source.request(job_id=job_id, bundle_digest=BUNDLE, datasets=datasets, output_public_key=public)
        )

    job_id = contract.new_job_id()
    g = _verify(request(job_id, [("acme", "insurance")]), real_hub.jwks(), job_id=job_id)
    assert g.user == "bob" and [d.key for d in g.datasets] == ["acme/insurance"]

    with pytest.raises(GrantRefused) as refused:
        request(contract.new_job_id(), [("globex", "visits")])
    assert refused.value.status == 403 and "not entitled to globex/visits" in str(refused.value)
    with pytest.raises(GrantRefused) as conflict:
        request(job_id, [])
    assert conflict.value.status == 409

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "0" * 32)
    with pytest.raises(GrantRefused) as bad_token:
        request(contract.new_job_id(), [])
    # The hub's 401 is about this server's own token: said so, with what to do, not passed on as a 401.
    assert bad_token.value.status == 403
    assert "did not accept this server's own API token" in str(bad_token.value)
    assert "restart your server" in str(bad_token.value)

    monkeypatch.setenv("JUPYTERHUB_API_URL", f"http://127.0.0.1:{free_port()}/hub/api")
    with pytest.raises(Unavailable):
        request(contract.new_job_id(), [])


# ---------------------------------------------------------------------------------------------------------
# A real JupyterHub keeping its records in a real PostgreSQL server
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_hub_records_in_postgresql(stores: Stores, pg: PostgresServer, tmp_path: Path) -> None:
    """With ``c.DCRPolicy.db_url`` pointing at PostgreSQL, a real hub records its grants and refusals
    there and enforces its per-day quota and its request rate from those records: the over-quota answer
    is a JSON 429 saying which limit, the over-rate one also carries ``Retry-After``."""
    url = pg.create_database("dcr_hub_" + uuid.uuid4().hex[:8])
    quotas = {"concurrent_jobs_per_user": 5, "jobs_per_day_per_user": 2, "grant_requests_per_minute": 4}
    config = policy_config(_datasets(stores), db_url=url, quotas=quotas)
    with Hub(tmp_path / "hub", config=config, groups={"analysts": ["bob"], "researchers": ["alice"]}) as hub:
        token = hub.new_token("alice")
        jobs = [_body() for _ in range(3)]
        answers = [hub.api("POST", "/dcr/grants", token=token, data=_raw(j)) for j in jobs]
        assert [r.status_code for r in answers] == [201, 201, 429]
        over = answers[-1]
        assert over.headers["Content-Type"].startswith("application/json")
        assert over.json() == {"error": "you have had 2 job(s) in the last 24 hours, the most allowed"}
        assert "Retry-After" not in over.headers

        # bob's requests count toward his own rate, refused ones included: the fifth in a minute is refused.
        bob = hub.new_token("bob")
        codes = [hub.api("POST", "/dcr/grants", token=bob, data=b"junk").status_code for _ in range(4)]
        assert codes == [400, 400, 400, 400]
        rate = hub.api("POST", "/dcr/grants", token=bob, data=_raw(_body()))
        assert rate.status_code == 429 and rate.headers["Retry-After"] == "60"
        assert rate.json() == {"error": "too many grant requests: at most 4 a minute"}
        assert not (hub.workdir / "dcr-hub.sqlite").exists()
    db = HubDB(url)
    assert [db.job(j["job_id"]) is not None for j in jobs] == [True, True, False]
    assert [(e.event, e.status) for e in db.events(user="alice")] == [
        ("grant.issued", 201),
        ("grant.issued", 201),
        ("grant.refused", 429),
    ]
    db.dispose()
