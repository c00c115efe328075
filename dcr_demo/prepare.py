"""What ``dcr demo`` sets up before it starts any process: directories, data, registration, keys, configs.

Everything lives in one demo directory (default ``.demo``)::

    demo.json        the demo's state: login password, registered versions, how the synthetic data was made
    data/            the provider's side (root only): real/<file>, synthetic/<file> with a .json of its protection,
                     reports/<dataset>/ the fidelity reports as ``dcr provider add --report`` wrote them
    reports/         the researcher-facing (DP) fidelity reports, <dataset>/<stem>.fidelity-researchers.{html,json}
                     (root only: the hub serves them)
    store/           the dataset store written by ``dcr provider add`` (root only)
    hub/             the hub's working directory: jupyterhub_config.py, its database, cookie secret, DCR keys
    public/          hub-jwks.json, the hub key the provider's condition and the enclave host pin
    enclave-host/    the enclave host's state (its public JWKS is the receipts' trust anchor)
    run/             enclave-host.sock
    homes/           the researchers' homes (their accounts are created on first spawn)
    server-config/   jupyter_server_config.json of the single-user servers (DCR server extension settings)
    skel/            files put into researchers' homes on their first spawn (the sample notebook)
    logs/            jupyterhub.log, enclave-host.log

The first run generates the "real" tables (seeded), makes their synthetic versions with the project's own
``dcr provider add --synthesize mst --epsilon 1 --report ... --report-epsilon 0.2`` (ε = 1 in all, 0.2 of it
spent on the researchers' fidelity report) and keeps a copy of each synthetic file with its protection.
Later runs reuse all of it. If the enclave code changed since (a developer's checkout), the providers'
key-release conditions no longer pin the enclave that would run, so the store is registered again from the
kept files: same data, a condition for the current enclave.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Final

from dcr_enclave.formats.contract import DATA_ROOT
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.pack.store import Store
from dcr_enclave.platform.key_store import KeyDirectory
from dcr_enclave.platform.measure import current_measurement

from . import data
from .data import Table
from .notebook import NOTEBOOK_NAME, sample_notebook_bytes

STATE_FILE: Final = "demo.json"
#: Entries ``dcr demo`` creates in its directory; a directory holding anything else is not a demo's.
OWN_ENTRIES: Final = frozenset(
    {
        STATE_FILE,
        "demo.lock",
        "data",
        "store",
        "hub",
        "public",
        "enclave-host",
        "run",
        "homes",
        "server-config",
        "skel",
        "logs",
        "reports",
    }
)
#: The total privacy budget of each synthetic version, of which REPORT_EPSILON is spent on the researchers'
#: fidelity report (Laplace noise of scale 28/0.2 on the patients' 28 histograms: a rough picture, which the
#: report states; the rest on MST).
EPSILON: Final = 1.0
REPORT_EPSILON: Final = 0.2
SYNTHESIZER: Final = "mst"
SYNTHESIS_SEED: Final = 1

#: Hub groups and who is in them.
GROUPS: Final[Mapping[str, tuple[str, ...]]] = {
    "researchers": ("alice", "bob"),
    "providers": ("carol",),
    "reviewers": ("rita",),
}
#: Who may use which dataset: the group of researchers gets the patients and the (reviewed) lab results,
#: alice also the visits.
ENTITLED: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    data.PATIENTS.ref: {"users": (), "groups": ("researchers",)},
    data.VISITS.ref: {"users": ("alice",), "groups": ()},
    data.LABS.ref: {"users": (), "groups": ("researchers",)},
}
RESEARCHERS: Final = ("alice", "bob")
PROVIDER_ACCOUNT: Final = "carol"
#: The provider's reviewer: approves or rejects held outputs of its ``review`` datasets in the hub's airlock.
REVIEWER_ACCOUNT: Final = "rita"
#: ``c.DCRPolicy.providers``: the provider's display name and its reviewers.
PROVIDERS: Final[Mapping[str, Mapping[str, Any]]] = {
    data.PROVIDER: {"name": "Riverside Hospital", "reviewers": {"users": [REVIEWER_ACCOUNT]}},
}

#: A job may run this long. The hub counts a job as running until its time limit has passed (it does not
#: take the user server's word for when it ended), so the demo's quotas are generous: people try things.
TIME_LIMIT: Final = 600
QUOTAS: Final = {
    "concurrent_jobs_per_user": 50,
    "jobs_per_day_per_user": 500,
    "jobs_per_day_per_dataset": 2000,
    "grant_requests_per_minute": 60,
}

Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------
# Layout and state
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Paths inside the demo directory (all absolute)."""

    root: Path
    data: Path
    store: Path
    hub: Path
    public: Path
    host_state: Path
    run: Path
    homes: Path
    server_config: Path
    skel: Path
    logs: Path
    reports: Path
    state_file: Path
    lock_file: Path
    socket: Path
    hub_jwks: Path
    hub_key: Path
    host_jwks: Path
    hub_config: Path
    hub_log: Path
    host_log: Path

    @classmethod
    def at(cls, root: Path) -> Layout:
        return cls(
            root=root,
            data=root / "data",
            store=root / "store",
            hub=root / "hub",
            public=root / "public",
            host_state=root / "enclave-host",
            run=root / "run",
            homes=root / "homes",
            server_config=root / "server-config",
            skel=root / "skel",
            logs=root / "logs",
            reports=root / "reports",
            state_file=root / STATE_FILE,
            lock_file=root / "demo.lock",
            socket=root / "run" / "enclave-host.sock",
            hub_jwks=root / "public" / "hub-jwks.json",
            hub_key=root / "hub" / "dcr-hub-key.pem",
            host_jwks=root / "enclave-host" / "public" / "jwks.json",
            hub_config=root / "hub" / "jupyterhub_config.py",
            hub_log=root / "logs" / "jupyterhub.log",
            host_log=root / "logs" / "enclave-host.log",
        )

    def real_file(self, table: Table) -> Path:
        return self.data / "real" / table.file_name

    def synthetic_file(self, table: Table) -> Path:
        return self.data / "synthetic" / table.file_name

    def schema_file(self, table: Table) -> Path:
        return self.data / f"{table.dataset}.schema.json"

    def protection_file(self, table: Table) -> Path:
        return self.data / "synthetic" / f"{table.file_name}.json"

    def provider_reports(self, table: Table) -> Path:
        """Where ``dcr provider add --report`` writes both reports (the provider-only one reads real rows)."""
        return self.data / "reports" / table.dataset

    def researcher_report(self, table: Table, suffix: str = "html") -> Path:
        """The researcher-facing fidelity report (computed from DP statistics only), ``html`` or ``json``."""
        return self.reports / table.dataset / f"{Path(table.file_name).stem}.fidelity-researchers.{suffix}"


#: Directory modes: private where real data, keys or hub secrets live; traversable where sandboxed servers
#: must reach something (the enclave host's socket and JWKS, the server configuration, their homes).
_MODES: Final = {
    "data": 0o700,
    "store": 0o700,
    "hub": 0o700,
    "public": 0o755,
    "run": 0o755,
    "homes": 0o755,
    "server-config": 0o755,
    "skel": 0o700,
    "logs": 0o700,
    "reports": 0o700,
}


@dataclass
class DemoState:
    """What the first run decided and later runs reuse (``demo.json``)."""

    password: str
    #: "provider/dataset" -> registered version
    versions: dict[str, str] = field(default_factory=dict)
    #: how the synthetic versions were made: "mst" (DP) or "random" (the fallback)
    synthesis: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"password": self.password, "versions": self.versions, "synthesis": self.synthesis}


def write_atomic(path: Path, content: bytes | str, mode: int) -> None:
    """Replace ``path`` with ``content`` (a temporary file in the same directory, renamed on success)."""
    raw = content.encode() if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_demo_dir(root: Path) -> None:
    """Refuse a path that is not a demo directory: only a new, empty or earlier demo directory is used."""
    if os.path.lexists(root):
        if root.is_symlink() or not root.is_dir():
            raise DCRError(f"{root} exists and is not a directory", hint="pass --dir with a new directory")
        foreign = sorted(p.name for p in root.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            raise DCRError(
                f"{root} is not a DCR demo directory (it holds {', '.join(foreign[:5])})",
                hint="pass --dir with a new or empty directory; dcr demo changes the modes of what it owns",
            )
    elif not root.parent.is_dir():
        raise DCRError(f"the parent of {root} does not exist", hint="create it first or choose another --dir")


def make_dirs(layout: Layout) -> None:
    os.chmod(layout.root, 0o711)  # sandboxed servers traverse it to their homes, the socket, the config
    for name, mode in _MODES.items():
        p = layout.root / name
        p.mkdir(mode=mode, exist_ok=True)
        if p.is_symlink() or not p.is_dir():
            raise DCRError(f"{p} is not a directory", hint=f"remove it; dcr demo creates {name}/ itself")
        os.chmod(p, mode)
    for sub in ("real", "synthetic"):
        (layout.data / sub).mkdir(mode=0o700, exist_ok=True)


def lock(layout: Layout) -> int:
    """Hold the demo directory for this process: two demos on one directory would share one store."""
    fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DCRError(
            f"another dcr demo is running on {layout.root}",
            hint="stop it first (Ctrl-C), or pass another --dir",
        ) from None
    return fd


def load_state(layout: Layout) -> DemoState:
    try:
        doc = json.loads(layout.state_file.read_text())
    except FileNotFoundError:
        return DemoState(password=secrets.token_urlsafe(9))
    except (OSError, ValueError) as e:
        raise DCRError(
            f"cannot read the demo state {layout.state_file}: {e}",
            hint="remove the demo directory to start over",
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("password"), str) or not doc["password"]:
        raise DCRError(f"{layout.state_file} is not a demo state file", hint="remove the demo directory")
    raw = doc.get("versions")
    versions = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return DemoState(doc["password"], versions, str(doc.get("synthesis", "")))


def save_state(layout: Layout, state: DemoState) -> None:
    write_atomic(layout.state_file, json.dumps(state.to_json(), indent=2) + "\n", 0o600)


# ---------------------------------------------------------------------------------------------------------
# Tools the demo needs
# ---------------------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The checkout this package runs from (where ``make`` installs ``.npm/``)."""
    return Path(__file__).resolve().parents[1]


def find_proxy(explicit: str | None) -> str:
    """configurable-http-proxy: ``--proxy``, the checkout's ``.npm/``, or ``$PATH``."""
    candidates = [explicit] if explicit else []
    if not explicit:
        candidates.append(str(repo_root() / ".npm" / "node_modules" / ".bin" / "configurable-http-proxy"))
        found = shutil.which("configurable-http-proxy")
        if found:
            candidates.append(found)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise DCRError(
        "configurable-http-proxy (JupyterHub's proxy) is not installed"
        + (f" at {explicit}" if explicit else ""),
        hint=f"run `make demo`, or: npm install --prefix {repo_root() / '.npm'} configurable-http-proxy@5",
    )


def check_tools() -> None:
    """JupyterLab and the single-user server must be installed in this Python environment."""
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is None:
        raise DCRError(
            "JupyterLab is not installed in this Python environment",
            hint=f'{sys.executable} -m pip install "jupyterlab>=4.2,<5"',
        )
    if not os.access(singleuser_command(), os.X_OK):
        raise DCRError(f"{singleuser_command()} is missing", hint="pip install jupyterhub")


def singleuser_command() -> str:
    return str(Path(sys.executable).parent / "jupyterhub-singleuser")


def check_port(port: int, what: str = "--port") -> None:
    if not 1 <= port <= 65535:
        raise DCRError(f"{what} must be between 1 and 65535, not {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise DCRError(
                f"port {port} on 127.0.0.1 is in use (another demo still running?)",
                hint=f"stop what listens there or pass another {what}",
            ) from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def synthesizer_problem() -> str | None:
    """Why ``--synthesize mst`` cannot run here, or ``None`` when it can."""
    found = [ep for ep in entry_points(group="dcr.synthesizers") if ep.name == SYNTHESIZER]
    if not found:
        return f"no synthesizer named {SYNTHESIZER!r} is installed (entry-point group dcr.synthesizers)"
    try:
        found[0].load()
    except Exception as e:  # an import error of the synthesis libraries: fall back, and say why
        return f"the {SYNTHESIZER} synthesizer cannot be loaded ({type(e).__name__}: {e})"
    return None


# ---------------------------------------------------------------------------------------------------------
# Data and registration
# ---------------------------------------------------------------------------------------------------------


def ensure_real_data(layout: Layout, state: DemoState, say: Say) -> None:
    """The seeded "real" tables; written again until a first run has registered them (a directory left by
    an interrupted or older run may hold other rows under the same names)."""
    for table in data.TABLES:
        path = layout.real_file(table)
        if not path.exists() or not state.versions:
            data.write_csv(path, table.columns, data.real_rows(table))
            say(f"generated the real table {table.ref}: {table.rows} rows (seeded) in {path}")


def _registered(layout: Layout, state: DemoState, thumbprint: str, measurement: str) -> bool:
    """True when every dataset is in the store and its condition pins the hub key and this enclave."""
    store, keys = Store(layout.store), KeyDirectory(layout.store / ".keys")
    for table in data.TABLES:
        version = state.versions.get(table.ref)
        if not version or not store.exists(data.PROVIDER, table.dataset, version):
            return False
        condition = keys.read_condition(data.PROVIDER, table.dataset)
        if (
            condition is None
            or version not in condition.versions
            or measurement not in condition.enclave_digests
            or thumbprint not in condition.hub_key_thumbprints
        ):
            return False
    return True


def _provider_add(layout: Layout, table: data.Table, extra: list[str]) -> str:
    """``dcr provider add`` as a provider runs it; returns the version it registered."""
    store = Store(layout.store)
    before = (
        {m.version for m in store.versions(data.PROVIDER, table.dataset)} if layout.store.exists() else set()
    )
    cmd = [
        sys.executable, "-m", "dcr_enclave", "provider", "add",
        "--store", str(layout.store), "--provider", data.PROVIDER, "--dataset", table.dataset,
        "--real", str(layout.real_file(table)), "--hub-key", str(layout.hub_jwks), "--release", table.release,
        *extra,
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if r.returncode != 0:
        raise DCRError(
            f"dcr provider add for {table.ref} failed ({r.returncode}): {r.stderr.strip()[-2000:]}"
        )
    added = [m for m in store.versions(data.PROVIDER, table.dataset) if m.version not in before]
    if len(added) != 1:
        # Same content as a version already there: that one is ours.
        manifests = store.versions(data.PROVIDER, table.dataset)
        if not manifests:
            raise DCRError(f"dcr provider add reported success but {table.ref} is not in {layout.store}")
        return manifests[-1].version
    return added[0].version


def _keep_synthetic(layout: Layout, table: data.Table, version: str) -> None:
    """Copy the registered synthetic file and its protection out of the store, for later registrations."""
    store = Store(layout.store)
    manifest = store.load(data.PROVIDER, table.dataset, version)
    p = manifest.protection
    write_atomic(
        layout.synthetic_file(table), store.synthetic_path(manifest, table.file_name).read_bytes(), 0o600
    )
    doc = {"kind": p.kind, "mechanism": p.mechanism, "epsilon": p.epsilon, "delta": p.delta}
    write_atomic(layout.protection_file(table), json.dumps(doc) + "\n", 0o600)


def _publish_researcher_report(layout: Layout, table: Table) -> None:
    """Copy the researcher-facing report (DP statistics only) out of the provider's private reports. The
    provider-only report stays in data/: it is computed from the real rows."""
    target = layout.researcher_report(table).parent
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for suffix in ("html", "json"):
        found = sorted(layout.provider_reports(table).glob(f"*.fidelity-researchers.{suffix}"))
        if len(found) != 1:
            raise DCRError(
                f"dcr provider add wrote {len(found)} researcher-facing fidelity reports (.{suffix}) into "
                f"{layout.provider_reports(table)}, not one"
            )
        write_atomic(layout.researcher_report(table, suffix), found[0].read_bytes(), 0o644)


def _kept_synthetic_args(layout: Layout, table: Table) -> list[str] | None:
    try:
        doc = json.loads(layout.protection_file(table).read_text())
    except (OSError, ValueError):
        return None
    if not layout.synthetic_file(table).is_file() or not isinstance(doc, dict) or "kind" not in doc:
        return None
    args = ["--synthetic", str(layout.synthetic_file(table)), "--protection", str(doc["kind"])]
    for key in ("mechanism", "epsilon", "delta"):
        if doc.get(key) is not None:
            args += [f"--{key}", str(doc[key])]
    return args


def ensure_datasets(layout: Layout, state: DemoState, thumbprint: str, say: Say) -> str:
    """Register the tables unless they already are, for this hub key and this enclave code (whose
    measurement is returned: the digest the conditions and the servers pin)."""
    measurement = current_measurement()
    if layout.store.exists() and _registered(layout, state, thumbprint, measurement):
        say(f"reusing the registered datasets in {layout.store}")
        return measurement
    if layout.store.exists() and any(layout.store.iterdir()):
        say(
            "the enclave code or hub key changed since the datasets were registered, or a demo dataset is new: "
            "registering them again"
        )
        shutil.rmtree(layout.store)
    layout.store.mkdir(mode=0o700, exist_ok=True)
    problem: str | None = None
    for table in data.TABLES:
        kept = _kept_synthetic_args(layout, table)
        if kept is not None:
            version = _provider_add(layout, table, kept)
        else:
            problem = problem or synthesizer_problem()
            if problem is None:
                say(
                    f"making the DP synthetic version of {table.ref} with {SYNTHESIZER.upper()} (ε = {EPSILON:g})..."
                )
                schema = layout.schema_file(table)
                write_atomic(schema, json.dumps(table.schema(), indent=2) + "\n", 0o600)
                extra = [
                    "--synthesize", SYNTHESIZER, "--epsilon", str(EPSILON),
                    "--seed", str(SYNTHESIS_SEED), "--schema", str(schema),
                    "--report", str(layout.provider_reports(table)), "--report-epsilon", str(REPORT_EPSILON),
                ]  # fmt: skip
                version = _provider_add(layout, table, extra)
                state.synthesis = SYNTHESIZER
                _publish_researcher_report(layout, table)
                say(f"fidelity report for researchers: {layout.researcher_report(table)}")
            else:
                say(
                    f"NOTE: {problem}; the synthetic version of {table.ref} is a random draw from each "
                    "column's domain instead (--protection random), not DP synthetic data. Install "
                    "jupyterhub-dcr[synthesis] and remove the demo directory for MST."
                )
                data.write_csv(layout.synthetic_file(table), table.columns, data.random_rows(table))
                doc = {"kind": "random", "mechanism": None, "epsilon": None, "delta": None}
                write_atomic(layout.protection_file(table), json.dumps(doc) + "\n", 0o600)
                version = _provider_add(layout, table, _kept_synthetic_args(layout, table) or [])
                state.synthesis = "random"
            _keep_synthetic(layout, table, version)
        state.versions[table.ref] = version
        say(f"registered {table.ref} version {version}")
    # The spawner refuses a store other accounts could read (real data, manifests, providers' keys).
    os.chmod(layout.store, 0o700)
    save_state(layout, state)
    return measurement


# ---------------------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------------------


def ensure_hub_key(layout: Layout) -> str:
    """The hub's grant signing key (generated once) and its public JWKS; returns its thumbprint."""
    from dcr_spawner.hubkey import load_or_create_hub_key

    key = load_or_create_hub_key(layout.hub_key)
    write_atomic(layout.hub_jwks, json.dumps(key.jwks(), indent=2) + "\n", 0o644)
    return key.thumbprint


def write_skeleton(layout: Layout) -> Path:
    path = layout.skel / NOTEBOOK_NAME
    t = data.PATIENTS
    write_atomic(path, sample_notebook_bytes(f"{DATA_ROOT}/{data.PROVIDER}/{t.dataset}/{t.file_name}"), 0o600)
    return path


def server_config() -> dict[str, Any]:
    """``jupyter_server_config.json`` of the single-user servers: the DCR server extension switched on. What
    it talks to and verifies against (the hub's grants, the enclave host, its signer and digest), the
    spawner hands every server from the hub's platform settings (``c.LocalEnclaveHost``)."""
    return {"ServerApp": {"jpserver_extensions": {"dcr_server_ext": True}}}


@dataclass(frozen=True)
class Ports:
    public: int
    hub: int
    proxy_api: int


def entitled_datasets(user: str) -> list[str]:
    groups = {g for g, members in GROUPS.items() if user in members}
    return [ref for ref, e in ENTITLED.items() if user in e["users"] or groups & set(e["groups"])]


def hub_config(
    layout: Layout,
    state: DemoState,
    ports: Ports,
    proxy: str,
    account_prefix: str,
    skeleton: Path,
    enclave_digest: str,
) -> str:
    """The demo's ``jupyterhub_config.py``."""
    datasets: dict[str, dict[str, Any]] = {
        t.ref: {
            "version": state.versions[t.ref],
            "store": str(layout.store),
            "release": t.release,
            "entitled": {k: list(v) for k, v in ENTITLED[t.ref].items()},
            "description": t.description,
        }
        for t in data.TABLES
    }
    for t in data.TABLES:
        # Only the researcher-facing (DP) report; demo directories made before reports existed have none.
        report = layout.researcher_report(t)
        if report.is_file():
            datasets[t.ref]["fidelity_report"] = str(report)
    users = sorted({u for members in GROUPS.values() for u in members})
    readable = [str(layout.server_config)]  # the enclave host's socket and signer: from c.LocalEnclaveHost
    hub = layout.hub
    lines = [
        '"""DCR demo hub, written by `dcr demo` at every start (edits are overwritten)."""',
        "import dcr_spawner",
        "from dcr_demo.hub import HomeSeeder",
        "",
        "c = get_config()  # noqa",
        "",
        "# JupyterHub on loopback only, with the real configurable-http-proxy",
        'c.JupyterHub.ip = "127.0.0.1"',
        f"c.JupyterHub.port = {ports.public}",
        'c.JupyterHub.hub_ip = "127.0.0.1"',
        f"c.JupyterHub.hub_port = {ports.hub}",
        f'c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports.proxy_api}"',
        f"c.ConfigurableHTTPProxy.command = [{proxy!r}]",
        f"c.ConfigurableHTTPProxy.pid_file = {str(hub / 'proxy.pid')!r}",
        f"c.JupyterHub.db_url = {'sqlite:///' + str(hub / 'jupyterhub.sqlite')!r}",
        f"c.JupyterHub.cookie_secret_file = {str(hub / 'jupyterhub_cookie_secret')!r}",
        f"c.JupyterHub.pid_file = {str(hub / 'jupyterhub.pid')!r}",
        "",
        "# Demo logins: one password for everyone (DummyAuthenticator is for demos and tests only)",
        'c.JupyterHub.authenticator_class = "dummy"',
        f"c.DummyAuthenticator.password = {state.password!r}",
        f"c.Authenticator.allowed_users = {set(users)!r}",
        f"c.JupyterHub.load_groups = {{g: {{'users': list(u)}} for g, u in {dict(GROUPS)!r}.items()}}",
        "",
        "# Each researcher's server: its own account, /data = the entitled synthetic files, JupyterLab",
        'c.JupyterHub.spawner_class = "dcr-local"',
        f"c.DCRLocalSpawner.account_prefix = {account_prefix!r}",
        f"c.DCRLocalSpawner.home_base = {str(layout.homes)!r}",
        f"c.DCRLocalSpawner.hidden_paths = {[str(layout.data), str(layout.logs), str(layout.skel)]!r}",
        "# What the servers read outside their home, shown even when the demo directory is under /tmp",
        f"c.DCRLocalSpawner.readable_paths = {readable!r}",
        f"c.Spawner.cmd = [{singleuser_command()!r}]",
        'c.Spawner.default_url = "/lab"',
        f"c.Spawner.environment = {{'JUPYTER_CONFIG_PATH': {str(layout.server_config)!r}}}",
        "c.Spawner.start_timeout = 180",
        "c.Spawner.http_timeout = 180",
        f"c.Spawner.pre_spawn_hook = HomeSeeder({{{NOTEBOOK_NAME!r}: {str(skeleton)!r}}})",
        "",
        "# DCR policy: the demo datasets (patients and visits released automatically, the lab results after",
        f"# the provider's review) and the provider, whose reviewer {REVIEWER_ACCOUNT} decides in the hub's airlock",
        f"c.DCRPolicy.providers = {dict(PROVIDERS)!r}",
        f"c.DCRPolicy.datasets = {datasets!r}",
        f"c.DCRPolicy.time_limit = {TIME_LIMIT}",
        f"c.DCRPolicy.quotas = {QUOTAS!r}",
        f"c.DCRPolicy.hub_key_file = {str(layout.hub_key)!r}",
        f"c.DCRPolicy.airlock_key_file = {str(hub / 'dcr-airlock.key')!r}",
        f"c.DCRPolicy.db_url = {'sqlite:///' + str(hub / 'dcr-hub.sqlite')!r}",
        "",
        "# The local enclave host (SIMULATED): every server submits there and verifies receipts against its",
        "# published signer and the enclave code the providers' conditions name",
        f"c.LocalEnclaveHost.socket_path = {str(layout.socket)!r}",
        f"c.LocalEnclaveHost.trust_jwks = {[str(layout.host_jwks)]!r}",
        f"c.LocalEnclaveHost.enclave_digests = {[enclave_digest]!r}",
        "dcr_spawner.enable(c)",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Demo:
    """A prepared demo directory, ready to start."""

    layout: Layout
    state: DemoState
    ports: Ports
    account_prefix: str
    #: Open while the demo runs: its lock on the directory.
    lock_fd: int


def prepare(root: Path, port: int, proxy: str | None, account_prefix: str, say: Say = print) -> Demo:
    """Check the inputs, then create or reuse the demo directory's data, store, keys and configuration."""
    if os.geteuid() != 0:
        raise DCRError(
            "dcr demo must run as root",
            hint="the local enclave creates namespaces and accounts, and each researcher's server runs as "
            "its own account; run it with sudo or as root",
        )
    root = root.absolute()
    check_demo_dir(root)
    check_port(port)
    proxy_cmd = find_proxy(proxy)
    check_tools()
    from dcr_spawner.local import PREFIX_RE

    if not PREFIX_RE.match(account_prefix) or not account_prefix:
        raise DCRError(
            f"--account-prefix {account_prefix!r} is not a valid account name prefix",
            hint="lower-case letters, digits, '-' and '_', starting with a letter, at most 16 characters",
        )

    layout = Layout.at(root)
    root.mkdir(mode=0o711, exist_ok=True)
    lock_fd = lock(layout)
    try:
        make_dirs(layout)
        state = load_state(layout)
        save_state(layout, state)
        thumbprint = ensure_hub_key(layout)
        ensure_real_data(layout, state, say)
        measurement = ensure_datasets(layout, state, thumbprint, say)
        skeleton = write_skeleton(layout)
        write_atomic(
            layout.server_config / "jupyter_server_config.json",
            json.dumps(server_config(), indent=2) + "\n",
            0o644,
        )
        ports = Ports(port, free_port(), free_port())
        config = hub_config(layout, state, ports, proxy_cmd, account_prefix, skeleton, measurement)
        write_atomic(layout.hub_config, config, 0o600)
    except BaseException:
        os.close(lock_fd)
        raise
    return Demo(layout, state, ports, account_prefix, lock_fd)
