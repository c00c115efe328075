"""The kernel sandbox: runs the researcher's notebook on real data so that its code cannot get out.

The supervisor decrypts the datasets into a private directory, prepares a working copy of the bundle and
calls :func:`run_notebook`. The notebook's kernel (a real ipykernel from this very Python environment) runs
under bubblewrap in fresh mount, PID, IPC, UTS, cgroup and network namespaces, on a minimal read-only root
that holds only what Python needs, the working copy (read-write, at :data:`WORK_MOUNT`) and the data
(read-only, at ``/data``). Inside, it runs as an unprivileged account with no capabilities and
``no_new_privs``. nbclient drives it from the supervisor's side over ZMQ ``ipc://`` sockets in a per-run
directory, never TCP: the sandbox has no network at all, only its own loopback.

When the last cell ends, fails, times out or the run is cancelled, the sandbox's PID namespace is killed
and the call waits until no process of it is left, so nothing the notebook started can change a file
after :func:`run_notebook` returns. A failure is reported as the failing cell and the exception's type
name only: messages and tracebacks can carry data.

:func:`check_sandbox` builds a trivial sandbox and verifies it from the inside; the supervisor calls it
before it asks for any key. See ``docs/sandbox.md`` for what is isolated and why it is done this way.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal, cast

import nbformat

from .contract import DATA_ROOT
from .errors import DCRError

#: Where the job's working copy appears inside the sandbox (read-write). Not ``/work``: a development
#: virtualenv often lives under ``/work`` and the Python installation is mounted at its own path.
WORK_MOUNT: Final = "/workspace"
#: Where the kernel's ZMQ sockets and connection file appear inside the sandbox.
KERNEL_MOUNT: Final = "/run/dcr-kernel"
#: The account's home inside: the private /tmp, so IPython's and matplotlib's caches never land in the
#: working copy (everything the run writes there is an output).
# Paths inside the sandbox (private tmpfs mounts), not the host's temporary directories.
SANDBOX_TMP: Final = "/tmp"  # noqa: S108
SANDBOX_SHM: Final = "/dev/shm"  # noqa: S108
SANDBOX_HOME: Final = SANDBOX_TMP
SANDBOX_HOSTNAME: Final = "dcr-sandbox"
ACCOUNT_NAME: Final = "researcher"

RunStatus = Literal["ok", "error", "timeout", "killed"]

# Host directories that may be symlinks (merged /usr) or real directories; reproduced as found.
_ROOT_LINKS: Final = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Host /etc files the kernel needs (the loader, alternatives, time zone, fonts for plots), read-only;
# nothing with accounts, hosts or secrets.
_HOST_ETC: Final = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "timezone",
    "fonts",
)
# ZMQ ipc socket paths must fit in sockaddr_un.sun_path (108 bytes with the terminating NUL).
_MAX_IPC_PATH: Final = 100
_KERNEL_PORTS: Final = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
# The exception type names a failure report may carry: Python's built-in exceptions. The report leaves the
# enclave outside the release policy, and any other class name (the notebook's own, or one it builds with
# type()) is chosen by the code and could spell out data, so it is reported as "Exception".
_BUILTIN_EXCEPTIONS: Final = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)
# Before the kernel answers, its stderr is only bwrap's, setpriv's or the kernel's own start-up
# (the working copy cannot shadow modules then: python -P); later it is the researcher's and is dropped.
_STDERR_KEEP: Final = 8192
_PROBE_STDOUT_KEEP: Final = 65536
# Makes the notebook's directory importable like in Jupyter, after start-up so that no file in the working
# copy can shadow a module the kernel itself imports.
_CWD_ON_PATH: Final = "__import__('sys').path.insert(0, __import__('os').getcwd())"


@dataclass
class SandboxSpec:
    """Everything one sandboxed run needs; the paths are host paths prepared by the supervisor."""

    workdir: Path
    data_dir: Path
    uid: int
    gid: int
    #: Seconds for the whole run, kernel start included.
    wall_time: float = 3600
    #: Address-space limit of every sandbox process (RLIMIT_AS); None for no limit.
    memory_bytes: int | None = None
    #: Seconds for one cell; None for no per-cell limit (the wall time still applies).
    cell_timeout: float | None = None
    #: Size of each of the private tmpfs mounts (/tmp, /dev/shm); they are memory too.
    tmp_bytes: int = 1 << 30
    #: RLIMIT_NPROC for the account (counts its threads host-wide: use a dedicated account per job).
    max_processes: int | None = 4096
    #: RLIMIT_FSIZE: the largest file the notebook may write; None for no limit.
    file_size_bytes: int | None = None
    #: Seconds the kernel may take to answer its first request.
    startup_timeout: float = 60
    #: The bwrap executable: a name looked up on PATH or a path.
    bwrap: str = "bwrap"
    #: Where per-run directories (kernel sockets, generated /etc files) are made; None: the temp dir.
    run_root: Path | None = None
    #: Mount point of the working copy inside the sandbox.
    work_mount: str = WORK_MOUNT


@dataclass(frozen=True)
class RunResult:
    """How a run ended. On failure only the cell (0-based among code cells) and the exception type."""

    status: RunStatus
    cell: int | None = None
    ename: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Validation and the sandbox's file system
# ---------------------------------------------------------------------------------------------------------


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_ids(uid: int, gid: int) -> None:
    for what, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**32 - 1:
            raise DCRError(
                f"sandbox {what} {value!r} is not an unprivileged id",
                hint="run notebooks as a dedicated system account (useradd --system), never as root",
            )


def _check_spec(spec: SandboxSpec) -> None:
    _check_ids(spec.uid, spec.gid)
    for what, path in (("working copy", spec.workdir), ("data directory", spec.data_dir)):
        if not Path(path).is_absolute() or not Path(path).is_dir():
            raise DCRError(f"sandbox {what} {str(path)!r} is not an existing absolute directory")
    for what, value in (("wall_time", spec.wall_time), ("startup_timeout", spec.startup_timeout)):
        if not value > 0:
            raise DCRError(f"sandbox {what} must be positive, not {value!r}")
    if spec.cell_timeout is not None and not spec.cell_timeout > 0:
        raise DCRError(f"sandbox cell_timeout must be positive or None, not {spec.cell_timeout!r}")
    for what, limit in (
        ("memory_bytes", spec.memory_bytes),
        ("file_size_bytes", spec.file_size_bytes),
        ("max_processes", spec.max_processes),
        ("tmp_bytes", spec.tmp_bytes),
    ):
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise DCRError(f"sandbox {what} must be a positive integer or None, not {limit!r}")
    mount = spec.work_mount
    if not mount.startswith("/") or mount == "/" or ".." in mount.split("/") or "//" in mount:
        raise DCRError(f"sandbox work_mount {mount!r} must be a normalised absolute path below /")


def _find_tool(name: str, what: str, hint: str) -> str:
    found = name if "/" in name else shutil.which(name)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        where = f"at {name!r}" if "/" in name else "on PATH"
        raise DCRError(f"{what} ({name}) not found {where}: the kernel sandbox cannot be built", hint=hint)
    return os.path.abspath(found)


def _python_roots() -> list[str]:
    """Host directories holding this Python installation (venv and base), minimal and outside /usr."""
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    candidates |= {os.path.realpath(p) for p in list(candidates)}
    candidates.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    roots: list[str] = []
    for path in sorted(candidates, key=len):
        path = os.path.normpath(path)
        if _within(os.path.realpath(path), "/usr") or any(_within(path, r) for r in roots):
            continue
        roots.append(path)
    return roots


def _reserved(spec: SandboxSpec) -> tuple[str, ...]:
    # /tmp is not reserved: its tmpfs is mounted before the Python installation, which may live below it
    # (a checkout under /tmp) and is then bound read-only inside the private /tmp.
    return (spec.work_mount, DATA_ROOT, "/proc", "/dev", "/etc", KERNEL_MOUNT)


def _check_python_roots(roots: Sequence[str], spec: SandboxSpec) -> None:
    for root in roots:
        for mount in _reserved(spec):
            if _within(root, mount) or _within(mount, root):
                raise DCRError(
                    f"the Python installation at {root} collides with the sandbox mount {mount}",
                    hint="install the environment elsewhere (e.g. /opt) or set SandboxSpec.work_mount",
                )


class _Layout:
    """Builds bwrap's mount arguments, creating each parent directory once and world-readable."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._dirs: set[str] = {"/"}

    def _parents(self, dest: str) -> None:
        parts = dest.strip("/").split("/")[:-1]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[: i + 1])
            if d not in self._dirs:
                # bwrap would make missing parents 0700, which the unprivileged account cannot traverse.
                self.args += ["--perms", "0755", "--dir", d]
                self._dirs.add(d)

    def add(self, *option: str, dest: str) -> None:
        self._parents(dest)
        self.args += [*option, dest]
        self._dirs.add(dest)


def _etc_files(run_dir: Path, uid: int, gid: int) -> dict[str, Path]:
    """The generated /etc: the account and root only, local names only."""
    etc = run_dir / "etc"
    etc.mkdir(mode=0o755)
    content = {
        "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{ACCOUNT_NAME}:x:{uid}:{gid}:{ACCOUNT_NAME}:{SANDBOX_HOME}:/usr/sbin/nologin\n",
        "group": f"root:x:0:\n{ACCOUNT_NAME}:x:{gid}:\n",
        "hosts": f"127.0.0.1\tlocalhost {SANDBOX_HOSTNAME}\n::1\tlocalhost\n",
        "hostname": f"{SANDBOX_HOSTNAME}\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
    files = {}
    for name, text in content.items():
        path = etc / name
        path.write_text(text)
        path.chmod(0o644)
        files[name] = path
    return files


def _bwrap_argv(
    bwrap: str,
    spec: SandboxSpec,
    *,
    workdir: Path,
    data_dir: Path,
    kernel_dir: Path,
    etc: dict[str, Path],
    chdir: str,
    status_fd: int,
    command: Sequence[str],
) -> list[str]:
    roots = _python_roots()
    _check_python_roots(roots, spec)
    lay = _Layout()
    lay.add("--ro-bind", "/usr", dest="/usr")
    for top in _ROOT_LINKS:
        if os.path.islink(top):
            lay.add("--symlink", os.readlink(top), dest=top)
        elif os.path.isdir(top):
            lay.add("--ro-bind", top, dest=top)
    for name in _HOST_ETC:
        host = os.path.join("/etc", name)
        if os.path.exists(host):
            lay.add("--ro-bind", host, dest=host)
    for name, path in etc.items():
        lay.add("--ro-bind", str(path), dest=f"/etc/{name}")
    lay.add("--perms", "1777", "--size", str(spec.tmp_bytes), "--tmpfs", dest=SANDBOX_TMP)
    for root in roots:
        lay.add("--ro-bind", root, dest=root)
    lay.add("--bind", str(workdir), dest=spec.work_mount)
    lay.add("--ro-bind", str(data_dir), dest=DATA_ROOT)
    lay.add("--bind", str(kernel_dir), dest=KERNEL_MOUNT)
    lay.add("--proc", dest="/proc")
    lay.add("--dev", dest="/dev")
    lay.add("--perms", "1777", "--size", str(spec.tmp_bytes), "--tmpfs", dest=SANDBOX_SHM)
    lay.add("--remount-ro", dest="/")

    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": SANDBOX_HOME,
        "TMPDIR": SANDBOX_TMP,
        "USER": ACCOUNT_NAME,
        "LOGNAME": ACCOUNT_NAME,
        "LANG": "C.UTF-8",
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        # glibc reserves 64 MiB of address space per malloc arena; under RLIMIT_AS that is wasted budget.
        "MALLOC_ARENA_MAX": "2",
    }
    limits = ["--core=0"]
    if spec.memory_bytes is not None:
        limits.append(f"--as={spec.memory_bytes}")
    if spec.max_processes is not None:
        limits.append(f"--nproc={spec.max_processes}")
    if spec.file_size_bytes is not None:
        limits.append(f"--fsize={spec.file_size_bytes}")
    # bwrap keeps only what the set-up needs: entering the working copy whatever its modes, and switching
    # to the account. setpriv then drops every capability for good.
    namespaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    caps = ["--cap-drop", "ALL"]
    for cap in ("CAP_DAC_READ_SEARCH", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
        caps += ["--cap-add", cap]
    drop = [
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]
    return [
        bwrap,
        *namespaces,
        *("--hostname", SANDBOX_HOSTNAME, "--die-with-parent", "--new-session"),
        *("--json-status-fd", str(status_fd)),
        *caps,
        *lay.args,
        *("--chdir", chdir, "--clearenv"),
        *[arg for k, v in env.items() for arg in ("--setenv", k, v)],
        "--",
        _find_tool("prlimit", "prlimit", "install util-linux"),
        *limits,
        "--",
        _find_tool("setpriv", "setpriv", "install util-linux"),
        *(f"--reuid={spec.uid}", f"--regid={spec.gid}", *drop),
        "--",
        *command,
    ]


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


class _Sandbox:
    """A running bwrap with its PID namespace; ``kill`` + ``reap`` leave no process of it alive."""

    def __init__(self, argv_for_fd: Callable[[int], list[str]], *, capture_stdout: bool) -> None:
        self._lock = threading.Lock()
        self._killed = False
        self.ns_inode: int | None = None
        self._init_pidfd: int | None = None
        status_r, status_w = os.pipe()
        self._status_r = status_r
        argv = argv_for_fd(status_w)
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
                pass_fds=(status_w, args_fd),
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


@contextlib.contextmanager
def _run_dir(spec: SandboxSpec) -> Iterator[Path]:
    root = spec.run_root or Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix="dcr-sbx-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _kernel_dir(run_dir: Path, uid: int, gid: int) -> Path:
    path = run_dir / "kernel"
    path.mkdir(mode=0o700)
    os.chown(path, uid, gid)
    if len(str(path / "k-9")) > _MAX_IPC_PATH:
        raise DCRError(
            f"sandbox run directory {run_dir} is too long for unix sockets", hint="set a short run_root"
        )
    return path


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _require_root() -> None:
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
    bwrap_path = _find_tool(probe_spec.bwrap, "bubblewrap", "install it: apt-get install -y bubblewrap")
    _check_ids(probe_spec.uid, probe_spec.gid)
    _require_root()
    with _run_dir(probe_spec) as run_dir:
        work, data = run_dir / "work", run_dir / "data"
        work.mkdir(mode=0o700)
        data.mkdir(mode=0o755)
        os.chown(work, probe_spec.uid, probe_spec.gid)
        probe_spec.workdir, probe_spec.data_dir = work, data
        _check_spec(probe_spec)
        argv = [sys.executable, "-P", "-c", _PROBE]
        kernel_dir = _kernel_dir(run_dir, probe_spec.uid, probe_spec.gid)
        etc = _etc_files(run_dir, probe_spec.uid, probe_spec.gid)

        def build(status_fd: int) -> list[str]:
            return _bwrap_argv(
                bwrap_path,
                probe_spec,
                workdir=work,
                data_dir=data,
                kernel_dir=kernel_dir,
                etc=etc,
                chdir=probe_spec.work_mount,
                status_fd=status_fd,
                command=argv,
            )

        sandbox = _Sandbox(build, capture_stdout=True)
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


# ---------------------------------------------------------------------------------------------------------
# Running a notebook
# ---------------------------------------------------------------------------------------------------------


def _safe_ename(ename: Any) -> str:
    return ename if isinstance(ename, str) and ename in _BUILTIN_EXCEPTIONS else "Exception"


def _split_rel(notebook_rel: str) -> list[str]:
    parts = notebook_rel.split("/") if isinstance(notebook_rel, str) else []
    if not parts or notebook_rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise DCRError(
            f"notebook path {notebook_rel!r} is not a plain relative path inside the working copy",
            hint="use the bundle's notebook path, e.g. 'analysis/report.ipynb'",
        )
    return parts


@contextlib.contextmanager
def _open_parent(workdir: Path, parts: Sequence[str]) -> Iterator[int]:
    """A directory fd for the notebook's parent, refusing symlinks on the way (the run may plant them)."""
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _read_notebook(workdir: Path, parts: Sequence[str]) -> nbformat.NotebookNode:
    try:
        with _open_parent(workdir, parts) as dfd:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            with open(fd, encoding="utf-8") as f:
                text = f.read()
        nb = nbformat.reads(text, as_version=nbformat.NO_CONVERT)
        if nb.get("nbformat") != 4:
            nb = nbformat.convert(nb, 4)
        nbformat.validate(nb)
    except (OSError, UnicodeDecodeError, ValueError, nbformat.ValidationError) as exc:
        raise DCRError(
            f"cannot read notebook {'/'.join(parts)!r} in the working copy: {type(exc).__name__}",
            hint="the bundle's notebook must be a regular nbformat 4 file, reached without symlinks",
        ) from None
    return nb


def _write_notebook(workdir: Path, parts: Sequence[str], nb: nbformat.NotebookNode) -> None:
    """Replace the notebook atomically, through directory fds only: never follows a planted symlink."""
    data = nbformat.writes(nb).encode()
    tmp = f".{parts[-1]}.{secrets.token_hex(6)}.tmp"
    try:
        with _open_parent(workdir, parts) as dfd:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
            try:
                with open(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
    except OSError as exc:
        raise DCRError(
            f"cannot write the executed notebook back to {'/'.join(parts)!r}: {type(exc).__name__}",
            hint="the run replaced the notebook or its directory; its outputs cannot be trusted",
        ) from None


def _own_tree(root: Path, uid: int, gid: int) -> None:
    """Give the working copy to the account (no symlink is followed)."""
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class NotebookRun:
    """One notebook run in one sandbox. ``run()`` once; ``cancel()`` from any thread.

    Use as a context manager (or call :meth:`kill`) so that the sandbox dies with the caller even when the
    caller is interrupted; :meth:`run` itself always kills and reaps the sandbox before it returns.
    """

    def __init__(
        self,
        notebook_rel: str,
        spec: SandboxSpec,
        *,
        on_cell: Callable[[int, int], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.on_cell = on_cell
        self.on_ready = on_ready
        self._parts = _split_rel(notebook_rel)
        self._lock = threading.Lock()
        self._reason: RunStatus | None = None
        self._sandbox: _Sandbox | None = None
        self._started = False
        self._ran = False
        self._cell: int | None = None

    # -- control from other threads --------------------------------------------------------------------

    def _stop(self, reason: RunStatus) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason
            sandbox = self._sandbox
        if sandbox is not None:
            sandbox.kill()

    def cancel(self) -> None:
        """Kill the sandbox now; :meth:`run` returns status ``killed``. Safe from any thread, any time."""
        self._stop("killed")

    def kill(self) -> None:
        """Kill the sandbox and wait until every process of it is gone."""
        self._stop("killed")
        with self._lock:
            sandbox = self._sandbox
        if sandbox is not None:
            sandbox.reap()

    def __enter__(self) -> NotebookRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Execute the notebook; write it back with its outputs; return once the sandbox is dead."""
        if self._ran:
            raise DCRError("a NotebookRun runs once; make a new one")
        self._ran = True
        if _in_event_loop():
            raise DCRError(
                "run_notebook blocks: call it from a thread (asyncio.to_thread), not an event loop"
            )
        spec = self.spec
        deadline = time.monotonic() + spec.wall_time
        bwrap_path = _find_tool(spec.bwrap, "bubblewrap", "install it: apt-get install -y bubblewrap")
        _check_spec(spec)
        _require_root()
        workdir = Path(spec.workdir)
        nb = _read_notebook(workdir, self._parts)
        code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        with self._lock:
            if self._reason is not None:
                return RunResult(self._reason)
        _own_tree(workdir, spec.uid, spec.gid)
        with _run_dir(spec) as run_dir:
            kernel_dir = _kernel_dir(run_dir, spec.uid, spec.gid)
            inside, outside = self._connection_info(kernel_dir)
            cf = kernel_dir / "kernel.json"
            cf.write_text(json.dumps(inside))
            os.chown(cf, spec.uid, spec.gid)
            cf.chmod(0o400)
            etc = _etc_files(run_dir, spec.uid, spec.gid)
            chdir = "/".join([spec.work_mount, *self._parts[:-1]])
            command = [
                sys.executable,
                "-P",  # nothing in the working copy may shadow what the kernel imports to start
                "-m",
                "ipykernel_launcher",
                "-f",
                f"{KERNEL_MOUNT}/kernel.json",
                "--HistoryManager.enabled=False",
                f"--IPKernelApp.exec_lines={json.dumps([_CWD_ON_PATH])}",
            ]

            def build(status_fd: int) -> list[str]:
                return _bwrap_argv(
                    bwrap_path,
                    spec,
                    workdir=workdir,
                    data_dir=Path(spec.data_dir),
                    kernel_dir=kernel_dir,
                    etc=etc,
                    chdir=chdir,
                    status_fd=status_fd,
                    command=command,
                )

            sandbox = _Sandbox(build, capture_stdout=False)
            with self._lock:
                self._sandbox = sandbox
                stop_now = self._reason is not None
            try:
                if stop_now:
                    sandbox.kill()
                sandbox.wait_started(max(1.0, min(spec.startup_timeout, deadline - time.monotonic())))
                result = asyncio.run(self._drive(nb, code_cells, outside, deadline))
            finally:
                sandbox.reap()
            if self._started:
                _write_notebook(workdir, self._parts, nb)
        return result

    @staticmethod
    def _connection_info(kernel_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        common = {
            **_KERNEL_PORTS,
            "transport": "ipc",
            "key": secrets.token_hex(32),
            "signature_scheme": "hmac-sha256",
            "kernel_name": "",
        }
        return {**common, "ip": f"{KERNEL_MOUNT}/k"}, {**common, "ip": str(kernel_dir / "k")}

    async def _drive(
        self, nb: nbformat.NotebookNode, code_cells: list[int], conn: dict[str, Any], deadline: float
    ) -> RunResult:
        from jupyter_client.asynchronous import AsyncKernelClient
        from nbclient import NotebookClient

        sandbox = self._require_sandbox()
        loop = asyncio.get_running_loop()
        died: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not died.done():
                died.set_result(None)

        class SandboxKernelClient(AsyncKernelClient):
            # Liveness is the sandbox process itself: exact, and no heartbeat socket to wait on.
            async def _async_is_alive(self) -> bool:
                return sandbox.alive()

            is_alive = _async_is_alive

        kc = SandboxKernelClient()
        kc.load_connection_info(cast(Any, conn))
        kc.allow_stdin = False
        client = NotebookClient(
            nb,
            timeout=self.spec.cell_timeout,
            allow_errors=False,
            kernel_name="python3",
            startup_timeout=self.spec.startup_timeout,
        )
        client.kc = kc
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)  # noqa: S604
        loop.add_reader(sandbox.exit_pidfd, on_exit)
        wall = loop.call_later(max(0.0, deadline - time.monotonic()), self._stop, "timeout")
        work = asyncio.ensure_future(self._execute(client, kc, nb, code_cells))
        try:
            waiters: set[asyncio.Future[Any]] = {work, died}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            with self._lock:
                reason = self._reason
            if reason is None and not self._started:
                raise DCRError(
                    "the kernel died while starting in the sandbox: " + sandbox.stderr_tail(),
                    hint="does check_sandbox() pass with this spec? is memory_bytes too small for a kernel?",
                )
            return RunResult(reason or "killed", self._cell)
        finally:
            wall.cancel()
            loop.remove_reader(sandbox.exit_pidfd)
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            kc.stop_channels()  # also destroys the client's own zmq context

    async def _execute(
        self, client: Any, kc: Any, nb: nbformat.NotebookNode, code_cells: list[int]
    ) -> RunResult:
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

        try:
            await kc.wait_for_ready(timeout=self.spec.startup_timeout)
        except RuntimeError:
            with self._lock:
                reason = self._reason
            if reason is not None:
                return RunResult(reason)
            raise DCRError(
                "the kernel did not start in the sandbox: " + self._require_sandbox().stderr_tail(),
                hint="does check_sandbox() pass with this spec? is memory_bytes too small for a kernel?",
            ) from None
        self._started = True
        self._require_sandbox().stderr.keep = False  # from here on it is the researcher's output
        if self.on_ready is not None:
            self.on_ready()  # may block: the caller can hold the kernel here until its data is in place
            with self._lock:
                if self._reason is not None:  # cancelled meanwhile: run no cell
                    return RunResult(self._reason)
        reply = await client.async_wait_for_reply(kc.kernel_info())
        if reply is not None and "language_info" in reply["content"]:
            nb.metadata["language_info"] = reply["content"]["language_info"]
        count = len(code_cells)
        for n, index in enumerate(code_cells):
            self._cell = n
            if self.on_cell is not None:
                self.on_cell(n, count)
            try:
                await client.async_execute_cell(
                    nb.cells[index], index, execution_count=client.code_cells_executed + 1
                )
            except CellExecutionError as exc:
                return RunResult("error", n, _safe_ename(exc.ename))
            except CellTimeoutError:
                return RunResult("timeout", n)
            except DeadKernelError:
                with self._lock:
                    return RunResult(self._reason or "killed", n)
        client.set_widgets_metadata()
        self._cell = None
        return RunResult("ok")

    def _require_sandbox(self) -> _Sandbox:
        assert self._sandbox is not None
        return self._sandbox


def run_notebook(
    notebook_rel: str,
    spec: SandboxSpec,
    *,
    on_cell: Callable[[int, int], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> RunResult:
    """Execute ``spec.workdir / notebook_rel`` in a fresh sandbox and write it back executed.

    The kernel's cwd is the notebook's directory (under :data:`WORK_MOUNT`); ``on_ready()`` is called once
    the kernel in the sandbox has answered, before any cell runs (no cell runs before it returns, nor at all
    if the run was cancelled meanwhile); ``on_cell(i, n)`` as code cell *i* of *n* starts (0-based, code
    cells only). Returns once the sandbox's whole process tree is dead. For
    cancellation from another thread use :class:`NotebookRun` and its ``cancel()``.
    """
    with NotebookRun(notebook_rel, spec, on_cell=on_cell, on_ready=on_ready) as run:
        return run.run()
