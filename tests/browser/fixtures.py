"""Fixtures of the modules that drive JupyterLab in Chromium (``from browser.fixtures import ...``).

Playwright's sync API runs on the thread's event loop for the whole module, so two of pytest-jupyter's
autouse fixtures are replaced here: these modules run no in-process Jupyter server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, Playwright, sync_playwright

from . import lab


@pytest.fixture
def jp_asyncio_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Replaces pytest-jupyter's loop fixture, which would close the loop Playwright runs on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def jp_server_cleanup() -> Iterator[None]:
    """Replaces pytest-jupyter's server cleanup: no in-process Jupyter server runs here."""
    yield


@pytest.fixture(scope="module")
def pw() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def context(pw: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with lab.chromium(pw, tmp_path_factory.mktemp("chromium-profile")) as ctx:
        ctx.set_default_timeout(60_000)
        yield ctx
