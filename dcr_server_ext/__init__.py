"""DCR's Jupyter server extension: submit notebooks to the enclave from the user's own server.

The extension adds a REST API under ``/dcr/api`` (see ``openapi.yaml``), keeps the user's job store,
holds each job's output key, drives the enclave backend and streams job events on the server's event bus.
It is enabled on install (``jupyter-config/jupyter_server_config.d/dcr_server_ext.json``).
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    # Imported here so that importing the package (for the model or the CLI) does not pull in the server.
    from .app import DCRExtension

    return [{"module": "dcr_server_ext", "app": DCRExtension}]
