"""Shared fixtures for DCR's tests.

Fixtures:

- ``insurance_real`` / ``insurance_synthetic``: paths of the public insurance data set in
  ``../shared/data/insurance/`` (read in place, never copied into the repository).
- ``run_cli``: runs ``dcr`` in-process (``dcr_enclave.commands.main.main``) and returns ``(exit_code, stdout, stderr)``.
- ``store``: a fresh dataset store with ``acme/insurance`` registered through ``dcr provider add``
  (real = the insurance rows, synthetic = their published MST version); yields a :class:`StoreInfo`.
- ``host``: a real :class:`~dcr_enclave.platform.host.EnclaveHost` serving on a temporary unix socket, with
  its own state directory, trusting the store's local development hub key; yields a :class:`HostInfo`.
- ``make_host``: starts such hosts on demand, ``make_host(name, **HostConfig overrides)``; each is shut down
  after the test (``host`` is ``make_host()``).
- ``make_notebook``: writes a notebook from a list of code-cell sources into a fresh workspace directory.
- ``demo_seed``: one real first run of ``dcr demo`` per session (it generates and synthesizes the demo's
  data, then is stopped); the modules that start a demo begin from a copy of its directory
  (``browser.demo_process.copy_demo_data``), so the suite synthesizes the demo's data once. ``make test``
  has it made ahead, beside the other lane (``tests/demo_seed.py``).

- pytest-jupyter's server fixtures (``jp_fetch``, ``jp_ws_fetch``, ``jp_serverapp``, ``jp_root_dir``, ...),
  loaded here for the whole suite.

Markers: ``root`` (needs root: namespaces, accounts), ``slow`` (more than a few seconds).
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import pytest
from hub_harness import PostgresServer

from dcr_enclave.commands.main import main as cli_main
from dcr_enclave.formats.jwk import public_jwk
from dcr_enclave.pack.signing_keys import load_or_create_key
from dcr_enclave.pack.store import DEV_HUB_KEY_FILE
from dcr_enclave.platform.client import HostClient
from dcr_enclave.platform.host import EnclaveHost, HostConfig

if TYPE_CHECKING:
    from demo_seed import DemoSeed

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture(scope="session")
def demo_seed(tmp_path_factory: pytest.TempPathFactory) -> DemoSeed:
    import demo_seed as seeds

    ahead = os.environ.get(seeds.SEED_ENV)
    if ahead:  # tests/lanes.py has it made beside the other lane
        return seeds.wait(Path(ahead))
    return seeds.make(tmp_path_factory.mktemp("demo-seed"))


#: The project's public test data, in ``shared/`` beside the checkout (never copied into it).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def insurance_real() -> Path:
    p = SHARED_DATA / "insurance" / "real.csv"
    assert p.is_file(), f"public test data missing at {p}"
    return p


@pytest.fixture(scope="session")
def insurance_synthetic() -> Path:
    return SHARED_DATA / "insurance" / "synthetic_mst.csv"


CliResult = tuple[int, str, str]


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    def run(*args: str | os.PathLike[str]) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli_main([str(a) for a in args])
            except SystemExit as e:  # argparse usage errors
                code = int(e.code or 0)
        return code, out.getvalue(), err.getvalue()

    return run


@dataclass
class StoreInfo:
    root: Path
    keys: Path
    provider: str
    dataset: str
    file_name: str

    @property
    def hub_key_path(self) -> Path:
        return self.keys / DEV_HUB_KEY_FILE


@pytest.fixture
def store(
    tmp_path: Path, run_cli: Callable[..., CliResult], insurance_real: Path, insurance_synthetic: Path
) -> StoreInfo:
    root = tmp_path / "store"
    code, _out, err = run_cli(
        "provider", "add", "--store", root, "--provider", "acme", "--dataset", "insurance",
        "--real", insurance_real, "--synthetic", insurance_synthetic,
    )  # fmt: skip
    assert code == 0, err
    return StoreInfo(root, root / ".keys", "acme", "insurance", insurance_real.name)


@dataclass
class HostInfo:
    host: EnclaveHost
    socket: Path
    state: Path
    client: HostClient

    @property
    def jwks_path(self) -> Path:
        return self.state / "public" / "jwks.json"


@pytest.fixture
def make_host(tmp_path: Path, store: StoreInfo) -> Iterator[Callable[..., HostInfo]]:
    started: list[EnclaveHost] = []

    def make(name: str = "host", **config: Any) -> HostInfo:
        hub_key = load_or_create_key(store.hub_key_path)
        config = {
            "state_dir": tmp_path / f"{name}-state",
            "socket_path": tmp_path / f"{name}.sock",
            "store": store.root,
            "keys_dir": store.keys,
            "hub_keys": [public_jwk(hub_key)],
            # Jobs under review end on this quantum (60 s in production); a test that is about it sets its own.
            "review_time_quantum": 1.0,
            **config,
        }
        state, sock = Path(config["state_dir"]), Path(config["socket_path"])
        h = EnclaveHost(HostConfig(**config))
        h.prepare()
        started.append(h)
        t = threading.Thread(target=h.serve_forever, daemon=True)
        t.start()
        for _ in range(500):
            if sock.exists():
                break
            threading.Event().wait(0.01)
        return HostInfo(h, sock, state, HostClient(sock))

    yield make
    for h in started:
        h.shutdown()


@pytest.fixture
def host(make_host: Callable[..., HostInfo]) -> HostInfo:
    return make_host()


@pytest.fixture
def make_notebook(tmp_path: Path) -> Callable[..., Path]:
    def make(cells: list[str], name: str = "analysis.ipynb", workspace: str = "workspace") -> Path:
        ws = tmp_path / workspace
        ws.mkdir(exist_ok=True)
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = ws / name
        nbformat.write(nb, path)
        return path

    return make


# ---------------------------------------------------------------------------------------------------------
# The hub's records database: every test that takes ``db_url`` runs on SQLite and on a real PostgreSQL
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on a free loopback port, one per test module."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh records database: a SQLite file, then a new database on the module's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dcr-hub.sqlite'}"
    server: PostgresServer = request.getfixturevalue("pg")
    return server.create_database("dcr_" + uuid.uuid4().hex[:12])
