"""``dcr demo`` from a checkout wherever a user clones it: under ``/tmp``, under ``/root``, under a space.

Where the checkout lies decides where the Python installation (its ``.venv``), the packages the servers
import and the demo directory (homes, store, keys) lie, and so which paths of a researcher's sandbox are
covered (the private ``/tmp``, the closed ``/root``, the home base) and which are shown again on top. Each
case builds a checkout at that place: the project's Python packages copied from this one (``git ls-files``),
a virtualenv beside them that imports them from there (as ``make``'s editable install does) and reaches the
third-party packages of this checkout's virtualenv, and the ``dcr`` command a user would run. It then runs
``make demo``'s command (``dcr demo --dir <checkout>/.demo``), logs alice in through the hub's form, waits
for her JupyterLab page, and runs code in a kernel of her server: it sees its synthetic data, its own home,
and none of the demo's store, keys or other homes.

Each case starts from a copy of the data the session's first demo run made (``demo_seed``): the demo reuses
data it finds, re-registering it for the enclave of the checkout that runs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser.demo_process import DemoProcess, copy_demo_data
from demo_seed import DemoSeed
from hub_harness import KernelResult, _execute

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
#: Importable name -> its directory in a checkout.
PACKAGES = {
    "dcr_spawner": "dcr_spawner",
    "dcr_server_ext": "dcr_server_ext",
    "dcr_demo": "dcr_demo",
    "dcr_provider": "dcr_provider",
    "dcr_enclave": "enclave/dcr_enclave",
}
#: A meta path finder for the copied packages, put first on the import machinery as an editable install's
#: finder is: the packages come from the new checkout, every other import from the path.
FINDER = '''"""Imports DCR's packages from the checkout this virtualenv belongs to."""
import importlib.abc, importlib.util, os, sys
ROOTS = {roots!r}
class CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in ROOTS:
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(ROOTS[name], "__init__.py"), submodule_search_locations=[ROOTS[name]]
        )
sys.meta_path.insert(0, CheckoutFinder())
'''


def make_checkout(at: Path) -> Path:
    """A checkout at ``at``: the project's packages, a ``.venv`` that imports them from there, ``dcr``."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "dcr_spawner", "dcr_server_ext", "dcr_demo", "dcr_provider",
         "enclave/dcr_enclave", "jupyter-config"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for f in filter(None, files):
        (at / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, at / f)
    venv = at / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "dcr_checkout_finder.py").write_text(
        FINDER.format(roots={k: str(at / v) for k, v in PACKAGES.items()})
    )
    this_site = sysconfig.get_path("purelib")
    (site / "dcr_checkout.pth").write_text(
        f"import dcr_checkout_finder\nimport site; site.addsitedir({this_site!r})\n"
    )
    # JupyterLab's application, the built extension and the server extension's enable file, inside the
    # virtualenv as `make jupyter` installs them (a server's sandbox reaches nothing of this checkout's).
    shutil.copytree(Path(sys.prefix) / "share" / "jupyter", venv / "share" / "jupyter")
    shutil.copytree(Path(sys.prefix) / "etc" / "jupyter", venv / "etc" / "jupyter")
    (venv / "share" / "jupyterhub").symlink_to(Path(sys.prefix) / "share" / "jupyterhub")  # the hub's own
    python = venv / "bin" / "python"
    for script, module in (("dcr", "dcr_enclave"), ("jupyterhub-singleuser", "jupyterhub.singleuser")):
        # The /bin/sh preamble pip writes when the interpreter's path holds a space.
        (venv / "bin" / script).write_text(
            f"#!/bin/sh\n'''exec' \"{python}\" \"$0\" \"$@\"\n' '''\n"
            f"import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        )
        (venv / "bin" / script).chmod(0o755)
    (at / ".npm").symlink_to(REPO / ".npm")  # JupyterHub's proxy, as `make` installs it
    return at


PROBE = """
    import json, os
    data = sorted(os.path.join(r, f) for r, _d, fs in os.walk("/data") for f in fs)
    demo = {demo!r}
    seen = {{}}
    for name in ("store", "hub", "enclave-host", "data", "homes"):
        try:
            seen[name] = sorted(os.listdir(os.path.join(demo, name)))
        except OSError as e:
            seen[name] = type(e).__name__
    print(json.dumps({{"data": data, "home": os.path.expanduser("~"), "notebook": os.path.exists("analysis.ipynb"),
                      "seen": seen, "uid": os.getuid()}}))
"""

#: Where a user may clone: (name, parent directory, directory name). Under /tmp the private /tmp of each
#: sandbox covers the checkout; under /root other accounts cannot enter it at all.
PLACES = [
    ("tmp-with-spaces", "/tmp", "my dcr checkout {}"),
    ("root", "/root", "dcr-checkout-{}"),
]


@pytest.fixture(params=PLACES, ids=[p[0] for p in PLACES])
def checkout(request: pytest.FixtureRequest, demo_seed: DemoSeed) -> Iterator[Path]:
    _name, parent, pattern = request.param
    at = Path(parent) / pattern.format(secrets.token_hex(3))
    at.mkdir(mode=0o755)
    try:
        make_checkout(at)
        copy_demo_data(demo_seed.dir, at / ".demo")
        yield at
    finally:
        shutil.rmtree(at, ignore_errors=True)


def test_the_demo_serves_jupyterlab_from_a_checkout_anywhere(checkout: Path) -> None:
    demo = DemoProcess(checkout / ".demo", dcr=checkout / ".venv" / "bin" / "dcr")
    try:
        demo.start()
        session = demo.login("alice")
        session.get(f"{demo.url}/hub/spawn", timeout=60)  # where the login form sends her: her server starts
        deadline = time.monotonic() + 180
        while True:  # the spawn-pending page sends her on to JupyterLab once her server answers
            page = session.get(f"{demo.url}/user/alice/lab", timeout=60)
            if page.url.endswith("/user/alice/lab") and page.status_code == 200:
                break
            assert time.monotonic() < deadline, f"no JupyterLab for alice: {page.status_code} {page.url}"
            time.sleep(0.5)
        assert "jupyter-config-data" in page.text
        token = demo.token("alice")
        r = demo.server("POST", "alice", "api/kernels", token, json={})
        assert r.status_code == 201, r.text
        ws = f"ws://127.0.0.1:{demo.port}/user/alice/api/kernels/{r.json()['id']}/channels"
        result: KernelResult = asyncio.run(
            _execute(ws, token, textwrap.dedent(PROBE.format(demo=str(demo.dir))), 120)
        )
        assert result.error is None, result
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert got["data"] == [
            "/data/riverside/labs/labs.csv",
            "/data/riverside/patients/patients.csv",
            "/data/riverside/visits/visits.csv",
        ]
        assert got["notebook"] is True and got["uid"] != 0
        assert got["home"] == str(demo.dir / "homes" / demo.account("alice"))
        # The demo's real data, store, hub keys and enclave state show nothing; of the homes only her own.
        for name in ("data", "store", "hub", "enclave-host"):
            assert got["seen"][name] in ([], "PermissionError"), (name, got["seen"][name])
        assert got["seen"]["homes"] == [demo.account("alice")]
    finally:
        demo.close()
