"""The kernel sandbox's bubblewrap argument list, built by a pure function and checked against a literal list.

No root, no bubblewrap: :func:`make_bwrap_argv` reads nothing from the machine, so every mount, limit and
privilege drop of the sandbox is visible here in order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.runtime.kernel_layout import (
    HostFacts,
    SandboxSpec,
    check_spec,
    etc_file_contents,
    make_bwrap_argv,
)

HOST = HostFacts(
    bwrap="/usr/bin/bwrap",
    prlimit="/usr/bin/prlimit",
    setpriv="/usr/bin/setpriv",
    python="/opt/py/bin/python3",
    python_roots=("/opt/py",),
    root_entries=(("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", None)),
    host_etc=("ld.so.cache", "localtime"),
)


def _spec(**overrides: object) -> SandboxSpec:
    values: dict = {
        "workdir": Path("/run/s/work"),
        "data_dir": Path("/run/s/data"),
        "uid": 990,
        "gid": 991,
        "memory_bytes": 2**31,
        "max_processes": 64,
        "file_size_bytes": 2**20,
        "tmp_bytes": 2**26,
    }
    values.update(overrides)
    return SandboxSpec(**values)


def _argv(spec: SandboxSpec, host: HostFacts = HOST) -> list[str]:
    return make_bwrap_argv(
        spec,
        host,
        workdir=Path("/run/s/work"),
        data_dir=Path("/run/s/data"),
        kernel_dir=Path("/run/s/r/kernel"),
        etc={"passwd": Path("/run/s/r/etc/passwd"), "group": Path("/run/s/r/etc/group")},
        chdir="/workspace/sub",
        status_fd=7,
        seccomp_fd=8,
        command=["/opt/py/bin/python3", "-P", "-c", "pass"],
    )


def test_the_whole_argument_list() -> None:
    assert _argv(_spec()) == [
        "/usr/bin/bwrap",
        # fresh namespaces: no network, own PIDs, IPC, host name and cgroup view
        *("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"),
        *("--hostname", "dcr-sandbox", "--die-with-parent", "--new-session", "--json-status-fd", "7"),
        # the system-call filter (keyrings, namespaces, mounts, tracing, ...)
        *("--seccomp", "8"),
        # only what the set-up needs, dropped for good by setpriv below
        *("--cap-drop", "ALL"),
        *("--cap-add", "CAP_DAC_READ_SEARCH", "--cap-add", "CAP_SETUID"),
        *("--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"),
        # a minimal read-only root
        *("--ro-bind", "/usr", "/usr"),
        *("--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--ro-bind", "/lib64", "/lib64"),
        *("--perms", "0755", "--dir", "/etc"),
        *(
            "--ro-bind",
            "/etc/ld.so.cache",
            "/etc/ld.so.cache",
            "--ro-bind",
            "/etc/localtime",
            "/etc/localtime",
        ),
        *("--ro-bind", "/run/s/r/etc/passwd", "/etc/passwd", "--ro-bind", "/run/s/r/etc/group", "/etc/group"),
        *("--perms", "1777", "--size", "67108864", "--tmpfs", "/tmp"),
        *("--perms", "0755", "--dir", "/opt", "--ro-bind", "/opt/py", "/opt/py"),
        # the working copy read-write, the data read-only, the kernel's sockets
        *("--bind", "/run/s/work", "/workspace"),
        *("--ro-bind", "/run/s/data", "/data"),
        *("--perms", "0755", "--dir", "/run", "--bind", "/run/s/r/kernel", "/run/dcr-kernel"),
        *("--proc", "/proc", "--dev", "/dev"),
        *("--perms", "1777", "--size", "67108864", "--tmpfs", "/dev/shm"),
        *("--remount-ro", "/"),
        *("--chdir", "/workspace/sub", "--clearenv"),
        *("--setenv", "PATH", "/opt/py/bin:/usr/local/bin:/usr/bin:/bin"),
        *("--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"),
        *(
            "--setenv",
            "USER",
            "researcher",
            "--setenv",
            "LOGNAME",
            "researcher",
            "--setenv",
            "LANG",
            "C.UTF-8",
        ),
        *("--setenv", "JUPYTER_PLATFORM_DIRS", "1", "--setenv", "PYDEVD_DISABLE_FILE_VALIDATION", "1"),
        *("--setenv", "MALLOC_ARENA_MAX", "2"),
        "--",
        *("/usr/bin/prlimit", "--core=0", "--as=2147483648", "--nproc=64", "--fsize=1048576"),
        "--",
        *("/usr/bin/setpriv", "--reuid=990", "--regid=991", "--clear-groups"),
        *("--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"),
        "--",
        *("/opt/py/bin/python3", "-P", "-c", "pass"),
    ]


def test_limits_left_unset_are_not_passed() -> None:
    argv = _argv(_spec(memory_bytes=None, max_processes=None, file_size_bytes=None))
    start = argv.index("/usr/bin/prlimit")
    assert argv[start : start + 3] == ["/usr/bin/prlimit", "--core=0", "--"]


def test_the_root_is_read_only_after_every_mount() -> None:
    argv = _argv(_spec())
    end = argv.index("--chdir")
    assert argv[end - 2 : end] == ["--remount-ro", "/"]
    # nothing writable but the working copy, the kernel's sockets and the two private tmpfs mounts
    writable = [argv[i + 2] for i, a in enumerate(argv[:end]) if a == "--bind"]
    assert writable == ["/workspace", "/run/dcr-kernel"]


@pytest.mark.parametrize("root", ["/data", "/data/x", "/workspace/py", "/", "/etc", "/run/dcr-kernel"])
def test_a_python_installation_colliding_with_a_sandbox_mount_is_refused(root: str) -> None:
    host = HostFacts(**{**HOST.__dict__, "python_roots": (root,)})
    with pytest.raises(DCRError, match="collides with the sandbox mount"):
        _argv(_spec(), host)


def test_generated_etc_names_only_root_and_the_account() -> None:
    files = etc_file_contents(990, 991)
    assert files["passwd"] == (
        "root:x:0:0:root:/root:/usr/sbin/nologin\nresearcher:x:990:991:researcher:/tmp:/usr/sbin/nologin\n"
    )
    assert files["group"] == "root:x:0:\nresearcher:x:991:\n"
    assert files["hosts"] == "127.0.0.1\tlocalhost dcr-sandbox\n::1\tlocalhost\n"
    assert set(files) == {"passwd", "group", "hosts", "hostname", "nsswitch.conf"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uid": 0}, "uid 0 is not an unprivileged id"),
        ({"gid": 0}, "gid 0 is not an unprivileged id"),
        ({"uid": 2**32 - 1}, "is not an unprivileged id"),
        ({"uid": True}, "is not an unprivileged id"),
        ({"uid": "990"}, "is not an unprivileged id"),
        ({"workdir": Path("relative")}, "working copy 'relative' is not an existing absolute directory"),
        ({"data_dir": Path("/nonexistent-dcr")}, "data directory '/nonexistent-dcr' is not an existing"),
        ({"wall_time": 0}, "wall_time must be positive"),
        ({"startup_timeout": -1}, "startup_timeout must be positive"),
        ({"cell_timeout": 0}, "cell_timeout must be positive or None"),
        ({"memory_bytes": 0}, "memory_bytes must be a positive integer or None"),
        ({"file_size_bytes": 1.5}, "file_size_bytes must be a positive integer or None"),
        ({"max_processes": -1}, "max_processes must be a positive integer or None"),
        ({"tmp_bytes": 0}, "tmp_bytes must be a positive integer or None"),
        ({"work_mount": "workspace"}, "work_mount 'workspace' must be a normalised absolute path"),
        ({"work_mount": "/"}, "must be a normalised absolute path"),
        ({"work_mount": "/a/../b"}, "must be a normalised absolute path"),
        ({"work_mount": "/a//b"}, "must be a normalised absolute path"),
    ],
)
def test_a_spec_the_sandbox_cannot_honour_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    """check_spec refuses ids that are root or not ids, paths that are not existing absolute directories,
    limits that are not positive and a working-copy mount that is not a normalised path below /; a spec
    at the edges (the largest unprivileged id, limits of 1, no optional limits) passes."""
    base = {"workdir": tmp_path, "data_dir": tmp_path, "uid": 990, "gid": 991}
    with pytest.raises(DCRError, match=re.escape(message)):
        check_spec(SandboxSpec(**{**base, **change}))
    check_spec(SandboxSpec(**{**base, "uid": 2**32 - 2, "gid": 1, "memory_bytes": 1, "max_processes": None}))
    check_spec(SandboxSpec(**{**base, "cell_timeout": 0.5, "file_size_bytes": None, "tmp_bytes": 1}))
