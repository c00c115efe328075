"""The secure stage under attack: each channel a notebook controls, played end to end and shown closed.

Every test runs a hostile notebook on the real data through the real enclave host and supervisor and then
looks for what the notebook tried to get out (a value of the real data that the synthetic data does not
hold) wherever the researcher or another account could see it: the job's status and events, the public
receipt, the failure reason, the host's state, a listener the test runs, another job's outputs. See the
table in ``docs/sandbox.md``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from test_local_run import _grant_and_bundle, _no_plaintext_anywhere, _wait_state

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import OutputLimits
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.formats.unsealing import open_dir, open_file
from dcr_enclave.verify.receipt import check_receipt_dir, open_commitment

pytestmark = [pytest.mark.root, pytest.mark.slow]

READ = "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')\n"


@pytest.fixture
def secret(insurance_real: Path) -> dict:
    """Values of the real data a notebook tries to smuggle out, and how they look in text."""
    df = pd.read_csv(insurance_real)
    row = df.iloc[7]
    return {
        "name": f"{int(row['age'])}_{row['sex']}_{row['bmi']}_{row['region']}",
        "charges": str(round(float(df["charges"].sum()))),
        "age7": int(row["age"]),
    }


def _public_texts(host, job_id: str, out: Path | None = None) -> str:
    """Everything about the job a researcher (or any account) can read, as one text."""
    parts = [json.dumps(host.client.status(job_id)), json.dumps(host.client.jobs())]
    parts += [json.dumps(e) for e in host.host.jobs[job_id].events]
    if out is not None:
        for name in (contract.RECEIPT_FILE, contract.FAILURE_FILE):
            if (out / name).exists():
                parts.append((out / name).read_text())
    return "\n".join(parts)


#: The job keys of the jobs the tests ran, by job id (to open their outputs as the researcher would).
JOB_KEYS: dict[str, bytes] = {}


def _run(host, store, make_notebook, tmp_path, cells, **grant_kw) -> tuple[str, dict, Path]:
    ws = tmp_path / f"ws-{len(JOB_KEYS)}-{time.monotonic_ns()}"
    ws.mkdir()
    nb = make_notebook(cells, workspace=ws.name)
    job_id, grant, bundle, key = _grant_and_bundle(store, nb, ws, **grant_kw)
    JOB_KEYS[job_id] = key
    host.client.launch(grant, bundle)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES | {"held"}, timeout=300)
    out = tmp_path / f"out-{job_id}"
    host.client.result(job_id, out)
    return job_id, job, out


def _run_under_review(host, store, make_notebook, tmp_path, cells, max_bytes: int):
    """Run ``cells`` under review (outputs sealed to an airlock key the test holds); the airlock's private
    key and what :func:`_run` returns."""
    airlock_private, airlock_public = generate_keypair()
    ran = _run(
        host, store, make_notebook, tmp_path, cells, release="review", airlock_public_key=airlock_public,
        output_limits=OutputLimits(max_bytes=max_bytes),
    )  # fmt: skip
    return airlock_private, ran


# -- 1. kernel sockets ---------------------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path_factory):
    """A unix socket any account could make, counting the connections it gets."""
    d = Path("/run") / f"dcr-test-listen-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    path = d / "l.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    os.chmod(path, 0o777)
    srv.listen(64)
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield path, hits
    stop.set()
    t.join()
    srv.close()
    path.unlink()
    d.rmdir()


def test_the_kernel_cannot_redirect_the_supervisors_sockets(tmp_path, store, host, make_notebook, listener):
    """A cell tries to replace each kernel socket with a link to a listener outside; the directory is no
    longer the account's once the kernel is up, so every attempt fails and the listener gets nothing."""
    path, hits = listener
    cells = [
        READ,
        "import os, errno\nres = {}\n"
        "for n in sorted(os.listdir('/run/dcr-kernel')):\n"
        "    p = '/run/dcr-kernel/' + n\n"
        "    for what, f in (('unlink', lambda: os.unlink(p)), ('rename', lambda: os.rename(p, p + '.x')),\n"
        f"                    ('link', lambda: os.symlink({str(path)!r}, p + '.new'))):\n"
        "        try:\n"
        "            f(); res[n + ':' + what] = 'done'\n"
        "        except OSError as e:\n"
        "            res[n + ':' + what] = errno.errorcode[e.errno]\n"
        "open('attempts.json', 'w').write(__import__('json').dumps(res))",
    ]
    job_id, job, out = _run(host, store, make_notebook, tmp_path, cells)
    assert job["state"] == "succeeded", job
    assert hits == []
    attempts = _open_output(job_id, out, "attempts.json", tmp_path)
    assert len(attempts) >= 15  # five sockets and the connection file, three attempts each
    assert set(attempts.values()) == {"EACCES"}, attempts


def test_a_dropped_kernel_connection_fails_the_run_and_is_never_made_again(
    tmp_path, store, host, make_notebook, listener, secret
):
    """The kernel closes its end of the shell connection (after trying to plant a link): the supervisor's
    side does not reconnect anywhere; the run ends ``failed`` at once, naming only the disconnection."""
    path, hits = listener
    cells = [
        READ,
        "import os\n"
        "try:\n"
        f"    os.symlink({str(path)!r}, '/run/dcr-kernel/k-1.new')\n"
        "except OSError:\n"
        "    pass\n"
        "get_ipython().kernel.shell_stream.close()",
        "print('never')",
    ]
    started = time.monotonic()
    job_id, job, out = _run(host, store, make_notebook, tmp_path, cells, time_limit=300)
    assert job["state"] == "failed"
    assert job["failure"]["reason"] == "disconnected"
    assert time.monotonic() - started < 60  # not the time limit
    assert hits == []
    assert secret["name"] not in _public_texts(host, job_id, out)


# -- 2. one identity per job; the seccomp filter -------------------------------------------------------------

KEYRING = (
    "import ctypes, errno, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "SYS = {'add_key': 248, 'request_key': 249, 'keyctl': 250, 'unshare': 272, 'ptrace': 101, 'bpf': 321,\n"
    "       'perf_event_open': 298, 'userfaultfd': 323, 'mount': 165}\n"
    "def call(name, *args):\n"
    "    r = libc.syscall(SYS[name], *args)\n"
    "    return 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]\n"
)


def test_a_keyring_entry_cannot_pass_from_one_job_to_the_next(tmp_path, store, host, make_notebook, secret):
    """Job A tries to put a real value into its account's keyring; job B (another run) tries to read it.
    The keyring calls are denied to every kernel, and each job runs as its own uid."""
    plant = [
        READ,
        KEYRING + "value = df.iloc[7].to_json().encode()\n"
        "res = {'add_key': call('add_key', b'user', b'dcr-leak', value, len(value), ctypes.c_int(-2)),\n"
        "       'keyctl': call('keyctl', 0, ctypes.c_int(-2), 0)}\n"
        "open('plant.json', 'w').write(__import__('json').dumps(res))",
    ]
    a, job_a, out_a = _run(host, store, make_notebook, tmp_path, plant)
    assert job_a["state"] == "succeeded", job_a
    read = [
        KEYRING + "found = ctypes.create_string_buffer(4096)\n"
        "res = {'request_key': call('request_key', b'user', b'dcr-leak', None, ctypes.c_int(-2)),\n"
        "       'keyctl_search': call('keyctl', 10, ctypes.c_int(-2), b'user', b'dcr-leak', 0)}\n"
        "for name in ('unshare', 'mount', 'ptrace', 'bpf', 'perf_event_open', 'userfaultfd'):\n"
        "    res[name] = call(name, 0x10000000, 0, 0, 0, 0) if name == 'unshare' else call(name, 0, 0, 0, 0, 0)\n"
        "open('read.json', 'w').write(__import__('json').dumps(res))",
    ]
    b, job_b, out_b = _run(host, store, make_notebook, tmp_path, read)
    assert job_b["state"] == "succeeded", job_b
    assert host.host.jobs[a].sandbox_uid != host.host.jobs[b].sandbox_uid
    planted = _open_output(a, out_a, "plant.json", tmp_path)
    assert planted == {"add_key": "EPERM", "keyctl": "EPERM"}
    tried = _open_output(b, out_b, "read.json", tmp_path)
    assert tried == {
        "request_key": "EPERM",
        "keyctl_search": "EPERM",
        "unshare": "EPERM",
        "mount": "EPERM",
        "ptrace": "EPERM",
        "bpf": "EPERM",
        "perf_event_open": "EPERM",
        "userfaultfd": "EPERM",
    }


def _open_output(job_id: str, out: Path, name: str, tmp_path: Path):
    dest = tmp_path / f"opened-{job_id}"
    if not dest.exists():
        open_dir(out / contract.SEALED_OUTPUTS_FILE, dest, JOB_KEYS[job_id], job_id)
    return json.loads((dest / name).read_text())


# -- 3. counts and sizes in the output check -------------------------------------------------------------------


def test_output_check_reasons_carry_kinds_not_the_notebooks_numbers(
    tmp_path, store, host, make_notebook, secret
):
    """The notebook makes as many links as a real age and a file as large as the real charges' sum: the
    researcher and the public receipt learn only the kinds of problem; the figures are sealed for
    reviewers."""
    cells = [
        READ,
        "import os\nn = int(df.iloc[7]['age'])\n"
        "for i in range(n):\n    os.symlink('/etc/hostname', f'l{i}')\n"
        "with open('big.csv', 'wb') as f:\n    f.truncate(int(round(df['charges'].sum())))",
    ]
    airlock_private, (job_id, job, out) = _run_under_review(
        host, store, make_notebook, tmp_path, cells, 1 << 20
    )
    assert job["state"] == "failed"
    assert job["failure"]["reason"] == "outputs refused: symbolic links present; over the byte limit"
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    assert receipt["output_check"]["violations"] == ["symbolic links present", "over the byte limit"]
    public = _public_texts(host, job_id, out)
    assert secret["charges"] not in public
    assert f"{secret['age7']} symbolic" not in public
    # The reviewers' copy has the figures.
    opened = tmp_path / "check.json"
    open_file(out / contract.SEALED_CHECK_FILE, opened, airlock_private, job_id=job_id)
    details = json.loads(opened.read_text())["violations"]
    assert details[0] == f"{secret['age7']} symbolic link(s)"
    # the total includes the executed notebook
    total, limit = details[1].split(" bytes > ")
    assert int(total) > int(secret["charges"]) and limit == str(1 << 20)


# -- 4. held receipts ----------------------------------------------------------------------------------------


def test_held_results_show_only_a_padded_size(tmp_path, store, host, make_notebook):
    """Under review the sealed outputs and their reveal leave the enclave (to the researcher's server, then
    the hub) before any reviewer has looked, and the notebook chooses what it writes: both are padded, so
    a byte count the notebook takes from the data shows only which of a few sizes it fell in."""
    sizes = {}
    for n in (1_000, 40_000):
        cells = [
            READ,
            f"open('out.bin', 'wb').write(b'x' * {n})\n"
            f"open('name-{n}-' + str(int(df['age'].sum())) + '.txt', 'w').write('y' * {n // 100})",
        ]
        _private, (_job_id, job, out) = _run_under_review(
            host, store, make_notebook, tmp_path, cells, 1 << 30
        )
        assert job["state"] == "held", job
        sizes[n] = {
            name: (out / name).stat().st_size
            for name in (contract.SEALED_OUTPUTS_FILE, contract.SEALED_REVEAL_FILE)
        }
    assert sizes[1_000] == sizes[40_000], sizes


def test_a_held_receipt_commits_to_its_outputs_without_naming_them(
    tmp_path, store, host, make_notebook, secret, run_cli
):
    """Under review the outputs' names, sizes and digests are the notebook's to choose: the public receipt
    carries only a salted commitment; the reveal, sealed to the airlock with the outputs, opens it."""
    cells = [
        READ,
        "r = df.iloc[7]\nname = f\"{int(r['age'])}_{r['sex']}_{r['bmi']}_{r['region']}\"\n"
        "with open(name + '.csv', 'wb') as f:\n    f.truncate(int(round(df['charges'].sum())))",
    ]
    airlock_private, (job_id, job, out) = _run_under_review(
        host, store, make_notebook, tmp_path, cells, 1 << 30
    )
    assert job["state"] == "held"
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    assert receipt["outputs"] == []
    commitment = receipt["release"]["outputs_commitment"]
    public = _public_texts(host, job_id, out)
    assert secret["name"] not in public and secret["charges"] not in public
    assert _no_plaintext_anywhere([host.state], secret["name"].encode()) == []
    # the held receipt verifies as committed
    code, text, _ = run_cli(
        "verify", out, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, text
    assert "not revealed" in text
    # the airlock opens the reveal; it matches the commitment and the sealed outputs
    reveal = out / contract.REVEAL_FILE
    open_file(out / contract.SEALED_REVEAL_FILE, reveal, airlock_private, job_id=job_id)
    entries = {e.path: e.size for e in open_commitment(reveal.read_bytes(), commitment)}
    assert entries[secret["name"] + ".csv"] == int(secret["charges"])
    open_dir(out / contract.SEALED_OUTPUTS_FILE, out / contract.OUTPUTS_DIR, airlock_private, job_id)
    checks = check_receipt_dir(
        out,
        trusted_keys=json.loads(host.jwks_path.read_text())["keys"],
        expected_enclave_digests=[host.host.measurement()],
    )
    assert all(c.passed for c in checks), [str(c) for c in checks if not c.passed]
    # a reveal that does not match fails the check
    reveal.write_text(reveal.read_text().replace(secret["name"], "other"))
    checks = check_receipt_dir(
        out,
        trusted_keys=json.loads(host.jwks_path.read_text())["keys"],
        expected_enclave_digests=[host.host.measurement()],
    )
    assert not next(c for c in checks if c.name == "output commitment").passed


# -- 5. timing -----------------------------------------------------------------------------------------------


def test_under_review_the_researcher_sees_no_cell_times_and_a_rounded_end(
    tmp_path, store, make_host, make_notebook, secret
):
    """A cell sleeps for a time made from a real value: under review the researcher sees no cell progress
    and no ``checking``, and the end (state change and receipt) falls on a multiple of the time quantum."""
    quantum = 3.0
    host = make_host("quantum", review_time_quantum=quantum)
    cells = [READ, "import time\ntime.sleep((int(df.iloc[7]['age']) % 10) / 10)", "x = 1", "y = 2"]
    _airlock_private, airlock_public = generate_keypair()
    nb = make_notebook(cells)
    job_id, grant, bundle, _key = _grant_and_bundle(
        store, nb, tmp_path, release="review", airlock_public_key=airlock_public
    )
    host.client.launch(grant, bundle)
    seen = list(host.client.watch(job_id))
    events = [m.get("event", {}) for m in seen]
    assert not any(e.get("cell") for e in events), events
    assert "checking" not in [e.get("state") for e in events]
    job = host.host.jobs[job_id]
    assert job.state == "held"
    elapsed = job.updated - job.created
    assert elapsed >= quantum
    assert abs(elapsed - round(elapsed / quantum) * quantum) < 0.5, elapsed
    out = tmp_path / "out"
    host.client.result(job_id, out)
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    t0, t1 = (
        datetime.fromisoformat(receipt[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at")
    )
    assert (t1 - t0).total_seconds() % quantum == 0
    assert math.ceil(elapsed / quantum) >= 1


# -- 6. memory and processes -----------------------------------------------------------------------------------


def test_a_fork_and_memory_bomb_is_bounded_by_the_jobs_cgroup(tmp_path, store, make_host, make_notebook):
    """A notebook forks as many processes as it can and fills its private /dev/shm: its cgroup bounds both,
    the host keeps serving and the next job runs as usual; nothing of the job's cgroup is left."""
    host = make_host("bomb", job_max_processes=64, scratch_bytes=256 << 20, job_memory_overhead=256 << 20)
    cells = [
        "import os, time\nkids = 0\n"
        "try:\n"
        "    while kids < 10000:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        kids += 1\n"
        "except OSError:\n"
        "    pass\n"
        "open('kids.txt', 'w').write(str(kids))",
        "chunks = []\n"
        "try:\n"
        "    with open('/dev/shm/fill', 'wb') as f:\n"
        "        while True:\n"
        "            f.write(b'x' * (8 << 20))\n"
        "except OSError:\n"
        "    pass",
    ]
    job_id, job, out = _run(
        host, store, make_notebook, tmp_path, cells, memory_bytes=512 << 20, time_limit=120
    )
    assert job["state"] in ("failed", "succeeded"), job
    assert host.client.ping()["simulated"] is True
    assert not any(Path(d).exists() for d in _cgroup_dirs(job_id))
    kids = _open_output(job_id, out, "kids.txt", tmp_path) if job["state"] == "succeeded" else None
    if kids is not None:
        assert kids < 64
    _again, job2, _ = _run(host, store, make_notebook, tmp_path, [READ, "len(df)"])
    assert job2["state"] == "succeeded"


def _cgroup_dirs(job_id: str) -> list[str]:
    return [f"/sys/fs/cgroup/{h}/dcr-enclave/{job_id}" for h in ("memory", "pids", "unified")] + [
        f"/sys/fs/cgroup/dcr-enclave/{job_id}"
    ]


# -- 8. the host daemon ----------------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_malformed_requests_with_descriptors_leave_none_open(host):
    """Descriptors sent with malformed requests, with requests other than launch, or more than one, are
    all closed; every request is answered."""
    time.sleep(0.2)
    before = _open_fds()
    for i in range(50):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(host.socket))
            r, w = os.pipe()
            try:
                payload = [b"{not json\n", b'{"op": "ping"}\n', b'{"op": "status", "job_id": "x"}\n'][i % 3]
                fds = [r, w] if i % 2 else [r]
                socket.send_fds(s, [payload], fds)
                reply = s.recv(4096)
            finally:
                os.close(r)
                os.close(w)
            assert b'"ok":false' in reply.replace(b" ", b""), reply
    time.sleep(0.5)
    assert _open_fds() <= before


def test_a_grant_runs_once_even_across_a_host_restart(tmp_path, store, make_host, make_notebook):
    """A grant that ran is refused by the restarted host (its ledger is in the host's state), and the key
    broker releases keys only to the job a grant was launched for."""
    first = make_host("ledger")
    nb = make_notebook([READ, "len(df)"])
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    first.client.launch(grant, bundle)
    assert _wait_state(first.client, job_id, contract.TERMINAL_STATES)["state"] == "succeeded"
    first.host.shutdown()
    again = make_host("ledger", socket_path=tmp_path / "ledger-2.sock")
    with pytest.raises(DCRError, match="already used"):
        again.client.launch(grant, bundle)
    assert job_id not in again.host.jobs
    assert again.host.broker.ledger.job_for(json.loads(_claims(grant))["jti"]) == job_id


def _claims(token: str) -> str:
    import base64

    body = token.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


# -- 7. process titles ------------------------------------------------------------------------------------------

#: As another account: the pids whose name or command line carries the marker, on the /proc it is given.
_FIND_TITLE = r"""
import os, sys
marker, hits = sys.stdin.buffer.read(), []  # not in argv: the probe would find itself
for d in os.listdir("/proc"):
    if d.isdigit():
        for name in ("cmdline", "comm"):
            try:
                if marker in open(f"/proc/{d}/{name}", "rb").read():
                    hits.append(d)
            except OSError:
                pass
print(len(hits), len([d for d in os.listdir("/proc") if d.isdigit()]))
"""


def _seen_by_nobody(marker: str, hidepid: str | None) -> tuple[int, int]:
    """(processes carrying ``marker``, processes listed) for the unprivileged account 65534 on the host's
    /proc, or on a /proc mounted with ``hidepid`` (in a mount namespace of its own: the host's stays as is)."""
    mount = f"mount -t proc -o hidepid={hidepid} proc /proc && " if hidepid else ""
    probe = f'{mount}exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -I -c "$0"'
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", probe, _FIND_TITLE],
        input=marker, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    hits, listed = r.stdout.split()
    return int(hits), int(listed)


def test_a_process_title_of_the_job_is_hidden_by_the_proc_setting_the_host_requires(
    tmp_path, store, host, make_notebook, secret
):
    """The kernel writes a value of the real data into its own name and into the command line of a child.
    Root sees it (the title is really set). An unprivileged account of the machine reads it on a /proc
    without hidepid -- which is why ``dcr enclave-host`` refuses to start on one -- and sees no process at
    all but its own on the /proc that setting requires (hidepid=invisible). Researchers' servers have their
    own /proc (tests/test_local_spawner.py)."""
    marker = "T" + secret["charges"]
    cells = [
        READ + "import ctypes, subprocess, time\n"
        "title = 'T%d' % round(float(df['charges'].sum()))\n"
        "ctypes.CDLL(None).prctl(15, title.encode(), 0, 0, 0)\n"
        "child = subprocess.Popen(['sleep', '60', title])\n"
        "time.sleep(60)\n"
    ]
    ws = tmp_path / "ws"
    ws.mkdir()
    nb = make_notebook(cells, workspace=ws.name)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, ws, time_limit=120)
    host.client.launch(grant, bundle)
    try:
        deadline = time.monotonic() + 120
        while not titled(marker):
            assert time.monotonic() < deadline, "the job never set its process title"
            assert host.client.status(job_id)["state"] not in contract.TERMINAL_STATES
            time.sleep(0.2)
        hits, listed = _seen_by_nobody(marker, None)
        assert hits >= 1 and listed > 10
        hits, listed = _seen_by_nobody(marker, "invisible")
        assert hits == 0 and listed == 1  # the probe itself
    finally:
        host.client.cancel(job_id)


def titled(marker: str) -> bool:
    """Whether any process on the host (as root sees them) carries ``marker`` in its name or command line."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes() + (p / "comm").read_bytes():
                    return True
            except OSError:
                continue
    return False
