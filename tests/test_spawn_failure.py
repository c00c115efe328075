"""A server that cannot start is reported at once, with its reason, instead of at the hub's http_timeout.

One real hub (``tests/hub_harness.py``, ``dcr-local``, ``http_timeout`` 180 s as in the demo) whose
spawner is configured so that every sandbox fails: a directory the servers must read does not exist, so
the sandbox's first process cannot build the view and exits. The reason travels from that process to the
spawner (a status pipe) and from the spawner to JupyterHub's progress events, which the spawn-pending page
shows. Checked through the progress API and in Chromium after a login through the hub's form.

Users named ``*-ext-*`` get a sandbox that builds, and a server whose DCR extension refuses its
configuration (a trust file it cannot read) and exits: the spawn fails with the server's own last error
line, which the sandbox helper kept from the server's stderr (a bounded tail, secrets masked).
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from browser import lab
from hub_harness import PASSWORD, Hub, delete_account
from playwright.sync_api import expect, sync_playwright

from dcr_spawner.local import account_name, last_error_lines

pytestmark = pytest.mark.root  # system accounts and namespaces (run, never skipped)

MISSING = f"/tmp/dcr-absent-{secrets.token_hex(4)}"  # never created: the point of the test
#: A trust file the DCR extension cannot read (absent), given to the servers of "*-ext-*" users.
UNREADABLE = f"/nonexistent-dcr-{secrets.token_hex(4)}/jwks.json"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    base = tmp_path_factory.mktemp("spawn-failure")
    homes = base / "homes"
    config = f"""
        import dcr_spawner
        c.DCRPolicy.datasets = {{}}
        c.DCRLocalSpawner.home_base = {str(homes)!r}
        c.DCRLocalSpawner.readable_paths = [{MISSING!r}]
        c.Spawner.http_timeout = 180

        async def slow_start(spawner):
            # Users named "*-slow-*" wait 2 s before the spawner starts: longer than the 1 s the hub's
            # spawn page waits before it hands over to the spawn-pending page.
            if "-slow-" in spawner.user.name:
                import asyncio
                await asyncio.sleep(2)
            # Users named "*-ext-*" get a sandbox, and a server whose DCR extension refuses to start.
            if "-ext-" in spawner.user.name:
                spawner.readable_paths = []
                spawner.args = ["--DCRExtension.trust_jwks={UNREADABLE}"]

        c.Spawner.pre_spawn_hook = slow_start
        dcr_spawner.enable(c)
    """
    h = Hub(base / "hub", spawner_class="dcr-local", config=config)
    users = [f"dcrfail-{n}-{secrets.token_hex(2)}" for n in ("api", "web", "slow", "ext")]
    try:
        h.start()
        for u in users:
            h.create_user(u)
        h.users = users  # type: ignore[attr-defined]
        yield h
    finally:
        h.stop()
        for u in users:
            delete_account(account_name(u, "dcr-"))
        shutil.rmtree(homes, ignore_errors=True)


def _progress(hub: Hub, session: requests.Session, user: str) -> list[dict]:
    r = session.get(f"{hub.url}/hub/api/users/{user}/server/progress", stream=True, timeout=30)
    assert r.status_code == 200, r.text
    events = []
    for line in r.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            events.append(json.loads(line[5:]))
            if events[-1].get("failed") or events[-1].get("ready"):
                break
    return events


def test_the_start_request_and_the_progress_stream_carry_the_sandboxs_reason(hub: Hub) -> None:
    """The user starts their server: the failure is known before the hub's slow_spawn_timeout, so the start
    request itself answers with the sandbox helper's reason (the missing path, not "Internal Server
    Error"); the progress stream the spawn-pending page reads ends failed with the same reason; the hub
    holds no server for the user."""
    user = hub.users[0]  # type: ignore[attr-defined]
    session = hub.login(user)
    r = session.post(f"{hub.url}/hub/api/users/{user}/server", json={}, timeout=60)
    assert r.status_code == 500, r.text
    assert MISSING in r.json()["message"] and "cannot build the sandbox" in r.json()["message"], r.text
    events = _progress(hub, session, user)
    assert events[-1]["failed"] is True and MISSING in events[-1]["message"], events
    model = hub.api("GET", f"/users/{user}").json()
    assert not (model.get("servers") or {}).get(""), model
    assert "cannot build the sandbox" in hub.log()


@pytest.mark.parametrize(
    ("which", "page_name"), [(1, "the spawn page"), (2, "the spawn-pending page")], ids=["fast", "slow"]
)
def test_the_page_shows_the_reason_within_seconds(
    hub: Hub, tmp_path: Path, which: int, page_name: str
) -> None:
    """In Chromium, after a login through the hub's form, the failure and its reason appear within 5 s
    (the hub's http_timeout is 180 s): on the spawn page itself when the sandbox fails within the second
    that page waits, else on the spawn-pending page through the progress events."""
    user = hub.users[which]  # type: ignore[attr-defined]
    with sync_playwright() as pw, lab.chromium(pw, tmp_path / "profile") as ctx:
        page = ctx.new_page()
        page.goto(f"{hub.url}/hub/login")
        page.fill("#username_input", user)
        page.fill("#password_input", PASSWORD)
        page.click("#login_submit")
        if page_name == "the spawn-pending page":
            page.wait_for_url(f"**/hub/spawn-pending/{user}**", timeout=10_000)
            shown = page.locator("#progress-message")
        else:
            shown = page.locator("body")
        expect(shown).to_contain_text(MISSING, timeout=5_000)
        expect(shown).to_contain_text("cannot build the sandbox")
        lab.ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(lab.ARTIFACTS / f"spawn-failure-{which}.png"))


def test_a_server_that_stops_while_starting_shows_its_last_error(hub: Hub) -> None:
    """The sandbox builds but the server exits while starting (its DCR extension cannot read a trust file):
    the spawn fails at once (the start request or the progress stream the spawn-pending page reads) with the
    exit status and the server's own error line, not a bare status or a timeout; the hub's log has the
    server's full output."""
    user = hub.users[3]  # type: ignore[attr-defined]
    session = hub.login(user)
    r = session.post(f"{hub.url}/hub/api/users/{user}/server", json={}, timeout=60)
    if r.status_code == 500:
        message = r.json()["message"]
    else:
        assert r.status_code == 202, r.text
        events = _progress(hub, session, user)
        assert events[-1]["failed"] is True, events
        message = events[-1]["message"]
    assert f"the server of {user} stopped while starting (exit status 1): " in message, message
    assert "Bad DCR configuration, the server stops" in message and UNREADABLE in message, message
    assert "cannot build the sandbox" not in message
    assert len(message) < 1000
    assert "Bad DCR configuration, the server stops" in hub.log()  # still passed on to the hub's log


def test_last_error_lines_are_bounded_and_masked() -> None:
    """What a failed server's output shows: its last error-level lines without log prefixes or escape
    sequences (its last lines when none is an error), the server's secret values and anything shaped like
    a token masked, at most three lines and 600 characters."""
    hub_token = secrets.token_hex(16)
    out = (
        "[I 2025-01-31 12:00:00.000 ServerApp] starting\n"
        f"[W 2025-01-31 12:00:00.001 ServerApp] talking to the hub with {hub_token}\n"
        "\x1b[31m[C 2025-01-31 12:00:00.002 ServerApp]\x1b[0m Bad DCR configuration: no /x\n"
        "[I 2025-01-31 12:00:00.003 ServerApp] http://127.0.0.1:1/?token=0123456789abcdef stopping\n"
    ).encode()
    assert last_error_lines(out, [hub_token]) == "Bad DCR configuration: no /x"
    plain = last_error_lines(out.replace(b"[C ", b"[I "), [hub_token])
    assert hub_token not in plain and "0123456789abcdef" not in plain and "token=[hidden]" in plain
    assert plain.count(" / ") == 2 and "starting" not in plain
    noisy = last_error_lines(("ValueError: " + "x" * 5000 + "\n").encode() * 3)
    assert len(noisy) <= 600 and noisy.startswith("...")
    assert last_error_lines(b"") == ""
