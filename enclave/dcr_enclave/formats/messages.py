"""Messages between a supervisor, its platform and the platform's clients: one JSON object per line."""

from __future__ import annotations

import json
from typing import Any

from dcr_enclave.formats.errors import DCRError

#: A message is a few kilobytes at most (a token, a grant, a JWKS); more is refused as hostile.
MAX_MESSAGE = 256 * 1024


def encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise DCRError("link message too large")
    return data


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE or not line.endswith(b"\n"):
        raise DCRError("link message too large or truncated")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DCRError("link message is not JSON") from None
    if not isinstance(obj, dict):
        raise DCRError("link message is not a JSON object")
    return obj
