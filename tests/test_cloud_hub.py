"""Confidential Space through a real JupyterHub: the hub launches each job on a Confidential VM.

The hub, loopback Google and the "VMs" are ``cloud_hub_env``'s; alice's real server (the DCR extension with
``HubBackend``) submits with her hub token only: it holds no Google credential.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cloud_hub_env import (
    IMAGE_DIGEST,
    PROJECT,
    ZONE,
    CloudHub,
    cloud_hub_running,
    terminal,
)
from gcp_fakes.google import COUNT_ROWS
from hub_harness import Hub

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import sha256_bytes
from dcr_enclave.pack.bundle_builder import build_bundle

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def cloud_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudHub]:
    with cloud_hub_running(tmp_path_factory.mktemp("cloud-hub")) as running:
        yield running


def test_the_researchers_server_holds_no_google_credential(cloud_hub: CloudHub) -> None:
    env = cloud_hub.hub.server_env("alice")
    assert not [k for k in env if k.startswith(("GOOGLE_", "CLOUDSDK_", "GCE_"))]
    home = Path(env.get("HOME", "/nonexistent"))
    assert not (home / ".config" / "gcloud").exists()
    assert "application_default_credentials" not in json.dumps(env)


def test_submit_runs_on_a_confidential_vm_and_leaves_none(cloud_hub: CloudHub) -> None:
    job = cloud_hub.submit(COUNT_ROWS, "count")
    done = cloud_hub.wait(job["id"], terminal)
    assert done["state"] == "succeeded", (done, cloud_hub.vm.runs[-1:])
    assert done["enclave"]["kind"] == "confidential_space" and done["enclave"]["simulated"] is False
    assert done["enclave"]["image_digest"] == IMAGE_DIGEST
    assert cloud_hub.vms() == []
    assert cloud_hub.launches()[job["id"]] == ("ended", "succeeded")
    # The result, opened in alice's server with her job key, verifies offline as hardware-attested.
    result = cloud_hub.work / "hub" / "home" / "alice" / done["outputs_path"]
    assert (result / contract.OUTPUTS_DIR / "results" / "summary.csv").read_text().startswith("rows\n")
    verify = [
        sys.executable,
        "-m",
        "dcr_enclave",
        "verify",
        str(result),
        "--trust-root",
        str(cloud_hub.work / "cs-root.pem"),
    ]
    ok = subprocess.run(
        [*verify, "--enclave-digest", IMAGE_DIGEST, "--require-hardware"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "FAIL" not in ok.stdout, ok.stdout + ok.stderr
    other = subprocess.run(
        [*verify, "--enclave-digest", sha256_bytes(b"other"), "--require-hardware"],
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0 and "FAIL pinned enclave digest" in other.stdout
    # Launch and end are in the hub's (hash-chained) audit trail.
    with sqlite3.connect(cloud_hub.work / "hub" / "dcr-hub.sqlite") as db:
        events = [
            e
            for (e,) in db.execute(
                "SELECT event FROM dcr_hub_audit WHERE job_id = ? ORDER BY id", (job["id"],)
            )
        ]
    assert events == ["grant.issued", "cloud.launch", "cloud.end"]


def _job_events(hub: Hub, user: str, token: str, started: threading.Event, out: list[dict[str, Any]]) -> None:
    """Collect ``user``'s DCR job events, as the JupyterLab panel receives them (the server's event
    socket), until one reaches a terminal state."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    from dcr_server_ext.events import EVENT_SCHEMA_ID

    async def listen() -> None:
        url = f"ws://127.0.0.1:{hub.port}/user/{user}/api/events/subscribe"
        conn = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {token}"}))
        started.set()
        try:
            while True:
                raw = await asyncio.wait_for(conn.read_message(), timeout=240)
                if raw is None:
                    return
                msg = json.loads(raw)
                if msg.get("schema_id") == EVENT_SCHEMA_ID:
                    out.append(msg)
                    if msg["state"] in contract.TERMINAL_STATES:
                        return
        finally:
            conn.close()

    asyncio.run(listen())


def test_the_panel_sees_the_same_states_as_for_the_local_enclave(cloud_hub: CloudHub) -> None:
    """The jobs panel draws what the server's job events say: a cloud job goes through the local
    enclave's states in the same order (submitted, granted, launching, running, checking, succeeded),
    with its cell progress and no failure reason, and names a hardware enclave."""
    events: list[dict[str, Any]] = []
    started = threading.Event()
    listener = threading.Thread(
        target=_job_events,
        args=(cloud_hub.hub, "alice", cloud_hub.token("alice"), started, events),
        daemon=True,
    )
    listener.start()
    assert started.wait(30)
    job = cloud_hub.submit(COUNT_ROWS, "panel")
    listener.join(260)
    mine = [e for e in events if e["job_id"] == job["id"]]
    states = [s for i, s in enumerate(e["state"] for e in mine) if i == 0 or mine[i - 1]["state"] != s]
    assert states == ["submitted", "granted", "launching", "running", "checking", "succeeded"], states
    assert all(e["reason"] is None for e in mine)
    assert [e["cells"] for e in mine if e["cells"] is not None][-1] == len(COUNT_ROWS)
    done = cloud_hub.job(job["id"])
    assert done["progress"] == {"cell": len(COUNT_ROWS) - 1, "cells": len(COUNT_ROWS)}
    assert done["enclave"]["simulated"] is False


def test_insert_refused_and_operation_errors_fail_the_job_with_a_reason(cloud_hub: CloudHub) -> None:
    cloud_hub.compute.refuse_next_insert()
    job = cloud_hub.wait(cloud_hub.submit(COUNT_ROWS, "quota")["id"], terminal)
    assert job["state"] == "failed" and "quotaExceeded" in job["failure"]["reason"], job
    cloud_hub.compute.fail_next_operation()
    job = cloud_hub.wait(cloud_hub.submit(COUNT_ROWS, "op-error")["id"], terminal)
    assert job["state"] == "failed" and "ZONE_RESOURCE_POOL_EXHAUSTED" in job["failure"]["reason"], job
    assert cloud_hub.vms() == []


def test_cancel_while_running_deletes_the_vm(cloud_hub: CloudHub) -> None:
    job = cloud_hub.submit(["import time\ntime.sleep(120)"], "sleepy")
    cloud_hub.wait(job["id"], lambda j: j["state"] == "running")
    r = cloud_hub.hub.server_api(
        "alice", "POST", f"dcr/api/jobs/{job['id']}/cancel", token=cloud_hub.token("alice")
    )
    assert r.status_code in (200, 202), r.text
    assert cloud_hub.wait(job["id"], terminal)["state"] == "cancelled"
    assert cloud_hub.vms() == []
    assert cloud_hub.launches()[job["id"]] == ("ended", "cancelled")


def test_a_vm_that_never_stops_is_deleted_at_its_deadline(cloud_hub: CloudHub) -> None:
    cloud_hub.vm.next.append("hang")
    job_id = cloud_hub.submit(COUNT_ROWS, "stuck")["id"]
    cloud_hub.wait(job_id, lambda j: (j["state"] == "launching" and bool(cloud_hub.vms())) or terminal(j))
    # The deadline is the grant's time limit plus the margin; bring it to now rather than wait for it.
    with sqlite3.connect(cloud_hub.work / "hub" / "dcr-hub.sqlite") as db:
        db.execute(
            "UPDATE dcr_hub_cloud_launches SET deadline = ? WHERE job_id = ?", (int(time.time()) - 1, job_id)
        )
    job = cloud_hub.wait(job_id, terminal, timeout=60)
    assert job["state"] == "failed" and "time limit" in job["failure"]["reason"], job
    assert cloud_hub.vms() == []


def _grant(cloud_hub: CloudHub, tmp: Path, user: str = "alice") -> tuple[str, str, str, bytes]:
    """A grant from the hub's grant service for a bundle built here: ``(job id, grant id, grant, bundle)``."""
    nb = tmp / f"{secrets.token_hex(4)}.ipynb"
    nb.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    bundle = tmp / (nb.stem + ".tar")
    digest = build_bundle(nb, bundle).digest
    job_id = contract.new_job_id()
    body = {
        "job_id": job_id,
        "bundle_digest": digest,
        "datasets": ["acme/insurance"],
        "output_public_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode(),
    }
    r = cloud_hub.hub.api("POST", "/dcr/grants", token=cloud_hub.token(user), json_body=body)
    assert r.status_code == 201, r.text
    doc = r.json()
    return job_id, doc["grant_id"], doc["grant"], bundle.read_bytes()


def _launch(
    cloud_hub: CloudHub, user: str, job_id: str, grant_id: str, grant: str, bundle: bytes
) -> requests.Response:
    return cloud_hub.cloud_api(
        "POST",
        f"{job_id}?grant={grant_id}",
        user,
        data=bundle,
        headers={"X-DCR-Grant": grant, "Content-Type": "application/x-tar"},
    )


def test_one_vm_per_grant_and_only_for_its_owner(cloud_hub: CloudHub, tmp_path: Path) -> None:
    job_id, grant_id, grant, bundle = _grant(cloud_hub, tmp_path)
    cloud_hub.vm.hang.add(job_id)
    # Another user's token can neither launch, read, cancel nor fetch alice's job: 404, nothing created.
    before = cloud_hub.compute.inserts_created
    assert _launch(cloud_hub, "bob", job_id, grant_id, grant, bundle).status_code == 404
    # Malformed launches: clear 400s, nothing recorded.
    r = cloud_hub.cloud_api("POST", f"{job_id}?grant={grant_id}", "alice", data=bundle)
    assert r.status_code == 400 and "X-DCR-Grant" in r.json()["error"]
    r = _launch(cloud_hub, "alice", job_id, "grant-nope", grant, bundle)
    assert r.status_code == 400 and "grant" in r.json()["error"]
    assert r.headers["Content-Type"].startswith("application/json")
    assert job_id not in cloud_hub.launches()
    assert cloud_hub.compute.inserts_created == before
    for r in (
        _launch(cloud_hub, "alice", job_id, grant_id, grant, bundle),
        _launch(cloud_hub, "alice", job_id, grant_id, grant, bundle),
    ):
        assert r.status_code == 201, r.text
    assert cloud_hub.compute.inserts_created == before + 1
    assert cloud_hub.vms().count(f"dcr-{job_id}") == 1
    for method, path in (
        ("GET", job_id),
        ("POST", f"{job_id}/cancel"),
        ("GET", f"{job_id}/result"),
        ("DELETE", job_id),
    ):
        r = cloud_hub.cloud_api(method, path, "bob")
        assert r.status_code == 404 and "error" in r.json(), (method, path, r.text)
    assert f"dcr-{job_id}" in cloud_hub.vms()
    # A bundle other than the granted one is refused, and nothing is launched for it.
    other_job, other_grant, other_token, _ = _grant(cloud_hub, tmp_path)
    r = _launch(cloud_hub, "alice", other_job, other_grant, other_token, bundle)
    assert r.status_code == 400 and "digest" in r.json()["error"]
    assert other_job not in cloud_hub.launches()
    assert cloud_hub.cloud_api("POST", f"{job_id}/cancel", "alice").json()["state"] == "cancelled"
    assert f"dcr-{job_id}" not in cloud_hub.vms()


def test_a_hub_restart_between_insert_and_its_record_launches_no_second_vm(
    cloud_hub: CloudHub, tmp_path: Path
) -> None:
    job_id, grant_id, grant, bundle = _grant(cloud_hub, tmp_path)
    cloud_hub.vm.hang.add(job_id)
    assert _launch(cloud_hub, "alice", job_id, grant_id, grant, bundle).status_code == 201
    created = cloud_hub.compute.inserts_created
    cloud_hub.hub.stop()
    # As if the hub had died after the insert reached Compute but before it noted the insert done.
    with sqlite3.connect(cloud_hub.work / "hub" / "dcr-hub.sqlite") as db:
        db.execute("UPDATE dcr_hub_cloud_launches SET state = 'launching' WHERE job_id = ?", (job_id,))
    cloud_hub.hub.start()
    cloud_hub.tokens.clear()
    assert _launch(cloud_hub, "alice", job_id, grant_id, grant, bundle).status_code == 201
    time.sleep(2)  # a reconciler pass of the new hub: a live job's VM stays
    assert cloud_hub.compute.inserts_created == created
    assert cloud_hub.vms().count(f"dcr-{job_id}") == 1
    assert cloud_hub.cloud_api("POST", f"{job_id}/cancel", "alice").json()["state"] == "cancelled"
    # The hub's restart stopped alice's server: start it again for the tests after this one.
    cloud_hub.hub.spawn("alice")


def test_the_researchers_server_restarting_mid_job(cloud_hub: CloudHub) -> None:
    job = cloud_hub.submit(["import time\ntime.sleep(8)", *COUNT_ROWS], "restart")
    cloud_hub.wait(job["id"], lambda j: j["state"] == "running")
    cloud_hub.hub.stop_server("alice")
    cloud_hub.hub.spawn("alice")
    cloud_hub.tokens.pop("alice", None)
    done = cloud_hub.wait(job["id"], terminal)
    assert done["state"] == "succeeded", done
    assert cloud_hub.vms() == []


def test_the_concurrent_jobs_quota_frees_when_a_job_ends(cloud_hub: CloudHub, tmp_path: Path) -> None:
    """The quota is 2 running jobs: jobs that ended count no more, at once (not at their time limit)."""
    for _ in range(3):
        job_id, grant_id, grant, bundle = _grant(cloud_hub, tmp_path)
        cloud_hub.vm.hang.add(job_id)
        assert _launch(cloud_hub, "alice", job_id, grant_id, grant, bundle).status_code == 201
        assert cloud_hub.cloud_api("POST", f"{job_id}/cancel", "alice").json()["state"] == "cancelled"
    assert cloud_hub.vms() == [] or all(not n.startswith("dcr-job-") for n in cloud_hub.vms())


def test_the_hubs_reconciler_deletes_a_vm_no_job_owns(cloud_hub: CloudHub) -> None:
    """A VM labelled as this hub's with no launch record (left by a hub whose database was restored, or
    created by hand) is deleted by the hub's periodic sweep; another hub's VM is left alone."""
    from dcr_spawner.cloud.launcher import Compute, hub_label, request_id
    from dcr_spawner.hubkey import load_or_create_hub_key

    hub = hub_label(load_or_create_hub_key(cloud_hub.work / "hub" / "dcr-hub.key").thumbprint)
    compute = Compute(PROJECT, ZONE, cloud_hub.compute.endpoint, timeout=10)
    base = {
        "machineType": f"zones/{ZONE}/machineTypes/n2d-standard-4",
        "disks": [{"boot": True, "initializeParams": {"sourceImage": "projects/x/global/images/family/y"}}],
        "networkInterfaces": [{}],
    }
    job = contract.new_job_id()
    cloud_hub.vm.hang.add(job)
    env_items = [{"key": f"tee-env-{contract.ENV.JOB_ID}", "value": job}]
    for name, label in ((f"dcr-{job}", hub), ("dcr-other-hub", "hother")):
        body = {**base, "name": name, "labels": {"dcr-hub": label}, "metadata": {"items": env_items}}
        compute.insert(body, request_id(name, "insert"))
    deadline = time.monotonic() + 20
    while f"dcr-{job}" in cloud_hub.vms() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cloud_hub.vms() == ["dcr-other-hub"]
    compute.delete("dcr-other-hub", wait=10)


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"container": {"image_digest": sha256_bytes(b"an image no provider approved")}}, "another image"),
        ({"top": {"dbgstat": "enabled"}}, "a debug image"),
        ({"env": {contract.ENV.HUB_KEY_THUMBPRINT: sha256_bytes(b"another hub's key")}}, "another hub key"),
    ],
)
def test_a_vm_the_providers_condition_refuses_fails_before_any_cell(
    cloud_hub: CloudHub, claims: dict[str, Any], why: str
) -> None:
    """STS refuses the token under the provider's condition: no key, the job fails before any cell, and
    the VM (powered off by the enclave) is deleted."""
    cloud_hub.vm.next.append(claims)
    job = cloud_hub.wait(cloud_hub.submit(COUNT_ROWS, "refused")["id"], terminal)
    assert job["state"] == "failed", (why, job)
    assert job["failure"]["cell"] is None and "key" in job["failure"]["reason"], job
    assert cloud_hub.vms() == []
