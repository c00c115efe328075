"""A real JupyterHub for tests: subprocess, real configurable-http-proxy, free loopback ports.

:class:`Hub` writes a ``jupyterhub_config.py`` into a fresh working directory (database, cookie secret,
pid files and logs all live there), starts ``python -m jupyterhub`` with the configurable-http-proxy that
``npm install --prefix <repo>/.npm configurable-http-proxy@5`` installed, and waits until the hub answers
through the proxy. Users log in with ``DummyAuthenticator`` and one shared password; the harness talks to
the REST API with its own admin service token. Callers choose the spawner class and add any config lines
(``c.Spawner...``, ``c.DCRPolicy...``, ``dcr_spawner.enable(c)``) as text.

Helpers: :meth:`Hub.login` (a cookie session, as a browser has), :meth:`Hub.create_user`,
:meth:`Hub.new_token` (a user's API token), group membership, :meth:`Hub.spawn` (start a user's server and
wait until it is ready), :meth:`Hub.server_env` (the environment of a user's running server: its own hub
token), :meth:`Hub.run_code` (run code in a kernel of a user's server, through the server's REST and
websocket API), and :meth:`Hub.stop`, which stops the hub and reaps every process it started.

:meth:`Hub.run_to_exit` is for hubs that must refuse to start: it returns the exit status and the log.
:class:`PostgresServer` runs a throwaway PostgreSQL server (initdb/pg_ctl, as an unprivileged account when
root) for tests of the hub's records against a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import requests

if TYPE_CHECKING:
    from dcr_enclave.formats.dataset import DatasetVersion

REPO = Path(__file__).resolve().parents[1]
CHP = REPO / ".npm" / "node_modules" / ".bin" / "configurable-http-proxy"
BIN = Path(sys.executable).parent
PASSWORD = "dcr-test-password"
ADMIN_SERVICE = "harness-admin"
#: Markers in the hub's log: it has bound its API port / is serving through the proxy.
SERVING_MARKERS = ("Hub API listening on", "JupyterHub is now running")


class HarnessError(RuntimeError):
    """The harness could not do what was asked; the message includes the hub's log tail when useful."""


def chp_command() -> str:
    """The configurable-http-proxy executable; a clear failure when it is not installed."""
    if not os.access(CHP, os.X_OK):
        raise HarnessError(
            f"configurable-http-proxy is not installed at {CHP}. "
            f"Install it with: npm install --prefix {REPO / '.npm'} configurable-http-proxy@5"
        )
    return str(CHP)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class HubExit:
    """How a hub that was expected to refuse to start ended."""

    returncode: int
    log: str

    @property
    def served(self) -> bool:
        return any(m in self.log for m in SERVING_MARKERS)


class Hub:
    """One JupyterHub subprocess. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        workdir: Path,
        *,
        spawner_class: str = "simple",
        config: str = "",
        groups: Mapping[str, Iterable[str]] | None = None,
        admin_users: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout: float = 90,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spawner_class = spawner_class
        self.extra_config = textwrap.dedent(config)
        self.groups = {g: list(users) for g, users in (groups or {}).items()}
        self.admin_users = list(admin_users)
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.admin_token = secrets.token_hex(32)
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}
        self.config_file = self.workdir / "jupyterhub_config.py"
        self.log_file = self.workdir / "jupyterhub.log"

    # ------------------------------------------------------------------------------------------------
    # Configuration and process

    @property
    def url(self) -> str:
        """The public URL, through the proxy."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/hub/api"

    def base_config(self) -> str:
        home = self.workdir / "home"
        lines = [
            "c = get_config()  # noqa",
            'c.JupyterHub.ip = "127.0.0.1"',
            f"c.JupyterHub.port = {self.port}",
            'c.JupyterHub.hub_ip = "127.0.0.1"',
            f"c.JupyterHub.hub_port = {self.hub_port}",
            f'c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"',
            f"c.ConfigurableHTTPProxy.command = [{chp_command()!r}]",
            f'c.ConfigurableHTTPProxy.pid_file = "{self.workdir / "proxy.pid"}"',
            f'c.JupyterHub.db_url = "sqlite:///{self.workdir / "jupyterhub.sqlite"}"',
            f'c.JupyterHub.cookie_secret_file = "{self.workdir / "jupyterhub_cookie_secret"}"',
            f'c.JupyterHub.pid_file = "{self.workdir / "jupyterhub.pid"}"',
            'c.JupyterHub.authenticator_class = "dummy"',
            f"c.DummyAuthenticator.password = {PASSWORD!r}",
            "c.Authenticator.allow_all = True",
            f"c.Authenticator.admin_users = {set(self.admin_users)!r}",
            f"c.JupyterHub.services = [{{'name': {ADMIN_SERVICE!r}, 'api_token': {self.admin_token!r}}}]",
            "c.JupyterHub.load_roles = [{"
            f"'name': {ADMIN_SERVICE!r}, 'services': [{ADMIN_SERVICE!r}], 'scopes': ["
            "'admin:users', 'admin:groups', 'admin:servers', 'tokens', 'access:servers', 'read:hub', "
            "'list:users', 'list:groups', 'read:roles']}]",
            f"c.JupyterHub.load_groups = {{g: {{'users': u}} for g, u in {self.groups!r}.items()}}",
            f"c.JupyterHub.spawner_class = {self.spawner_class!r}",
            f"c.Spawner.cmd = [{str(BIN / 'jupyterhub-singleuser')!r}]",
            "c.Spawner.start_timeout = 120",
            "c.Spawner.http_timeout = 120",
            f"c.SimpleLocalProcessSpawner.home_dir_template = '{home}/{{username}}'",
            "c.JupyterHub.log_level = 'DEBUG'",
        ]
        if self.spawner_class == "simple" and os.geteuid() == 0:
            # SimpleLocalProcessSpawner runs servers as the hub's own account: root here.
            lines.append('c.Spawner.args = ["--allow-root"]')
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        (self.workdir / "home").mkdir(exist_ok=True)
        self.config_file.write_text(self.base_config() + "\n# --- caller's config ---\n" + self.extra_config)

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("JUPYTERHUB_", "JPY_", "CONFIGPROXY_", "PYTEST_"))
        }
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        # The hub imports dcr_spawner from this checkout, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(self.extra_env)
        return env

    def launch(self) -> None:
        """Start the hub process without waiting for it."""
        chp_command()
        self.write_config()
        log = open(self.log_file, "wb")  # noqa: SIM115 - handed to the child and closed below
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.config_file)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        finally:
            log.close()
        self._known[self.proc.pid] = psutil.Process(self.proc.pid)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def start(self) -> Hub:
        """Start the hub and wait until it answers through the proxy."""
        self.launch()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"the hub exited with status {self.proc.returncode} while starting:\n{self._tail()}"
                )
            try:
                r = requests.get(f"{self.api_url}/", timeout=2)
                if r.status_code == 200 and "JupyterHub is now running" in self.log():
                    self._remember()
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise HarnessError(f"the hub did not answer within {self.start_timeout} s:\n{self._tail()}")

    def run_to_exit(self, timeout: float = 90) -> HubExit:
        """Start a hub that should refuse to start; return its exit status and log."""
        self.launch()
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise HarnessError(f"the hub was expected to stop but kept running:\n{self._tail()}") from None
        self._reap()
        return HubExit(self.proc.returncode, self.log())

    def _remember(self) -> None:
        """Note every process the hub started, so :meth:`stop` can reap them even if the hub dies."""
        if self.proc is None:
            return
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def stop(self, timeout: float = 30) -> None:
        """Stop the hub (which stops the proxy and the servers), then kill whatever is left."""
        if self.proc is None:
            return
        self._remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        procs = [p for p in self._known.values() if p.is_running()]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        pid_file = self.workdir / "proxy.pid"
        if pid_file.exists():  # a proxy left behind by a hub that was killed
            try:
                proxy = psutil.Process(int(pid_file.read_text().strip()))
                if str(CHP.name) in " ".join(proxy.cmdline()) or "node" in proxy.name():
                    proxy.kill()
                    proxy.wait(10)
            except (psutil.NoSuchProcess, ValueError):
                pass
        self._known.clear()

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------
    # REST API

    def api(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        direct: bool = False,
    ) -> requests.Response:
        """Call the hub's REST API (``path`` below ``/hub/api``); ``token=None`` uses the admin token.

        ``direct=True`` talks to the hub's own port instead of going through the proxy, as a user's
        server does (its ``JUPYTERHUB_API_URL``).
        """
        base = f"http://127.0.0.1:{self.hub_port}/hub/api" if direct else self.api_url
        h = {"Authorization": f"token {self.admin_token if token is None else token}"} if token != "" else {}
        h.update(headers or {})
        r = requests.request(
            method, base + path, headers=h, json=json_body, data=data, timeout=60, allow_redirects=False
        )
        self._remember()
        return r

    def _ok(self, r: requests.Response, *codes: int) -> requests.Response:
        if r.status_code not in codes:
            raise HarnessError(f"{r.request.method} {r.url} -> {r.status_code}: {r.text[:500]}")
        return r

    def create_user(self, name: str) -> dict[str, Any]:
        r = self.api("POST", f"/users/{name}")
        if r.status_code == 409:  # exists already
            return dict(self._ok(self.api("GET", f"/users/{name}"), 200).json())
        return dict(self._ok(r, 201).json())

    def new_token(
        self, user: str, *, scopes: list[str] | None = None, note: str = "test", expires_in: int = 3600
    ) -> str:
        """A new API token for ``user`` (created if missing), made through the REST API by the admin."""
        self.create_user(user)
        body: dict[str, Any] = {"note": note, "expires_in": expires_in}
        if scopes is not None:
            body["scopes"] = scopes
        return str(
            self._ok(self.api("POST", f"/users/{user}/tokens", json_body=body), 200, 201).json()["token"]
        )

    def create_group(self, group: str, users: Iterable[str] = ()) -> None:
        self._ok(self.api("POST", f"/groups/{group}"), 201, 409)
        if users:
            self.add_to_group(group, users)

    def add_to_group(self, group: str, users: Iterable[str]) -> None:
        for u in users:
            self.create_user(u)
        self._ok(self.api("POST", f"/groups/{group}/users", json_body={"users": list(users)}), 200)

    def remove_from_group(self, group: str, users: Iterable[str]) -> None:
        self._ok(self.api("DELETE", f"/groups/{group}/users", json_body={"users": list(users)}), 200)

    def login(self, user: str, password: str = PASSWORD) -> requests.Session:
        """A logged-in browser-like session (cookies) for ``user``."""
        return login_session(self.url, user, password, HarnessError)

    # ------------------------------------------------------------------------------------------------
    # Servers

    def spawn(
        self,
        user: str,
        *,
        timeout: float = 120,
        options: Mapping[str, Any] | None = None,
        session: requests.Session | None = None,
    ) -> dict[str, Any]:
        """Start ``user``'s server and wait until the hub reports it ready; returns the server model.

        With ``session`` (from :meth:`login`) the user starts it themselves with their login cookie, as
        JupyterHub's own pages do; otherwise the admin does through the API."""
        if session is None:
            self.create_user(user)
            r = self.api("POST", f"/users/{user}/server", json_body=dict(options or {}))
        else:
            r = session.post(f"{self.url}/hub/api/users/{user}/server", json=dict(options or {}), timeout=60)
        if r.status_code not in (201, 202, 400):
            raise HarnessError(f"spawn of {user} refused: {r.status_code} {r.text[:500]}\n{self._tail()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self._ok(self.api("GET", f"/users/{user}"), 200).json()
            server = (model.get("servers") or {}).get("")
            if server and server.get("ready"):
                self._remember()
                return dict(server)
            if not server:  # after 201/202 (or 400: already there) a server vanishing means it failed
                raise HarnessError(f"the server of {user} failed to start:\n{self._tail()}")
            time.sleep(0.3)
        raise HarnessError(f"the server of {user} was not ready within {timeout} s:\n{self._tail()}")

    def stop_server(self, user: str, timeout: float = 60) -> None:
        r = self.api("DELETE", f"/users/{user}/server")
        self._ok(r, 202, 204)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self._ok(self.api("GET", f"/users/{user}"), 200).json()
            if not (model.get("servers") or {}).get(""):
                return
            time.sleep(0.3)
        raise HarnessError(f"the server of {user} did not stop within {timeout} s")

    def server_url(self, user: str) -> str:
        return f"{self.url}/user/{user}/"

    def server_process(self, user: str) -> psutil.Process:
        """The running single-user server process of ``user`` (found by its JUPYTERHUB_USER)."""
        self._remember()
        assert self.proc is not None
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if p.environ().get("JUPYTERHUB_USER") == user and "JUPYTERHUB_API_TOKEN" in p.environ():
                    return p
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
        raise HarnessError(f"no running server process for {user}")

    def server_env(self, user: str) -> dict[str, str]:
        """The environment of ``user``'s running server: its hub API token and URL among others."""
        return dict(self.server_process(user).environ())

    def server_api(
        self, user: str, method: str, path: str, *, token: str, json_body: Any = None
    ) -> requests.Response:
        """Call ``user``'s single-user server (``path`` below ``/user/<name>/``) through the proxy."""
        return requests.request(
            method,
            self.server_url(user) + path.lstrip("/"),
            headers={"Authorization": f"token {token}"},
            json=json_body,
            timeout=60,
            allow_redirects=False,
        )

    def put_notebook(self, user: str, path: str, sources: Iterable[str], *, token: str) -> None:
        """Write a notebook of these code cells at ``path`` in ``user``'s server (its contents API)."""
        import nbformat

        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
        body = {"type": "notebook", "content": nb}
        self._ok(self.server_api(user, "PUT", f"api/contents/{path}", token=token, json_body=body), 200, 201)

    def run_code(self, user: str, code: str, *, token: str, timeout: float = 120) -> KernelResult:
        """Run ``code`` in a new kernel of ``user``'s server (REST + websocket), then shut the kernel down."""
        r = self.server_api(user, "POST", "api/kernels", token=token, json_body={})
        if r.status_code != 201:
            raise HarnessError(f"cannot start a kernel for {user}: {r.status_code} {r.text[:300]}")
        kernel_id = r.json()["id"]
        try:
            ws_url = f"ws://127.0.0.1:{self.port}/user/{user}/api/kernels/{kernel_id}/channels"
            return asyncio.run(_execute(ws_url, token, code, timeout))
        finally:
            self.server_api(user, "DELETE", f"api/kernels/{kernel_id}", token=token)


@dataclass(frozen=True)
class KernelResult:
    stdout: str
    stderr: str
    #: ``"ename: evalue"`` when the code raised, else ``None``.
    error: str | None


async def _execute(ws_url: str, token: str, code: str, timeout: float) -> KernelResult:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    session = uuid.uuid4().hex
    msg_id = uuid.uuid4().hex
    conn = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}))
    try:
        conn.write_message(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": "test",
                        "session": session,
                        "msg_type": "execute_request",
                        "version": "5.3",
                        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        out: list[str] = []
        err: list[str] = []
        error: str | None = None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(
                    f"the kernel did not finish within {timeout} s; output so far: {''.join(out)}"
                )
            raw = await asyncio.wait_for(conn.read_message(), remaining)
            if raw is None:
                raise HarnessError("the kernel websocket closed before the code finished")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg.get("content", {})
            if kind == "stream":
                (out if content.get("name") == "stdout" else err).append(content.get("text", ""))
            elif kind == "error":
                error = f"{content.get('ename')}: {content.get('evalue')}"
            elif kind == "execute_result":
                out.append(str(content.get("data", {}).get("text/plain", "")) + "\n")
            elif kind == "status" and content.get("execution_state") == "idle":
                return KernelResult("".join(out), "".join(err), error)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------
# Datasets and policy
# ---------------------------------------------------------------------------------------------------------

#: The public insurance data set (read in place, never copied into the repository).
SHARED_DATA = REPO.parent / "shared" / "data"
INSURANCE_REAL = SHARED_DATA / "insurance" / "real.csv"
INSURANCE_SYNTHETIC = SHARED_DATA / "insurance" / "synthetic_mst.csv"


def register_dataset(
    store: Path, provider: str, dataset: str, files: Iterable[tuple[Path, Path]], *extra: str
) -> Any:
    """Register ``(real, synthetic)`` pairs with ``dcr provider add`` (in-process); returns the manifest."""
    from dcr_enclave.commands.main import main as cli_main
    from dcr_enclave.pack.store import Store

    args = ["provider", "add", "--store", str(store), "--provider", provider, "--dataset", dataset]
    for real, synthetic in files:
        args += ["--real", str(real), "--synthetic", str(synthetic)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([*args, *extra])
    if code != 0:
        raise HarnessError(f"dcr provider add failed ({code}): {err.getvalue()}")
    versions = Store(store).versions(provider, dataset)
    return versions[-1]


def login_session(
    base_url: str, user: str, password: str, error: type[Exception] = RuntimeError
) -> requests.Session:
    """Log in through the hub's login form as a browser does: a session holding the hub's login cookie,
    sending the XSRF token JupyterHub wants on cookie-authenticated API calls. Raises ``error`` if refused."""
    s = requests.Session()
    s.get(f"{base_url}/hub/login", timeout=30)
    xsrf = s.cookies.get("_xsrf") or ""
    r = s.post(
        f"{base_url}/hub/login",
        data={"username": user, "password": password, "_xsrf": xsrf},
        allow_redirects=False,
        timeout=60,
    )
    if r.status_code != 302:
        raise error(f"login of {user} failed: {r.status_code} {r.text[:300]}")
    s.headers["X-XSRFToken"] = s.cookies.get("_xsrf") or xsrf
    return s


def delete_account(name: str) -> subprocess.CompletedProcess[str] | None:
    """Kill whatever still runs as the system account ``name`` and ``userdel`` it; None if there is none."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return None
    for p in psutil.process_iter(["uids"]):
        if p.info["uids"] and p.info["uids"].real == uid:
            with contextlib.suppress(psutil.Error):
                p.kill()
    return subprocess.run(["userdel", name], check=False, capture_output=True, text=True)


def make_csv(path: Path, rows: int, seed: int) -> Path:
    """A small CSV of made-up visits (deterministic for a seed)."""
    import random

    rnd = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["patient,age,visits,cost"]
    lines += [
        f"p{i},{rnd.randint(18, 90)},{rnd.randint(0, 12)},{rnd.uniform(0, 5000):.2f}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


#: The insurance data's declared schema (so no privacy budget goes to estimating domains).
INSURANCE_SCHEMA: dict[str, Any] = {
    "target": "charges",
    "columns": [
        {"name": "age", "type": "integer", "min": 18, "max": 64, "bins": 8},
        {"name": "sex", "type": "categorical", "categories": ["female", "male"]},
        {"name": "bmi", "type": "float", "min": 15, "max": 55, "bins": 8, "decimals": 2},
        {"name": "children", "type": "integer", "min": 0, "max": 5},
        {"name": "smoker", "type": "categorical", "categories": ["no", "yes"]},
        {
            "name": "region",
            "type": "categorical",
            "categories": ["northeast", "northwest", "southeast", "southwest"],
        },
        {"name": "charges", "type": "float", "min": 0, "max": 65000, "bins": 8, "decimals": 2},
    ],
}


def write_fidelity_reports(out_dir: Path, rows: int = 300) -> dict[str, Path]:
    """Both fidelity reports of acme/insurance's file ``real.csv`` (the public insurance rows against their
    synthetic version, first ``rows`` of each), written by ``dcr_provider.fidelity`` as ``dcr provider add
    --report DIR --report-epsilon 1`` writes them. Returns ``{"<audience>.<html|json>": path}``."""
    from dcr_provider import fidelity
    from dcr_provider.domain import declared_domain
    from dcr_provider.schema import schema_from_json
    from dcr_provider.tables import read_table

    schema = schema_from_json(INSURANCE_SCHEMA)
    real = read_table(INSURANCE_REAL, schema)[0].head(rows)
    synthetic = read_table(INSURANCE_SYNTHETIC, schema)[0].head(rows)
    domains = [declared_domain(c) for c in schema.columns]
    context = {
        "file": INSURANCE_REAL.name,
        "mechanism": "mst",
        "protection": "dp",
        "epsilon": 4.0,
        "delta": 1e-6,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = fidelity.write_report(
        fidelity.researcher_report(real, synthetic, domains, context, 1.0), out_dir
    )
    written += fidelity.write_report(
        fidelity.provider_report(real, synthetic, domains, schema, context, seed=1), out_dir
    )
    return {p.name.split(".fidelity-", 1)[1]: p for p in written}


@dataclass
class Stores:
    """A dataset store holding acme/insurance (the public insurance rows) and globex/visits (generated)."""

    root: Path
    insurance: DatasetVersion
    visits: DatasetVersion


def make_stores(base: Path, *visits_args: str, rows: int = 200, seeds: tuple[int, int] = (1, 2)) -> Stores:
    """Register the two test datasets under ``base/store``; ``visits_args`` go to `dcr provider add`."""
    root = base / "store"
    insurance = register_dataset(root, "acme", "insurance", [(INSURANCE_REAL, INSURANCE_SYNTHETIC)])
    real = make_csv(base / "src" / "real" / "visits.csv", rows, seed=seeds[0])
    synthetic = make_csv(base / "src" / "synthetic" / "visits.csv", rows, seed=seeds[1])
    visits = register_dataset(root, "globex", "visits", [(real, synthetic)], *visits_args)
    return Stores(root, insurance, visits)


#: Quotas no test reaches unless it means to: each test exercises one limit at a time.
GENEROUS_QUOTAS = {
    "concurrent_jobs_per_user": 100,
    "jobs_per_day_per_user": 1000,
    "jobs_per_day_per_dataset": 10_000,
    "grant_requests_per_minute": 1000,
}


def policy_config(datasets: Mapping[str, Mapping[str, Any]], *, enable: bool = True, **traits: Any) -> str:
    """``jupyterhub_config.py`` lines for a DCR policy (``c.DCRPolicy.<trait> = <value>``) and the enable line."""
    lines = ["import dcr_spawner", f"c.DCRPolicy.datasets = {dict(datasets)!r}"]
    lines += [f"c.DCRPolicy.{k} = {v!r}" for k, v in traits.items()]
    if enable:
        lines.append("dcr_spawner.enable(c)")
    return "\n".join(lines) + "\n"


def dataset_entry(
    manifest: Any,
    store: Path,
    *,
    users: Iterable[str] = (),
    groups: Iterable[str] = (),
    release: str = "review",
) -> dict[str, Any]:
    """One ``c.DCRPolicy.datasets`` entry for a registered version."""
    return {
        "version": manifest.version,
        "store": str(store),
        "release": release,
        "entitled": {"users": list(users), "groups": list(groups)},
    }


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    if not dirs:
        raise HarnessError("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(dirs[-1])


class PostgresServer:
    """A throwaway PostgreSQL server on a free loopback port, in its own temporary directory.

    PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` account (created by
    the Debian package). Authentication is ``trust`` on loopback only; the database user is ``dcr``.
    """

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dcr-pg-"))
        self.data = self.dir / "data"
        self.account = "postgres" if os.geteuid() == 0 else None
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://dcr@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://dcr@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.account:
            cmd = ["runuser", "-u", self.account, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if r.returncode != 0:
            raise HarnessError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

    def start(self) -> PostgresServer:
        if self.account:
            pw = pwd.getpwnam(self.account)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "dcr", "--no-sync", "-E", "UTF8")
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "server.log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "-w",
            "-t",
            "60",
            "start",
        )
        self.started = True
        return self

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=dcr dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        if self.started:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            finally:
                self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
