"""Benchmark: one page of the job list from a SQLite job store holding 10,000 jobs.

The script fills a fresh :class:`~dcr_server_ext.jobstore.JobStore` (SQLite file in a temporary directory,
deleted afterwards) with ``--jobs`` jobs shaped like real ones (datasets, backend reference, progress, a
failure for some, enclave details for finished ones), then times, ``--repeat`` times each and interleaved:

* **store.list**: ``JobStore.list(0, 50)``: the total count plus the newest 50 rows in one read
  transaction, decoded into :class:`~dcr_server_ext.model.Job` records (what ``GET /dcr/api/jobs`` asks of
  the store);
* **list + API JSON**: the same plus ``to_api()`` of each job and ``json.dumps`` of the response body (the
  handler's work short of HTTP);
* **raw sqlite3** (baseline): ``SELECT * FROM dcr_jobs ORDER BY created DESC, id DESC LIMIT 50`` with
  ``fetchall()`` on a plain :mod:`sqlite3` connection to the same file (no count, no decoding).

It prints p50 and p95 of each (nearest rank) and the ratio to the baseline. Target: store.list p95 under
50 ms. Run from the repository root::

    .venv/bin/python benchmarks/bench_job_list.py [--jobs 10000] [--repeat 200]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcr_enclave.formats.contract import JOB_STATES, new_job_id
from dcr_server_ext.jobstore import TABLE_NAME, JobStore
from dcr_server_ext.model import Job

PAGE = 50
TARGET_P95_MS = 50.0


def make_job(rng: random.Random, created: float) -> Job:
    state = rng.choice(JOB_STATES)
    cells = rng.randint(1, 40)
    finished = state in ("succeeded", "released", "failed", "held", "rejected")
    return Job(
        id=new_job_id(),
        notebook=f"projects/p{rng.randint(0, 20)}/analysis-{rng.randint(0, 999)}.ipynb",
        state=state,
        created=created,
        updated=created + rng.uniform(0, 600),
        bundle_digest="sha256:" + rng.randbytes(32).hex(),
        bundle_files=rng.randint(1, 500),
        bundle_bytes=rng.randint(1_000, 50_000_000),
        datasets=[
            {
                "provider": "acme",
                "dataset": f"d{i}",
                "version": "sha256:" + rng.randbytes(32).hex(),
                "release": "review",
            }
            for i in range(rng.randint(1, 3))
        ],
        grant_id="grant-" + rng.randbytes(16).hex(),
        backend="dcr_server_ext.backends.local.LocalBackend",
        backend_ref={"host_job": new_job_id(), "socket": "/run/dcr/enclave-host.sock"},
        cell=rng.randint(0, cells - 1) if state != "submitted" else None,
        cells=cells if state != "submitted" else None,
        failure={"reason": "ValueError in cell 3", "cell": 3, "ename": "ValueError"}
        if state == "failed"
        else None,
        outputs_path=f"dcr-jobs/{new_job_id()}" if finished else None,
        receipt=finished,
        enclave={"kind": "local", "simulated": True, "image_digest": "sha256:" + "0" * 64}
        if finished
        else None,
    )


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dcr-bench-jobs-"))
    try:
        path = tmp / "dcr" / "jobs.sqlite"
        store = JobStore(f"sqlite:///{path}")
        rng = random.Random(7)
        t0 = time.perf_counter()
        base = time.time() - args.jobs * 60.0
        for i in range(args.jobs):
            store.create(make_job(rng, base + i * 60.0 + rng.uniform(0, 30)))
        fill = time.perf_counter() - t0

        raw = sqlite3.connect(path)
        # The same page the store returns: the cases must agree before their times mean anything.
        raw_sql = f"SELECT * FROM {TABLE_NAME} ORDER BY created DESC, id DESC LIMIT {PAGE}"  # noqa: S608
        page, total = store.list(0, PAGE)
        assert total == args.jobs and [r[0] for r in raw.execute(raw_sql).fetchall()] == [j.id for j in page]

        def store_list() -> Any:
            return store.list(0, PAGE)

        def api_body() -> Any:
            jobs, n = store.list(0, PAGE)
            return json.dumps({"jobs": [j.to_api() for j in jobs], "total": n, "offset": 0, "limit": PAGE})

        def raw_select() -> Any:
            return raw.execute(raw_sql).fetchall()

        cases: dict[str, Callable[[], Any]] = {
            "store.list(0, 50)": store_list,
            "list + API JSON": api_body,
            "raw sqlite3 SELECT": raw_select,
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():  # warm the page cache and the statement caches
            fn()
        for _ in range(args.repeat):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1000)
        raw.close()
        store.close()

        baseline = percentile(times["raw sqlite3 SELECT"], 50)
        print(
            f"== job list: {args.jobs} jobs in SQLite (filled in {fill:.1f} s), page of {PAGE}, {args.repeat} runs"
        )
        print(f"{'case':<22} {'p50 ms':>8} {'p95 ms':>8} {'p50 / raw':>10}")
        for name, samples in times.items():
            p50, p95 = percentile(samples, 50), percentile(samples, 95)
            print(f"{name:<22} {p50:8.3f} {p95:8.3f} {p50 / baseline:10.1f}")
        p95 = percentile(times["store.list(0, 50)"], 95)
        verdict = "met" if p95 < TARGET_P95_MS else "MISSED"
        print(f"target store.list p95 < {TARGET_P95_MS:.0f} ms: {verdict} ({p95:.2f} ms)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
