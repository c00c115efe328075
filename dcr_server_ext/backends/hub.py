"""The cloud backend of a researcher's server: a client of the hub's cloud API (Confidential Space).

The server holds no Google credential. It sends the job's bundle with its grant id (and the grant itself,
which the VM's launch environment carries) to ``POST {hub API}/dcr/cloud/jobs/<id>?grant=<grant id>``,
using its own hub token; the hub checks the bundle against the grant, uploads it and launches one
Confidential VM per grant. State, cancel, results and cleanup go through the hub the same way; progress is
read by polling the hub (the hub reads the enclave's progress objects). Results arrive as the enclave
sealed them (to the job's key, or to the airlock's): the hub never sees plaintext.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import tarfile
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

from traitlets import Float, Int, TraitError, Unicode, validate

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError

from ..errors import APIError, Unavailable
from ..grant_sources import HubGrantSource
from ..model import Job
from .base import Backend, BackendStatus

#: The header that carries the grant JWT to the hub's launch (the hub's ``cloud.views.GRANT_HEADER``).
GRANT_HEADER: Final = "X-DCR-Grant"
#: Most result files and bytes taken from the hub (the grant's output limits are far below).
MAX_RESULT_FILES: Final = 64
MAX_RESULT_BYTES: Final = 2**30


class LaunchRefused(APIError):
    status = 400


class HubBackend(Backend):
    """Runs jobs on the hub's Confidential Space launcher."""

    api_url = Unicode(
        help="""The hub's API URL (``http://`` or ``https://``); default: ``$JUPYTERHUB_API_URL``, which
        JupyterHub gives every server.

        Example::

            c.HubBackend.api_url = "http://hub.internal:8081/hub/api"

        Security: launches carry this server's hub API token and the job's bundle; send them to your hub
        only, over ``https://`` (or JupyterHub's internal SSL) when the hub is on another machine.
        """,
    ).tag(config=True)

    request_timeout = Int(
        300,
        help="""Seconds to wait for one answer of the hub (a launch waits for the VM's insert); positive.

        Example::

            c.HubBackend.request_timeout = 300

        Security: none. A launch that times out may still have started the VM; sending it again starts
        no second one (one VM per grant).
        """,
    ).tag(config=True)

    poll_interval = Float(
        2.0,
        help="""Seconds between two reads of a running job's state from the hub (progress is polled: the
        enclave writes progress objects the hub reads). At least 0.1.

        Example::

            c.HubBackend.poll_interval = 2.0

        Security: none; each read is one request to the hub and a few to Cloud Storage.
        """,
    ).tag(config=True)

    @validate("api_url")
    def _valid_api_url(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if value:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise TraitError(f"HubBackend.api_url must be an http(s) URL of the hub's API, not {value!r}")
        return value

    @validate("request_timeout")
    def _valid_timeout(self, proposal: Any) -> int:
        if int(proposal["value"]) <= 0:
            raise TraitError("HubBackend.request_timeout must be a positive number of seconds")
        return int(proposal["value"])

    @validate("poll_interval")
    def _valid_poll(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not (math.isfinite(value) and value >= 0.1):
            raise TraitError("HubBackend.poll_interval must be at least 0.1 seconds")
        return value

    @property
    def _hub(self) -> HubGrantSource:
        return HubGrantSource(api_url=self.api_url, request_timeout=self.request_timeout, log=self.log)

    async def _request(
        self,
        method: str,
        job_id: str,
        suffix: str = "",
        *,
        body: bytes | None = None,
        query: str = "",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        contract.check_job_id(job_id)
        path = f"/dcr/cloud/jobs/{job_id}{suffix}{query}"
        resp = await self._hub._send(method, path, body, None, f"the cloud job {job_id}", extra=headers)
        return resp.code, bytes(resp.body or b"")

    @staticmethod
    def _check(code: int, data: bytes, what: str, expect: tuple[int, ...] = (200,)) -> dict[str, Any]:
        try:
            doc = json.loads(data or b"{}")
        except ValueError:
            doc = {}
        message = str(doc.get("error", "")) if isinstance(doc, dict) else ""
        if code in expect and isinstance(doc, dict):
            return doc
        if 400 <= code < 500 and code not in (408, 429):
            refused = LaunchRefused(message or f"the hub refused {what} (HTTP {code})")
            refused.status = code
            raise refused
        raise Unavailable(f"{what} failed at the hub (HTTP {code}{': ' + message if message else ''})")

    async def launch(self, job: Job, grant: str, bundle: Path) -> dict[str, Any]:
        grant_id = job.grant_id or _jti(grant)
        data = await asyncio.to_thread(bundle.read_bytes)
        code, body = await self._request(
            "POST",
            job.id,
            body=data,
            query="?" + urllib.parse.urlencode({"grant": grant_id}),
            headers={GRANT_HEADER: grant, "Content-Type": "application/x-tar"},
        )
        doc = self._check(code, body, "the cloud launch", (200, 201))
        return {"cloud": "hub", "grant_id": grant_id, "instance": doc.get("instance")}

    async def _status_doc(self, job: Job) -> dict[str, Any] | None:
        code, body = await self._request("GET", job.id)
        if code == 404:
            return None
        return self._check(code, body, "the cloud job's state")

    async def status(self, job: Job) -> BackendStatus | None:
        doc = await self._status_doc(job)
        return None if doc is None else _status(doc)

    async def progress(self, job: Job) -> AsyncIterator[BackendStatus]:
        """Each change, polled: the states the enclave passed through between two polls come first, in
        order (the hub lists them), so a quick job shows the same states as on the local enclave."""
        last: tuple[Any, ...] | None = None
        passed = 0
        while True:
            doc = await self._status_doc(job)
            if doc is None:
                return
            st = _status(doc)
            history = doc.get("states") if isinstance(doc.get("states"), list) else []
            for state in [s for s in history if s in contract.JOB_STATES][passed:]:
                passed += 1
                if state != st.state and (state, None, None) != last:
                    yield BackendStatus(state=state, enclave=st.enclave)
            key = (st.state, st.cell, st.cells)
            if key != last:
                last = key
                yield st
            if st.state in contract.TERMINAL_STATES or st.state == "held":
                return
            await asyncio.sleep(self.poll_interval)

    async def cancel(self, job: Job) -> None:
        code, body = await self._request("POST", job.id, "/cancel", body=b"")
        if code != 404:
            self._check(code, body, "the cancel")

    async def collect(self, job: Job, dest: Path) -> list[str]:
        code, body = await self._request("GET", job.id, "/result")
        if code != 200:
            self._check(code, body, "the job's result")
        return await asyncio.to_thread(_extract, body, dest)

    async def cleanup(self, job: Job) -> None:
        code, body = await self._request("DELETE", job.id)
        if code not in (404, 409):
            self._check(code, body, "the cleanup")


def _jti(grant: str) -> str:
    import jwt

    value = jwt.decode(grant, options={"verify_signature": False}).get("jti")
    if not isinstance(value, str) or not contract.GRANT_ID_RE.match(value):
        raise DCRError("the grant has no grant id")
    return value


def _extract(data: bytes, dest: Path) -> list[str]:
    """Unpack the hub's result tar into ``dest``: flat regular files with contract names only."""
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    names: list[str] = []
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if not member.isreg():
                    raise DCRError(f"the hub's result holds a non-file {member.name[:80]!r}")
                name = contract.check_file_name(member.name)
                total += member.size
                if len(names) >= MAX_RESULT_FILES or total > MAX_RESULT_BYTES:
                    raise DCRError("the hub's result is larger than allowed")
                f = tf.extractfile(member)
                assert f is not None
                fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(f.read())
                names.append(name)
    except tarfile.TarError as e:
        raise DCRError(f"the hub's result is not a tar archive: {e}") from None
    except FileExistsError:
        raise DCRError("the hub's result names a file twice") from None
    return sorted(names)


def _status(doc: dict[str, Any]) -> BackendStatus:
    enclave = doc.get("enclave") if isinstance(doc.get("enclave"), dict) else {}
    failure = doc.get("failure") if isinstance(doc.get("failure"), dict) else None
    cell, cells = doc.get("cell"), doc.get("cells")
    return BackendStatus(
        state=str(doc.get("state", "launching")),
        cell=cell if isinstance(cell, int) else None,
        cells=cells if isinstance(cells, int) else None,
        failure=failure,
        enclave={
            "kind": "confidential_space",
            "simulated": False,
            "image_digest": (enclave or {}).get("image_digest"),
        },
    )
