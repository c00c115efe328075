"""Per-job X25519 key pairs: the private half never leaves this server.

Each job gets a fresh pair; the enclave seals the job's outputs to the public half (carried in the grant).
Private keys are files readable by the server's account only (0600 in a 0700 directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from dcr_enclave.formats.contract import check_job_id
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.sealing import generate_keypair


class JobKeys:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    def path(self, job_id: str) -> Path:
        return self.dir / f"{check_job_id(job_id)}.key"

    def create(self, job_id: str) -> bytes:
        """Make and store the job's pair; returns the public key. Refuses to replace an existing key."""
        private, public = generate_keypair()
        try:
            fd = os.open(self.path(job_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise DCRError(f"job {job_id} already has a key") from None
        with os.fdopen(fd, "wb") as f:
            f.write(private)
            os.fsync(f.fileno())
        return public

    def private(self, job_id: str) -> bytes:
        try:
            data = self.path(job_id).read_bytes()
        except FileNotFoundError:
            raise DCRError(f"the key of job {job_id} is missing; its outputs cannot be opened") from None
        if len(data) != 32:
            raise DCRError(f"the key of job {job_id} is damaged")
        return data

    def delete(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)
