"""The job event on the Jupyter Server event bus: its schema and how a Job becomes one.

The schema file (``events/job.json``, jupyter_events format: ``$id`` a URI, ``version`` a string) is
registered by the extension with ``serverapp.event_logger.register_event_schema(EVENT_SCHEMA_PATH)``; pass
the :class:`~pathlib.Path` itself, as jupyter_events parses a plain string as the schema's YAML text.
Subscribers (the JupyterLab extension, ``/api/events/subscribe``) get the job id, its state, cell *i* of *n*
and a failure reason: never data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from .model import Job

EVENT_SCHEMA_ID: Final = "https://jupyterhub-dcr.invalid/events/job/v1"
EVENT_SCHEMA_VERSION: Final = "1"
EVENT_SCHEMA_PATH: Final = Path(__file__).resolve().parent / "events" / "job.json"


def job_event(job: Job) -> dict[str, Any]:
    """The event data for ``event_logger.emit(schema_id=EVENT_SCHEMA_ID, data=job_event(job))``."""
    reason = job.failure.get("reason") if job.failure else None
    return {
        "job_id": job.id,
        "state": job.state,
        "cell": job.cell,
        "cells": job.cells,
        "reason": str(reason) if reason is not None else None,
    }
