"""Benchmark: the airlock's review page with many held jobs, and approval → outputs in the researcher's server.

Starts a real JupyterHub (real configurable-http-proxy, ``tests/hub_harness.py``) with a DCR policy whose
dataset is under review, a reviewer (``rita``) and a test attestation signer pinned as the platform's
anchor. It then

1. fills the airlock with ``--held`` held jobs (default 1000): for each, a real grant from the hub and a held
   result made as the enclave makes it (``tests/receipt_factory.held_result_tar``), delivered through the
   airlock API and checked by the hub (untimed);
2. times ``--loads`` loads (default 50) of the review queue page (``/hub/dcr/review``, as the reviewer, with
   the hub's cookie) and of the plain hub home page (``/hub/home``) as the baseline, alternating, and prints
   p50/p95 of each;
3. runs the researcher's side in this process, as their server runs it: a job manager
   (``dcr_server_ext.manager.JobManager``) with the hub grant source and the user's token holds ``--jobs``
   held jobs (default 20) it delivered itself; the reviewer approves them one at a time through the review
   page's form, each at a random moment within a poll interval, and the time from the approval's answer to
   the job being ``released`` in the manager's store (outputs fetched, checked against the receipt, opened)
   is printed as p50/p95, with the manager's poll interval (``--poll``, default the extension's 5 s) beside
   it.

Run from the repository root::

    .venv/bin/python benchmarks/bench_review.py [--held 1000] [--loads 50] [--jobs 20] [--poll 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from hub_harness import Hub, dataset_entry, make_stores, policy_config  # noqa: E402
from receipt_factory import IMAGE_DIGEST, held_result_tar, make_signer  # noqa: E402

from dcr_enclave.formats import contract, sealing  # noqa: E402
from dcr_server_ext.backends.base import Backend  # noqa: E402
from dcr_server_ext.grant_sources import HubGrantSource  # noqa: E402
from dcr_server_ext.jobstore import JobStore  # noqa: E402
from dcr_server_ext.manager import JobManager, unsent_review  # noqa: E402
from dcr_server_ext.model import Job  # noqa: E402

BUNDLE = "sha256:" + "12" * 32
OUTPUTS = {
    "analysis.ipynb": json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode(),
    "results/by_test.csv": b"test,count\n" + b"".join(b"t%d,%d\n" % (i, 100 + i) for i in range(50)),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class NoBackend(Backend):
    """The researcher's manager here only follows held jobs: it never launches."""


def grant(hub: Hub, token: str, public: bytes, job_id: str | None = None) -> dict[str, Any]:
    body = {
        "job_id": job_id or contract.new_job_id(),
        "bundle_digest": BUNDLE,
        "datasets": ["acme/insurance"],
        "output_public_key": base64.urlsafe_b64encode(public).rstrip(b"=").decode(),
    }
    r = hub.api("POST", "/dcr/grants", token=token, json_body=body)
    r.raise_for_status()
    return dict(r.json())


def xsrf(page: str) -> str:
    found = re.search(r'name="_xsrf" value="([^"]+)"', page)
    if not found:
        raise RuntimeError("the review page has no decision form")
    return found.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--held", type=int, default=1000)
    ap.add_argument("--loads", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--poll", type=float, default=5.0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        stores = make_stores(work / "stores", "--protection", "dp", "--epsilon", "1", rows=200)
        signer = make_signer()
        jwks = signer.write_jwks(work / "signer-jwks.json")
        jwks.chmod(0o644)
        many = 10 * (args.held + args.jobs)
        config = policy_config(
            {"acme/insurance": dataset_entry(stores.insurance, stores.root, users=["alice"])},
            providers={"acme": {"name": "ACME Insurance", "reviewers": {"users": ["rita"]}}},
            quotas={
                "concurrent_jobs_per_user": many,
                "jobs_per_day_per_user": many,
                "jobs_per_day_per_dataset": many,
                "grant_requests_per_minute": many,
            },
        ) + (
            f"c.LocalEnclaveHost.trust_jwks = [{str(jwks)!r}]\nc.LocalEnclaveHost.enclave_digests = [{IMAGE_DIGEST!r}]\n"
        )
        with Hub(work / "hub", config=config) as hub:
            hub.create_user("rita")
            token = hub.new_token("alice", expires_in=86400)
            thumbprint = hub.api("GET", "/dcr/jwks").json()["thumbprint"]
            airlock_public = sealing.public_key((hub.workdir / "dcr-airlock.key").read_bytes())

            def held(granted: dict[str, Any]) -> bytes:
                return held_result_tar(
                    work,
                    granted,
                    signer,
                    hub_thumbprint=thumbprint,
                    airlock_public=airlock_public,
                    outputs=OUTPUTS,
                )

            t = time.perf_counter()
            for _ in range(args.held):
                granted = grant(hub, token, sealing.generate_keypair()[1])
                r = hub.api(
                    "POST",
                    f"/dcr/airlock/jobs/{granted['job_id']}",
                    token=token,
                    data=held(granted),
                    headers={"Content-Type": "application/x-tar"},
                )
                r.raise_for_status()
            print(f"filled the airlock with {args.held} held jobs in {time.perf_counter() - t:.1f} s")

            rita = hub.login("rita")
            queue, home = [], []
            for _ in range(args.loads):
                for url, into in ((f"{hub.url}/hub/dcr/review", queue), (f"{hub.url}/hub/home", home)):
                    t = time.perf_counter()
                    r = rita.get(url, timeout=120)
                    into.append(time.perf_counter() - t)
                    r.raise_for_status()
            print(
                f"review queue ({args.held} held): p50 {percentile(queue, 0.5) * 1000:.1f} ms, "
                f"p95 {percentile(queue, 0.95) * 1000:.1f} ms; hub home (baseline): "
                f"p50 {percentile(home, 0.5) * 1000:.1f} ms, p95 {percentile(home, 0.95) * 1000:.1f} ms"
            )
            latencies = asyncio.run(approvals(hub, token, rita, work, held, args))
            print(
                f"approval -> released in the researcher's server ({args.jobs} jobs, poll every {args.poll} s): "
                f"p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
                f"max {max(latencies):.2f} s"
            )


async def approvals(
    hub: Hub, token: str, rita: requests.Session, work: Path, held: Any, args: argparse.Namespace
) -> list[float]:
    os.environ["JUPYTERHUB_API_TOKEN"] = token
    root = work / "server"
    root.mkdir()
    store = JobStore(f"sqlite:///{work / 'jobs.sqlite'}")
    manager = JobManager(
        root_dir=root,
        data_dir=work / "server-data",
        store=store,
        backend=NoBackend(),
        grants=HubGrantSource(api_url=hub.api_url),
        emit=lambda job: None,
        log=logging.getLogger("bench"),
        airlock_poll_interval=args.poll,
    )
    ids = []
    for _ in range(args.jobs):
        job_id = contract.new_job_id()
        public = manager.keys.create(job_id)
        granted = grant(hub, token, public, job_id)
        granted_id = granted["job_id"]
        result = manager.jobs_dir / granted_id / "result"
        result.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(held(granted))) as tf:
            tf.extractall(result, filter="data")
        store.create(
            Job(id=granted_id, notebook="analysis.ipynb", state="held", receipt=True, review=unsent_review())
        )
        ids.append(granted_id)
    for job_id in ids:  # delivered by the manager itself, as after the enclave ended
        await manager.airlock_step(store.get(job_id))  # type: ignore[arg-type]
    poller = asyncio.create_task(manager._airlock_forever())
    latencies = []
    try:
        for job_id in ids:
            # Reviewers decide whenever they like: not in step with the server's polls.
            await asyncio.sleep(random.uniform(0, args.poll))
            page = await asyncio.to_thread(rita.get, f"{hub.url}/hub/dcr/review/{job_id}", timeout=60)
            form = {"decision": "approve", "comment": "", "_xsrf": xsrf(page.text)}
            r = await asyncio.to_thread(
                rita.post, f"{hub.url}/hub/dcr/review/{job_id}", data=form, allow_redirects=False, timeout=60
            )
            if r.status_code != 302:
                raise RuntimeError(f"approval of {job_id}: {r.status_code} {r.text[:200]}")
            t = time.perf_counter()
            while (store.get(job_id) or Job(id=job_id, notebook="")).state != "released":
                if time.perf_counter() - t > 10 * args.poll + 30:
                    raise RuntimeError(f"{job_id} was not released in the researcher's server")
                await asyncio.sleep(0.02)
            latencies.append(time.perf_counter() - t)
    finally:
        poller.cancel()
        store.close()
    return latencies


if __name__ == "__main__":
    main()
