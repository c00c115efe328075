"""Digests and canonical JSON, the two ways DCR names content.

A digest is always written ``sha256:<64 lowercase hex>``. Signed and content-addressed documents are
serialised with :func:`canonical_json` so that the same document has the same bytes on every machine.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Protocol

from dcr_enclave.formats.errors import DCRError

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
READ_SIZE = 1 << 20


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def canonical_json(obj: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no insignificant white space."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a document's canonical JSON."""
    return sha256_bytes(canonical_json(obj))


def sha256_stream(stream: Readable) -> tuple[str, int]:
    """Digest and length of a stream, read in fixed-size pieces (memory flat in size)."""
    h = hashlib.sha256()
    total = 0
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    while n := stream.readinto(view):
        h.update(view[:n])
        total += n
    return "sha256:" + h.hexdigest(), total


def sha256_file(path: str | Path) -> tuple[str, int]:
    with open(path, "rb", buffering=0) as f:
        return sha256_stream(f)


def check_digest(value: Any, what: str) -> str:
    """Return ``value`` if it is a well-formed digest, else refuse naming ``what``."""
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise DCRError(f"{what} is not a digest of the form sha256:<64 hex digits>: {value!r}")
    return value
