"""The jobs panel in JupyterLab (real Chromium) for a job the hub launches on (loopback) Confidential Space.

The hub, loopback Google and the "VMs" are ``cloud_hub_env``'s; alice's server holds no Google credential
and talks only to the hub (``HubBackend``). She submits from the notebook's toolbar as with the local
enclave (``test_browser.py``); the panel must show the job the same way: forward through the lifecycle
to ``succeeded`` with its progress, and a receipt that verifies. What differs is only what is true of
the enclave: no *simulated* tag, no simulation banner, the Confidential Space kind in the receipt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import nbformat
import pytest
from browser import fixtures, lab
from cloud_hub_env import CloudHub, cloud_hub_running
from gcp_fakes.google import COUNT_ROWS
from hub_harness import PASSWORD
from playwright.sync_api import BrowserContext, Page, expect

pytestmark = [pytest.mark.root, pytest.mark.slow]

# Playwright's fixtures, and pytest-jupyter's loop and server cleanup replaced for it (browser/fixtures.py).
jp_asyncio_loop, jp_server_cleanup = fixtures.jp_asyncio_loop, fixtures.jp_server_cleanup
pw, context = fixtures.pw, fixtures.context


@pytest.fixture(scope="module")
def cloud_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudHub]:
    with cloud_hub_running(tmp_path_factory.mktemp("cloud-browser")) as running:
        yield running


@pytest.fixture(scope="module")
def page(cloud_hub: CloudHub, context: BrowserContext) -> Page:
    """Alice, logged in through the hub's form, in her JupyterLab."""
    p = context.new_page()
    lab.login(p, cloud_hub.hub.url, "alice", PASSWORD)
    return p


def test_the_jobs_panel_follows_a_cloud_job_as_a_local_one(cloud_hub: CloudHub, page: Page) -> None:
    """Submit from the toolbar; the panel's entry moves forward only, through ``running`` (cell by cell)
    to ``succeeded``; the VM is gone; "Open notebook" opens the enclave's executed copy; the receipt
    verifies, names Confidential Space, shows no simulation banner, and the entry has no *simulated* tag."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in COUNT_ROWS]
    # With its kernel named, JupyterLab starts it instead of asking which one.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    r = cloud_hub.hub.server_api(
        "alice", "PUT", "api/contents/cloud-panel.ipynb", token=cloud_hub.token("alice"),
        json_body={"type": "notebook", "content": nb},
    )  # fmt: skip
    assert r.status_code in (200, 201), r.text
    lab.open_notebook(page, cloud_hub.hub.url, "alice", "cloud-panel.ipynb")
    lab.dismiss_notifications(page)
    page.evaluate(lab.JOB_RECORDER_JS)
    lab.open_jobs_panel(page)
    known = set(
        page.eval_on_selector_all(
            '[data-testid^="dcr-job-job-"]', "els => els.map(e => e.dataset.testid.slice(8))"
        )
    )
    summary = lab.submit_current_notebook(page)
    assert "cloud-panel.ipynb" in summary and "acme/insurance" in summary, summary
    job_id = lab.newest_job_id(page, known)
    item = lab.job_item(page, job_id)
    expect(item).to_have_attribute("data-state", "succeeded", timeout=240_000)

    records = lab.dom_records(page, job_id)
    states = lab.state_sequence(records)
    order = [lab.STATE_ORDER.index(s) for s in states]
    assert order == sorted(order) and len(set(order)) == len(order), states
    assert {"launching", "running"} <= set(states) and states[-1] == "succeeded", states
    assert records[-1]["done"] == records[-1]["total"] == len(COUNT_ROWS), records
    expect(item.locator(".jp-DCR-tag", has_text="simulated")).to_have_count(0)
    deadline = time.monotonic() + 30
    while cloud_hub.vms() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cloud_hub.vms() == []

    # The executed notebook, from the sealed outputs the hub kept in Cloud Storage and the server opened.
    item.locator('[data-testid="dcr-open-notebook"]').click()
    executed = page.locator(
        f'#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden):has([data-job-id="{job_id}"])'
    )
    expect(executed.locator('[data-testid="dcr-enclave-banner"]')).to_contain_text(job_id)
    expect(executed.locator(".jp-OutputArea-output").last).to_contain_text("done")

    item.locator('[data-testid="dcr-view-receipt"]').click()
    receipt = page.locator('[data-testid="dcr-receipt"]').filter(has_text=job_id)
    expect(receipt.locator('[data-testid="dcr-receipt-verdict"]')).to_have_attribute("data-verified", "true")
    expect(receipt.locator('[data-testid="dcr-enclave-kind"]')).to_have_text("confidential_space")
    expect(receipt.locator('[data-testid="dcr-simulation-banner"]')).to_have_count(0)
    lab.ARTIFACTS.mkdir(exist_ok=True)
    page.locator('[data-testid="dcr-jobs-panel"]').screenshot(
        path=str(lab.ARTIFACTS / "cloud-jobs-panel.png")
    )
