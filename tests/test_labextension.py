"""The JupyterLab extension as installed: built from source, known to JupyterLab, enabled, and carried by
the wheel of the ``jupyterhub-dcr`` distribution."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).with_name("jupyter")
BUILT = REPO / "dcr_labextension" / "labextension"
EXTENSION = "@jupyterhub-dcr/labextension"
#: Where a wheel's data files for ``<prefix>/share/jupyter/labextensions/<name>/`` are.
WHEEL_DATA = f"jupyterhub_dcr-0.1.0.data/data/share/jupyter/labextensions/{EXTENSION}"


def _pip(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # --no-build-isolation: the venv's setuptools builds it, nothing is downloaded.
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )


def _labextension_list(jupyter_path: Path) -> str:
    env = {**os.environ, "JUPYTER_PATH": str(jupyter_path)}
    out = subprocess.run(
        [JUPYTER, "labextension", "list"], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    return out.stdout + out.stderr


def test_labextension_is_listed_enabled() -> None:
    """`jupyter labextension list` shows @jupyterhub-dcr/labextension as enabled and OK (the Makefile builds
    it from source and links it into the environment before the tests run)."""
    out = subprocess.run([JUPYTER, "labextension", "list"], capture_output=True, text=True, timeout=120)
    lines = [
        line for line in (out.stdout + out.stderr).splitlines() if "@jupyterhub-dcr/labextension" in line
    ]
    assert lines, out.stdout + out.stderr
    assert "enabled" in lines[0] and "OK" in lines[0], lines[0]


def test_built_extension_declares_the_toolbar_button_and_matches_its_source() -> None:
    """The built extension carries the settings schema whose toolbar definition puts "Submit to enclave" on
    the notebook toolbar, and the version of its package.json."""
    built = REPO / "dcr_labextension" / "labextension"
    pkg = json.loads((built / "package.json").read_text())
    src = json.loads((REPO / "dcr_labextension" / "package.json").read_text())
    assert pkg["name"] == src["name"] == "@jupyterhub-dcr/labextension"
    assert pkg["version"] == src["version"]
    schemas = list((built / "schemas" / "@jupyterhub-dcr" / "labextension").glob("*.json"))
    toolbar = [
        item
        for s in schemas
        for item in json.loads(s.read_text()).get("jupyter.lab.toolbars", {}).get("Notebook", [])
    ]
    assert any(item.get("command") == "dcr:submit" for item in toolbar), toolbar


@pytest.fixture
def repo_build_dir() -> Iterator[None]:
    """Removes the setuptools ``build/`` directory a wheel build of the checkout leaves, if it made it."""
    build = REPO / "build"
    existed = build.exists()
    yield
    if not existed:
        shutil.rmtree(build, ignore_errors=True)


@pytest.mark.usefixtures("repo_build_dir")
def test_wheel_carries_the_prebuilt_extension_and_installs_it_where_jupyterlab_looks(tmp_path: Path) -> None:
    """A wheel of the root project holds every file of the built extension byte for byte, with install.json,
    under share/jupyter/labextensions/@jupyterhub-dcr/labextension/ (and the server extension's
    enable-on-install file); installed into a fresh prefix, JupyterLab lists the extension from that prefix
    as enabled, OK and coming from the jupyterhub-dcr Python package."""
    r = _pip(
        "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(REPO)
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("jupyterhub_dcr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        packed = {n[len(WHEEL_DATA) + 1 :]: z.read(n) for n in names if n.startswith(WHEEL_DATA + "/")}
    built = {p.relative_to(BUILT).as_posix(): p.read_bytes() for p in BUILT.rglob("*") if p.is_file()}
    assert {"package.json", "schemas/@jupyterhub-dcr/labextension/plugin.json"} <= set(built)
    assert any(n.startswith("static/remoteEntry.") for n in built), sorted(built)
    assert packed.pop("install.json") == (REPO / "dcr_labextension" / "install.json").read_bytes()
    assert packed == built
    assert json.loads(packed["package.json"])["name"] == EXTENSION
    etc = "jupyterhub_dcr-0.1.0.data/data/etc/jupyter"
    assert f"{etc}/jupyter_server_config.d/dcr_server_ext.json" in names
    assert f"{etc}/labconfig/page_config.d/dcr_labextension.json" in names

    prefix = tmp_path / "prefix"
    r = _pip("install", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(prefix), str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    share = prefix / "share" / "jupyter"
    assert (share / "labextensions" / EXTENSION / "install.json").is_file()
    listing = _labextension_list(share).splitlines()
    start = listing.index(str(share / "labextensions"))
    line = next(item for item in listing[start + 1 :] if EXTENSION in item)
    assert "enabled" in line and "OK" in line and "(python, jupyterhub-dcr)" in line, listing


def test_a_wheel_of_a_checkout_without_the_built_extension_is_refused(tmp_path: Path) -> None:
    """Building a wheel of a checkout whose extension was never built fails, saying the extension is not
    built and how to build it, and writes no wheel; an editable build of the same checkout (the Makefile
    installs the project editable before it can build the extension) still works and carries no extension."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, checkout / name)
    shutil.copytree(REPO / "jupyter-config", checkout / "jupyter-config")

    r = _pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(tmp_path / "dist"),
        str(checkout),
    )
    assert r.returncode != 0
    assert "the JupyterLab extension is not built" in r.stdout + r.stderr
    assert "make jupyter" in r.stdout + r.stderr
    assert not list((tmp_path / "dist").glob("*.whl"))

    editable = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))",
            str(tmp_path / "editable"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=checkout,
        check=False,
    )
    assert editable.returncode == 0, editable.stdout + editable.stderr
    with zipfile.ZipFile(tmp_path / "editable" / editable.stdout.split()[-1]) as z:
        assert not [n for n in z.namelist() if "labextensions" in n]


#: The JupyterLab plugin that asks "Would you like to get notified about official Jupyter news?".
ANNOUNCEMENTS = "@jupyterlab/apputils-extension:announcements"


def test_served_jupyterlab_announces_nothing_from_outside(tmp_path: Path) -> None:
    """JupyterLab as this environment serves it (the configuration the package installs, nothing passed on
    the command line): the page config names the announcements plugin disabled, so no new user is asked
    about Jupyter news and the page neither fetches the news feed nor checks for updates."""
    from hub_harness import free_port

    port, token = free_port(), "t" * 32
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "user-config"),  # no personal config in the way
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "HOME": str(tmp_path),
    }
    env.pop("JUPYTER_CONFIG_PATH", None)
    server = subprocess.Popen(
        [JUPYTER, "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        page = _get_when_up(f"{base}/lab?token={token}", server)
        found = re.search(
            r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S
        )
        assert found, page[:2000]
        config = json.loads(found.group(1))
        assert ANNOUNCEMENTS in config["disabledExtensions"], config["disabledExtensions"]  # served as a list
    finally:
        server.terminate()
        server.wait(timeout=60)


def _get_when_up(url: str, server: subprocess.Popen[str]) -> str:
    """The body of ``url`` once the server answers it; fails with the server's log if it exits first."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 120  # a start-up deadline, not a timing assertion
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - http on loopback, built here
                return r.read().decode()
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None:
                log = server.stderr.read() if server.stderr else ""
                raise AssertionError(f"jupyter lab exited: {log}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
