"""The enclave host's job events in the hub's audit trail: a real enclave host (in this process, as root)
journals each job's launch, key released, key refused and end; a real JupyterHub reads them periodically
into ``dcr_hub_audit`` exactly once, across repeated reads, the audit view's own read and a hub restart.
"""

from __future__ import annotations

import base64
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hub_harness import Hub, dataset_entry, policy_config
from test_enclave_host import _as_other
from test_enclave_host import shared_host as shared_host  # the fixture
from test_local_run import SUMMARY_CELLS, _wait_state

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.pack.bundle_builder import build_bundle
from dcr_enclave.pack.store import Store
from dcr_spawner.audit import ingest_platform_events
from dcr_spawner.hubdb import HubDB
from dcr_spawner.platform import LocalEnclaveHost

pytestmark = [pytest.mark.root]

ENCLAVE_EVENTS = ("enclave.launch", "enclave.key_released", "enclave.key_refused", "enclave.end")


def _journal(host: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (host.state / "events.jsonl").read_text().splitlines()]


def _enclave_rows(db_file: Path) -> list[tuple[str, str | None, str | None, tuple[str, ...], str]]:
    db = HubDB(f"sqlite:///{db_file}", create=False)
    try:
        return [
            (e.event, e.job_id, e.grant_id, e.datasets, e.reason)
            for e in db.events(limit=100_000)
            if e.event.startswith("enclave.")
        ]
    finally:
        db.dispose()


def _wait_for(fn: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _run_job(hub: Hub, host: Any, notebook: Path, tmp: Path) -> tuple[str, str]:
    """A grant from the hub's grant service (alice's token), launched on the host; also one key request
    the broker refuses (a challenge it never issued). Waits for the job's end."""
    bundle = build_bundle(notebook, tmp / "bundle.tar")
    _, public = generate_keypair()
    body = {
        "job_id": contract.new_job_id(),
        "bundle_digest": bundle.digest,
        "datasets": ["acme/insurance"],
        "output_public_key": base64.urlsafe_b64encode(public).rstrip(b"=").decode(),
    }
    r = hub.api("POST", "/dcr/grants", token=hub.new_token("alice"), data=json.dumps(body).encode())
    assert r.status_code == 201, r.text
    grant = r.json()
    host.client.launch(grant["grant"], tmp / "bundle.tar")
    with pytest.raises(DCRError, match="challenge"):
        host.host.broker.release(
            {"challenge": "not-issued", "provider": "acme", "dataset": "insurance", "version": "x"},
            job_id=grant["job_id"],
        )
    job = _wait_state(host.client, grant["job_id"], contract.TERMINAL_STATES, timeout=180)
    assert job["state"] == "succeeded", job
    return grant["job_id"], grant["grant_id"]


@pytest.mark.slow
def test_host_events_reach_the_audit_trail_once(
    tmp_path: Path, store: Any, shared_host: Any, make_notebook: Callable[..., Path]
) -> None:
    host = shared_host
    version = Store(store.root).versions(store.provider, store.dataset)[-1]
    work = tmp_path / "hub"
    config = policy_config(
        {"acme/insurance": dataset_entry(version, store.root, users=["alice"], release="auto")},
        hub_key_file=str(store.hub_key_path),  # the key the provider's condition pins (development key)
        time_limit=300,
    ) + (
        f"c.LocalEnclaveHost.socket_path = {str(host.socket)!r}\n"
        f"c.LocalEnclaveHost.keys_dir = {str(store.keys)!r}\n"
        "c.LocalEnclaveHost.audit_interval = 0.3\n"
    )
    hub = Hub(work, config=config, admin_users=["admin"])
    db_file = work / "dcr-hub.sqlite"
    with hub:
        job, grant = _run_job(hub, host, make_notebook(SUMMARY_CELLS), tmp_path)
        expected = [
            ("enclave.launch", job, grant, ("acme/insurance",), ""),
            ("enclave.key_refused", job, grant, ("acme/insurance",), "challenge"),
            ("enclave.key_released", job, grant, ("acme/insurance",), ""),
            ("enclave.end", job, grant, ("acme/insurance",), ""),
        ]
        _wait_for(lambda: len(_enclave_rows(db_file)) >= 4, "the hub's periodic read of the host's events")
        time.sleep(1.0)  # several more periodic reads
        assert sorted(_enclave_rows(db_file)) == sorted(expected)
        # The audit view reads before it answers: nothing twice.
        r = hub.api("GET", "/dcr/audit", token=hub.new_token("admin"))
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["verification"]["ok"] is True
        end = next(e for e in doc["events"] if e["event"] == "enclave.end")
        assert end["detail"]["state"] == "succeeded" and end["receipt_url"].endswith(f"/dcr/receipts/{job}")
        assert [e["event"] for e in doc["events"]].count("enclave.launch") == 1
    # The hub is stopped: an ingestion by hand (another reader of the same records) finds nothing new.
    db = HubDB(f"sqlite:///{db_file}")
    assert ingest_platform_events(db, LocalEnclaveHost(socket_path=str(host.socket))) == 0
    db.dispose()

    # Restarted, the hub goes on from its stored cursor: the first job's events stay once, a new job's
    # events arrive once.
    with hub:
        time.sleep(1.0)
        assert sorted(_enclave_rows(db_file)) == sorted(expected)
        (tmp_path / "second").mkdir()
        job2, grant2 = _run_job(hub, host, make_notebook(SUMMARY_CELLS, workspace="ws2"), tmp_path / "second")
        _wait_for(lambda: len(_enclave_rows(db_file)) >= 8, "the second job's events")
        time.sleep(1.0)
        rows = _enclave_rows(db_file)
        assert len(rows) == 8 and sorted(rows[4:]) == sorted(
            [(e, job2, grant2, d, r) for e, _j, _g, d, r in expected]
        )
    db = HubDB(f"sqlite:///{db_file}", create=False)
    assert db.verify_audit().ok
    db.dispose()

    # The host's journal: root-only, structured (no free text), one journal id, run id and sequence.
    journal = _journal(host)
    assert stat.S_IMODE((host.state / "events.jsonl").stat().st_mode) == 0o600
    assert [e["seq"] for e in journal] == list(range(1, 9))
    assert len({e["journal"] for e in journal}) == 1 and len({e["run"] for e in journal}) == 1
    refused = next(e for e in journal if e["event"] == "key_refused")
    assert refused["reason_code"] == "challenge" and "reason" not in refused and "version" not in refused
    launch = next(e for e in journal if e["event"] == "launch")
    assert launch["datasets"] == ["acme/insurance"] and launch["user"] == "alice"
    # Only root is answered.
    assert _as_other(host, "events", after=None) == {
        "ok": False,
        "error": "not allowed: events are answered only to root",
    }
