"""``dcr enclave-host``: the local simulation of the TEE platform, as one root-owned daemon.

It plays, on one machine, what Google Cloud provides around Confidential Space:

* **the VM and launcher**: it runs the supervisor from a root-owned, read-only install of this package
  whose files it measures; that measurement is the enclave's "image digest";
* **attestation**: it signs tokens with its own key (Confidential Space claims, ``hwmodel``
  ``LOCAL_SIMULATED``, ``dbgstat`` ``enabled``) and publishes the JWKS;
* **the providers' key release**: :class:`~dcr_enclave.platform.broker.KeyBroker`.

It is a **simulation**: the same code paths and process isolation, no memory encryption. Its tokens say so.

Clients talk to it on a unix socket with one JSON object per line (see :mod:`dcr_enclave.platform.client`).
Launching needs a grant signed by a hub key the host trusts; every other request about a job is answered
only to root or the account that launched it (checked with ``SO_PEERCRED``), and ``grant_states`` and
``events`` only to root.

Each job event (launch, key release, end) is an audit record and one log line,
``job=<id> event=<name> key=value ...`` (see :func:`dcr_enclave.platform.broker.log_line`), and an entry
of the event journal ``<state>/events.jsonl`` (:mod:`dcr_enclave.platform.journal`: structured fields
only, with a host-run id and a sequence number), which the hub reads with the root-only ``events`` op
(``{"after": cursor}`` -> ``{"events", "cursor", "more"}``) into its audit trail.
"""

from __future__ import annotations

import base64
import compileall
import contextlib
import fcntl
import json
import logging
import math
import os
import py_compile
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import Grant, verify_grant
from dcr_enclave.formats.jwk import PrivateKey, jwks, public_jwk, thumbprint
from dcr_enclave.formats.messages import MAX_MESSAGE, decode, encode
from dcr_enclave.pack.signing_keys import load_or_create_key
from dcr_enclave.platform.broker import AuditLog, KeyBroker
from dcr_enclave.platform.cgroups import JobCgroup
from dcr_enclave.platform.grant_ledger import GrantLedger
from dcr_enclave.platform.journal import HostJournal
from dcr_enclave.platform.key_store import check_private_dir
from dcr_enclave.platform.measure import (
    MEASURED_PARTS,
    combine,
    environment_manifest,
    load_cache,
    measure_tree,
    package_root,
    save_cache,
)
from dcr_enclave.platform.sandbox_ids import DEFAULT_COUNT, DEFAULT_FIRST, SandboxIds
from dcr_enclave.platform.signer import local_claims, sign_token

log = logging.getLogger("dcr_enclave.host")

#: Bundles larger than this are refused at launch.
MAX_BUNDLE_BYTES = 2 * 2**30
#: Grant ids one ``grant_states`` request may ask about.
MAX_GRANT_STATES = 1000
#: Written into a job's spool when its end is recorded: the start-up sweep records no second end for it.
_ENDED_MARK = "ended"


class EndReason:
    """The fixed reason codes a failed job's ``end`` record and log line carry instead of its failure's
    text (a supervisor reports failures after the notebook ran)."""

    #: The host stopped the enclave past the grant's time limit.
    TIME_LIMIT = "time_limit"
    #: A process of the job was killed at the job's memory limit.
    MEMORY_LIMIT = "memory_limit"
    #: The output check refused the outputs.
    OUTPUTS_REFUSED = "outputs_refused"
    #: The supervisor reported a failure that names a cell (an exception, or the time limit, in it).
    CELL_FAILED = "cell_failed"
    #: The supervisor reported any other failure (grant, bundle, sandbox, key release, outputs).
    ENCLAVE_FAILED = "enclave_failed"
    #: The supervisor ended without a receipt or a report.
    ENCLAVE_EXIT = "enclave_exit"
    #: The host could not start or follow the job (an error of the host's own).
    HOST_ERROR = "host_error"
    #: The host was stopped while the job ran (it ends every job).
    HOST_STOPPED = "host_stopped"
    #: The host died while the job ran; its next start ended what was left.
    HOST_DIED = "host_died"


#: The supervisor is started from the measured image with nothing from the caller's environment.
#: jsonschema's optional format checkers: the enclave validates no formats, and importing them costs up to
#: a second per launch (``rfc3987_syntax`` builds a grammar on import). Marked absent in the supervisor.
_UNUSED_MODULES = (
    "rfc3987_syntax", "isoduration", "arrow", "fqdn", "rfc3339_validator", "rfc3986_validator",
    "uri_template", "webcolors",
)  # fmt: skip
_BOOT = (
    f"import sys; sys.modules.update(dict.fromkeys({_UNUSED_MODULES!r})); sys.path.insert(0, sys.argv[1]); "
    "import dcr_enclave.runtime.supervisor as s; sys.exit(s.main())"
)


@dataclass
class HostConfig:
    state_dir: Path
    socket_path: Path
    store: Path
    keys_dir: Path
    #: Public keys of the hubs whose grants this host accepts (JWKs).
    hub_keys: list[dict[str, Any]]
    #: The range of unprivileged ids the jobs' kernels run as, one id per job: ``(first, count)``.
    sandbox_ids: tuple[int, int] = (DEFAULT_FIRST, DEFAULT_COUNT)
    #: Memory of one job's cgroup beyond its grant's ``memory_bytes`` and the scratch tmpfs (supervisor,
    #: sandbox tools, page tables).
    job_memory_overhead: int = 768 * 2**20
    #: Processes (threads included) one job may have at once, counted by its cgroup.
    job_max_processes: int = 512
    #: The nice value every process of a job runs at (inherited; the sandbox's account cannot lower it):
    #: under load the user's servers and the hub stay responsive. 0 to 19.
    job_nice: int = 10
    #: The CPU weight of all jobs together against everything outside their cgroups (cgroup v2 scale:
    #: 1 to 10000, default 100; v1 ``cpu.shares`` scaled to match); None: leave it as the system has it.
    job_cpu_weight: int | None = 10
    #: Under review, a job's end is reported, and written in its receipt, rounded up to this many seconds.
    review_time_quantum: float = contract.DEFAULT_TIME_QUANTUM
    scratch_bytes: int = 2 * 2**30
    #: Extra seconds after a grant's time limit before the host kills a job.
    grace_seconds: int = 60
    #: Where each supervisor mounts its private tmpfs (a short path: kernel sockets live below it).
    scratch_root: Path = Path("/run/dcr-enclave")
    #: The directories whose files the environment measurement covers; None: the import path of the
    #: interpreter the supervisor runs with (see :mod:`dcr_enclave.platform.measure`).
    environment_paths: tuple[str, ...] | None = None


@dataclass
class Job:
    job_id: str
    grant: Grant
    owner_uid: int
    spool: Path
    hub_key: dict[str, Any]
    image_digest: str = ""
    sandbox_uid: int = -1
    state: str = "granted"
    cell: list[int] | None = None
    failure: dict[str, Any] | None = None
    #: The :class:`EndReason` of a failure, for the job's ``end`` record only (not in its public status).
    failure_code: str | None = None
    end_recorded: bool = False
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    proc: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    cancelled: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def public(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "grant_id": self.grant.grant_id,
            "user": self.grant.user,
            "state": self.state,
            "cell": self.cell,
            "failure": self.failure,
            "image_digest": self.image_digest,
            "created": self.created,
            "updated": self.updated,
            "simulated": True,
        }

    @property
    def terminal(self) -> bool:
        """Whether the enclave's part is over: a terminal state, or ``held`` (what follows is the airlock's,
        in the hub: the host never moves a held job on, and a held job cannot be cancelled here)."""
        return self.state in contract.TERMINAL_STATES or self.state == "held"


class EnclaveHost:
    def __init__(self, cfg: HostConfig) -> None:
        # The supervisor runs with its spool as working directory: every path it is given is absolute.
        for name in ("state_dir", "socket_path", "store", "keys_dir", "scratch_root"):
            setattr(cfg, name, Path(getattr(cfg, name)).absolute())
        self.cfg = cfg
        self.jobs: dict[str, Job] = {}
        self.by_grant: dict[str, str] = {}
        self.lock = threading.Lock()
        self.signer: PrivateKey
        self.server: socketserver.ThreadingUnixStreamServer | None = None
        #: (device, inode) of the socket this host bound: the one it removes when it stops.
        self._bound: tuple[int, int] | None = None
        self._lock_fd: int | None = None

    # -- set-up ---------------------------------------------------------------------------------------------

    @property
    def image_dir(self) -> Path:
        return self.cfg.state_dir / "image"

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise DCRError(
                "the enclave host must run as root", hint="it creates namespaces and owns key material"
            )
        if not self.cfg.hub_keys:
            raise DCRError("the enclave host trusts no hub key", hint="pass --hub-key FILE (PEM or JWKS)")
        # The providers' KEKs and conditions: root-only storage, checked again at every key release.
        check_private_dir(self.cfg.keys_dir, 0)
        if not 0 <= self.cfg.job_nice <= 19:
            raise DCRError(f"the jobs' nice value must be from 0 to 19, not {self.cfg.job_nice}")
        if self.cfg.job_cpu_weight is not None and not 1 <= self.cfg.job_cpu_weight <= 10000:
            raise DCRError(f"the jobs' CPU weight must be from 1 to 10000, not {self.cfg.job_cpu_weight}")
        sd = self.cfg.state_dir
        sd.mkdir(parents=True, exist_ok=True)
        os.chmod(sd, 0o711)
        self._lock_state()
        for sub, mode in (("spool", 0o700), ("public", 0o755)):
            (sd / sub).mkdir(exist_ok=True)
            os.chmod(sd / sub, mode)
        self.ledger = GrantLedger(sd / "grants.log")
        self.journal = HostJournal(sd / "events.jsonl")
        self.audit = AuditLog(sd / "audit.log", self.journal)
        self.sweep()
        self.signer = load_or_create_key(sd / "signer.pem", "RS256", owner_only=True)
        _write_public(sd / "public" / "jwks.json", json.dumps(jwks(self.signer), indent=2))
        self.install_image()
        self.environment = self.measure_environment()
        # Published so that an admin or a provider can pin it before any job runs.
        _write_public(sd / "public" / "image-digest", self.measurement() + "\n")
        self.sandbox_ids = SandboxIds(sd / "next-sandbox-id", *self.cfg.sandbox_ids)
        self.broker = KeyBroker(self.cfg.keys_dir, [public_jwk(self.signer)], self.audit, self.ledger)

    def _lock_state(self) -> None:
        """Hold the state directory for as long as this host runs: the start-up sweep ends every job it
        finds there, which must never be another running host's."""
        fd = os.open(self.cfg.state_dir / "host.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DCRError(
                f"another enclave host is running on the state directory {self.cfg.state_dir}",
                hint="stop it first, or give this one its own --state "
                "(`dcr local-run` can use the running host with --host-socket)",
            ) from None
        self._lock_fd = fd

    def sweep(self) -> None:
        """End and remove what jobs of an earlier run of this host left: a host that starts knows no job,
        so every spool entry is a leftover (a host killed with ``kill -9``, a machine that lost power).
        Its processes are killed through its cgroup (normally they died with the host: the supervisor
        has the host's death signalled to it), its empty mount point under the scratch root and its spool
        (bundle, sealed results) are removed. A job whose end was not recorded gets its ``end`` record
        (failed, :attr:`EndReason.HOST_DIED`)."""
        for entry in sorted((self.cfg.state_dir / "spool").iterdir()):
            job_id = entry.name
            if not contract.JOB_ID_RE.match(job_id):
                continue
            killed = 0
            try:
                cgroup = JobCgroup(job_id, memory_bytes=0, max_processes=0)
                killed = len(cgroup.pids())
                cgroup.remove()
            except DCRError as e:
                log.error("job %s left by an earlier run: its cgroup could not be removed: %s", job_id, e)
            with contextlib.suppress(OSError):
                (self.cfg.scratch_root / job_id).rmdir()
            ended = (entry / _ENDED_MARK).exists()
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("job %s was left by an earlier run of the host: ended (%d processes)", job_id, killed)
            # A spool without a ledger record is a launch that never completed: it has no launch record.
            if not ended and (grant_id := self.ledger.grant_for(job_id)) is not None:
                self.audit.write(
                    "end", job_id=job_id, grant_id=grant_id, state="failed", reason_code=EndReason.HOST_DIED
                )

    def install_image(self) -> None:
        """Copy what the enclave runs (:data:`MEASURED_PARTS`) into a root-owned, read-only tree; that tree is
        what runs and is measured."""
        tmp = self.cfg.state_dir / ".image.new"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dcr_enclave").mkdir(parents=True)
        for part in MEASURED_PARTS:
            src, dest = package_root() / part, tmp / "dcr_enclave" / part
            if src.is_dir():
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copyfile(src, dest)
        # Byte-compiled with checked hashes: Python uses a .pyc only while it matches its measured source,
        # so the caches (left out of the measurement) can never run code the measurement does not cover.
        compileall.compile_dir(
            tmp, quiet=1, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH, workers=1
        )
        for dirpath, _dirnames, filenames in os.walk(tmp):
            for n in filenames:
                os.chmod(os.path.join(dirpath, n), 0o444)
            os.chmod(dirpath, 0o555)
        old = self.cfg.state_dir / ".image.old"
        if self.image_dir.exists():
            _make_writable(self.image_dir)
            os.replace(self.image_dir, old)
        os.replace(tmp, self.image_dir)
        if old.exists():
            shutil.rmtree(old)

    def measure_environment(self) -> dict[str, Any]:
        """Measure the interpreter and its import path once, at start (file digests cached in the state)."""
        cache = self.cfg.state_dir / "measure-cache.json"
        load_cache(cache)
        manifest = environment_manifest(self.cfg.environment_paths)
        save_cache(cache)
        return manifest

    def measurement(self) -> str:
        """The image digest: the image's code as it is now, with the environment measured at start."""
        code = measure_tree(self.image_dir / "dcr_enclave", MEASURED_PARTS)
        return combine(code, self.environment["digest"])

    # -- serving --------------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        path = self.cfg.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise DCRError(f"{path} exists and is not a socket; refusing to replace it")
            path.unlink()
        host = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                host.handle_connection(self.request)

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        st = path.lstat()
        self._bound = (st.st_dev, st.st_ino)
        # Anyone on the machine may connect: launching needs a hub-signed grant and job requests are
        # answered only to their owner (SO_PEERCRED).
        os.chmod(path, 0o666)
        log.info("enclave host (SIMULATED TEE) serving on %s, image %s", path, self.measurement())
        self.server.serve_forever()

    def shutdown(self) -> None:
        """Stop serving and remove the socket, end every job (processes, cgroup, mount point; an ``end``
        record for each that ran) and release the state directory."""
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            self._remove_socket()
        for job in list(self.jobs.values()):
            with job.cond:
                running = not job.terminal
                job.cancelled = job.cancelled or running
            self._kill(job)
            if running:
                # Its clients learn it from the next host, which does not know the job: it failed.
                job.failure_code = EndReason.HOST_STOPPED
                self._record_end(job, "failed")
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(timeout=_KILL_WAIT)
            # A host that starts knows no job (and sweeps the spool): results not fetched by now are lost.
            shutil.rmtree(job.spool, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_socket(self) -> None:
        """Unlink the socket path if it still is the socket this host bound (never what replaced it)."""
        path = self.cfg.socket_path
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._bound:
                path.unlink()
        self._bound = None

    def handle_connection(self, sock: socket.socket) -> None:
        uid = _peer_uid(sock)
        reader = _FrameReader(sock)
        try:
            self._serve_requests(sock, uid, reader)
        finally:
            reader.close_fds()  # whatever way the connection ends, no passed descriptor stays open

    def _serve_requests(self, sock: socket.socket, uid: int, reader: _FrameReader) -> None:
        while True:
            try:
                msg, fds = reader.next()
            except (DCRError, OSError) as e:
                reader.close_fds()
                _send(sock, {"ok": False, "error": str(e)})
                return
            if msg is None:
                return
            try:
                op = msg.get("op")
                _check_fds(op, fds)
                if op == "watch":
                    self._watch(sock, uid, msg)
                    continue
                if op == "result":
                    self._result(sock, uid, msg)
                    continue
                reply = self.dispatch(op, msg, uid, fds)
            except DCRError as e:
                reply = {"ok": False, "error": str(e)}
            finally:
                for fd in fds:
                    os.close(fd)
            _send(sock, reply)

    def dispatch(self, op: Any, msg: dict[str, Any], uid: int, fds: list[int]) -> dict[str, Any]:
        _check_fds(op, fds)
        if op == "ping":
            return {"ok": True, "image_digest": self.measurement(), "simulated": True}
        if op == "jwks":
            return {"ok": True, "jwks": jwks(self.signer)}
        if op == "launch":
            return {"ok": True, "job": self.launch(msg, uid, fds).public()}
        if op == "status":
            return {"ok": True, "job": self._job_for(msg, uid).public()}
        if op == "cancel":
            return {"ok": True, "job": self.cancel(self._job_for(msg, uid)).public()}
        if op == "delete":
            return {"ok": True, "job": self.delete(self._job_for(msg, uid)).public()}
        if op == "list":
            with self.lock:
                mine = [j.public() for j in self.jobs.values() if uid in (0, j.owner_uid)]
            return {"ok": True, "jobs": mine}
        if op == "grant_states":
            return {"ok": True, "states": self.grant_states(msg.get("grant_ids"), uid)}
        if op == "events":
            if uid != 0:  # the same answer whatever was asked
                raise DCRError("not allowed: events are answered only to root")
            return {"ok": True, **self.journal.read(msg.get("after"))}
        raise DCRError(f"unknown request {op!r}")

    def grant_states(self, grant_ids: Any, uid: int) -> dict[str, str]:
        """For the hub's quota (root only): where each grant is on this host.

        ``unused``: never launched here (it may still be); ``running``: its job is known and has not
        ended; ``ended``: its job ended (``held`` included: the enclave's part is over), or the grant was
        launched here and its job is no longer known (a host that restarts has ended its jobs)."""
        if uid != 0:  # the same answer whatever was asked
            raise DCRError("not allowed: grant states are answered only to root")
        if not isinstance(grant_ids, list) or not all(isinstance(g, str) for g in grant_ids):
            raise DCRError("grant_states needs grant_ids: a list of strings")
        if len(grant_ids) > MAX_GRANT_STATES:
            raise DCRError(f"grant_states takes at most {MAX_GRANT_STATES} grant ids, not {len(grant_ids)}")
        with self.lock:
            jobs = {g: self.jobs[j] for g in grant_ids if (j := self.by_grant.get(g)) is not None}
        states = {}
        for g in grant_ids:
            if (job := jobs.get(g)) is not None:
                states[g] = "ended" if job.terminal else "running"
            else:
                states[g] = "ended" if self.ledger.job_for(g) is not None else "unused"
        return states

    def _job_for(self, msg: dict[str, Any], uid: int) -> Job:
        job_id = msg.get("job_id")
        with self.lock:
            job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        # Another account's job is indistinguishable from a missing one.
        if job is None or uid not in (0, job.owner_uid):
            raise DCRError(f"no such job: {job_id!r}")
        return job

    # -- jobs -----------------------------------------------------------------------------------------------

    def launch(self, msg: dict[str, Any], uid: int, fds: list[int]) -> Job:
        token = msg.get("grant")
        if not isinstance(token, str):
            raise DCRError("launch needs a grant")
        g, hub_key = self._verify_grant(token)
        with self.lock:
            existing = self.by_grant.get(g.grant_id)
            if existing:  # idempotent by grant id
                job = self.jobs[existing]
                if uid not in (0, job.owner_uid):
                    raise DCRError("this grant was launched by another account")
                return job
            if g.job_id in self.jobs:
                raise DCRError(f"job {g.job_id} already exists under another grant")
            if self.ledger.job_for(g.grant_id) is not None:
                self.ledger.record(g.grant_id, g.job_id)  # refuses, naming the job the grant ran
            spool = self.cfg.state_dir / "spool" / g.job_id
            job = Job(g.job_id, g, uid, spool, hub_key)
            self.jobs[g.job_id] = job
            self.by_grant[g.grant_id] = g.job_id
        try:
            spool.mkdir(mode=0o700)
            (spool / "out").mkdir(mode=0o700)
            self._receive_bundle(msg, uid, fds, spool / "bundle.tar")
            # Recorded before anything runs, and kept across restarts: a grant launches once.
            self.ledger.record(g.grant_id, g.job_id)
        except (DCRError, OSError) as e:
            with self.lock:
                del self.jobs[g.job_id], self.by_grant[g.grant_id]
            shutil.rmtree(spool, ignore_errors=True)
            raise DCRError(f"launch refused: {e}") from None
        self.audit.write(
            "launch",
            job_id=g.job_id,
            grant_id=g.grant_id,
            user=g.user,
            owner_uid=uid,
            datasets=[f"{d.provider}/{d.dataset}" for d in g.datasets],
        )
        # This thread starts the supervisor and waits for it: the supervisor's parent-death signal is tied
        # to it, so it must live exactly as long as the job.
        job.thread = threading.Thread(target=self._run, args=(job,), daemon=True, name=f"job-{g.job_id}")
        job.thread.start()
        return job

    def _verify_grant(self, token: str) -> tuple[Grant, dict[str, Any]]:
        last: DCRError | None = None
        for key in self.cfg.hub_keys:
            try:
                return verify_grant(token, [key], hub_key_thumbprint=thumbprint(key)), key
            except DCRError as e:
                last = e
        raise DCRError(f"launch refused: {last}")

    def _receive_bundle(self, msg: dict[str, Any], uid: int, fds: list[int], dest: Path) -> None:
        if fds:
            if not stat.S_ISREG(os.fstat(fds[0]).st_mode):
                raise DCRError("the bundle must be a regular file")
            src = os.fdopen(os.dup(fds[0]), "rb")
        elif uid == 0 and isinstance(msg.get("bundle_path"), str):
            src = open(msg["bundle_path"], "rb")  # noqa: SIM115 - closed below
        else:
            raise DCRError("launch needs the bundle as a passed file descriptor")
        with src, open(dest, "xb") as out:
            st = os.fstat(src.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise DCRError("the bundle must be a regular file")
            src.seek(0)
            copied = 0
            while chunk := src.read(1 << 20):
                copied += len(chunk)
                if copied > MAX_BUNDLE_BYTES:
                    raise DCRError(f"the bundle is larger than {MAX_BUNDLE_BYTES} bytes")
                out.write(chunk)

    def _set(self, job: Job, **changes: Any) -> None:
        with job.cond:
            if job.terminal and "state" in changes:
                return  # an ended job stays as it ended (a late progress message, a cancel after the end)
            state = changes.get("state")
            if state in contract.TERMINAL_STATES or state == "held":
                self._record_end(job, state)  # before anyone can read the end
            for k, v in changes.items():
                setattr(job, k, v)
            job.updated = time.time()
            job.events.append({"job_id": job.job_id, **{k: v for k, v in changes.items() if k != "proc"}})
            job.cond.notify_all()

    def _record_end(self, job: Job, state: str) -> None:
        """The job's one ``end`` audit record (and log line): ids, user, final state and, for a failure,
        its :class:`EndReason`; a mark in its spool tells the start-up sweep that the end is recorded."""
        with job.cond:
            if job.end_recorded:
                return
            job.end_recorded = True
            code = {"reason_code": job.failure_code or EndReason.ENCLAVE_EXIT} if state == "failed" else {}
            self.audit.write(
                "end",
                job_id=job.job_id,
                grant_id=job.grant.grant_id,
                user=job.grant.user,
                state=state,
                **code,
            )
            with contextlib.suppress(OSError):
                (job.spool / _ENDED_MARK).touch()

    def _launch_env(self, job: Job) -> dict[str, str]:
        e = contract.ENV
        return {
            e.JOB_ID: job.job_id,
            e.BUNDLE_DIGEST: job.grant.bundle_digest,
            e.BUNDLE_URI: str(job.spool / "bundle.tar"),
            e.GRANT: job.grant.token,
            e.HUB_KEY_THUMBPRINT: thumbprint(job.hub_key),
            e.HUB_JWKS: json.dumps({"keys": [job.hub_key]}),
            e.STORE_URI: str(self.cfg.store),
            e.OUTPUT_URI: str(job.spool / "out"),
            e.PROGRESS_URI: "link:",
        }

    def _run(self, job: Job) -> None:
        try:
            env = self._launch_env(job)
            job.image_digest = self.measurement()
            job.sandbox_uid = self.sandbox_ids.allocate()[0]
            cgroup = JobCgroup(
                job.job_id,
                memory_bytes=(job.grant.memory_bytes or 0)
                + self.cfg.scratch_bytes
                + self.cfg.job_memory_overhead,
                max_processes=self.cfg.job_max_processes,
                cpu_weight=self.cfg.job_cpu_weight,
            )
            cgroup.create()
            try:
                self._run_in(job, env, cgroup)
            finally:
                cgroup.remove()
        except Exception as e:
            # Without this the job would stay launched for ever (its grant "running" to the hub's quota).
            # The host's own messages only: its errors name ids and paths it chose.
            log.error(
                "job %s: the host failed to run it: %s",
                job.job_id,
                e if isinstance(e, DCRError) else type(e).__name__,
            )
            self._kill(job)
            if not job.terminal and not job.cancelled:
                failure = {"reason": "the enclave host could not run the job", "cell": None, "ename": None}
                job.failure_code = EndReason.HOST_ERROR
                with contextlib.suppress(OSError):
                    _write_public(job.spool / "out" / contract.FAILURE_FILE, json.dumps(failure))
                self._set(job, state="failed", failure=failure)

    def _run_in(self, job: Job, env: dict[str, str], cgroup: JobCgroup) -> None:
        # The mount point is empty in the host's namespace: the tmpfs exists only in the supervisor's.
        scratch = self.cfg.scratch_root / job.job_id
        scratch.mkdir(parents=True, mode=0o700)
        parent, child = socket.socketpair()
        proc_env = {
            **env,
            contract.LOCAL_LINK_FD: str(child.fileno()),
            contract.LOCAL_SCRATCH: str(scratch),
            contract.LOCAL_SANDBOX_IDS: f"{job.sandbox_uid}:{job.sandbox_uid}",
            contract.LOCAL_TIME_QUANTUM: str(self.cfg.review_time_quantum),
            contract.LOCAL_SCRATCH_BYTES: str(self.cfg.scratch_bytes),
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        # The supervisor is killed when the host dies (``kill -9`` included): no enclave outlives its
        # platform. The signal is tied to this thread, which waits for the supervisor below; the sandbox
        # dies with the supervisor (bwrap --die-with-parent). Everything runs at the jobs' nice value.
        cmd = [
            "setpriv", "--pdeathsig", "KILL", "--", "nice", "-n", str(self.cfg.job_nice), "--",
            *cgroup.enter_command([
                "unshare", "--mount", "--propagation", "private", "--",
                sys.executable, "-I", "-B", "-c", _BOOT, str(self.image_dir),
            ]),
        ]  # fmt: skip
        # Under the job's lock: a cancel either comes first and nothing starts, or finds the process to kill.
        with job.cond:
            if job.cancelled:
                child.close()
                parent.close()
                scratch.rmdir()
                return
            with open(job.spool / "supervisor.log", "ab") as logf:
                proc = subprocess.Popen(
                    cmd,
                    env=proc_env,
                    pass_fds=[child.fileno()],
                    cwd=job.spool,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                )
            self._set(job, state="launching", proc=proc)
        child.close()
        link = threading.Thread(target=self._serve_link, args=(job, parent), daemon=True)
        link.start()
        try:
            rc = proc.wait(timeout=job.grant.time_limit + self.cfg.grace_seconds)
        except subprocess.TimeoutExpired:
            self._kill(job)
            rc = proc.wait()
            if not job.terminal:
                job.failure_code = EndReason.TIME_LIMIT
                self._set(
                    job,
                    state="failed",
                    failure={
                        "reason": f"time limit of {job.grant.time_limit} s exceeded; the enclave was "
                        f"stopped {self.cfg.grace_seconds} s after it",
                        "cell": None,
                        "ename": None,
                    },
                )
        link.join(timeout=5)
        parent.close()
        scratch.rmdir()
        out_of_memory = cgroup.oom_kills() > 0
        cgroup.remove()  # nothing of the job runs on once its end is reported
        if job.terminal or job.cancelled:
            return
        if out_of_memory and not job.failure:
            job.failure = {"reason": "the job reached its memory limit", "cell": None, "ename": None}
            job.failure_code = EndReason.MEMORY_LIMIT
        self._wait_for_quantum(job)
        if job.terminal or job.cancelled:
            return
        out = job.spool / "out"
        if rc == 0 and (out / contract.RECEIPT_FILE).exists():
            receipt = json.loads((out / contract.RECEIPT_FILE).read_text())
            decision = receipt["release"]["decision"]
            if decision == "released":
                self._set(job, state="succeeded")
            elif decision == "held":
                self._set(job, state="held")
            else:
                # Kinds only (the receipt's public ones): limit violations, then disclosure findings.
                check = receipt["output_check"]
                v = "; ".join([*check["violations"], *check.get("disclosure", [])])
                job.failure_code = EndReason.OUTPUTS_REFUSED
                self._set(
                    job,
                    state="failed",
                    failure={"reason": f"outputs refused: {v}", "cell": None, "ename": None},
                )
        else:
            failure = job.failure or {
                "reason": f"the enclave stopped (exit {rc})",
                "cell": None,
                "ename": None,
            }
            _write_public(out / contract.FAILURE_FILE, json.dumps(failure))
            self._set(job, state="failed", failure=failure)

    def _under_review(self, job: Job) -> bool:
        return job.grant.release_mode == "review"

    def _wait_for_quantum(self, job: Job) -> None:
        """Under review, report the end only at the next multiple of the time quantum since the launch: how
        long the notebook ran is its code's to choose, and the researcher may not read data from it."""
        if not self._under_review(job):
            return
        q = self.cfg.review_time_quantum
        due = job.created + math.ceil(max(time.time() - job.created, 1e-9) / q) * q
        with job.cond:
            while not job.cancelled and (left := due - time.time()) > 0:
                job.cond.wait(left)

    def _serve_link(self, job: Job, sock: socket.socket) -> None:
        """Answer the supervisor's requests: challenges, tokens, key release, progress."""
        rfile = sock.makefile("rb")
        try:
            while line := rfile.readline(MAX_MESSAGE + 1):
                try:
                    msg = decode(line)
                    reply = self._link_request(job, msg)
                except DCRError as e:
                    reply = {"ok": False, "error": str(e)}
                sock.sendall(encode(reply))
        except OSError:
            pass
        finally:
            rfile.close()

    def _link_request(self, job: Job, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "challenge":
            return {"ok": True, "challenge": self.broker.new_challenge(job.job_id)}
        if op == "token":
            return {"ok": True, "token": self.token(job, str(msg.get("audience")), msg.get("nonces"))}
        if op == "release":
            key, cond = self.broker.release(msg, job_id=job.job_id)
            return {"ok": True, "data_key": base64.b64encode(key).decode(), "condition_digest": cond}
        if op == "info":
            return {"ok": True, "kind": "local", "image_digest": job.image_digest, "jwks": jwks(self.signer)}
        if op == "progress":
            self._progress(job, msg.get("msg"))
            return {"ok": True}
        raise DCRError(f"unknown link request {op!r}")

    def token(self, job: Job, audience: str, nonces: Any) -> str:
        if audience not in (contract.RECEIPT_AUDIENCE, contract.KEY_RELEASE_AUDIENCE):
            raise DCRError(f"no tokens for audience {audience!r}")
        if not isinstance(nonces, list) or not all(isinstance(n, str) for n in nonces):
            raise DCRError("nonces must be a list of strings")
        env = self._launch_env(job)
        claims = local_claims(
            image_digest=job.image_digest,
            env={k: env[k] for k in contract.ATTESTED_ENV_NAMES},
            audience=audience,
            nonces=nonces,
        )
        return sign_token(claims, self.signer, kid=public_jwk(self.signer)["kid"])

    def _progress(self, job: Job, msg: Any) -> None:
        if not isinstance(msg, dict) or msg.get("kind") not in contract.Progress.KINDS:
            raise DCRError("malformed progress message")
        kind = msg["kind"]
        if self._under_review(job) and (kind == contract.Progress.CELL or msg.get("state") == "checking"):
            return  # their times would time the notebook's cells (the supervisor sends none either)
        if kind == contract.Progress.STATE and msg.get("state") in ("launching", "running", "checking"):
            if msg["state"] == job.state:
                return
            self._set(job, state=msg["state"])
        elif kind == contract.Progress.CELL:
            i, n = msg.get("index"), msg.get("count")
            if isinstance(i, int) and isinstance(n, int) and 0 <= i < n:
                self._set(job, cell=[i, n])
        elif kind == contract.Progress.FAILED:
            cell, ename = msg.get("cell"), msg.get("ename")
            failure = {
                "reason": str(msg.get("reason", "failed"))[:500],
                "cell": cell if isinstance(cell, int) else None,
                "ename": ename if isinstance(ename, str) and ename.isidentifier() else None,
            }
            job.failure = failure
            job.failure_code = (
                EndReason.CELL_FAILED if failure["cell"] is not None else EndReason.ENCLAVE_FAILED
            )

    def cancel(self, job: Job) -> Job:
        with job.cond:
            if job.terminal:
                return job
            job.cancelled = True
        self._kill(job)
        self.audit.write("cancel", job_id=job.job_id)  # before the end it causes
        self._set(job, state="cancelled")
        return job

    def delete(self, job: Job) -> Job:
        """Remove a finished job's spool (sealed outputs, receipt); the job stays known by its grant."""
        if not job.terminal:
            raise DCRError(f"job {job.job_id} is still running", hint="cancel it first")
        shutil.rmtree(job.spool, ignore_errors=True)
        return job

    def _kill(self, job: Job) -> None:
        """Kill the supervisor's whole process tree and return once every process of it has ended.

        The sandbox runs in its own session and PID namespace, so the supervisor's process group does not
        reach it: the tree is read from ``/proc`` and each member is killed. The mount namespace, and the
        plaintext tmpfs, go with the last process. Returning only when the tree is gone means a cancel
        that has been answered has left nothing running."""
        if job.proc and job.proc.poll() is None:
            tree = process_tree(job.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.proc.pid, signal.SIGKILL)
            for pid, started in tree:
                if _start_time(pid) == started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            job.proc.wait()
            deadline = time.monotonic() + _KILL_WAIT
            while (alive := [p for p, t in tree if _start_time(p) == t]) and time.monotonic() < deadline:
                time.sleep(0.005)
            if alive:
                log.error("job %s: processes %s outlived SIGKILL for %ss", job.job_id, alive, _KILL_WAIT)

    def _watch(self, sock: socket.socket, uid: int, msg: dict[str, Any]) -> None:
        """Stream the job's state changes as they happen, ending with the terminal one."""
        job = self._job_for(msg, uid)
        sent = 0
        _send(sock, {"ok": True, "job": job.public()})
        while True:
            with job.cond:
                while sent == len(job.events) and not job.terminal:
                    job.cond.wait(timeout=30)
                new, sent = job.events[sent:], len(job.events)
                done = job.terminal
            for ev in new:
                _send(sock, {"ok": True, "event": ev})
            if done:
                _send(sock, {"ok": True, "job": job.public(), "end": True})
                return

    def _result(self, sock: socket.socket, uid: int, msg: dict[str, Any]) -> None:
        """Hand the caller read-only descriptors of the job's result files (receipt, sealed outputs)."""
        try:
            job = self._job_for(msg, uid)
            if not job.terminal:
                raise DCRError(f"job {job.job_id} has not finished")
            if not (job.spool / "out").is_dir():
                raise DCRError(f"the results of job {job.job_id} were deleted")
        except DCRError as e:
            _send(sock, {"ok": False, "error": str(e)})
            return
        out = job.spool / "out"
        names = sorted(p.name for p in out.iterdir() if p.is_file() and not p.is_symlink())
        fds = [os.open(out / n, os.O_RDONLY | os.O_NOFOLLOW) for n in names]
        try:
            socket.send_fds(sock, [encode({"ok": True, "files": names})], fds)
        finally:
            for fd in fds:
                os.close(fd)


class _FrameReader:
    """Reads newline-framed JSON requests, collecting any file descriptors passed alongside."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def next(self) -> tuple[dict[str, Any] | None, list[int]]:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_MESSAGE:
                self.close_fds()
                raise DCRError("request too large")
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 4)
            self.fds.extend(fds)
            if not data:
                for fd in self.fds:
                    os.close(fd)
                return None, []
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        fds, self.fds = self.fds, []
        try:
            return decode(line + b"\n"), fds
        except DCRError:
            for fd in fds:
                os.close(fd)
            raise

    def close_fds(self) -> None:
        """Close every descriptor received and not yet handed out (each error path calls this)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _check_fds(op: Any, fds: list[int]) -> None:
    if fds and (op != "launch" or len(fds) > 1):
        raise DCRError("only a launch may pass a file descriptor, and only one (the bundle)")


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(encode(obj))


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _make_writable(root: Path) -> None:
    for dirpath, _dirnames, _filenames in os.walk(root):
        os.chmod(dirpath, 0o755)


#: How long a cancel waits for a killed process tree to end (processes in uninterruptible I/O end late).
_KILL_WAIT = 10.0


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    """The start time of a live process (it and its pid identify it); None once it is gone or a zombie."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_tree(root: int) -> list[tuple[int, int]]:
    """``(pid, start time)`` of ``root`` and every live process below it, read from ``/proc`` (processes
    in nested PID namespaces appear there under their host pids)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        pid = int(entry.name)
        starts[pid] = int(fields[19])
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree.append((pid, starts[pid]))
        todo.extend(children.get(pid, ()))
    return tree
