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

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from browser import fixtures, lab
from browser.demo_process import DemoProcess, copy_demo_data
from demo_seed import DemoSeed
from playwright.sync_api import BrowserContext, Page, Playwright, expect

from dcr_demo import data
from dcr_demo.prepare import REVIEWER_ACCOUNT, Layout

pytestmark = [pytest.mark.root, pytest.mark.slow]

# Playwright's fixtures, and pytest-jupyter's loop and server cleanup replaced for it (browser/fixtures.py).
jp_asyncio_loop, jp_server_cleanup = fixtures.jp_asyncio_loop, fixtures.jp_server_cleanup
pw, context = fixtures.pw, fixtures.context

USER = "alice"
RIVERSIDE = "Riverside Hospital"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, demo_seed: DemoSeed) -> Iterator[DemoProcess]:
    d = DemoProcess(copy_demo_data(demo_seed.dir, tmp_path_factory.mktemp("browser-demo") / "demo"))
    try:
        yield d.start()
    finally:
        d.close()


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


def _labs_notebook(demo: DemoProcess, token: str, name: str) -> None:
    """A notebook on the lab results (released only after review) that writes a table and a figure."""
    path = f"/data/{data.PROVIDER}/{data.LABS.dataset}/{data.LABS.file_name}"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os\nimport pandas as pd\nimport matplotlib\nmatplotlib.use('Agg')\n"
            f"labs = pd.read_csv({path!r})\nos.makedirs('results', exist_ok=True)\n"
            "counts = labs.groupby('test').size().rename('count')\ncounts.to_csv('results/tests.csv')\n"
            "ax = counts.plot.bar()\nax.figure.savefig('results/tests.png')\nprint(len(labs), 'lab results')"
        )
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    r = demo.server("PUT", USER, f"api/contents/{name}", token, json={"type": "notebook", "content": nb})
    assert r.status_code in (200, 201), r.text


def _submit_labs(demo: DemoProcess, page: Page, name: str) -> str:
    lab.open_notebook(page, demo.url, USER, name)
    lab.open_jobs_panel(page)
    known = _known_jobs(page)
    summary = lab.submit_current_notebook(page)
    assert data.LABS.ref in summary
    job_id = lab.newest_job_id(page, known)
    item = lab.job_item(page, job_id)
    expect(item).to_have_attribute("data-state", "held", timeout=300_000)
    expect(item.locator('[data-testid="dcr-job-state"]')).to_have_text("held for review")
    review = item.locator('[data-testid="dcr-review"]')
    expect(review).to_have_attribute("data-status", "waiting", timeout=60_000)
    expect(review).to_contain_text("held for review by Riverside Hospital")
    expect(item.locator('[data-testid="dcr-open-notebook"]')).to_have_count(0)
    expect(item.locator('[data-testid="dcr-outputs"]')).to_have_count(0)
    return job_id


def _reviewer_page(demo: DemoProcess, own: BrowserContext) -> Page:
    """The reviewer, in a browser of her own (her own cookies), logged in to the hub only."""
    own.set_default_timeout(60_000)
    p = own.new_page()
    p.goto(f"{demo.url}/hub/login?next=%2Fhub%2Fdcr%2Freview")
    p.fill("#username_input", REVIEWER_ACCOUNT)
    p.fill("#password_input", demo.password)
    p.click("#login_submit")
    p.wait_for_selector("#dcr-review-queue")
    return p


def test_review_held_outputs_in_the_hub(
    demo: DemoProcess, page: Page, pw: Playwright, refusals: lab.RefusalWatch, tmp_path: Path
) -> None:
    """A job on the reviewed lab results ends held, and nothing of its outputs reaches the researcher through
    her server or the hub; the reviewer finds it on the review page with its outputs and the checks'
    findings and approves; the outputs reach the researcher (the panel says so, with a notification), open
    like any job's and match the receipt's digests. A second job is rejected with a comment and never
    releases anything. The audit trail holds every step in order and verifies."""
    token = demo.token(USER)
    _labs_notebook(demo, token, "labs.ipynb")
    page.evaluate(lab.JOB_RECORDER_JS)
    job_id = _submit_labs(demo, page, "labs.ipynb")

    # Nothing of the outputs, from any endpoint the researcher can reach.
    job = demo.server("GET", USER, f"dcr/api/jobs/{job_id}", token).json()
    shown = json.dumps(job)
    assert "tests.csv" not in shown and "tests.png" not in shown
    assert demo.server("GET", USER, f"dcr/api/jobs/{job_id}/outputs", token).json() == {"files": []}
    assert (
        demo.server("GET", USER, f"dcr/api/jobs/{job_id}/outputs/results/tests.csv", token).status_code == 404
    )
    listing = demo.server("GET", USER, f"api/contents/{job['outputs_path']}", token).json()
    assert {c["name"] for c in listing["content"]} <= {"receipt.json", "attestation.jwt", "signer-jwks.json"}
    status = demo.api("GET", f"/dcr/airlock/jobs/{job_id}", token)
    assert status.status_code == 200 and "tests." not in status.text
    assert demo.api("GET", f"/dcr/airlock/jobs/{job_id}/release", token).status_code == 409
    alice = demo.login(USER)
    assert alice.get(f"{demo.url}/hub/dcr/review/{job_id}", timeout=60).status_code == 404
    assert (
        alice.get(f"{demo.url}/hub/dcr/review/{job_id}/files/results/tests.csv", timeout=60).status_code
        == 404
    )

    # The reviewer's page: the job, its notebook as run, its files, the findings; then approval.
    with lab.chromium(pw, tmp_path / "reviewer-profile") as own:
        _review(demo, page, _reviewer_page(demo, own), token, job_id, job)


def _review(
    demo: DemoProcess, page: Page, reviewer: Page, token: str, job_id: str, job: dict[str, Any]
) -> None:
    row = reviewer.locator(f'#dcr-queue tr[data-job="{job_id}"]')
    expect(row).to_contain_text(USER)
    expect(row).to_contain_text(data.LABS.ref)
    row.locator("a").first.click()
    expect(reviewer.locator("#dcr-review-job")).to_have_attribute("data-status", "waiting")
    files = reviewer.locator("section.dcr-file")
    expect(files).to_have_count(3)
    table = reviewer.locator('section.dcr-file[data-path="results/tests.csv"] table')
    expect(table).to_contain_text("hba1c")
    image = reviewer.locator('section.dcr-file[data-path="results/tests.png"] img')
    assert image.evaluate("img => img.complete && img.naturalWidth > 0")
    expect(reviewer.locator('section.dcr-file[data-path="labs.ipynb"]')).to_contain_text("lab results")
    expect(reviewer.locator("#dcr-findings")).to_be_visible()
    lab.ARTIFACTS.mkdir(exist_ok=True)
    reviewer.screenshot(path=str(lab.ARTIFACTS / "review-page.png"), full_page=True)
    reviewer.fill("#dcr-comment", "aggregate counts only")
    reviewer.click("#dcr-approve")
    expect(reviewer.locator("#dcr-review-job")).to_have_attribute("data-status", "released")

    # The researcher: released, with a notification; the outputs open and match the receipt.
    item = lab.job_item(page, job_id)
    expect(item).to_have_attribute("data-state", "released", timeout=60_000)
    toast = page.locator(".Toastify__toast").filter(has_text=f"released after review by {RIVERSIDE}")
    expect(toast).to_have_count(1, timeout=30_000)
    expect(item.locator('[data-testid="dcr-open-notebook"]')).to_be_visible()
    outputs = demo.server("GET", USER, f"dcr/api/jobs/{job_id}/outputs", token).json()["files"]
    assert {f["path"] for f in outputs} == {"labs.ipynb", "results/tests.csv", "results/tests.png"}
    reveal = demo.server("GET", USER, f"api/contents/{job['outputs_path']}/outputs-reveal.json", token).json()
    listed = {o["path"]: o["sha256"] for o in json.loads(reveal["content"])["outputs"]}
    for f in outputs:
        body = demo.server("GET", USER, f"dcr/api/jobs/{job_id}/outputs/{f['path']}", token).content
        assert "sha256:" + hashlib.sha256(body).hexdigest() == listed[f["path"]] == f["sha256"]
    verdict = demo.server("GET", USER, f"dcr/api/jobs/{job_id}/verify", token).json()
    assert verdict["verified"] is True, verdict
    lab.dismiss_notifications(page)

    # A second job, rejected: the comment reaches the researcher, the outputs never do.
    rejected = _submit_labs(demo, page, "labs.ipynb")
    reviewer.goto(f"{demo.url}/hub/dcr/review/{rejected}")
    reviewer.fill("#dcr-comment", "please aggregate by month first")
    reviewer.click("#dcr-reject")
    expect(reviewer.locator("#dcr-review-job")).to_have_attribute("data-status", "rejected")
    item = lab.job_item(page, rejected)
    expect(item).to_have_attribute("data-state", "rejected", timeout=60_000)
    expect(item).to_contain_text("please aggregate by month first")
    toast = page.locator(".Toastify__toast").filter(has_text=f"rejected in review by {RIVERSIDE}")
    expect(toast).to_have_count(1, timeout=30_000)
    assert demo.server("GET", USER, f"dcr/api/jobs/{rejected}/outputs", token).json() == {"files": []}
    assert demo.api("GET", f"/dcr/airlock/jobs/{rejected}/release", token).status_code == 409

    # The audit trail: every step of both jobs, in order, and the chain verifies.
    config = Layout.at(demo.dir).hub_config
    out = subprocess.run(
        [str(BIN / "dcr"), "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        [str(BIN / "dcr"), "audit", "export", "--format", "json", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    events = json.loads(out.stdout)
    events = events["events"] if isinstance(events, dict) else events
    for jid, outcome in ((job_id, "airlock.released"), (rejected, "airlock.rejected")):
        mine = [e["event"] for e in events if e["job_id"] == jid]
        wanted = ["grant.issued", "enclave.launch", "enclave.key_released", "enclave.end", "airlock.received"]
        wanted += ["airlock.approved", "airlock.released"] if outcome == "airlock.released" else [outcome]
        seen = [e for e in mine if e in wanted]
        # One key release per dataset of the job: the same event may come twice in a row.
        assert [e for i, e in enumerate(seen) if i == 0 or e != seen[i - 1]] == wanted, mine
