"""JupyterLab with the DCR extension in a real browser, against a real hub: submit, follow, open, verify, cancel.

The module starts ``dcr demo`` in a temporary directory (JupyterHub with the real configurable-http-proxy on
127.0.0.1, DCR's local spawner and grant service, the local enclave host) and drives Debian's Chromium with
Playwright (``tests/browser/lab.py``): log in through the hub's form, let the hub spawn the server, open the
sample notebook, run it on the synthetic data, click "Submit to Enclave", watch the jobs panel follow the job,
open the executed notebook and the receipt. A ``MutationObserver`` in the page records every state and
progress change of the job's entry, so the test sees the sequence the panel went through. Screenshots of the
jobs panel and the receipt go to ``test-artifacts/``. Every test fails if a 403 answer or an XSRF complaint
appears in the hub's log (the servers log there too) or in the page's responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterator

import nbformat
import pytest
from browser import lab
from browser.demo_process import DemoProcess, copy_demo_data
from conftest import DemoSeed
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from dcr_demo import data
from dcr_demo.prepare import Layout

pytestmark = [pytest.mark.root, pytest.mark.slow]

USER = "alice"


@pytest.fixture
def jp_asyncio_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Replaces pytest-jupyter's autouse loop fixture here: it would close the thread's current loop, which
    is the one Playwright's sync API runs on for the whole module. This module runs no in-process server."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def jp_server_cleanup() -> Iterator[None]:
    """Replaces pytest-jupyter's autouse server cleanup: no in-process Jupyter server runs here."""
    yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, demo_seed: DemoSeed) -> Iterator[DemoProcess]:
    d = DemoProcess(copy_demo_data(demo_seed.dir, tmp_path_factory.mktemp("browser-demo") / "demo"))
    try:
        yield d.start()
    finally:
        d.close()


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with sync_playwright() as pw, lab.chromium(pw, tmp_path_factory.mktemp("chromium-profile")) as ctx:
        ctx.set_default_timeout(60_000)
        yield ctx


@pytest.fixture(scope="module")
def page(demo: DemoProcess, context: BrowserContext) -> Page:
    """Alice, logged in through the hub's form; the hub spawned her server and JupyterLab is up."""
    p = context.new_page()
    watch = lab.RefusalWatch(demo.hub_log).start(p)
    lab.login(p, demo.url, USER, demo.password)
    assert watch.found() == []
    return p


@pytest.fixture
def refusals(demo: DemoProcess, page: Page) -> Iterator[lab.RefusalWatch]:
    """Fails the test if a 403 or an XSRF complaint shows up while it runs."""
    watch = lab.RefusalWatch(demo.hub_log).start(page)
    yield watch
    assert watch.found() == [], "403 or XSRF complaints:\n" + "\n".join(watch.found())


def _code_cells(demo: DemoProcess, token: str, path: str) -> int:
    r = demo.server("GET", USER, f"api/contents/{path}", token)
    assert r.status_code == 200, r.text
    return sum(1 for c in r.json()["content"]["cells"] if c["cell_type"] == "code")


def _digest(demo: DemoProcess, which: str) -> str:
    """What the sample notebook prints for the patients file: the first 12 hex digits of its sha256, of the
    demo's real file or of its synthetic version (the one the sandbox shows)."""
    layout = Layout.at(demo.dir)
    path = layout.real_file(data.PATIENTS) if which == "real" else layout.synthetic_file(data.PATIENTS)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _known_jobs(page: Page) -> set[str]:
    return set(
        page.eval_on_selector_all(
            '[data-testid^="dcr-job-job-"]', "els => els.map(e => e.dataset.testid.slice(8))"
        )
    )


def test_submit_watch_open_and_verify(demo: DemoProcess, page: Page, refusals: lab.RefusalWatch) -> None:
    """Alice runs the sample notebook on her synthetic data, clicks "Submit to Enclave" and confirms; the
    jobs panel shows the job moving forward through the lifecycle (never backwards) to ``succeeded`` while
    its progress bar advances cell by cell to all code cells; "Open notebook" opens the executed notebook,
    which read the real file (it prints the real file's digest where the sandbox run printed the synthetic
    file's) and shows the plot, in a tab named ``analysis.enclave-<8 hex>.ipynb`` under a banner naming the
    job; the banner's "View receipt" shows every check passing (the same checks the server's verify API
    reports) and the simulation banner. JupyterLab never asked about Jupyter news."""
    token = demo.token(USER)
    cells = _code_cells(demo, token, "analysis.ipynb")
    real, synthetic = _digest(demo, "real"), _digest(demo, "synthetic")
    assert real != synthetic

    lab.open_notebook(page, demo.url, USER, "analysis.ipynb")
    # A clean room suggests fetching nothing from outside: JupyterLab never asks about Jupyter news.
    page_config = page.evaluate(
        "() => JSON.parse(document.getElementById('jupyter-config-data').textContent)"
    )
    assert "@jupyterlab/apputils-extension:announcements" in page_config["disabledExtensions"]
    expect(page.get_by_text("official Jupyter news")).to_have_count(0)
    lab.dismiss_notifications(page)
    lab.run_all_cells(page)
    notebook = lab.current_notebook(page)
    expect(notebook.locator(".jp-OutputArea-output img").first).to_be_visible(timeout=180_000)
    lab.wait_idle(page)
    assert "rows, columns: " + ", ".join(data.PATIENTS.columns) in notebook.inner_text()
    assert f"sha256 of the file: {synthetic}" in notebook.inner_text()

    page.evaluate(lab.JOB_RECORDER_JS)
    lab.open_jobs_panel(page)
    known = _known_jobs(page)
    summary = lab.submit_current_notebook(page)
    assert "analysis.ipynb" in summary and data.PATIENTS.ref in summary
    job_id = lab.newest_job_id(page, known)
    item = lab.job_item(page, job_id)
    expect(item).to_have_attribute("data-state", "succeeded", timeout=300_000)
    expect(item.locator('[data-testid="dcr-open-notebook"]')).to_be_visible()

    records = lab.dom_records(page, job_id)
    states = lab.state_sequence(records)
    order = [lab.STATE_ORDER.index(s) for s in states]
    assert order == sorted(order) and len(set(order)) == len(order), states
    assert "running" in states and states[-1] == "succeeded", states
    running_done = [r["done"] for r in records if r["state"] == "running" and r["total"]]
    assert running_done == sorted(running_done) and len(set(running_done)) >= 2, records
    assert records[-1]["done"] == records[-1]["total"] == cells, records
    bar = item.locator('[data-testid="dcr-progress"]')
    assert bar.get_attribute("data-done") == bar.get_attribute("data-total") == str(cells)
    lab.ARTIFACTS.mkdir(exist_ok=True)
    page.locator('[data-testid="dcr-jobs-panel"]').screenshot(path=str(lab.ARTIFACTS / "jobs-panel.png"))

    # The executed notebook: the enclave's run on the real file, with its plot, in a tab of its own name
    # under a banner that names the job and opens its receipt.
    copy_name = f"analysis.enclave-{job_id[4:12]}.ipynb"
    item.locator('[data-testid="dcr-open-notebook"]').click()
    page.wait_for_function(
        "p => { const t = document.querySelector('#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current');"
        " return !!t && (t.getAttribute('title') || '').includes(p); }",
        arg=f"{job_id}/{copy_name}",
    )
    tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current")
    expect(tab.locator(".lm-TabBar-tabLabel")).to_have_text(copy_name)
    expect(tab).to_have_class(re.compile(r"\bjp-DCR-enclave-tab\b"))
    executed = lab.current_notebook(page)
    banner = executed.locator('[data-testid="dcr-enclave-banner"]')
    expect(banner).to_have_attribute("data-job-id", job_id)
    expect(banner).to_contain_text(f"Executed in the enclave on the real data — job {job_id}")
    first_cell = executed.locator(".jp-Cell").first
    expect(first_cell).to_contain_text("Executed in the enclave on the real data")
    expect(first_cell).to_contain_text(job_id)
    image = executed.locator(".jp-OutputArea-output img").first
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")
    shown = executed.inner_text()
    assert f"{data.PATIENTS.rows} rows, columns: " in shown
    assert f"sha256 of the file: {real}" in shown and synthetic not in shown, shown

    # The receipt: every check of `dcr verify`, run by the server against the enclave host's key, opened
    # from the executed notebook's banner.
    banner.locator('[data-testid="dcr-banner-receipt"]').click()
    receipt = page.locator('[data-testid="dcr-receipt"]').filter(has_text=job_id)
    expect(receipt.locator('[data-testid="dcr-receipt-verdict"]')).to_have_attribute("data-verified", "true")
    expect(receipt.locator('[data-testid="dcr-simulation-banner"]')).to_be_visible()
    checks = receipt.locator('[data-testid="dcr-receipt-check"]')
    shown = {c.get_attribute("data-check"): c.get_attribute("data-passed") for c in checks.all()}
    server = demo.server("GET", USER, f"dcr/api/jobs/{job_id}/verify", token).json()
    assert shown == {c["name"]: "true" for c in server["checks"]} and server["verified"] is True
    receipt.screenshot(path=str(lab.ARTIFACTS / "receipt.png"))
    lab.dismiss_notifications(page)
    page.screenshot(path=str(lab.ARTIFACTS / "jupyterlab-jobs-and-receipt.png"))


def test_cancel_a_long_running_job_from_the_panel(
    demo: DemoProcess, page: Page, refusals: lab.RefusalWatch
) -> None:
    """A job whose notebook would run for ten minutes is cancelled with the panel's Cancel button (and the
    confirmation): the panel shows ``cancelled``, the server's record says ``cancelled``, and the job
    offers no executed notebook or receipt."""
    token = demo.token(USER)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("print('started')"),
        nbformat.v4.new_code_cell("import time\n\nfor _ in range(600):\n    time.sleep(1)"),
        nbformat.v4.new_code_cell("print('never reached')"),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    r = demo.server("PUT", USER, "api/contents/long.ipynb", token, json={"type": "notebook", "content": nb})
    assert r.status_code in (200, 201), r.text

    lab.open_notebook(page, demo.url, USER, "long.ipynb")
    page.evaluate(lab.JOB_RECORDER_JS)
    lab.open_jobs_panel(page)
    known = _known_jobs(page)
    lab.submit_current_notebook(page)
    job_id = lab.newest_job_id(page, known)
    item = lab.job_item(page, job_id)
    expect(item).to_have_attribute("data-state", "running", timeout=180_000)
    # The enclave is in the long cell: cell 2 of 3 has started.
    expect(item.locator('[data-testid="dcr-progress"]')).to_have_attribute(
        "data-done", re.compile(r"^[1-9]"), timeout=120_000
    )

    item.locator('[data-testid="dcr-cancel"]').click()
    page.locator(".jp-DCR-cancel-confirm").click()
    expect(item).to_have_attribute("data-state", "cancelled", timeout=120_000)
    expect(item.locator('[data-testid="dcr-job-state"]')).to_have_text(re.compile("cancelled"))
    assert demo.server("GET", USER, f"dcr/api/jobs/{job_id}", token).json()["state"] == "cancelled"
    expect(item.locator('[data-testid="dcr-open-notebook"]')).to_have_count(0)
    expect(item.locator('[data-testid="dcr-view-receipt"]')).to_have_count(0)
    states = lab.state_sequence(lab.dom_records(page, job_id))
    assert states[-1] == "cancelled" and "running" in states, states


def test_a_job_on_the_reviewed_dataset_shows_held_for_review(
    demo: DemoProcess, page: Page, refusals: lab.RefusalWatch
) -> None:
    """A notebook on the lab results (released only after the provider's review) runs in the enclave and the
    panel shows it held: the badge says "held for review", a review line says where the outputs are (who
    must review and the approvals, or why they are not sent yet), and there is nothing to open."""
    token = demo.token(USER)
    path = f"/data/{data.PROVIDER}/{data.LABS.dataset}/{data.LABS.file_name}"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            f"import pandas as pd\nlabs = pd.read_csv({path!r})\nlabs.groupby('test')['result'].mean().round(1)"
        )
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    r = demo.server("PUT", USER, "api/contents/labs.ipynb", token, json={"type": "notebook", "content": nb})
    assert r.status_code in (200, 201), r.text

    lab.open_notebook(page, demo.url, USER, "labs.ipynb")
    lab.open_jobs_panel(page)
    known = _known_jobs(page)
    summary = lab.submit_current_notebook(page)
    assert data.LABS.ref in summary
    job_id = lab.newest_job_id(page, known)
    item = lab.job_item(page, job_id)
    expect(item).to_have_attribute("data-state", "held", timeout=300_000)
    expect(item.locator('[data-testid="dcr-job-state"]')).to_have_text("held for review")
    review = item.locator('[data-testid="dcr-review"]')
    expect(review).to_have_text(re.compile(r"^held"))
    status = review.get_attribute("data-status")
    assert status in ("", "unsent", "waiting"), status
    if status == "waiting":
        expect(review).to_contain_text("held for review by Riverside Hospital")
    expect(item.locator('[data-testid="dcr-open-notebook"]')).to_have_count(0)
    expect(item.locator('[data-testid="dcr-outputs"]')).to_have_count(0)
