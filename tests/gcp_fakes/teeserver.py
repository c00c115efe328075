"""A fake of the Confidential Space launcher's token service: HTTP over a unix socket, ``POST /v1/token``."""

from __future__ import annotations

import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from gcp_fakes.issuer import FakeAttestationIssuer

#: Google's bounds on custom-token nonces.
MIN_NONCE_BYTES, MAX_NONCE_BYTES, MAX_NONCES = 10, 74, 6
MAX_BODY = 64 * 1024


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: TeeServerFake


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def _reply(self, status: int, body: str, ctype: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if self.path != "/v1/token":
            self._reply(404, "not found")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._reply(400, "bad request body")
            return
        try:
            req = json.loads(self.rfile.read(length))
            problem = _check(req)
        except ValueError:
            problem = "the body is not JSON"
        if problem:
            self._reply(400, problem)
            return
        fake = self.server.fake
        token = fake.issuer.issue(fake.claims, req["audience"], req["nonces"], req.get("token_type", "OIDC"))
        fake.requests.append(req)
        self._reply(200, token)


def _check(req: Any) -> str | None:
    if not isinstance(req, dict) or not isinstance(req.get("audience"), str) or not req["audience"]:
        return "audience is required"
    nonces = req.get("nonces", [])
    if not isinstance(nonces, list) or len(nonces) > MAX_NONCES:
        return f"at most {MAX_NONCES} nonces"
    for n in nonces:
        if not isinstance(n, str) or not MIN_NONCE_BYTES <= len(n.encode()) <= MAX_NONCE_BYTES:
            return f"each nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes"
    if req.get("token_type", "OIDC") not in ("OIDC", "PKI"):
        return "token_type must be OIDC or PKI"
    return None


class TeeServerFake:
    """Issues tokens with ``claims`` (a VM's, see :func:`gcp_fakes.issuer.vm_claims`) to whoever asks."""

    def __init__(
        self, socket_path: str | Path, issuer: FakeAttestationIssuer, claims: dict[str, Any]
    ) -> None:
        self.socket_path = str(socket_path)
        self.issuer = issuer
        self.claims = claims
        self.requests: list[dict[str, Any]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> TeeServerFake:
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        self._server = _Server(self.socket_path, _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
