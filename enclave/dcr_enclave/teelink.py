"""The supervisor's private link to its TEE platform: attestation tokens, key release, progress.

Locally the enclave host hands each supervisor one end of a socket pair (file descriptor named by
``contract.LOCAL_LINK_FD``); nothing on the file system leads to it, so the kernel sandbox cannot reach it.
Messages are JSON objects, one per line, each request answered by one reply ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. In Confidential Space the same requests go to the launcher's
``teeserver.sock`` (tokens) and to STS/KMS (key release).
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

from .errors import DCRError

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


class TeeLink:
    """The supervisor's side of the link (blocking; one request at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rfile = sock.makefile("rb")

    @classmethod
    def from_fd(cls, fd: int) -> TeeLink:
        return cls(socket.socket(fileno=fd))

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self._sock.sendall(encode({"op": op, **fields}))
        line = self._rfile.readline(MAX_MESSAGE + 1)
        if not line:
            raise DCRError(f"the TEE platform closed the link during {op!r}")
        reply = decode(line)
        if not reply.get("ok"):
            raise DCRError(str(reply.get("error") or f"{op} refused"))
        return reply

    def challenge(self) -> str:
        return str(self.call("challenge")["challenge"])

    def token(self, audience: str, nonces: list[str]) -> str:
        return str(self.call("token", audience=audience, nonces=nonces)["token"])

    def release(self, **request: Any) -> tuple[bytes, str]:
        """A dataset's data key and the digest of the provider condition that released it."""
        reply = self.call("release", **request)
        return base64.b64decode(reply["data_key"]), str(reply["condition_digest"])

    def progress(self, msg: dict[str, Any]) -> None:
        self.call("progress", msg=msg)

    def close(self) -> None:
        self._rfile.close()
        self._sock.close()
