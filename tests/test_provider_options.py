"""Every option combination ``dcr provider add --help`` offers for synthesis works on its own.

One CLI run per combination, on ``../shared/data/insurance/real.csv`` as a provider would type it: each
synthesizer (``mst``, ``aim``, ``random``), with and without ``--seed``, without a report, with ``--report``
and (for the DP synthesizers, the only ones with a budget to spend on it) with ``--report`` and
``--report-epsilon``. Unseeded runs draw their own seed: the first DP registration with a report once failed
there because the drawn seed was out of scikit-learn's range (issue 17).

Nothing is replaced: the real synthesizers run with OpenDP's noise, so no run repeats another; each check
below holds for any draw. The declared schema uses 4 bins for the wide numeric columns, which keeps AIM's
model small (AIM's rounds do not get fewer with a smaller ε, so ε stays at the documented 1).
"""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dcr_enclave.pack.store import Store
from dcr_provider.schema import schema_from_json
from dcr_provider.tables import read_table

CliResult = tuple[int, str, str]

#: Public bounds of the insurance population (not read off the data), coarse bins to keep the fits short.
SCHEMA = """
target: charges
columns:
  - {name: age, type: integer, min: 18, max: 64, bins: 4}
  - {name: sex, type: categorical, categories: [female, male]}
  - {name: bmi, type: float, min: 15, max: 55, bins: 4, decimals: 2}
  - {name: children, type: integer, min: 0, max: 5}
  - {name: smoker, type: categorical, categories: ["no", "yes"]}
  - {name: region, type: categorical, categories: [northeast, northwest, southeast, southwest]}
  - {name: charges, type: float, min: 0, max: 65000, bins: 4, decimals: 2}
"""

NO_REPORT, REPORT, BOTH_REPORTS = "no report", "report", "report and report-epsilon"
COMBINATIONS = [
    pytest.param(
        synthesizer,
        seeded,
        reports,
        id=f"{synthesizer}-{'seed' if seeded else 'no seed'}-{reports}",
        marks=[pytest.mark.slow] if synthesizer == "aim" else [],
    )
    for synthesizer in ("mst", "aim", "random")
    for seeded in (False, True)
    for reports in (NO_REPORT, REPORT, BOTH_REPORTS)
    if not (synthesizer == "random" and reports == BOTH_REPORTS)  # random spends no budget: refused
]


@pytest.mark.parametrize(("synthesizer", "seeded", "reports"), COMBINATIONS)
def test_each_documented_combination_succeeds(
    tmp_path: Path,
    run_cli: Callable[..., CliResult],
    insurance_real: Path,
    synthesizer: str,
    seeded: bool,
    reports: str,
) -> None:
    """The run exits 0; the store holds one version with the synthesizer's protection (the total ε for the DP
    ones); the synthetic file has the real columns and every value inside the declared domains; the report
    directory holds exactly the reports the options asked for (none without --report), each naming its
    audience, the provider-only one with finite utility scores."""
    schema = tmp_path / "insurance.schema.yaml"
    schema.write_text(SCHEMA)
    store, report_dir = tmp_path / "store", tmp_path / "reports"
    args: list[str | Path] = [
        "provider", "add", "--store", store, "--provider", "acme", "--dataset", "insurance",
        "--real", insurance_real, "--synthesize", synthesizer, "--schema", schema,
    ]  # fmt: skip
    if synthesizer != "random":
        args += ["--epsilon", "1"]
    if seeded:
        args += ["--seed", "7"]
    if reports != NO_REPORT:
        args += ["--report", report_dir]
    if reports == BOTH_REPORTS:
        args += ["--report-epsilon", "0.2"]

    code, out, err = run_cli(*args)

    assert code == 0, err
    (manifest,) = Store(store).versions("acme", "insurance")
    p = manifest.protection
    if synthesizer == "random":
        assert (p.kind, p.mechanism, p.epsilon) == ("random", "random", None)
    else:
        assert (p.kind, p.mechanism, p.epsilon) == ("dp", synthesizer, 1.0)
    synthetic_path = Store(store).synthetic_path(manifest, insurance_real.name)
    table_schema = schema_from_json(yaml.safe_load(SCHEMA))
    synthetic, _ = read_table(synthetic_path, table_schema)  # raises on a value outside a declared domain
    assert list(synthetic.columns) == list(pd.read_csv(insurance_real, nrows=1).columns)

    expected = {
        NO_REPORT: set(),
        REPORT: {"real.fidelity-provider-only.json", "real.fidelity-provider-only.html"},
        BOTH_REPORTS: {
            "real.fidelity-provider-only.json",
            "real.fidelity-provider-only.html",
            "real.fidelity-researchers.json",
            "real.fidelity-researchers.html",
        },
    }[reports]
    found = {f.name for f in report_dir.iterdir()} if report_dir.exists() else set()
    assert found == expected
    if reports == NO_REPORT:
        assert "fidelity report" not in out
        return
    # What is computed from the real rows is the provider's alone; the researchers' report may be published.
    for f in report_dir.iterdir():
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == (0o600 if ".fidelity-provider-only." in f.name else 0o644), (f.name, oct(mode))
    provider = json.loads((report_dir / "real.fidelity-provider-only.json").read_text())
    assert provider["audience"] == "provider-only"
    utility = provider["utility"]
    assert math.isfinite(utility["trained_on_real"]) and math.isfinite(utility["trained_on_synthetic"])
    if reports == BOTH_REPORTS:
        researchers = json.loads((report_dir / "real.fidelity-researchers.json").read_text())
        assert researchers["audience"] == "researchers"
        assert researchers["report_epsilon"] == pytest.approx(0.2)
