"""Generate the demo's "real" dataset and a synthetic stand-in, from a seeded generator.

The real table is a made-up but realistic cohort (age, sex, BMI, smoker, region, blood pressure, yearly
charges) with the correlations an analyst would expect: charges rise with age, BMI and smoking. The
synthetic file is drawn from the declared column domains alone, each column independently, so it has the
real schema and plausible values but none of the real rows or relationships.

Usage: python demo/make_demo_data.py OUTDIR [--rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

COLUMNS = ["age", "sex", "bmi", "smoker", "region", "systolic_bp", "charges"]
REGIONS = ["north", "south", "east", "west"]


def real_row(rng: random.Random) -> list[object]:
    age = rng.randint(18, 80)
    sex = rng.choice(["female", "male"])
    bmi = round(min(55.0, max(15.0, rng.gauss(27 + (age - 45) * 0.05, 5))), 1)
    smoker = "yes" if rng.random() < 0.2 else "no"
    region = rng.choice(REGIONS)
    bp = round(rng.gauss(110 + age * 0.4 + (bmi - 25) * 0.8 + (8 if smoker == "yes" else 0), 10))
    charges = 1500 + age * 260 + max(0.0, bmi - 25) * 340 + (22000 if smoker == "yes" else 0)
    charges = round(charges * rng.lognormvariate(0, 0.25), 2)
    return [age, sex, bmi, smoker, region, bp, charges]


def synthetic_row(rng: random.Random) -> list[object]:
    return [
        rng.randint(18, 80),
        rng.choice(["female", "male"]),
        round(rng.uniform(15, 55), 1),
        rng.choice(["yes", "no"]),
        rng.choice(REGIONS),
        rng.randint(90, 190),
        round(rng.uniform(1000, 60000), 2),
    ]


def write(path: Path, rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=20261125)
    a = ap.parse_args()
    a.outdir.mkdir(parents=True, exist_ok=True)
    real = random.Random(a.seed)
    synth = random.Random(a.seed + 1)
    (a.outdir / "real").mkdir(exist_ok=True)
    (a.outdir / "synthetic").mkdir(exist_ok=True)
    write(a.outdir / "real" / "patients.csv", [real_row(real) for _ in range(a.rows)])
    write(a.outdir / "synthetic" / "patients.csv", [synthetic_row(synth) for _ in range(a.rows)])
    print(f"demo data in {a.outdir}: real/patients.csv and synthetic/patients.csv, {a.rows} rows each")


if __name__ == "__main__":
    main()
