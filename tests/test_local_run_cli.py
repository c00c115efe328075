"""``dcr local-run``'s arguments: which datasets a run is granted, and bad input refused before anything is
written (no --out, no host state, no keys, no change to the store or the workspace)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dcr_enclave.formats import contract

#: A second provider's dataset, registered beside the ``store`` fixture's acme/insurance.
VISITS_REAL = "region,visits\nnorth,3\nsouth,5\n"
VISITS_SYNTHETIC = "region,visits\nnorth,4\nsouth,4\n"

LIST_DATA = [
    "# written against /data/acme/insurance/real.csv once; now only the visits are needed",
    "import os, json\n"
    "seen = sorted(os.path.join(r, f) for r, _d, fs in os.walk('/' + 'data') for f in fs)\n"
    "json.dump(seen, open('seen.json', 'w'))\n"
    "open('visits.txt', 'w').write(open('/data/globex/visits/real.csv').read())",
]


@pytest.fixture
def visits(tmp_path: Path, store: Any, run_cli: Callable[..., Any]) -> Any:
    """globex/visits added to the ``store`` fixture's store (local development hub key)."""
    src = tmp_path / "visits-src"
    src.mkdir()
    (src / "real.csv").write_text(VISITS_REAL)
    (src / "synthetic.csv").write_text(VISITS_SYNTHETIC)
    code, _out, err = run_cli(
        "provider", "add", "--store", store.root, "--provider", "globex", "--dataset", "visits",
        "--real", src / "real.csv", "--synthetic", src / "synthetic.csv",
    )  # fmt: skip
    assert code == 0, err
    return store


@pytest.mark.root
@pytest.mark.slow
def test_dataset_option_grants_only_the_named_dataset(tmp_path, visits, host, make_notebook, run_cli):
    """With ``--dataset globex/visits`` the run succeeds and is granted that dataset alone, although the
    notebook mentions acme/insurance too: the kernel's /data holds only the visits' real file, and the
    receipt's datasets and grant name only globex/visits."""
    nb = make_notebook(LIST_DATA)
    out = tmp_path / "out"
    code, _o, err = run_cli(
        "local-run", nb, "--store", visits.root, "--out", out, "--dataset", "globex/visits",
        "--host-socket", host.socket,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "outputs" / "seen.json").read_text()) == ["/data/globex/visits/real.csv"]
    assert (out / "outputs" / "visits.txt").read_text() == VISITS_REAL
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    assert [(d["provider"], d["dataset"]) for d in receipt["datasets"]] == [("globex", "visits")]
    granted = receipt["grant"]["claims"]["datasets"]
    assert [(d["provider"], d["dataset"]) for d in granted] == [("globex", "visits")]
    code, text, _ = run_cli(
        "verify", out, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, text


def _snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below ``roots`` with its mode, size and modification time."""
    snap = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                st = os.lstat(os.path.join(dirpath, name))
                snap[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


# (what is wrong, how to build the arguments from (tmp_path, store, notebook), what stderr says)
Case = tuple[str, Callable[[Path, Any, Path], list[Any]], str]


def _args(nb: Path, store: Any, tmp: Path, *extra: Any, out: str = "out") -> list[Any]:
    return [
        "local-run",
        nb,
        "--store",
        store.root,
        "--out",
        tmp / out,
        "--host-state",
        tmp / "host-state",
        *extra,
    ]


def _existing_out(tmp: Path, store: Any, nb: Path) -> list[Any]:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("mine")
    return _args(nb, store, tmp, out="taken")


def _dangling_out(tmp: Path, store: Any, nb: Path) -> list[Any]:
    (tmp / "link").symlink_to(tmp / "nowhere")
    return _args(nb, store, tmp, out="link")


def _not_ipynb(tmp: Path, store: Any, nb: Path) -> list[Any]:
    py = nb.with_name("analysis.py")
    py.write_text("open('/data/acme/insurance/real.csv')\n")
    return _args(py, store, tmp)


def _no_data_reference(tmp: Path, store: Any, nb: Path) -> list[Any]:
    # Its own workspace: every text file bundled with a notebook counts as a reference.
    (tmp / "plain").mkdir()
    other = tmp / "plain" / "plain.ipynb"
    other.write_text(nb.read_text().replace("/data/acme/insurance/real.csv", "numbers.csv"))
    return _args(other, store, tmp)


def _missing_store(tmp: Path, store: Any, nb: Path) -> list[Any]:
    return [
        "local-run",
        nb,
        "--store",
        tmp / "no-store",
        "--out",
        tmp / "out",
        "--host-state",
        tmp / "host-state",
    ]


def _keys_without_dev_key(tmp: Path, store: Any, nb: Path) -> list[Any]:
    (tmp / "other-keys").mkdir(mode=0o700)
    return _args(nb, store, tmp, "--keys", tmp / "other-keys")


CASES: list[Case] = [
    ("--out exists", _existing_out, "already exists"),
    ("--out is a dangling link", _dangling_out, "already exists"),
    (
        "--dataset without slash",
        lambda t, s, nb: _args(nb, s, t, "--dataset", "acmeinsurance"),
        "must be PROVIDER/NAME",
    ),
    (
        "--dataset traversal",
        lambda t, s, nb: _args(nb, s, t, "--dataset", "../insurance"),
        "invalid provider name '..'",
    ),
    (
        "--dataset deep traversal",
        lambda t, s, nb: _args(nb, s, t, "--dataset", "acme/../../etc"),
        "must be PROVIDER/NAME",
    ),
    (
        "--dataset upper case",
        lambda t, s, nb: _args(nb, s, t, "--dataset", "acme/Insurance"),
        "invalid dataset name",
    ),
    (
        "--dataset unknown",
        lambda t, s, nb: _args(nb, s, t, "--dataset", "acme/claims"),
        "no usable version of acme/claims",
    ),
    (
        "--dataset unknown provider",
        lambda t, s, nb: _args(nb, s, t, "--dataset", "acme/insurance", "--dataset", "globex/visits"),
        "no usable version of globex/visits",
    ),
    ("notebook missing", lambda t, s, nb: _args(nb.with_name("missing.ipynb"), s, t), "does not exist"),
    (
        "notebook directory missing",
        lambda t, s, nb: _args(t / "nowhere" / "a.ipynb", s, t),
        "not a directory",
    ),
    ("notebook not .ipynb", _not_ipynb, "not a notebook"),
    ("notebook names no dataset", _no_data_reference, "mentions no /data/<provider>/<dataset>/ path"),
    (
        "time limit zero",
        lambda t, s, nb: _args(nb, s, t, "--time-limit", "0"),
        "--time-limit must be a positive",
    ),
    ("store missing", _missing_store, "does not exist"),
    ("no development hub key", _keys_without_dev_key, "no local development hub key"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, store, make_notebook, run_cli, make, message):
    """Bad arguments to `dcr local-run` (an existing --out, a malformed, traversing or unknown --dataset, a
    notebook that is missing, not .ipynb or names no dataset, a non-positive time limit, a missing store
    or development hub key) exit non-zero with a message saying what is wrong, and write nothing: no
    --out or its staging directory, no enclave host state, no change in the store, its keys or the
    workspace."""
    nb = make_notebook(["import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')"])
    args = make(tmp_path, store, nb)
    before = _snapshot(tmp_path)
    code, out, err = run_cli(*args)
    assert code != 0
    assert f"dcr: error: {message}" in err or message in err, err
    assert "Traceback" not in err and out == ""
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "host-state").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
