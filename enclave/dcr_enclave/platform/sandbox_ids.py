"""A distinct unprivileged uid and gid for every job's kernel sandbox, never handed out twice.

What the kernel keeps per uid rather than per namespace outlives a job when the next job runs as the same
account: kernel keyrings (``add_key``/``keyctl``; the seccomp filter denies them too), ``RLIMIT_NPROC``'s
count, files in world-writable places outside the sandbox. So every job gets its own id from a range no
account of the machine uses (no entry in ``/etc/passwd`` is needed: the sandbox writes its own), the next
free id is kept in the host's state so that a restart does not hand an id out again, and an id that still
owns a process is skipped when the range wraps around.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import threading
from pathlib import Path
from typing import Final

from dcr_enclave.formats.errors import DCRError

#: The default range: above the ids that distributions hand to accounts and below the 32-bit overflow id.
DEFAULT_FIRST: Final = 2_100_000_000
DEFAULT_COUNT: Final = 1_000_000


def _running_uids() -> set[int]:
    uids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                uids.add(os.stat(f"/proc/{name}").st_uid)
    return uids


class SandboxIds:
    """Hands out ``(uid, gid)`` pairs (equal numbers) from ``[first, first + count)``, persisted in ``state``."""

    def __init__(self, state: Path, first: int = DEFAULT_FIRST, count: int = DEFAULT_COUNT) -> None:
        if not (first >= 1000 and count >= 1 and first + count < 2**32 - 2):
            raise DCRError(f"sandbox id range {first}+{count} is not a range of unprivileged 32-bit ids")
        for uid in (first, first + count - 1):
            with contextlib.suppress(KeyError):
                name = pwd.getpwuid(uid).pw_name
                raise DCRError(
                    f"sandbox id {uid} belongs to the account {name!r}",
                    hint="pick a sandbox id range no account uses (--sandbox-ids FIRST:COUNT)",
                )
        self.state, self.first, self.count = state, first, count
        self._lock = threading.Lock()

    def _read(self) -> int:
        try:
            value = int(self.state.read_text().strip())
        except (OSError, ValueError):
            return self.first
        return value if self.first <= value < self.first + self.count else self.first

    def allocate(self) -> tuple[int, int]:
        """The next id not owned by a running process; the counter moves past it before it is returned."""
        with self._lock:
            nxt = self._read()
            busy = _running_uids()
            for _ in range(self.count):
                uid = nxt
                nxt = self.first + (nxt - self.first + 1) % self.count
                if uid not in busy:
                    tmp = self.state.with_name(f".{self.state.name}.tmp")
                    tmp.write_text(f"{nxt}\n")
                    os.replace(tmp, self.state)
                    return uid, uid
        raise DCRError("every sandbox id of the range still owns a process", hint="widen the range")
