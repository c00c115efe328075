"""Benchmark: the server extension with a real ``jupyter server`` process and the local enclave host.

The script starts an :class:`~dcr_enclave.platform.host.EnclaveHost` in this process over a temporary
store (``dcr provider add`` of the public insurance file, pinning the host's image) and a real
``jupyter server`` subprocess with the DCR extension (the tests' ``JupyterServer`` helper from
``tests/test_researcher_cli.py``), then measures:

1. **submit → running** and **submit → succeeded** for ``--jobs`` jobs of a trivial notebook (one cell
   counting the lines of the real file, one cell adding numbers), one job at a time. The clock starts
   before ``POST /dcr/api/jobs`` and stops when a websocket subscriber of ``/api/events/subscribe``
   receives the job's ``running`` (the kernel has started on decrypted data) and ``succeeded``
   events, so the figures are what a browser sees. Baseline: the same notebook run ``--jobs`` times with
   plain nbclient in this process (local ``python3`` kernel, the plaintext file), kernel ready and done.
   The phases of the enclave runs are split with timestamps from the host (each state change and cell
   as the host records it) and the POST's own duration (bundle, grant and launch happen inside it).
2. **state change → event at the subscriber**: every job event's ``__timestamp__`` (taken by the server's
   event logger right after the job store committed the change: ``JobManager._update`` stores, then
   emits) against the wall-clock time the subscriber received it. The timestamps come from a file handler
   on the server's ``EventLogger`` (``c.EventLogger.handlers``), as the websocket messages carry none.
   The host → subscriber time (the change at the enclave host to the browser) is reported beside it.
3. **GET /dcr/api/jobs with 10,000 jobs** in the store (``--list-jobs``, inserted through
   :class:`~dcr_server_ext.jobstore.JobStore` directly): ``--list-requests`` requests over one keep-alive
   connection for the first page (default limit 50), the biggest page (500) and the last page; and
   ``JobStore.list`` timed in this process for the same pages, to separate the database from HTTP.

4. **cancel → process tree gone**: ``--cancels`` jobs of a notebook whose second cell sleeps for ten
   minutes, each cancelled (``POST /dcr/api/jobs/<id>/cancel``) once the enclave reports that cell. The
   clock runs from sending the cancel to its answer; the host answers only when the supervisor, the
   sandbox and the kernel (the tree read from ``/proc`` just before) have all ended, and the script checks
   that none of them is left.

Targets: submit → running under 1 s; event under 100 ms; list p95 under 50 ms; cancel under 1 s. Run as root from the
repository root (the enclave's sandbox needs namespaces and a system account)::

    .venv/bin/python benchmarks/bench_server.py [--jobs 20] [--list-jobs 10000] [--list-requests 200] \
        [--cancels 10]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from test_researcher_cli import JupyterServer  # noqa: E402 (the tests' server helper)

from dcr_enclave.commands.main import main as cli_main  # noqa: E402
from dcr_enclave.formats import contract  # noqa: E402
from dcr_enclave.formats.jwk import public_jwk  # noqa: E402
from dcr_enclave.pack.signing_keys import load_or_create_key  # noqa: E402
from dcr_enclave.pack.store import DEV_HUB_KEY_FILE  # noqa: E402
from dcr_enclave.platform.client import HostClient  # noqa: E402
from dcr_enclave.platform.host import EnclaveHost, HostConfig, process_tree  # noqa: E402
from dcr_server_ext.events import EVENT_SCHEMA_ID  # noqa: E402
from dcr_server_ext.jobstore import JobStore  # noqa: E402
from dcr_server_ext.model import Job  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data" / "insurance"
PROVIDER, DATASET = "acme", "insurance"
ENCLAVE_DATA = f"{contract.DATA_ROOT}/{PROVIDER}/{DATASET}/real.csv"
CELLS = [
    "with open({path!r}) as f:\n    rows = sum(1 for _ in f) - 1\nrows",
    "total = sum(range(1000))\ntotal",
]
SUBMIT_RUNNING_TARGET_S = 1.0
EVENT_TARGET_S = 0.100
LIST_TARGET_S = 0.050
CANCEL_TARGET_S = 1.0
SLOW_CELLS = ["print('started')", "import time\nfor _ in range(600):\n    time.sleep(1)"]


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (inclusive interpolation between order statistics)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(p) - 1]


def fmt_ms(values: list[float]) -> str:
    if not values:
        return "(none)"
    return (
        f"p50 {statistics.median(values) * 1000:8.1f} ms   p95 {pct(values, 95) * 1000:8.1f} ms   "
        f"max {max(values) * 1000:8.1f} ms   (n={len(values)})"
    )


def notebook(data_path: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(src.format(path=data_path), id=f"c{i}") for i, src in enumerate(CELLS)
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


# -- the enclave host and the store ---------------------------------------------------------------------


class Host:
    """An in-process enclave host over a fresh store; records each job change as the host makes it."""

    def __init__(self, tmp: Path) -> None:
        self.store = tmp / "store"
        self.keys = self.store / ".keys"
        self.socket = tmp / "host.sock"
        self.hub_key_path = self.keys / DEV_HUB_KEY_FILE
        hub_key = load_or_create_key(self.hub_key_path)
        self.host = EnclaveHost(
            HostConfig(
                state_dir=tmp / "host-state",
                socket_path=self.socket,
                store=self.store,
                keys_dir=self.keys,
                hub_keys=[public_jwk(hub_key)],
            )
        )
        self.host.prepare()
        #: (job id, "state"|"cell", value) -> wall-clock time the host recorded it.
        self.changes: dict[tuple[str, str, Any], float] = {}
        original = self.host._set

        def timed(job: Any, **changes: Any) -> None:
            now = time.time()
            original(job, **changes)
            if "state" in changes:
                self.changes.setdefault((job.job_id, "state", changes["state"]), now)
            if changes.get("cell"):
                self.changes.setdefault((job.job_id, "cell", changes["cell"][0]), now)

        self.host._set = timed  # type: ignore[method-assign]
        #: (job id, op) -> (received, answered) of the supervisor's first request of each kind.
        self.link: dict[tuple[str, str], tuple[float, float]] = {}
        original_link = self.host._link_request

        def timed_link(job: Any, msg: dict[str, Any]) -> dict[str, Any]:
            start = time.time()
            try:
                return original_link(job, msg)
            finally:
                self.link.setdefault((job.job_id, str(msg.get("op"))), (start, time.time()))

        self.host._link_request = timed_link  # type: ignore[method-assign]
        threading.Thread(target=self.host.serve_forever, daemon=True).start()
        for _ in range(500):
            if self.socket.exists():
                break
            time.sleep(0.01)
        HostClient(self.socket).ping()

    def add_dataset(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(
                ["provider", "add", "--store", str(self.store), "--provider", PROVIDER, "--dataset", DATASET,
                 "--real", str(SHARED_DATA / "real.csv"), "--synthetic", str(SHARED_DATA / "synthetic_mst.csv"),
                 "--enclave-digest", self.host.measurement()]
            )  # fmt: skip
        if code != 0:
            raise SystemExit(f"provider add failed: {err.getvalue()}")

    def stop(self) -> None:
        self.host.shutdown()


# -- 1. the plain baseline ------------------------------------------------------------------------------


def run_plain(work: Path) -> tuple[float, float]:
    """nbclient in this process: (kernel ready, all cells done), seconds from the start."""
    work.mkdir()
    nb = notebook(str(SHARED_DATA / "real.csv"))
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    start = time.perf_counter()
    # The kernel's stderr only carries its warning about unencrypted loopback TCP; keep the report clean.
    with client.setup_kernel(stderr=subprocess.DEVNULL):
        ready = time.perf_counter() - start
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    return ready, time.perf_counter() - start


# -- 2. the jobs through the server ---------------------------------------------------------------------


@dataclass
class Subscriber:
    """A websocket subscriber of the server's event bus; keeps (receive time, message) per job."""

    conn: Any
    received: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, server: JupyterServer) -> Subscriber:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        request = HTTPRequest(
            f"ws://127.0.0.1:{server.port}/api/events/subscribe",
            headers={"Authorization": f"token {server.token}"},
        )
        sub = cls(await websocket_connect(request))
        sub.task = asyncio.create_task(sub._read())
        return sub

    async def _read(self) -> None:
        while (raw := await self.conn.read_message()) is not None:
            now = time.time()
            msg = json.loads(raw)
            if msg.get("schema_id") != EVENT_SCHEMA_ID:
                continue
            self.received[msg["job_id"]].append((now, msg))
            async with self.changed:
                self.changed.notify_all()

    def first(self, job_id: str, state: str) -> float | None:
        return next((t for t, m in self.received.get(job_id, []) if m["state"] == state), None)

    async def wait_for(
        self, job_id: str, states: frozenset[str] | set[str], timeout: float = 300
    ) -> dict[str, Any]:
        async def ended() -> dict[str, Any]:
            async with self.changed:
                while True:
                    for _t, m in self.received.get(job_id, []):
                        if m["state"] in states:
                            return m
                    await self.changed.wait()

        return await asyncio.wait_for(ended(), timeout)


@dataclass
class JobRun:
    job_id: str
    submitted: float  # wall clock before POST
    posted: float  # POST answered (bundle, grant and launch done)
    running: float | None
    succeeded: float | None
    state: str


def post_job(server: JupyterServer, path: str) -> dict[str, Any]:
    status, job = server.api("POST", "dcr/api/jobs", {"path": path})
    if status != 201 or not isinstance(job, dict):
        raise SystemExit(f"submit failed ({status}): {job}\n{server.log_tail()}")
    return job


async def run_jobs(server: JupyterServer, count: int) -> tuple[Subscriber, list[JobRun]]:
    nbformat.write(notebook(ENCLAVE_DATA), server.root / "trivial.ipynb")
    sub = await Subscriber.connect(server)
    runs = []
    for i in range(count):
        submitted = time.time()
        job = await asyncio.to_thread(post_job, server, "trivial.ipynb")
        posted = time.time()
        end = await sub.wait_for(job["id"], contract.TERMINAL_STATES)
        runs.append(
            JobRun(
                job["id"],
                submitted,
                posted,
                sub.first(job["id"], "running"),
                sub.first(job["id"], "succeeded"),
                end["state"],
            )
        )
        print(f"  job {i + 1:2d}/{count}: {end['state']}", file=sys.stderr, flush=True)
    # Let the last events of the last job arrive and the event log reach the disk.
    await asyncio.sleep(0.5)
    sub.conn.close()
    return sub, runs


def parse_timestamp(value: str) -> float:
    # jupyter_events writes datetime.isoformat() + "Z" of an aware UTC time: "...+00:00Z".
    return datetime.fromisoformat(value.removesuffix("Z")).timestamp()


def event_latencies(sub: Subscriber, event_log: Path) -> list[float]:
    """Receive time minus ``__timestamp__`` of every event, matched in order per (job, state, cell, cells)."""
    stamps: dict[tuple[Any, ...], deque[float]] = defaultdict(deque)
    for line in event_log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("__schema__") != EVENT_SCHEMA_ID:
            continue
        stamps[(rec["job_id"], rec["state"], rec["cell"], rec["cells"])].append(
            parse_timestamp(rec["__timestamp__"])
        )
    out = []
    for job_id, msgs in sub.received.items():
        for received, m in msgs:
            queue = stamps.get((job_id, m["state"], m["cell"], m["cells"]))
            if queue:
                out.append(received - queue.popleft())
    return out


def host_latencies(sub: Subscriber, host: Host) -> list[float]:
    """Receive time minus the host's own time of the change, for the changes that start at the host
    (``running``, each cell, ``checking``, the end; ``submitted`` to ``launching`` are the server's own)."""
    out = []
    for job_id, msgs in sub.received.items():
        seen: set[tuple[str, str, Any]] = set()
        for received, m in msgs:
            if m["state"] in ("submitted", "granted", "launching"):
                continue
            if m["state"] == "running" and m["cell"] is not None:
                key = (job_id, "cell", m["cell"])
            else:
                key = (job_id, "state", m["state"])
            if key not in seen and key in host.changes:
                seen.add(key)
                out.append(received - host.changes[key])
    return out


# -- 3. listing 10,000 jobs -----------------------------------------------------------------------------


def fill_store(db_url: str, count: int) -> float:
    """Insert ``count`` finished jobs through JobStore; returns the seconds it took."""
    store = JobStore(db_url)
    base = time.time() - 86400
    start = time.perf_counter()
    try:
        for i in range(count):
            job = Job(
                id=contract.new_job_id(),
                notebook=f"work/analysis-{i % 97}.ipynb",
                state="succeeded",
                created=base + i * 0.5,
                updated=base + i * 0.5 + 3,
                bundle_digest="sha256:" + f"{i:064x}"[-64:],
                bundle_files=3,
                bundle_bytes=20_000,
                datasets=[
                    {
                        "provider": PROVIDER,
                        "dataset": DATASET,
                        "version": "sha256:" + "a" * 64,
                        "release": "auto",
                    }
                ],
                grant_id="grant-" + f"{i:032x}",
                backend="dcr_server_ext.backends.local.LocalBackend",
                backend_ref={"host_job": "x", "socket": "/run/dcr/enclave-host.sock"},
                cell=1,
                cells=2,
                outputs_path=f"dcr-jobs/job-{i:024x}",
                receipt=True,
                enclave={"kind": "local", "simulated": True, "image_digest": "sha256:" + "b" * 64},
            )
            store.create(job)
        return time.perf_counter() - start
    finally:
        store.close()


def time_list_http(server: JupyterServer, query: str, requests: int) -> tuple[list[float], int]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Authorization": f"token {server.token}"}
    times, size = [], 0
    try:
        for i in range(requests + 5):
            start = time.perf_counter()
            conn.request("GET", f"/dcr/api/jobs{query}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            elapsed = time.perf_counter() - start
            if resp.status != 200:
                raise SystemExit(f"GET /dcr/api/jobs{query}: {resp.status} {body[:200]!r}")
            if i >= 5:  # the first few warm the connection and the server's caches
                times.append(elapsed)
            size = len(body)
    finally:
        conn.close()
    return times, size


def time_list_store(db_url: str, offset: int, limit: int, requests: int) -> list[float]:
    store = JobStore(db_url)
    try:
        times = []
        for i in range(requests + 5):
            start = time.perf_counter()
            store.list(offset, limit)
            if i >= 5:
                times.append(time.perf_counter() - start)
        return times
    finally:
        store.close()


# -- the report -----------------------------------------------------------------------------------------


# -- 4. cancel -------------------------------------------------------------------------------------------


def time_cancels(server: JupyterServer, host: Host, count: int) -> tuple[list[float], list[int], int]:
    """(seconds from cancel sent to answered, processes in each job's tree, processes left after answers)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src, id=f"s{i}") for i, src in enumerate(SLOW_CELLS)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, server.root / "slow.ipynb")
    times, sizes, left = [], [], 0
    for i in range(count):
        job_id = post_job(server, "slow.ipynb")["id"]
        deadline = time.monotonic() + 120
        while True:
            status, job = server.api("GET", f"dcr/api/jobs/{job_id}")
            assert status == 200 and isinstance(job, dict), job
            if (job.get("progress") or {}).get("cell") == 1:
                break
            if job["state"] in contract.TERMINAL_STATES or time.monotonic() > deadline:
                raise SystemExit(f"slow job {job_id} never reached its second cell: {job}")
            time.sleep(0.05)
        proc = host.host.jobs[job_id].proc
        assert proc is not None
        tree = process_tree(proc.pid)
        start = time.perf_counter()
        status, answer = server.api("POST", f"dcr/api/jobs/{job_id}/cancel")
        times.append(time.perf_counter() - start)
        if status != 200:
            raise SystemExit(f"cancel of {job_id} answered {status}: {answer}")
        left += len(set(tree) & set(process_tree(1)))
        sizes.append(len(tree))
        print(f"  cancel {i + 1:2d}/{count}: {times[-1] * 1000:.0f} ms", file=sys.stderr, flush=True)
    return times, sizes, left


def verdict(value: float, target: float) -> str:
    return f"{'met' if value < target else 'MISSED'} (target < {target * 1000:.0f} ms)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs (and baseline runs) to time")
    parser.add_argument("--list-jobs", type=int, default=10_000, help="jobs in the store for the list test")
    parser.add_argument("--list-requests", type=int, default=200, help="GET requests per page shape")
    parser.add_argument("--cancels", type=int, default=10, help="long-running jobs to cancel")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the enclave sandbox needs namespaces and a system account")

    tmp = Path(tempfile.mkdtemp(prefix="dcr-bench-server-"))
    host: Host | None = None
    server: JupyterServer | None = None
    try:
        print("starting the enclave host and the jupyter server ...", file=sys.stderr)
        host = Host(tmp)
        host.add_dataset()
        server = JupyterServer(tmp / "jupyter", host.socket, host.hub_key_path, host.store)
        event_log = tmp / "events.jsonl"
        with open(server.config, "a") as f:
            f.write(f"import logging\nc.EventLogger.handlers = [logging.FileHandler({str(event_log)!r})]\n")
        server.start()

        print(f"baseline: {args.jobs} plain nbclient runs ...", file=sys.stderr)
        plain = [run_plain(tmp / f"plain-{i}") for i in range(args.jobs)]

        print(f"enclave: {args.jobs} jobs through the server ...", file=sys.stderr)
        sub, runs = asyncio.run(run_jobs(server, args.jobs))
        failed = [r for r in runs if r.state != "succeeded"]
        if failed:
            raise SystemExit(f"{len(failed)} job(s) did not succeed: {failed[0]}\n{server.log_tail()}")
        events = event_latencies(sub, event_log)
        from_host = host_latencies(sub, host)

        db_url = f"sqlite:///{server.data_dir / 'jobs.sqlite'}"
        print(f"list: inserting {args.list_jobs} jobs through JobStore ...", file=sys.stderr)
        fill_seconds = fill_store(db_url, args.list_jobs)
        total_jobs = args.list_jobs + len(runs)
        last_offset = max(total_jobs - 50, 0)
        shapes = [("first page (limit 50)", "", 0, 50), ("limit 500", "?limit=500", 0, 500),
                  (f"last page (offset {last_offset})", f"?offset={last_offset}", last_offset, 50)]  # fmt: skip
        listing = []
        for label, query, offset, limit in shapes:
            http_times, size = time_list_http(server, query, args.list_requests)
            store_times = time_list_store(db_url, offset, limit, args.list_requests)
            listing.append((label, http_times, size, store_times))

        print(f"cancel: {args.cancels} long-running jobs ...", file=sys.stderr)
        cancels, tree_sizes, left = time_cancels(server, host, args.cancels)

        # -- report -------------------------------------------------------------------------------------
        to_running = [r.running - r.submitted for r in runs if r.running]
        to_done = [r.succeeded - r.submitted for r in runs if r.succeeded]
        post = [r.posted - r.submitted for r in runs]
        posted_to_running = [r.running - r.posted for r in runs if r.running]
        host_phase: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            ch = {k[2]: v for k, v in host.changes.items() if k[0] == r.job_id and k[1] == "state"}
            link = {k[1]: v for k, v in host.link.items() if k[0] == r.job_id}
            if not (
                {"launching", "running", "succeeded"} <= set(ch)
                and {"progress", "challenge", "release"} <= set(link)
            ):
                continue
            phases = [
                ("POST sent -> host launching (bundle, grant, host launch)", r.submitted, ch["launching"]),
                (
                    "host launching -> supervisor's first request (boot, imports, grant)",
                    ch["launching"],
                    link["progress"][0],
                ),
                (
                    "  -> key challenge (unpack bundle, sandbox check)",
                    link["progress"][0],
                    link["challenge"][0],
                ),
                (
                    "  -> data key released (attestation token, key release)",
                    link["challenge"][0],
                    link["release"][1],
                ),
                ("  -> host running (decrypt into /data, kernel ready)", link["release"][1], ch["running"]),
                (
                    "host running -> host succeeded (kernel, cells, outputs, receipt)",
                    ch["running"],
                    ch["succeeded"],
                ),
            ]
            if r.succeeded:
                phases.append(
                    ("host succeeded -> subscriber succeeded (collect, open)", ch["succeeded"], r.succeeded)
                )
            for label, a, b in phases:
                host_phase[label].append(b - a)
        p_ready = [p[0] for p in plain]
        p_done = [p[1] for p in plain]

        print()
        print(
            f"DCR server extension benchmark ({args.jobs} jobs, trivial 2-cell notebook reading {ENCLAVE_DATA})"
        )
        print()
        print("1. submit -> state, seen by a websocket subscriber of /api/events/subscribe")
        print(
            f"   submit -> running        {fmt_ms(to_running)}   {verdict(pct(to_running, 95), SUBMIT_RUNNING_TARGET_S)}"
        )
        print(f"   submit -> succeeded      {fmt_ms(to_done)}")
        print(f"   POST /dcr/api/jobs       {fmt_ms(post)}   (bundle, grant, launch; answers 'launching')")
        print(f"   POST answered -> running {fmt_ms(posted_to_running)}")
        for label, values in host_phase.items():
            print(f"     {label:<70s} {fmt_ms(values)}")
        print("   baseline: plain nbclient, same notebook, plaintext file")
        print(f"   kernel ready             {fmt_ms(p_ready)}")
        print(f"   all cells done           {fmt_ms(p_done)}")
        ratio = statistics.median(to_done) / statistics.median(p_done)
        print(f"   enclave / plain (p50 submit->succeeded over p50 plain run): {ratio:.2f}x")
        print()
        print("2. state change -> event at the subscriber")
        print(f"   store commit (event __timestamp__) -> received  {fmt_ms(events)}   "
              f"{verdict(pct(events, 95), EVENT_TARGET_S)}")  # fmt: skip
        print(f"   change at the enclave host -> received          {fmt_ms(from_host)}")
        print()
        print(
            f"3. GET /dcr/api/jobs with {total_jobs} jobs in the store ({args.list_jobs} inserted in {fill_seconds:.1f} s)"
        )
        for label, http_times, size, store_times in listing:
            print(
                f"   {label:<26s} HTTP     {fmt_ms(http_times)}   {size // 1024} KiB   {verdict(pct(http_times, 95), LIST_TARGET_S)}"
            )
            print(f"   {'':<26s} JobStore {fmt_ms(store_times)}")
        print()
        print(
            f"4. cancel of a running job ({args.cancels} jobs, {min(tree_sizes)}-{max(tree_sizes)} processes each)"
        )
        print(
            f"   cancel sent -> answered   {fmt_ms(cancels)}   {verdict(pct(cancels, 95), CANCEL_TARGET_S)}"
        )
        print(f"   processes of the cancelled trees still running after the answers: {left}")
        return 0 if left == 0 else 1
    finally:
        if server is not None:
            server.stop()
        if host is not None:
            host.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
