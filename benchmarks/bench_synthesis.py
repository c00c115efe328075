"""Benchmark: synthesis time and peak memory per shipped synthesizer (``mst``, ``aim``, ``random``).

A seeded generator writes a 100,000-row × 10-column CSV (4 numeric, 6 categorical columns, with dependencies
between them, ~6 MB) and its declared schema (numeric columns in 10 bins) into a temporary directory. Each
synthesizer then runs at ε = 1 (δ = 1e-6; ``random`` takes no budget) in its **own fresh process**, so that
peak memory is that synthesizer's alone and the first-fit JAX compilation that every real run pays is
included. The child reports:

* ``import``: seconds to import the synthesizer and its libraries;
* ``synthesize``: seconds for :meth:`~dcr_provider.synthesizers.Synthesizer.synthesize` (read, encode,
  fit, sample, decode, write), without a fidelity report;
* ``report``: seconds for the provider-only fidelity report on its own (``--report``);
* ``peak RSS``: the child's maximum resident memory.

Run from the repository root (AIM is by far the slowest; ``--only mst,random`` skips it)::

    .venv/bin/python benchmarks/bench_synthesis.py [--rows 100000] [--only mst,aim,random] [--report]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SCHEMA = {
    "target": "income",
    "columns": [
        {"name": "age", "type": "integer", "min": 18, "max": 90},
        {"name": "income", "type": "float", "min": 0, "max": 250000, "decimals": 2},
        {"name": "hours", "type": "integer", "min": 0, "max": 80},
        {"name": "score", "type": "float", "min": 0, "max": 1, "decimals": 3},
        {"name": "sex", "type": "categorical", "categories": ["female", "male"]},
        {"name": "region", "type": "categorical", "categories": ["north", "south", "east", "west", "centre"]},
        {"name": "education", "type": "categorical", "categories": ["none", "school", "college", "degree"]},
        {"name": "smoker", "type": "categorical", "categories": ["no", "yes"]},
        {"name": "sector", "type": "categorical", "categories": [f"s{i}" for i in range(8)]},
        {"name": "insured", "type": "categorical", "categories": ["no", "yes"]},
    ],
}

CHILD = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from dcr_provider import synthesizers
cls = {"mst": synthesizers.MSTSynthesizer, "aim": synthesizers.AIMSynthesizer,
       "random": synthesizers.RandomSynthesizer}[sys.argv[1]]
t1 = time.perf_counter()
real, schema, out, report = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1"
budget = {} if sys.argv[1] == "random" else {"epsilon": 1.0, "delta": 1e-6}
result = cls().synthesize(real=real, out_dir=out, schema=schema, seed=1, **budget)
t2 = time.perf_counter()
report_s = None
if report:
    import pandas as pd
    from dcr_provider import fidelity
    from dcr_provider.tables import read_table
    real_df, sch = read_table(real, result.schema)
    syn_df, _ = read_table(result.path, result.schema)
    fidelity.provider_report(real_df, syn_df, result.domains, sch, {"file": real.name}, seed=1)
    report_s = time.perf_counter() - t2
print(json.dumps({"import": t1 - t0, "synthesize": t2 - t1, "report": report_s,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": result.rows}))
"""


def make_table(rows: int, seed: int = 0) -> pd.DataFrame:
    """Ten columns with dependencies (education → income, smoker → insured, age → hours, ...)."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 91, rows)
    education = rng.choice(4, rows, p=[0.1, 0.4, 0.3, 0.2])
    sex = rng.choice(2, rows)
    income = np.clip(rng.lognormal(10 + 0.3 * education + 0.1 * sex, 0.5), 0, 250000).round(2)
    hours = np.clip((40 + rng.normal(0, 8, rows) - np.maximum(age - 65, 0)).round(), 0, 80).astype(int)
    smoker = (rng.random(rows) < 0.15 + 0.1 * (education == 0)).astype(int)
    insured = (rng.random(rows) < 0.9 - 0.3 * smoker).astype(int)
    return pd.DataFrame(
        {
            "age": age,
            "income": income,
            "hours": hours,
            "score": rng.beta(2 + education, 3, rows).round(3),
            "sex": np.array(["female", "male"])[sex],
            "region": rng.choice(["north", "south", "east", "west", "centre"], rows),
            "education": np.array(["none", "school", "college", "degree"])[education],
            "smoker": np.array(["no", "yes"])[smoker],
            "sector": np.array([f"s{i}" for i in range(8)])[(education * 2 + rng.integers(0, 2, rows)) % 8],
            "insured": np.array(["no", "yes"])[insured],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--only", default="mst,aim,random", help="comma-separated synthesizers")
    parser.add_argument("--report", action="store_true", help="also time the provider-only fidelity report")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per synthesizer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcr-bench-synthesis-") as tmp:
        d = Path(tmp)
        (d / "in").mkdir()
        real = d / "in" / "table.csv"
        make_table(args.rows).to_csv(real, index=False)
        schema = d / "schema.json"
        schema.write_text(json.dumps(SCHEMA))
        print(f"{args.rows} rows × 10 columns, {real.stat().st_size / 1e6:.1f} MB CSV; ε = 1, δ = 1e-6")
        print(f"{'synthesizer':<12}{'import s':>10}{'synthesize s':>14}{'report s':>10}{'peak RSS MiB':>14}")
        for name in args.only.split(","):
            out = d / f"out-{name}"
            out.mkdir()
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        name,
                        str(real),
                        str(schema),
                        str(out),
                        "1" if args.report else "0",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                print(f"{name:<12} did not finish within {args.timeout} s")
                continue
            if proc.returncode != 0:
                print(
                    f"{name:<12} failed after {time.perf_counter() - start:.0f} s: {proc.stderr.strip()[-500:]}"
                )
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            report = "-" if r["report"] is None else f"{r['report']:.1f}"
            print(
                f"{name:<12}{r['import']:>10.1f}{r['synthesize']:>14.1f}{report:>10}{r['peak_rss_mib']:>14.0f}"
            )


if __name__ == "__main__":
    main()
