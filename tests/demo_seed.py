"""The session's one real first run of ``dcr demo``: it generates and synthesizes the demo's data, then stops.

The modules that start a demo begin from a copy of its directory, so the suite synthesizes the demo's data
once. Either the ``demo_seed`` fixture makes it when a test first asks (:func:`make`), or ``tests/lanes.py``
has it made ahead, beside the other lane's tests, by running this file::

    python tests/demo_seed.py DIR      # DIR/demo is the stopped demo, DIR/seed.json what happened

and tells the main lane where with ``DCR_TEST_DEMO_SEED=DIR``; the fixture then waits for ``seed.json``
(:func:`wait`). A first run that failed fails the tests that need it, with the demo's output, as it would
have in the fixture.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Set by ``tests/lanes.py`` for the main lane: the directory where the seed is being made.
SEED_ENV: Final = "DCR_TEST_DEMO_SEED"
RESULT: Final = "seed.json"
#: How long a test waits for a seed made ahead: the demo's own start timeout, and some.
WAIT_SECONDS: Final = 1200.0


@dataclass(frozen=True)
class DemoSeed:
    #: The stopped demo's directory: data, store, keys, reports, state (copy it, never start it again).
    dir: Path
    #: What that first run printed.
    output: str


def make(root: Path) -> DemoSeed:
    """Run ``dcr demo`` once in ``root/demo`` until it is ready, then stop it."""
    from browser.demo_process import DemoProcess

    d = DemoProcess(root / "demo")
    try:
        d.start()
    finally:
        d.close()
    return DemoSeed(d.dir, d.output)


def prepare(root: Path) -> int:
    """:func:`make`, its outcome written to ``root/seed.json`` (atomically: a reader sees all or nothing)."""
    started = time.monotonic()
    try:
        seed = make(root)
        outcome = {"dir": str(seed.dir), "output": seed.output}
    except Exception as e:  # the tests that need it report it; this lane goes on
        outcome = {"error": f"{type(e).__name__}: {e}"}
    tmp = root / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, root / RESULT)
    took = time.monotonic() - started
    print(f"demo seed {'ready' if 'dir' in outcome else 'FAILED'} after {took:.1f} s in {root}", flush=True)
    return 0 if "dir" in outcome else 1


def wait(root: Path, timeout: float = WAIT_SECONDS) -> DemoSeed:
    """The seed :func:`prepare` is making in ``root``, once it is there."""
    from browser.demo_process import DemoError

    deadline = time.monotonic() + timeout
    result = root / RESULT
    while not result.exists():
        if time.monotonic() > deadline:
            raise DemoError(f"no demo seed in {root} after {timeout:.0f} s")
        time.sleep(0.5)
    outcome = json.loads(result.read_text())
    if "error" in outcome:
        raise DemoError(f"the demo's first run failed: {outcome['error']}")
    return DemoSeed(Path(outcome["dir"]), outcome["output"])


if __name__ == "__main__":
    sys.exit(prepare(Path(sys.argv[1])))
