"""Runs a prepared demo: the enclave host and JupyterHub as child processes, until Ctrl-C or SIGTERM.

The demo process makes itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): whatever its children start
-- the proxy, single-user servers, kernels, enclave supervisors -- is re-parented to it if its own parent
dies, so after the hub and the enclave host have stopped it can find and end every process the demo started,
by pid, and leave nothing behind.

Stopping order: JupyterHub first (it stops the users' servers and the proxy it started), then the enclave
host (it kills the jobs it runs), then whatever is left of the demo's process tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import IO, Final

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.platform.client import HostClient
from dcr_enclave.platform.process_visibility import hidden_here

from . import data
from .prepare import (
    GROUPS,
    PROVIDER_ACCOUNT,
    PROVIDERS,
    RESEARCHERS,
    REVIEWER_ACCOUNT,
    Demo,
    Say,
    entitled_datasets,
    repo_root,
)

PR_SET_CHILD_SUBREAPER: Final = 36
HOST_START_TIMEOUT: Final = 120.0
HUB_START_TIMEOUT: Final = 180.0
HUB_STOP_TIMEOUT: Final = 60.0
HOST_STOP_TIMEOUT: Final = 30.0
#: Printed once everything answers; tests and scripts wait for this line.
READY_LINE: Final = "DCR demo is running"


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise DCRError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter), from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        fields = text[text.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (pid -> state letter)."""
    table = _process_table()
    children: dict[int, list[int]] = defaultdict(list)
    for p, (ppid, _state) in table.items():
        children[ppid].append(p)
    found: dict[int, str] = {}
    todo = list(children[pid])
    while todo:
        p = todo.pop()
        if p in found or p not in table:
            continue
        found[p] = table[p][1]
        todo.extend(children[p])
    return found


class DemoProcesses:
    """The demo's child processes and their lifecycle."""

    def __init__(self, demo: Demo, say: Say = print, *, review_time_quantum: float | None = None) -> None:
        self.demo = demo
        self.say = say
        #: The enclave host's rounding of a reviewed job's end (its own default when None).
        self.review_time_quantum = review_time_quantum
        self.stopping = threading.Event()
        self.host: subprocess.Popen[bytes] | None = None
        self.hub: subprocess.Popen[bytes] | None = None
        self.signal_name = ""

    # -- signals -----------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            self.signal_name = signal.Signals(signum).name
            self.stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)

    # -- starting ----------------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_", "CONFIGPROXY_"))
        }
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "/usr/bin:/bin")])
        # The hub imports dcr_demo (the home seeder) and dcr_spawner from the checkout, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root()), env.get("PYTHONPATH", "")) if p)
        return env

    def _spawn(self, argv: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
        out: IO[bytes] = open(log, "ab")  # noqa: SIM115 - handed to the child, closed right after
        try:
            return subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                # Its own session: a Ctrl-C in the terminal reaches the demo only, which stops the rest in order.
                start_new_session=True,
            )
        finally:
            out.close()

    def start_host(self) -> None:
        layout = self.demo.layout
        self.say("starting the enclave host (a SIMULATED TEE)...")
        self.host = self._spawn(
            [
                sys.executable, "-m", "dcr_enclave", "enclave-host",
                "--store", str(layout.store), "--hub-key", str(layout.hub_jwks),
                "--state", str(layout.host_state), "--socket", str(layout.socket),
                *(["--allow-visible-processes"] if not hidden_here() else []),
                *(
                    ["--review-time-quantum", str(self.review_time_quantum)]
                    if self.review_time_quantum is not None
                    else []
                ),
            ],
            layout.host_log,
            layout.root,
        )  # fmt: skip
        client = HostClient(layout.socket, timeout=5)
        deadline = time.monotonic() + HOST_START_TIMEOUT
        while time.monotonic() < deadline and not self.stopping.is_set():
            self._check_alive(self.host, "the enclave host", layout.host_log)
            try:
                if layout.socket.exists():
                    client.ping()
                    return
            except DCRError:
                pass
            time.sleep(0.2)
        if not self.stopping.is_set():
            raise DCRError(
                f"the enclave host did not answer within {HOST_START_TIMEOUT:.0f} s",
                hint=self._tail(layout.host_log),
            )

    def start_hub(self) -> None:
        layout = self.demo.layout
        self.say("starting JupyterHub...")
        self.hub = self._spawn(
            [sys.executable, "-m", "jupyterhub", "-f", str(layout.hub_config)], layout.hub_log, layout.hub
        )
        url = f"http://127.0.0.1:{self.demo.ports.public}/hub/api/"
        deadline = time.monotonic() + HUB_START_TIMEOUT
        while time.monotonic() < deadline and not self.stopping.is_set():
            self._check_alive(self.hub, "JupyterHub", layout.hub_log)
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        if not self.stopping.is_set():
            raise DCRError(
                f"JupyterHub did not answer within {HUB_START_TIMEOUT:.0f} s", hint=self._tail(layout.hub_log)
            )

    def _check_alive(self, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
        if proc.poll() is not None:
            raise DCRError(
                f"{what} exited with status {proc.returncode} while starting", hint=self._tail(log)
            )

    @staticmethod
    def _tail(log: Path, lines: int = 25) -> str:
        try:
            text = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"see {log}" + ("; its last lines:\n" + "\n".join(text) if text else "")

    # -- running -----------------------------------------------------------------------------------------

    def banner(self) -> str:
        d = self.demo
        width = max(len(u) for u in (*RESEARCHERS, PROVIDER_ACCOUNT, REVIEWER_ACCOUNT))
        lines = [
            f"{READY_LINE}: http://127.0.0.1:{d.ports.public}/",
            f"  Log in with one of these accounts; the password of each is: {d.state.password}",
        ]
        for user in RESEARCHERS:
            refs = ", ".join(entitled_datasets(user))
            lines.append(f"    {user:<{width}}  researcher, sees the synthetic version of: {refs}")
        lines.append(
            f"    {PROVIDER_ACCOUNT:<{width}}  data provider ({data.PROVIDER}), "
            f"in group {', '.join(g for g, m in GROUPS.items() if PROVIDER_ACCOUNT in m)}: no datasets in the sandbox"
        )
        reviewed = ", ".join(t.ref for t in data.TABLES if t.release == "review")
        lines.append(
            f"    {REVIEWER_ACCOUNT:<{width}}  reviewer of {PROVIDERS[data.PROVIDER]['name']} ({data.PROVIDER}): "
            f"approves or rejects the held outputs of {reviewed} on the review page, "
            f"http://127.0.0.1:{d.ports.public}/hub/dcr/review; no datasets in the sandbox"
        )
        synthesis = {"mst": "DP synthetic (MST, ε = 1)", "random": "random draws from each column's domain"}
        lines += [
            f"  Synthetic data: {synthesis.get(d.state.synthesis, d.state.synthesis)}; real data runs only in "
            "the enclave.",
            f"  Enclave: the local SIMULATED TEE (no hardware memory encryption), socket {d.layout.socket}",
            *(
                []
                if hidden_here()
                else [
                    "  Note: /proc is not mounted hidepid=invisible, so every account of this machine can read the "
                    "enclave jobs' process titles (researchers cannot: their servers have their own /proc); "
                    "see docs/sandbox.md"
                ]
            ),
            f"  Logs: {d.layout.hub_log}, {d.layout.host_log}",
            "  Each researcher finds analysis.ipynb in their home: run it, then click 'Submit to enclave'.",
            f"  Jobs on {reviewed} are held until {REVIEWER_ACCOUNT} releases (or rejects) their outputs.",
            "  Press Ctrl-C to stop.",
        ]
        return "\n".join(lines)

    def wait(self) -> int:
        """Until a signal (exit status 0) or until the hub or the host dies (1)."""
        while not self.stopping.wait(1.0):
            for proc, what, log in (
                (self.hub, "JupyterHub", self.demo.layout.hub_log),
                (self.host, "the enclave host", self.demo.layout.host_log),
            ):
                if proc is not None and proc.poll() is not None:
                    self.say(
                        f"dcr demo: {what} exited with status {proc.returncode}; stopping ({self._tail(log, 10)})"
                    )
                    return 1
            self._reap_orphans()
        return 0

    def _reap_orphans(self) -> None:
        """Collect exited processes re-parented to the demo (it is their subreaper)."""
        own = {p.pid for p in (self.hub, self.host) if p is not None}
        for pid, state in descendants(os.getpid()).items():
            if state == "Z" and pid not in own:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    # -- stopping ----------------------------------------------------------------------------------------

    def stop(self) -> None:
        for proc, what, timeout in (
            (self.hub, "JupyterHub", HUB_STOP_TIMEOUT),
            (self.host, "the enclave host", HOST_STOP_TIMEOUT),
        ):
            if proc is None or proc.poll() is not None:
                continue
            self.say(f"stopping {what}...")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.say(f"{what} did not stop within {timeout:.0f} s; killing it")
                proc.kill()
                proc.wait(10)
        self.sweep()

    def sweep(self) -> None:
        """End whatever is left below the demo (orphans re-parented to it), by pid: TERM, then KILL."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            left = self._live_descendants()
            if not left:
                return
            if sig == signal.SIGTERM:
                self.say(f"ending {len(left)} leftover process(es) of the demo")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._live_descendants():
                self._reap_orphans()
                time.sleep(0.1)
        self._reap_orphans()

    def _live_descendants(self) -> list[int]:
        self._reap_orphans()
        return [pid for pid, state in descendants(os.getpid()).items() if state != "Z"]


def run_demo(demo: Demo, say: Say = print, *, review_time_quantum: float | None = None) -> int:
    """Start everything, print the logins, wait for Ctrl-C/SIGTERM, stop everything. Returns the exit status."""
    procs = DemoProcesses(demo, say, review_time_quantum=review_time_quantum)
    procs.install_signal_handlers()
    become_subreaper()
    try:
        procs.start_host()
        if not procs.stopping.is_set():
            procs.start_hub()
        if procs.stopping.is_set():
            say(f"dcr demo: {procs.signal_name or 'stop'} received while starting; stopping")
            return 0
        say(procs.banner())
        status = procs.wait()
        if procs.signal_name:
            say(f"dcr demo: {procs.signal_name} received; stopping")
        return status
    finally:
        procs.stop()
        say("dcr demo: stopped")
