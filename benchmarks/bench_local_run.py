"""Benchmark: a notebook run through the local enclave (``dcr local-run``) against the same notebook run plainly.

For each data set (the public insurance file, read in place, and a bigger file resampled from it with a
fixed seed into a temporary directory) the script:

1. starts an :class:`~dcr_enclave.platform.host.EnclaveHost` in this process (its own state directory and
   socket, like the tests' ``host`` fixture) and registers the data set with ``dcr provider add`` into a
   temporary store, pinning the host's image;
2. runs a notebook that does CPU-bound pandas/numpy work on the data (repeated groupbys, quantiles and a
   small matrix product), its repeat count calibrated with one plain run so that the plain run takes about
   ``--target`` seconds, alternately

   * **plain**: nbclient in this process, a local ``python3`` kernel, the plaintext CSV;
   * **enclave**: bundle + grant, then ``launch`` on the host, the watch stream to the terminal state,
     fetching the result and opening the sealed outputs (the timed span starts at ``launch``).

   The notebook text is the same in both; only the data path differs (the enclave reads
   ``/data/<provider>/<dataset>/<file>``). The notebook times its own work cell, so the kernels' speeds
   can be compared apart from the fixed costs; the same notebook with no work (repeat 0) gives those fixed
   costs. The outputs of the two paths are compared;
3. timestamps the watch stream's events as they arrive and the supervisor's requests to the host
   (challenge, token, key release, progress) as the host answers them, and reports the time from
   ``launch`` returning to ``running`` (the sandboxed kernel has started on decrypted data) and the phases.
   The supervisor starts the kernel right after the sandbox probe, while keys are released and data
   decrypted, so "released -> running" is whichever of decryption and the rest of the kernel start ends
   last.

Finally it times, in this process, the pieces that the timeline cannot separate: decrypting a copy of each
data set with :func:`~dcr_enclave.formats.streamcrypt.decrypt_file` (into /dev/shm, like the enclave's tmpfs),
measuring the image, the supervisor's imports from the image and from a byte-compiled copy of it, the
sandbox probe (:func:`~dcr_enclave.runtime.kernel_process.check_sandbox`) and what it imports, and a plain kernel start.

Times are medians over ``--repeat`` runs with the minimum and maximum beside them (the maximum of three
stands in for a p95). Targets: enclave/plain at most 1.10; launch to running under 1 s plus decryption.
On a shared two-core machine the work cell alone varies by 10-20 % from run to run, so the fixed overhead
(no-work notebook) is the steadier figure. Everything temporary is deleted. Run as root from the
repository root::

    .venv/bin/python benchmarks/bench_local_run.py [--repeat 3] [--rows 200000] [--target 5]
"""

from __future__ import annotations

import argparse
import compileall
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
from nbclient import NotebookClient

from dcr_enclave.commands.main import main as cli_main
from dcr_enclave.formats import contract
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.formats.jwk import public_jwk
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.formats.streamcrypt import FileContext, decrypt_file, encrypt_file
from dcr_enclave.formats.unsealing import open_dir
from dcr_enclave.pack.bundle_builder import build_bundle
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import load_or_create_key
from dcr_enclave.pack.store import DEV_HUB_KEY_FILE, Store
from dcr_enclave.platform.client import HostClient
from dcr_enclave.platform.host import EnclaveHost, HostConfig
from dcr_enclave.runtime.kernel_layout import SandboxSpec
from dcr_enclave.runtime.kernel_process import check_sandbox

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "insurance"
PROVIDER = "bench"
RATIO_TARGET = 1.10
LAUNCH_TARGET_S = 1.0

# The notebook. Cell ids are fixed so that the text is the same in every run of one data set.
SETUP_CELL = "import time\n\nimport numpy as np\nimport pandas as pd\n\nDATA = {data!r}\nREPEAT = {repeat}\ndf = pd.read_csv(DATA)\nlen(df)"
WORK_CELL = """\
started = time.perf_counter()
acc = []
for _ in range(REPEAT):
    d = df.assign(
        age_band=pd.cut(df["age"], bins=[0, 30, 45, 60, 120]),
        bmi_z=(df["bmi"] - df["bmi"].mean()) / df["bmi"].std(),
    )
    g = d.groupby(["region", "smoker", "age_band"], observed=True)["charges"].agg(["count", "mean", "std", "median"])
    q = d.groupby("sex")["bmi_z"].quantile([0.1, 0.5, 0.9])
    m = d[["age", "bmi", "children", "charges"]].to_numpy()
    acc.append(float(g["mean"].sum() + q.sum() + np.linalg.norm(m.T @ m)))
work_seconds = time.perf_counter() - started
len(acc)"""
SUMMARY_CELL = """\
summary = pd.DataFrame({"checksum": acc}, dtype=float).describe()
summary.to_csv("summary.csv")
with open("work_seconds.txt", "w") as f:
    f.write(repr(work_seconds))
summary.loc["count", "checksum"]"""


def notebook(data: str, repeat: int) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    sources = [SETUP_CELL.format(data=data, repeat=repeat), WORK_CELL, SUMMARY_CELL]
    nb.cells = [nbformat.v4.new_code_cell(s, id=f"cell-{i}") for i, s in enumerate(sources)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@dataclass
class DataSet:
    label: str
    dataset: str
    real: Path  # the plaintext the plain run reads
    synthetic: Path

    @property
    def enclave_path(self) -> str:
        return f"{contract.DATA_ROOT}/{PROVIDER}/{self.dataset}/{self.real.name}"


@dataclass
class EnclaveRun:
    total: float  # launch called -> outputs opened
    launch_to_running: float
    phases: dict[str, float]
    outputs: Path
    work: float  # the work cell's own time, measured inside the kernel


@dataclass
class Row:
    ds: DataSet
    rows: int
    size: int
    repeat: int = 0
    per_iter: float = 0.0
    plain: list[float] = field(default_factory=list)
    plain_work: list[float] = field(default_factory=list)
    enclave: list[EnclaveRun] = field(default_factory=list)
    plain0: list[float] = field(default_factory=list)
    enclave0: list[EnclaveRun] = field(default_factory=list)
    decrypt: list[float] = field(default_factory=list)
    outputs_match: bool = False


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} s  [{min(values):.3f} .. {max(values):.3f}]"


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------------
# The two ways of running the notebook
# ---------------------------------------------------------------------------------------------------------


def run_plain(nb: nbformat.NotebookNode, ws: Path) -> tuple[float, float]:
    """nbclient in this process with a local kernel: start, execute every cell, write the notebook back."""
    ws.mkdir()
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(ws)}}
    )
    # The kernel's stderr only carries its warning about unencrypted loopback TCP; keep the report clean.
    client.execute(stderr=subprocess.DEVNULL)
    nbformat.write(nb, ws / "analysis.ipynb")
    total = time.perf_counter() - start
    return total, float((ws / "work_seconds.txt").read_text())


class Enclave:
    """One in-process enclave host over a temporary store, like the tests' ``host`` fixture."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = tmp / "store"
        self.keys = self.store / ".keys"
        self.state = tmp / "host-state"
        self.socket = tmp / "host.sock"
        self.host: EnclaveHost | None = None
        self.count = 0
        # (job id, op, received, answered) of each supervisor -> host request, wall-clock.
        self.link_log: list[tuple[str, str, float, float]] = []

    def add(self, ds: DataSet) -> None:
        """``dcr provider add``, pinning the running host's image (its configuration snippet is not needed).

        The host copies the enclave code when it starts; pinning that copy's measurement, rather than the
        source tree's at the time of the add, keeps the benchmark working while the tree is being edited.
        """
        assert self.host is not None
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(
                ["provider", "add", "--store", str(self.store), "--provider", PROVIDER,
                 "--dataset", ds.dataset, "--real", str(ds.real), "--synthetic", str(ds.synthetic),
                 "--enclave-digest", self.host.measurement()]
            )  # fmt: skip
        if code != 0:
            raise SystemExit(f"provider add failed: {err.getvalue()}")

    def start(self) -> None:
        self.hub_key = load_or_create_key(self.keys / DEV_HUB_KEY_FILE)
        self.host = EnclaveHost(
            HostConfig(
                state_dir=self.state,
                socket_path=self.socket,
                store=self.store,
                keys_dir=self.keys,
                hub_keys=[public_jwk(self.hub_key)],
            )
        )
        self.host.prepare()
        self._time_link_requests(self.host)
        threading.Thread(target=self.host.serve_forever, daemon=True).start()
        self.client = HostClient(self.socket)
        for _ in range(500):
            if self.socket.exists():
                break
            time.sleep(0.01)
        self.client.ping()

    def stop(self) -> None:
        if self.host:
            self.host.shutdown()

    def _time_link_requests(self, host: EnclaveHost) -> None:
        """Timestamp every request the supervisor makes over its link (challenge, token, release, ...).

        Only this process's host object is wrapped; the supervisor and the installed code are untouched.
        """
        original = host._link_request
        log = self.link_log

        def timed(job: Any, msg: dict[str, Any]) -> dict[str, Any]:
            start = time.time()
            try:
                return original(job, msg)
            finally:
                log.append((job.job_id, str(msg.get("op")), start, time.time()))

        host._link_request = timed  # type: ignore[method-assign]

    def run(self, ds: DataSet, nb: nbformat.NotebookNode) -> EnclaveRun:
        """What ``dcr local-run`` does with a running host; times from ``launch`` to the opened outputs."""
        self.count += 1
        work = self.tmp / f"enclave-{self.count}"
        ws = work / "workspace"
        ws.mkdir(parents=True)
        nbformat.write(nb, ws / "analysis.ipynb")
        bundle = build_bundle(ws / "analysis.ipynb", work / "bundle.tar")
        version = Store(self.store).versions(PROVIDER, ds.dataset)[-1].version
        private, public = generate_keypair()
        job_id = contract.new_job_id()
        grant = issue_grant(
            self.hub_key,
            user="bench",
            job_id=job_id,
            bundle_digest=bundle.digest,
            datasets=[GrantedDataset(PROVIDER, ds.dataset, version, "auto")],
            output_public_key=public,
            time_limit=600,
        )
        # Wall-clock times (not perf_counter) so that they line up with the link requests'.
        t0 = time.time()
        self.client.launch(grant, work / "bundle.tar")
        launched = time.time()
        events: list[tuple[float, dict[str, Any]]] = []
        final: dict[str, Any] = {}
        for msg in self.client.watch(job_id):
            now = time.time()
            if "event" in msg:
                events.append((now, msg["event"]))
            if msg.get("end"):
                final = msg["job"]
        terminal = time.time()
        if final.get("state") != "succeeded":
            raise SystemExit(f"enclave job {job_id} ended {final.get('state')}: {final.get('failure')}")
        out = work / "out"
        self.client.result(job_id, out)
        open_dir(out / contract.SEALED_OUTPUTS_FILE, out / contract.OUTPUTS_DIR, private, job_id)
        done = time.time()

        states = [(t, ev["state"]) for t, ev in events if "state" in ev]
        cells = [(t, ev["cell"]) for t, ev in events if ev.get("cell")]
        # The host reports "launching" once it has spawned the supervisor.
        host_spawned = next(t for t, s in states if s == "launching")
        running = next(t for t, s in states if s == "running")
        checking = next(t for t, s in states if s == "checking")
        first_cell = cells[0][0] if cells else checking
        link = [(op, start, end) for jid, op, start, end in self.link_log if jid == job_id]
        # The supervisor's first request (its own "launching") comes once it has verified the grant.
        sup_ready = min(start for _, start, _ in link)
        challenge = next(start for op, start, _ in link if op == "challenge")
        released = max(end for op, _, end in link if op == "release")
        receipt_token = max(start for op, start, _ in link if op == "token")
        phases = {
            "launch call (grant check, bundle copy)": launched - t0,
            "host: measure image, spawn supervisor": host_spawned - launched,
            "supervisor start (interpreter, imports, tmpfs, grant)": sup_ready - host_spawned,
            "unpack bundle + sandbox probe": challenge - sup_ready,
            "key release (challenge, token, broker)": released - challenge,
            "decrypt, kernel start finishing (released -> running)": running - released,
            "kernel info + first cell starts (running -> cell 1)": first_cell - running,
            "cells (cell 1 -> checking)": checking - first_cell,
            "collect outputs + receipt manifest": receipt_token - checking,
            "receipt token, seal, write, exit (-> terminal)": terminal - receipt_token,
            "fetch + open results": done - terminal,
        }
        outputs = out / contract.OUTPUTS_DIR
        work_s = float((outputs / "work_seconds.txt").read_text())
        return EnclaveRun(done - t0, running - launched, phases, outputs, work_s)


# ---------------------------------------------------------------------------------------------------------
# Calibration and in-process probes
# ---------------------------------------------------------------------------------------------------------


def per_iteration(path: Path) -> float:
    """Seconds per repeat of the work cell, run in this process on the same file."""
    repeat = 8
    while True:
        ns: dict[str, Any] = {}
        exec(SETUP_CELL.format(data=str(path), repeat=repeat), ns)  # noqa: S102 - our own notebook text
        start = time.perf_counter()
        exec(WORK_CELL, ns)  # noqa: S102
        elapsed = time.perf_counter() - start
        if elapsed >= 0.5:
            return elapsed / repeat
        repeat *= 2


def time_decrypt(path: Path, repeat: int) -> list[float]:
    """decrypt_file of a fresh encryption of ``path``, into memory-backed storage like the enclave's."""
    where = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    ctx = FileContext(PROVIDER, "copy", "sha256:" + "0" * 64, path.name)
    key = os.urandom(32)
    times = []
    with tempfile.TemporaryDirectory(dir=where, prefix="dcr-bench-run-") as tmp:
        encrypt_file(path, Path(tmp) / "cipher", key, ctx)
        for _ in range(repeat):
            start = time.perf_counter()
            decrypt_file(Path(tmp) / "cipher", Path(tmp) / "plain", key, ctx)
            times.append(time.perf_counter() - start)
            (Path(tmp) / "plain").unlink()
    return times


def timed_runs(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def python_start(code: str, *, unshare: bool = False) -> Callable[[], object]:
    cmd = [sys.executable, "-I", "-B", "-c", code]
    if unshare:
        cmd = ["unshare", "--mount", "--propagation", "private", "--", *cmd]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return lambda: subprocess.run(cmd, env=env, check=True, capture_output=True)


def top_imports(image: Path, n: int = 6) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The supervisor's slowest imports from the image (``-X importtime``, one run).

    Returns its own direct imports by cumulative time, and the single modules by their own time (which
    names a third-party module that does heavy work when imported).
    """
    code = f"import sys; sys.path.insert(0, {str(image)!r}); import dcr_enclave.runtime.supervisor"
    r = subprocess.run(
        [sys.executable, "-I", "-B", "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    tops: dict[str, float] = {}
    leaves: dict[str, float] = {}
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        self_us, name = int(parts[0].split(":")[1]), parts[2].rstrip()
        # The name is indented by two spaces per level; level 1 are the supervisor's direct imports.
        if (len(name) - len(name.lstrip())) // 2 <= 1:
            tops[name.strip()] = int(parts[1]) / 1e6
        leaves[name.strip()] = self_us / 1e6
    by_time = lambda d: sorted(d.items(), key=lambda kv: -kv[1])[:n]  # noqa: E731
    return by_time(tops), by_time(leaves)


def plain_kernel_start() -> None:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", stderr=subprocess.DEVNULL)
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def probes(enc: Enclave, repeat: int) -> dict[str, list[float]]:
    assert enc.host is not None
    host = enc.host
    image = host.image_dir
    out: dict[str, list[float]] = {}
    out["measure image (host, per launch)"] = timed_runs(host.measurement, repeat)
    out["bare interpreter start (python -I -B)"] = timed_runs(python_start("pass"), repeat)
    out["supervisor imports from image (no .pyc: compiled each launch)"] = timed_runs(
        python_start(
            f"import sys; sys.path.insert(0, {str(image)!r}); import dcr_enclave.runtime.supervisor",
            unshare=True,
        ),
        repeat,
    )
    with tempfile.TemporaryDirectory(prefix="dcr-bench-pyc-") as tmp:
        # What byte-compiling the image would save: the same code with .pyc files beside it.
        shutil.copytree(image / "dcr_enclave", Path(tmp) / "dcr_enclave")
        compileall.compile_dir(Path(tmp) / "dcr_enclave", quiet=1)
        out["supervisor imports from a byte-compiled copy of the image"] = timed_runs(
            python_start(
                f"import sys; sys.path.insert(0, {tmp!r}); import dcr_enclave.runtime.supervisor",
                unshare=True,
            ),
            repeat,
        )
    out["jsonschema import (bundle.py and nbformat import it)"] = timed_runs(
        python_start("import jsonschema"), repeat
    )
    out["ipykernel.kernelapp + zmq imports (what the probe imports)"] = timed_runs(
        python_start("import ipykernel.kernelapp, zmq"), repeat
    )
    out["nbclient + jupyter_client imports (supervisor, after running)"] = timed_runs(
        python_start("import jupyter_client.asynchronous, nbclient"), repeat
    )
    with tempfile.TemporaryDirectory(prefix="dcr-bench-probe-") as tmp:
        uid, gid = host.sandbox_ids.allocate()
        spec = SandboxSpec(Path(tmp), Path(tmp), uid=uid, gid=gid, memory_bytes=4 * 2**30)
        out["sandbox probe (check_sandbox)"] = timed_runs(lambda: check_sandbox(spec), repeat)
    out["plain kernel start (start_new_kernel)"] = timed_runs(plain_kernel_start, repeat)
    return out


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def bench_row(row: Row, enc: Enclave, tmp: Path, repeat: int, target: float) -> None:
    ds = row.ds
    plain_path = str(ds.real)
    # Fixed cost: the same notebook with no work. The first pair warms caches and is not counted.
    for i in range(repeat + 1):
        p, _ = run_plain(notebook(plain_path, 0), tmp / f"plain0-{ds.dataset}-{i}")
        e = enc.run(ds, notebook(ds.enclave_path, 0))
        if i:
            row.plain0.append(p)
            row.enclave0.append(e)
    # Calibrate: a first guess from this process, then one plain run to learn the kernel's own pace.
    guess = max(1, round((target - median(row.plain0)) / per_iteration(ds.real)))
    total, work = run_plain(notebook(plain_path, guess), tmp / f"calibrate-{ds.dataset}")
    row.per_iter = work / guess
    row.repeat = max(1, round((target - (total - work)) / row.per_iter))
    print(f"  {ds.label}: {row.per_iter * 1e3:.2f} ms per repeat -> REPEAT={row.repeat}", flush=True)
    for i in range(repeat):
        ws = tmp / f"plain-{ds.dataset}-{i}"
        nb_plain, nb_enclave = notebook(plain_path, row.repeat), notebook(ds.enclave_path, row.repeat)
        # Alternate which goes first, so that drift in the machine's load does not favour one side.
        if i % 2:
            row.enclave.append(enc.run(ds, nb_enclave))
        total, work = run_plain(nb_plain, ws)
        row.plain.append(total)
        row.plain_work.append(work)
        if not i % 2:
            row.enclave.append(enc.run(ds, nb_enclave))
        print(
            f"    run {i + 1}: plain {row.plain[-1]:.3f} s, enclave {row.enclave[-1].total:.3f} s", flush=True
        )
    plain_summary = pd.read_csv(ws / "summary.csv", index_col=0)
    enclave_summary = pd.read_csv(row.enclave[-1].outputs / "summary.csv", index_col=0)
    row.outputs_match = plain_summary.equals(enclave_summary)
    row.decrypt = time_decrypt(ds.real, repeat)


def report(rows: list[Row], probe: dict[str, list[float]], repeat: int) -> None:
    print()
    print(f"== DCR local enclave vs plain nbclient (median [min .. max] of {repeat}; max of 3 ~ p95)")
    for row in rows:
        plain, enclave = median(row.plain), median([r.total for r in row.enclave])
        ratio = enclave / plain
        pair = [r.total / p for r, p in zip(row.enclave, row.plain, strict=True)]
        dec = median(row.decrypt)
        l2r = [r.launch_to_running for r in row.enclave + row.enclave0]
        ok = lambda b: "OK" if b else "MISSED"  # noqa: E731
        print()
        print(
            f"-- {row.ds.label}: {row.rows:,} rows, {row.size / 1e6:.2f} MB; REPEAT={row.repeat} "
            f"({row.per_iter * 1e3:.2f} ms each)"
        )
        print(f"   plain (nbclient, local kernel)    {spread(row.plain)}")
        print(f"   enclave (launch -> outputs open)  {spread([r.total for r in row.enclave])}")
        print(
            f"   ratio enclave/plain               {ratio:7.3f}    [{min(pair):.3f} .. {max(pair):.3f}]"
            f"  target <= {RATIO_TARGET:.2f}: {ok(ratio <= RATIO_TARGET)}"
        )
        print(f"   overhead                          {enclave - plain:7.3f} s")
        e_work = median([r.work for r in row.enclave])
        print(f"   work cell, in the plain kernel    {spread(row.plain_work)}")
        print(f"   work cell, in the sandboxed kernel{spread([r.work for r in row.enclave])}")
        print(f"   work cell sandboxed/plain         {e_work / median(row.plain_work):7.3f}")
        print(f"   no-work notebook, plain           {spread(row.plain0)}")
        print(f"   no-work notebook, enclave         {spread([r.total for r in row.enclave0])}")
        fixed = median([r.total for r in row.enclave0]) - median(row.plain0)
        print(f"   fixed overhead (no-work notebook) {fixed:7.3f} s")
        print(
            f"   ratio if both kernels ran the work equally fast: {(plain + fixed) / plain:.3f}"
            "  ((plain + fixed overhead) / plain)"
        )
        print(f"   launch returned -> running        {spread(l2r)}  (all {len(l2r)} enclave runs)")
        print(f"   decrypt_file (in-process)         {spread(row.decrypt)}")
        print(
            f"   launch -> running minus decrypt   {median(l2r) - dec:7.3f} s    "
            f"target < {LAUNCH_TARGET_S:.1f} s (+ decrypt): {ok(median(l2r) < LAUNCH_TARGET_S + dec)}"
        )
        print(f"   outputs identical (summary.csv)   {'yes' if row.outputs_match else 'NO'}")
        print("   enclave phases, from the watch stream (median of the working runs):")
        for name in row.enclave[0].phases:
            print(f"     {name:<52} {median([r.phases[name] for r in row.enclave]):7.3f} s")
    print()
    print("-- pieces timed in-process (median [min .. max])")
    for name, times in probe.items():
        print(f"   {name:<62} {spread(times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument(
        "--rows", type=int, default=200_000, help="rows of the resampled file (default 200000)"
    )
    parser.add_argument(
        "--target", type=float, default=5.0, help="seconds the plain run should take (default 5)"
    )
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the resampling")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the enclave host creates namespaces and a sandbox account")
    real, synthetic = SHARED_DATA / "real.csv", SHARED_DATA / "synthetic_mst.csv"
    with tempfile.TemporaryDirectory(prefix="dcr-bench-local-run-") as t:
        tmp = Path(t)
        big = tmp / "data" / "insurance-resampled.csv"
        big.parent.mkdir()
        pd.read_csv(real).sample(n=args.rows, replace=True, random_state=args.seed).to_csv(big, index=False)
        sets = [
            DataSet("insurance", "insurance", real, synthetic),
            DataSet(f"insurance resampled x{args.rows:,}", "insurance-big", big, synthetic),
        ]
        enc = Enclave(tmp)
        enc.start()
        try:
            for ds in sets:
                enc.add(ds)
            rows = []
            for ds in sets:
                print(f"benchmarking {ds.label} ...", flush=True)
                row = Row(ds, rows=len(pd.read_csv(ds.real)), size=ds.real.stat().st_size)
                bench_row(row, enc, tmp, args.repeat, args.target)
                rows.append(row)
            print("timing the pieces in-process ...", flush=True)
            probe = probes(enc, args.repeat)
            imports = top_imports(enc.host.image_dir if enc.host else tmp)
        finally:
            enc.stop()
    report(rows, probe, args.repeat)
    tops, leaves = imports
    print("   slowest imports of the supervisor from the image (cumulative, one run):")
    for name, secs in tops:
        print(f"     {name:<60} {secs:7.3f} s")
    print("   slowest single modules in that import (own time, one run):")
    for name, secs in leaves:
        print(f"     {name:<60} {secs:7.3f} s")


if __name__ == "__main__":
    main()
