"""The researcher CLI (``dcr submit/jobs/job/cancel/fetch``) against a real ``jupyter server`` process.

The server is a subprocess (``python -m jupyter_server``) on a free loopback port with a random token,
the DCR extension configured through a config file: the ``host`` fixture's enclave host as backend, the
``store`` fixture's development hub key as grant source, its own data directory and SQLite job store.
The CLI runs in-process through ``dcr_enclave.commands.main.main``, its ``dcr.commands`` entry points replaced by
the one setup.cfg declares for these commands (``server = dcr_server_ext.cli:register``), so the tests do
not depend on what metadata happens to be installed.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from pathlib import Path

import jsonschema
import nbformat
import pandas as pd
import pytest

import dcr_enclave.commands.main
from dcr_enclave.formats import contract
from dcr_server_ext import cli as server_cli
from dcr_server_ext.jobstore import JobStore
from dcr_server_ext.model import Job

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
#: The ``dcr.commands`` entry point of the main distribution (setup.cfg).
CLI_ENTRY_POINT = EntryPoint(name="server", value="dcr_server_ext.cli:register", group="dcr.commands")
#: Environment variables through which the CLI (and a server) would find another server or token.
JUPYTER_ENV = (
    "JUPYTER_SERVER_URL",
    "JUPYTER_SERVER_ROOT",
    "JUPYTER_TOKEN",
    "JUPYTER_TOKEN_FILE",
    "JUPYTERHUB_SERVICE_URL",
    "JUPYTERHUB_SERVICE_PREFIX",
    "JUPYTERHUB_API_TOKEN",
)

SUMMARY_CELLS = [
    "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
    "import os\nos.makedirs('results/tables', exist_ok=True)\n"
    "df.groupby('smoker')['charges'].mean().round(2).to_csv('results/tables/by_smoker.csv')\nlen(df)",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@dataclass
class JupyterServer:
    """A real ``jupyter server`` subprocess with the DCR extension; ``start``/``stop`` may repeat."""

    base: Path
    socket_path: Path
    hub_key: Path
    store: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.data_dir = self.base / "dcr-data"
        self.log = self.base / "server.log"
        self.config = self.base / "jupyter_server_config.py"
        for d in (self.root, self.base / "jupyter-config", self.base / "jupyter-data", self.base / "runtime"):
            d.mkdir(parents=True, exist_ok=True)
        settings = {
            "ServerApp.jpserver_extensions": {"dcr_server_ext": True},
            "LocalBackend.socket_path": str(self.socket_path),
            "DevGrantSource.key_file": str(self.hub_key),
            "DevGrantSource.store": str(self.store),
            "DCRExtension.data_dir": str(self.data_dir),
            "DCRExtension.db_url": f"sqlite:///{self.data_dir / 'jobs.sqlite'}",
        }
        self.config.write_text("".join(f"c.{k} = {v!r}\n" for k, v in settings.items()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in JUPYTER_ENV}
        env.update(
            JUPYTER_CONFIG_DIR=str(self.base / "jupyter-config"),
            JUPYTER_DATA_DIR=str(self.base / "jupyter-data"),
            JUPYTER_RUNTIME_DIR=str(self.base / "runtime"),
            # Importable whether or not the main distribution's packages are installed yet.
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        )
        return env

    def start(self, timeout: float = 90) -> None:
        assert self.proc is None, "already running"
        cmd = [
            sys.executable, "-m", "jupyter_server",
            f"--config={self.config}",
            "--ServerApp.allow_root=True",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env(), cwd=self.base, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(f"jupyter server exited while starting:\n{self.log_tail()}")
            if self.status_ok():
                return
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"jupyter server did not answer /api/status:\n{self.log_tail()}")

    def status_ok(self) -> bool:
        req = urllib.request.Request(  # noqa: S310 (a loopback http URL)
            self.url + "api/status", headers={"Authorization": f"token {self.token}"}
        )
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Stop the server with ``sig`` and wait for it; returns its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"jupyter server ignored signal {sig}:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def api(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(  # noqa: S310 (a loopback http URL)
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            with e:
                return e.code, json.loads(e.read() or b"null")

    def wait_job(self, job_id: str, states: frozenset[str] | set[str], timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        job: object = None
        while time.monotonic() < deadline:
            status, job = self.api("GET", f"dcr/api/jobs/{job_id}")
            assert status == 200, job
            assert isinstance(job, dict)
            if job["state"] in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached {sorted(states)}: {job}\n{self.log_tail()}")


@pytest.fixture
def jupyter_server(tmp_path: Path, store, host) -> Iterator[JupyterServer]:
    server = JupyterServer(tmp_path / "jupyter", host.socket, store.hub_key_path, store.root)
    server.start()
    yield server
    server.stop()


CliRun = Callable[..., tuple[int, str, str]]


def cli_runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRun:
    """``dcr ARGS...`` in-process with the server commands registered; returns (exit, stdout, stderr).

    Jupyter's environment is cleared and the runtime directory emptied, so only what a test passes is used.
    """
    for name in JUPYTER_ENV:
        monkeypatch.delenv(name, raising=False)
    runtime = tmp_path / "cli-runtime"
    runtime.mkdir(exist_ok=True)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(
        dcr_enclave.commands.main,
        "entry_points",
        lambda group: [CLI_ENTRY_POINT] if group == "dcr.commands" else [],
    )

    def run(*args: str | os.PathLike[str], err: io.StringIO | None = None) -> tuple[int, str, str]:
        """``err``, if given, receives stderr as it is written (to watch a running command)."""
        out, err = io.StringIO(), err or io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = dcr_enclave.commands.main.main([str(a) for a in args])
            except SystemExit as e:
                code = int(e.code or 0)
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture
def dcr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRun:
    return cli_runner(monkeypatch, tmp_path)


def conn(server: JupyterServer) -> list[str]:
    return ["--url", server.url, "--token", server.token]


def expected_summary(real_csv: Path) -> pd.Series:
    return pd.read_csv(real_csv).groupby("smoker")["charges"].mean().round(2)


def test_submit_wait_list_show_fetch_verify(jupyter_server, dcr, host, insurance_real, tmp_path):
    """`dcr submit --wait` of a notebook reading /data/acme/insurance/real.csv follows the job through the
    server's event stream (states and cell i/n) and exits 0 once it succeeded; `dcr jobs` lists it,
    `dcr job` shows it, `dcr fetch` writes the outputs (nested paths) and a receipt whose files are byte for
    byte the enclave's, and `dcr verify` passes on the fetched directory with the host's JWKS pinned;
    an output altered after the run is refused by `dcr fetch` (it does not match the receipt) without
    leaving a partial directory; cancelling the finished job exits non-zero with the server's own 409
    message."""
    server = jupyter_server
    write_notebook(server.root / "work" / "analysis.ipynb", SUMMARY_CELLS)

    code, out, err = dcr("submit", "work/analysis.ipynb", "--wait", *conn(server))
    assert code == 0, err + server.log_tail()
    job_id = out.strip()
    assert contract.JOB_ID_RE.match(job_id), out
    progress = err.splitlines()
    assert f"{job_id}: running, cell 2/{len(SUMMARY_CELLS)}" in progress, err
    assert progress[-1] == f"{job_id}: succeeded", err
    # States appear in lifecycle order, each once.
    shown = [line.split(": ", 1)[1].split(",")[0] for line in progress if line.startswith(f"{job_id}: ")]
    states = list(dict.fromkeys(shown))
    assert states == sorted(states, key=contract.JOB_STATES.index), states

    code, out, err = dcr("jobs", "--json", *conn(server))
    assert code == 0, err
    page = json.loads(out)
    assert page["total"] == 1 and [j["id"] for j in page["jobs"]] == [job_id]
    code, out, _ = dcr("jobs", *conn(server))
    assert code == 0 and job_id in out and "succeeded" in out and "work/analysis.ipynb" in out

    code, out, err = dcr("job", job_id, "--json", *conn(server))
    assert code == 0, err
    job = json.loads(out)
    assert job["state"] == "succeeded" and job["receipt"] is True
    assert [(d["provider"], d["dataset"]) for d in job["datasets"]] == [("acme", "insurance")]
    code, out, _ = dcr("job", job_id, *conn(server))
    assert code == 0 and f"id:        {job_id}" in out and "state:     succeeded" in out

    fetched = tmp_path / "fetched" / job_id
    code, out, err = dcr("fetch", job_id, "--out", fetched, *conn(server))
    assert code == 0, err
    # The server keeps the enclave's result files as they came, in <root>/<outputs_dir>/<job id>/.
    result = server.root / job["outputs_path"]
    for name in (contract.RECEIPT_FILE, contract.TOKEN_FILE, contract.SIGNER_JWKS_FILE):
        assert (fetched / name).read_bytes() == (result / name).read_bytes(), name
    opened = result / contract.OUTPUTS_DIR
    got = sorted(
        p.relative_to(fetched / "outputs").as_posix() for p in (fetched / "outputs").rglob("*") if p.is_file()
    )
    assert "results/tables/by_smoker.csv" in got
    assert got == sorted(p.relative_to(opened).as_posix() for p in opened.rglob("*") if p.is_file())
    for rel in got:
        assert (fetched / "outputs" / rel).read_bytes() == (opened / rel).read_bytes(), rel
    table = pd.read_csv(fetched / "outputs" / "results" / "tables" / "by_smoker.csv", index_col="smoker")
    pd.testing.assert_series_equal(table["charges"], expected_summary(insurance_real))
    assert not [p for p in fetched.parent.iterdir() if p.name.startswith(".")], "staging left behind"

    code, out, err = dcr(
        "verify", fetched, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, out + err
    assert "FAIL" not in out

    # An output that no longer matches the receipt (same size, one byte changed) is refused, and nothing
    # is left where the fetch was going.
    table_path = opened / "results" / "tables" / "by_smoker.csv"
    data = bytearray(table_path.read_bytes())
    data[-2] = ord("0") if data[-2] != ord("0") else ord("1")
    table_path.write_bytes(bytes(data))
    refused = tmp_path / "refused"
    code, out, err = dcr("fetch", job_id, "--out", refused, *conn(server))
    assert code != 0 and "results/tables/by_smoker.csv did not arrive intact" in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".refused", "refused"))) == []

    code, out, err = dcr("cancel", job_id, *conn(server))
    assert code != 0
    status, message = server.api("POST", f"dcr/api/jobs/{job_id}/cancel")
    assert status == 409
    assert isinstance(message, dict)
    assert err.strip() == f"dcr: error: HTTP 409: {message['error']}"


def test_failing_notebook_wait_exits_nonzero_with_reason(jupyter_server, dcr):
    """`dcr submit --wait` of a notebook whose second cell raises exits non-zero, naming the failure
    (reason, cell and exception type) as the server reports it."""
    server = jupyter_server
    write_notebook(
        server.root / "broken.ipynb",
        [
            "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
            "raise ValueError('nope')",
        ],
    )
    code, out, err = dcr("submit", "broken.ipynb", "--wait", "--dataset", "acme/insurance", *conn(server))
    job_id = out.strip()
    assert code == server_cli.EXIT_JOB_FAILED, err
    job = server.wait_job(job_id, {"failed"})
    assert job["failure"]["ename"] == "ValueError"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dcr: error: job {job_id} failed: {job['failure']['reason']}"), err
    assert "ValueError" in last and f"cell {job['failure']['cell'] + 1}" in last


def test_cancel_running_job(jupyter_server, dcr):
    """`dcr cancel` of a running job answers with the job cancelled; `dcr job --wait` on it then exits
    non-zero saying it was cancelled."""
    server = jupyter_server
    write_notebook(
        server.root / "slow.ipynb",
        [
            "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
            "import time\ntime.sleep(300)",
        ],
    )
    code, out, err = dcr("submit", "slow.ipynb", *conn(server))
    assert code == 0, err
    job_id = out.strip()
    server.wait_job(job_id, {"running"})
    code, out, err = dcr("cancel", job_id, "--json", *conn(server))
    assert code == 0, err
    assert json.loads(out)["state"] == "cancelled"
    code, out, err = dcr("job", job_id, "--wait", *conn(server))
    assert code == server_cli.EXIT_JOB_FAILED
    assert f"dcr: error: job {job_id} cancelled" in err


def _store_job(server: JupyterServer, state: str, **fields: object) -> str:
    """A job record put straight into the server's job store (as a held, released or rejected job would
    be left there by the airlock), bypassing the enclave; returns its id."""
    job_id = "job-" + secrets.token_hex(12)
    with JobStore(f"sqlite:///{server.data_dir / 'jobs.sqlite'}") as store:
        store.create(
            Job(
                id=job_id,
                notebook="work/analysis.ipynb",
                state=state,
                bundle_digest="sha256:" + "a" * 64,
                datasets=[{"provider": "acme", "dataset": "insurance", "version": None, "release": "review"}],
                backend="dcr_server_ext.backends.local.LocalBackend",
                **fields,  # type: ignore[arg-type]
            )
        )
    return job_id


def test_wait_on_held_released_and_rejected_jobs(jupyter_server, dcr):
    """`dcr job --wait` stops at once on a job held for review (exit 3, saying it waits for the review), exits
    0 for a job released after review and 1 for a rejected one, naming the rejection; `dcr job` shows the
    review line of each, and `dcr jobs` lists them."""
    server = jupyter_server
    held = _store_job(server, "held")
    released = _store_job(server, "released", receipt=True)
    rejected = _store_job(server, "rejected")

    code, out, err = dcr("job", held, "--wait", *conn(server))
    assert code == server_cli.EXIT_JOB_HELD, err
    assert "state:     held" in out and "review:    held for the data provider's review" in out
    assert f"dcr: error: job {held} is held for the data provider's review" in err
    assert f"{held}: held for the data provider's review" in err.splitlines()

    code, out, err = dcr("job", released, "--wait", *conn(server))
    assert code == 0, err
    assert "state:     released" in out and "review:    released after review" in out

    code, out, err = dcr("job", rejected, "--wait", *conn(server))
    assert code == server_cli.EXIT_JOB_FAILED, err
    assert err.strip().splitlines()[-1] == f"dcr: error: job {rejected} rejected after review"

    code, out, err = dcr("jobs", *conn(server))
    assert code == 0, err
    for job_id, state in ((held, "held"), (released, "released"), (rejected, "rejected")):
        assert any(line.startswith(job_id) and f" {state} " in line for line in out.splitlines()), out


def test_a_released_job_is_fetched_like_a_succeeded_one(jupyter_server, dcr, host, insurance_real, tmp_path):
    """A job the reviewers released has its outputs opened like a succeeded job's: `dcr job --wait` exits 0
    and `dcr fetch` writes its receipt and outputs, which `dcr verify` accepts. (The run succeeds under an
    automatic release here; its stored state is then set to released, as the airlock would leave it.)"""
    server = jupyter_server
    write_notebook(server.root / "work" / "analysis.ipynb", SUMMARY_CELLS)
    code, out, err = dcr("submit", "work/analysis.ipynb", "--wait", *conn(server))
    assert code == 0, err + server.log_tail()
    job_id = out.strip()
    with sqlite3.connect(server.data_dir / "jobs.sqlite") as db:
        assert db.execute("UPDATE dcr_jobs SET state = 'released' WHERE id = ?", (job_id,)).rowcount == 1
    code, out, err = dcr("job", job_id, "--wait", *conn(server))
    assert code == 0, err
    assert "state:     released" in out and "outputs:   " in out
    fetched = tmp_path / "fetched"
    code, out, err = dcr("fetch", job_id, "--out", fetched, *conn(server))
    assert code == 0, err
    table = pd.read_csv(fetched / "outputs" / "results" / "tables" / "by_smoker.csv", index_col="smoker")
    pd.testing.assert_series_equal(table["charges"], expected_summary(insurance_real))
    code, out, err = dcr(
        "verify", fetched, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, out + err


REVIEW = {
    "status": "waiting",
    "reviewers": ["Riverside Hospital", "ACME Insurance"],
    "required_approvals": 2,
    "approvals": 1,
    "comment": None,
    "decided_at": None,
    "note": None,
}


JOB_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((REPO / "dcr_server_ext" / "schemas" / "job.schema.json").read_text()),
    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
)


def _api_job(state: str, review: dict | None, **fields: object) -> dict:
    """A job as the REST API answers it, checked against schemas/job.schema.json."""
    job = Job(
        id="job-" + "b" * 24, notebook="analysis.ipynb", state=state, bundle_digest="sha256:" + "a" * 64
    )
    doc = {**job.to_api(), "review": review, **fields}
    JOB_SCHEMA.validate(doc)
    return doc


def test_review_lines_name_the_reviewers_approvals_note_and_comment():
    """For held jobs the CLI names who must review and the approvals so far, or why the outputs are not
    sent yet; for decided ones the outcome and the reviewers' comment (terminal escapes neutralised)."""
    held = _api_job("held", REVIEW)
    assert (
        server_cli.review_text(held)
        == "held for review by Riverside Hospital and ACME Insurance (1 of 2 approvals)"
    )
    one = _api_job(
        "held", {**REVIEW, "reviewers": ["Riverside Hospital"], "required_approvals": 1, "approvals": 0}
    )
    assert server_cli.review_text(one) == "held for review by Riverside Hospital (0 of 1 approval)"
    note = "this server has no hub airlock (development grant source)"
    unsent = _api_job("held", {**REVIEW, "status": "unsent", "approvals": 0, "note": note})
    assert server_cli.review_text(unsent) == f"held, not yet sent for review ({note})"
    assert server_cli.review_text(_api_job("held", {**REVIEW, "reviewers": []})) == (
        "held for review by the data provider (1 of 2 approvals)"
    )
    assert server_cli.review_text(_api_job("held", {**REVIEW, "status": "released"})) == (
        "approved by Riverside Hospital and ACME Insurance; the outputs are being opened"
    )
    decided = {**REVIEW, "approvals": 2, "decided_at": "2026-12-06T21:00:00.000Z"}
    released = _api_job("released", {**decided, "status": "released", "comment": "fine"})
    assert (
        server_cli.review_text(released) == "released after review by Riverside Hospital and ACME Insurance"
    )
    rejected = _api_job("rejected", {**decided, "status": "rejected", "comment": "cells under 10\x1b[2J"})
    assert server_cli.review_text(rejected) == "rejected in review by Riverside Hospital and ACME Insurance"
    for state in ("running", "succeeded", "failed", "cancelled"):
        assert server_cli.review_text(_api_job(state, None)) is None
    # The schema holds the review to its shape: known statuses, counts, every field, nothing more.
    no_note = {k: v for k, v in REVIEW.items() if k != "note"}
    for bad in ({**REVIEW, "status": "approved"}, {**REVIEW, "approvals": -1}, {**REVIEW, "x": 1}, no_note):
        with pytest.raises(jsonschema.ValidationError):
            _api_job("held", bad)

    lines = server_cli._describe(rejected).splitlines()
    assert "review:    rejected in review by Riverside Hospital and ACME Insurance" in lines
    assert "comment:   cells under 10?[2J" in lines
    assert "decided:   2026-12-06T21:00:00.000Z" in lines
    assert "review:    held for review by Riverside Hospital and ACME Insurance (1 of 2 approvals)" in (
        server_cli._describe(held).splitlines()
    )
    assert not [
        line for line in server_cli._describe(_api_job("succeeded", None)).splitlines() if "review" in line
    ]


def test_wait_outcome_of_reviewed_jobs():
    """`--wait`'s exit: held stays 3 (naming the reviewers and approvals), released is success, rejected the
    non-success exit with the reviewers' comment and any failure the record carries."""
    with pytest.raises(server_cli.JobHeld) as held:
        server_cli._outcome(_api_job("held", REVIEW))
    assert held.value.exit_code == server_cli.EXIT_JOB_HELD == 3
    assert "held for review by Riverside Hospital and ACME Insurance (1 of 2 approvals)" in str(held.value)
    server_cli._outcome(_api_job("released", {**REVIEW, "status": "released", "approvals": 2}))
    rejected = _api_job("rejected", {**REVIEW, "status": "rejected", "comment": "too detailed"})
    with pytest.raises(server_cli.JobDidNotSucceed) as no:
        server_cli._outcome(rejected)
    assert no.value.exit_code == server_cli.EXIT_JOB_FAILED
    assert str(no.value).startswith(
        f"job {rejected['id']} rejected in review by Riverside Hospital and ACME Insurance: “too detailed”"
    )
    failure = {"reason": "outputs failed the disclosure checks", "cell": None, "ename": None}
    with pytest.raises(server_cli.JobDidNotSucceed) as no:
        server_cli._outcome({**rejected, "review": None, "failure": failure})
    assert "rejected after review: outputs failed the disclosure checks" in str(no.value)


def test_follow_ends_with_the_review_line():
    """Following a job that stops held (or decided) ends with its review line; a succeeded job's does not."""

    class Answers:
        def __init__(self, *jobs: dict) -> None:
            self.jobs = list(jobs)
            self.server = server_cli.Server("http://127.0.0.1:1/", "t")

        def job(self, _job_id: str) -> dict:
            return self.jobs.pop(0)

    out = io.StringIO()
    running = _api_job("running", None)
    held = _api_job("held", REVIEW)
    job = asyncio.run(server_cli.follow(Answers(held), running, None, out=out))  # type: ignore[arg-type]
    assert job["state"] == "held"
    assert out.getvalue().splitlines()[-1] == (
        f"{held['id']}: held for review by Riverside Hospital and ACME Insurance (1 of 2 approvals)"
    )
    out = io.StringIO()
    rejected = _api_job("rejected", {**REVIEW, "status": "rejected", "comment": "no"})
    asyncio.run(server_cli.follow(Answers(rejected), running, None, out=out))  # type: ignore[arg-type]
    assert out.getvalue().splitlines()[-2:] == [
        f"{held['id']}: rejected",
        f"{held['id']}: rejected in review by Riverside Hospital and ACME Insurance: “no”",
    ]
    out = io.StringIO()
    asyncio.run(server_cli.follow(Answers(_api_job("succeeded", None)), running, None, out=out))  # type: ignore[arg-type]
    assert out.getvalue().splitlines()[-1] == f"{held['id']}: succeeded"


def test_bad_token_is_a_clear_error(jupyter_server, dcr):
    """A wrong token gets the server's 403 refusal, a hint about the token, and a non-zero exit."""
    code, out, err = dcr("jobs", "--url", jupyter_server.url, "--token", "not-the-token")
    assert code != 0 and out == ""
    assert err.startswith("dcr: error: HTTP 403: ")
    assert "refused the token" in err


def test_server_refusals_are_printed_verbatim(jupyter_server, dcr):
    """Refusals (unknown job, a path that is not a notebook, a notebook that does not exist, a grant the
    grant source refuses with 403) print the server's own message, without a hint about the token, and exit
    non-zero; nothing is stored."""
    server = jupyter_server
    (server.root / "notes.txt").write_text("not a notebook")
    write_notebook(server.root / "ok.ipynb", ["1 + 1"])
    cases = [
        (("job", "job-" + "0" * 24), "GET", "dcr/api/jobs/job-" + "0" * 24, None),
        (("submit", "notes.txt"), "POST", "dcr/api/jobs", {"path": "notes.txt"}),
        (("submit", "missing.ipynb"), "POST", "dcr/api/jobs", {"path": "missing.ipynb"}),
        (
            ("submit", "ok.ipynb", "--dataset", "acme/nope"),
            "POST",
            "dcr/api/jobs",
            {"path": "ok.ipynb", "datasets": ["acme/nope"]},
        ),
    ]
    for args, method, path, body in cases:
        code, out, err = dcr(*args, *conn(server))
        status, message = server.api(method, path, body)
        assert code != 0 and out == "", args
        assert isinstance(message, dict)
        assert err.strip() == f"dcr: error: HTTP {status}: {message['error']}", args
    assert status == 403 and "acme/nope" in message["error"]  # the last case: a policy refusal, not the token
    assert server.api("GET", "dcr/api/jobs")[1]["total"] == 0


def test_connection_from_jupyter_environment(jupyter_server, dcr, monkeypatch):
    """Without flags the CLI uses JUPYTER_SERVER_URL and JUPYTER_TOKEN (a JupyterLab terminal), and a local
    notebook path is turned into the server's path through JUPYTER_SERVER_ROOT."""
    server = jupyter_server
    write_notebook(server.root / "sub" / "nb.ipynb", ["1 + 1"])
    monkeypatch.setenv("JUPYTER_SERVER_URL", server.url)
    monkeypatch.setenv("JUPYTER_TOKEN", server.token)
    monkeypatch.setenv("JUPYTER_SERVER_ROOT", str(server.root))
    monkeypatch.chdir(server.root / "sub")
    code, out, err = dcr("submit", "nb.ipynb", "--dataset", "acme/insurance", "--json")
    assert code == 0, err
    assert json.loads(out)["notebook"] == "sub/nb.ipynb"
    code, out, err = dcr("jobs", "--json")
    assert code == 0 and json.loads(out)["total"] == 1


def test_no_server_is_a_clear_error(dcr):
    """With no flags, no Jupyter environment and no running server, the CLI says how to name one."""
    code, out, err = dcr("jobs")
    assert code != 0 and out == ""
    assert err.startswith("dcr: error: no Jupyter server to talk to")
    assert "--url" in err


def test_unreachable_server_is_a_clear_error(dcr):
    """A URL where nothing listens is reported as unreachable, naming the URL."""
    url = f"http://127.0.0.1:{free_port()}/"
    code, out, err = dcr("jobs", "--url", url, "--token", "t")
    assert code != 0 and out == ""
    assert err.startswith(f"dcr: error: cannot reach the Jupyter server at {url}")


def test_server_resolution_from_jupyterhub_environment():
    """In a JupyterHub single-user server the URL comes from JUPYTERHUB_SERVICE_URL (a bind-all host becomes
    loopback; the prefix is kept or taken from JUPYTERHUB_SERVICE_PREFIX) and the token from
    JUPYTERHUB_API_TOKEN; flags win over the environment, JUPYTER_TOKEN over the hub's token."""
    hub = {
        "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:8888/user/alice/",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
        "JUPYTERHUB_API_TOKEN": "hub-token",
    }
    s = server_cli.resolve_server(env=hub)
    assert (s.url, s.token, s.root) == ("http://127.0.0.1:8888/user/alice/", "hub-token", None)
    s = server_cli.resolve_server(env={**hub, "JUPYTERHUB_SERVICE_URL": "http://:8888"})
    assert s.url == "http://127.0.0.1:8888/user/alice/"
    s = server_cli.resolve_server(env={**hub, "JUPYTER_TOKEN": "own"})
    assert s.token == "own"
    s = server_cli.resolve_server("http://127.0.0.1:9999/x", "flag", "/srv/root", env=hub)
    assert (s.url, s.token, s.root) == ("http://127.0.0.1:9999/x/", "flag", Path("/srv/root"))


def test_token_file_and_bad_urls(tmp_path):
    """JUPYTER_TOKEN_FILE is read (stripped); a URL that is not http(s) or carries a query is refused."""
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    s = server_cli.resolve_server(
        env={"JUPYTER_SERVER_URL": "http://127.0.0.1:1/", "JUPYTER_TOKEN_FILE": str(token_file)}
    )
    assert s.token == "from-file"
    for url in ("ftp://127.0.0.1/", "http://127.0.0.1:1/?token=abc", "127.0.0.1:8888"):
        with pytest.raises(server_cli.DCRError):
            server_cli.resolve_server(url, "t", env={})
