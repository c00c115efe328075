"""One control group per job: memory (the kernel's, the supervisor's and the job's tmpfs pages) and processes.

``RLIMIT_AS`` bounds one process and ``RLIMIT_NPROC`` counts per uid; neither bounds a job. Every process
of a job (supervisor, sandbox, kernel and whatever the notebook starts) runs in the job's cgroup, so its
memory, including the pages of the private tmpfs mounts it writes (they are charged to the cgroup of the
process that writes them), and its number of processes have one limit. Beyond it the kernel's OOM killer
ends a process of the job, never one of the host, and ``fork`` fails.

Both hierarchies are handled: cgroup v2 where the ``memory`` and ``pids`` controllers are available in
the unified hierarchy, otherwise v1's ``memory`` and ``pids`` hierarchies.

CPU: the jobs' groups sit below one parent group whose CPU weight (``cpu.weight`` on v2, ``cpu.shares`` on
v1) is set low, so that all jobs together yield the CPU to the servers, the hub and the host, which run
outside it at the default weight. Where the ``cpu`` controller is missing the group is left out and the
host's ``nice`` value alone lowers the jobs' priority.

Every job's processes are in its group, so the host can end a job whose supervisor it lost (a host
restarted after ``kill -9``): :meth:`JobCgroup.remove` kills whatever is still in the group.
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
#: The default CPU weight of a group on cgroup v2 (v1's ``cpu.shares`` default is 1024 for the same).
DEFAULT_CPU_WEIGHT: Final = 100


def _v2_root(root: Path) -> Path | None:
    for candidate in (root, root / "unified"):
        controllers = candidate / "cgroup.controllers"
        with contextlib.suppress(OSError):
            if {"memory", "pids"} <= set(controllers.read_text().split()):
                return candidate
    return None


def _controllers(v2: Path) -> set[str]:
    with contextlib.suppress(OSError):
        return set((v2 / "cgroup.controllers").read_text().split())
    return set()


@dataclass
class JobCgroup:
    """The cgroup(s) of one job: :meth:`create`, start the job with :meth:`enter_command`, :meth:`remove`."""

    name: str
    memory_bytes: int
    max_processes: int
    root: Path = ROOT
    #: The CPU weight of all jobs together, on v2's scale (1 to 10000, default 100); None leaves it as is.
    cpu_weight: int | None = None

    def __post_init__(self) -> None:
        v2 = _v2_root(self.root)
        #: The job's group in the hierarchy with the ``cpu`` controller, if there is one.
        self.cpu_dir: Path | None = None
        if v2 is not None:
            self.version = 2
            self.dirs = [v2 / PARENT / self.name]
            if "cpu" in _controllers(v2):
                self.cpu_dir = self.dirs[0]
        elif (self.root / "memory").is_dir() and (self.root / "pids").is_dir():
            self.version = 1
            self.dirs = [self.root / "memory" / PARENT / self.name, self.root / "pids" / PARENT / self.name]
            for hierarchy in ("cpu", "cpu,cpuacct"):
                if (self.root / hierarchy / "cpu.shares").is_file():
                    self.cpu_dir = self.root / hierarchy / PARENT / self.name
                    self.dirs.append(self.cpu_dir)
                    break
        else:
            raise DCRError(
                f"no cgroup hierarchy with memory and pids controllers under {self.root}",
                hint="the enclave host bounds each job with a cgroup (v2, or v1 memory and pids)",
            )

    def create(self) -> None:
        if self.version == 2:
            parent = self.dirs[0].parent
            parent.mkdir(exist_ok=True)
            wanted = "+memory +pids" + (" +cpu" if self.cpu_dir else "")
            # Controllers must be enabled for the children of every level down to the job's group.
            for level in (parent.parent, parent):
                with contextlib.suppress(OSError):
                    (level / "cgroup.subtree_control").write_text(wanted)
            self.dirs[0].mkdir()
            self._write(self.dirs[0] / "memory.max", self.memory_bytes)
            self._write(self.dirs[0] / "memory.swap.max", 0, optional=True)
            self._write(self.dirs[0] / "pids.max", self.max_processes)
        else:
            memory, pids = self.dirs[:2]
            for d in self.dirs:
                d.parent.mkdir(exist_ok=True)
                d.mkdir()
            self._write(memory / "memory.limit_in_bytes", self.memory_bytes)
            self._write(memory / "memory.memsw.limit_in_bytes", self.memory_bytes, optional=True)
            self._write(pids / "pids.max", self.max_processes)
        if self.cpu_dir is not None and self.cpu_weight is not None:
            # The parent's weight is what counts against the groups outside it; set at every job so that a
            # changed configuration applies without removing the parent.
            for d in (self.cpu_dir.parent, self.cpu_dir):
                if self.version == 2:
                    self._write(d / "cpu.weight", self.cpu_weight, optional=True)
                else:
                    shares = max(2, self.cpu_weight * 1024 // DEFAULT_CPU_WEIGHT)
                    self._write(d / "cpu.shares", shares, optional=True)

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
        if self.version == 2:
            # Kills every member at once, also one forked meanwhile (Linux 5.14 and later).
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")
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
