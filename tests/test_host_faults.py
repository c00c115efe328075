"""No enclave outlives the platform that launched it.

A real ``dcr enclave-host`` (a subprocess) is killed with ``kill -9`` while jobs run on real kernels; a real
``dcr local-run`` is stopped with ``SIGTERM`` (what ``timeout`` sends) or killed with ``SIGKILL`` while its
job runs. Each job's processes (supervisor, sandbox, kernel) are read from the job's cgroup while it runs
and identified by pid *and* start time, so a recycled pid is never taken for a survivor. A host stopped
with SIGTERM removes its socket; every job event is one line of its log. The waits below only bound a
hang; nothing here measures how fast anything happens.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_local_run import _grant_and_bundle, _wait_state
from test_secure_stage import READ

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.formats.jwk import public_jwk
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.pack.bundle_builder import build_bundle
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import load_or_create_key
from dcr_enclave.pack.store import Store
from dcr_enclave.platform.cgroups import JobCgroup
from dcr_enclave.platform.client import HostClient
from dcr_enclave.platform.host import EnclaveHost, HostConfig
from dcr_enclave.platform.measure import save_cache

pytestmark = [pytest.mark.root, pytest.mark.slow]

SCRATCH_ROOT = Path("/run/dcr-enclave")
SLEEPING = [READ, "import time\ntime.sleep(600)"]
Proc = tuple[int, int]


def _start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def job_processes(job_id: str) -> set[Proc]:
    """Every live process in the job's cgroup, as (pid, start time)."""
    found = set()
    for pid in JobCgroup(job_id, memory_bytes=0, max_processes=0).pids():
        if (started := _start_time(pid)) is not None:
            found.add((pid, started))
    return found


def alive(procs: set[Proc]) -> set[Proc]:
    return {(pid, t) for pid, t in procs if _start_time(pid) == t}


def wait_gone(procs: set[Proc], bound: float = 60) -> set[Proc]:
    deadline = time.monotonic() + bound
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def leftovers(state: Path, job_id: str) -> list[str]:
    """What of the job is still on the machine: spool, mount point, cgroup directories."""
    found = [str(p) for p in (state / "spool" / job_id, SCRATCH_ROOT / job_id) if p.exists()]
    found += [str(d) for d in JobCgroup(job_id, memory_bytes=0, max_processes=0).dirs if d.exists()]
    return found


def wait_running_last_cell(client: HostClient, job_id: str, cells: int, bound: float = 180) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        st = client.status(job_id)
        assert st["state"] not in contract.TERMINAL_STATES, st
        if st["state"] == "running" and st["cell"] and st["cell"][0] == cells - 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached its last cell")


class HostProcess:
    """``python -m dcr_enclave enclave-host`` on a state directory and socket of its own."""

    def __init__(self, tmp: Path, store: Any, state: Path) -> None:
        self.state, self.socket = state, tmp / "host.sock"
        self.hub_key_file = tmp / "hub-jwks.json"
        self.hub_key_file.write_text(
            json.dumps({"keys": [public_jwk(load_or_create_key(store.hub_key_path))]})
        )
        self.store = store
        self.log = tmp / "host.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HostClient:
        cache = self.state / "measure-cache.json"
        if not cache.exists():
            # The file digests this process took (the store's condition measured the environment): the
            # host starts without hashing the whole environment again.
            self.state.mkdir(parents=True, exist_ok=True)
            save_cache(cache)
        cmd = [
            sys.executable, "-m", "dcr_enclave", "enclave-host", "--store", str(self.store.root),
            "--hub-key", str(self.hub_key_file), "--state", str(self.state), "--socket", str(self.socket),
            # A test machine: no untrusted account logs in (test_process_visibility.py covers the refusal).
            "--allow-visible-processes",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        client = HostClient(self.socket)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                client.ping()
                return client
            except DCRError:
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def events(self, job_id: str) -> list[str]:
        """The host's log lines about a job, from ``event=`` on."""
        lines = self.log.read_text().splitlines()
        return [line.split(" job=", 1)[1] for line in lines if f" dcr_enclave.host job={job_id} " in line]


@pytest.fixture
def host_process(tmp_path: Path, store: Any) -> Iterator[HostProcess]:
    h = HostProcess(tmp_path, store, tmp_path / "host-state")
    yield h
    if h.proc is not None and h.proc.poll() is None:
        h.stop(signal.SIGKILL)


def test_kill_9_of_the_host_ends_its_jobs_and_the_restart_removes_the_rest(
    tmp_path, store, host_process, make_notebook
):
    """``kill -9`` of the enclave host with two jobs running on their kernels: every process of both jobs
    (supervisor, sandbox, kernel) ends without the host's help, and the restarted host removes their
    spools, mount points and cgroups before it serves; it knows neither job, and logs (and audits) the end
    of each, failed because the host died: one launch, one key release and one end line per job."""
    client = host_process.start()
    jobs, grants = [], {}
    for name in ("a", "b"):
        nb = make_notebook(SLEEPING, workspace=f"ws-{name}")
        (tmp_path / name).mkdir()
        job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path / name)
        grants[job_id] = client.launch(grant, bundle)["grant_id"]
        jobs.append(job_id)
    version = Store(store.root).versions(store.provider, store.dataset)[-1].version
    procs: set[Proc] = set()
    for job_id in jobs:
        wait_running_last_cell(client, job_id, len(SLEEPING))
        mine = job_processes(job_id)
        assert len(mine) >= 3, mine  # the supervisor, bwrap and the kernel at least
        procs |= mine

    assert host_process.stop(signal.SIGKILL) == -signal.SIGKILL
    assert wait_gone(procs) == set()

    client = host_process.start()
    for job_id in jobs:
        assert leftovers(host_process.state, job_id) == []
        with pytest.raises(DCRError, match="no such job"):
            client.status(job_id)
        # The restart records the end the dead host could not, once.
        assert host_process.events(job_id) == [
            f"{job_id} event=launch user=tester uid=0 grant={grants[job_id]}",
            f"{job_id} event=key_released user=tester grant={grants[job_id]} dataset=acme/insurance "
            f"version={version}",
            f"{job_id} event=end grant={grants[job_id]} state=failed reason=host_died",
        ]
    assert list((host_process.state / "spool").iterdir()) == []
    assert host_process.stop() == 0


def test_a_host_logs_each_job_event_once_publishes_its_digest_and_removes_its_socket(
    tmp_path, store, host_process, make_notebook, run_cli, insurance_real, insurance_synthetic
):
    """A real host logs one line per job event, ``job=<id> event=<name>`` and ids, user, dataset, state and
    fixed reason codes only: one launch, one key release per dataset and one end (with the final state, and
    for a failure its reason code). Nothing the notebook chose (an output file's name, an exception's message)
    is in its log. ``--print-measurement`` prints the digest the running host reports in ``ping`` and writes
    to ``STATE/public/image-digest``; stopped with SIGTERM, the host exits 0 and its socket is gone."""
    code, _o, err = run_cli(
        "provider", "add", "--store", store.root, "--provider", store.provider, "--dataset", "claims",
        "--real", insurance_real, "--synthetic", insurance_synthetic,
    )  # fmt: skip
    assert code == 0, err
    marker = f"chosen{secrets.token_hex(4)}"
    versions = {d: Store(store.root).versions(store.provider, d)[-1].version for d in ("insurance", "claims")}
    ok_nb = make_notebook([f"open('{marker}.csv', 'w').write('x')"], workspace="ok")
    ok_bundle = build_bundle(ok_nb, tmp_path / "ok.tar")
    ok_job = contract.new_job_id()
    ok_grant = issue_grant(
        load_or_create_key(store.hub_key_path), user="tester", job_id=ok_job, bundle_digest=ok_bundle.digest,
        datasets=[GrantedDataset(store.provider, d, v, "auto") for d, v in versions.items()],
        output_public_key=generate_keypair()[1],
    )  # fmt: skip
    bad_nb = make_notebook([f"raise ValueError('{marker}')"], workspace="bad")
    bad_job, bad_grant, bad_bundle, _key = _grant_and_bundle(store, bad_nb, tmp_path)

    client = host_process.start()
    grants = {ok_job: client.launch(ok_grant, tmp_path / "ok.tar")["grant_id"]}
    grants[bad_job] = client.launch(bad_grant, bad_bundle)["grant_id"]
    assert _wait_state(client, ok_job, contract.TERMINAL_STATES)["state"] == "succeeded"
    assert _wait_state(client, bad_job, contract.TERMINAL_STATES)["state"] == "failed"

    digest = client.ping()["image_digest"]
    public = host_process.state / "public" / "image-digest"
    assert public.read_text() == digest + "\n"
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    printed = subprocess.run(
        [sys.executable, "-m", "dcr_enclave", "enclave-host", "--print-measurement", "--state",
         str(host_process.state)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (printed.returncode, printed.stdout, printed.stderr) == (0, digest + "\n", "")

    assert host_process.stop(signal.SIGTERM) == 0
    assert not host_process.socket.exists() and not host_process.socket.is_symlink()
    launch = "event=launch user=tester uid=0 grant={}"
    assert host_process.events(ok_job) == [
        f"{ok_job} " + launch.format(grants[ok_job]),
        *(
            f"{ok_job} event=key_released user=tester grant={grants[ok_job]} dataset=acme/{d} version={v}"
            for d, v in versions.items()
        ),
        f"{ok_job} event=end user=tester grant={grants[ok_job]} state=succeeded",
    ]
    assert host_process.events(bad_job) == [
        f"{bad_job} " + launch.format(grants[bad_job]),
        f"{bad_job} event=key_released user=tester grant={grants[bad_job]} dataset=acme/insurance "
        f"version={versions['insurance']}",
        f"{bad_job} event=end user=tester grant={grants[bad_job]} state=failed reason=cell_failed",
    ]
    assert marker not in host_process.log.read_text()


def test_a_starting_host_ends_and_removes_what_an_earlier_run_left(tmp_path, make_host):
    """What a host that died left (a job's process still in its cgroup, its mount point and spool) is ended
    and removed by the next host started on that state directory, before it serves. The job's end is
    recorded (failed, ``host_died``); a job whose end the dead host had recorded gets no second one."""
    state = tmp_path / "sweep-state"
    job_id, done_id = contract.new_job_id(), contract.new_job_id()
    (state / "spool" / job_id / "out").mkdir(parents=True)
    (state / "spool" / job_id / "bundle.tar").write_bytes(b"left behind")
    (state / "spool" / done_id / "out").mkdir(parents=True)
    (state / "spool" / done_id / "ended").touch()
    (state / "grants.log").write_text(
        "".join(json.dumps({"grant_id": f"grant-{j}", "job_id": j}) + "\n" for j in (job_id, done_id))
    )
    (SCRATCH_ROOT / job_id).mkdir(parents=True)
    cgroup = JobCgroup(job_id, memory_bytes=256 << 20, max_processes=16)
    cgroup.create()
    survivor = subprocess.Popen(cgroup.enter_command(["sleep", "600"]), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (procs := job_processes(job_id)):
            assert time.monotonic() < deadline, "the survivor never entered its cgroup"
            time.sleep(0.01)

        make_host("sweep")
        assert survivor.wait(timeout=30) == -signal.SIGKILL
        assert alive(procs) == set()
        assert leftovers(state, job_id) == []
        assert list((state / "spool").iterdir()) == []
        audit = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
        assert [{k: v for k, v in e.items() if k != "time"} for e in audit] == [
            {"event": "end", "job_id": job_id, "grant_id": f"grant-{job_id}", "state": "failed",
             "reason_code": "host_died"},
        ]  # fmt: skip
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()
        cgroup.remove()
        if (SCRATCH_ROOT / job_id).exists():
            (SCRATCH_ROOT / job_id).rmdir()


def test_a_second_host_on_a_state_directory_in_use_is_refused(tmp_path, store, host, make_notebook):
    """A host does not start on the state directory of a running host (its start-up sweep would end that
    host's jobs): it is refused, naming the directory, and the running host's job runs on."""
    nb = make_notebook(SLEEPING)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    wait_running_last_cell(host.client, job_id, len(SLEEPING))
    before = job_processes(job_id)
    cfg = HostConfig(
        state_dir=host.state,
        socket_path=tmp_path / "second.sock",
        store=store.root,
        keys_dir=store.keys,
        hub_keys=[public_jwk(load_or_create_key(store.hub_key_path))],
    )
    with pytest.raises(DCRError, match="another enclave host is running") as refused:
        EnclaveHost(cfg).prepare()
    assert str(host.state) in str(refused.value)
    assert alive(before) == before
    assert host.client.status(job_id)["state"] == "running"
    assert (host.state / "spool" / job_id).is_dir()


def _local_run(tmp_path: Path, store: Any, nb: Path, state: Path) -> tuple[subprocess.Popen[str], Path]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cmd = [
        sys.executable, "-m", "dcr_enclave", "local-run", str(nb), "--store", str(store.root),
        "--out", str(tmp_path / "out"), "--host-state", str(state),
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    return proc, tmp


def _follow_until(proc: subprocess.Popen[str], seen: Callable[[str], bool]) -> list[str]:
    assert proc.stderr is not None
    lines = []
    while line := proc.stderr.readline():
        lines.append(line)
        if seen(line):
            return lines
    raise AssertionError("local-run ended first:\n" + "".join(lines))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_local_run_leaves_nothing(tmp_path, store, make_host, make_notebook, sig):
    """``dcr local-run`` stopped (SIGTERM, as ``timeout`` sends) while its job runs cancels the job and
    exits 143, leaving no process, spool, mount point, cgroup, temporary file or output of it. Killed
    (SIGKILL), it takes the job's processes with it, and the next host on that state removes the rest."""
    state = tmp_path / "lr-state"
    nb = make_notebook(SLEEPING)
    proc, tmp = _local_run(tmp_path, store, nb, state)
    try:
        lines = _follow_until(proc, lambda line: line.strip() == f"cell {len(SLEEPING)}/{len(SLEEPING)}")
        job_id = next(w for line in lines for w in line.split() if contract.JOB_ID_RE.match(w))
        procs = job_processes(job_id)
        assert len(procs) >= 3, procs
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(procs) == set()
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM
        assert proc.stderr is not None and "stopped by SIGTERM" in proc.stderr.read()
        assert list(tmp.iterdir()) == []
    else:
        assert rc == -signal.SIGKILL
        make_host("lr")  # the next host on that state directory
    assert leftovers(state, job_id) == []
    assert list((state / "spool").iterdir()) == []
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


# ---------------------------------------------------------------------------------------------------------
# Jobs yield the CPU to the servers and the hub
# ---------------------------------------------------------------------------------------------------------


def test_every_job_process_runs_at_the_jobs_lower_priority(tmp_path, store, host, make_notebook):
    """Every process of a running job (supervisor, sandbox, kernel) runs at the host's job nice value, in a
    cgroup below the jobs' parent group whose CPU weight is the configured one (where this machine has a
    cpu controller)."""
    nb = make_notebook(SLEEPING)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    wait_running_last_cell(host.client, job_id, len(SLEEPING))
    procs = job_processes(job_id)
    assert len(procs) >= 3, procs
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid, _t in procs} == {host.host.cfg.job_nice} == {10}
    cgroup = JobCgroup(job_id, memory_bytes=0, max_processes=0)
    if cgroup.cpu_dir is not None:
        assert {pid for pid, _t in procs} <= set(
            map(int, (cgroup.cpu_dir / "cgroup.procs").read_text().split())
        )
        if cgroup.version == 2:
            assert (cgroup.cpu_dir.parent / "cpu.weight").read_text().strip() == "10"
        else:
            assert (cgroup.cpu_dir.parent / "cpu.shares").read_text().strip() == "102"


def test_a_notebook_cannot_raise_its_priority(tmp_path, store, host, make_notebook):
    """The kernel's account cannot lower its nice value back (no CAP_SYS_NICE, RLIMIT_NICE 0): the attempt
    fails in the cell with PermissionError and the job fails there."""
    nb = make_notebook(["import os\nos.setpriority(os.PRIO_PROCESS, 0, 0)"])
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    deadline = time.monotonic() + 180
    while (job := host.client.status(job_id))["state"] not in contract.TERMINAL_STATES:
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["state"] == "failed"
    assert (job["failure"]["cell"], job["failure"]["ename"]) == (0, "PermissionError")
