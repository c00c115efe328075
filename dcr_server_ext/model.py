"""The job as the user's server knows it: one record, shared by the store, the manager and the API.

The user's job store is a convenience (nothing security-relevant depends on it): the enclave checks the
grant, and outputs are sealed to a key only this server holds. The API form of a job is described by
``schemas/job.schema.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dcr_enclave.formats.contract import JOB_STATES, TERMINAL_STATES

#: States from which the reconciler still has work to do.
UNFINISHED_STATES = tuple(s for s in JOB_STATES if s not in TERMINAL_STATES and s != "held")

#: Each state's step in the lifecycle (``submitted → granted → launching → running → checking → held``,
#: then any terminal state): a job only ever moves to a later step. Platforms report in any order (a
#: progress stream may open with a stale snapshot, a restarted watch replays the history), so the order
#: is the store's to keep, not theirs.
LIFECYCLE_STEP: dict[str, int] = {
    **{s: i for i, s in enumerate(("submitted", "granted", "launching", "running", "checking", "held"))},
    **dict.fromkeys(TERMINAL_STATES, 6),
}


def moves_forward(old: str, new: str) -> bool:
    """Whether a job in ``old`` may go to ``new``: a later step (an ended job never changes)."""
    return old not in TERMINAL_STATES and LIFECYCLE_STEP[new] > LIFECYCLE_STEP[old]


def may_precede(new: str) -> list[str]:
    """The states from which a job may be stored as ``new``: earlier steps, and ``new`` itself."""
    return sorted(s for s in JOB_STATES if s == new or moves_forward(s, new))


@dataclass
class Job:
    id: str
    #: The notebook's path relative to the server's root directory (API form, "/"-separated).
    notebook: str
    state: str = "submitted"
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    bundle_digest: str = ""
    bundle_files: int = 0
    bundle_bytes: int = 0
    #: ``[{"provider", "dataset", "version", "release"}]`` as granted.
    datasets: list[dict[str, Any]] = field(default_factory=list)
    grant_id: str | None = None
    #: Dotted name of the backend class that launched it.
    backend: str = ""
    #: Whatever the backend needs to find the job again (opaque to everyone else).
    backend_ref: dict[str, Any] = field(default_factory=dict)
    cell: int | None = None
    cells: int | None = None
    #: ``{"reason", "cell", "ename"}`` for failed jobs; never data.
    failure: dict[str, Any] | None = None
    #: Where decrypted outputs were put, relative to the server root; set once they are there.
    outputs_path: str | None = None
    receipt: bool = False
    #: ``{"kind", "simulated", "image_digest"}`` once known.
    enclave: dict[str, Any] | None = None
    #: Held jobs: the airlock's review as the hub reports it (``{"status": "unsent"|"waiting"|"released"|
    #: "rejected", "reviewers", "required_approvals", "approvals", "comment", "decided_at", "note"}``);
    #: never anything of the outputs.
    review: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Job:
        return cls(**{k: rec[k] for k in cls.__dataclass_fields__ if k in rec})

    def to_api(self) -> dict[str, Any]:
        """The job JSON of the REST API and the labextension (schemas/job.schema.json)."""
        return {
            "id": self.id,
            "notebook": self.notebook,
            "state": self.state,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "bundle": {"digest": self.bundle_digest, "files": self.bundle_files, "bytes": self.bundle_bytes},
            "datasets": self.datasets,
            "progress": {"cell": self.cell, "cells": self.cells} if self.cells else None,
            "failure": self.failure,
            "outputs_path": self.outputs_path,
            "receipt": self.receipt,
            "enclave": self.enclave,
            "review": self.review,
            "backend": self.backend.rsplit(".", 1)[-1],
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
