"""``dcr demo`` as a subprocess for tests and benchmarks: start it, log in, use the hub API, stop it.

:class:`DemoProcess` runs ``dcr demo --dir DIR --port PORT --account-prefix PREFIX`` (a fresh prefix per run,
so the system accounts it creates never collide with another test's), waits for its ready line, and offers
what the tests need: logins and tokens through the hub's own API, a user's server, jobs through the DCR server
extension's REST API, the demo's process tree (to prove nothing is left after a stop), and
:meth:`DemoProcess.remove_accounts` to delete the accounts afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import requests
from hub_harness import delete_account, login_session

BIN = Path(sys.executable).parent
READY_LINE = "DCR demo is running"
#: The demo's rounding of a reviewed job's end, short for tests.
REVIEW_TIME_QUANTUM = 5.0
USERS = ("alice", "bob", "carol", "rita")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "held"})


#: What a copy of a demo directory leaves out: what belongs to one run (its researchers' homes, logs, socket
#: and lock), not the data, store, keys and state that later runs reuse.
RUN_ONLY = shutil.ignore_patterns("homes", "logs", "run", "*.lock")


def copy_demo_data(prepared: Path, dest: Path) -> Path:
    """A demo directory at ``dest`` holding the data ``prepared`` (a stopped demo's directory) made, so that
    the next ``dcr demo`` there reuses it instead of synthesizing it again."""
    shutil.copytree(prepared, dest, ignore=RUN_ONLY)
    return dest


class DemoError(RuntimeError):
    """The demo did not do what the test needed; the message carries the demo's output."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_account_prefix() -> str:
    """A fresh account prefix (``dcrt<6 hex>-``): accounts of different runs never collide."""
    return f"dcrt{secrets.token_hex(3)}-"


class DemoProcess:
    """One ``dcr demo`` subprocess."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        account_prefix: str | None = None,
        dcr: Path | None = None,
    ) -> None:
        self.dir = Path(directory).absolute()
        #: The ``dcr`` command to run (another checkout's, for tests about where a checkout lies).
        self.dcr = dcr or BIN / "dcr"
        self.port = port or free_port()
        self.account_prefix = account_prefix or new_account_prefix()
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._known: dict[int, psutil.Process] = {}

    # -- process ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def start(self, timeout: float = 900) -> DemoProcess:
        """Start the demo and wait until it prints its ready line (the first run synthesizes the data)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_", "PYTEST_"))}
        self.proc = subprocess.Popen(
            [
                str(self.dcr), "demo", "--dir", str(self.dir), "--port", str(self.port),
                "--account-prefix", self.account_prefix,
                # Jobs under review end on a multiple of this (60 s by default, to blur their length).
                "--review-time-quantum", str(REVIEW_TIME_QUANTUM),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.output:
                self.remember()
                return self
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise DemoError(f"dcr demo exited with {self.proc.returncode} while starting:\n{self.output}")
            time.sleep(0.2)
        self.stop()
        raise DemoError(f"dcr demo was not ready within {timeout} s:\n{self.output}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def remember(self) -> list[psutil.Process]:
        """Note every process below the demo now (it is their subreaper, so they stay below it)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    self._known.setdefault(p.pid, p)
        return list(self._known.values())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Signal the demo and wait for it to exit; returns its exit status."""
        if self.proc is None:
            return 0
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise DemoError(f"dcr demo did not stop within {timeout} s:\n{self.output}") from None
        if self._reader is not None:
            self._reader.join(10)
        return int(self.proc.returncode)

    def leftovers(self) -> list[psutil.Process]:
        """Processes the demo started that still run (create time checked, so reused pids do not count)."""
        left = [p for p in self._known.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        # Anything else on the machine that names the demo directory (e.g. escaped its tree).
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if p.pid not in self._known and any(str(self.dir) in a for a in (p.info["cmdline"] or [])):
                    left.append(p)
        return left

    def kill_leftovers(self) -> None:
        """Cleanup after a failed test only: kill, by pid, what :meth:`leftovers` finds."""
        procs = self.leftovers()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)

    def account(self, user: str) -> str:
        return f"{self.account_prefix}{user}"

    def remove_accounts(self, users: Iterable[str] = USERS) -> None:
        """Delete the system accounts this run's spawns created (their processes must be gone)."""
        for user in users:
            delete_account(self.account(user))

    def close(self) -> None:
        """Stop the demo and remove everything this run left: processes and the accounts its spawns made."""
        self.stop()
        self.kill_leftovers()
        self.remove_accounts()

    # -- state written by the demo ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "demo.json").read_text()))

    @property
    def password(self) -> str:
        return str(self.state()["password"])

    @property
    def hub_log(self) -> Path:
        return self.dir / "logs" / "jupyterhub.log"

    # -- the hub ---------------------------------------------------------------------------------------------

    def login(self, user: str, password: str | None = None) -> requests.Session:
        """A browser-like session (the hub's login cookie) for ``user``."""
        return login_session(self.url, user, self.password if password is None else password, DemoError)

    def token(self, user: str) -> str:
        """A new API token of ``user``, made by the user's own logged-in session through the hub API."""
        s = self.login(user)
        r = s.post(
            f"{self.url}/hub/api/users/{user}/tokens", json={"note": "test", "expires_in": 3600}, timeout=60
        )
        if r.status_code != 201:
            raise DemoError(f"token for {user}: {r.status_code} {r.text[:300]}")
        return str(r.json()["token"])

    def api(self, method: str, path: str, token: str, **kw: Any) -> requests.Response:
        """The hub API (``path`` below ``/hub/api``) with a user's token."""
        return requests.request(
            method, f"{self.url}/hub/api{path}", headers={"Authorization": f"token {token}"}, timeout=60, **kw
        )

    def spawn(self, user: str, token: str, timeout: float = 180) -> None:
        """Start ``user``'s server (as the user, with their token) and wait until the hub reports it ready."""
        r = self.api("POST", f"/users/{user}/server", token, json={})
        if r.status_code not in (201, 202, 400):
            raise DemoError(f"spawn of {user}: {r.status_code} {r.text[:300]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = (self.api("GET", f"/users/{user}", token).json().get("servers") or {}).get("")
            if server and server.get("ready"):
                self.remember()
                return
            time.sleep(0.5)
        raise DemoError(f"the server of {user} was not ready within {timeout} s")

    def server(self, method: str, user: str, path: str, token: str, **kw: Any) -> requests.Response:
        """``user``'s single-user server (``path`` below ``/user/<name>/``), through the proxy."""
        return requests.request(
            method,
            f"{self.url}/user/{user}/{path.lstrip('/')}",
            headers={"Authorization": f"token {token}"},
            timeout=120,
            allow_redirects=False,
            **kw,
        )

    def wait_job(self, user: str, job_id: str, token: str, timeout: float = 300) -> dict[str, Any]:
        """Poll a job until it reaches a terminal state; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = dict(self.server("GET", user, f"dcr/api/jobs/{job_id}", token).json())
            if job["state"] in TERMINAL_STATES:
                return job
            time.sleep(0.5)
        raise DemoError(f"job {job_id} did not end within {timeout} s")
