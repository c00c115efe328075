"""The kernel sandbox's layout: its specification and bubblewrap's argument list, built by pure functions.

:func:`make_bwrap_argv` turns a :class:`SandboxSpec` and the host facts it depends on
(:class:`HostFacts`) into bubblewrap's argument list; it reads nothing from the machine, so it is tested
against a literal list without root. See ``docs/sandbox.md`` for what is isolated and why.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dcr_enclave.formats.contract import DATA_ROOT
from dcr_enclave.formats.errors import DCRError

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
MAX_IPC_PATH: Final = 100
KERNEL_PORTS: Final = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}


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


# ---------------------------------------------------------------------------------------------------------
# Validation and the sandbox's file system
# ---------------------------------------------------------------------------------------------------------


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_ids(uid: int, gid: int) -> None:
    for what, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**32 - 1:
            raise DCRError(
                f"sandbox {what} {value!r} is not an unprivileged id",
                hint="run notebooks as a dedicated system account (useradd --system), never as root",
            )


def check_spec(spec: SandboxSpec) -> None:
    check_ids(spec.uid, spec.gid)
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


def find_tool(name: str, what: str, hint: str) -> str:
    found = name if "/" in name else shutil.which(name)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        where = f"at {name!r}" if "/" in name else "on PATH"
        raise DCRError(f"{what} ({name}) not found {where}: the kernel sandbox cannot be built", hint=hint)
    return os.path.abspath(found)


def python_roots() -> list[str]:
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


@dataclass(frozen=True)
class HostFacts:
    """What the layout takes from the host, read once by :meth:`from_host` and passed to the pure builder."""

    #: Absolute paths of the tools the sandbox is built with.
    bwrap: str
    prlimit: str
    setpriv: str
    #: The interpreter the kernel runs (the supervisor's own) and the directories of its installation.
    python: str
    python_roots: tuple[str, ...]
    #: Top-level directories reproduced as found: ``(path, link target)`` for a link, ``(path, None)``
    #: for a directory (see :data:`_ROOT_LINKS`).
    root_entries: tuple[tuple[str, str | None], ...]
    #: The names of :data:`_HOST_ETC` that exist on the host.
    host_etc: tuple[str, ...]

    @classmethod
    def from_host(cls, bwrap: str = "bwrap") -> HostFacts:
        entries: list[tuple[str, str | None]] = []
        for top in _ROOT_LINKS:
            if os.path.islink(top):
                entries.append((top, os.readlink(top)))
            elif os.path.isdir(top):
                entries.append((top, None))
        return cls(
            bwrap=find_tool(bwrap, "bubblewrap", "install it: apt-get install -y bubblewrap"),
            prlimit=find_tool("prlimit", "prlimit", "install util-linux"),
            setpriv=find_tool("setpriv", "setpriv", "install util-linux"),
            python=sys.executable,
            python_roots=tuple(python_roots()),
            root_entries=tuple(entries),
            host_etc=tuple(n for n in _HOST_ETC if os.path.exists(os.path.join("/etc", n))),
        )


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


def etc_file_contents(uid: int, gid: int) -> dict[str, str]:
    """The generated /etc: the account and root only, local names only."""
    return {
        "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{ACCOUNT_NAME}:x:{uid}:{gid}:{ACCOUNT_NAME}:{SANDBOX_HOME}:/usr/sbin/nologin\n",
        "group": f"root:x:0:\n{ACCOUNT_NAME}:x:{gid}:\n",
        "hosts": f"127.0.0.1\tlocalhost {SANDBOX_HOSTNAME}\n::1\tlocalhost\n",
        "hostname": f"{SANDBOX_HOSTNAME}\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }


def make_bwrap_argv(
    spec: SandboxSpec,
    host: HostFacts,
    *,
    workdir: Path,
    data_dir: Path,
    kernel_dir: Path,
    etc: dict[str, Path],
    chdir: str,
    status_fd: int,
    seccomp_fd: int,
    command: Sequence[str],
) -> list[str]:
    """bubblewrap's argument list for one sandbox; reads nothing from the machine.

    ``etc`` maps the names of :func:`etc_file_contents` to the host files holding them; ``seccomp_fd`` is
    the compiled filter (:mod:`dcr_enclave.runtime.kernel_seccomp`); ``command`` runs as
    ``spec.uid``/``spec.gid`` with no capabilities under the limits of ``spec``.
    """
    _check_python_roots(host.python_roots, spec)
    lay = _Layout()
    lay.add("--ro-bind", "/usr", dest="/usr")
    for top, target in host.root_entries:
        if target is not None:
            lay.add("--symlink", target, dest=top)
        else:
            lay.add("--ro-bind", top, dest=top)
    for name in host.host_etc:
        lay.add("--ro-bind", f"/etc/{name}", dest=f"/etc/{name}")
    for name, path in etc.items():
        lay.add("--ro-bind", str(path), dest=f"/etc/{name}")
    lay.add("--perms", "1777", "--size", str(spec.tmp_bytes), "--tmpfs", dest=SANDBOX_TMP)
    for root in host.python_roots:
        lay.add("--ro-bind", root, dest=root)
    lay.add("--bind", str(workdir), dest=spec.work_mount)
    lay.add("--ro-bind", str(data_dir), dest=DATA_ROOT)
    lay.add("--bind", str(kernel_dir), dest=KERNEL_MOUNT)
    lay.add("--proc", dest="/proc")
    lay.add("--dev", dest="/dev")
    lay.add("--perms", "1777", "--size", str(spec.tmp_bytes), "--tmpfs", dest=SANDBOX_SHM)
    lay.add("--remount-ro", dest="/")

    env = {
        "PATH": f"{os.path.dirname(host.python)}:/usr/local/bin:/usr/bin:/bin",
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
        host.bwrap,
        *namespaces,
        *("--hostname", SANDBOX_HOSTNAME, "--die-with-parent", "--new-session"),
        *("--json-status-fd", str(status_fd), "--seccomp", str(seccomp_fd)),
        *caps,
        *lay.args,
        *("--chdir", chdir, "--clearenv"),
        *[arg for k, v in env.items() for arg in ("--setenv", k, v)],
        "--",
        host.prlimit,
        *limits,
        "--",
        host.setpriv,
        *(f"--reuid={spec.uid}", f"--regid={spec.gid}", *drop),
        "--",
        *command,
    ]
