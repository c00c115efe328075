"""``dcr demo`` for real: a subprocess on free loopback ports in a temporary directory, as root.

The module starts one demo (the first run generates the data and synthesizes it with ``dcr provider add``),
logs in through the hub, checks the hub, the grant service's view of each user's datasets, the store and the
enclave host, spawns a researcher's server (which finds the sample notebook in their home) and runs the
sample notebook in the enclave through the server extension's REST API. It then stops the demo with SIGTERM
and checks that no process it started is left, and starts it again in the same directory to check the data
is reused. Bad ``--dir`` and ``--port`` values are refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
import requests
from browser.demo_process import BIN, READY_LINE, DemoError, DemoProcess, copy_demo_data, free_port
from demo_seed import DemoSeed

from dcr_demo import data
from dcr_demo import prepare as prepare_module
from dcr_demo.hub import HomeSeeder, seed_home
from dcr_demo.prepare import (
    ENTITLED,
    EPSILON,
    GROUPS,
    PROVIDERS,
    REPORT_EPSILON,
    REVIEWER_ACCOUNT,
    Layout,
    entitled_datasets,
)
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.pack.store import Store
from dcr_enclave.platform.client import HostClient

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _printed(raw: str) -> str:
    """What a notebook's code cells printed (their stream outputs), as one string."""
    nb = nbformat.reads(raw, 4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "demo"


@pytest.fixture(scope="module")
def demo(demo_dir: Path, demo_seed: DemoSeed) -> Iterator[DemoProcess]:
    d = DemoProcess(copy_demo_data(demo_seed.dir, demo_dir))
    try:
        yield d.start()
    finally:
        d.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_first_run_generates_the_data_and_synthesizes_it(demo_seed: DemoSeed) -> None:
    """The session's first demo run (the one every demo of the suite starts from a copy of) generated each
    real table and made its DP synthetic version with MST and a researchers' fidelity report."""
    for table in data.TABLES:
        assert f"generated the real table {table.ref}" in demo_seed.output
        assert f"making the DP synthetic version of {table.ref} with MST" in demo_seed.output
    assert demo_seed.output.count("fidelity report for researchers") == len(data.TABLES)
    assert READY_LINE in demo_seed.output


def test_demo_prints_url_and_logins_and_the_hub_answers(demo: DemoProcess) -> None:
    """The demo prints its URL and the one password, the hub answers through the proxy on 127.0.0.1, each
    demo account (the researchers, the provider, its reviewer) logs in with that password (the hub API then
    names the logged-in user) and a wrong password is refused. The reviewer's line names the provider and the
    dataset whose held outputs it decides on."""
    assert f"{READY_LINE}: {demo.url}/" in demo.output
    assert demo.password in demo.output
    for user in ("alice", "bob", "carol", REVIEWER_ACCOUNT):
        assert f"    {user} " in demo.output
    reviewer = [line for line in demo.output.splitlines() if line.startswith(f"    {REVIEWER_ACCOUNT} ")]
    assert len(reviewer) == 1, demo.output
    assert f"reviewer of Riverside Hospital ({data.PROVIDER})" in reviewer[0]
    assert f"held outputs of {data.LABS.ref} on the review page, {demo.url}/hub/dcr/review" in reviewer[0]
    session = demo.login(REVIEWER_ACCOUNT)
    r = session.get(f"{demo.url}/hub/api/user", timeout=30)
    assert r.status_code == 200 and r.json()["name"] == REVIEWER_ACCOUNT
    session = demo.login("alice")
    r = session.get(f"{demo.url}/hub/api/user", timeout=30)
    assert r.status_code == 200 and r.json()["name"] == "alice"
    assert {g for g, members in GROUPS.items() if "alice" in members} <= set(r.json()["groups"])
    r = session.get(f"{demo.url}/hub/api/", timeout=30)
    assert r.status_code == 200 and "version" in r.json()
    with pytest.raises(DemoError, match="login of bob failed"):
        demo.login("bob", password=demo.password + "-wrong")


def test_datasets_are_registered_and_entitled_per_user(demo: DemoProcess) -> None:
    """The demo datasets are in the store at the versions the demo recorded, their synthetic versions are
    MST differentially private synthetic data with the demo's ε (the test environment has the synthesis
    extra, so the demo's random fallback must not be taken), and the hub's grant service lists for each user
    exactly the datasets of their entitlement (alice three, bob two, the provider and reviewer accounts
    none), each with its release mode: the lab results after review, the others automatically."""
    state = demo.state()
    assert state["synthesis"] == "mst", state
    store = Store(demo.dir / "store")
    for table in data.TABLES:
        manifest = store.load(data.PROVIDER, table.dataset, state["versions"][table.ref])
        assert [f.name for f in manifest.files] == [table.file_name]
        p = manifest.protection
        assert (p.kind, p.mechanism, p.epsilon) == ("dp", "mst", EPSILON)
    assert (os.stat(demo.dir / "store").st_mode & 0o077) == 0  # the spawner requires a root-only store
    listed = {}
    release = {t.ref: t.release for t in data.TABLES}
    assert release == {data.PATIENTS.ref: "auto", data.VISITS.ref: "auto", data.LABS.ref: "review"}
    users = ("alice", "bob", "carol", REVIEWER_ACCOUNT)
    for user in users:
        r = demo.api("GET", "/dcr/datasets", demo.token(user))
        assert r.status_code == 200, r.text
        listed[user] = sorted(f"{d['provider']}/{d['dataset']}" for d in r.json()["datasets"])
        for d in r.json()["datasets"]:
            assert d["version"] == state["versions"][f"{d['provider']}/{d['dataset']}"]
            assert d["release"] == release[f"{d['provider']}/{d['dataset']}"]
    assert listed == {u: sorted(entitled_datasets(u)) for u in users}
    assert len(listed["alice"]) == 3 and len(listed["bob"]) == 2
    assert listed["carol"] == listed[REVIEWER_ACCOUNT] == []
    assert data.LABS.ref in listed["bob"]
    assert set(ENTITLED) == {t.ref for t in data.TABLES}
    # The reviewer is the provider's, in the policy the demo wrote.
    assert PROVIDERS[data.PROVIDER]["reviewers"] == {"users": [REVIEWER_ACCOUNT]}
    config = (demo.dir / "hub" / "jupyterhub_config.py").read_text()
    assert f"c.DCRPolicy.providers = {dict(PROVIDERS)!r}" in config


def test_each_dataset_has_a_researcher_facing_fidelity_report(demo: DemoProcess) -> None:
    """For each dataset the demo keeps the researchers' fidelity report (HTML and JSON, made only from DP
    statistics with the demo's report budget, about the synthetic file researchers see) in its root-only
    reports/ directory; the provider-only report, computed from the real rows, is not there."""
    layout = Layout.at(demo.dir)
    for table in data.TABLES:
        doc = json.loads(layout.researcher_report(table, "json").read_text())
        assert doc["audience"] == "researchers" and doc["file"] == table.file_name
        assert (doc["mechanism"], doc["epsilon"], doc["report_epsilon"]) == ("mst", EPSILON, REPORT_EPSILON)
        html = layout.researcher_report(table).read_text()
        assert "<html" in html.lower() and table.file_name in html
        assert list(layout.provider_reports(table).glob("*.fidelity-provider-only.json"))
    published = sorted(p.relative_to(layout.reports) for p in layout.reports.rglob("*") if p.is_file())
    assert published == sorted(
        layout.researcher_report(t, s).relative_to(layout.reports)
        for t in data.TABLES
        for s in ("html", "json")
    )
    assert (os.stat(layout.reports).st_mode & 0o077) == 0


def test_fidelity_reports_are_linked_and_served_to_entitled_researchers_only(demo: DemoProcess) -> None:
    """The hub's datasets API links each dataset's researcher-facing report; the link serves that report to
    a researcher entitled to the dataset, and refuses one who is not (bob has no access to the visits)."""
    tokens = {u: demo.token(u) for u in ("alice", "bob")}
    listed = demo.api("GET", "/dcr/datasets", tokens["alice"])
    assert listed.status_code == 200, listed.text
    links = {f"{d['provider']}/{d['dataset']}": d.get("fidelity_report") for d in listed.json()["datasets"]}
    assert set(links) == {t.ref for t in data.TABLES} and all(links.values()), links
    expected = {t.ref: Layout.at(demo.dir).researcher_report(t).read_bytes() for t in data.TABLES}
    for ref, link in links.items():
        url = link if link.startswith("http") else f"{demo.url}{link}"
        r = requests.get(url, headers={"Authorization": f"token {tokens['alice']}"}, timeout=60)
        assert r.status_code == 200 and r.content == expected[ref], (ref, r.status_code)
        assert r.headers["Content-Type"].startswith("text/html")
        assert "sandbox" in r.headers.get("Content-Security-Policy", "")
    visits = links[data.VISITS.ref]
    r = requests.get(
        visits if visits.startswith("http") else f"{demo.url}{visits}",
        headers={"Authorization": f"token {tokens['bob']}"},
        timeout=60,
    )
    assert r.status_code in (403, 404) and data.VISITS.file_name.encode() not in r.content, r.status_code


def test_enclave_host_answers_and_is_the_receipts_trust_anchor(demo: DemoProcess) -> None:
    """The enclave host answers on the demo's socket, and what the hub's platform hands every server pins
    its published JWKS as the receipts' trust anchor, its image digest, and points the local backend at
    that socket, with the hub's grant service."""
    from traitlets.config import PyFileConfigLoader

    from dcr_spawner.platform import LocalEnclaveHost

    sock = demo.dir / "run" / "enclave-host.sock"
    client = HostClient(sock, timeout=10)
    pong = client.ping()
    hub_config = demo.dir / "hub" / "jupyterhub_config.py"
    loaded = PyFileConfigLoader(hub_config.name, str(hub_config.parent)).load_config()
    config = LocalEnclaveHost(config=loaded).server_config()
    assert config["LocalBackend"]["socket_path"] == str(sock)
    assert config["DCRExtension"]["grant_source_class"] == "dcr_server_ext.grant_sources.HubGrantSource"
    assert config["DCRExtension"]["enclave_digests"] == [pong["image_digest"]]
    jwks_file = Path(config["DCRExtension"]["trust_jwks"][0])
    assert json.loads(jwks_file.read_text())["keys"] == client.jwks()["keys"]


def test_researcher_finds_the_sample_notebook_and_it_runs_in_the_enclave(demo: DemoProcess) -> None:
    """Alice's first spawn puts the sample notebook into her home (her server runs as her own account);
    it reads her synthetic patients file in the sandbox, and submitted through the server extension it runs
    in the enclave on the real rows: the job succeeds, the outputs hold the executed notebook with a plot
    and the digest of the real file (not the synthetic one's), and the server verifies the receipt against
    the enclave host's key with every check passing."""
    token = demo.token("alice")
    demo.spawn("alice", token)
    r = demo.server("GET", "alice", "api/contents/analysis.ipynb", token)
    assert r.status_code == 200, r.text
    nb = nbformat.from_dict(r.json()["content"])
    path = f"/data/{data.PROVIDER}/{data.PATIENTS.dataset}/{data.PATIENTS.file_name}"
    assert any(path in c.source for c in nb.cells if c.cell_type == "code")
    assert f"as {demo.account('alice')} " in demo.hub_log.read_text()

    r = demo.server("POST", "alice", "dcr/api/jobs", token, json={"path": "analysis.ipynb"})
    assert r.status_code == 201, r.text
    job = demo.wait_job("alice", r.json()["id"], token)
    assert job["state"] == "succeeded", job
    assert [f"{d['provider']}/{d['dataset']}" for d in job["datasets"]] == [data.PATIENTS.ref]
    outputs = demo.server("GET", "alice", f"dcr/api/jobs/{job['id']}/outputs", token).json()["files"]
    assert {"analysis.ipynb", "charges.png", "summary.csv"} <= {Path(f["path"]).name for f in outputs}
    executed = demo.server("GET", "alice", f"dcr/api/jobs/{job['id']}/outputs/analysis.ipynb", token)
    outs = [o for c in nbformat.reads(executed.text, 4).cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outs)
    layout = Layout.at(demo.dir)
    real, synthetic = (_sha256(f(data.PATIENTS))[:12] for f in (layout.real_file, layout.synthetic_file))
    assert real != synthetic
    printed = _printed(executed.text)
    assert f"sha256 of the file: {real}" in printed and synthetic not in printed, printed
    verdict = demo.server("GET", "alice", f"dcr/api/jobs/{job['id']}/verify", token).json()
    assert verdict["verified"] is True and verdict["checks"]
    assert all(c["passed"] for c in verdict["checks"]), verdict


def test_bob_finds_the_same_sample_notebook_in_his_home(demo: DemoProcess) -> None:
    """Bob, the other researcher, gets the sample notebook on his first spawn too (as his own account): the
    demo's sample, reading the patients file he is entitled to."""
    token = demo.token("bob")
    demo.spawn("bob", token)
    r = demo.server("GET", "bob", "api/contents/analysis.ipynb", token)
    assert r.status_code == 200, r.text
    nb = nbformat.from_dict(r.json()["content"])
    path = f"/data/{data.PROVIDER}/{data.PATIENTS.dataset}/{data.PATIENTS.file_name}"
    assert data.PATIENTS.ref in entitled_datasets("bob")
    assert any(path in c.source for c in nb.cells if c.cell_type == "code")
    skeleton = nbformat.reads((demo.dir / "skel" / "analysis.ipynb").read_text(), 4)
    assert [c.source for c in nb.cells] == [c.source for c in skeleton.cells]
    assert f"as {demo.account('bob')} " in demo.hub_log.read_text()


def test_a_job_on_the_reviewed_dataset_is_held_for_the_reviewer(demo: DemoProcess) -> None:
    """Bob's notebook on the lab results (released only after review) runs in the enclave and ends held:
    the grant carries the review release mode, the researcher's server lists no output, and where the job
    names its review, the reviewers are the provider's (Riverside Hospital, whose reviewer is the demo's)."""
    token = demo.token("bob")
    demo.spawn("bob", token)
    path = f"/data/{data.PROVIDER}/{data.LABS.dataset}/{data.LABS.file_name}"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            f"import pandas as pd\nlabs = pd.read_csv({path!r})\n"
            "labs.groupby('test')['result'].mean().round(1).to_csv('labs-by-test.csv')"
        )
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    r = demo.server(
        "PUT",
        "bob",
        "api/contents/labs.ipynb",
        token,
        json={"type": "notebook", "format": "json", "content": nb},
    )
    assert r.status_code in (200, 201), r.text
    body = {"path": "labs.ipynb", "datasets": [data.LABS.ref]}  # his home holds the patients' sample too
    r = demo.server("POST", "bob", "dcr/api/jobs", token, json=body)
    assert r.status_code == 201, r.text
    job = demo.wait_job("bob", r.json()["id"], token)
    assert job["state"] == "held", job
    assert [(d["dataset"], d["release"]) for d in job["datasets"]] == [(data.LABS.dataset, "review")]
    outputs = demo.server("GET", "bob", f"dcr/api/jobs/{job['id']}/outputs", token)
    assert outputs.status_code == 200 and outputs.json() == {"files": []}
    # The server hands the held result to the hub's airlock at once: the review names the provider.
    deadline = time.monotonic() + 60
    while job["review"]["status"] != "waiting" and time.monotonic() < deadline:
        time.sleep(0.5)
        job = demo.server("GET", "bob", f"dcr/api/jobs/{job['id']}", token).json()
    assert job["review"]["status"] == "waiting", job
    assert job["review"]["reviewers"] == [PROVIDERS[data.PROVIDER]["name"]], job
    assert job["review"]["approvals"] == 0 and job["review"]["required_approvals"] == 1, job


def _put_notebook(demo: DemoProcess, user: str, token: str, name: str, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    r = demo.server(
        "PUT", user, f"api/contents/{name}", token, json={"type": "notebook", "format": "json", "content": nb}
    )
    assert r.status_code in (200, 201), r.text


def test_a_failed_runs_traceback_reaches_the_researcher_once_the_reviewer_releases_it(
    demo: DemoProcess,
) -> None:
    """Bob's notebook on the lab results raises with real values in its message: he sees the cell and the
    exception type only; the enclave sealed the traceback to the airlock, his server handed it to the hub,
    and once the reviewer releases it (the review page's form) it appears on his failed job."""
    token = demo.token("bob")
    demo.spawn("bob", token)
    path = f"/data/{data.PROVIDER}/{data.LABS.dataset}/{data.LABS.file_name}"
    source = (
        f"import pandas as pd\nlabs = pd.read_csv({path!r})\n"
        "raise ValueError(f'first result {labs.result.iloc[0]}')"
    )
    _put_notebook(demo, "bob", token, "fails.ipynb", source)
    r = demo.server(
        "POST", "bob", "dcr/api/jobs", token, json={"path": "fails.ipynb", "datasets": [data.LABS.ref]}
    )
    assert r.status_code == 201, r.text
    job = demo.wait_job("bob", r.json()["id"], token)
    assert job["state"] == "failed" and job["failure"]["ename"] == "ValueError", job
    assert "first result" not in json.dumps(job)

    def review_status() -> dict[str, Any]:
        return dict(demo.server("GET", "bob", f"dcr/api/jobs/{job['id']}", token).json())

    deadline = time.monotonic() + 60
    while (job := review_status())["review"]["status"] != "waiting" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["review"]["status"] == "waiting" and "detail" not in job["failure"], job
    rita = demo.login(REVIEWER_ACCOUNT)
    page = rita.get(f"{demo.url}/hub/dcr/review/{job['id']}", timeout=60)
    assert page.status_code == 200 and "first result" in page.text
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert xsrf, page.text[:500]
    r = rita.post(
        f"{demo.url}/hub/dcr/review/{job['id']}",
        data={"decision": "approve", "comment": "", "_xsrf": xsrf.group(1)},
        timeout=60,
        allow_redirects=False,
    )
    assert r.status_code == 302, r.text
    deadline = time.monotonic() + 60
    while "detail" not in (job := review_status())["failure"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["state"] == "failed" and job["review"]["status"] == "released", job
    assert "first result" in job["failure"]["detail"]["evalue"], job
    assert "ValueError" in job["failure"]["detail"]["traceback"], job


def test_provider_account_gets_no_sample_notebook(demo: DemoProcess) -> None:
    """The provider account has no datasets, so its home gets no sample notebook (it would not run)."""
    token = demo.token("carol")
    demo.spawn("carol", token)
    r = demo.server("GET", "carol", "api/contents", token)
    assert r.status_code == 200
    assert "analysis.ipynb" not in {c["name"] for c in r.json()["content"]}


def test_sigterm_stops_every_process_and_a_second_run_reuses_the_data(demo: DemoProcess) -> None:
    """SIGTERM stops the demo with status 0 and nothing it started is left (hub, proxy, servers, kernels,
    enclave host) nor listening; a second run in the same directory reuses the data: same real files, same
    registered versions, same password, no new synthesis."""
    procs = demo.remember()
    assert len(procs) >= 4  # at least hub, proxy, enclave host and the spawned servers
    assert demo.stop(signal.SIGTERM) == 0
    assert demo.leftovers() == []
    assert not _port_open(demo.port)
    with pytest.raises(DCRError, match="cannot reach the enclave host"):
        HostClient(demo.dir / "run" / "enclave-host.sock", timeout=5).ping()

    state = demo.state()
    real = {t.ref: _sha256(demo.dir / "data" / "real" / t.file_name) for t in data.TABLES}
    again = DemoProcess(demo.dir, account_prefix=demo.account_prefix)
    try:
        again.start()
        assert "reusing the registered datasets" in again.output
        assert "making the DP synthetic version" not in again.output and "generated" not in again.output
        assert again.state() == state
        assert {t.ref: _sha256(demo.dir / "data" / "real" / t.file_name) for t in data.TABLES} == real
        assert HostClient(demo.dir / "run" / "enclave-host.sock", timeout=10).ping()
    finally:
        assert again.stop() == 0
    assert again.leftovers() == []


def _run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dcr"), "demo", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_refuses_a_directory_that_is_not_a_demo_directory(tmp_path: Path) -> None:
    """A --dir that is a file, or a directory holding other things, is refused with a clear error, and
    nothing in it changes (no mode change, no file written)."""
    f = tmp_path / "file"
    f.write_text("x")
    r = _run_demo("--dir", str(f), "--port", str(free_port()))
    assert r.returncode != 0 and "exists and is not a directory" in r.stderr
    assert f.read_text() == "x"

    other = tmp_path / "other"
    other.mkdir(mode=0o750)
    (other / "notes.txt").write_text("keep")
    before = sorted((p.name, p.stat().st_mode) for p in [other, *other.iterdir()])
    r = _run_demo("--dir", str(other), "--port", str(free_port()))
    assert r.returncode != 0 and "is not a DCR demo directory" in r.stderr and "notes.txt" in r.stderr
    assert sorted((p.name, p.stat().st_mode) for p in [other, *other.iterdir()]) == before


def test_refuses_a_port_in_use_and_a_bad_account_prefix(tmp_path: Path) -> None:
    """A port already taken on 127.0.0.1, an account prefix that is not a valid account name prefix and a
    review time quantum that is not positive are refused before the demo directory is created."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = _run_demo("--dir", str(tmp_path / "d1"), "--port", str(taken))
    assert r.returncode != 0 and f"port {taken} on 127.0.0.1 is in use" in r.stderr
    assert not (tmp_path / "d1").exists()
    r = _run_demo("--dir", str(tmp_path / "d2"), "--port", str(free_port()), "--account-prefix", "Root")
    assert r.returncode != 0 and "--account-prefix 'Root' is not a valid" in r.stderr
    assert not (tmp_path / "d2").exists()
    r = _run_demo("--dir", str(tmp_path / "d3"), "--port", str(free_port()), "--review-time-quantum", "0")
    assert r.returncode != 0 and "--review-time-quantum must be a positive number of seconds" in r.stderr
    assert not (tmp_path / "d3").exists()


def test_home_seeder_gives_each_file_once_and_never_writes_through_a_link(tmp_path: Path) -> None:
    """The seeder copies a file into the home once (owned by the account); a link planted under the
    file's name is neither followed nor replaced, a file the user deleted is not brought back, and a home
    owned by another account is refused."""
    src = tmp_path / "src.ipynb"
    src.write_bytes(b'{"cells": []}')
    target = tmp_path / "target"
    target.write_text("keep")

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    assert seed_home(str(home), os.getuid(), os.getgid(), {"analysis.ipynb": src}) == ["analysis.ipynb"]
    assert (home / "analysis.ipynb").read_bytes() == src.read_bytes()
    (home / "analysis.ipynb").unlink()
    assert seed_home(str(home), os.getuid(), os.getgid(), {"analysis.ipynb": src}) == []
    assert not (home / "analysis.ipynb").exists()

    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    (planted / "analysis.ipynb").symlink_to(target)
    assert seed_home(str(planted), os.getuid(), os.getgid(), {"analysis.ipynb": src}) == []
    assert (planted / "analysis.ipynb").is_symlink() and target.read_text() == "keep"

    with pytest.raises(OSError, match="not owned by uid"):
        seed_home(str(home), os.getuid() + 12345, os.getgid(), {"analysis.ipynb": src})
    with pytest.raises(DCRError, match="plain file name"):
        HomeSeeder({"../escape.ipynb": src})


def test_refuses_to_run_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root, ``dcr demo`` says it needs root and creates nothing (checked in-process: the project's
    interpreter lives under /root, which an unprivileged account cannot even start)."""
    monkeypatch.setattr(prepare_module.os, "geteuid", lambda: 1000)
    target = tmp_path / "d"
    with pytest.raises(DCRError, match="dcr demo must run as root"):
        prepare_module.prepare(target, free_port(), None, "dcr-demo-", say=lambda _line: None)
    assert not target.exists()
