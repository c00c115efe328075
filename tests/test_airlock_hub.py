"""The airlock in a real JupyterHub (real proxy, the hub's login and templates): a researcher's token hands
a held result over and follows its review, reviewers decide on the review page under the two-person rule,
XSRF and scopes hold, and the released result reaches its owner only.

Held results are made as the enclave makes them (``receipt_factory.held_result_tar``), attested by a test
signer the hub pins as its platform's trust anchor; the real enclave's held results go through the demo
in ``test_browser.py``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from hub_harness import Hub, Stores, dataset_entry, make_stores, policy_config
from receipt_factory import IMAGE_DIGEST, Signer, held_result_tar, make_signer

from dcr_enclave.formats import contract, sealing
from dcr_enclave.formats.unsealing import open_dir

BUNDLE = "sha256:" + "ef" * 32
OUTPUTS = {
    "analysis.ipynb": json.dumps(
        {
            "cells": [
                {
                    "cell_type": "code",
                    "source": "print(len(df))",
                    "metadata": {},
                    "execution_count": 1,
                    "outputs": [{"output_type": "stream", "name": "stdout", "text": "2000\n"}],
                }
            ],
            "metadata": {},
            "nbformat": 4,
            "nbformat_minor": 5,
        }
    ).encode(),
    "results/by_test.csv": b"test,count\nhba1c,512\nldl<script>,488\n",
}


@dataclass
class AirlockHub:
    hub: Hub
    signer: Signer
    tmp: Path

    def grant(self, user: str) -> tuple[dict[str, Any], bytes]:
        private, public = sealing.generate_keypair()
        body = {
            "job_id": contract.new_job_id(),
            "bundle_digest": BUNDLE,
            "datasets": ["acme/insurance"],
            "output_public_key": base64.urlsafe_b64encode(public).rstrip(b"=").decode(),
        }
        r = self.hub.api("POST", "/dcr/grants", token=self.hub.new_token(user), json_body=body)
        assert r.status_code == 201, r.text
        return r.json(), private

    def airlock_public(self) -> bytes:
        raw = (self.hub.workdir / "dcr-airlock.key").read_bytes()
        return sealing.public_key(raw)

    def held(self, granted: dict[str, Any], **kw: Any) -> bytes:
        jwks = self.hub.api("GET", "/dcr/jwks").json()
        return held_result_tar(
            self.tmp,
            granted,
            self.signer,
            hub_thumbprint=jwks["thumbprint"],
            airlock_public=self.airlock_public(),
            outputs=OUTPUTS,
            **kw,
        )

    def deliver(self, user: str, job_id: str, body: bytes) -> requests.Response:
        return self.hub.api(
            "POST",
            f"/dcr/airlock/jobs/{job_id}",
            token=self.hub.new_token(user),
            data=body,
            headers={"Content-Type": "application/x-tar"},
        )

    def page(self, session: requests.Session, path: str) -> requests.Response:
        return session.get(f"{self.hub.url}/hub/dcr/{path}", timeout=60, allow_redirects=False)

    def decide(
        self, session: requests.Session, job_id: str, decision: str, comment: str = "", *, xsrf: bool = True
    ) -> requests.Response:
        page = self.page(session, f"review/{job_id}")
        form: dict[str, str] = {"decision": decision, "comment": comment}
        found = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        if xsrf:
            assert found, page.text[:2000]
            form["_xsrf"] = found.group(1)
        # The harness's sessions send the XSRF token as a header too: without it, only the form has it.
        return session.post(
            f"{self.hub.url}/hub/dcr/review/{job_id}",
            data=form,
            headers={"X-XSRFToken": None},  # type: ignore[dict-item]
            timeout=60,
            allow_redirects=False,
        )


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    base = tmp_path_factory.mktemp("airlock-hub-stores")
    return make_stores(
        base, "--protection", "dp", "--epsilon", "1.5", "--mechanism", "mst", rows=200, seeds=(5, 6)
    )


@pytest.fixture(scope="module")
def airlock_hub(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirlockHub]:
    work = tmp_path_factory.mktemp("airlock-hub")
    signer = make_signer()
    # Anchors must be readable by every server's account: the hub refuses others.
    work.chmod(0o755)
    jwks = signer.write_jwks(work / "signer-jwks.json")
    jwks.chmod(0o644)
    datasets = {"acme/insurance": dataset_entry(stores.insurance, stores.root, groups=["analysts"])}
    config = policy_config(
        datasets,
        providers={"acme": {"name": "ACME Insurance", "reviewers": {"users": ["rita", "rolf", "alice"]}}},
        review_approvals=2,
        quotas={"grant_requests_per_minute": 500, "concurrent_jobs_per_user": 50},
    ) + (
        f"c.LocalEnclaveHost.trust_jwks = [{str(jwks)!r}]\n"
        f"c.LocalEnclaveHost.enclave_digests = [{IMAGE_DIGEST!r}]\n"
    )
    hub = Hub(work / "hub", config=config, groups={"analysts": ["alice", "bob"]})
    with hub:
        for u in ("rita", "rolf"):
            hub.create_user(u)
        yield AirlockHub(hub, signer, work)


def test_delivery_review_two_person_rule_and_release(airlock_hub: AirlockHub, tmp_path: Path) -> None:
    h = airlock_hub
    granted, job_key = h.grant("alice")
    job_id = granted["job_id"]
    # A forged result (other bytes sealed to the airlock under the real receipt) is refused.
    forged = dict(OUTPUTS, **{"results/by_test.csv": b"test,count\nhba1c,3\n"})
    r = h.deliver("alice", job_id, h.held(granted, sealed_outputs=forged))
    assert r.status_code == 409 and "attests" in r.json()["error"]
    # Another user cannot deliver (or learn of) alice's job.
    assert h.deliver("bob", job_id, h.held(granted)).status_code == 404
    r = h.deliver("alice", job_id, h.held(granted))
    assert r.status_code == 201, r.text
    status = r.json()
    assert status["status"] == "waiting" and status["reviewers"] == ["ACME Insurance"]
    assert status["required_approvals"] == 2
    alice_token = h.hub.new_token("alice")
    r = h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}", token=alice_token)
    assert r.status_code == 200 and not any(name.split("/")[-1] in r.text for name in OUTPUTS)
    assert h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}/release", token=alice_token).status_code == 409
    assert h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}", token=h.hub.new_token("bob")).status_code == 404

    rita, rolf, alice, bob = (h.hub.login(u) for u in ("rita", "rolf", "alice", "bob"))
    queue = h.page(rita, "review")
    assert queue.status_code == 200 and job_id in queue.text and "1 job(s) waiting" in queue.text
    page = h.page(rita, f"review/{job_id}")
    assert page.status_code == 200
    # The outputs are shown escaped: the notebook's output and the table, never its markup.
    assert "2000" in page.text and "hba1c" in page.text and "ldl&lt;script&gt;" in page.text
    assert "<script>," not in page.text
    f = h.page(rita, f"review/{job_id}/files/results/by_test.csv")
    assert f.status_code == 200 and f.content == OUTPUTS["results/by_test.csv"]
    assert (
        "sandbox" in f.headers["Content-Security-Policy"] and "attachment" in f.headers["Content-Disposition"]
    )
    # Not a reviewer: nothing, not even whether the job exists.
    assert h.page(bob, f"review/{job_id}").status_code == 404
    assert h.page(bob, f"review/{job_id}/files/results/by_test.csv").status_code == 404
    assert job_id not in h.page(bob, "review").text
    # A decision without the XSRF token is refused and changes nothing.
    assert h.decide(rita, job_id, "approve", xsrf=False).status_code == 403
    forged = rita.post(
        f"{h.hub.url}/hub/dcr/review/{job_id}",
        data={"decision": "approve", "_xsrf": "forged"},
        headers={"X-XSRFToken": None},  # type: ignore[dict-item]
        timeout=60,
        allow_redirects=False,
    )
    assert forged.status_code == 403
    assert h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}", token=alice_token).json()["approvals"] == 0
    # The author is a reviewer of acme, but not of her own job.
    assert "your own job" in h.page(alice, f"review/{job_id}").text
    own = alice.post(
        f"{h.hub.url}/hub/dcr/review/{job_id}",
        data={"decision": "approve", "comment": "", "_xsrf": _xsrf(h.page(alice, "review"))},
        timeout=60,
        allow_redirects=False,
    )
    assert own.status_code == 403 and "your own job" in own.text
    assert h.decide(rita, job_id, "approve", "looks aggregate").status_code == 302
    assert h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}", token=alice_token).json()["approvals"] == 1
    assert h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}/release", token=alice_token).status_code == 409
    # The same reviewer twice does not make two.
    again = rita.post(
        f"{h.hub.url}/hub/dcr/review/{job_id}",
        data={"decision": "approve", "comment": "", "_xsrf": _xsrf(h.page(rita, "review"))},
        timeout=60,
        allow_redirects=False,
    )
    assert again.status_code == 409
    assert h.decide(rolf, job_id, "approve").status_code == 302
    status = h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}", token=alice_token).json()
    assert status["status"] == "released" and status["approvals"] == 2
    # Only the owner gets the released result, sealed to the job's own key.
    assert (
        h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}/release", token=h.hub.new_token("bob")).status_code
        == 404
    )
    r = h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}/release", token=alice_token)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
        tf.extractall(tmp_path / "released", filter="data")
    open_dir(tmp_path / "released" / contract.SEALED_OUTPUTS_FILE, tmp_path / "out", job_key, job_id)
    assert (tmp_path / "out" / "results" / "by_test.csv").read_bytes() == OUTPUTS["results/by_test.csv"]
    # The receipt page, for the owner and the reviewers.
    assert h.page(alice, f"receipts/{job_id}").status_code == 200
    assert h.page(bob, f"receipts/{job_id}").status_code == 404


def test_rejection_and_the_provider_page(airlock_hub: AirlockHub) -> None:
    h = airlock_hub
    granted, _ = h.grant("bob")
    job_id = granted["job_id"]
    assert h.deliver("bob", job_id, h.held(granted)).status_code == 201
    rita = h.hub.login("rita")
    # A rejection must say why.
    assert h.decide(rita, job_id, "reject", "").status_code == 400
    assert h.decide(rita, job_id, "reject", "counts below ten").status_code == 302
    token = h.hub.new_token("bob")
    status = h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}", token=token).json()
    assert status["status"] == "rejected" and status["comment"] == "counts below ten"
    assert h.hub.api("GET", f"/dcr/airlock/jobs/{job_id}/release", token=token).status_code == 409
    provider = h.page(rita, "provider")
    assert (
        provider.status_code == 200
        and "acme/insurance" in provider.text
        and "dcr provider add" in provider.text
    )
    assert h.page(h.hub.login("bob"), "provider").status_code == 403
    # Not logged in: the hub's login page.
    assert requests.get(f"{h.hub.url}/hub/dcr/review", timeout=60, allow_redirects=False).status_code == 302


def _xsrf(page: requests.Response) -> str:
    found = re.search(r"xsrf_token: \"([^\"]+)\"", page.text) or re.search(
        r'name="_xsrf" value="([^"]+)"', page.text
    )
    assert found, page.text[:1000]
    return found.group(1)
