"""Benchmark: cloud submit latency, Submit -> ``instances.insert`` received by Compute, on a real hub.

Starts a real JupyterHub (``tests/hub_harness.py``) whose platform is ``ConfidentialSpacePlatform`` against
loopback Google (the Compute fake, the pinned Cloud Storage emulator; the dataset's key is wrapped by the
KMS fake so the hub accepts it), and two researchers' servers:

- ``alice`` uses ``HubBackend``: each submission bundles the notebook, asks the hub for a grant, sends the
  bundle to the hub, which checks it against the grant, records the launch, uploads the bundle and calls
  ``instances.insert``. Timed: from the researcher's ``POST /dcr/api/jobs`` to the moment the Compute fake
  receives that job's insert;
- ``bob`` (the baseline, same run) uses a launcher that returns at once: timed is his whole
  ``POST /dcr/api/jobs`` (bundle + grant + a launch costing nothing).

``--n`` submissions each (default 50), one at a time; the "VMs" power off at once. Prints p50/p95/max.
Budget (docs/ARCHITECTURE.md): submit -> insert sent under 0.5 s. Run from the repository root::

    .venv/bin/python benchmarks/bench_cloud_submit.py [--n 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from gcp_fakes.compute import ComputeFake, Request  # noqa: E402
from gcp_fakes.google import Google, register_version  # noqa: E402
from hub_harness import INSURANCE_REAL, INSURANCE_SYNTHETIC, Hub, policy_config  # noqa: E402

from dcr_enclave.formats.contract import GsUri  # noqa: E402
from dcr_server_ext.backends.base import Backend, BackendStatus  # noqa: E402

IMAGE = "europe-docker.pkg.dev/dcr-enclaves/enclave/dcr-enclave@sha256:" + "4f" * 32
KMS_KEY = "projects/acme-data/locations/europe-west4/keyRings/dcr/cryptoKeys/insurance"
WIP = "projects/555000111222/locations/global/workloadIdentityPools/acme-pool/providers/cs-acme"


class ImmediateBackend(Backend):
    """The baseline's launcher: launching costs nothing; the job then stays "launching"."""

    async def launch(self, job: Any, grant: str, bundle: Path) -> dict[str, Any]:
        return {"immediate": True}

    async def status(self, job: Any) -> BackendStatus | None:
        return BackendStatus(state="launching")

    async def progress(self, job: Any) -> Any:
        yield BackendStatus(state="launching")

    async def cancel(self, job: Any) -> None:
        return None

    async def collect(self, job: Any, dest: Path) -> list[str]:
        return []

    async def cleanup(self, job: Any) -> None:
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(label: str, values: list[float]) -> None:
    ms = [v * 1000 for v in values]
    print(
        f"{label:<58} n={len(ms):3d}  p50 {percentile(ms, 0.5):7.1f} ms  p95 {percentile(ms, 0.95):7.1f} ms  "
        f"max {max(ms):7.1f} ms  mean {statistics.mean(ms):7.1f} ms"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="submissions per researcher")
    args = ap.parse_args()

    from dcr_enclave.pack.store import Store

    inserts: dict[str, float] = {}
    seen = threading.Condition()

    def on_request(req: Request) -> None:
        if req.method == "POST" and req.path.endswith("/instances") and isinstance(req.body, dict):
            with seen:
                inserts[str(req.body.get("name", ""))] = time.monotonic()
                seen.notify_all()

    with tempfile.TemporaryDirectory(prefix="dcr-bench-cloud-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        google = Google.start(buckets=("dcr-jobs", "dcr-datasets"))
        compute = ComputeFake(lambda vm: None).start()  # VMs power off at once
        compute.on_request = on_request
        try:
            # No VM boots here: the condition only has to exist, so its pins are placeholders.
            manifest, _cond = register_version(
                google, Store(work / "store"), "acme", "insurance", [(INSURANCE_REAL, INSURANCE_SYNTHETIC)],
                kms_key=KMS_KEY, wip_provider=WIP, upload_to=GsUri("dcr-datasets", "stores/acme/"),
                enclave_digests=(IMAGE.split("@")[1],), hub_key_thumbprints=("sha256:" + "0" * 64,),
                project="dcr-enclaves", service_accounts=("dcr-workload@dcr-enclaves.iam.gserviceaccount.com",),
            )  # fmt: skip
            configs = {}
            for user, backend in (
                ("alice", "dcr_server_ext.backends.hub.HubBackend"),
                ("bob", "benchmarks.bench_cloud_submit.ImmediateBackend"),
            ):
                d = work / f"config-{user}"
                d.mkdir()
                d.chmod(0o755)
                (d / "jupyter_server_config.json").write_text(
                    json.dumps(
                        {
                            "ServerApp": {"jpserver_extensions": {"dcr_server_ext": True}},
                            "DCRExtension": {
                                "grant_source_class": "dcr_server_ext.grant_sources.HubGrantSource",
                                "backend_class": backend,
                            },
                            "HubBackend": {"poll_interval": 5.0},
                        }
                    )
                )
                configs[user] = str(d)
            total = 4 * args.n
            datasets = {
                "acme/insurance": {
                    "version": manifest.version,
                    "store": str(work / "store"),
                    "release": "auto",
                    "entitled": {"users": ["alice", "bob"]},
                    "cloud": {
                        "store": "gs://dcr-datasets/stores/acme/",
                        "kms_key": KMS_KEY,
                        "wip_provider": WIP,
                    },
                }
            }
            platform = {
                "project": "dcr-enclaves",
                "zone": "europe-west4-a",
                "image_reference": IMAGE,
                "service_account": "dcr-workload@dcr-enclaves.iam.gserviceaccount.com",
                "jobs_bucket": "gs://dcr-jobs/bench/",
                "compute_endpoint": compute.endpoint,
                "storage_endpoint": google.storage.endpoint,
                "reconcile_interval": 30.0,
            }
            config = policy_config(
                datasets,
                platform_class="dcr_spawner.cloud.ConfidentialSpacePlatform",
                quotas={
                    "concurrent_jobs_per_user": total,
                    "jobs_per_day_per_user": total,
                    "jobs_per_day_per_dataset": total,
                    "grant_requests_per_minute": total,
                },
            ) + "\n".join(
                [f"c.ConfidentialSpacePlatform.{k} = {v!r}" for k, v in platform.items()]
                + [
                    f"_cfg = {configs!r}",
                    "c.Spawner.environment = {'JUPYTER_CONFIG_DIR': lambda s: _cfg[s.user.name]}",
                ]
            )
            with Hub(work / "hub", config=config) as hub:
                for user in ("alice", "bob"):
                    hub.spawn(user)
                tokens = {u: hub.new_token(u) for u in ("alice", "bob")}
                for user in ("alice", "bob"):
                    hub.put_notebook(user, "analysis.ipynb", ["print(1)"], token=tokens[user])

                def submit(user: str) -> tuple[str, float, float]:
                    t0 = time.monotonic()
                    r = hub.server_api(
                        user,
                        "POST",
                        "dcr/api/jobs",
                        token=tokens[user],
                        json_body={"path": "analysis.ipynb", "datasets": ["acme/insurance"]},
                    )
                    t1 = time.monotonic()
                    assert r.status_code == 201, r.text + hub._tail(60)
                    return str(r.json()["id"]), t0, t1

                for user in ("alice", "bob"):  # warm-up: connections, imports, first records
                    submit(user)
                to_insert, alice_post, bob_post = [], [], []
                for _ in range(args.n):
                    job_id, t0, t1 = submit("alice")
                    name = f"dcr-{job_id}"
                    with seen:
                        got = seen.wait_for(lambda n=name: n in inserts, timeout=30)  # type: ignore[misc]
                        assert got, f"no insert for {job_id}"
                    to_insert.append(inserts[name] - t0)
                    alice_post.append(t1 - t0)
                    _, b0, b1 = submit("bob")
                    bob_post.append(b1 - b0)
                print(f"cloud submit, {args.n} submissions each, one at a time (real hub, loopback Google)")
                report("submit -> instances.insert received (HubBackend)", to_insert)
                report("submit answered (HubBackend, insert done)", alice_post)
                report("submit answered (baseline: launcher returns at once)", bob_post)
                print(
                    f"p50 over baseline: +{(percentile(to_insert, 0.5) - percentile(bob_post, 0.5)) * 1000:.1f} ms; "
                    f"budget submit -> insert < 500 ms: {'met' if percentile(to_insert, 0.95) < 0.5 else 'NOT met'} (p95)"
                )
        finally:
            compute.stop()
            google.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
