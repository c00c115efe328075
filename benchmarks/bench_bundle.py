"""Benchmark: planning a bundle (walk, checks, sha256 of every file) against plain sha256 of the same bytes.

Two workspaces, generated under a temporary directory and deleted afterwards:

* 10,000 small files (0-4 KiB, random content) in 100 directories, plus the notebook;
* one 1 GiB file plus the notebook.

For each, the script prints the time of :func:`dcr_enclave.bundle.plan_bundle` (which yields the digest),
the time of a baseline that opens every file and computes its sha256 with hashlib (no walk, no checks),
and their ratio. Both run warm (after one untimed pass, so the page cache holds the files); the best of
``--repeat`` runs is reported. Run from the repository root::

    .venv/bin/python benchmarks/bench_bundle.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nbformat

from dcr_enclave.formats.bundle import BundleLimits
from dcr_enclave.pack.bundle_builder import plan_bundle

LIMITS = BundleLimits(max_files=20_000, max_bytes=2 * 2**30)
SMALL_FILES = 10_000
BIG_BYTES = 2**30


def write_notebook(ws: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    # A fixed cell id (nbformat draws a random one) keeps the digest the same from run to run.
    cell = nbformat.v4.new_code_cell("import pandas as pd\npd.read_csv('/data/p/d/real.csv')", id="cell-1")
    nb.cells.append(cell)
    path = ws / "analysis.ipynb"
    nbformat.write(nb, path)
    return path


def make_small(ws: Path) -> Path:
    rng = random.Random(1)
    for i in range(SMALL_FILES):
        d = ws / f"dir{i % 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.dat").write_bytes(rng.randbytes(rng.randint(0, 4096)))
    return write_notebook(ws)


def make_big(ws: Path) -> Path:
    ws.mkdir(parents=True)
    chunk = 16 * 2**20
    with open(ws / "big.bin", "wb") as f:
        for _ in range(BIG_BYTES // chunk):
            f.write(os.urandom(chunk))
    return write_notebook(ws)


def baseline(files: list[Path]) -> None:
    """sha256 of every file's bytes, read the same way (1 MiB pieces, unbuffered)."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                h.update(view[:n])
        h.hexdigest()


def best_of(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm the page cache and imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(name: str, notebook: Path, repeat: int) -> None:
    files = sorted(p for p in notebook.parent.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    manifest = plan_bundle(notebook, limits=LIMITS)
    assert len(manifest.files) == len(files) and manifest.total_bytes == total
    t_plan = best_of(lambda: plan_bundle(notebook, limits=LIMITS), repeat)
    t_base = best_of(lambda: baseline(files), repeat)
    mib = total / 2**20
    print(
        f"{name}: {len(files)} files, {mib:.1f} MiB | plan_bundle {t_plan:.3f} s ({mib / t_plan:.0f} MiB/s) | "
        f"plain sha256 {t_base:.3f} s ({mib / t_base:.0f} MiB/s) | ratio {t_plan / t_base:.2f}x"
    )
    print(f"  digest {manifest.digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is kept)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dcr-bench-bundle-"))
    try:
        bench("small files", make_small(tmp / "small"), args.repeat)
        shutil.rmtree(tmp / "small")
        bench("one 1 GiB file", make_big(tmp / "big"), args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
