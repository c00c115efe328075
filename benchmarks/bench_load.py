"""Benchmark: one researcher's server under a burst of concurrent enclave jobs.

A real ``dcr enclave-host`` (a subprocess, as root runs it) over a fresh store (``dcr provider add`` of the
public insurance file, pinning the host's image) and a real ``jupyter server`` subprocess with the DCR
extension (the tests' ``JupyterServer`` helper from ``tests/test_researcher_cli.py``). For each burst size
N (``--bursts``, default 10, 25, 50) the script

1. measures ``GET /dcr/api/jobs`` on the **idle** server (``--idle-requests`` requests, one keep-alive
   connection, one every ``--interval`` seconds): the baseline, in the same run;
2. submits N jobs **at once** (N threads released together, each one ``POST /dcr/api/jobs``) of a
   notebook that reads the real file and then keeps its kernel busy on the CPU for ``--busy`` seconds, so
   that all N are running together;
3. while they run, measures the same ``GET /dcr/api/jobs`` every ``--interval`` seconds, samples the
   machine's memory in use (``MemTotal - MemAvailable``) and the server's resident memory, and polls the
   job list until every job has ended;
4. reports: jobs lost (a submit that was not a 201, or a job missing from the list or not ended within
   ``--bound`` seconds), how the jobs ended, the submit times, the time from the first submit to the last
   job's end, the peak memory (above the idle machine's), and the list's p50/p95/max idle and under load.

Target at N = 50: no job lost, ``GET /dcr/api/jobs`` p95 under load under 200 ms. Run as root from the
repository root (the enclave's sandbox needs namespaces and a system account)::

    .venv/bin/python benchmarks/bench_load.py [--bursts 10 25 50] [--busy 10] [--interval 0.1]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from test_researcher_cli import JupyterServer  # noqa: E402 (the tests' server helper)

from dcr_enclave.commands.main import main as cli_main  # noqa: E402
from dcr_enclave.formats import contract  # noqa: E402
from dcr_enclave.formats.errors import DCRError  # noqa: E402
from dcr_enclave.formats.jwk import public_jwk  # noqa: E402
from dcr_enclave.pack.signing_keys import load_or_create_key  # noqa: E402
from dcr_enclave.pack.store import DEV_HUB_KEY_FILE  # noqa: E402
from dcr_enclave.platform.client import HostClient  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data" / "insurance"
PROVIDER, DATASET = "acme", "insurance"
ENCLAVE_DATA = f"{contract.DATA_ROOT}/{PROVIDER}/{DATASET}/real.csv"
LIST_P95_TARGET_S = 0.200


def pct(values: list[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(p) - 1]


def fmt_ms(values: list[float]) -> str:
    if not values:
        return "(none)"
    return (
        f"p50 {statistics.median(values) * 1000:7.1f} ms  p95 {pct(values, 95) * 1000:7.1f} ms  "
        f"max {max(values) * 1000:7.1f} ms  (n={len(values)})"
    )


def busy_notebook(seconds: float) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    cells = [
        f"with open({ENCLAVE_DATA!r}) as f:\n    rows = sum(1 for _ in f) - 1",
        f"import time\nt = time.time()\nwhile time.time() - t < {seconds}:\n    sum(range(10_000))\nrows",
    ]
    nb.cells = [nbformat.v4.new_code_cell(src, id=f"c{i}") for i, src in enumerate(cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


# -- the enclave host, as a process of its own ------------------------------------------------------------


class HostProcess:
    """``python -m dcr_enclave enclave-host`` over a fresh store."""

    def __init__(self, tmp: Path, extra: list[str]) -> None:
        self.extra = extra
        self.store = tmp / "store"
        self.keys = self.store / ".keys"
        self.hub_key_path = self.keys / DEV_HUB_KEY_FILE
        self.socket = tmp / "host.sock"
        self.state = tmp / "host-state"
        self.log = tmp / "host.log"
        hub_key = load_or_create_key(self.hub_key_path)
        self.hub_jwks = tmp / "hub-jwks.json"
        self.hub_jwks.write_text(json.dumps({"keys": [public_jwk(hub_key)]}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        cmd = [
            sys.executable, "-m", "dcr_enclave", "enclave-host", "--store", str(self.store),
            "--hub-key", str(self.hub_jwks), "--state", str(self.state), "--socket", str(self.socket),
            "--allow-visible-processes",  # a benchmark machine: no untrusted account logs in
            *self.extra,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        client = HostClient(self.socket)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the enclave host exited:\n{self.log.read_text()[-3000:]}")
            try:
                return str(client.ping()["image_digest"])
            except DCRError:
                if time.monotonic() > deadline:
                    raise SystemExit("the enclave host did not answer") from None
                time.sleep(0.1)

    def add_dataset(self, image_digest: str) -> None:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(
                ["provider", "add", "--store", str(self.store), "--provider", PROVIDER, "--dataset", DATASET,
                 "--real", str(SHARED_DATA / "real.csv"), "--synthetic", str(SHARED_DATA / "synthetic_mst.csv"),
                 "--enclave-digest", image_digest]
            )  # fmt: skip
        if code != 0:
            raise SystemExit(f"provider add failed: {err.getvalue()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- measuring ----------------------------------------------------------------------------------------------


class Api:
    """One keep-alive HTTP connection to the server (one per thread)."""

    def __init__(self, server: JupyterServer) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        self.headers = {"Authorization": f"token {server.token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        start = time.perf_counter()
        self.conn.request(method, path, body=data, headers=self.headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        elapsed = time.perf_counter() - start
        return resp.status, json.loads(raw or b"null"), elapsed

    def close(self) -> None:
        self.conn.close()


def probe_list(
    server: JupyterServer, stop: threading.Event, interval: float, limit: int | None
) -> list[float]:
    """``GET /dcr/api/jobs`` every ``interval`` seconds until ``stop`` (or ``limit`` requests)."""
    api = Api(server)
    times: list[float] = []
    try:
        for _ in range(3):  # warm the connection
            api.call("GET", "/dcr/api/jobs")
        while not stop.is_set() and (limit is None or len(times) < limit):
            status, _body, elapsed = api.call("GET", "/dcr/api/jobs")
            if status != 200:
                raise SystemExit(f"GET /dcr/api/jobs answered {status}")
            times.append(elapsed)
            stop.wait(interval)
    finally:
        api.close()
    return times


def memory_in_use() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Burst:
    n: int
    idle: list[float]
    loaded: list[float] = field(default_factory=list)
    submits: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    ended: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    to_all_ended: float = 0.0
    peak_memory: int = 0
    peak_server_rss: int = 0


def run_burst(server: JupyterServer, n: int, args: argparse.Namespace) -> Burst:
    assert server.proc is not None
    idle = probe_list(server, threading.Event(), args.interval, args.idle_requests)
    burst = Burst(n, idle)
    baseline_memory = memory_in_use()
    stop = threading.Event()
    samples: list[tuple[int, int]] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append((memory_in_use() - baseline_memory, rss(server.proc.pid) if server.proc else 0))
            stop.wait(0.2)

    loaded: list[float] = []
    prober = threading.Thread(target=lambda: loaded.extend(probe_list(server, stop, args.interval, None)))
    sampler = threading.Thread(target=sample)
    go = threading.Barrier(n + 1)
    job_ids: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        api = Api(server)
        try:
            go.wait()
            try:
                status, body, elapsed = api.call("POST", "/dcr/api/jobs", {"path": "busy.ipynb"})
            except OSError as e:
                with lock:
                    burst.refused.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                burst.submits.append(elapsed)
                if status == 201 and isinstance(body, dict):
                    job_ids.append(body["id"])
                else:
                    burst.refused.append(f"{status}: {body}")
        finally:
            api.close()

    submitters = [threading.Thread(target=submit) for _ in range(n)]
    for t in (*submitters, sampler):
        t.start()
    prober.start()
    go.wait()
    start = time.monotonic()
    for t in submitters:
        t.join()
    poller = Api(server)
    try:
        while time.monotonic() - start < args.bound:
            _status, listing, _elapsed = poller.call("GET", "/dcr/api/jobs?limit=500")
            states = {j["id"]: j["state"] for j in listing["jobs"]}
            ended = {j: states[j] for j in job_ids if states.get(j) in contract.TERMINAL_STATES}
            if len(ended) == len(job_ids):
                burst.to_all_ended = time.monotonic() - start
                break
            time.sleep(0.5)
        burst.ended = ended
        burst.missing = [j for j in job_ids if j not in states or j not in ended]
    finally:
        poller.close()
        stop.set()
        prober.join()
        sampler.join()
    burst.loaded = loaded
    burst.peak_memory = max((m for m, _ in samples), default=0)
    burst.peak_server_rss = max((r for _, r in samples), default=0)
    return burst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, nargs="+", default=[10, 25, 50], help="jobs per burst")
    parser.add_argument("--busy", type=float, default=10.0, help="seconds each job's kernel keeps a CPU busy")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between list requests")
    parser.add_argument("--idle-requests", type=int, default=100, help="list requests on the idle server")
    parser.add_argument(
        "--bound", type=float, default=1200.0, help="seconds after which a job counts as lost"
    )
    parser.add_argument(
        "--host-arg",
        action="append",
        default=[],
        help="an extra argument for `dcr enclave-host`, e.g. --host-arg=--job-nice=0 "
        "--host-arg=--job-cpu-weight=100 to run the jobs at the servers' priority (for comparison)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the enclave sandbox needs namespaces and a system account")

    tmp = Path(tempfile.mkdtemp(prefix="dcr-bench-load-"))
    host = HostProcess(tmp, args.host_arg)
    server: JupyterServer | None = None
    results: list[Burst] = []
    try:
        print("starting the enclave host and the jupyter server ...", file=sys.stderr)
        host.add_dataset(host.start())
        server = JupyterServer(tmp / "jupyter", host.socket, host.hub_key_path, host.store)
        server.start()
        nbformat.write(busy_notebook(args.busy), server.root / "busy.ipynb")
        for n in args.bursts:
            print(f"burst of {n} jobs ...", file=sys.stderr, flush=True)
            results.append(run_burst(server, n, args))
    finally:
        if server is not None:
            server.stop()
        host.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"DCR load benchmark: N jobs submitted at once to one server, each kernel busy {args.busy:g} s "
          f"on a CPU ({os.cpu_count()} CPUs); host arguments: {' '.join(args.host_arg) or '(defaults)'}")  # fmt: skip
    missed = False
    for b in results:
        lost = len(b.refused) + len(b.missing)
        outcome = ", ".join(f"{s} {list(b.ended.values()).count(s)}" for s in sorted(set(b.ended.values())))
        print()
        print(f"N = {b.n}")
        print(
            f"  lost jobs                 {lost}  (refused submits {len(b.refused)}, not ended {len(b.missing)})"
        )
        print(f"  ended                     {outcome or '(none)'}")
        print(f"  POST /dcr/api/jobs        {fmt_ms(b.submits)}")
        print(f"  first submit -> all ended {b.to_all_ended:7.1f} s")
        print(f"  peak memory above idle    {b.peak_memory / 2**30:7.2f} GiB   "
              f"(server RSS peak {b.peak_server_rss / 2**20:.0f} MiB)")  # fmt: skip
        print(f"  GET /dcr/api/jobs idle    {fmt_ms(b.idle)}")
        print(f"  GET /dcr/api/jobs loaded  {fmt_ms(b.loaded)}")
        for r in b.refused[:3]:
            print(f"    refused: {r[:200]}")
        if b.n == 50:
            ok = lost == 0 and b.loaded and pct(b.loaded, 95) < LIST_P95_TARGET_S
            missed |= not ok
            print(
                f"  target (0 lost, loaded p95 < {LIST_P95_TARGET_S * 1000:.0f} ms): {'met' if ok else 'MISSED'}"
            )
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
