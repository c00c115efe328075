"""The executed notebook as researchers open it: a marked copy beside the enclave's outputs.

The enclave's executed notebook keeps its name under ``outputs/`` (the receipt covers those bytes as they
are), so opened from there it shows in a tab titled exactly like the notebook the researcher submitted. The
job's folder therefore also gets ``<stem>.enclave-<first 8 hex digits of the job id>.ipynb``: the same
notebook with a first markdown cell saying that it ran on the real data in the enclave, naming the job and
linking its receipt, and ``metadata.dcr`` naming the job (from which the JupyterLab extension draws its
banner with a link to the receipt viewer). The copy lies outside ``outputs/``, so ``dcr verify`` of the job
folder checks the enclave's bytes and is not disturbed by it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Final

from dcr_enclave.formats import contract

#: The key of the marked copy's notebook metadata (and of its banner cell's metadata).
METADATA_KEY: Final = "dcr"
#: The banner cell's id (nbformat 4.5 cells carry ids).
BANNER_CELL_ID: Final = "dcr-enclave-run"


def marked_copy_name(notebook: str, job_id: str) -> str:
    """``analysis.ipynb`` of ``job-1a2b3c4d…`` → ``analysis.enclave-1a2b3c4d.ipynb``."""
    return f"{PurePosixPath(notebook).stem}.enclave-{job_id.removeprefix('job-')[:8]}.ipynb"


def banner_text(job_id: str, notebook_name: str, outputs_path: str) -> str:
    original = f"{contract.OUTPUTS_DIR}/{notebook_name}"
    return (
        f"**Executed in the enclave on the real data** — Data Clean Room job `{job_id}`\n\n"
        "This is your notebook as the enclave ran it, on the *real* datasets, not on the synthetic ones "
        f"of your sandbox. Its receipt: **Receipt** of job `{job_id}` in the Data Clean Room sidebar, "
        f"[{contract.RECEIPT_FILE}]({contract.RECEIPT_FILE}) in this folder, or offline "
        f"`dcr verify {outputs_path}`. The receipt covers [{original}]({original.replace(' ', '%20')}) byte "
        "for byte; this copy only adds this cell."
    )


def write_marked_copy(job_dir: Path, notebook: str, job_id: str, outputs_path: str) -> Path | None:
    """Write the marked copy of ``job_dir/outputs/<notebook's name>`` into ``job_dir``; its path, or
    ``None`` when the outputs hold no such notebook (a notebook the run removed, or not JSON)."""
    name = PurePosixPath(notebook).name
    source = job_dir / contract.OUTPUTS_DIR / name
    if source.is_symlink() or not source.is_file():
        return None
    try:
        nb: Any = json.loads(source.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        return None
    cell: dict[str, Any] = {
        "cell_type": "markdown",
        "metadata": {METADATA_KEY: {"banner": True}},
        "source": banner_text(job_id, name, outputs_path),
    }
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) >= (4, 5):
        cell["id"] = BANNER_CELL_ID
    metadata: dict[str, Any] = nb["metadata"] if isinstance(nb.get("metadata"), dict) else {}
    marked = {
        **nb,
        "cells": [cell, *nb["cells"]],
        "metadata": {
            **metadata,
            METADATA_KEY: {"job_id": job_id, "executed_in_enclave": True, "original": f"outputs/{name}"},
        },
    }
    dest = job_dir / marked_copy_name(notebook, job_id)
    dest.write_text(json.dumps(marked, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest
