"""Benchmark: how long the JupyterLab jobs panel takes to show a job's state change, measured in the browser.

Starts ``dcr demo`` (default directory ``benchmarks/.work/browser-demo``: the first run synthesizes the demo
data, later runs reuse it), logs alice in with Debian's Chromium (Playwright, headless), writes a notebook of
``--cells`` code cells that each sleep ``--sleep`` seconds, and submits it ``--jobs`` times with the "Submit
to Enclave" button, one job after the other, each followed to ``succeeded`` in the panel.

In the page:

- a ``MutationObserver`` records every change of a job's rendered state or progress bar
  (``data-state``, ``data-done``, ``data-total``) with ``performance.timeOrigin + performance.now()``;
- a second subscription to the server's event stream (``/api/events/subscribe``, opened in the page, beside
  JupyterLab's own) records when each DCR job event arrives in the browser.

For every event that changes what the panel shows (replaying the panel's own merge rules), the latency is the
time from the event's arrival in the browser to the first DOM record showing its result. For state changes
the server also logs the moment it made the change (``DCR: job <id> is <state>``, millisecond timestamps in the
hub's log, where the servers log), which gives the end-to-end figure: server state change -> panel DOM.
Browser and server share the machine's clock.

Needs root (``dcr demo``). Run from the repository root::

    .venv/bin/python benchmarks/bench_browser.py [--jobs 5] [--cells 12] [--sleep 0.25] [--dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import lab  # noqa: E402
from browser.demo_process import DemoProcess  # noqa: E402

USER = "alice"
NOTEBOOK = "bench_cells.ipynb"
FINISHED = {"checking", "succeeded", "held", "released", "rejected"}
TERMINAL = {"succeeded", "failed", "cancelled", "held", "released", "rejected"}
RANK = {s: i for i, s in enumerate(lab.STATE_ORDER)}
_LOG_LINE = re.compile(
    r"^\[I (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) DCRExtension\] DCR: job (job-[0-9a-f]+) is (\w+)$"
)


@dataclass
class View:
    """The panel's view of a job, as its reducer merges events (dcr_labextension/src/model.ts)."""

    state: str = ""
    cell: int | None = None
    cells: int | None = None

    def merge(self, state: str, cell: int | None, cells: int | None) -> None:
        if self.state in TERMINAL and state != self.state:
            return
        if self.state and RANK.get(state, 0) < RANK.get(self.state, 0):
            return
        if state != self.state:
            self.state = state
            self.cell = cell if cell is not None else self.cell
            self.cells = cells if cells is not None else self.cells
        elif cells is not None:
            if self.cells != cells:
                self.cell, self.cells = cell, cells
            elif cell is not None and (self.cell is None or cell > self.cell):
                self.cell = cell

    def signature(self) -> tuple[str, int, int]:
        total = self.cells or 0
        if total <= 0:
            return (self.state, 0, 0)
        if self.state in FINISHED:
            return (self.state, total, total)
        return (self.state, 0 if self.cell is None else min(self.cell, total - 1), total)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(name: str, values: list[float]) -> dict[str, Any]:
    if not values:
        return {"interval": name, "n": 0}
    return {
        "interval": name,
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 1),
        "p95_ms": round(percentile(values, 95), 1),
        "max_ms": round(max(values), 1),
        "mean_ms": round(statistics.fmean(values), 1),
    }


def server_changes(log: Path) -> dict[tuple[str, str], float]:
    """(job, state) -> epoch milliseconds of the server's log line for that state change (first one)."""
    out: dict[tuple[str, str], float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line.strip())
        if m:
            when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp() * 1000
            out.setdefault((m.group(2), m.group(3)), when)
    return out


def analyse(
    events: list[dict[str, Any]], dom: list[dict[str, Any]], changes: dict[tuple[str, str], float]
) -> dict[str, list[float]]:
    """Latencies per interval, in milliseconds."""
    event_to_dom: list[float] = []
    state_to_dom: list[float] = []
    state_to_event: list[float] = []
    views: dict[str, View] = {}
    for e in sorted(events, key=lambda e: e["recv"]):
        view = views.setdefault(e["job"], View())
        before = view.signature()
        previous_state = view.state
        view.merge(e["state"], e.get("cell"), e.get("cells"))
        after = view.signature()
        if after == before:
            continue  # nothing for the panel to show
        shown = [r for r in dom if r["job"] == e["job"] and (r["state"], r["done"], r["total"]) == after]
        if not shown:
            continue
        t = shown[0]["t"]
        if t < e["recv"] - 50:
            continue  # the panel showed it before this event (from a REST answer): not caused by the event
        event_to_dom.append(t - e["recv"])
        if view.state != previous_state and (e["job"], view.state) in changes:
            server_t = changes[(e["job"], view.state)]
            state_to_dom.append(t - server_t)
            state_to_event.append(e["recv"] - server_t)
    return {
        "server state change -> panel DOM (states)": state_to_dom,
        "event in the browser -> panel DOM (states and cells)": event_to_dom,
        "server state change -> event in the browser": state_to_event,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--cells", type=int, default=12)
    ap.add_argument("--sleep", type=float, default=0.25)
    ap.add_argument("--dir", type=Path, default=REPO / "benchmarks" / ".work" / "browser-demo")
    a = ap.parse_args()
    a.dir.parent.mkdir(parents=True, exist_ok=True)

    demo = DemoProcess(a.dir)
    demo.start()
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=a.dir.parent))  # a fresh profile per run
    try:
        with sync_playwright() as pw, lab.chromium(pw, profile) as ctx:
            page = ctx.new_page()
            lab.login(page, demo.url, USER, demo.password)  # the hub spawns alice's server
            token = demo.token(USER)
            nb = nbformat.v4.new_notebook()
            nb.cells = [
                nbformat.v4.new_code_cell(f"import time\ntime.sleep({a.sleep})\nprint({i})")
                for i in range(a.cells)
            ]
            nb.metadata["kernelspec"] = {
                "name": "python3",
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
            }
            r = demo.server(
                "PUT", USER, f"api/contents/{NOTEBOOK}", token, json={"type": "notebook", "content": nb}
            )
            r.raise_for_status()
            lab.open_notebook(page, demo.url, USER, NOTEBOOK)
            lab.dismiss_notifications(page)
            lab.open_jobs_panel(page)
            page.evaluate(lab.JOB_RECORDER_JS)
            page.evaluate(lab.EVENTS_JS, f"ws://127.0.0.1:{demo.port}/user/{USER}/api/events/subscribe")
            for i in range(a.jobs):
                known = set(
                    page.eval_on_selector_all(
                        '[data-testid^="dcr-job-job-"]', "els => els.map(e => e.dataset.testid.slice(8))"
                    )
                )
                lab.submit_current_notebook(page)
                job = lab.newest_job_id(page, known)
                expect(lab.job_item(page, job)).to_have_attribute("data-state", "succeeded", timeout=600_000)
                print(f"job {i + 1}/{a.jobs}: {job} succeeded", file=sys.stderr)
            page.wait_for_timeout(500)
            events = page.evaluate("() => window.__dcrEvents")
            dom = lab.dom_records(page)
        results = analyse(events, dom, server_changes(demo.hub_log))
    finally:
        demo.stop()
        demo.remove_accounts()
        shutil.rmtree(profile, ignore_errors=True)
    rows = [summary(name, values) for name, values in results.items()]
    print(
        json.dumps(
            {
                "jobs": a.jobs,
                "cells": a.cells,
                "events": len(events),
                "dom_changes": len(dom),
                "latency": rows,
            },
            indent=2,
        )
    )
    print()
    print(f"{'interval':<56} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for row in rows:
        if row["n"]:
            print(
                f"{row['interval']:<56} {row['n']:>4} {row['p50_ms']:>8} {row['p95_ms']:>8} {row['max_ms']:>8}"
            )


if __name__ == "__main__":
    main()
