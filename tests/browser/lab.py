"""Playwright helpers for the browser tests and the browser benchmark: Debian's Chromium driving JupyterLab.

The browser is the system's Chromium (``apt-get install chromium``), driven by the Python ``playwright``
package through ``executable_path`` (Playwright's own browser downloads are never used), headless, with
background networking switched off and a fresh profile per run. The pages are served by a real JupyterHub
(``dcr demo``) on 127.0.0.1.

:data:`JOB_RECORDER_JS` installs a ``MutationObserver`` on the document that records, with a high-resolution
wall-clock timestamp, every change of a job's state or progress in the DCR jobs panel; :data:`EVENTS_JS` opens
the server's event stream in the page and records each DCR job event with the server's emit timestamp.
Together they measure how long the panel takes to show a state change (``benchmarks/bench_browser.py``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from playwright.sync_api import BrowserContext, Locator, Page, Playwright, expect
from playwright.sync_api import Error as PlaywrightError

from dcr_enclave.formats.contract import JOB_STATES

CHROMIUM: Final = "/usr/bin/chromium"
CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
REPO: Final = Path(__file__).resolve().parents[2]
ARTIFACTS: Final = REPO / "test-artifacts"
#: Lifecycle order of job states (the panel never moves a job backwards): the launch contract's order.
STATE_ORDER: Final = JOB_STATES


@contextmanager
def chromium(pw: Playwright, profile: Path, **context_options: Any) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh profile directory."""
    profile.mkdir(parents=True, exist_ok=True)
    context = pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=list(CHROMIUM_ARGS),
        viewport={"width": 1440, "height": 900},
        **context_options,
    )
    try:
        yield context
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------------
# Watching for refusals
# ---------------------------------------------------------------------------------------------------------

#: A refused request in a Tornado access log line (hub, single-user server), or a warning or error that
#: mentions XSRF (JupyterHub logs setting a fresh XSRF cookie at info level: that is not a complaint).
_LOG_REFUSAL: Final = re.compile(r"\]\s+403\s+[A-Z]+\s|^\[[WEC] .*xsrf", re.IGNORECASE)
#: Not a refusal: JupyterHub's single-user server notes that a cookie-authenticated websocket handshake came
#: without a ``Sec-Fetch-Mode`` header (Chromium sends none on websocket handshakes); websockets are protected
#: by the Origin check instead. JupyterLab's own kernel and event sockets trigger it on every page.
_WEBSOCKET_NOTE: Final = re.compile(
    r"Skipping XSRF check for insecure request GET /user/[^/\s]+/api/(kernels/[0-9a-f-]+/channels|events/subscribe)$"
)


@dataclass
class RefusalWatch:
    """Collects 403 answers and XSRF complaints: in the hub's log (servers log there too) and in the page."""

    log: Path
    offset: int = 0
    responses: list[str] = field(default_factory=list)

    def start(self, page: Page | None = None) -> RefusalWatch:
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        if page is not None:
            self.watch(page)
        return self

    def watch(self, page: Page) -> None:
        page.on(
            "response",
            lambda r: (
                self.responses.append(f"{r.status} {r.request.method} {r.url}") if r.status == 403 else None
            ),
        )

    def found(self) -> list[str]:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        found = [
            line
            for line in text.splitlines()
            if _LOG_REFUSAL.search(line) and not _WEBSOCKET_NOTE.search(line.rstrip())
        ]
        return found + list(self.responses)


# ---------------------------------------------------------------------------------------------------------
# JupyterLab
# ---------------------------------------------------------------------------------------------------------


def login(page: Page, base_url: str, user: str, password: str) -> None:
    """Log in through the hub's login form; the hub then starts the server and redirects to JupyterLab."""
    page.goto(f"{base_url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", password)
    page.click("#login_submit")
    page.wait_for_url(re.compile(rf".*/user/{re.escape(user)}/lab.*"), timeout=240_000)
    wait_for_lab(page)


def wait_for_lab(page: Page) -> None:
    page.wait_for_selector("#jp-main-dock-panel", timeout=120_000)
    page.wait_for_selector('[data-testid="dcr-jobs-panel"]', state="attached", timeout=120_000)


def open_notebook(page: Page, base_url: str, user: str, path: str) -> Locator:
    """Open ``path`` in JupyterLab (a fresh page load) and wait until its kernel is idle; returns the panel.

    The workspace is reset (``?reset``): the documents an earlier test left open are not restored, so the
    notebook is the only document and its tab is the current one, whatever order the restorer works in."""
    page.goto(f"{base_url}/user/{user}/lab/tree/{path}?reset")
    wait_for_lab(page)
    page.wait_for_function(
        """p => {
          const tabs = [...document.querySelectorAll('#jp-main-dock-panel .lm-TabBar-tab')];
          return tabs.length === 1 && tabs[0].classList.contains('lm-mod-current')
            && (tabs[0].getAttribute('title') || '').includes(p);
        }""",
        arg=path,
        timeout=120_000,
    )
    panel = current_notebook(page)
    expect(panel).to_be_visible(timeout=60_000)
    wait_idle(page)
    return panel


def current_notebook(page: Page) -> Locator:
    return page.locator("#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden)").first


def wait_idle(page: Page, timeout: float = 120_000) -> None:
    """Wait until the current notebook's cells are shown and its kernel has started and is idle."""
    page.wait_for_function(
        """() => {
          const nb = document.querySelector('#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden)');
          if (!nb || !nb.querySelector('.jp-Cell .jp-InputArea')) { return false; }
          const name = nb.querySelector('.jp-KernelName, .jp-Toolbar-kernelName');
          const status = nb.querySelector('.jp-Notebook-ExecutionIndicator');
          return !!name && !/No Kernel/.test(name.textContent || '') && !!status
            && status.getAttribute('data-status') === 'idle';
        }""",
        timeout=timeout,
        polling=100,
    )


def dismiss_notifications(page: Page) -> None:
    """Close the toasts (they cover part of a screenshot). JupyterLab's "news" question never comes: DCR
    disables its announcements plugin (tests/test_browser.py checks that)."""
    close = page.locator(".jp-Notification-Toast-Close:visible")
    for _ in range(20):
        if not close.count():
            return
        # Toasts slide out when closed: a button may detach while it is clicked; the loop looks again.
        with contextlib.suppress(PlaywrightError):
            close.first.click(force=True, timeout=2_000)
        page.wait_for_timeout(300)


def menu(page: Page, top: str, item: str) -> None:
    """Click ``top`` in the menu bar, then ``item`` in its menu."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(rf"^{re.escape(top)}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(rf"^{re.escape(item)}$")).first.click()


def run_all_cells(page: Page) -> None:
    menu(page, "Run", "Run All Cells")


def open_jobs_panel(page: Page) -> Locator:
    """Show the DCR sidebar (its tab in the left side bar) and return it."""
    panel = page.locator('[data-testid="dcr-jobs-panel"]')
    if not panel.is_visible():
        page.locator('.jp-SideBar [data-id="dcr-jobs-panel"]').click()
    expect(panel).to_be_visible()
    return panel


def job_item(page: Page, job_id: str) -> Locator:
    return page.locator(f'[data-testid="dcr-job-{job_id}"]')


def newest_job_id(page: Page, known: set[str], timeout: float = 60_000) -> str:
    """The id of a job in the panel that is not in ``known`` (the one just submitted)."""
    page.wait_for_function(
        """known => [...document.querySelectorAll('[data-testid^="dcr-job-"]')]
              .some(e => /^dcr-job-job-/.test(e.dataset.testid) && !known.includes(e.dataset.testid.slice(8)))""",
        arg=sorted(known),
        timeout=timeout,
    )
    ids = page.eval_on_selector_all(
        '[data-testid^="dcr-job-job-"]', "els => els.map(e => e.dataset.testid.slice(8))"
    )
    new = [i for i in ids if i not in known]
    assert len(new) == 1, f"expected one new job, found {new}"
    return str(new[0])


def submit_current_notebook(page: Page) -> str:
    """Click "Submit to enclave" on the notebook toolbar and confirm; returns the dialog's summary text."""
    current_notebook(page).locator('[data-testid="dcr-submit"]').click()
    summary = page.locator('[data-testid="dcr-submit-summary"]')
    expect(summary).to_be_visible(timeout=60_000)
    text = summary.inner_text()
    page.locator(".jp-DCR-submit-confirm").click()
    expect(summary).to_be_hidden(timeout=60_000)
    return text


# ---------------------------------------------------------------------------------------------------------
# Recording the panel and the event stream
# ---------------------------------------------------------------------------------------------------------

#: Records every change of a job's rendered state or progress: ``window.__dcrDom`` gets
#: ``{job, state, done, total, t}`` with ``t`` in epoch milliseconds (high resolution).
JOB_RECORDER_JS: Final = """
() => {
  if (window.__dcrDom) { return; }
  window.__dcrDom = [];
  const last = new Map();
  const now = () => performance.timeOrigin + performance.now();
  const scan = () => {
    const t = now();
    for (const li of document.querySelectorAll('[data-testid^="dcr-job-job-"]')) {
      const job = li.dataset.testid.slice(8);
      const bar = li.querySelector('[data-testid="dcr-progress"]');
      const state = li.dataset.state || '';
      const done = bar ? Number(bar.dataset.done || 0) : 0;
      const total = bar ? Number(bar.dataset.total || 0) : 0;
      const key = state + '/' + done + '/' + total;
      if (last.get(job) !== key) {
        last.set(job, key);
        window.__dcrDom.push({ job, state, done, total, t });
      }
    }
  };
  new MutationObserver(scan).observe(document.body, {
    subtree: true, childList: true, attributes: true,
    attributeFilter: ['data-state', 'data-done', 'data-total', 'data-testid']
  });
  scan();
}
"""

#: Opens the server's event stream in the page (same origin, the page's own cookies) and records each DCR job
#: event: ``window.__dcrEvents`` gets ``{job, state, cell, cells, ts, recv}`` (``ts``: the server's emit time).
EVENTS_JS: Final = """
(wsUrl) => new Promise((resolve, reject) => {
  window.__dcrEvents = [];
  const ws = new WebSocket(wsUrl);
  ws.onmessage = (m) => {
    const recv = performance.timeOrigin + performance.now();
    const e = JSON.parse(m.data);
    if (!String(e.schema_id || e.__schema__ || '').includes('/events/job/')) { return; }
    window.__dcrEvents.push({ job: e.job_id, state: e.state, cell: e.cell, cells: e.cells,
                              ts: Date.parse(e.__timestamp__), tsRaw: e.__timestamp__, recv });
  };
  ws.onopen = () => resolve(true);
  ws.onerror = () => reject(new Error('cannot open ' + wsUrl));
  window.__dcrEventSocket = ws;
})
"""


def dom_records(page: Page, job_id: str | None = None) -> list[dict[str, Any]]:
    records = page.evaluate("() => window.__dcrDom || []")
    return [r for r in records if job_id is None or r["job"] == job_id]


def state_sequence(records: list[dict[str, Any]]) -> list[str]:
    """The distinct states in the order the panel showed them."""
    seq: list[str] = []
    for r in records:
        if not seq or seq[-1] != r["state"]:
            seq.append(r["state"])
    return seq
