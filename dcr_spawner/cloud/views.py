"""The hub's cloud API, which researchers' servers (:class:`~dcr_server_ext.backends.hub.HubBackend`) call
with their own hub token; servers hold no Google credential.

- ``POST   /hub/api/dcr/cloud/jobs/<job_id>?grant=<grant id>`` -- body: the bundle (``application/x-tar``,
  at most ``max_bundle_bytes``), header ``X-DCR-Grant: <the grant JWT>`` (the VM's launch environment
  carries it). Launches once per grant; ``201`` with the job's state (``failed`` with a reason when Compute
  refused the VM).
- ``GET    .../cloud/jobs/<job_id>`` -- ``{"state", "cell", "cells", "failure", "enclave"}``.
- ``POST   .../cloud/jobs/<job_id>/cancel`` -- deletes the VM; the job's state after it.
- ``GET    .../cloud/jobs/<job_id>/result`` -- a tar of the result objects (sealed), once the job ended.
- ``DELETE .../cloud/jobs/<job_id>`` -- deletes the ended job's VM (if any) and objects.

Only the job's own user may call them: anyone else gets ``404`` (nothing says the job exists).
Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Final

from jupyterhub.user import User

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError

from ..grant_service import API_PREFIX, Refusal, _DCRHandler
from .jobs import CloudJobs, CloudRefusal

SETTINGS_KEY: Final = "dcr_cloud_jobs"
GRANT_HEADER: Final = "X-DCR-Grant"
MAX_GRANT_HEADER: Final = 64 * 1024
#: Compute and storage calls block: they run here, never on the hub's event loop.
_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dcr-cloud")


class CloudJobHandler(_DCRHandler):
    @property
    def jobs(self) -> CloudJobs | None:
        return self.settings.get(SETTINGS_KEY)

    def _user(self) -> str | None:
        """The calling hub user's name (token only), or ``None`` once the refusal has been answered."""
        if self.jobs is None:
            self._json(404, {"error": "this hub does not launch jobs in the cloud"})
            return None
        caller = self._caller(token_only=True)
        if isinstance(caller, Refusal):
            self._json(caller.status, {"error": caller.message})
            return None
        user, _groups = caller
        assert isinstance(user, User)
        return str(user.name)

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, partial(fn, *args))
        except CloudRefusal as r:
            self._json(r.status, {"error": r.message})
        except DCRError as e:
            self.log.warning("DCR: cloud request failed: %s", e)
            self._json(503, {"error": f"the cloud platform cannot be reached now: {e.message}"})
        except Exception as e:
            self.log.exception("DCR: cloud request failed")
            self._json(503, {"error": f"the cloud platform failed ({type(e).__name__}); try again"})
        return None

    async def post(self, job_id: str, action: str | None = None) -> None:
        user = self._user()
        if user is None:
            return
        jobs = self.jobs
        assert jobs is not None
        if action == "cancel":
            doc = await self._run(jobs.cancel, user, job_id)
            if doc is not None:
                self._json(200, doc)
            return
        if action is not None:
            return self._json(404, {"error": "no such action"})
        grant_id = self.get_query_argument("grant", "")
        grant = self.request.headers.get(GRANT_HEADER, "")
        if not contract.GRANT_ID_RE.match(grant_id):
            return self._json(400, {"error": "?grant= must be the job's grant id (grant-<32 hex>)"})
        if not grant or len(grant) > MAX_GRANT_HEADER:
            return self._json(400, {"error": f"the {GRANT_HEADER} header must carry the job's grant"})
        doc = await self._run(jobs.launch, user, job_id, grant_id, grant, self.request.body)
        if doc is not None:
            self.log.info("DCR: cloud launch of %s for %s: %s", job_id, user, doc.get("state"))
            self._json(201, doc)

    async def get(self, job_id: str, action: str | None = None) -> None:
        user = self._user()
        if user is None:
            return
        jobs = self.jobs
        assert jobs is not None
        if action is None:
            doc = await self._run(jobs.status, user, job_id)
            if doc is not None:
                self._json(200, doc)
            return
        if action != "result":
            return self._json(404, {"error": "no such resource"})
        data = await self._run(jobs.result, user, job_id)
        if data is None:
            return
        self.set_status(200)
        self.set_header("Content-Type", "application/x-tar")
        self.set_header("Cache-Control", "no-store")
        self.finish(data)

    async def delete(self, job_id: str, action: str | None = None) -> None:
        user = self._user()
        if user is None:
            return
        jobs = self.jobs
        assert jobs is not None
        if action is not None:
            return self._json(404, {"error": "no such resource"})
        done = await self._run(jobs.cleanup, user, job_id)
        if not self._finished:
            self._json(200, {"job_id": job_id, "deleted": True} if done is None else done)


def routes() -> list[tuple[str, type, dict[str, Any]]]:
    return [(API_PREFIX + r"/cloud/jobs/([^/]+)(?:/(cancel|result))?", CloudJobHandler, {})]
