"""The supervisor's private link to its TEE platform: attestation tokens, key release, progress.

Locally the enclave host hands each supervisor one end of a socket pair (file descriptor named by
``contract.LOCAL_LINK_FD``); nothing on the file system leads to it, so the kernel sandbox cannot reach it.
Messages are JSON objects, one per line, each request answered by one reply ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. In Confidential Space the same requests go to the launcher's
``teeserver.sock`` (tokens) and to STS/KMS (key release): :class:`dcr_enclave.cloud.link.CloudLink`.
Both satisfy :class:`PlatformLink`, the only thing the supervisor knows of its platform.
"""

from __future__ import annotations

import base64
import socket
from typing import Any, Protocol

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.messages import MAX_MESSAGE, decode, encode


class PlatformLink(Protocol):
    """What the supervisor asks of its TEE platform (blocking; one request at a time)."""

    def challenge(self) -> str:
        """A fresh nonce for the next key-release token."""
        ...

    def token(self, audience: str, nonces: list[str]) -> str:
        """An attestation token for ``audience`` carrying ``nonces``."""
        ...

    def release(self, **request: Any) -> tuple[bytes, str]:
        """A dataset's data key and the digest of the condition that released it; DCRError if refused."""
        ...

    def progress(self, msg: dict[str, Any]) -> None:
        """Report one Progress message (never data)."""
        ...

    def info(self) -> dict[str, Any]:
        """``{"kind", "image_digest", "jwks"}``: what the receipt says about the platform."""
        ...

    def close(self) -> None: ...


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

    def info(self) -> dict[str, Any]:
        return self.call("info")

    def close(self) -> None:
        self._rfile.close()
        self._sock.close()
