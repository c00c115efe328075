"""Restarting the user's Jupyter server never loses a job nor leaves an enclave behind.

A real ``jupyter server`` subprocess (see ``test_researcher_cli.JupyterServer``) drives a real enclave host;
it is stopped with SIGTERM while a job runs and started again with the same configuration and job store.
Enclave processes (the supervisor and everything below it: sandbox, kernel) are identified by pid *and*
start time (``/proc/<pid>/stat`` field 22), recorded while the job runs, so a recycled pid is never
mistaken for a survivor.
"""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_researcher_cli import JupyterServer, cli_runner, write_notebook

from dcr_enclave.formats import contract
from dcr_server_ext.model import LIFECYCLE_STEP

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: Seconds the notebook's last cell sleeps (the "still running" case freezes the enclave meanwhile).
SLEEP_SECONDS = 3
CELLS = [
    "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
    f"import time\ntime.sleep({SLEEP_SECONDS})\nlen(df)",
]

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (comm) may hold spaces and parentheses; the fields after its last ')' start at field 3.
    rest = raw.rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[22 - 3])


def process_tree(root_pid: int) -> set[Proc]:
    """The process ``root_pid`` and all its descendants, each as (pid, start time)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = _stat(int(entry))
        if info is not None:
            children.setdefault(info[0], []).append(int(entry))
            starts[int(entry)] = info[1]
    if root_pid not in starts:
        return set()
    found, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid in starts:
            found.add((pid, starts[pid]))
            todo.extend(children.get(pid, []))
    return found


def alive(procs: set[Proc]) -> set[Proc]:
    """Those of ``procs`` still running: same pid *and* same start time."""
    out = set()
    for pid, start in procs:
        info = _stat(pid)
        if info is not None and info[1] == start:
            out.add((pid, start))
    return out


def signal_all(procs: set[Proc], sig: int) -> None:
    for pid, _start in alive(procs):
        os.kill(pid, sig)


def wait_gone(procs: set[Proc], timeout: float = 30) -> set[Proc]:
    deadline = time.monotonic() + timeout
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def server(tmp_path: Path, store, host) -> Iterator[JupyterServer]:
    s = JupyterServer(tmp_path / "jupyter", host.socket, store.hub_key_path, store.root)
    s.start()
    yield s
    s.stop()


def start_sleeping_job(server: JupyterServer, host) -> tuple[str, set[Proc]]:
    """Submit the sleeping notebook, wait until its last cell runs; returns the job id and its processes."""
    write_notebook(server.root / "sleepy.ipynb", CELLS)
    status, job = server.api("POST", "dcr/api/jobs", {"path": "sleepy.ipynb"})
    assert status == 201, job
    assert isinstance(job, dict)
    job_id = job["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = host.client.status(job_id)
        if st["state"] == "running" and st["cell"] and st["cell"][0] == len(CELLS) - 1:
            break
        assert st["state"] not in contract.TERMINAL_STATES, st
        time.sleep(0.05)
    else:
        raise AssertionError(f"the job never reached its last cell: {st}")
    supervisor = host.host.jobs[job_id].proc
    assert supervisor is not None and supervisor.poll() is None
    procs = process_tree(supervisor.pid)
    # The supervisor and, below it, the sandbox running the kernel.
    assert (supervisor.pid, _stat(supervisor.pid)[1]) in procs  # type: ignore[index]
    assert len(procs) >= 2, procs
    return job_id, procs


@pytest.mark.parametrize("when", ["still-running", "finished-while-down"])
def test_job_survives_server_restart(server, host, when, monkeypatch, tmp_path):
    """Stopping the server (SIGTERM) while a job runs and starting it again with the same configuration
    and job store: the job ends `succeeded` with its outputs and receipt, whether it was still running at
    the restart or finished while no server watched; no enclave process is left behind. A `dcr job --wait`
    started before the restart rides it out and exits 0 when the job succeeds."""
    job_id, procs = start_sleeping_job(server, host)
    waiter: dict[str, tuple[int, str, str]] = {}
    if when == "still-running":
        # Frozen (SIGSTOP) until the new server is up: the job is certainly running across the restart.
        signal_all(procs, signal.SIGSTOP)
        dcr = cli_runner(monkeypatch, tmp_path)
        args = ("job", job_id, "--wait", "--url", server.url, "--token", server.token)
        progress = io.StringIO()
        follower = threading.Thread(
            target=lambda: waiter.update(result=dcr(*args, err=progress)), daemon=True
        )
        follower.start()
        # It has subscribed and read the job once it shows the state.
        deadline = time.monotonic() + 60
        while f"{job_id}: running" not in progress.getvalue():
            assert follower.is_alive() and time.monotonic() < deadline, progress.getvalue()
            time.sleep(0.05)
    assert server.stop() == 0
    assert host.client.status(job_id)["state"] == "running"  # the enclave goes on without the server
    if when == "finished-while-down":
        deadline = time.monotonic() + 120
        while host.client.status(job_id)["state"] not in contract.TERMINAL_STATES:
            assert time.monotonic() < deadline, "the enclave job never ended"
            time.sleep(0.1)
    server.start()
    if when == "still-running":
        assert host.client.status(job_id)["state"] == "running"
        signal_all(procs, signal.SIGCONT)
    job = server.wait_job(job_id, contract.TERMINAL_STATES)
    assert job["state"] == "succeeded", job
    assert job["receipt"] is True and job["outputs_path"]
    status, files = server.api("GET", f"dcr/api/jobs/{job_id}/outputs")
    assert status == 200 and files["files"], files
    assert (server.root / job["outputs_path"] / contract.RECEIPT_FILE).is_file()
    assert wait_gone(procs) == set()
    # The restarted watch replays the job's history (launching, running, every cell): across both runs of
    # the server the stored state only ever moved forward.
    states = re.findall(rf"DCR: job {job_id} is (\w+)", server.log.read_text())
    steps = [LIFECYCLE_STEP[s] for s in states]
    assert steps == sorted(steps) and states[-1] == "succeeded", states
    if when == "still-running":
        follower.join(timeout=120)
        code, out, err = waiter["result"]
        assert code == 0, err
        assert err.strip().splitlines()[-1] == f"{job_id}: succeeded", err
        assert "state:     succeeded" in out


def test_enclave_killed_while_server_down_fails_with_reason(server, host):
    """If the enclave's supervisor dies (SIGKILL) while the server is down, the restarted server's
    reconciler marks the job `failed` with the enclave's reason, and no enclave process is left behind."""
    job_id, procs = start_sleeping_job(server, host)
    assert server.stop() == 0
    supervisor = host.host.jobs[job_id].proc
    assert supervisor is not None
    os.kill(supervisor.pid, signal.SIGKILL)
    server.start()
    job = server.wait_job(job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed", job
    reason = job["failure"]["reason"]
    assert reason and reason == host.client.status(job_id)["failure"]["reason"]
    assert job["outputs_path"] is None
    assert wait_gone(procs) == set()
