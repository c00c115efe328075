"""The per-user file system view of a local sandbox: ``/data`` with exactly the entitled synthetic files.

Two halves live here:

- In the hub, :func:`make_mount_plan` computes a :class:`MountPlan` from the user's entitlements, the
  spawner's settings and facts about the host passed in as arguments, reading nothing itself (the tests
  compare its result with literal plans, without root): which synthetic file appears where under ``/data``,
  which host paths are covered by an empty file system (data stores, key files, other homes, the hub
  admin's home), which paths are shown again on top of a cover (the user's own home, the Python
  installation the server runs from) and which account the server runs as. :func:`build_plan` looks the
  facts up on this machine (:func:`host_path`, :func:`closed_ancestor`) and calls it.
- :func:`main` runs as the first process of the sandbox (``python -I -S sandbox_mounts.py PLAN -- CMD...``,
  started by :class:`dcr_spawner.local.DCRLocalSpawner`). It enters new mount and PID namespaces, builds
  the view from the plan (:func:`apply`) and forks the PID namespace's init, which mounts the namespace's
  own ``/proc``, drops to the account and starts the single-user server. This process stays as the one
  JupyterHub knows: it passes the hub's signals on and exits as the server does, and its death ends the
  namespace, so the hub's signals and polling still follow the server.

As root (``mode="root"``) the namespace is a plain mount namespace of the host's user namespace and the
process switches to the user's own uid/gid before the server starts. Not as root (``mode="userns"``) it is
an unprivileged user namespace whose only mapping is the hub's own uid, so ``/data`` is still private to
the server, but every user runs as the same account: there is no isolation between users in that mode.

Everything done in the namespace is private (``MS_PRIVATE`` on ``/``): nothing propagates back to the host.
The script half imports the standard library only: it runs as root before anything else in the sandbox, and
``-I`` keeps the environment (``PYTHONPATH`` and friends) from changing what it imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final, Literal

#: Where the datasets appear (the launch contract's DATA_ROOT; repeated here so the script half needs no
#: import from the package: tests pin that the two agree).
DATA_ROOT: Final = "/data"
#: Replaced by a private tmpfs per server (the host's are shared by every account).
PRIVATE_TMP_DIRS: Final = ("/tmp", "/dev/shm")  # noqa: S108
PLAN_VERSION: Final = 1
Mode = Literal["root", "userns"]

# <linux/mount.h>, <sched.h>, <linux/prctl.h>
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWUSER: Final = 0x10000000
PR_SET_PDEATHSIG: Final = 1
PR_SET_NO_NEW_PRIVS: Final = 38
PR_CAPBSET_DROP: Final = 24

_SAFE = MS_NOSUID | MS_NODEV


class PlanError(Exception):
    """The hub cannot build a sandbox from these settings; the message says what to change."""


@dataclass(frozen=True)
class DataFile:
    """One synthetic file shown read-only at ``/data/<provider>/<dataset>/<name>``."""

    provider: str
    dataset: str
    name: str
    source: str

    @property
    def target(self) -> str:
        return f"{DATA_ROOT}/{self.provider}/{self.dataset}/{self.name}"


@dataclass(frozen=True)
class Cover:
    """An empty tmpfs mounted over a host directory (or an empty file bound over a host file)."""

    path: str
    mode: int
    read_only: bool = True
    size: str = "64k"
    #: Hidden paths may not exist on every machine; a missing one is skipped rather than an error.
    optional: bool = False


@dataclass(frozen=True)
class Exposure:
    """A host directory shown again at its own path on top of a cover."""

    path: str
    writable: bool = False


@dataclass(frozen=True)
class MountPlan:
    """Everything the sandbox's first process needs; serialised to one JSON argument."""

    mode: Mode
    account: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    data: tuple[DataFile, ...] = ()
    covers: tuple[Cover, ...] = ()
    exposures: tuple[Exposure, ...] = ()
    hidden_files: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": PLAN_VERSION,
                "mode": self.mode,
                "account": self.account,
                "uid": self.uid,
                "gid": self.gid,
                "groups": list(self.groups),
                "home": self.home,
                "data": [[f.provider, f.dataset, f.name, f.source] for f in self.data],
                "covers": [[c.path, c.mode, c.read_only, c.size, c.optional] for c in self.covers],
                "exposures": [[e.path, e.writable] for e in self.exposures],
                "hidden_files": list(self.hidden_files),
                "notes": list(self.notes),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> MountPlan:
        d = json.loads(text)
        if d.get("v") != PLAN_VERSION:
            raise PlanError(f"sandbox plan version {d.get('v')!r} is not {PLAN_VERSION}")
        return cls(
            mode=d["mode"],
            account=d["account"],
            uid=int(d["uid"]),
            gid=int(d["gid"]),
            groups=tuple(int(g) for g in d["groups"]),
            home=d["home"],
            data=tuple(DataFile(*f) for f in d["data"]),
            covers=tuple(Cover(p, int(m), bool(r), s, bool(o)) for p, m, r, s, o in d["covers"]),
            exposures=tuple(Exposure(p, bool(w)) for p, w in d["exposures"]),
            hidden_files=tuple(d["hidden_files"]),
            notes=tuple(d["notes"]),
        )


# ---------------------------------------------------------------------------------------------------------
# Hub side: computing the plan
# ---------------------------------------------------------------------------------------------------------


def within(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def python_roots() -> list[str]:
    """Host directories of the Python installation the hub (and so every server) runs from."""
    found = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    found |= {os.path.realpath(p) for p in list(found)}
    found.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    return _minimal(os.path.normpath(p) for p in found)


def package_roots(modules: Iterable[str]) -> list[str]:
    """Directories that hold the given importable packages (editable installs live outside site-packages)."""
    import importlib.util

    found = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                found.append(os.path.dirname(os.path.realpath(loc)))
    return _minimal(found)


def _minimal(paths: Iterable[str]) -> list[str]:
    """Drop paths that lie below another path of the set."""
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(within(p, q) for q in out):
            out.append(p)
    return out


def closed_ancestor(path: str) -> str | None:
    """The outermost ancestor of ``path`` that other accounts cannot traverse (no ``o+x``), if any."""
    parts = PurePosixPath(path).parts
    for i in range(2, len(parts)):  # "/" itself is never covered
        ancestor = str(PurePosixPath(*parts[:i]))
        try:
            mode = os.stat(ancestor).st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return ancestor
    return None


#: What the hub found at a hidden path: a directory (covered by an empty tmpfs), anything else that exists
#: (a file: ``/dev/null`` is bound over it), or nothing (skipped).
PathKind = Literal["directory", "file", "absent"]


@dataclass(frozen=True)
class HostPath:
    """A host path to hide, as the hub found it."""

    #: As configured; named in refusals.
    given: str
    #: Where it leads (links resolved): what is covered.
    path: str
    kind: PathKind


def host_path(given: str) -> HostPath:
    """Look ``given`` up on this machine: where it leads and what is there."""
    path = os.path.realpath(given)
    if os.path.isdir(path):
        return HostPath(given, path, "directory")
    return HostPath(given, path, "file" if os.path.exists(path) else "absent")


def make_mount_plan(
    *,
    mode: Mode,
    account: str,
    uid: int,
    gid: int,
    groups: Sequence[int],
    home: str,
    home_base: str,
    files: Sequence[DataFile],
    hidden: Sequence[HostPath],
    needed: Sequence[str],
    closed_ancestors: Sequence[str],
    private_tmp_size: str,
) -> MountPlan:
    """The mount plan for one server, from the facts given; reads nothing from the machine.

    ``hidden`` are the host paths covered in the sandbox (stores, key files, extra admin paths), as
    :func:`host_path` found them; ``needed`` are host directories the server must be able to read (the
    Python installation, the packages it imports); ``closed_ancestors`` are the directories on the way to a
    needed path or to ``home_base`` that other accounts cannot traverse (:func:`closed_ancestor`; used in
    ``"root"`` mode only, where the server runs as its own account). Any needed directory that lies under
    a cover is bound again read-only at its own path on top of it. Raises :class:`PlanError` for settings
    no sandbox can be built from.
    """
    _check_files(files)
    covers: dict[str, Cover] = {}
    hidden_files: list[str] = []
    for h in hidden:
        p = h.path
        if p == "/" or within(DATA_ROOT, p):
            raise PlanError(f"cannot hide {h.given}: it contains {DATA_ROOT}")
        if any(within(n, p) for n in needed) or within(home, p):
            raise PlanError(
                f"cannot hide {h.given}: the server needs what is below it (the Python installation, the "
                "packages it imports or the user's home)"
            )
        if h.kind == "directory":
            covers[p] = Cover(p, 0o000, optional=True)
        elif h.kind == "file":
            hidden_files.append(p)
    # Other homes vanish: the base becomes an empty directory holding only this user's home.
    covers[home_base] = Cover(home_base, 0o755)
    if private_tmp_size:
        for p in PRIVATE_TMP_DIRS:
            covers[p] = Cover(p, 0o1777, read_only=False, size=private_tmp_size)
    exposures = [Exposure(home, writable=True)]
    if mode == "root":
        # The account must be able to walk to what it needs, and to its home: a closed ancestor (/root
        # holding a pyenv, a 0700 temporary directory) becomes an open, read-only, otherwise empty one.
        for closed in closed_ancestors:
            if closed not in covers:
                covers[closed] = Cover(closed, 0o755)
    for n in needed:
        if any(within(n, c) for c in covers):
            exposures.append(Exposure(n))
    ordered = tuple(sorted(covers.values(), key=lambda c: (c.path.count("/"), c.path)))
    return MountPlan(
        mode=mode,
        account=account,
        uid=uid,
        gid=gid,
        groups=tuple(groups),
        home=home,
        data=tuple(sorted(files, key=lambda f: f.target)),
        covers=ordered,
        exposures=tuple(sorted(exposures, key=lambda e: e.path)),
        hidden_files=tuple(sorted(hidden_files)),
    )


def build_plan(
    *,
    mode: Mode,
    account: str,
    uid: int,
    gid: int,
    groups: Sequence[int],
    home: str,
    home_base: str,
    files: Sequence[DataFile],
    hidden: Sequence[str],
    needed: Sequence[str],
    private_tmp_size: str,
) -> MountPlan:
    """The mount plan for one server on this machine: :func:`make_mount_plan` with the host's facts.

    Looks up each ``hidden`` path (:func:`host_path`) and, in ``"root"`` mode, the directories on the way
    to ``needed`` and ``home_base`` that the account could not traverse (a Python installation under
    ``/root``).
    """
    closed: list[str] = []
    if mode == "root":
        closed = [a for n in [*needed, home_base] if (a := closed_ancestor(n)) is not None]
    return make_mount_plan(
        mode=mode,
        account=account,
        uid=uid,
        gid=gid,
        groups=groups,
        home=home,
        home_base=home_base,
        files=files,
        hidden=[host_path(h) for h in hidden],
        needed=needed,
        closed_ancestors=closed,
        private_tmp_size=private_tmp_size,
    )


def _check_files(files: Sequence[DataFile]) -> None:
    seen: set[str] = set()
    for f in files:
        for part in (f.provider, f.dataset, f.name):
            if not part or "/" in part or part in (".", "..") or part.startswith("."):
                raise PlanError(f"{f.target!r} is not a plain /data/<provider>/<dataset>/<file> path")
        if not os.path.isabs(f.source):
            raise PlanError(
                f"synthetic file {f.source!r} of {f.provider}/{f.dataset} is not an absolute path"
            )
        if f.target in seen:
            raise PlanError(f"two synthetic files would appear at {f.target}")
        seen.add(f.target)


def helper_argv(
    plan: MountPlan, cmd: Sequence[str], status_fd: int | None = None, tail_fd: int | None = None
) -> list[str]:
    """The command line that builds the sandbox from ``plan`` and then runs ``cmd`` in it; a reason the
    sandbox cannot start is written to ``status_fd`` (an inherited pipe) as well as to stderr. With
    ``tail_fd`` (another inherited pipe) the server's stderr passes through the helper, on to the helper's
    own stderr, and the last :data:`TAIL_BYTES` of it are written to ``tail_fd`` when the server has exited
    (what the hub shows when a server stops while starting)."""
    # -I: no environment variable or user site changes what this root process imports; -S: no site
    # packages at all (the script needs the standard library only, and starts ~30 ms faster).
    status = ["--status-fd", str(status_fd)] if status_fd is not None else []
    tail = ["--tail-fd", str(tail_fd)] if tail_fd is not None else []
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), plan.to_json(), *status, *tail, "--", *cmd]


# ---------------------------------------------------------------------------------------------------------
# Sandbox side: building the view (runs as the sandbox's first process)
# ---------------------------------------------------------------------------------------------------------

_libc: Any = None


def _sys(name: str, *args: Any) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(
            err, f"{name}{tuple(a.decode() if isinstance(a, bytes) else a for a in args)}: {os.strerror(err)}"
        )


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _sys(
        "mount",
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data is not None else None,
    )


def _tmpfs(target: str, mode: int, size: str, flags: int = 0) -> None:
    _mount("dcr-sandbox", target, "tmpfs", _SAFE | flags, f"mode={mode:04o},size={size}")


def _bind(fd: int, target: str, read_only: bool, extra: int = 0) -> None:
    # Binding the already-open source through /proc/self/fd means a path swapped after the open is never
    # followed; the remount applies read-only (a bind ignores MS_RDONLY on its first call).
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | extra)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | _SAFE | (MS_RDONLY if read_only else 0))


def _open_path(path: str, directory: bool) -> int:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0))
    st = os.fstat(fd)
    if not directory and not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def _makedirs(path: str, below: str) -> None:
    """Create ``path`` (and parents) inside the freshly mounted ``below``, world-traversable."""
    rel = PurePosixPath(path).relative_to(below)
    current = below
    for part in rel.parts:
        current = f"{current}/{part}"
        if not os.path.isdir(current):
            os.mkdir(current, 0o755)
            os.chmod(current, 0o755)


def _write_id_maps(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1\n")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1\n")


def apply(plan: MountPlan) -> None:
    """Enter new mount and PID namespaces and build the plan's view of the file system in them.

    The PID namespace takes effect for the children of this process: the next one forked is its init.
    """
    uid, gid = os.getuid(), os.getgid()
    if plan.mode == "root":
        if os.geteuid() != 0:
            raise OSError("mode 'root' needs root")
        _sys("unshare", CLONE_NEWNS | CLONE_NEWPID)
    else:
        _sys("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID)
        _write_id_maps(uid, gid)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)

    # Open every source before anything is covered: the fds keep the host objects reachable.
    data_fds = [(_open_path(f.source, False), f) for f in plan.data]
    expose_fds = [(_open_path(e.path, True), e) for e in plan.exposures]

    if not os.path.isdir(DATA_ROOT) or os.path.islink(DATA_ROOT):
        raise OSError(f"{DATA_ROOT} is not a directory on the host")
    _tmpfs(DATA_ROOT, 0o755, "1m", MS_NOEXEC)
    for fd, f in data_fds:
        _makedirs(os.path.dirname(f.target), DATA_ROOT)
        os.close(os.open(f.target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o444))
        _bind(fd, f.target, read_only=True)
        os.close(fd)
    if plan.hidden_files:
        # /dev/null on a nodev mount: the hidden file's path exists, but opening it fails.
        null_fd = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
        for path in plan.hidden_files:
            if os.path.isfile(path):
                _bind(null_fd, path, read_only=True)
        os.close(null_fd)
    _mount(None, DATA_ROOT, None, MS_REMOUNT | _SAFE | MS_NOEXEC | MS_RDONLY)

    # Covers and exposures in one pass, shallowest first, so that each lands on what is already in place:
    # a directory shown again (a checkout holding the Python installation, under the private /tmp) is
    # bound before a cover below it (the home base inside that checkout) goes on top, and the user's home
    # is shown last. Binding an exposure copies the host tree as it is below that path, never a cover.
    exposure_fds = {e.path: fd for fd, e in expose_fds}
    layers: list[Cover | Exposure] = sorted([*plan.covers, *plan.exposures], key=lambda m: m.path.count("/"))
    mounted: list[Cover | Exposure] = []
    for m in layers:
        outer = [o for o in mounted if within(m.path, o.path)]
        inner = max(outer, key=lambda o: len(o.path), default=None)
        if isinstance(m, Exposure):
            if not any(isinstance(o, Cover) for o in outer):
                continue  # nothing hides it: the host's directory is already in view
            if isinstance(inner, Cover):
                _makedirs(m.path, inner.path)
            _bind(exposure_fds[m.path], m.path, read_only=not m.writable, extra=MS_REC)
            mounted.append(m)
            continue
        if isinstance(inner, Cover) and not m.optional:
            # A required cover inside an earlier one (a home base under the private /tmp): recreate its
            # mount point there.
            _makedirs(m.path, inner.path)
        if not os.path.isdir(m.path) or os.path.islink(m.path):
            if m.optional:
                continue  # already gone from view (under an earlier cover) or absent on this machine
            raise OSError(f"{m.path} is not a directory")
        _tmpfs(m.path, m.mode, m.size)
        mounted.append(m)
    for fd, _e in expose_fds:
        os.close(fd)
    for m in mounted:
        if isinstance(m, Cover) and m.read_only:
            _mount(None, m.path, None, MS_REMOUNT | _SAFE | MS_RDONLY)
    if plan.mode == "userns" and (uid, gid) != (plan.uid, plan.gid):
        raise OSError("mode 'userns' runs the server as the hub's own account")


def drop_privileges(plan: MountPlan) -> None:
    """Become the plan's account for good: groups, gid, uid (real, effective, saved), no new privileges."""
    if plan.mode == "root":
        if plan.uid == 0 or plan.gid == 0:
            raise OSError("refusing to run a sandbox as uid or gid 0")
        os.setgroups(list(plan.groups))
        # Empty the bounding set while still root, so nothing exec'd later can regain a capability.
        cap = 0
        while True:
            try:
                _sys(
                    "prctl",
                    PR_CAPBSET_DROP,
                    ctypes.c_ulong(cap),
                    ctypes.c_ulong(0),
                    ctypes.c_ulong(0),
                    ctypes.c_ulong(0),
                )
            except OSError:
                break  # EINVAL: past the last capability this kernel knows
            cap += 1
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise OSError("privileges were not dropped")
    _sys(
        "prctl",
        PR_SET_NO_NEW_PRIVS,
        ctypes.c_ulong(1),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    # In userns mode the exec below clears every capability: the mapped uid is not 0 inside.
    if os.getresuid() != (plan.uid,) * 3 or os.getresgid() != (plan.gid,) * 3:
        raise OSError("the process does not run as the planned account")


class Status:
    """The hub's line to the sandbox's start: a reason written here is shown to the user at once.

    The hub passes the write end of a pipe (``--status-fd``); every process of the sandbox closes it
    once its part is done, and the server's ``exec`` closes it for good (close-on-exec), so end of file
    without a message means the server is running.
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            os.set_inheritable(fd, False)

    def fail(self, msg: str) -> None:
        _log(msg)
        if self.fd is not None:
            with contextlib.suppress(OSError):  # the hub stopped listening: the log line remains
                os.write(self.fd, msg.encode(errors="replace")[:4000])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


#: How much of the server's stderr the helper keeps, and hands to ``--tail-fd`` when the server has exited.
TAIL_BYTES: Final = 4096
#: How long the helper waits, once the server has exited, for its stderr to end (descendants may hold it).
TAIL_WAIT_SECONDS: Final = 2.0


class StderrTail:
    """The server's stderr, passed on to this process's stderr as it comes, its last bytes kept.

    Pumped by :func:`_wait_pumping` in this process's own loop: after ``unshare(CLONE_NEWPID)`` it can no
    longer start a thread. The pipe is read whenever it has data, so the server never blocks on it, and
    memory is bounded by :data:`TAIL_BYTES` whatever the server writes.
    """

    def __init__(self, read_fd: int) -> None:
        self.fd: int | None = read_fd
        os.set_blocking(read_fd, False)
        self.kept = bytearray()
        self.forward = True

    def pump(self) -> None:
        """Read what the pipe holds now; close it at end of file."""
        while self.fd is not None:
            try:
                chunk = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                os.close(self.fd)
                self.fd = None
                return
            self.kept += chunk
            del self.kept[:-TAIL_BYTES]
            view = memoryview(chunk)
            while self.forward and view:
                try:
                    view = view[os.write(2, view) :]
                except InterruptedError:
                    continue
                except OSError:
                    self.forward = False  # the hub's log is gone: keep draining, so the server never blocks

    def hand_over(self, fd: int) -> None:
        """Write what was kept to ``fd`` (the hub's pipe), then close both."""
        data = bytes(self.kept[-TAIL_BYTES:])
        with contextlib.suppress(OSError):  # the hub stopped listening (the server had started): fine
            while data:
                data = data[os.write(fd, data) :]
        with contextlib.suppress(OSError):
            os.close(fd)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _wait_pumping(child: int, tail: StderrTail) -> int:
    """:func:`_wait_for` while pumping ``tail``; then the rest of the server's stderr, until it ends or
    :data:`TAIL_WAIT_SECONDS` have passed (descendants outside a PID namespace may hold it open)."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)  # a child's exit (SIGCHLD) wakes the select below
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    code: int | None = None
    deadline = None
    while True:
        while code is None:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # not expected: the child is ours until reaped here
                code, deadline = 1, time.monotonic()
                break
            if pid == 0:
                break
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                deadline = time.monotonic() + TAIL_WAIT_SECONDS
        if code is not None and (tail.fd is None or time.monotonic() >= (deadline or 0.0)):
            return code
        timeout = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        watched = [wake_read] + ([tail.fd] if tail.fd is not None else [])
        ready, _, _ = select.select(watched, [], [], timeout)
        if wake_read in ready:
            with contextlib.suppress(OSError):
                os.read(wake_read, 512)
        tail.pump()


def _log(msg: str) -> None:
    sys.stderr.write(f"[dcr-sandbox] {msg}\n")
    sys.stderr.flush()


def summary(plan: MountPlan) -> str:
    datasets = sorted({f"{f.provider}/{f.dataset}" for f in plan.data})
    return (
        f"{plan.account} (uid {plan.uid}): {DATA_ROOT} holds {len(plan.data)} synthetic files of "
        f"{len(datasets)} datasets ({', '.join(datasets) or 'none'})"
    )


#: Passed on to the server: what JupyterHub's stop and a terminal's interrupt send.
FORWARDED: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _forward_to(pid: int) -> None:
    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone: the wait returns
            os.kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)


def _wait_for(child: int) -> int:
    """Wait for ``child`` (reaping any other child on the way, as an init must); its exit code."""
    while True:
        pid, status = os.wait()
        if pid == child:
            return os.waitstatus_to_exitcode(status)


def _exit_like(code: int) -> int:
    """Leave as the awaited child did: by the same signal, or with the same exit status."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _mount_proc() -> None:
    """A ``/proc`` of the server's own PID namespace: it lists the server's processes only."""
    _mount("proc", "/proc", "proc", _SAFE | MS_NOEXEC)


def _parent_gone(lifeline: int) -> bool:
    """True once the process holding the other end of ``lifeline`` has ended (in a new PID namespace
    ``getppid()`` is 0 whatever happens to the parent, so a pipe tells instead)."""
    os.set_blocking(lifeline, False)
    try:
        return os.read(lifeline, 1) == b""
    except BlockingIOError:
        return False


def _init(
    plan: MountPlan, cmd: list[str], status: Status, lifeline: int, own_pids: bool, stderr: int | None = None
) -> int:
    """The first process of the server's PID namespace: mounts its /proc, becomes the account, starts the
    server (its stderr on ``stderr`` when given), passes signals on to it, reaps orphans, and ends the
    namespace (every process in it) with the server's own exit."""
    if own_pids:
        try:
            _mount_proc()
        except OSError as e:
            if plan.mode == "root":
                status.fail(f"cannot build the sandbox for {plan.account}, not starting the server: {e}")
                return 1
            _log(f"WARNING: no private /proc without root ({e}); the server sees the host's processes")
    try:
        drop_privileges(plan)
        os.chdir(plan.home)
        # After the account switch (a change of credentials clears it): this namespace dies with the
        # process the hub watches, even when that one is killed outright.
        _sys("prctl", PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), *(ctypes.c_ulong(0),) * 3)
        if _parent_gone(lifeline):
            return 1  # the process the hub watches is already gone
        os.close(lifeline)
    except OSError as e:
        status.fail(f"cannot switch to {plan.account}, not starting the server: {e}")
        return 1
    for note in plan.notes:
        _log(note)
    _log(summary(plan))
    server = os.fork()
    if server == 0:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        try:
            if stderr is not None:
                os.dup2(stderr, 2)
                os.close(stderr)
            os.execvpe(cmd[0], cmd, os.environ)  # noqa: S606 -- the server, as the account
        except OSError as e:
            status.fail(f"cannot run {cmd[0]!r} as {plan.account}: {e.strerror}")
        os._exit(127)
    if stderr is not None:
        os.close(stderr)
    status.close()
    _forward_to(server)
    return _wait_for(server)


def main(argv: Sequence[str]) -> int:
    """``sandbox_mounts.py PLAN_JSON [--status-fd N] [--tail-fd N] -- COMMAND [ARGS...]``

    1. Build the view: new mount and PID namespaces, the plan's mounts (:func:`apply`).
    2. Fork the namespace's init (:func:`_init`): its own ``/proc``, the account, then the server.
    3. Stay as the process the hub knows: pass its signals on, and exit as the server did. Killing this
       process kills the namespace (the init's parent-death signal), so no server outlives what the hub
       watches. With ``--tail-fd``, pass the server's stderr on to this process's and, once the server
       has exited, write its last bytes there (:class:`StderrTail`).
    """
    args = list(argv[1:])
    fds: dict[str, int] = {}
    while len(args) > 2 and args[1] in ("--status-fd", "--tail-fd") and args[2].isdigit():
        fds[args[1]] = int(args.pop(2))
        args.pop(1)
    status_fd, tail_fd = fds.get("--status-fd"), fds.get("--tail-fd")
    if len(args) < 3 or args[1] != "--":
        _log("usage: sandbox_mounts.py PLAN_JSON [--status-fd N] [--tail-fd N] -- COMMAND [ARGS...]")
        return 2
    if tail_fd is not None:
        os.set_inheritable(tail_fd, False)
    status = Status(status_fd)
    try:
        plan = MountPlan.from_json(args[0])
    except (ValueError, KeyError, TypeError, PlanError) as e:
        status.fail(f"invalid sandbox plan: {e}")
        return 2
    cmd = args[2:]
    own_pids = True
    try:
        apply(plan)
    except OSError as e:
        if plan.mode == "root":
            # Fail closed: without its namespaces the server would see the host's /data and more.
            status.fail(f"cannot build the sandbox for {plan.account}, not starting the server: {e}")
            return 1
        own_pids = False
        _log(
            f"WARNING: cannot build a private {DATA_ROOT} without root ({e}); the server starts WITHOUT "
            f"{DATA_ROOT} and users are NOT isolated from each other"
        )
    lifeline, held = os.pipe()  # this process holds the write end until it exits
    err_read, err_write = os.pipe() if tail_fd is not None else (None, None)
    child = os.fork()
    if child == 0:
        os.close(held)
        if err_read is not None and tail_fd is not None:
            os.close(err_read)
            os.close(tail_fd)
        code = 1
        try:
            code = _init(plan, cmd, status, lifeline, own_pids, err_write)
        finally:
            os._exit(code & 0xFF if code >= 0 else 128 - code)
    os.close(lifeline)
    status.close()
    _forward_to(child)
    if err_read is None or err_write is None or tail_fd is None:
        return _exit_like(_wait_for(child))
    os.close(err_write)
    tail = StderrTail(err_read)
    code = _wait_pumping(child, tail)
    tail.hand_over(tail_fd)
    return _exit_like(code)


def data_files(entitlements: Iterable[Any]) -> list[DataFile]:
    """The ``/data`` files of policy entitlements (objects with provider, dataset and a synthetic mapping)."""
    out = []
    for e in entitlements:
        synthetic: Mapping[str, Any] = e.synthetic
        for name, source in synthetic.items():
            out.append(DataFile(e.provider, e.dataset, name, str(source)))
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv))
