"""The ``local`` backend: jobs run on this machine's enclave host (``dcr enclave-host``).

The enclave host is a root-owned daemon; this server talks to it on its unix socket. Launching needs the
hub's grant (the host verifies it), the bundle travels as an open file descriptor, and the host answers
questions about a job only to the account that launched it.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from traitlets import Float, TraitError, Unicode, validate

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.platform.client import DEFAULT_SOCKET, HostClient

from ..errors import Unavailable
from ..model import Job
from .base import Backend, BackendStatus


class LocalBackend(Backend):
    socket_path = Unicode(
        DEFAULT_SOCKET,
        help="""Unix socket of the enclave host (``dcr enclave-host --socket``).

        Example::

            c.LocalBackend.socket_path = "/run/dcr/enclave-host.sock"

        Security: the enclave host is a *simulated* TEE: the same isolation and key release as the cloud,
        no hardware memory encryption. Point this only at a host run by the machine's administrator (root).
        """,
    ).tag(config=True)

    timeout = Float(
        30.0,
        help="""Seconds to wait for the enclave host to answer a request (progress streams wait forever);
        a positive number.

        Example::

            c.LocalBackend.timeout = 10.0

        Security: no security decision depends on it. The host answers a cancel only once the job's
        processes have ended: a value too short makes such requests fail here although the host carries
        them out.
        """,
    ).tag(config=True)

    @validate("socket_path")
    def _valid_socket(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if not value.startswith("/"):
            raise ValueError(f"LocalBackend.socket_path must be an absolute path, not {value!r}")
        return value

    @validate("timeout")
    def _valid_timeout(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not (math.isfinite(value) and value > 0):
            raise TraitError(f"LocalBackend.timeout must be a positive number of seconds, not {value!r}")
        return value

    @property
    def client(self) -> HostClient:
        return HostClient(self.socket_path, timeout=self.timeout)

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except DCRError as e:
            if "cannot reach the enclave host" in e.message:
                raise Unavailable(e.message, hint=e.hint) from None
            raise

    async def launch(self, job: Job, grant: str, bundle: Path) -> dict[str, Any]:
        info = await self._call(self.client.launch, grant, bundle)
        return {"host_job": info["job_id"], "socket": self.socket_path}

    async def status(self, job: Job) -> BackendStatus | None:
        try:
            info = await self._call(self.client.status, job.id)
        except Unavailable:
            raise
        except DCRError as e:
            if "no such job" in e.message:
                return None
            raise
        return _status(info)

    async def progress(self, job: Job) -> AsyncIterator[BackendStatus]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[BackendStatus | BaseException | None] = asyncio.Queue()
        client = self.client

        def pump() -> None:
            current: dict[str, Any] = {}
            try:
                for msg in client.watch(job.id):
                    if "job" in msg:
                        current = dict(msg["job"])
                    elif "event" in msg:
                        current.update({k: v for k, v in msg["event"].items() if k != "job_id"})
                    loop.call_soon_threadsafe(queue.put_nowait, _status(current))
            except BaseException as e:  # handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, daemon=True, name=f"dcr-watch-{job.id}").start()
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            # The host ends the stream after the terminal state with a full snapshot of the job: read to the end.
            yield item

    async def cancel(self, job: Job) -> None:
        await self._call(self.client.cancel, job.id)

    async def collect(self, job: Job, dest: Path) -> list[str]:
        names: list[str] = await self._call(self.client.result, job.id, dest)
        return names

    async def cleanup(self, job: Job) -> None:
        await self._call(self.client.delete, job.id)


def _status(info: dict[str, Any]) -> BackendStatus:
    cell = info.get("cell") or [None, None]
    return BackendStatus(
        state=str(info.get("state", "launching")),
        cell=cell[0],
        cells=cell[1],
        failure=info.get("failure"),
        enclave={"kind": "local", "simulated": True, "image_digest": info.get("image_digest") or None},
    )
