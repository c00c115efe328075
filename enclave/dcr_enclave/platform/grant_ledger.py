"""The grants this enclave host has launched, kept in its state: a grant runs once, restarts included.

A grant is a bearer credential until it expires. The host records its id with the job it launched before
the job starts (an append-only, root-only file, flushed to disk), refuses a second launch of a recorded
grant whose job it no longer knows (after a restart), and the key broker releases a key only to the job
the grant was recorded for.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from dcr_enclave.formats.errors import DCRError


class GrantLedger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._jobs: dict[str, str] = {}
        if path.exists():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self._jobs[str(entry["grant_id"])] = str(entry["job_id"])
                except (ValueError, KeyError, TypeError):
                    raise DCRError(
                        f"{path}:{n} is not a grant record", hint="restore the file or remove the line"
                    ) from None
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def job_for(self, grant_id: str) -> str | None:
        with self._lock:
            return self._jobs.get(grant_id)

    def grant_for(self, job_id: str) -> str | None:
        """The grant recorded for a job (a scan: for the start-up sweep's few leftovers)."""
        with self._lock:
            return next((g for g, j in self._jobs.items() if j == job_id), None)

    def record(self, grant_id: str, job_id: str) -> None:
        """Record a grant's launch; DCRError if it was launched before (for whatever job)."""
        with self._lock:
            if grant_id in self._jobs:
                raise DCRError(
                    f"grant {grant_id} was already used for {self._jobs[grant_id]}; a grant launches once",
                    hint="submit again: the hub issues a new grant for every job",
                )
            self._file.write(json.dumps({"grant_id": grant_id, "job_id": job_id}) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._jobs[grant_id] = job_id
