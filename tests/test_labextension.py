"""The JupyterLab extension as installed: built from source, known to JupyterLab, enabled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).with_name("jupyter")


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
