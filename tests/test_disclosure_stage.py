"""The disclosure checks and redacted failures end to end: notebooks on the real data through the real
enclave host and supervisor (the main lane: each test starts an enclave host and a sandbox account).

Under ``auto`` a table with a disclosure finding is held for the provider's reviewers: the public receipt
lists the kinds of finding only and names no output; the reviewers open the details with the airlock key.
A failed run reports its cell and exception type; the traceback is sealed to the airlock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_local_run import _no_plaintext_anywhere
from test_secure_stage import JOB_KEYS, READ, _public_texts, _run

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.receipt import DISCLOSURE_KINDS
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.formats.unsealing import open_dir, open_file
from dcr_enclave.verify.receipt import check_receipt_dir

pytestmark = [pytest.mark.root, pytest.mark.slow]

FREQ, RECOVER, DOMINATED, EXTREMES, TOO_LARGE, UNREADABLE = DISCLOSURE_KINDS


@pytest.fixture
def secret(insurance_real: Path) -> dict:
    """Values of the real data a notebook tries to smuggle out (as in test_secure_stage)."""
    row = pd.read_csv(insurance_real).iloc[7]
    df = pd.read_csv(insurance_real)
    return {
        "name": f"{int(row['age'])}_{row['sex']}_{row['bmi']}_{row['region']}",
        "charges": str(round(float(df["charges"].sum()))),
        "age7": int(row["age"]),
    }


def _run_auto(host, store, make_notebook, tmp_path, cells, *, airlock: bool = True):
    """Run ``cells`` under ``auto`` with (as the hub now always gives) or without an airlock key."""
    private, public = generate_keypair()
    kw = {"airlock_public_key": public} if airlock else {}
    job_id, job, out = _run(host, store, make_notebook, tmp_path, cells, **kw)
    return private, job_id, job, out


def _open_json(sealed: Path, private: bytes, job_id: str, dest: Path) -> dict:
    open_file(sealed, dest, private, job_id=job_id)
    return json.loads(dest.read_text())


def _verified(host, out: Path) -> list:
    return check_receipt_dir(
        out,
        trusted_keys=json.loads(host.jwks_path.read_text())["keys"],
        expected_enclave_digests=[host.host.measurement()],
    )


def test_auto_holds_a_frequency_table_with_a_small_count(tmp_path, store, host, make_notebook):
    """Under ``auto``, a CSV frequency table with a count below the minimum is held, not released: the
    public receipt lists the kind and names no output; the airlock's key opens the details (file, column,
    threshold) and the outputs."""
    cells = [READ, "t = df.head(3).groupby('region').size().rename('count')\nt.to_csv('freq.csv')"]
    private, job_id, job, out = _run_auto(host, store, make_notebook, tmp_path, cells)
    assert job["state"] == "held", job
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    assert receipt["release"]["mode"] == "auto" and receipt["release"]["decision"] == "held"
    assert receipt["output_check"] == {"passed": True, "violations": [], "disclosure": [FREQ]}
    assert receipt["outputs"] == [] and "outputs_commitment" in receipt["release"]
    assert "freq.csv" not in _public_texts(host, job_id, out)
    assert not (out / contract.SEALED_FAILURE_FILE).exists()
    # The researcher's own key opens nothing: the outputs are sealed to the airlock.
    with pytest.raises(DCRError):
        open_dir(out / contract.SEALED_OUTPUTS_FILE, tmp_path / "nope", JOB_KEYS[job_id], job_id)
    details = _open_json(out / contract.SEALED_CHECK_FILE, private, job_id, tmp_path / "check.json")
    assert details["violations"] == []
    assert {(d["file"], d["column"], d["rule"], d["threshold"]) for d in details["disclosure"]} == {
        ("freq.csv", "count", FREQ, 10)
    }
    assert all(0 < int(d["value"]) < 10 for d in details["disclosure"])
    # the held receipt verifies (committed), and says what the checks found
    checks = _verified(host, out)
    assert all(c.passed for c in checks), [str(c) for c in checks]
    assert FREQ in next(c for c in checks if c.name == "disclosure checks").detail
    open_dir(out / contract.SEALED_OUTPUTS_FILE, tmp_path / "reviewed", private, job_id)
    assert (tmp_path / "reviewed" / "freq.csv").read_text().startswith("region,count")


def test_auto_releases_a_table_that_passes(tmp_path, store, host, make_notebook):
    """The same kind of table with every count above the minimum is released at once to the researcher."""
    cells = [READ, "df.groupby('smoker').size().rename('count').to_csv('freq.csv')"]
    _private, job_id, job, out = _run_auto(host, store, make_notebook, tmp_path, cells)
    assert job["state"] == "succeeded", job
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    assert receipt["release"]["decision"] == "released"
    assert receipt["output_check"]["disclosure"] == []
    assert "freq.csv" in {o["path"] for o in receipt["outputs"]}
    assert not (out / contract.SEALED_CHECK_FILE).exists()
    open_dir(out / contract.SEALED_OUTPUTS_FILE, out / contract.OUTPUTS_DIR, JOB_KEYS[job_id], job_id)
    assert all(c.passed for c in _verified(host, out))


def test_auto_without_an_airlock_refuses_outputs_with_findings(tmp_path, store, host, make_notebook):
    """A grant without an airlock key cannot hold outputs: with a finding nothing leaves (rejected, the
    kind in the receipt, no sealed outputs)."""
    cells = [READ, "df.groupby('smoker')['charges'].agg(['count', 'mean', 'max']).to_csv('agg.csv')"]
    _private, _job_id, job, out = _run_auto(host, store, make_notebook, tmp_path, cells, airlock=False)
    assert job["state"] == "failed", job
    assert job["failure"]["reason"] == f"outputs refused: {EXTREMES}", job
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    assert receipt["release"]["decision"] == "rejected"
    assert receipt["output_check"]["disclosure"] == [EXTREMES]
    assert receipt["outputs"] == []
    assert not (out / contract.SEALED_OUTPUTS_FILE).exists()
    assert not (out / contract.SEALED_CHECK_FILE).exists()


def test_a_failure_reports_cell_and_type_and_seals_the_traceback(
    tmp_path, store, host, make_notebook, secret
):
    """A cell raises an exception of its own class whose message holds real values: the public report is
    the cell index and ``Exception``; the airlock's key opens the full detail, traceback without colours."""
    cells = [
        READ,
        "x = 1",
        "class Leak(Exception):\n    pass\n"
        "r = df.iloc[7]\n"
        "raise Leak(f\"{int(r['age'])}_{r['sex']}_{r['bmi']}_{r['region']}\")",
    ]
    private, job_id, job, out = _run_auto(host, store, make_notebook, tmp_path, cells)
    assert job["state"] == "failed", job
    assert (job["failure"]["cell"], job["failure"]["ename"]) == (2, "Exception")
    failure = json.loads((out / contract.FAILURE_FILE).read_text())
    assert (failure["cell"], failure["ename"]) == (2, "Exception")
    public = _public_texts(host, job_id, out)
    assert secret["name"] not in public and "Leak" not in public
    detail = _open_json(out / contract.SEALED_FAILURE_FILE, private, job_id, tmp_path / "failure.json")
    assert (detail["cell"], detail["status"], detail["ename"]) == (2, "error", "Leak")
    assert secret["name"] in detail["evalue"]
    assert "Traceback" in detail["traceback"] or "Leak" in detail["traceback"]
    assert secret["name"] in detail["traceback"]
    assert "\x1b" not in detail["traceback"]


def test_a_notebook_cannot_spell_a_secret_through_table_names_values_or_shapes(
    tmp_path, store, host, make_notebook, secret
):
    """The notebook writes tables whose file name, column names, values, row count and findings are made
    from real values (one to trip each rule it can choose): the researcher learns ``held`` and the fixed
    kinds, nothing of the names or values; the reviewers get the details."""
    cells = [
        READ,
        "r = df.iloc[7]\n"
        "name = f\"{int(r['age'])}_{r['sex']}_{r['bmi']}_{r['region']}\"\n"
        "n = int(r['age'])\n"
        "total = int(round(df['charges'].sum()))\n"
        "t = pd.DataFrame({'label': [name] * n, 'count': [total] * n, name + '_max': [r['charges']] * n})\n"
        "t.loc[0, 'count'] = 2\n"
        "t.to_csv(name + '.csv', index=False)\n"
        "open(name + '.tsv', 'wb').write(bytes([0xff]) * n)",
    ]
    private, job_id, job, out = _run_auto(host, store, make_notebook, tmp_path, cells)
    assert job["state"] == "held", job
    receipt_text = (out / contract.RECEIPT_FILE).read_text()
    receipt = json.loads(receipt_text)
    assert receipt["output_check"]["disclosure"] == [FREQ, DOMINATED, EXTREMES, UNREADABLE]
    assert set(receipt["output_check"]["disclosure"]) <= set(DISCLOSURE_KINDS)
    public = _public_texts(host, job_id, out)
    for leak in (secret["name"], secret["charges"], f"{secret['age7']} rows", "_max"):
        assert leak not in public, leak
    assert _no_plaintext_anywhere([host.state], secret["name"].encode()) == []
    details = _open_json(out / contract.SEALED_CHECK_FILE, private, job_id, tmp_path / "check.json")
    files = {d["file"] for d in details["disclosure"]}
    assert files == {secret["name"] + ".csv", secret["name"] + ".tsv"}
