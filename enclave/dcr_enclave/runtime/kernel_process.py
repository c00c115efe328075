"""One sandboxed process tree: start bubblewrap, learn its PID namespace, kill and reap all of it.

:func:`check_sandbox` builds a trivial sandbox and verifies it from the inside; the supervisor calls it
before it asks for any key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Final

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.runtime.kernel_layout import (
    MAX_IPC_PATH,
    HostFacts,
    SandboxSpec,
    check_ids,
    check_spec,
    etc_file_contents,
    make_bwrap_argv,
)
from dcr_enclave.runtime.kernel_seccomp import write_filter

# Before the kernel answers, its stderr is only bwrap's, setpriv's or the kernel's own start-up
# (the working copy cannot shadow modules then: python -P); later it is the researcher's and is dropped.
_STDERR_KEEP: Final = 8192
_PROBE_STDOUT_KEEP: Final = 65536


# ---------------------------------------------------------------------------------------------------------
# One sandbox process tree
# ---------------------------------------------------------------------------------------------------------


class _CappedReader(threading.Thread):
    """Drains a pipe so the sandbox never blocks on it, keeping only the first bytes while asked to."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self._limit = limit
        self._chunks = bytearray()
        self.keep = True
        self.start()

    def run(self) -> None:
        with self._stream:
            while chunk := os.read(self._stream.fileno(), 65536):
                if self.keep and len(self._chunks) < self._limit:
                    self._chunks += chunk[: self._limit - len(self._chunks)]

    def text(self) -> str:
        return self._chunks.decode(errors="replace")


def _live_pids_in_namespace(ns_inode: int) -> list[int]:
    """Host pids of the namespace's processes that have not exited (zombies are dead: they run nothing)."""
    target = f"pid:[{ns_inode}]"
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/ns/pid") != target:
                    continue
                with open(f"/proc/{name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
                if state not in (b"Z", b"X"):
                    pids.append(int(name))
    return pids


class SandboxProcess:
    """A running bwrap with its PID namespace; ``kill`` + ``reap`` leave no process of it alive."""

    def __init__(self, argv_for_fds: Callable[[int, int], list[str]], *, capture_stdout: bool) -> None:
        self._lock = threading.Lock()
        self._killed = False
        self.ns_inode: int | None = None
        self._init_pidfd: int | None = None
        seccomp_fd = write_filter()
        status_r, status_w = os.pipe()
        self._status_r = status_r
        argv = argv_for_fds(status_w, seccomp_fd)
        # bwrap's options go through a memfd (--args) so that the sandbox's /proc/1/cmdline shows no host
        # paths; the command after "--" must stay on the command line.
        split = argv.index("--")
        args_fd = os.memfd_create("bwrap-args", 0)
        try:
            blob = memoryview(b"".join(a.encode() + b"\0" for a in argv[1:split]))
            while blob:
                blob = blob[os.write(args_fd, blob) :]
            os.lseek(args_fd, 0, os.SEEK_SET)
            self.proc = subprocess.Popen(
                [argv[0], "--args", str(args_fd), *argv[split:]],
                pass_fds=(status_w, args_fd, seccomp_fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
            os.close(args_fd)
            os.close(seccomp_fd)
        assert self.proc.stderr is not None
        self.stderr = _CappedReader(self.proc.stderr, _STDERR_KEEP)
        self.stdout = _CappedReader(self.proc.stdout, _PROBE_STDOUT_KEEP) if self.proc.stdout else None
        self.exit_pidfd = os.pidfd_open(self.proc.pid)

    def wait_started(self, timeout: float) -> None:
        """Learn the namespace's init from bwrap's status document; DCRError if bwrap gave up."""
        buf = b""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._status_r, select.POLLIN)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise DCRError(f"bwrap did not set up the sandbox within {timeout:g} s")
            chunk = os.read(self._status_r, 4096)
            if not chunk:
                self.proc.wait()
                raise DCRError(
                    "bwrap could not build the kernel sandbox: " + self.stderr_tail(),
                    hint="the enclave needs root and namespaces (mount, pid, net, ipc, uts)",
                )
            buf += chunk
        try:
            status = json.loads(buf.split(b"\n", 1)[0])
            child, ns_inode = int(status["child-pid"]), int(status["pid-namespace"])
        except (ValueError, KeyError, TypeError):
            raise DCRError("bwrap reported an unreadable status; is it bubblewrap >= 0.5?") from None
        pidfd: int | None = None
        try:
            pidfd = os.pidfd_open(child)
            # The pidfd pins the process; checking its namespace afterwards rules out a recycled pid.
            if os.stat(f"/proc/{child}/ns/pid").st_ino != ns_inode:
                raise ProcessLookupError(child)
        except (ProcessLookupError, FileNotFoundError):
            # Already gone (a short command, or killed): reap() still checks the namespace is empty.
            if pidfd is not None:
                os.close(pidfd)
            pidfd = None
        with self._lock:
            self.ns_inode, self._init_pidfd = ns_inode, pidfd
            killed = self._killed
        if killed:
            self.kill()

    def stderr_tail(self) -> str:
        self.stderr.join(timeout=5)
        lines = [ln for ln in self.stderr.text().strip().splitlines() if ln.strip()]
        return " | ".join(lines[-6:]) or f"exit status {self.proc.returncode}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the namespace's init: the kernel then kills every process in the namespace. Thread-safe."""
        with self._lock:
            self._killed = True
            pidfd = self._init_pidfd
            if pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            elif self.proc.returncode is None:
                # Not yet known: bwrap's --die-with-parent takes its children with it.
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()

    def reap(self, timeout: float = 30) -> None:
        """Kill and wait until no process of the sandbox is left; DCRError if one survives."""
        self.kill()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.ns_inode is not None:
            # bwrap's monitor may exit while the namespace's init is still killing the other members
            # (it learns the exit status through an eventfd, not by reaping): wait for all of them.
            deadline = time.monotonic() + timeout
            while left := _live_pids_in_namespace(self.ns_inode):
                if time.monotonic() > deadline:
                    raise DCRError(f"{len(left)} sandbox process(es) survived SIGKILL; outputs are not safe")
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
        self.stderr.join(timeout=5)
        if self.stdout is not None:
            self.stdout.join(timeout=5)
        with self._lock:
            for fd in (self._init_pidfd, self.exit_pidfd, self._status_r):
                if fd is not None and fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._init_pidfd = None
            self.exit_pidfd = self._status_r = -1


def write_etc_files(run_dir: Path, uid: int, gid: int) -> dict[str, Path]:
    """Write the generated /etc (:func:`etc_file_contents`) into ``run_dir``; their paths by name."""
    etc = run_dir / "etc"
    etc.mkdir(mode=0o755)
    files = {}
    for name, text in etc_file_contents(uid, gid).items():
        path = etc / name
        path.write_text(text)
        path.chmod(0o644)
        files[name] = path
    return files


@contextlib.contextmanager
def temporary_run_dir(spec: SandboxSpec) -> Iterator[Path]:
    root = spec.run_root or Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix="dcr-sbx-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_kernel_dir(run_dir: Path, uid: int, gid: int) -> Path:
    path = run_dir / "kernel"
    path.mkdir(mode=0o700)
    os.chown(path, uid, gid)
    if len(str(path / "k-9")) > MAX_IPC_PATH:
        raise DCRError(
            f"sandbox run directory {run_dir} is too long for unix sockets", hint="set a short run_root"
        )
    return path


def lock_kernel_dir(kernel_dir: Path) -> None:
    """Take the kernel's socket directory from the account once the kernel has bound its sockets.

    The directory is the account's while the kernel starts (it binds its sockets there); from here the
    account can neither replace a socket with a link nor add one, so the connections the supervisor makes
    (as root, in the host's view) can only reach this kernel. Anything but a socket or the connection
    file in it refuses the run.
    """
    # The kernel may still be starting and re-reading its connection file: at no instant may the directory
    # be closed to the account. Open it first, take it, then set the mode again (the account could have
    # changed it between the two; as root's it no longer can).
    os.chmod(kernel_dir, 0o755, follow_symlinks=False)
    os.chown(kernel_dir, 0, 0, follow_symlinks=False)
    os.chmod(kernel_dir, 0o755, follow_symlinks=False)
    for entry in os.scandir(kernel_dir):
        mode = entry.stat(follow_symlinks=False).st_mode
        if not (stat.S_ISSOCK(mode) or (entry.name == "kernel.json" and stat.S_ISREG(mode))):
            raise DCRError("the kernel's socket directory holds something other than its sockets")


def in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def require_root() -> None:
    if os.geteuid() != 0:
        raise DCRError(
            "the kernel sandbox must be started as root: it builds namespaces and switches to the job's account",
            hint="run the enclave supervisor as root",
        )


# ---------------------------------------------------------------------------------------------------------
# check_sandbox
# ---------------------------------------------------------------------------------------------------------

_PROBE = r"""
import json, os, socket
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
ifaces = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
try:
    open("/data/.probe", "w").close()
    data_writable = True
except OSError:
    data_writable = False
with open(".probe", "w") as f:
    f.write("ok")
os.unlink(".probe")
import importlib.util
# Found, not imported: importing ipykernel here would double the probe's cost; the kernel start that
# follows imports it for real and fails clearly if it is broken.
missing = [m for m in ("ipykernel", "zmq") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit("missing: " + ", ".join(missing))
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "caps": [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
    "no_new_privs": status["NoNewPrivs"].strip(), "interfaces": ifaces, "data_writable": data_writable,
    "ns": {n: os.readlink("/proc/self/ns/" + n) for n in ("mnt", "pid", "net", "ipc", "uts")},
}))
"""


def check_sandbox(
    spec: SandboxSpec | int = 65534,
    gid: int | None = None,
    *,
    bwrap: str | None = None,
    timeout: float = 60,
) -> None:
    """Build a trivial sandbox, run a probe in it and check it from the inside; DCRError if anything fails.

    ``spec`` is the job's :class:`SandboxSpec` (only its account, tools and limits are used: the probe
    runs on empty temporary directories, never on the job's) or just a uid (``gid`` defaults to it).
    """
    if isinstance(spec, SandboxSpec):
        probe_spec = dataclasses.replace(spec)
    else:
        probe_spec = SandboxSpec(Path("/"), Path("/"), uid=spec, gid=spec if gid is None else gid)
    if bwrap is not None:
        probe_spec.bwrap = bwrap
    host = HostFacts.from_host(probe_spec.bwrap)
    check_ids(probe_spec.uid, probe_spec.gid)
    require_root()
    with temporary_run_dir(probe_spec) as run_dir:
        work, data = run_dir / "work", run_dir / "data"
        work.mkdir(mode=0o700)
        data.mkdir(mode=0o755)
        os.chown(work, probe_spec.uid, probe_spec.gid)
        probe_spec.workdir, probe_spec.data_dir = work, data
        check_spec(probe_spec)
        argv = [sys.executable, "-P", "-c", _PROBE]
        kernel_dir = make_kernel_dir(run_dir, probe_spec.uid, probe_spec.gid)
        etc = write_etc_files(run_dir, probe_spec.uid, probe_spec.gid)

        def build(status_fd: int, seccomp_fd: int) -> list[str]:
            return make_bwrap_argv(
                probe_spec,
                host,
                workdir=work,
                data_dir=data,
                kernel_dir=kernel_dir,
                etc=etc,
                chdir=probe_spec.work_mount,
                status_fd=status_fd,
                seccomp_fd=seccomp_fd,
                command=argv,
            )

        sandbox = SandboxProcess(build, capture_stdout=True)
        try:
            sandbox.wait_started(timeout)
            try:
                sandbox.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise DCRError(f"the sandbox probe did not finish within {timeout:g} s") from None
        finally:
            sandbox.reap()
        assert sandbox.stdout is not None
        if sandbox.proc.returncode != 0:
            raise DCRError(
                f"the sandbox probe failed (exit status {sandbox.proc.returncode}): {sandbox.stderr_tail()}",
                hint="is this Python environment complete, and are util-linux and bubblewrap installed?",
            )
        try:
            seen = json.loads(sandbox.stdout.text())
        except ValueError:
            raise DCRError("the sandbox probe printed no report") from None
    problems = []
    expected: tuple[object, ...] = (probe_spec.uid, probe_spec.uid, probe_spec.gid, [])
    if (seen["uid"], seen["euid"], seen["gid"], seen["groups"]) != expected:
        problems.append(f"runs as uid {seen['uid']} gid {seen['gid']} groups {seen['groups']}")
    if any(int(c, 16) for c in seen["caps"]) or seen["no_new_privs"] != "1":
        problems.append("keeps capabilities or lacks no_new_privs")
    if seen["interfaces"] != ["lo"]:
        problems.append(f"sees network interfaces {seen['interfaces']}")
    if seen["data_writable"]:
        problems.append("/data is writable")
    shared = [n for n, link in seen["ns"].items() if os.readlink(f"/proc/self/ns/{n}") == link]
    if shared:
        problems.append(f"shares the host's {', '.join(shared)} namespace(s)")
    if problems:
        raise DCRError("the kernel sandbox is not sound: it " + "; ".join(problems))
