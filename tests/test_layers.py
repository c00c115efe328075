"""The enclave package's layers: who may import whom, and what the local measurement covers.

``formats`` is shared by every side; ``runtime`` is what the enclave image runs; ``cloud`` is the image's
Confidential Space entry point around it (the only layer of the TCB that may import Google's client
libraries); ``verify`` is the offline verifier; ``platform`` (the local TEE simulation), ``pack`` (producers) and ``commands`` stay outside the
image. The rules are checked twice: statically over every module's imports, and by importing the entry
points in a fresh interpreter and listing what was loaded.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dcr_enclave
from dcr_enclave.platform import measure
from dcr_enclave.platform.measure import MEASURED_PARTS, combine, environment_manifest, measure_tree

PACKAGE = Path(dcr_enclave.__file__).parent
LAYERS = ("formats", "runtime", "cloud", "verify", "platform", "pack", "commands")
#: The layers each layer may import (besides itself and the package's ``__init__``).
ALLOWED = {
    "formats": set(),
    "runtime": {"formats"},
    "cloud": {"formats", "runtime"},
    "verify": {"formats"},
    "platform": {"formats", "verify", "pack"},
    "pack": {"formats", "verify", "platform"},
    "commands": set(LAYERS),
}


def _imports(path: Path) -> set[str]:
    """Every ``dcr_enclave`` module a file imports, at any depth of its code (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcr_enclave"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the layers use absolute imports")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dcr_enclave"))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in _imports(path):
            target = _layer(module)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not bad, "\n".join(bad)


#: The layers whose modules may import Google's client libraries (the ``gcp`` extra).
GOOGLE_ALLOWED = {"cloud"}


def _google_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found.update(n for n in names if n == "google" or n.startswith(("google.", "google_")))
    return found


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer not in GOOGLE_ALLOWED])
def test_only_the_cloud_layer_imports_google_libraries(layer: str) -> None:
    bad = [
        f"{path.relative_to(PACKAGE)} imports {module}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for module in _google_imports(path)
    ]
    assert not bad, "\n".join(bad)


def test_the_cloud_entry_point_loads_no_local_platform_or_producer_code() -> None:
    loaded = _loaded_by("import dcr_enclave.cloud.run, dcr_enclave.cloud.link, dcr_enclave.cloud.__main__")
    assert "dcr_enclave.cloud.run" in loaded
    assert [m for m in loaded if _layer(m) not in (None, "formats", "runtime", "cloud")] == []


def test_no_module_is_left_outside_the_layers() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"]


def _loaded_by(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r})\n{code}\nimport json\n"
         "print(json.dumps(sorted(m for m in sys.modules if m.startswith('dcr_enclave'))))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def test_the_supervisor_loads_only_formats_and_runtime() -> None:
    loaded = _loaded_by("import dcr_enclave.runtime.supervisor")
    assert "dcr_enclave.runtime.supervisor" in loaded
    outside = [m for m in loaded if _layer(m) not in (None, "formats", "runtime")]
    assert outside == []


def test_the_verifier_loads_no_signing_code() -> None:
    loaded = _loaded_by(
        "import dcr_enclave.verify.receipt, dcr_enclave.verify.token, dcr_enclave.verify.trust"
    )
    assert "dcr_enclave.verify.receipt" in loaded
    assert [m for m in loaded if _layer(m) not in (None, "formats", "verify")] == []
    assert not any(m.endswith(("signer", "signing_keys", "grant_issuer")) for m in loaded)


# -- the measurement -----------------------------------------------------------------------------------------


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "dcr_enclave"
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _touch(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")


@pytest.mark.parametrize(
    "edited", ["commands/provider.py", "platform/host.py", "verify/receipt.py", "pack/store.py"]
)
def test_editing_code_outside_the_image_leaves_the_measurement_unchanged(
    package_copy: Path, edited: str
) -> None:
    before = measure_tree(package_copy, MEASURED_PARTS)
    _touch(package_copy / edited)
    assert measure_tree(package_copy, MEASURED_PARTS) == before


@pytest.mark.parametrize("edited", ["runtime/supervisor.py", "formats/contract.py", "__init__.py"])
def test_editing_code_in_the_image_changes_the_measurement(package_copy: Path, edited: str) -> None:
    before = measure_tree(package_copy, MEASURED_PARTS)
    _touch(package_copy / edited)
    assert measure_tree(package_copy, MEASURED_PARTS) != before


def _site(root: Path, version: str, code: str) -> Path:
    site = root / "site-packages"
    shutil.rmtree(site, ignore_errors=True)
    (site / "libfoo").mkdir(parents=True)
    (site / "libfoo" / "__init__.py").write_text(code)
    info = site / f"libfoo-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: libfoo\nVersion: {version}\n")
    return site


def test_upgrading_a_library_changes_the_environment_digest(tmp_path: Path) -> None:
    site = _site(tmp_path, "1.0", "X = 1\n")
    before = environment_manifest([str(site)])
    assert ["libfoo", "1.0"] in before["distributions"]
    assert environment_manifest([str(site)])["digest"] == before["digest"]
    _site(tmp_path, "1.1", "X = 2\n")
    after = environment_manifest([str(site)])
    assert ["libfoo", "1.1"] in after["distributions"]
    assert after["digest"] != before["digest"]
    assert combine("sha256:" + "0" * 64, after["digest"]) != combine("sha256:" + "0" * 64, before["digest"])


def test_a_library_file_changed_in_place_changes_the_environment_digest(tmp_path: Path) -> None:
    site = _site(tmp_path, "1.0", "X = 1\n")
    before = environment_manifest([str(site)])["digest"]
    (site / "libfoo" / "__init__.py").write_text("X = 3\n")  # same size, same version: the content counts
    assert environment_manifest([str(site)])["digest"] != before


def test_byte_code_caches_are_not_measured(tmp_path: Path) -> None:
    site = _site(tmp_path, "1.0", "X = 1\n")
    before = environment_manifest([str(site)])["digest"]
    (site / "libfoo" / "__pycache__").mkdir()
    (site / "libfoo" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0" * 16)
    assert environment_manifest([str(site)])["digest"] == before


def test_the_default_environment_is_the_isolated_interpreters_import_path() -> None:
    paths = measure.import_path()
    assert paths, "the interpreter has an import path"
    assert all(Path(p).is_dir() for p in paths)
    # the checkout and the tests' own directories are not on an isolated interpreter's path
    assert str(Path(__file__).resolve().parent) not in paths


@pytest.mark.root
def test_the_host_image_holds_formats_and_runtime_and_its_digest_is_the_providers_default(
    host, run_cli
) -> None:
    """The image holds the measured parts; its digest is the providers' default, the one ``ping`` reports,
    the one the host publishes in ``STATE/public/image-digest`` and the one ``dcr enclave-host
    --print-measurement`` prints without any other option."""
    image = host.host.image_dir / "dcr_enclave"
    assert sorted(p.name for p in image.iterdir() if p.name != "__pycache__") == sorted(MEASURED_PARTS)
    assert host.host.measurement() == measure.current_measurement()
    assert host.client.ping()["image_digest"] == host.host.measurement()
    assert (host.state / "public" / "image-digest").read_text() == host.host.measurement() + "\n"
    assert run_cli("enclave-host", "--print-measurement") == (0, host.host.measurement() + "\n", "")
    code, _out, err = run_cli("enclave-host", "--store", host.state)
    assert code == 2 and "the following arguments are required: --hub-key" in err, err
