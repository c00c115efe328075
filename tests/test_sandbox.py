"""The kernel sandbox: real bubblewrap, real ipykernels, real namespaces, run as root.

Every test runs a real notebook through :func:`run_notebook` (or checks :func:`check_sandbox`). Hostile
notebooks try the network, host files and sockets, the supervisor's environment, /data, the host's file
system and leaving processes behind; the tests then look at the host side.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.runtime.kernel_layout import KERNEL_MOUNT, WORK_MOUNT, SandboxSpec
from dcr_enclave.runtime.kernel_process import check_sandbox, lock_kernel_dir, make_kernel_dir
from dcr_enclave.runtime.notebook_run import NotebookRun, RunResult, run_notebook

pytestmark = pytest.mark.root

NB_DIR = "analysis"
NB_REL = f"{NB_DIR}/notebook.ipynb"


@dataclass
class Account:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="module")
def account() -> Iterator[Account]:
    """A fresh unprivileged system account for the module, removed afterwards."""
    name = "dcrsbx" + secrets.token_hex(4)
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(name)
    try:
        yield Account(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)


@dataclass
class Job:
    spec: SandboxSpec
    root: Path

    @property
    def nb_path(self) -> Path:
        return self.spec.workdir / NB_REL

    def probe(self) -> dict:
        """What the notebook recorded in its working copy (the test reads it from the host side)."""
        return json.loads((self.spec.workdir / NB_DIR / "probe.json").read_text())


@pytest.fixture
def make_job(tmp_path: Path, account: Account) -> Callable[..., Job]:
    """Lays out a job like the supervisor does: a working copy with the notebook, and a data directory."""

    def make(
        cells: list[str],
        *,
        name: str = "job",
        data: dict[str, bytes] | None = None,
        files: dict[str, str] | None = None,
        markdown_first: bool = False,
        **limits: object,
    ) -> Job:
        root = tmp_path / name
        work, data_dir = root / "work", root / "data"
        (work / NB_DIR).mkdir(parents=True)
        data_dir.mkdir()
        for rel, content in (data or {}).items():
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (data_dir / rel).write_bytes(content)
        for rel, text in (files or {}).items():
            (work / rel).write_text(text)
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
        if markdown_first:
            nb.cells.insert(0, nbformat.v4.new_markdown_cell("# Charges by region"))
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, work / NB_REL)
        spec = SandboxSpec(workdir=work, data_dir=data_dir, uid=account.uid, gid=account.gid, **limits)  # type: ignore[arg-type]
        return Job(spec, root)

    return make


def probe_cell(body: str) -> str:
    """A cell that fills ``r`` with what it observes and saves it as probe.json in the notebook's folder."""
    return (
        "import json, os, socket\n"
        "r = {}\n"
        "def attempt(name, fn):\n"
        "    try:\n"
        "        r[name] = ['ok', fn()]\n"
        "    except OSError as e:\n"
        "        r[name] = ['failed', type(e).__name__]\n"
        f"{body}\n"
        "json.dump(r, open('probe.json', 'w'))\n"
    )


def processes_in_namespace(ns_link: str) -> list[int]:
    """Host pids of live (not zombie) processes whose PID namespace is ``ns_link`` (/proc/<pid>/ns/pid)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") != ns_link:
                    continue
                state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in (b"Z", b"X"):
                found.append(int(name))
    return found


RECORD_NS = "open('ns.txt', 'w').write(os.readlink('/proc/self/ns/pid'))"


# ---------------------------------------------------------------------------------------------------------
# check_sandbox
# ---------------------------------------------------------------------------------------------------------


def test_check_sandbox_passes_for_an_unprivileged_account(account: Account, tmp_path: Path) -> None:
    """check_sandbox builds a real sandbox as the account and accepts it; the job's directories are untouched."""
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    data.mkdir()
    check_sandbox(SandboxSpec(workdir=work, data_dir=data, uid=account.uid, gid=account.gid))
    check_sandbox(account.uid, account.gid)
    assert list(work.iterdir()) == [] and list(data.iterdir()) == []


def test_check_sandbox_without_bwrap_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without bwrap on PATH check_sandbox refuses with a DCRError naming bubblewrap and how to install it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DCRError, match="bubblewrap") as info:
        check_sandbox(65534)
    assert "apt-get install" in str(info.value)


def test_check_sandbox_with_a_missing_bwrap_path(tmp_path: Path) -> None:
    """An explicit bwrap path that does not exist is refused with a DCRError naming the path."""
    missing = str(tmp_path / "no-such-bwrap")
    with pytest.raises(DCRError, match="no-such-bwrap"):
        check_sandbox(65534, bwrap=missing)
    with pytest.raises(DCRError, match="no-such-bwrap"):
        check_sandbox(SandboxSpec(tmp_path, tmp_path, 65534, 65534, bwrap=missing))


@pytest.mark.parametrize(("uid", "gid"), [(0, 65534), (65534, 0), (-1, 65534)])
def test_check_sandbox_refuses_privileged_or_invalid_ids(uid: int, gid: int) -> None:
    """The sandbox never runs code as root (uid or gid 0) or with an invalid id."""
    with pytest.raises(DCRError, match="unprivileged"):
        check_sandbox(uid, gid)


# ---------------------------------------------------------------------------------------------------------
# Running notebooks
# ---------------------------------------------------------------------------------------------------------


def test_notebook_reads_data_and_writes_a_result(make_job: Callable[..., Job], insurance_real: Path) -> None:
    """A notebook reads a CSV under /data, imports a module beside it, writes a result in the working copy;
    the executed notebook is written back with its outputs and on_cell sees (0, n) … (n-1, n)."""
    rows = list(csv.DictReader(insurance_real.open()))
    expected_mean = statistics.fmean(float(r["charges"]) for r in rows)
    cells = [
        "import csv, os\nfrom helper import mean\nprint(os.getcwd())",
        "rows = list(csv.DictReader(open('/data/acme/insurance/real.csv')))\nlen(rows)",
        "result = mean(float(r['charges']) for r in rows)\nopen('result.txt', 'w').write(repr(result))",
        "print(os.getuid(), os.getgid())",
    ]
    job = make_job(
        cells,
        data={"acme/insurance/real.csv": insurance_real.read_bytes()},
        files={
            f"{NB_DIR}/helper.py": "import statistics\n\ndef mean(xs):\n    return statistics.fmean(xs)\n"
        },
        markdown_first=True,
    )
    calls: list[tuple[int, int]] = []

    result = run_notebook(NB_REL, job.spec, on_cell=lambda i, n: calls.append((i, n)))

    assert result == RunResult("ok")
    assert calls == [(i, len(cells)) for i in range(len(cells))]
    assert float((job.spec.workdir / NB_DIR / "result.txt").read_text()) == pytest.approx(expected_mean)
    nb = nbformat.read(job.nb_path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].outputs[0]["text"].strip() == f"{WORK_MOUNT}/{NB_DIR}"
    assert code[1].outputs[0]["data"]["text/plain"] == str(len(rows))
    assert code[3].outputs[0]["text"].split() == [str(job.spec.uid), str(job.spec.gid)]
    assert [c.execution_count for c in code] == [1, 2, 3, 4]
    assert nb.metadata["language_info"]["name"] == "python"


def test_hostile_notebook_is_contained(
    make_job: Callable[..., Job], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network (a host loopback listener is unreachable, only lo, no routes), no host files, sockets or
    environment, /data and the system read-only, private /tmp, an unprivileged account without capabilities."""
    token = secrets.token_hex(8)
    secrets_dir = tmp_path / "host-secrets"
    secrets_dir.mkdir()
    key_file = secrets_dir / "signing-key.pem"
    key_file.write_text("-----BEGIN PRIVATE KEY----- " + token)
    key_file.chmod(0o644)  # only the mount namespace keeps it out of reach
    secrets_dir.chmod(0o755)
    unix_path = str(secrets_dir / "launcher.sock")
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(unix_path)
    unix_listener.listen()
    # Reachable by anyone who can see it: only the mount namespace keeps the sandbox away.
    os.chmod(unix_path, 0o777)
    tcp_listener = socket.create_server(("127.0.0.1", 0))
    port = tcp_listener.getsockname()[1]
    monkeypatch.setenv("DCR_TEST_LAUNCHER_TOKEN", token)
    python_dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)} | {sys.prefix, sys.base_prefix}
    host_dirs = [
        d
        for d in ("/home", "/var", "/srv", "/opt", "/mnt", "/boot", str(tmp_path))
        if os.path.isdir(d) and not any(p == d or p.startswith(d + "/") for p in python_dirs)
    ]
    body = f"""
r['kernel_transport'] = json.load(open('{KERNEL_MOUNT}/kernel.json'))['transport']
s = socket.socket()
s.settimeout(5)
attempt('tcp', lambda: s.connect(('127.0.0.1', {port})))
attempt('unix', lambda: socket.socket(socket.AF_UNIX).connect({unix_path!r}))
attempt('key', lambda: open({str(key_file)!r}).read())
attempt('data_create', lambda: open('/data/new.txt', 'w').write('x'))
attempt('data_modify', lambda: open('/data/rows.csv', 'a').write('x'))
attempt('tmp_write', lambda: open('/tmp/escape-{token}', 'w').write('x'))
attempt('root_write', lambda: open('/escape-{token}', 'w').write('x'))
attempt('usr_write', lambda: open('/usr/escape-{token}', 'w').write('x'))
attempt('etc_write', lambda: open('/etc/passwd', 'a').write('x'))
attempt('init_root', lambda: os.listdir('/proc/1/root'))
r['interfaces'] = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]
r['routes'] = open('/proc/net/route').read().splitlines()[1:]
r['ids'] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]
r['env_token'] = any({token!r} in v for v in os.environ.values())
st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
r['caps'] = [int(st[k], 16) for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')]
r['no_new_privs'] = st['NoNewPrivs'].strip()
r['host_dirs'] = {{d: os.path.exists(d) for d in {host_dirs!r}}}
cmdlines = []
for p in os.listdir('/proc'):
    if p.isdigit():
        try:
            cmdlines.append(open(f'/proc/{{p}}/cmdline', 'rb').read().replace(bytes(1), b' ').decode())
        except OSError:
            pass
r['cmdlines'] = cmdlines
"""
    job = make_job([probe_cell(body)], data={"rows.csv": b"a,b\n1,2\n"})
    data_before = {p.name: p.read_bytes() for p in job.spec.data_dir.iterdir()}
    try:
        result = run_notebook(NB_REL, job.spec)
        assert result == RunResult("ok")
        r = job.probe()
        tcp_listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            tcp_listener.accept()  # nothing ever reached the host's listener
        unix_listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            unix_listener.accept()
    finally:
        tcp_listener.close()
        unix_listener.close()
    for name in ("tcp", "unix", "key", "data_create", "data_modify", "root_write", "usr_write", "etc_write"):
        assert r[name][0] == "failed", (name, r[name])
    assert r["init_root"][0] == "failed"
    assert r["interfaces"] == ["lo"]
    assert r["routes"] == []
    assert r["kernel_transport"] == "ipc"  # nbclient reaches the kernel over unix sockets, never TCP
    assert r["ids"] == [job.spec.uid, job.spec.uid, job.spec.gid, job.spec.gid, []]
    assert r["caps"] == [0, 0, 0, 0, 0] and r["no_new_privs"] == "1"
    assert r["env_token"] is False
    assert host_dirs and not any(r["host_dirs"].values()), r["host_dirs"]
    # Only the sandbox's processes, and not even their command lines show a host path.
    assert not any("pytest" in c or str(tmp_path) in c for c in r["cmdlines"])
    # What the notebook could write outside the working copy stayed in the sandbox.
    assert r["tmp_write"][0] == "ok"
    assert not os.path.exists(f"/tmp/escape-{token}")
    assert not os.path.exists(f"/escape-{token}") and not os.path.exists(f"/usr/escape-{token}")
    assert {p.name: p.read_bytes() for p in job.spec.data_dir.iterdir()} == data_before


def test_background_processes_die_before_run_notebook_returns(make_job: Callable[..., Job]) -> None:
    """A Popen'd writer and a double-forked daemon, both writing into the working copy in a loop, are dead
    when run_notebook returns: their files stop changing and no process is left in the sandbox's namespace."""
    cells = [
        "import os, subprocess, sys, time\n"
        "script = 'import sys, time\\nn = 0\\nwhile True:\\n    n += 1\\n"
        '    open(sys.argv[1], "w").write(str(n))\\n    time.sleep(0.02)\\n\'\n'
        "open('/tmp/writer.py', 'w').write(script)\n"
        "child = subprocess.Popen([sys.executable, '/tmp/writer.py', 'popen.txt'], start_new_session=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, [sys.executable, '/tmp/writer.py', 'daemon.txt'])\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n" + RECORD_NS,
        "while not (os.path.exists('popen.txt') and os.path.exists('daemon.txt')):\n    time.sleep(0.02)",
    ]
    job = make_job(cells)
    folder = job.spec.workdir / NB_DIR

    assert run_notebook(NB_REL, job.spec) == RunResult("ok")

    ns_link = (folder / "ns.txt").read_text()
    assert processes_in_namespace(ns_link) == []
    before = {
        n: ((folder / n).stat().st_mtime_ns, (folder / n).read_bytes()) for n in ("popen.txt", "daemon.txt")
    }
    time.sleep(1.0)  # ~50 writes each, had anything survived
    after = {
        n: ((folder / n).stat().st_mtime_ns, (folder / n).read_bytes()) for n in ("popen.txt", "daemon.txt")
    }
    assert after == before


def test_concurrent_sandboxes_cannot_see_each_other(make_job: Callable[..., Job]) -> None:
    """Two sandboxes alive at the same time, same account, different data: each sees only its own /data,
    working copy and processes, even through the other's host paths."""
    barrier = threading.Barrier(2, timeout=120)
    jobs = {}
    for name in ("a", "b"):
        jobs[name] = make_job(
            ["pass", "pass"], name=name, data={f"only-{name}.csv": f"secret-{name}".encode()}
        )
    for name, other in (("a", "b"), ("b", "a")):
        o = jobs[other].spec
        body = f"""
r['data'] = sorted(os.listdir('/data'))
r['work'] = sorted(os.listdir('{WORK_MOUNT}'))
attempt('other_data', lambda: open('/data/only-{other}.csv').read())
attempt('other_data_host', lambda: open({str(o.data_dir / f"only-{other}.csv")!r}).read())
attempt('other_work_host', lambda: os.listdir({str(o.workdir)!r}))
r['processes'] = [open(f'/proc/{{p}}/cmdline', 'rb').read().decode(errors='replace') for p in os.listdir('/proc') if p.isdigit()]
r['ns'] = os.readlink('/proc/self/ns/pid')
"""
        nb = nbformat.read(jobs[name].nb_path, as_version=4)
        nb.cells[1].source = probe_cell(body)
        nbformat.write(nb, jobs[name].nb_path)

    def meet(index: int, count: int) -> None:
        if index == 1:
            barrier.wait()  # both kernels are up before either looks around

    with ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(run_notebook, NB_REL, j.spec, on_cell=meet) for n, j in jobs.items()}
        results = {n: f.result(timeout=300) for n, f in futures.items()}

    assert results == {"a": RunResult("ok"), "b": RunResult("ok")}
    probes = {n: j.probe() for n, j in jobs.items()}
    for name in ("a", "b"):
        p = probes[name]
        assert p["data"] == [f"only-{name}.csv"]
        assert p["work"] == [NB_DIR]
        assert p["other_data"][0] == "failed"
        assert p["other_data_host"][0] == "failed"
        assert p["other_work_host"][0] == "failed"
        # Only this sandbox's own processes: its init and its kernel.
        assert len(p["processes"]) == 2
    assert probes["a"]["ns"] != probes["b"]["ns"]


@pytest.mark.parametrize(
    ("raise_stmt", "ename"),
    [
        ("raise ValueError('charges of row 7: ' + SECRET)", "ValueError"),
        ("raise KeyError(SECRET)", "KeyError"),
        ("raise type('leak ' + SECRET, (Exception,), {})()", "Exception"),
        ("raise type('row7_' + SECRET, (ValueError,), {})()", "Exception"),
        ("from json import JSONDecodeError\nraise JSONDecodeError(SECRET, SECRET, 0)", "Exception"),
    ],
    ids=["builtin", "builtin-key", "data-in-type-name", "identifier-type-name", "library-class"],
)
def test_failing_cell_reports_only_index_and_type(
    make_job: Callable[..., Job], raise_stmt: str, ename: str
) -> None:
    """A failing cell gives status error, its code-cell index and exception type name, nothing of the message;
    only Python's built-in exception names are reported as they are, any other class (which the notebook can
    name after the data, or a library's) as Exception. Later cells do not run."""
    secret = secrets.token_hex(8)
    job = make_job(
        [f"SECRET = {secret!r}", raise_stmt, "open('after.txt', 'w').write('ran')"], markdown_first=True
    )

    result = run_notebook(NB_REL, job.spec)

    assert result == RunResult("error", 1, ename)
    assert secret not in repr(result)
    assert not (job.spec.workdir / NB_DIR / "after.txt").exists()


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({"wall_time": 6.0}, id="wall-time", marks=pytest.mark.slow),
        pytest.param({"cell_timeout": 1.0, "wall_time": 600.0}, id="cell-timeout"),
    ],
)
def test_timeout_kills_the_whole_tree(make_job: Callable[..., Job], limits: dict[str, float]) -> None:
    """A cell that sleeps past the wall time (or the cell timeout) ends the run as timeout at that cell, and
    the sandbox's processes, a background sleeper included, are gone when run_notebook returns."""
    cells = [
        "import os, subprocess, time\nsubprocess.Popen(['sleep', '600'])\n" + RECORD_NS,
        "time.sleep(600)",
    ]
    job = make_job(cells, **limits)

    result = run_notebook(NB_REL, job.spec)

    assert result == RunResult("timeout", 1)
    assert processes_in_namespace((job.spec.workdir / NB_DIR / "ns.txt").read_text()) == []


def test_memory_limit_fails_the_job_not_the_host(make_job: Callable[..., Job]) -> None:
    """Past memory_bytes an allocation fails inside the sandbox: the job stops at that cell (MemoryError, or
    killed) while a smaller allocation before it succeeded; the supervisor carries on."""
    cells = [
        "small = bytearray(64 << 20)\nopen('small.txt', 'w').write('ok')",
        "big = bytearray(4 << 30)",
        "open('after.txt', 'w').write('ran')",
    ]
    job = make_job(cells, memory_bytes=512 << 20)

    result = run_notebook(NB_REL, job.spec)

    assert result.cell == 1
    assert (result.status, result.ename) in {("error", "MemoryError"), ("killed", None)}
    assert (job.spec.workdir / NB_DIR / "small.txt").read_text() == "ok"
    assert not (job.spec.workdir / NB_DIR / "after.txt").exists()


def test_the_account_cannot_start_more_processes_than_its_limit(make_job: Callable[..., Job]) -> None:
    """Forking until it fails stops below max_processes (RLIMIT_NPROC), and the kernel carries on."""
    cells = [
        "import os, time\nkids = 0\n"
        "try:\n"
        "    while kids < 500:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        kids += 1\n"
        "except OSError:\n"
        "    pass\n"
        "open('kids.txt', 'w').write(str(kids))"
    ]
    job = make_job(cells, max_processes=40)
    assert run_notebook(NB_REL, job.spec).status == "ok"
    kids = int((job.spec.workdir / NB_DIR / "kids.txt").read_text())
    assert 0 < kids < 40


def test_cancel_from_another_thread_kills_the_run(make_job: Callable[..., Job]) -> None:
    """NotebookRun.cancel() from another thread ends a running cell: status killed at that cell, and the
    sandbox's namespace is empty when run() returns."""
    job = make_job(["import os, time\n" + RECORD_NS, "time.sleep(600)"])
    timers: list[threading.Timer] = []

    def on_cell(index: int, count: int) -> None:
        if index == 1:
            timers.append(threading.Timer(0.5, run.cancel))
            timers[0].start()

    with NotebookRun(NB_REL, job.spec, on_cell=on_cell) as run:
        result = run.run()

    assert result == RunResult("killed", 1)
    assert processes_in_namespace((job.spec.workdir / NB_DIR / "ns.txt").read_text()) == []


def test_write_back_never_follows_a_planted_symlink(make_job: Callable[..., Job], tmp_path: Path) -> None:
    """A notebook that replaces its own folder by a symlink to a host directory cannot make the (root)
    write-back land there: run_notebook refuses with a DCRError and the host directory stays empty."""
    victim = tmp_path / "victim"
    victim.mkdir()
    cells = [
        f"import os\nos.rename('{WORK_MOUNT}/{NB_DIR}', '{WORK_MOUNT}/moved')\nos.symlink({str(victim)!r}, '{WORK_MOUNT}/{NB_DIR}')"
    ]
    job = make_job(cells)

    with pytest.raises(DCRError, match="write the executed notebook"):
        run_notebook(NB_REL, job.spec)

    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("rel", ["../notebook.ipynb", "/etc/passwd", "analysis//notebook.ipynb", ""])
def test_bad_notebook_paths_are_refused(make_job: Callable[..., Job], rel: str) -> None:
    """A notebook path that is not plain and relative is refused before anything runs or changes."""
    job = make_job(["open('ran.txt', 'w').write('x')"])
    before = sorted((p.relative_to(job.root), p.stat().st_uid) for p in job.root.rglob("*"))

    with pytest.raises(DCRError, match="notebook path"):
        run_notebook(rel, job.spec)

    assert sorted((p.relative_to(job.root), p.stat().st_uid) for p in job.root.rglob("*")) == before


def test_notebook_behind_a_symlink_is_refused(make_job: Callable[..., Job], tmp_path: Path) -> None:
    """A notebook reached through a symlink in the working copy is refused with a DCRError; nothing runs."""
    job = make_job(["open('ran.txt', 'w').write('x')"])
    outside = tmp_path / "outside"
    (job.spec.workdir / NB_DIR).rename(outside)
    (job.spec.workdir / NB_DIR).symlink_to(outside)

    with pytest.raises(DCRError, match="cannot read notebook"):
        run_notebook(NB_REL, job.spec)

    assert not (outside / "ran.txt").exists()


def test_cancel_before_run_runs_nothing(make_job: Callable[..., Job]) -> None:
    """A run cancelled before it starts returns killed without starting a kernel or touching the job."""
    job = make_job(["open('ran.txt', 'w').write('x')"])
    before = job.nb_path.read_bytes()
    run = NotebookRun(NB_REL, job.spec)
    run.cancel()

    assert run.run() == RunResult("killed")
    assert job.nb_path.read_bytes() == before
    assert not (job.spec.workdir / NB_DIR / "ran.txt").exists()


def _account_processes(uid: int) -> list[tuple[int, bytes]]:
    """(pid, start time) of the live processes running as ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}").stat().st_uid != uid:
                    continue
                fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in (b"Z", b"X"):
                found.append((int(name), fields[19]))
    return found


def test_on_ready_comes_after_the_kernel_answers_and_before_any_cell(make_job: Callable[..., Job]) -> None:
    """on_ready is called once, when the sandboxed kernel is up (its process runs as the account) and
    before the first cell has run or been announced; the run then goes on as usual."""
    job = make_job(["open('ran.txt', 'w').write('x')"])
    events: list[tuple[str, object]] = []

    def on_ready() -> None:
        kernel_up = bool(_account_processes(job.spec.uid))
        events.append(("ready", (kernel_up, (job.spec.workdir / NB_DIR / "ran.txt").exists())))

    result = run_notebook(
        NB_REL, job.spec, on_cell=lambda i, n: events.append(("cell", (i, n))), on_ready=on_ready
    )

    assert result == RunResult("ok")
    assert events == [("ready", (True, False)), ("cell", (0, 1))]
    assert (job.spec.workdir / NB_DIR / "ran.txt").exists()


def test_cancel_while_on_ready_holds_the_run_runs_no_cell(make_job: Callable[..., Job]) -> None:
    """A run cancelled while on_ready holds it (the supervisor's key release failed) runs no cell: status
    killed, no cell announced, nothing written by the notebook, and the sandbox's processes are gone."""
    job = make_job(["open('ran.txt', 'w').write('x')"])
    cells: list[int] = []
    sandbox: list[tuple[int, bytes]] = []

    def on_ready() -> None:
        sandbox.extend(_account_processes(job.spec.uid))
        run.cancel()

    with NotebookRun(NB_REL, job.spec, on_cell=lambda i, n: cells.append(i), on_ready=on_ready) as run:
        result = run.run()

    assert result == RunResult("killed")
    assert cells == []
    assert not (job.spec.workdir / NB_DIR / "ran.txt").exists()
    assert sandbox and not set(sandbox) & set(_account_processes(job.spec.uid))


def test_taking_the_socket_directory_never_hides_the_connection_file(account: Account) -> None:
    """While the supervisor takes the kernel's socket directory, a kernel still starting up re-reads its
    connection file: at no instant may the account lose sight of it (else the kernel dies at start)."""
    run_dir = Path(tempfile.mkdtemp(prefix="dcr-lock-"))  # under /tmp: the account can traverse to it
    os.chmod(run_dir, 0o755)
    rounds = 2000
    # The watcher runs as the account until its stdin closes, counting the stats the directory refused.
    watcher = (
        "import os, select, sys\n"
        "misses = 0\n"
        "print('ready', flush=True)\n"
        "while not select.select([sys.stdin], [], [], 0)[0]:\n"
        "    for _ in range(2000):\n"
        "        try:\n"
        "            os.stat(sys.argv[1])\n"
        "        except PermissionError:\n"
        "            misses += 1\n"
        "        except FileNotFoundError:\n"
        "            pass\n"
        "print(misses)\n"
    )

    def as_account() -> None:
        os.setgid(account.gid)
        os.setuid(account.uid)

    kernel_dir = make_kernel_dir(run_dir, account.uid, account.gid)
    (kernel_dir / "kernel.json").write_text("{}")
    os.chown(kernel_dir / "kernel.json", account.uid, account.gid)
    os.chmod(kernel_dir / "kernel.json", 0o400)
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-c", watcher, str(kernel_dir / "kernel.json")],
        preexec_fn=as_account,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        for _ in range(rounds):
            lock_kernel_dir(kernel_dir)
            assert os.stat(kernel_dir).st_uid == 0
            # Hand the directory back as a new run finds it, in an order that never hides the file itself.
            os.chown(kernel_dir, account.uid, account.gid)
            os.chmod(kernel_dir, 0o700)
    finally:
        out, _ = proc.communicate(timeout=30)
        shutil.rmtree(run_dir)
    assert int(out) == 0
