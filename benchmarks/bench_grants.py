"""Benchmark: grant issuance latency of the hub's grant service under concurrent users, on a real hub.

Starts a real JupyterHub (real configurable-http-proxy, ``tests/hub_harness.py``) with a DCR policy over
two datasets registered by ``dcr provider add`` (the public insurance set and a generated one), creates
``--users`` users (default 20) with one API token each and lets every user request ``--requests`` grants
one after another, all users at once (threads, keep-alive connections), at the hub's own API port as a
user's server does. It prints p50/p95/p99/max latency and throughput of ``POST /hub/api/dcr/grants``, and
the same figures for ``GET /hub/api/user`` with the same tokens and concurrency (JupyterHub's own
token-authenticated API: the floor any hub handler pays). Every grant is verified afterwards (untimed).

``--db postgresql`` keeps the hub's DCR records in a throwaway PostgreSQL server instead of SQLite.
Run from the repository root::

    .venv/bin/python benchmarks/bench_grants.py [--users 20] [--requests 25] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from hub_harness import (  # noqa: E402 - the harness lives with the tests
    INSURANCE_REAL,
    INSURANCE_SYNTHETIC,
    Hub,
    PostgresServer,
    dataset_entry,
    make_csv,
    policy_config,
    register_dataset,
)

from dcr_enclave.formats import contract, sealing  # noqa: E402
from dcr_enclave.formats.grant import verify_grant  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_concurrently(
    tokens: list[str], per_user: int, call: Callable[[requests.Session, str], requests.Response]
) -> tuple[list[float], float, list[requests.Response]]:
    """Each token's requests in sequence, all tokens at once; returns latencies (s), wall time, responses."""
    latencies: list[float] = []
    responses: list[requests.Response] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(tokens) + 1)

    def worker(token: str) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"token {token}"
        mine, got = [], []
        barrier.wait()
        for _ in range(per_user):
            t = time.perf_counter()
            r = call(session, token)
            mine.append(time.perf_counter() - t)
            got.append(r)
        with lock:
            latencies.extend(mine)
            responses.extend(got)

    threads = [threading.Thread(target=worker, args=(tok,)) for tok in tokens]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start, responses


def report(name: str, latencies: list[float], wall: float) -> None:
    ms = [x * 1000 for x in latencies]
    print(
        f"{name:<28} n={len(ms):5d}  p50={percentile(ms, 0.50):7.1f} ms  p95={percentile(ms, 0.95):7.1f} ms  "
        f"p99={percentile(ms, 0.99):7.1f} ms  max={max(ms):7.1f} ms  mean={statistics.fmean(ms):6.1f} ms  "
        f"{len(ms) / wall:6.1f} req/s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--requests", type=int, default=25, help="grant requests per user")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="dcr-bench-grants-") as tmp:
        work = Path(tmp)
        store = work / "store"
        insurance = register_dataset(store, "acme", "insurance", [(INSURANCE_REAL, INSURANCE_SYNTHETIC)])
        real = make_csv(work / "src" / "real" / "visits.csv", 1000, seed=1)
        synthetic = make_csv(work / "src" / "synthetic" / "visits.csv", 1000, seed=2)
        visits = register_dataset(store, "globex", "visits", [(real, synthetic)])
        users = [f"user{i:02d}" for i in range(args.users)]
        datasets = {
            "acme/insurance": dataset_entry(insurance, store, groups=["analysts"]),
            "globex/visits": dataset_entry(visits, store, users=users, release="auto"),
        }
        total = args.users * (args.requests + 1)
        quotas = {
            "concurrent_jobs_per_user": total,
            "jobs_per_day_per_user": total,
            "jobs_per_day_per_dataset": total,
            "grant_requests_per_minute": total,
        }
        pg = PostgresServer().start() if args.db == "postgresql" else None
        try:
            traits = {"quotas": quotas}
            if pg is not None:
                traits["db_url"] = pg.create_database("dcr_bench")
            hub = Hub(work / "hub", config=policy_config(datasets, **traits), groups={"analysts": users})
            with hub:
                tokens = [hub.new_token(u) for u in users]
                api = f"http://127.0.0.1:{hub.hub_port}/hub/api"
                _, public = sealing.generate_keypair()
                key = base64.urlsafe_b64encode(public).rstrip(b"=").decode()

                def grant(session: requests.Session, token: str) -> requests.Response:
                    body = {
                        "job_id": contract.new_job_id(),
                        "bundle_digest": "sha256:" + "ab" * 32,
                        "datasets": [],
                        "output_public_key": key,
                    }
                    return session.post(f"{api}/dcr/grants", data=json.dumps(body), timeout=60)

                def whoami(session: requests.Session, token: str) -> requests.Response:
                    return session.get(f"{api}/user", timeout=60)

                run_concurrently(tokens, 1, grant)  # warm-up: connections, caches, first records
                run_concurrently(tokens, 1, whoami)
                print(
                    f"JupyterHub, {args.users} concurrent users x {args.requests} requests, records in {args.db}"
                )
                lat, wall, responses = run_concurrently(tokens, args.requests, grant)
                report("POST /hub/api/dcr/grants", lat, wall)
                base_lat, base_wall, _ = run_concurrently(tokens, args.requests, whoami)
                report("GET /hub/api/user (floor)", base_lat, base_wall)
                print(f"grant p50 / floor p50: {percentile(lat, 0.5) / percentile(base_lat, 0.5):.2f}x")

                codes = {r.status_code for r in responses}
                assert codes == {201}, f"not every request was granted: {codes}"
                jwks = requests.get(f"{api}/dcr/jwks", timeout=30).json()
                for r in responses:
                    verify_grant(r.json()["grant"], jwks["keys"], hub_key_thumbprint=jwks["thumbprint"])
                print(f"all {len(responses)} grants verified against the hub's published JWKS")
        finally:
            if pg is not None:
                pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
