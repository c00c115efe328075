"""The kernel sandbox's seccomp filter: system calls the researcher's code never gets.

Namespaces and an unprivileged account already keep the kernel's tree from the network, the host's files and
other processes. The filter closes what is per account or per machine rather than per namespace, and what
has no business in a notebook: kernel keyrings (they belong to the uid, not to a namespace, so a key added by
one job could be read by a later one), new namespaces of any kind (a user namespace would give the tree
capabilities again), mounts, tracing other processes, eBPF, performance counters, ``userfaultfd``,
``io_uring``, kernel modules and the like. Docker's default profile is the reference; this list is shorter
because the kernel needs no exceptions for privileged containers.

Denied calls fail with ``EPERM`` (so a library probing for a feature falls back cleanly); ``clone3`` fails
with ``ENOSYS`` because its flags are in memory a filter cannot read, and the C library then uses ``clone``,
whose flags are checked. System calls of another architecture's ABI (32-bit calls on x86-64) kill the
process, libseccomp's default.
"""

from __future__ import annotations

import errno
import os
from typing import Final

#: Denied outright.
DENIED: Final = (
    # keyrings: per uid, shared between jobs
    "add_key", "keyctl", "request_key",
    # namespaces
    "unshare", "setns",
    # mounts
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr",
    # other processes, kernel interfaces
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm", "open_by_handle_at", "name_to_handle_at",
    "lookup_dcookie", "nfsservctl", "uselib", "vm86", "vm86old",
)  # fmt: skip
#: ``clone`` flags that create namespaces; ``clone`` with any of them set is denied.
_CLONE_NEW: Final = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_NEWTIME": 0x00000080,
}


def write_filter() -> int:
    """Compile the filter to BPF in an anonymous file; its descriptor, positioned at the start, for
    bubblewrap's ``--seccomp``. The caller closes it."""
    import pyseccomp as seccomp  # loaded only where a sandbox is built

    f = seccomp.SyscallFilter(seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in dict.fromkeys(DENIED):
        try:
            f.add_rule(deny, name)
        except (RuntimeError, ValueError, OSError):
            continue  # a call this architecture does not have
    for flag in _CLONE_NEW.values():
        f.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("dcr-seccomp", 0)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            f.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
