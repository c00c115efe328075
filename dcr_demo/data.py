"""The demo's tables: a seeded "real" hospital data set and a domain-only stand-in for its synthetic version.

Three tables of one made-up provider, ``riverside`` (a hospital):

- ``patients``: one row per patient (age, sex, BMI, smoker, region, blood pressure, yearly charges) with the
  relationships an analyst expects: charges rise with age, BMI and smoking, blood pressure with age and BMI.
- ``visits``: one row per clinic visit (month, department, age, sex, waiting time, length of stay, cost,
  readmission within 30 days); the department drives age, waiting time, stay and cost.
- ``labs``: one row per laboratory result (month, test, age, sex, result, flag against the test's reference
  range); results drift with age and differ by sex. Released only after the provider's **review**
  (:attr:`Table.release`): the demo's reviewer account approves or rejects each job's outputs in the hub.

The real rows come from a seeded generator, so every run of the demo starts from the same "real" data. The
synthetic versions are normally made from them by ``dcr provider add --synthesize mst`` (differentially
private). When no synthesizer is installed the demo falls back to :func:`random_rows`: every column drawn
independently from its declared domain, with the real schema but none of the real rows or relationships.
"""

from __future__ import annotations

import csv
import os
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PROVIDER: Final = "riverside"
#: Seed of the "real" rows: the demo's real data is the same on every machine.
REAL_SEED: Final = 20261125
REGIONS: Final = ("north", "south", "east", "west")
DEPARTMENTS: Final = ("general", "cardiology", "orthopedics", "oncology", "pediatrics", "emergency")
_DEPARTMENT_WEIGHTS: Final = (30, 15, 15, 8, 12, 20)
MONTHS: Final = tuple(f"2025-{m:02d}" for m in range(1, 13))

Row = list[object]


@dataclass(frozen=True)
class Table:
    """One demo dataset: its name, file, columns and the two row generators."""

    dataset: str
    file_name: str
    columns: tuple[str, ...]
    rows: int
    real_row: Callable[[random.Random], Row]
    random_row: Callable[[random.Random], Row]
    description: str
    #: The declared schema (``--schema``): column types and domains, so no budget is spent estimating them.
    columns_schema: tuple[dict[str, object], ...]
    #: The dataset's release mode in the hub's policy: ``auto`` (outputs come back as the job ends) or
    #: ``review`` (they wait in the hub's airlock for the provider's reviewers).
    release: str = "auto"

    @property
    def ref(self) -> str:
        return f"{PROVIDER}/{self.dataset}"

    def schema(self) -> dict[str, object]:
        return {"columns": [dict(c) for c in self.columns_schema]}


def _clip(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def patient_row(rng: random.Random) -> Row:
    age = rng.randint(18, 80)
    sex = rng.choice(("female", "male"))
    bmi = round(_clip(rng.gauss(27 + (age - 45) * 0.05, 5), 15.0, 55.0), 1)
    smoker = "yes" if rng.random() < 0.2 else "no"
    region = rng.choice(REGIONS)
    bp = round(
        _clip(rng.gauss(110 + age * 0.4 + (bmi - 25) * 0.8 + (8 if smoker == "yes" else 0), 10), 85, 200)
    )
    charges = 1500 + age * 260 + max(0.0, bmi - 25) * 340 + (22000 if smoker == "yes" else 0)
    charges = _clip(charges * rng.lognormvariate(0, 0.25), 500, 100_000)
    return [age, sex, bmi, smoker, region, bp, round(charges, 2)]


def random_patient_row(rng: random.Random) -> Row:
    return [
        rng.randint(18, 80),
        rng.choice(("female", "male")),
        round(rng.uniform(15, 55), 1),
        rng.choice(("yes", "no")),
        rng.choice(REGIONS),
        rng.randint(85, 200),
        round(rng.uniform(500, 100_000), 2),
    ]


def visit_row(rng: random.Random) -> Row:
    department = rng.choices(DEPARTMENTS, _DEPARTMENT_WEIGHTS)[0]
    month = rng.choice(MONTHS)
    if department == "pediatrics":
        age = rng.randint(0, 17)
    elif department == "cardiology":
        age = int(_clip(rng.gauss(66, 11), 18, 95))
    else:
        age = int(_clip(rng.gauss(48, 18), 0 if department == "emergency" else 18, 95))
    sex = rng.choice(("female", "male"))
    wait = rng.gammavariate(3, 30 if department == "emergency" else 9)
    inpatient = rng.random() < {
        "oncology": 0.55,
        "cardiology": 0.4,
        "orthopedics": 0.3,
        "emergency": 0.25,
    }.get(department, 0.05)
    stay = 0 if not inpatient else 1 + int(rng.expovariate(1 / (6 if department == "oncology" else 3)))
    stay = min(stay, 30)
    base = {"general": 120, "cardiology": 650, "orthopedics": 480, "oncology": 1400, "pediatrics": 150}.get(
        department, 380
    )
    cost = _clip((base + stay * 950) * rng.lognormvariate(0, 0.3), 20, 100_000)
    readmit_p = 0.04 + 0.012 * stay + (0.05 if age >= 70 else 0.0)
    readmitted = "yes" if rng.random() < readmit_p else "no"
    return [month, department, age, sex, int(_clip(wait, 1, 600)), stay, round(cost, 2), readmitted]


def random_visit_row(rng: random.Random) -> Row:
    return [
        rng.choice(MONTHS),
        rng.choice(DEPARTMENTS),
        rng.randint(0, 95),
        rng.choice(("female", "male")),
        rng.randint(1, 600),
        rng.randint(0, 30),
        round(rng.uniform(20, 100_000), 2),
        rng.choice(("yes", "no")),
    ]


PATIENTS: Final = Table(
    dataset="patients",
    file_name="patients.csv",
    columns=("age", "sex", "bmi", "smoker", "region", "systolic_bp", "charges"),
    rows=2000,
    real_row=patient_row,
    random_row=random_patient_row,
    description="Riverside Hospital patients: age, BMI, smoking, blood pressure, yearly charges",
    columns_schema=(
        {"name": "age", "type": "integer", "min": 18, "max": 80},
        {"name": "sex", "type": "categorical", "categories": ["female", "male"]},
        {"name": "bmi", "type": "float", "min": 15, "max": 55, "bins": 20, "decimals": 1},
        {"name": "smoker", "type": "categorical", "categories": ["no", "yes"]},
        {"name": "region", "type": "categorical", "categories": list(REGIONS)},
        {"name": "systolic_bp", "type": "integer", "min": 85, "max": 200, "bins": 12},
        {"name": "charges", "type": "float", "min": 500, "max": 100_000, "bins": 25, "decimals": 2},
    ),
)
VISITS: Final = Table(
    dataset="visits",
    file_name="visits.csv",
    columns=("month", "department", "age", "sex", "wait_minutes", "stay_days", "cost", "readmitted_30d"),
    rows=3000,
    real_row=visit_row,
    random_row=random_visit_row,
    description="Riverside Hospital clinic visits in 2025: department, waiting time, stay, cost, readmission",
    columns_schema=(
        {"name": "month", "type": "categorical", "categories": list(MONTHS)},
        {"name": "department", "type": "categorical", "categories": list(DEPARTMENTS)},
        {"name": "age", "type": "integer", "min": 0, "max": 95, "bins": 19},
        {"name": "sex", "type": "categorical", "categories": ["female", "male"]},
        {"name": "wait_minutes", "type": "integer", "min": 1, "max": 600, "bins": 24},
        {"name": "stay_days", "type": "integer", "min": 0, "max": 30},
        {"name": "cost", "type": "float", "min": 20, "max": 100_000, "bins": 25, "decimals": 2},
        {"name": "readmitted_30d", "type": "categorical", "categories": ["no", "yes"]},
    ),
)
#: Lab tests: (name, mean at 45, change per year of age, spread, extra for men, reference range).
LAB_TESTS: Final = {
    "hba1c": (5.4, 0.02, 0.7, 0.1, (4.0, 6.0)),
    "ldl": (115.0, 0.6, 30.0, 5.0, (50.0, 160.0)),
    "creatinine": (0.85, 0.004, 0.2, 0.2, (0.5, 1.2)),
    "crp": (2.5, 0.04, 2.5, 0.0, (0.0, 5.0)),
}
LAB_RESULT_MAX: Final = 300.0


def _lab_flag(test: str, result: float) -> str:
    low, high = LAB_TESTS[test][4]
    return "low" if result < low else "high" if result > high else "normal"


def lab_row(rng: random.Random) -> Row:
    test = rng.choice(tuple(LAB_TESTS))
    mean, per_year, spread, male, _range = LAB_TESTS[test]
    age = rng.randint(18, 90)
    sex = rng.choice(("female", "male"))
    value = rng.gauss(mean + (age - 45) * per_year + (male if sex == "male" else 0.0), spread)
    result = round(_clip(value, 0.01, LAB_RESULT_MAX), 2)
    return [rng.choice(MONTHS), test, age, sex, result, _lab_flag(test, result)]


def random_lab_row(rng: random.Random) -> Row:
    return [
        rng.choice(MONTHS),
        rng.choice(tuple(LAB_TESTS)),
        rng.randint(18, 90),
        rng.choice(("female", "male")),
        round(rng.uniform(0.01, LAB_RESULT_MAX), 2),
        rng.choice(("low", "normal", "high")),
    ]


LABS: Final = Table(
    dataset="labs",
    file_name="labs.csv",
    columns=("month", "test", "age", "sex", "result", "flag"),
    rows=2000,
    real_row=lab_row,
    random_row=random_lab_row,
    description="Riverside Hospital lab results in 2025: test, age, sex, result and its flag; outputs are "
    "released after the provider's review",
    columns_schema=(
        {"name": "month", "type": "categorical", "categories": list(MONTHS)},
        {"name": "test", "type": "categorical", "categories": list(LAB_TESTS)},
        {"name": "age", "type": "integer", "min": 18, "max": 90, "bins": 18},
        {"name": "sex", "type": "categorical", "categories": ["female", "male"]},
        {"name": "result", "type": "float", "min": 0, "max": LAB_RESULT_MAX, "bins": 30, "decimals": 2},
        {"name": "flag", "type": "categorical", "categories": ["high", "low", "normal"]},
    ),
    release="review",
)
TABLES: Final[tuple[Table, ...]] = (PATIENTS, VISITS, LABS)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Row], mode: int = 0o600) -> Path:
    """Write a CSV atomically (a temporary file in the same directory, renamed on success)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def real_rows(table: Table, seed: int = REAL_SEED) -> list[Row]:
    """The table's "real" rows: the same for a given seed on every machine."""
    rng = random.Random(f"{seed}/{table.dataset}/real")  # noqa: S311 - reproducible data, not secrets
    return [table.real_row(rng) for _ in range(table.rows)]


def random_rows(table: Table, seed: int = REAL_SEED) -> list[Row]:
    """A stand-in for the synthetic version: every column drawn from its domain alone, independently."""
    rng = random.Random(f"{seed}/{table.dataset}/random")  # noqa: S311 - reproducible data, not secrets
    return [table.random_row(rng) for _ in range(table.rows)]
