"""The secure stage end to end on one machine: ``dcr local-run`` and the enclave host.

Every test here runs real kernels in real namespaces through the real supervisor, started by a real
enclave host from its measured, read-only install.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import nbformat
import pandas as pd
import pytest

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset, OutputLimits, verify_grant
from dcr_enclave.formats.jwk import public_jwk, thumbprint
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.formats.unsealing import open_dir
from dcr_enclave.pack.bundle_builder import build_bundle
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import generate_key, load_or_create_key
from dcr_enclave.pack.store import Store
from dcr_enclave.platform.host import EnclaveHost, HostConfig, process_tree
from dcr_enclave.platform.measure import current_measurement
from dcr_enclave.runtime.bundle_extractor import extract_bundle
from dcr_enclave.runtime.kernel_layout import KERNEL_MOUNT, SandboxSpec
from dcr_enclave.runtime.notebook_run import run_notebook
from dcr_enclave.runtime.supervisor import Supervisor

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: A row of the real file that the synthetic file does not contain: finding it anywhere means a leak.
REAL_ROW = b"28,male,33,3,no,southeast,4449.462"

SUMMARY_CELLS = [
    "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
    "s = df.groupby('smoker')['charges'].agg(['count', 'mean'])\ns.to_csv('summary.csv')\nlen(df)",
]


def _grant_and_bundle(
    store, notebook: Path, tmp: Path, *, key=None, time_limit: int = 600, release: str = "auto", **grant_kw
):
    hub_key = key or load_or_create_key(store.hub_key_path)
    bundle_path = tmp / "bundle.tar"
    bundle = build_bundle(notebook, bundle_path)
    version = Store(store.root).versions(store.provider, store.dataset)[-1].version
    private, public = generate_keypair()
    job_id = contract.new_job_id()
    grant = issue_grant(
        hub_key,
        user="tester",
        job_id=job_id,
        bundle_digest=bundle.digest,
        datasets=[GrantedDataset(store.provider, store.dataset, version, release)],
        output_public_key=public,
        time_limit=time_limit,
        **grant_kw,
    )
    return job_id, grant, bundle_path, private


def _wait_state(client, job_id: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.status(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached {states}: {job}")


def _wait_supervisor(host, job_id: str) -> subprocess.Popen:
    """The job's supervisor process, once the host has started it."""
    deadline = time.monotonic() + 30
    while (proc := host.host.jobs[job_id].proc) is None:
        assert time.monotonic() < deadline, "the host never started the supervisor"
        time.sleep(0.01)
    return proc


def _alive(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` (clock ticks) still runs (zombies do not)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == started


def _uid(pid: int) -> int | None:
    """The account a live process runs as, or None once it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _with_token(token: str) -> list[int]:
    """Pids of live processes whose command line contains ``token``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if token.encode() in Path(entry.path, "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _no_plaintext_anywhere(roots: list[Path], marker: bytes) -> list[Path]:
    hits = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath, f)
                try:
                    if p.is_file() and not p.is_symlink() and marker in p.read_bytes():
                        hits.append(p)
                except OSError:
                    pass
    return hits


def test_same_notebook_synthetic_then_real(
    tmp_path, store, make_notebook, run_cli, insurance_real, insurance_synthetic
):
    """A notebook reading /data/<provider>/<dataset>/<file> runs unchanged on the synthetic file in a
    sandboxed kernel and on the real file under `dcr local-run`; its outputs reflect the real data exactly."""
    nb = make_notebook(SUMMARY_CELLS)
    # Programming stage: the synthetic file under the real file's name.
    syn_data = tmp_path / "syn-data"
    (syn_data / "acme" / "insurance").mkdir(parents=True)
    (syn_data / "acme" / "insurance" / "real.csv").write_bytes(insurance_synthetic.read_bytes())
    work = tmp_path / "syn-work"
    work.mkdir()
    (work / nb.name).write_bytes(nb.read_bytes())
    os.chown(work, 65534, 65534)
    os.chown(work / nb.name, 65534, 65534)
    res = run_notebook(
        nb.name, SandboxSpec(workdir=work, data_dir=syn_data, uid=65534, gid=65534, wall_time=120)
    )
    assert res.status == "ok"
    syn_summary = pd.read_csv(work / "summary.csv", index_col=0)
    assert syn_summary["count"].sum() == len(pd.read_csv(insurance_synthetic))

    # Secure stage: the same notebook, on the real rows.
    out = tmp_path / "out"
    code, _o, err = run_cli(
        "local-run", nb, "--store", store.root, "--out", out, "--host-state", tmp_path / "host-state"
    )
    assert code == 0, err
    real = pd.read_csv(insurance_real)
    expected = real.groupby("smoker")["charges"].agg(["count", "mean"])
    got = pd.read_csv(out / "outputs" / "summary.csv", index_col=0)
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)
    assert not got.equals(syn_summary)
    executed = nbformat.read(out / "outputs" / nb.name, as_version=4)
    assert executed.cells[1].outputs[0]["data"]["text/plain"] == str(len(real))

    # The receipt verifies against the host's published key, and is rejected as hardware.
    digest = ("--enclave-digest", current_measurement())
    code, text, _ = run_cli(
        "verify", out, "--trust", tmp_path / "host-state" / "public" / "jwks.json", *digest
    )
    assert code == 0, text
    code, text, _ = run_cli(
        "verify",
        out,
        "--trust",
        tmp_path / "host-state" / "public" / "jwks.json",
        *digest,
        "--require-hardware",
    )
    assert code == 1
    assert "FAIL" in text and "hardware" in text.lower()


HOSTILE = r"""
import errno, glob, json, os, socket, stat, struct, subprocess, sys, time
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "SUCCEEDED"
    except Exception as e:
        code = errno.errorcode.get(getattr(e, "errno", None) or 0, "")
        results[name] = ("failed: " + type(e).__name__ + " " + code).strip()

def tcp():
    s = socket.create_connection(("127.0.0.1", PORT), timeout=2)
    s.sendall(b"leak")
attempt("tcp_loopback", tcp)
attempt("read_signer_key", lambda: open(SIGNER).read())
attempt("read_provider_keys", lambda: os.listdir(KEYS))
attempt("read_hub_key", lambda: open(HUBKEY).read())
def host_socket():
    s = socket.socket(socket.AF_UNIX)
    s.connect(HOSTSOCK)
attempt("host_socket", host_socket)
attempt("other_job_spool", lambda: os.listdir(SPOOL))
attempt("read_token_file", lambda: open(TOKEN).read())
results["token_glob"] = glob.glob(SPOOL + "/*/out/*.jwt") + glob.glob(SPOOL + "/*/out/" + "*")
attempt("write_data", lambda: open("/data/acme/insurance/new.csv", "w").write("x"))
attempt("write_outside", lambda: open(OUTSIDE, "w").write("x"))
for where, path in (("sys_prefix", sys.prefix), ("usr", "/usr"), ("etc", "/etc"), ("root", "/")):
    attempt("write_" + where, lambda: open(os.path.join(path, ESCAPE), "w").write("x"))
attempt("read_world_readable", lambda: open(WORLD).read())
attempt("read_test_tree", lambda: os.listdir(TESTTREE))
# Every descriptor above 2: none may have been inherited (a kernel's own are close-on-exec), and the only
# sockets whose peer is outside the sandbox (peer pid 0 here) may be the kernel's ZMQ endpoints.
inheritable, outside = [], []
for fd in range(3, 1024):
    try:
        st = os.fstat(fd)
    except OSError:
        continue
    if os.get_inheritable(fd):
        inheritable.append(fd)
    if stat.S_ISSOCK(st.st_mode):
        s = socket.socket(fileno=os.dup(fd))
        try:
            if s.family == socket.AF_UNIX:
                pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                if pid == 0:
                    outside.append(s.getsockname())
        finally:
            s.close()
results["inheritable_fds"] = inheritable
results["outside_sockets"] = outside
results["interfaces"] = sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:])
results["uid"] = os.getuid()
results["dcr_env"] = sorted(k for k in os.environ if k.startswith("DCR"))
with open("results.json", "w") as f:
    json.dump(results, f)
"""


def test_hostile_notebook_fails_every_attempt(tmp_path, store, host, make_notebook, run_cli):
    """A hostile notebook under `dcr local-run` cannot reach the network (loopback included), the host's
    signing key, provider key material, the hub key, the host's socket, another job's spool or its
    attestation token, holds no inherited descriptor and no socket to outside the sandbox other than its
    kernel's own endpoints, and cannot write /data, sys.prefix, /usr, /etc or outside its working copy."""
    # An earlier job on the same host leaves its receipt token in the spool.
    first = make_notebook(SUMMARY_CELLS, workspace="first")
    (tmp_path / "first").mkdir(exist_ok=True)
    j1, g1, b1, _k1 = _grant_and_bundle(store, first, tmp_path / "first")
    host.client.launch(g1, b1)
    assert _wait_state(host.client, j1, contract.TERMINAL_STATES)["state"] == "succeeded"
    token_file = host.state / "spool" / j1 / "out" / contract.TOKEN_FILE
    assert token_file.is_file()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    outside = tmp_path / "outside-marker"
    escape = f"dcr-escape-{secrets.token_hex(6)}"
    # A file any account may read, outside the test's own (owner-only) temporary tree: only the sandbox's
    # mounts keep it out of reach, not its permissions.
    world = Path("/run") / f"dcr-test-world-{secrets.token_hex(6)}"
    world.mkdir(mode=0o755)
    (world / "marker").write_text("visible")
    os.chmod(world / "marker", 0o644)
    os.chmod(tmp_path, 0o755)  # the test's tree is readable by any account for this test
    src = (
        HOSTILE.replace("PORT", str(port))
        .replace("SIGNER", repr(str(host.state / "signer.pem")))
        .replace("KEYS", repr(str(store.keys)))
        .replace("HUBKEY", repr(str(store.hub_key_path)))
        .replace("HOSTSOCK", repr(str(host.socket)))
        .replace("SPOOL", repr(str(host.state / "spool")))
        .replace("TOKEN", repr(str(token_file)))
        .replace("OUTSIDE", repr(str(outside)))
        .replace("ESCAPE", repr(escape))
        .replace("WORLD", repr(str(world / "marker")))
        .replace("TESTTREE", repr(str(tmp_path)))
    )
    nb = make_notebook(["open('/data/acme/insurance/real.csv').readline()", src])
    out = tmp_path / "out"
    code, _o, err = run_cli(
        "local-run", nb, "--store", store.root, "--out", out, "--host-socket", host.socket
    )
    assert code == 0, err
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever connected
    listener.close()
    results = json.loads((out / "outputs" / "results.json").read_text())
    for name in (
        "tcp_loopback", "read_signer_key", "read_provider_keys", "read_hub_key", "host_socket",
        "other_job_spool", "read_token_file", "write_data", "write_sys_prefix", "write_usr", "write_etc",
    ):  # fmt: skip
        assert results[name].startswith("failed"), (name, results[name])
    # The read-only root and binds refuse the writes themselves, before any permission check: EROFS, not
    # EACCES (which the account's missing permission would give on a writable mount) or a missing directory.
    for name in ("write_sys_prefix", "write_usr", "write_etc", "write_root"):
        assert results[name] == "failed: OSError EROFS", (name, results[name])
    # World-readable places outside the sandbox are not mounted in it at all.
    assert results["read_world_readable"] == "failed: FileNotFoundError ENOENT", results
    assert results["read_test_tree"] == "failed: FileNotFoundError ENOENT", results
    shutil.rmtree(world)
    assert results["token_glob"] == []
    assert results["inheritable_fds"] == []
    assert results["outside_sockets"], "the kernel's own ZMQ endpoints should be listed"
    assert all(name.startswith(KERNEL_MOUNT + "/") for name in results["outside_sockets"]), results
    assert results["interfaces"] == ["lo"]
    assert results["uid"] != 0
    assert results["dcr_env"] == []  # no launch environment, no link descriptor number
    assert not outside.exists()
    for where in (Path(sys.prefix), Path("/usr"), Path("/etc")):
        assert not (where / escape).exists()
    code, text, _ = run_cli(
        "verify", out, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, text


#: Rewrites counter.txt every 10 ms, atomically (so a kill never leaves it half-written).
WRITER = (
    "import os, time\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    open('counter.tmp', 'w').write(str(n))\n"
    "    os.replace('counter.tmp', 'counter.txt')\n"
    "    time.sleep(0.01)\n"
)


def test_left_behind_writer_is_dead_before_outputs_are_collected(
    tmp_path, store, host, make_notebook, run_cli
):
    """A process the notebook leaves behind, rewriting an output every 10 ms, runs during the last cell and
    is gone, with the whole sandbox, by the time the supervisor reports "checking" (before it collects and
    hashes the outputs): the supervisor then has no child left, and the receipt matches the outputs."""
    token = f"dcr-writer-{secrets.token_hex(6)}"
    cells = [
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {WRITER!r}, {token!r}], start_new_session=True)\n"
        "while not os.path.exists('counter.txt') or int(open('counter.txt').read() or 0) < 5:\n"
        "    time.sleep(0.01)\n"
        # Enough bytes that collecting, hashing and sealing take a while, were the writer still there.
        "open('big.bin', 'wb').write(os.urandom(16 << 20))\n"
        "time.sleep(3)",
    ]
    nb = make_notebook(cells)
    job_id, grant, bundle, key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    proc = _wait_supervisor(host, job_id)
    seen_alive = False
    at_checking: list[tuple[int, int]] | None = None
    writer_at_checking: list[int] = []
    for msg in host.client.watch(job_id):
        ev = msg.get("event", {})
        if ev.get("cell") == [0, 1] and not seen_alive:
            deadline = time.monotonic() + 30
            while not (seen_alive := bool(_with_token(token))) and time.monotonic() < deadline:
                time.sleep(0.01)
        if ev.get("state") == "checking":
            at_checking = process_tree(proc.pid)
            writer_at_checking = _with_token(token)
    assert seen_alive, "the writer never ran"
    assert at_checking is not None, "the job never reported checking"
    assert [pid for pid, _ in at_checking] in ([proc.pid], []), at_checking  # nothing below the supervisor
    assert writer_at_checking == []
    assert host.client.status(job_id)["state"] == "succeeded"
    out = tmp_path / "out"
    host.client.result(job_id, out)
    open_dir(out / contract.SEALED_OUTPUTS_FILE, out / contract.OUTPUTS_DIR, key, job_id)
    assert int((out / contract.OUTPUTS_DIR / "counter.txt").read_text()) >= 5
    code, text, _ = run_cli(
        "verify", out, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, text
    assert _with_token(token) == []


def _release(host, job_id: str) -> None:
    """Let a job's waiting cell go on: write go.flag into its working copy, through its kernel's root."""
    sandbox_uid = host.host.jobs[job_id].sandbox_uid
    for pid, _started in process_tree(host.host.jobs[job_id].proc.pid):
        if _uid(pid) == sandbox_uid:
            try:
                Path(f"/proc/{pid}/root/workspace/go.flag").write_text("go")
                return
            except OSError:
                continue
    raise AssertionError(f"no sandbox process found for {job_id}")


WAIT_CELL = "import os, time\nwhile not os.path.exists('go.flag'):\n    time.sleep(0.05)"


def test_concurrent_jobs_do_not_see_each_other(tmp_path, store, host, make_notebook):
    """Two jobs running at the same time (both held in a waiting cell, then released one by one) each see
    only their own working copy, /data and processes: the other's working copy is nowhere, the other's
    decrypted /data file cannot be opened at its host path, and only one real.csv exists in each."""
    a_nb = make_notebook(
        ["open('/data/acme/insurance/real.csv').readline()\nopen('mine-a.txt', 'w').write('a')", WAIT_CELL],
        workspace="a",
    )
    (tmp_path / "ta").mkdir()
    (tmp_path / "tb").mkdir()
    ja, ga, ba, _a_key = _grant_and_bundle(store, a_nb, tmp_path / "ta")
    # Where A's decrypted file is on the host side (inside A's private mount namespace only).
    a_data = host.host.cfg.scratch_root / ja / "data" / "acme" / "insurance" / "real.csv"
    b_src = (
        "import os, json\n"
        "found, csvs = [], []\n"
        "for root, dirs, files in os.walk('/'):\n"
        "    dirs[:] = [d for d in dirs if root != '/' or d not in ('proc', 'sys', 'dev')]\n"
        "    found += [os.path.join(root, f) for f in files if f == 'mine-a.txt']\n"
        "    csvs += [os.path.join(root, f) for f in files if f == 'real.csv']\n"
        "def attempt(path):\n"
        "    try:\n"
        "        open(path).read(1)\n"
        "        return 'SUCCEEDED'\n"
        "    except OSError as e:\n"
        "        return 'failed: ' + type(e).__name__\n"
        "seen = {'procs': sorted(p for p in os.listdir('/proc') if p.isdigit()),\n"
        "        'other_work': found, 'csvs': csvs,\n"
        "        'other_data': attempt(" + repr(str(a_data)) + "),\n"
        "        'own_data': attempt('/data/acme/insurance/real.csv'),\n"
        "        'spool': os.path.exists(" + repr(str(host.state / "spool")) + ")}\n"
        "json.dump(seen, open('seen.json', 'w'))"
    )
    b_nb = make_notebook(["x = 1", WAIT_CELL, b_src], workspace="b")
    jb, gb, bb, b_key = _grant_and_bundle(store, b_nb, tmp_path / "tb")
    host.client.launch(ga, ba)
    host.client.launch(gb, bb)
    # Overlap: both are in their waiting cell at once, so both have their data decrypted and a kernel.
    deadline = time.monotonic() + 120
    while True:
        a, b = host.client.status(ja), host.client.status(jb)
        if a["cell"] == [1, 2] and b["cell"] == [1, 3]:
            break
        assert not ({a["state"], b["state"]} & contract.TERMINAL_STATES), (a, b)
        assert time.monotonic() < deadline, (a, b)
        time.sleep(0.05)
    _release(host, jb)
    b = _wait_state(host.client, jb, contract.TERMINAL_STATES)
    assert host.client.status(ja)["cell"] == [1, 2]  # A still waits: B ran its probe while A was running
    _release(host, ja)
    a = _wait_state(host.client, ja, contract.TERMINAL_STATES)
    assert a["state"] == b["state"] == "succeeded", (a, b)
    out = tmp_path / "b-out"
    host.client.result(jb, out)
    open_dir(out / contract.SEALED_OUTPUTS_FILE, out / "outputs", b_key, jb)
    seen = json.loads((out / "outputs" / "seen.json").read_text())
    assert seen["other_work"] == []
    assert seen["own_data"] == "SUCCEEDED"
    assert seen["other_data"].startswith("failed"), seen
    assert seen["csvs"] == ["/data/acme/insurance/real.csv"]
    assert seen["spool"] is False
    # Its own PID namespace: the kernel and its few helpers, not the host's or the other job's processes.
    assert len(seen["procs"]) < 10


def test_modified_enclave_code_changes_measurement_and_key_is_refused(tmp_path, store, host, make_notebook):
    """Changing one byte of the installed enclave code changes the measurement; the broker then refuses
    the key, the job fails naming the condition, and no plaintext is left anywhere."""
    before = host.host.measurement()
    target = host.host.image_dir / "dcr_enclave" / "formats" / "contract.py"
    os.chmod(target, 0o644)
    data = target.read_bytes()
    target.write_bytes(data + b"\n")
    os.chmod(target, 0o444)
    after = host.host.measurement()
    assert before != after
    nb = make_notebook(SUMMARY_CELLS)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    assert "enclave" in job["failure"]["reason"] and "digest" in job["failure"]["reason"]
    audit = (host.state / "audit.log").read_text()
    assert "key_refused" in audit and "key_released" not in audit
    assert _no_plaintext_anywhere([host.state, Path("/dev/shm")], REAL_ROW) == []


def test_grant_signed_by_another_key_is_refused(tmp_path, store, host, make_notebook):
    """A grant signed by a key the host does not trust is refused at launch, and nothing is spooled."""
    nb = make_notebook(SUMMARY_CELLS)
    _job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path, key=generate_key())
    with pytest.raises(DCRError, match="grant"):
        host.client.launch(grant, bundle)
    assert list((host.state / "spool").iterdir()) == []


def _scratch_device(pid: int, scratch: Path) -> str:
    """``major:minor`` of the tmpfs mounted on ``scratch`` in the mount namespace of ``pid``."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(scratch):
            return fields[2]
    raise AssertionError(f"{scratch} is not mounted in the namespace of {pid}")


def _views_of_device(device: str) -> list[tuple[int, str, str]]:
    """Every view, in any process, of a dcr-scratch tmpfs with that device number: (pid, the directory of
    the tmpfs shown, where it is mounted)."""
    views = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "mountinfo").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.split()
            tail = line.split(" - ", 1)[1].split() if " - " in line else []
            if fields[2] == device and tail[:2] == ["tmpfs", "dcr-scratch"]:
                views.append((int(entry.name), fields[3], fields[4]))
    return views


def _mark_views(holder: int, scratch: Path, views: list[tuple[int, str, str]], token: str) -> None:
    """Writes ``token`` into every directory of the tmpfs that a view shows, through the holder's namespace:
    a device number is reused by the next tmpfs mounted anywhere (another test's), the token is not."""
    for root in {r for _pid, r, _mountpoint in views}:
        shown = Path(f"/proc/{holder}/root{scratch}") / root.lstrip("/")
        if shown.is_dir():
            (shown / MARK).write_text(token)


def _held_views(device: str, token: str, before: list[tuple[int, str, str]]) -> list[str]:
    """The views of that device that are of the marked tmpfs: a directory holding ``token``, or a file bound
    alone from the same place to the same place as before (its place in the tmpfs has a random name)."""
    files = {(root, mountpoint) for _pid, root, mountpoint in before}
    held = []
    for pid, root, mountpoint in _views_of_device(device):
        shown = Path(f"/proc/{pid}/root{mountpoint}")
        try:
            if shown.is_dir():
                ours = (shown / MARK).read_text() == token
            else:
                ours = (root, mountpoint) in files and root != "/"
        except OSError:  # another tmpfs, or the process is gone
            continue
        if ours:
            held.append(f"{pid}: {root} on {mountpoint}")
    return held


MARK = ".dcr-test-held"


@pytest.mark.parametrize("how", ["cancel", "kill-9"])
def test_no_plaintext_after_cancel_or_kill(tmp_path, store, host, make_notebook, how):
    """After cancel, and after `kill -9` of the supervisor mid-run, the job ends, every process of its tree
    (supervisor, bwrap, kernel, its children) is gone, no mount namespace still holds its scratch tmpfs, and
    no plaintext remains on disk or in /dev/shm."""
    nb = make_notebook(
        [
            "import shutil, subprocess\nshutil.copy('/data/acme/insurance/real.csv', 'copy.csv')\n"
            "subprocess.Popen(['sleep', '600'], start_new_session=True)",
            "import time\ntime.sleep(120)",
        ]
    )
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        j = host.client.status(job_id)
        if j["cell"] and j["cell"][0] == 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"job never reached its second cell: {j}")
    proc = host.host.jobs[job_id].proc
    assert proc is not None
    tree = process_tree(proc.pid)
    assert len(tree) >= 4, tree  # supervisor, bwrap and its namespace init, kernel, sleep
    scratch = host.host.cfg.scratch_root / job_id
    device = _scratch_device(proc.pid, scratch)
    views = _views_of_device(device)
    assert {pid for pid, _root, _mountpoint in views} >= {
        proc.pid
    }  # this scan finds the namespaces holding it
    token = secrets.token_hex(16)
    _mark_views(proc.pid, scratch, views, token)
    assert len(_held_views(device, token, views)) == len(views)  # every view is found again
    if how == "cancel":
        assert host.client.cancel(job_id)["state"] == "cancelled"
    else:
        os.kill(proc.pid, signal.SIGKILL)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == ("cancelled" if how == "cancel" else "failed")

    def leftover() -> list[tuple[int, int]]:
        return [(pid, started) for pid, started in tree if _alive(pid, started)]

    # A cancel is answered once the tree is gone; after a kill -9 the sandbox dies with its parent, which
    # the kernel carries out a moment later.
    deadline = time.monotonic() + (0 if how == "cancel" else 30)
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover() == []
    assert _held_views(device, token, views) == []
    # The notebook had copied the real file into its working copy: that copy lived on the supervisor's
    # private tmpfs and is gone with it.
    assert _no_plaintext_anywhere([host.state, Path("/dev/shm")], REAL_ROW) == []


def test_replayed_key_request_is_refused(tmp_path, store, host):
    """A key request that reuses a challenge (same token, same challenge) is refused the second time,
    and both the release and the refusal are in the audit log."""
    from dcr_enclave.platform.signer import local_claims, sign_token

    h = host.host
    hub_key = load_or_create_key(store.hub_key_path)
    st = Store(store.root)
    manifest = st.versions(store.provider, store.dataset)[-1]
    job_id = contract.new_job_id()
    _priv, pub = generate_keypair()
    digest = "sha256:" + "ab" * 32
    grant = issue_grant(
        hub_key, user="t", job_id=job_id, bundle_digest=digest,
        datasets=[GrantedDataset(store.provider, store.dataset, manifest.version, "auto")], output_public_key=pub,
    )  # fmt: skip
    launched = verify_grant(grant, [public_jwk(hub_key)], hub_key_thumbprint=thumbprint(public_jwk(hub_key)))
    h.ledger.record(launched.grant_id, job_id)  # as a launch records it
    challenge = h.broker.new_challenge(job_id)
    env = {
        contract.ENV.JOB_ID: job_id,
        contract.ENV.BUNDLE_DIGEST: digest,
        contract.ENV.HUB_KEY_THUMBPRINT: public_jwk(hub_key)["kid"],
    }
    token = sign_token(
        local_claims(
            image_digest=h.measurement(), env=env, audience=contract.KEY_RELEASE_AUDIENCE, nonces=[challenge]
        ),
        h.signer,
        kid=public_jwk(h.signer)["kid"],
    )
    req = {
        "provider": store.provider, "dataset": store.dataset, "version": manifest.version,
        "wrapped_key": manifest.key.to_json(), "token": token, "grant": grant,
        "hub_jwks": [public_jwk(hub_key)], "challenge": challenge,
    }  # fmt: skip
    key, _cond = h.broker.release(dict(req), job_id=job_id)
    assert len(key) == 32
    with pytest.raises(DCRError, match="replay"):
        h.broker.release(dict(req), job_id=job_id)
    # A grant signed by another key, with the request's JWKS swapped to that key, is refused too.
    other = generate_key()
    forged = issue_grant(
        other, user="t", job_id=job_id, bundle_digest=digest,
        datasets=[GrantedDataset(store.provider, store.dataset, manifest.version, "auto")], output_public_key=pub,
    )  # fmt: skip
    c2 = h.broker.new_challenge(job_id)
    token2 = sign_token(
        local_claims(
            image_digest=h.measurement(), env=env, audience=contract.KEY_RELEASE_AUDIENCE, nonces=[c2]
        ),
        h.signer,
        kid=public_jwk(h.signer)["kid"],
    )
    with pytest.raises(DCRError, match="grant"):
        h.broker.release(
            {**req, "grant": forged, "hub_jwks": [public_jwk(other)], "token": token2, "challenge": c2},
            job_id=job_id,
        )
    events = [json.loads(line)["event"] for line in (host.state / "audit.log").read_text().splitlines()]
    assert events.count("key_released") == 1 and events.count("key_refused") == 2


def test_review_grant_without_airlock_is_refused_before_any_key(tmp_path, store, host, make_notebook):
    """A grant that puts outputs under review but names no airlock key is refused by the supervisor before it
    asks for a single key: sealing held outputs to the researcher's own key would skip the review."""
    nb = make_notebook(SUMMARY_CELLS)
    hub_key = load_or_create_key(store.hub_key_path)
    bundle_path = tmp_path / "bundle.tar"
    bundle = build_bundle(nb, bundle_path)
    version = Store(store.root).versions(store.provider, store.dataset)[-1].version
    _private, public = generate_keypair()
    job_id = contract.new_job_id()
    grant = issue_grant(
        hub_key, user="t", job_id=job_id, bundle_digest=bundle.digest,
        datasets=[GrantedDataset(store.provider, store.dataset, version, "review")], output_public_key=public,
    )  # fmt: skip
    host.client.launch(grant, bundle_path)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    assert "airlock" in job["failure"]["reason"]
    audit = (host.state / "audit.log").read_text()
    assert "key_released" not in audit and "key_refused" not in audit


# ---------------------------------------------------------------------------------------------------------
# Outputs: what Supervisor.collect takes, and what a refusal says
# ---------------------------------------------------------------------------------------------------------


def _collect(
    tmp_path: Path,
    make_notebook,
    change,
    limits: OutputLimits,
    name: str = "collect",
    details: list | None = None,
) -> tuple[list[str], dict[str, bytes]]:
    """Unpack a bundle (notebook + input.csv) as the supervisor does, let ``change`` play the run on the
    working copy, then collect under ``limits``; returns the violation kinds and the copied outputs (the
    reviewers' details are appended to ``details`` when given)."""
    nb = make_notebook(["1"], workspace=name)
    (nb.parent / "input.csv").write_text("a,b\n1,2\n")
    bundle_path = tmp_path / f"{name}.tar"
    bundle = build_bundle(nb, bundle_path)
    scratch = tmp_path / f"{name}-scratch"
    scratch.mkdir()
    sup = Supervisor(cast(Any, None), cast(Any, None), scratch, (65534, 65534))
    manifest = extract_bundle(bundle_path, sup.work, expected_digest=bundle.digest)
    change(sup.work)
    sup.outputs.mkdir()
    key = generate_key()
    job_id = contract.new_job_id()
    token = issue_grant(
        key, user="t", job_id=job_id, bundle_digest=bundle.digest,
        datasets=[GrantedDataset("acme", "insurance", "sha256:" + "0" * 64, "auto")],
        output_public_key=generate_keypair()[1], output_limits=limits,
    )  # fmt: skip
    jwk = public_jwk(key)
    g = verify_grant(
        token, [jwk], hub_key_thumbprint=thumbprint(jwk), job_id=job_id, bundle_digest=bundle.digest
    )
    check = sup.collect(manifest, g)
    if details is not None:
        details.extend(check.details)
    violations = check.kinds
    outputs = {
        p.relative_to(sup.outputs).as_posix(): p.read_bytes() for p in sup.outputs.rglob("*") if p.is_file()
    }
    return violations, outputs


def test_collect_takes_new_and_changed_files_not_unchanged_inputs(tmp_path, make_notebook):
    """Outputs are the executed notebook plus the files the run created or changed; an input left as it
    was is not an output."""

    def run(work: Path) -> None:
        (work / "result.csv").write_text("x\n1\n")
        (work / "plots").mkdir()
        (work / "plots" / "fig.png").write_bytes(b"\x89PNG")

    violations, outputs = _collect(tmp_path, make_notebook, run, OutputLimits())
    assert violations == []
    assert sorted(outputs) == ["analysis.ipynb", "plots/fig.png", "result.csv"]

    def change_input(work: Path) -> None:
        (work / "input.csv").write_text("a,b\n3,4\n")

    violations, outputs = _collect(tmp_path, make_notebook, change_input, OutputLimits(), name="again")
    assert violations == []
    assert outputs["input.csv"] == b"a,b\n3,4\n"


def test_collect_refuses_links_special_files_and_unusable_names(tmp_path, make_notebook):
    """Symbolic links (to files or directories), FIFOs and sockets, and names the receipt cannot carry
    (control characters, backslashes, not UTF-8) refuse the outputs; the violations count them by kind and
    name none of them, and nothing is copied."""
    secret = "row7_4449.462"

    def run(work: Path) -> None:
        (work / f"{secret}.csv").symlink_to("/etc/hostname")
        (work / f"dir-{secret}").symlink_to("/etc")
        os.mkfifo(work / f"fifo-{secret}")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(work / f"s-{secret}"))
        sock.close()
        (work / f"ctl\n{secret}.csv").write_text("x")
        (work / f"back\\{secret}.csv").write_text("x")
        (work / os.fsdecode(b"bad\xff" + secret.encode() + b".csv")).write_text("x")
        (work / "fine.csv").write_text("x")

    details: list[str] = []
    violations, outputs = _collect(tmp_path, make_notebook, run, OutputLimits(), details=details)
    assert violations == ["symbolic links present", "special files present", "names that cannot be outputs"]
    assert outputs == {}
    # the counts are for reviewers only, and never a name
    assert details == ["2 symbolic link(s)", "2 special file(s)", "3 file(s) with unusable names"]
    assert not any("4449" in v or "row7" in v for v in violations + details)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (OutputLimits(max_files=2), ["over the file limit"]),
        (OutputLimits(max_files=3), []),
        (OutputLimits(max_bytes=1000), ["over the byte limit"]),
        (OutputLimits(max_bytes=-1), ["over the byte limit"]),  # SIZE - 1: one byte over
        (OutputLimits(max_bytes=0), []),  # exactly SIZE: at the limit is allowed
        (OutputLimits(allowed_suffixes=(".csv", ".ipynb")), ["file types the grant does not allow"]),
        (OutputLimits(allowed_suffixes=(".csv", ".png", ".ipynb")), []),
        (
            OutputLimits(max_files=1, allowed_suffixes=(".ipynb",)),
            ["file types the grant does not allow", "over the file limit"],
        ),
    ],
    ids=[
        "max-files",
        "files-at-limit",
        "max-bytes",
        "one-byte-over",
        "bytes-at-limit",
        "suffixes",
        "suffixes-ok",
        "several",
    ],
)
def test_collect_applies_the_grant_output_limits(tmp_path, make_notebook, limits, expected):
    """Past the grant's max_files or max_bytes, or with a suffix it does not allow, the outputs are refused
    (nothing is copied) and each violation gives its kind with the count and the limit, never a name."""

    def run(work: Path) -> None:
        (work / "a.csv").write_text("x" * 600)
        (work / "sub").mkdir()  # subdirectories are checked like the top level
        (work / "sub" / "b-4449.462.png").write_bytes(b"y" * 600)

    if limits.max_bytes <= 0:  # relative to the outputs' exact size, known once the bundle is unpacked
        probe, _ = _collect(tmp_path, make_notebook, run, OutputLimits(), name="probe")
        assert probe == []
        total = 1200 + (tmp_path / "probe" / "analysis.ipynb").stat().st_size
        limits = OutputLimits(max_bytes=total + limits.max_bytes)
    details: list[str] = []
    violations, outputs = _collect(tmp_path, make_notebook, run, limits, details=details)
    assert violations == expected
    if expected:
        assert outputs == {}
    else:
        assert sorted(outputs) == ["a.csv", "analysis.ipynb", "sub/b-4449.462.png"]
    assert not any("4449" in v or "600" in v or "1200" in v for v in violations)


def test_output_violations_never_name_files(
    tmp_path, store, host, make_notebook, run_cli, insurance_real, caplog
):
    """A notebook (in review mode) that names a symbolic link, a file of a refused type and a file with a
    control character after a value of the real data gets its outputs rejected; the value appears nowhere:
    not in receipt.json, the host's job status and failure reason, the audit log, the host's log (whose end
    line carries the fixed reason code) or anything in the host's state directory. The receipt still
    verifies."""
    caplog.set_level(logging.INFO, logger="dcr_enclave.host")
    row = insurance_real.read_text().splitlines()[1]
    secret = row.replace(",", "_")
    charges = row.rsplit(",", 1)[1]
    cells = [
        "import os\n"
        "row = open('/data/acme/insurance/real.csv').read().splitlines()[1]\n"
        "name = row.replace(',', '_')\n"
        "os.symlink('/data/acme/insurance/real.csv', 'link-' + name)\n"
        "open(name + '.bin', 'w').write('x')\n"
        "open('ctl\\n' + name + '.csv', 'w').write('x')\n"
        "open('summary.csv', 'w').write('fine')"
    ]
    nb = make_notebook(cells)
    _airlock_private, airlock_public = generate_keypair()
    job_id, grant, bundle, _key = _grant_and_bundle(
        store, nb, tmp_path, release="review", airlock_public_key=airlock_public,
        output_limits=OutputLimits(allowed_suffixes=(".csv", ".ipynb")),
    )  # fmt: skip
    host.client.launch(grant, bundle)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    expected = [
        "symbolic links present",
        "names that cannot be outputs",
        "file types the grant does not allow",
    ]
    assert job["failure"]["reason"] == "outputs refused: " + "; ".join(expected)
    out = tmp_path / "out"
    host.client.result(job_id, out)
    receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
    assert receipt["output_check"] == {"passed": False, "violations": expected, "disclosure": []}
    assert receipt["release"]["decision"] == "rejected"
    assert receipt["outputs"] == []
    assert not (out / contract.SEALED_OUTPUTS_FILE).exists()
    for value in (secret, charges):
        assert value not in (out / contract.RECEIPT_FILE).read_text()
        assert value not in json.dumps(host.client.status(job_id))
        assert value not in json.dumps(host.client.jobs())
        assert value not in (host.state / "audit.log").read_text()
        assert value not in caplog.text
        assert _no_plaintext_anywhere([host.state, out], value.encode()) == []
    ends = [r.getMessage() for r in caplog.records if f"job={job_id} event=end " in r.getMessage()]
    assert len(ends) == 1 and ends[0].endswith(" state=failed reason=outputs_refused"), ends
    code, text, _ = run_cli(
        "verify", out, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, text


# ---------------------------------------------------------------------------------------------------------
# Provider key material: root-only storage, enforced
# ---------------------------------------------------------------------------------------------------------


def _host_config(tmp_path: Path, store, keys: Path) -> HostConfig:
    hub_key = load_or_create_key(store.hub_key_path)
    return HostConfig(
        state_dir=tmp_path / "new-state",
        socket_path=tmp_path / "new.sock",
        store=store.root,
        keys_dir=keys,
        hub_keys=[public_jwk(hub_key)],
    )


@pytest.mark.parametrize("how", ["group-readable", "other-owner", "link", "missing"])
def test_host_refuses_keys_dir_that_is_not_root_only(tmp_path, store, how):
    """The enclave host does not start on a keys directory that is not a root-owned directory closed to
    group and others (or is a link, or is missing): the message names it and the fix, and the host
    creates nothing (no state directory)."""
    keys = store.keys
    if how == "group-readable":
        os.chmod(keys, 0o750)
    elif how == "other-owner":
        os.chown(keys, 65534, 65534)
    elif how == "link":
        keys = tmp_path / "keys-link"
        keys.symlink_to(store.keys)
    else:
        keys = tmp_path / "no-such-keys"
    cfg = _host_config(tmp_path, store, keys)
    with pytest.raises(DCRError, match="key directory") as err:
        EnclaveHost(cfg).prepare()
    assert str(keys) in str(err.value)
    hint = {
        "group-readable": "chmod 700",
        "other-owner": "chown",
        "link": "real path",
        "missing": "provider add",
    }
    assert hint[how] in str(err.value)
    assert not cfg.state_dir.exists()


def _break_condition_link(keys: Path) -> None:
    cond = keys / "acme" / "conditions" / "insurance.json"
    moved = keys / "moved.json"
    cond.rename(moved)
    cond.symlink_to(moved)


def _break_condition_owner(keys: Path) -> None:
    os.chown(keys / "acme" / "conditions" / "insurance.json", 65534, 65534)


def _break_keys_dir_mode(keys: Path) -> None:
    os.chmod(keys, 0o755)


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_condition_link, "link"),
        (_break_condition_owner, "owned by uid 65534"),
        (_break_keys_dir_mode, "closed to group and others"),
    ],
    ids=["condition-link", "condition-owner", "keys-dir-mode"],
)
def test_broker_reads_conditions_only_from_root_only_storage(
    tmp_path, store, host, make_notebook, breaker, message
):
    """The key broker reads a provider's condition as it reads KEKs: a condition that is a link or not
    owned by root, or a keys directory opened to others after the host started, refuses the key release
    with the reason (in the job's failure and the audit log), and the job gets no data."""
    assert host.host.broker.condition(store.provider, store.dataset).dataset == store.dataset
    breaker(store.keys)
    with pytest.raises(DCRError, match=message):
        host.host.broker.condition(store.provider, store.dataset)
    nb = make_notebook(SUMMARY_CELLS)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    assert "key release refused" in job["failure"]["reason"] and message in job["failure"]["reason"]
    audit = (host.state / "audit.log").read_text()
    assert "key_refused" in audit and "key_released" not in audit
    # The kernel had been started alongside the key release; it never ran a cell, the job never ran.
    events = host.host.jobs[job_id].events
    assert [e["state"] for e in events if "state" in e] == ["launching", "failed"]
    assert not any("cell" in e for e in events)


def test_running_means_the_kernel_started_on_decrypted_data(tmp_path, store, host, make_notebook):
    """The job becomes "running" only once its data key was released and its kernel is up in the sandbox
    (a process of the sandbox account in the supervisor's tree), and before any cell is announced; then
    the cells, "checking" and "succeeded" follow."""
    nb = make_notebook(SUMMARY_CELLS)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    proc = _wait_supervisor(host, job_id)
    order: list[object] = []
    at_running: dict[str, object] = {}
    for msg in host.client.watch(job_id):
        ev = msg.get("event", {})
        if "state" in ev:
            order.append(ev["state"])
        if ev.get("cell"):
            order.append(tuple(ev["cell"]))
        if ev.get("state") == "running":
            audit = [json.loads(line) for line in (host.state / "audit.log").read_text().splitlines()]
            at_running["released"] = any(
                a["event"] == "key_released" and a["job_id"] == job_id for a in audit
            )
            sandbox_uid = host.host.jobs[job_id].sandbox_uid
            at_running["kernel"] = any(_uid(pid) == sandbox_uid for pid, _ in process_tree(proc.pid))
    assert at_running == {"released": True, "kernel": True}
    assert order == ["launching", "running", (0, 2), (1, 2), "checking", "succeeded"]


def test_manifest_with_a_file_entry_removed_is_refused_before_decryption(
    tmp_path, store, host, make_notebook, run_cli, insurance_real, insurance_synthetic
):
    """A storage attacker removes one file's entry from the newest version's manifest (its ciphertext stays)
    and the notebook reads only the other file, so the job would otherwise run on part of the data. The
    supervisor checks the manifest's file-list MAC under the released key and fails the job with a reason
    naming the dataset: no cell runs, it never becomes "running", no plaintext is left anywhere. A v1
    manifest without the MAC is refused with the advice to re-register with `dcr provider add`."""
    (tmp_path / "in").mkdir()
    extra_real = tmp_path / "in" / "regions.csv"
    extra_real.write_text("region,code\nnorth,fa1cbe11\n")
    extra_syn = tmp_path / "in" / "regions-syn.csv"
    extra_syn.write_text("region,code\neast,d00dfeed\n")
    code, _o, err = run_cli(
        "provider", "add", "--store", store.root, "--provider", "acme", "--dataset", "insurance",
        "--real", insurance_real, "--synthetic", insurance_synthetic, "--real", extra_real, "--synthetic", extra_syn,
    )  # fmt: skip
    assert code == 0, err
    st = Store(store.root)
    manifest = st.versions(store.provider, store.dataset)[-1]
    assert [f.name for f in manifest.files] == ["real.csv", "regions.csv"]
    path = st.version_dir(store.provider, store.dataset, manifest.version) / "manifest.json"
    original = manifest.to_json()

    def drop_entry(doc: dict) -> None:
        doc["files"].pop()

    def as_v1(doc: dict) -> None:
        doc["schema"] = "dcr/dataset-version/v1"
        del doc["files_mac"]

    for change, message in ((drop_entry, "does not authenticate"), (as_v1, "dcr provider add")):
        doc = json.loads(json.dumps(original))
        change(doc)
        path.write_text(json.dumps(doc))
        nb = make_notebook(SUMMARY_CELLS, workspace=change.__name__)
        (tmp_path / f"bundle-{change.__name__}").mkdir()
        job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path / f"bundle-{change.__name__}")
        host.client.launch(grant, bundle)
        job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
        assert job["state"] == "failed", job
        reason = job["failure"]["reason"]
        assert "acme/insurance" in reason and message in reason, reason
        events = host.host.jobs[job_id].events
        assert "running" not in [e.get("state") for e in events]
        assert not any("cell" in e for e in events)
    assert _no_plaintext_anywhere([host.state, Path("/dev/shm")], REAL_ROW) == []
    assert _no_plaintext_anywhere([host.state, Path("/dev/shm")], b"fa1cbe11") == []


def test_a_time_limit_failure_names_the_limit_and_the_cell(tmp_path, store, host, make_notebook):
    """A notebook that runs past its grant's time limit fails with a reason naming the limit (a value the
    grant sets) and the cell the report carries anyway, nothing the notebook chose besides."""
    nb = make_notebook(["x = 1", "import time\ntime.sleep(600)"])
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path, time_limit=15)
    host.client.launch(grant, bundle)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    assert job["failure"] == {"reason": "time limit of 15 s reached in cell 2", "cell": 1, "ename": None}


def test_a_chosen_synthetic_name_is_the_name_in_both_stages(
    tmp_path, make_notebook, run_cli, insurance_real, insurance_synthetic
):
    """`dcr provider add --synthetic-name claims.csv`: the store holds the synthetic file (and the encrypted
    real one) under that name, the hub shows it in the sandbox at /data/acme/insurance/claims.csv, and a
    notebook reading that very path under `dcr local-run` reads the real rows; the real file's own name
    appears in neither stage."""
    from traitlets.config import Config

    from dcr_spawner.policy import DCRPolicy

    root = tmp_path / "store"
    code, out, err = run_cli(
        "provider", "add", "--store", root, "--provider", "acme", "--dataset", "insurance",
        "--real", insurance_real, "--synthetic", insurance_synthetic, "--synthetic-name", "claims.csv",
        "--release", "auto",
    )  # fmt: skip
    assert code == 0, err
    (manifest,) = Store(root).versions("acme", "insurance")
    assert [f.name for f in manifest.files] == ["claims.csv"]
    vdir = Store(root).version_dir("acme", "insurance", manifest.version)
    assert sorted(p.name for p in (vdir / "synthetic").iterdir()) == ["claims.csv"]
    assert (vdir / "synthetic" / "claims.csv").read_bytes() == insurance_synthetic.read_bytes()
    assert sorted(p.name for p in (vdir / "real").iterdir()) == ["claims.csv.dcrenc"]
    assert insurance_real.name not in (vdir / "manifest.json").read_text()

    # Programming stage: the hub's policy (from the printed snippet) shows the file under that name.
    section = out[out.index("# ---") : out.index("}\n\n") + 1]
    config = Config()
    exec(section, {"c": config})  # noqa: S102 -- the snippet as jupyterhub_config.py runs it
    policy = DCRPolicy(config=config)
    entry = policy.datasets["acme/insurance"]
    policy.datasets = {"acme/insurance": {**entry, "entitled": {"users": ["alice"]}}}
    policy.validate_against_hub(set())
    (entitlement,) = policy.entitled("alice", set())
    assert entitlement.data_paths() == {"/data/acme/insurance/claims.csv": vdir / "synthetic" / "claims.csv"}

    # Secure stage: the same path holds the real rows.
    nb = make_notebook(["import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/claims.csv')\nlen(df)"])
    run_out = tmp_path / "out"
    code, _o, err = run_cli(
        "local-run", nb, "--store", root, "--out", run_out, "--host-state", tmp_path / "host-state"
    )
    assert code == 0, err
    executed = nbformat.read(run_out / "outputs" / nb.name, as_version=4)
    assert executed.cells[0].outputs[0]["data"]["text/plain"] == str(len(pd.read_csv(insurance_real)))
    assert len(pd.read_csv(insurance_real)) != len(pd.read_csv(insurance_synthetic))
