"""The pinned Cloud Storage emulator (``gcp-storage-emulator``), run as a subprocess on a loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StorageEmulator:
    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> StorageEmulator:
        """Start the emulator (once) and wait until it listens; ``client`` and ``create_bucket`` start it too."""
        if self._proc is not None:
            return self
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gcp_storage_emulator",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--in-memory",
                "-q",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode()[-2000:] if self._proc.stderr else ""
                self.stop()
                raise RuntimeError(f"the storage emulator exited: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the storage emulator did not listen in time")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None

    def client(self) -> Any:
        self.start()
        return storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.endpoint}
        )

    def create_bucket(self, name: str) -> Any:
        return self.client().create_bucket(name)


#: The name the shared spec's readers may look for.
StorageFake = StorageEmulator
