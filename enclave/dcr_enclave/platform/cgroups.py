"""One control group per job: memory (the kernel's, the supervisor's and the job's tmpfs pages) and processes.

``RLIMIT_AS`` bounds one process and ``RLIMIT_NPROC`` counts per uid; neither bounds a job. Every process
of a job (supervisor, sandbox, kernel and whatever the notebook starts) runs in the job's cgroup, so its
memory, including the pages of the private tmpfs mounts it writes (they are charged to the cgroup of the
process that writes them), and its number of processes have one limit. Beyond it the kernel's OOM killer
ends a process of the job, never one of the host, and ``fork`` fails.

Both hierarchies are handled: cgroup v2 where the ``memory`` and ``pids`` controllers are available in
the unified hierarchy, otherwise v1's ``memory`` and ``pids`` hierarchies.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dcr_enclave.formats.errors import DCRError

ROOT: Final = Path("/sys/fs/cgroup")
#: The group under each hierarchy that holds the jobs' groups.
PARENT: Final = "dcr-enclave"


def _v2_root(root: Path) -> Path | None:
    for candidate in (root, root / "unified"):
        controllers = candidate / "cgroup.controllers"
        with contextlib.suppress(OSError):
            if {"memory", "pids"} <= set(controllers.read_text().split()):
                return candidate
    return None


@dataclass
class JobCgroup:
    """The cgroup(s) of one job: :meth:`create`, start the job with :meth:`enter_command`, :meth:`remove`."""

    name: str
    memory_bytes: int
    max_processes: int
    root: Path = ROOT

    def __post_init__(self) -> None:
        v2 = _v2_root(self.root)
        if v2 is not None:
            self.version = 2
            self.dirs = [v2 / PARENT / self.name]
        elif (self.root / "memory").is_dir() and (self.root / "pids").is_dir():
            self.version = 1
            self.dirs = [self.root / "memory" / PARENT / self.name, self.root / "pids" / PARENT / self.name]
        else:
            raise DCRError(
                f"no cgroup hierarchy with memory and pids controllers under {self.root}",
                hint="the enclave host bounds each job with a cgroup (v2, or v1 memory and pids)",
            )

    def create(self) -> None:
        if self.version == 2:
            parent = self.dirs[0].parent
            parent.mkdir(exist_ok=True)
            # Controllers must be enabled for the children of every level down to the job's group.
            for level in (parent.parent, parent):
                with contextlib.suppress(OSError):
                    (level / "cgroup.subtree_control").write_text("+memory +pids")
            self.dirs[0].mkdir()
            self._write(self.dirs[0] / "memory.max", self.memory_bytes)
            self._write(self.dirs[0] / "memory.swap.max", 0, optional=True)
            self._write(self.dirs[0] / "pids.max", self.max_processes)
        else:
            memory, pids = self.dirs
            for d in self.dirs:
                d.parent.mkdir(exist_ok=True)
                d.mkdir()
            self._write(memory / "memory.limit_in_bytes", self.memory_bytes)
            self._write(memory / "memory.memsw.limit_in_bytes", self.memory_bytes, optional=True)
            self._write(pids / "pids.max", self.max_processes)

    @staticmethod
    def _write(path: Path, value: int, *, optional: bool = False) -> None:
        try:
            path.write_text(str(value))
        except OSError as e:
            if not optional:
                raise DCRError(f"cannot set {path}: {e.strerror}") from None

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def enter_command(self, command: list[str]) -> list[str]:
        """``command`` run so that it is in the job's cgroup(s) before it executes anything of its own."""
        script = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f"; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "dcr-cgroup", *self.procs_files(), "--", *command]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(found)

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed (0 where the kernel does not say)."""
        events = self.dirs[0] / ("memory.events" if self.version == 2 else "memory.oom_control")
        with contextlib.suppress(OSError, ValueError):
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self, timeout: float = 10.0) -> None:
        """Kill whatever is left in the group and remove it (waits until it is empty)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            try:
                for d in self.dirs:
                    if d.exists():
                        d.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise DCRError(f"the cgroup of job {self.name} did not empty: {left}") from None
                time.sleep(0.01)
