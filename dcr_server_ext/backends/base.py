"""The one interface every enclave backend implements.

A backend launches a granted job on its platform, reports its state, streams its progress, cancels it,
collects its result files (receipt, attestation token, sealed outputs or failure report) and cleans up.
Every method is idempotent: the manager may call any of them again after a restart, and launching twice
with the same grant must not start a second enclave (launch is keyed by the grant id).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitlets.config import LoggingConfigurable

from ..model import Job


@dataclass
class BackendStatus:
    """What the platform says about a job. ``state`` is one of the lifecycle states of the contract."""

    state: str
    cell: int | None = None
    cells: int | None = None
    #: ``{"reason", "cell", "ename"}`` when the job failed; never data.
    failure: dict[str, Any] | None = None
    #: ``{"kind", "simulated", "image_digest"}``.
    enclave: dict[str, Any] = field(default_factory=dict)


class Backend(LoggingConfigurable):
    """Base class of enclave backends (subclasses configure themselves with their own traits)."""

    async def launch(self, job: Job, grant: str, bundle: Path) -> dict[str, Any]:
        """Start the job; return what the backend needs to find it again (stored as ``job.backend_ref``)."""
        raise NotImplementedError

    async def status(self, job: Job) -> BackendStatus | None:
        """The job's current state, or ``None`` if the platform has no such job (it vanished)."""
        raise NotImplementedError

    def progress(self, job: Job) -> AsyncIterator[BackendStatus]:
        """Each change of the job's state or cell, as it happens, ending with a terminal state."""
        raise NotImplementedError

    async def cancel(self, job: Job) -> None:
        """Stop the job and everything it runs; a finished job is left as it is."""
        raise NotImplementedError

    async def collect(self, job: Job, dest: Path) -> list[str]:
        """Copy a finished job's result files into ``dest``; returns their names."""
        raise NotImplementedError

    async def cleanup(self, job: Job) -> None:
        """Release what the platform still holds for a finished job (spool, buckets)."""
        raise NotImplementedError
