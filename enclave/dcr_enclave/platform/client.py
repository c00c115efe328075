"""A client for ``dcr enclave-host``'s unix socket (used by ``dcr local-run`` and the local backend).

Every call opens its own connection, so a client object can be shared between threads.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.messages import MAX_MESSAGE, decode, encode

DEFAULT_SOCKET = "/run/dcr/enclave-host.sock"


class HostClient:
    def __init__(self, socket_path: str | Path = DEFAULT_SOCKET, timeout: float | None = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _connect(self, timeout: float | None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.socket_path)
        except OSError as e:
            s.close()
            raise DCRError(
                f"cannot reach the enclave host at {self.socket_path}: {e.strerror or e}",
                hint="start it with `dcr enclave-host` (as root)",
            ) from None
        return s

    def call(self, op: str, fds: list[int] | None = None, **fields: Any) -> dict[str, Any]:
        with self._connect(self.timeout) as s:
            data = encode({"op": op, **fields})
            if fds:
                socket.send_fds(s, [data], fds)
            else:
                s.sendall(data)
            with s.makefile("rb") as f:
                return _reply(f.readline(MAX_MESSAGE + 1), op)

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def jwks(self) -> dict[str, Any]:
        return self.call("jwks")["jwks"]

    def launch(self, grant: str, bundle: Path) -> dict[str, Any]:
        """Launch (idempotent by grant id); the bundle travels as an open descriptor, not a path."""
        fd = os.open(bundle, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return self.call("launch", fds=[fd], grant=grant)["job"]
        finally:
            os.close(fd)

    def status(self, job_id: str) -> dict[str, Any]:
        return self.call("status", job_id=job_id)["job"]

    def jobs(self) -> list[dict[str, Any]]:
        return self.call("list")["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("cancel", job_id=job_id)["job"]

    def delete(self, job_id: str) -> dict[str, Any]:
        """Remove a finished job's results from the host (idempotent)."""
        return self.call("delete", job_id=job_id)["job"]

    def grant_states(self, grant_ids: list[str]) -> dict[str, str]:
        """Root only (the hub's quota): each grant id's state on this host, at most 1000 ids a call.

        ``"unused"``: never launched here (it may still be); ``"running"``: its job has not ended;
        ``"ended"``: its job ended (held included), or the host no longer knows it (restarted)."""
        return self.call("grant_states", grant_ids=list(grant_ids))["states"]

    def events(self, after: str | None = None) -> dict[str, Any]:
        """Root only (the hub's audit trail): the host's journalled job events after the cursor ``after``
        (none: from the start), a page at a time: ``{"events": [...], "cursor": str, "more": bool}``."""
        reply = self.call("events", after=after)
        return {"events": reply["events"], "cursor": reply["cursor"], "more": bool(reply.get("more"))}

    def watch(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Yield the job's current state, then each change as it happens, ending with the final state."""
        with self._connect(None) as s:
            s.sendall(encode({"op": "watch", "job_id": job_id}))
            with s.makefile("rb") as f:
                while line := f.readline(MAX_MESSAGE + 1):
                    msg = _reply(line, "watch")
                    yield msg
                    if msg.get("end"):
                        return
        raise DCRError("the enclave host closed the progress stream early")

    def result(self, job_id: str, dest: Path) -> list[str]:
        """Copy a finished job's result files (receipt, token, sealed outputs or failure) into ``dest``."""
        with self._connect(self.timeout) as s:
            s.sendall(encode({"op": "result", "job_id": job_id}))
            data, fds, _flags, _addr = socket.recv_fds(s, MAX_MESSAGE, 16)
            try:
                reply = _reply(data, "result")
                names = reply["files"]
                if len(names) != len(fds):
                    raise DCRError("the enclave host sent a malformed result")
                dest.mkdir(parents=True, exist_ok=True)
                for name, fd in zip(names, fds, strict=True):
                    if "/" in name or name.startswith("."):
                        raise DCRError(f"the enclave host sent a bad file name {name!r}")
                    with os.fdopen(os.dup(fd), "rb") as src, open(dest / name, "wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                return names
            finally:
                for fd in fds:
                    os.close(fd)


def _reply(line: bytes, op: str) -> dict[str, Any]:
    if not line:
        raise DCRError(f"the enclave host closed the connection during {op!r}")
    msg = decode(line if line.endswith(b"\n") else line + b"\n")
    if not msg.get("ok"):
        raise DCRError(str(msg.get("error") or f"{op} refused"))
    return msg
