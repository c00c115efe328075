"""A real JupyterHub that launches each job on (loopback) Confidential Space: the tests' cloud hub.

A real hub (real proxy) runs ``ConfidentialSpacePlatform`` against loopback Google: the Compute fake
(``gcp_fakes.compute``), the pinned Cloud Storage emulator, the STS and KMS fakes and the attestation
issuer. A "VM" the Compute fake boots runs the real ``python -m dcr_enclave.cloud`` with its ``tee-env-*``
metadata as environment and a teeserver fake whose tokens carry the instance's claims; the provider's
dataset key is wrapped by the KMS fake and released under the compiled Workload Identity condition.
Alice's real server (the DCR extension with ``HubBackend``) submits with her hub token only: it holds no
Google credential. Used by ``test_cloud_hub.py`` (the API) and ``test_cloud_browser.py`` (JupyterLab).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from gcp_fakes.compute import ComputeFake, FakeVM
from gcp_fakes.google import Google, register_version, vm_sandbox_ids
from gcp_fakes.issuer import vm_claims
from gcp_fakes.teeserver import TeeServerFake
from hub_harness import INSURANCE_REAL, INSURANCE_SYNTHETIC, Hub, policy_config

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import sha256_bytes
from dcr_enclave.pack.store import Store
from dcr_spawner.hubkey import load_or_create_hub_key

IMAGE_DIGEST = sha256_bytes(b"the released enclave image")
IMAGE = "europe-docker.pkg.dev/dcr-enclaves/enclave/dcr-enclave@" + IMAGE_DIGEST
PROJECT = "dcr-enclaves"
ZONE = "europe-west4-a"
WORKLOAD_SA = f"dcr-workload@{PROJECT}.iam.gserviceaccount.com"
KMS_KEY = (
    f"projects/acme-data/locations/europe-west4/keyRings/dcr/cryptoKeys/insurance-{secrets.token_hex(3)}"
)
WIP = "projects/555000111222/locations/global/workloadIdentityPools/acme-pool/providers/cs-acme"


class EnclaveVM:
    """What the Compute fake boots: the real enclave entry point, as the Confidential Space launcher runs
    it (the ``tee-env-*`` metadata as its environment, a teeserver socket whose tokens carry this
    instance's claims). Jobs named in ``hang`` never stop by themselves (a VM stuck after boot)."""

    def __init__(self, google: Google, tmp: Path) -> None:
        self.google, self.tmp = google, tmp
        self.hang: set[str] = set()
        self.runs: list[tuple[str, int, str]] = []
        #: What the next boots do instead of the usual (taken in order): ``"hang"``, or claims to change.
        self.next: list[str | dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, vm: FakeVM) -> None:
        launch = vm.env
        job_id = launch[contract.ENV.JOB_ID]
        with self._lock:
            special = self.next.pop(0) if self.next and job_id not in self.hang else None
        if job_id in self.hang or special == "hang":
            vm.stopping.wait(600)
            return
        work = Path(tempfile.mkdtemp(prefix="vm-", dir=self.tmp))
        claims = vm_claims(
            image_digest=IMAGE_DIGEST,
            env=dict(launch),
            project_id=PROJECT,
            zone=ZONE,
            instance_name=vm.instance["name"],
            instance_id=vm.instance["id"],
            service_accounts=[vm.instance["serviceAccounts"][0]["email"]],
            image_reference=vm.metadata["tee-image-reference"],
        )
        claims["submods"]["container"]["env"] = dict(launch)
        if isinstance(special, dict):
            claims = {**claims, **special.get("top", {})}
            claims["submods"]["container"].update(special.get("container", {}))
            claims["submods"]["container"]["env"].update(special.get("env", {}))
        sock = work / "launcher" / "teeserver.sock"
        tee = TeeServerFake(sock, self.google.issuer, claims).start()
        uid, gid = vm_sandbox_ids(self.tmp / "sandbox-ids")
        scratch = Path(tempfile.mkdtemp(prefix="dcr-cs-", dir="/tmp"))
        env = {
            **launch,
            contract.CLOUD_TEESERVER_SOCKET: str(sock),
            contract.CLOUD_STS_ENDPOINT: self.google.sts.endpoint,
            contract.CLOUD_KMS_ENDPOINT: self.google.kms.endpoint,
            contract.CLOUD_STORAGE_ENDPOINT: self.google.storage.endpoint,
            contract.CLOUD_SCRATCH: str(scratch),
            contract.CLOUD_SCRATCH_BYTES: str(2**30),
            contract.CLOUD_SANDBOX_IDS: f"{uid}:{gid}",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcr_enclave.cloud"],
            env=env,
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                if vm.stopping.wait(0.2):  # deleted: the VM's power is cut
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            self.runs.append((job_id, proc.returncode, err[-3000:]))
        finally:
            tee.stop()
            with contextlib.suppress(OSError):
                scratch.rmdir()


@dataclass
class CloudHub:
    hub: Hub
    google: Google
    compute: ComputeFake
    vm: EnclaveVM
    work: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = self.hub.new_token(user)
        return self.tokens[user]

    def submit(self, cells: list[str], name: str) -> dict[str, Any]:
        token = self.token("alice")
        self.hub.put_notebook("alice", f"{name}.ipynb", cells, token=token)
        r = self.hub.server_api(
            "alice",
            "POST",
            "dcr/api/jobs",
            token=token,
            json_body={"path": f"{name}.ipynb", "datasets": ["acme/insurance"]},
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.hub.server_api("alice", "GET", f"dcr/api/jobs/{job_id}", token=self.token("alice"))
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(
        self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 240
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.3)
        raise AssertionError(
            f"job {job_id} stuck at {job}; VM runs: {self.vm.runs[-2:]}\n{self.hub._tail(40)}"
        )

    def vms(self) -> list[str]:
        return sorted(i["name"] for i in self.compute.live())

    def cloud_api(self, method: str, path: str, user: str, **kw: Any) -> requests.Response:
        return self.hub.api(method, f"/dcr/cloud/jobs/{path}", token=self.token(user), **kw)

    def launches(self) -> dict[str, tuple[str, str]]:
        with sqlite3.connect(self.work / "hub" / "dcr-hub.sqlite") as db:
            return {
                j: (s, e)
                for j, s, e in db.execute("SELECT job_id, state, end_state FROM dcr_hub_cloud_launches")
            }


def terminal(job: dict[str, Any]) -> bool:
    return job["state"] in contract.TERMINAL_STATES


@contextlib.contextmanager
def cloud_hub_running(work: Path) -> Iterator[CloudHub]:
    """The hub, loopback Google and alice's running server (bob exists, without a server), in ``work``."""
    work.chmod(0o755)
    google = Google.start(buckets=("dcr-datasets", "dcr-jobs"))
    vm = EnclaveVM(google, work)
    compute = ComputeFake(vm).start()
    try:
        (work / "hub").mkdir()
        hub_key = load_or_create_hub_key(work / "hub" / "dcr-hub.key")
        # The provider registers the version with its data key wrapped by Cloud KMS, uploads it, and
        # deploys its condition (this hub's key, the released image, Confidential Space) on its pool.
        local = Store(work / "store")
        manifest, _cond = register_version(
            google, local, "acme", "insurance", [(INSURANCE_REAL, INSURANCE_SYNTHETIC)],
            kms_key=KMS_KEY, wip_provider=WIP, upload_to=contract.GsUri("dcr-datasets", "stores/acme/"),
            enclave_digests=(IMAGE_DIGEST,), hub_key_thumbprints=(hub_key.thumbprint,), project=PROJECT,
            service_accounts=(WORKLOAD_SA,),
        )  # fmt: skip

        root_pem = work / "cs-root.pem"
        root_pem.write_bytes(google.issuer.root_pem)
        root_pem.chmod(0o644)
        server_config = work / "server-config"
        server_config.mkdir()
        (server_config / "jupyter_server_config.json").write_text(
            json.dumps(
                {
                    "ServerApp": {"jpserver_extensions": {"dcr_server_ext": True}},
                    "DCRExtension": {
                        "grant_source_class": "dcr_server_ext.grant_sources.HubGrantSource",
                        "backend_class": "dcr_server_ext.backends.hub.HubBackend",
                        "trust_roots": [str(root_pem)],
                        "enclave_digests": [IMAGE_DIGEST],
                    },
                    "HubBackend": {"poll_interval": 0.3},
                }
            )
        )
        datasets = {
            "acme/insurance": {
                "version": manifest.version,
                "store": str(local.root),
                "release": "auto",
                "entitled": {"users": ["alice"]},
                "cloud": {"store": "gs://dcr-datasets/stores/acme/", "kms_key": KMS_KEY, "wip_provider": WIP},
            }
        }
        config = policy_config(
            datasets,
            time_limit=300,
            hub_key_file=str(work / "hub" / "dcr-hub.key"),
            platform_class="dcr_spawner.cloud.ConfidentialSpacePlatform",
            quotas={
                "concurrent_jobs_per_user": 2,
                "jobs_per_day_per_user": 500,
                "jobs_per_day_per_dataset": 5000,
                "grant_requests_per_minute": 500,
            },
        ) + "\n".join(
            [
                f"c.ConfidentialSpacePlatform.{k} = {v!r}"
                for k, v in {
                    "project": PROJECT,
                    "zone": ZONE,
                    "image_reference": IMAGE,
                    "service_account": WORKLOAD_SA,
                    "jobs_bucket": "gs://dcr-jobs/hub-1/",
                    "compute_endpoint": compute.endpoint,
                    "storage_endpoint": google.storage.endpoint,
                    "reconcile_interval": 1.0,
                    "max_run_seconds_margin": 60,
                    "enclave_digests": [IMAGE_DIGEST],
                    "trust_roots": [str(root_pem)],
                }.items()
            ]
            + [f"c.Spawner.environment = {{'JUPYTER_CONFIG_DIR': {str(server_config)!r}}}"]
        )
        hub = Hub(work / "hub", config=config)
        with hub:
            hub.spawn("alice")
            hub.create_user("bob")
            yield CloudHub(hub, google, compute, vm, work)
    finally:
        compute.stop()
        google.stop()
