"""The hub's airlock on its own: receiving held results (and refusing forged ones), reviewing them under
the two-person rule, and releasing them re-sealed to the job's key; on SQLite and a real PostgreSQL.

Held results are made as the enclave makes them: a receipt over the real grant the service issued, attested
by a test signer the airlock pins, outputs and reveal sealed to the airlock's key. The real enclave's
held results reach a real hub in ``test_airlock_hub.py``.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hub_harness import Stores, dataset_entry, make_stores, write_fidelity_reports
from receipt_factory import IMAGE_DIGEST, Signer, held_result_tar, make_signer

from dcr_enclave.formats import contract, sealing
from dcr_enclave.formats.digests import canonical_json, sha256_bytes
from dcr_enclave.formats.unsealing import open_dir, open_file
from dcr_enclave.verify.receipt import open_commitment
from dcr_enclave.verify.trust import TrustAnchors
from dcr_spawner import DCRPolicy, GrantService
from dcr_spawner.airlock import Airlock, AirlockRefusal

BUNDLE = "sha256:" + "cd" * 32
OUTPUTS = {
    "analysis.ipynb": json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode(),
    "results/by_region.csv": b"region,count\nnorth,120\nsouth,98\n",
    "results/figure.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 32,
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    base = tmp_path_factory.mktemp("airlock-stores")
    return make_stores(
        base, "--protection", "dp", "--epsilon", "1.5", "--mechanism", "mst", rows=200, seeds=(3, 4)
    )


@dataclass
class Setup:
    service: GrantService
    airlock: Airlock
    signer: Signer
    tmp: Path

    def grant(self, user: str = "alice", datasets: list[str] | None = None) -> tuple[dict[str, Any], bytes]:
        """A real grant for a new job of ``user``, and the job's private key."""
        private, public = sealing.generate_keypair()
        doc = {
            "job_id": contract.new_job_id(),
            "bundle_digest": BUNDLE,
            "datasets": datasets or ["acme/insurance"],
            "output_public_key": base64.urlsafe_b64encode(public).rstrip(b"=").decode(),
        }
        return self.service.issue(user, {"analysts"}, json.dumps(doc).encode()), private

    def held_result(
        self, granted: dict[str, Any], outputs: dict[str, bytes] | None = None, **kw: Any
    ) -> bytes:
        return held_result_tar(
            self.tmp,
            granted,
            self.signer,
            hub_thumbprint=self.service.hub_key.thumbprint,
            airlock_public=self.airlock.key.public,
            outputs=OUTPUTS if outputs is None else outputs,
            **kw,
        )


def tar_of(d: Path, names: list[str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(d.iterdir()):
            if names is None or p.name in names:
                tf.add(p, arcname=p.name)
    return buf.getvalue()


@pytest.fixture
def make_setup(stores: Stores, tmp_path: Path, db_url: str) -> Iterator[Callable[..., Setup]]:
    made: list[GrantService] = []

    def make(**traits: Any) -> Setup:
        datasets = {
            "acme/insurance": dataset_entry(
                stores.insurance, stores.root, users=["alice"], groups=["analysts"]
            ),
            "globex/visits": dataset_entry(stores.visits, stores.root, groups=["analysts"]),
        }
        providers = {
            "acme": {"name": "ACME Insurance", "reviewers": {"users": ["rita", "rolf", "alice"]}},
            "globex": {"name": "Globex", "reviewers": {"users": ["gina", "rita"]}},
        }
        policy = DCRPolicy(
            datasets=datasets,
            providers=providers,
            db_url=db_url,
            time_limit=600,
            quotas={"grant_requests_per_minute": 1000, "concurrent_jobs_per_user": 100},
            **traits,
        )
        service = GrantService.start(policy, {"analysts"}, base_dir=tmp_path)
        made.append(service)
        signer = make_signer()
        trust = TrustAnchors(keys=(signer.public_jwk,))
        airlock = Airlock(
            policy,
            service.db,
            service.hub_key,
            service.airlock_key,
            tmp_path / "airlock",
            trust,
            [IMAGE_DIGEST],
        )
        return Setup(service, airlock, signer, tmp_path)

    yield make
    for s in made:
        s.db.dispose()


def refused(fn: Callable[..., Any], *args: Any, **kw: Any) -> AirlockRefusal:
    with pytest.raises(AirlockRefusal) as info:
        fn(*args, **kw)
    return info.value


def test_a_held_result_is_received_reviewed_and_released_to_the_job_key(
    make_setup: Callable[..., Setup], tmp_path: Path
) -> None:
    s = make_setup()
    granted, job_key = s.grant()
    job_id = granted["job_id"]
    held = s.airlock.receive("alice", job_id, s.held_result(granted))
    assert held.status == "waiting" and held.providers == ("acme",)
    status = s.airlock.status_for_owner("alice", job_id)
    # The researcher learns who decides and how far they are; nothing of the outputs.
    assert status["status"] == "waiting" and status["reviewers"] == ["ACME Insurance"]
    assert status["required_approvals"] == 1 and status["approvals"] == 0
    assert not any(name in json.dumps(status) for name in OUTPUTS)
    assert refused(s.airlock.released_files, "alice", job_id).status == 409
    # The reviewer sees every output, in memory only.
    opened = s.airlock.open_for_review(held)
    assert opened.files == OUTPUTS
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "airlock").rglob("*") if p.is_file())
    assert b"north,120" not in on_disk
    new = s.airlock.decide("rita", set(), job_id, "approve", "fine")
    assert new.status == "released"
    released = s.airlock.released_files("alice", job_id)
    with tarfile.open(fileobj=io.BytesIO(released)) as tf:
        names = sorted(tf.getnames())
        tf.extractall(tmp_path / "released", filter="data")
    assert names == sorted([contract.SEALED_OUTPUTS_FILE, contract.SEALED_REVEAL_FILE])
    # Only the job's key opens them, and they are what the receipt committed to.
    open_dir(tmp_path / "released" / contract.SEALED_OUTPUTS_FILE, tmp_path / "opened", job_key, job_id)
    open_file(
        tmp_path / "released" / contract.SEALED_REVEAL_FILE, tmp_path / "reveal.json", job_key, job_id=job_id
    )
    manifest = json.loads(s.airlock.receipt_files(job_id)[contract.RECEIPT_FILE])
    entries = open_commitment(
        (tmp_path / "reveal.json").read_bytes(), manifest["release"]["outputs_commitment"]
    )
    for e in entries:
        assert sha256_bytes((tmp_path / "opened" / e.path).read_bytes()) == e.sha256
    events = [e.event for e in s.service.db.events() if e.job_id == job_id]
    assert events == ["grant.issued", "airlock.received", "airlock.approved", "airlock.released"]


def test_outputs_sealed_to_the_airlock_but_not_attested_are_refused(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    granted, _ = s.grant()
    job_id = granted["job_id"]
    # Anyone holding the airlock's public key can seal: other bytes under a real, attested receipt.
    forged = dict(OUTPUTS, **{"results/by_region.csv": b"region,count\nnorth,1\n"})
    r = refused(s.airlock.receive, "alice", job_id, s.held_result(granted, sealed_outputs=forged))
    assert r.status == 409 and "not the ones the receipt attests" in r.message
    assert s.airlock.held(job_id) is None
    # A receipt the pinned signer did not attest.
    other = Setup(s.service, s.airlock, make_signer(), s.tmp)
    r = refused(s.airlock.receive, "alice", job_id, other.held_result(granted))
    assert r.status == 409 and "does not verify" in r.message
    # Sealed to another key than the airlock's.
    _, stranger = sealing.generate_keypair()
    r = refused(s.airlock.receive, "alice", job_id, s.held_result(granted, seal_to=stranger))
    assert r.status == 409 and "airlock key" in r.message
    # A released (not held) receipt is not the airlock's business.
    r = refused(s.airlock.receive, "alice", job_id, s.held_result(granted, decision="released"))
    assert r.status in (400, 409)
    # Another job's genuine result under this job id.
    other_granted, _ = s.grant()
    r = refused(s.airlock.receive, "alice", job_id, s.held_result(other_granted))
    assert r.status == 409
    assert s.airlock.held(job_id) is None
    refusals = [e for e in s.service.db.events(event="airlock.refused") if e.job_id == job_id]
    assert len(refusals) >= 4
    # The genuine result is still accepted afterwards.
    assert s.airlock.receive("alice", job_id, s.held_result(granted)).status == "waiting"


def test_malformed_deliveries_and_other_users_jobs(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    granted, _ = s.grant()
    job_id = granted["job_id"]
    assert refused(s.airlock.receive, "bob", job_id, s.held_result(granted)).status == 404
    assert refused(s.airlock.receive, "alice", "job-" + "0" * 24, b"").status == 404
    assert refused(s.airlock.receive, "alice", "../etc", b"").status == 404
    assert refused(s.airlock.receive, "alice", job_id, b"not a tar").status == 400
    body = s.held_result(granted)
    with tarfile.open(fileobj=io.BytesIO(body)) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}  # type: ignore[union-attr]
    short = io.BytesIO()
    with tarfile.open(fileobj=short, mode="w") as tf:
        for name, data in members.items():
            if name != contract.SEALED_REVEAL_FILE:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    r = refused(s.airlock.receive, "alice", job_id, short.getvalue())
    assert r.status == 400 and contract.SEALED_REVEAL_FILE in r.message
    assert refused(s.airlock.status_for_owner, "alice", job_id).status == 404
    s.airlock.receive("alice", job_id, body)
    # The same result again answers as before; another one is refused.
    assert s.airlock.receive("alice", job_id, body).status == "waiting"
    assert refused(s.airlock.receive, "alice", job_id, s.held_result(granted)).status == 409
    assert refused(s.airlock.status_for_owner, "bob", job_id).status == 404


def test_two_person_rule_never_the_author_and_rejections(make_setup: Callable[..., Setup]) -> None:
    s = make_setup(review_approvals=2)
    granted, _ = s.grant()
    job_id = granted["job_id"]
    s.airlock.receive("alice", job_id, s.held_result(granted))
    # alice is one of acme's reviewers, but this is her own job.
    assert refused(s.airlock.decide, "alice", set(), job_id, "approve", "").status == 403
    # Not a reviewer of this provider: the job does not exist for them.
    assert refused(s.airlock.decide, "gina", set(), job_id, "approve", "").status == 404
    assert s.airlock.decide("rita", set(), job_id, "approve", "").status == "waiting"
    assert refused(s.airlock.decide, "rita", set(), job_id, "approve", "").status == 409
    assert s.airlock.status_for_owner("alice", job_id)["approvals"] == 1
    assert refused(s.airlock.released_files, "alice", job_id).status == 409
    assert s.airlock.decide("rolf", set(), job_id, "approve", "ok").status == "released"
    # A rejection needs a reason, ends the job, and nothing is ever released.
    granted2, _ = s.grant()
    job2 = granted2["job_id"]
    s.airlock.receive("alice", job2, s.held_result(granted2))
    assert refused(s.airlock.decide, "rita", set(), job2, "reject", "  ").status == 400
    assert refused(s.airlock.decide, "rita", set(), job2, "maybe", "x").status == 400
    assert s.airlock.decide("rita", set(), job2, "approve", "").status == "waiting"
    assert s.airlock.decide("rolf", set(), job2, "reject", "cell counts too small").status == "rejected"
    status = s.airlock.status_for_owner("alice", job2)
    assert status["status"] == "rejected" and status["comment"] == "cell counts too small"
    assert refused(s.airlock.released_files, "alice", job2).status == 409
    assert refused(s.airlock.decide, "gina", set(), job2, "approve", "").status == 404
    assert not (s.airlock.root / job2 / "released-outputs.sealed").exists()


def test_each_provider_of_a_job_must_approve(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    granted, _ = s.grant(datasets=["acme/insurance", "globex/visits"])
    job_id = granted["job_id"]
    held = s.airlock.receive("alice", job_id, s.held_result(granted))
    assert held.providers == ("acme", "globex")
    assert s.airlock.status_for_owner("alice", job_id)["reviewers"] == ["ACME Insurance", "Globex"]
    assert s.airlock.decide("rolf", set(), job_id, "approve", "").status == "waiting"  # acme only
    assert s.airlock.decide("gina", set(), job_id, "approve", "").status == "released"
    # rita reviews for both: one approval of hers counts for each.
    granted2, _ = s.grant(datasets=["acme/insurance", "globex/visits"])
    s.airlock.receive("alice", granted2["job_id"], s.held_result(granted2))
    assert s.airlock.decide("rita", set(), granted2["job_id"], "approve", "").status == "released"


def test_admins_review_only_when_configured(make_setup: Callable[..., Setup]) -> None:
    s = make_setup()
    granted, _ = s.grant()
    job_id = granted["job_id"]
    s.airlock.receive("alice", job_id, s.held_result(granted))
    assert refused(s.airlock.decide, "root", set(), job_id, "approve", "", admin=True).status == 404
    s.airlock.policy.admins_review = True
    assert s.airlock.decide("root", set(), job_id, "approve", "", admin=True).status == "released"


def test_review_approvals_is_checked() -> None:
    with pytest.raises(Exception, match="between 1 and 5"):
        DCRPolicy(review_approvals=0)
    with pytest.raises(Exception, match="between 1 and 5"):
        DCRPolicy(review_approvals=6)


def test_a_failed_runs_sealed_traceback_waits_for_the_reviewers(
    make_setup: Callable[..., Setup], tmp_path: Path
) -> None:
    """No receipt attests a failure's detail, so the airlock keeps what opens with its key for this job and
    lets reviewers release it (re-sealed to the job's key) or withhold it."""
    s = make_setup()
    granted, job_key = s.grant()
    job_id = granted["job_id"]
    detail = {
        "cell": 2,
        "ename": "ValueError",
        "evalue": "age 97 of patient Quixote",
        "traceback": ["line 1"],
    }
    sealed = tmp_path / "failure.sealed"
    sealing.seal_bytes(canonical_json(detail), sealed, s.airlock.key.public, job_id=job_id)
    # Sealed for another job id, or to another key: refused.
    other = tmp_path / "other.sealed"
    sealing.seal_bytes(canonical_json(detail), other, s.airlock.key.public, job_id=contract.new_job_id())
    assert refused(s.airlock.receive_failure, "alice", job_id, other.read_bytes()).status == 409
    assert refused(s.airlock.receive_failure, "bob", job_id, sealed.read_bytes()).status == 404
    held = s.airlock.receive_failure("alice", job_id, sealed.read_bytes())
    assert held.kind == "failure" and held.status == "waiting"
    status = s.airlock.status_for_owner("alice", job_id)
    # (A word, not a number: the job id and times are made of digits.)
    assert "Quixote" not in json.dumps(status) and "ValueError" not in json.dumps(status)
    assert status["kind"] == "failure"
    assert s.airlock.open_for_review(held).failure == detail
    assert s.airlock.decide("rita", set(), job_id, "approve", "a plain bug").status == "released"
    with tarfile.open(fileobj=io.BytesIO(s.airlock.released_files("alice", job_id))) as tf:
        assert tf.getnames() == ["failure-detail.sealed"]
        tf.extractall(tmp_path / "released", filter="data")
    open_file(tmp_path / "released" / "failure-detail.sealed", tmp_path / "d.json", job_key, job_id=job_id)
    assert json.loads((tmp_path / "d.json").read_bytes()) == detail


def test_the_hub_says_whose_held_outputs_nobody_can_release(
    stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider without reviewers (and no admins reviewing): its review datasets' outputs are always held
    and its auto ones' when the disclosure checks flag them, and nobody could release either."""
    datasets = {
        "acme/insurance": dataset_entry(stores.insurance, stores.root, users=["alice"]),
        "globex/visits": dataset_entry(stores.visits, stores.root, users=["alice"], release="auto"),
    }
    providers = {"acme": {"name": "ACME", "reviewers": {"users": ["rita"]}}, "globex": {"name": "Globex"}}
    policy = DCRPolicy(datasets=datasets, providers=providers)
    with caplog.at_level("WARNING"):
        policy.validate_against_hub(set())
    lines = [r.getMessage() for r in caplog.records if "names no reviewers" in r.getMessage()]
    assert len(lines) == 1 and "globex/visits" in lines[0] and "disclosure checks flag them" in lines[0]
    caplog.clear()
    implicit = DCRPolicy(datasets=datasets)
    with caplog.at_level("WARNING"):
        implicit.validate_against_hub(set())
    lines = [r.getMessage() for r in caplog.records if "names no reviewers" in r.getMessage()]
    assert any("always held: acme/insurance" in line for line in lines) and len(lines) == 2
    caplog.clear()
    with caplog.at_level("WARNING"):
        DCRPolicy(datasets=datasets, admins_review=True).validate_against_hub(set())
    assert "names no reviewers" not in caplog.text


def test_reviewers_read_their_providers_fidelity_reports(stores: Stores, tmp_path: Path) -> None:
    """The provider's page links each dataset's researcher-facing fidelity report: its reviewers may read
    it as entitled researchers do; nobody else may."""
    reports = write_fidelity_reports(tmp_path / "reports")
    entry = dataset_entry(stores.insurance, stores.root, users=["alice"])
    datasets = {"acme/insurance": {**entry, "fidelity_report": str(reports["researchers.html"])}}
    policy = DCRPolicy(
        datasets=datasets,
        providers={"acme": {"name": "ACME", "reviewers": {"users": ["rita"], "groups": ["acme-review"]}}},
        db_url=f"sqlite:///{tmp_path / 'hub.sqlite'}",
    )
    service = GrantService.start(policy, {"acme-review"}, base_dir=tmp_path)
    try:
        assert service.entitled_report("alice", set(), "acme/insurance")
        assert service.entitled_report("rita", set(), "acme/insurance")
        assert service.entitled_report("rolf", {"acme-review"}, "acme/insurance")
        assert not service.entitled_report("bob", set(), "acme/insurance")
    finally:
        service.db.dispose()
