"""A small threaded HTTP server on 127.0.0.1 for the fakes (never another address)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: (status, content type, body) from a route handler given (method, path, headers, body).
Reply = tuple[int, str, bytes]
Handler = Callable[[str, str, Any, bytes], Reply]
MAX_BODY = 1 << 20


def json_reply(status: int, doc: Any) -> Reply:
    return status, "application/json", json.dumps(doc).encode()


class LoopbackServer:
    def __init__(self, handle: Handler) -> None:
        outer = self

        class _H(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    status, ctype, body = json_reply(413, {"error": "too large"})
                else:
                    data = self.rfile.read(length) if length else b""
                    try:
                        status, ctype, body = outer.handle(method, self.path, self.headers, data)
                    except Exception as e:  # a fake's bug shows as a 500 naming it
                        status, ctype, body = json_reply(
                            500, {"error": f"fake error {type(e).__name__}: {e}"}
                        )
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self._any("POST")

            def do_GET(self) -> None:
                self._any("GET")

        self.handle = handle
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
