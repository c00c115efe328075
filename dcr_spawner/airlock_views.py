"""The airlock's web routes in the hub: the researcher's server's API and the reviewers' pages.

For the researcher's server (hub API token of the job's owner, under ``/hub/api/dcr/airlock``):

- ``POST jobs/<job_id>`` -- the held result as ``application/x-tar`` (receipt files and sealed files) ->
  ``201`` the review status (``200`` when the same result was delivered before). Refused with ``400``
  (malformed), ``404`` (not the caller's job), ``409`` (not this job's attested held result: a forged or
  altered result), ``413`` (too large), ``503`` (the hub cannot check receipts).
- ``GET jobs/<job_id>`` -- ``{"status": "waiting"|"released"|"rejected", "reviewers", "required_approvals",
  "approvals", "comment", "decided_at"}``: who decides and how far they are; never anything of the outputs.
- ``POST jobs/<job_id>/failure`` -- a failed run's detail as the enclave sealed it to the airlock
  (``application/octet-stream``): reviewers may release the traceback to the researcher.
- ``GET jobs/<job_id>/release`` -- once released: a tar of the outputs and the reveal (or of the failure
  detail), sealed to the job's own key (``409`` before).

For people (the hub's login cookie; pages from JupyterHub's templates):

- ``/hub/dcr/review`` -- the queue of held jobs the caller may review (a provider's reviewers; admins when
  ``c.DCRPolicy.admins_review``);
- ``/hub/dcr/review/<job_id>`` -- one job: who, when, datasets and versions, the notebook as run with its
  outputs, every output file, the automated checks' findings, and approve / reject with a comment
  (``POST``, XSRF-protected);
- ``/hub/dcr/review/<job_id>/files/<path>`` -- one output file as it is, for download (inert: sandboxed);
- ``/hub/dcr/provider`` -- a provider's datasets and versions, fidelity reports, queue and audit links, and
  how to register a new version;
- ``/hub/dcr/receipts/<job_id>`` -- a held job's public receipt, for its owner, its reviewers and admins.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from typing import Any, Final
from urllib.parse import quote

from jupyterhub.handlers.base import BaseHandler
from jupyterhub.user import User
from jupyterhub.utils import url_path_join
from markupsafe import Markup
from tornado import web

from dcr_enclave.formats import contract

from .airlock import Airlock, AirlockRefusal
from .airlock_records import HeldJob
from .grant_service import API_PREFIX, REPORT_CSP, Refusal, _DCRHandler
from .review_render import kind_of, render_file

#: The tornado setting under which the running airlock is found.
SETTINGS_KEY: Final = "dcr_airlock"
PAGE_PREFIX: Final = "/dcr"
QUEUE_PAGE_SIZE: Final = 100


def _airlock(handler: web.RequestHandler) -> Airlock | None:
    return handler.settings.get(SETTINGS_KEY)


# ---------------------------------------------------------------------------------------------------------
# The researcher's server
# ---------------------------------------------------------------------------------------------------------


class _AirlockAPIHandler(_DCRHandler):
    async def _owner(self) -> tuple[Airlock, User] | None:
        airlock = _airlock(self)
        if airlock is None:
            self._json(503, {"error": "the DCR airlock is not running on this hub (see the hub's log)"})
            return None
        caller = self._caller(token_only=True)
        if isinstance(caller, Refusal):
            self._json(caller.status, {"error": caller.message})
            return None
        return airlock, caller[0]

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except AirlockRefusal as r:
            doc = {"error": r.message} | ({"hint": r.hint} if r.hint else {})
            self._json(r.status, doc)
            return None


class HeldJobHandler(_AirlockAPIHandler):
    async def post(self, job_id: str) -> None:
        if (owner := await self._owner()) is None:
            return
        airlock, user = owner
        held = await self._call(airlock.receive, user.name, job_id, self.request.body)
        if held is None:
            return
        self.log.info("DCR: airlock holds %s of %s for review", job_id, user.name)
        self._json(201, airlock.describe(held))

    async def get(self, job_id: str) -> None:
        if (owner := await self._owner()) is None:
            return
        airlock, user = owner
        doc = await self._call(airlock.status_for_owner, user.name, job_id)
        if doc is not None:
            self._json(200, doc)


class FailureHandler(_AirlockAPIHandler):
    async def post(self, job_id: str) -> None:
        if (owner := await self._owner()) is None:
            return
        airlock, user = owner
        held = await self._call(airlock.receive_failure, user.name, job_id, self.request.body)
        if held is None:
            return
        self.log.info("DCR: airlock holds the failure detail of %s of %s for review", job_id, user.name)
        self._json(201, airlock.describe(held))


class ReleaseHandler(_AirlockAPIHandler):
    async def get(self, job_id: str) -> None:
        if (owner := await self._owner()) is None:
            return
        airlock, user = owner
        payload = await self._call(airlock.released_files, user.name, job_id)
        if payload is None:
            return
        self.set_header("Content-Type", "application/x-tar")
        self.set_header("Cache-Control", "no-store")
        self.finish(payload)


# ---------------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------------


class _PageHandler(BaseHandler):
    """A page for a logged-in person; the airlock and the caller's groups at hand."""

    def airlock(self) -> Airlock:
        airlock = _airlock(self)
        if airlock is None:
            raise web.HTTPError(503, "the DCR airlock is not running on this hub (see the hub's log)")
        return airlock

    def caller(self) -> tuple[str, set[str], bool]:
        user = self.current_user
        if not isinstance(user, User):
            raise web.HTTPError(403, "these pages are for hub users")
        return user.name, {g.name for g in user.orm_user.groups}, bool(user.admin)

    def page_url(self, *parts: str) -> str:
        return url_path_join(self.hub.base_url, PAGE_PREFIX.lstrip("/"), *parts)

    def held_or_404(self, job_id: str) -> HeldJob:
        airlock = self.airlock()
        name, groups, admin = self.caller()
        try:
            contract.check_job_id(job_id)
        except Exception:
            raise web.HTTPError(404, "no such held job") from None
        held = airlock.held(job_id)
        if held is None or not airlock.may_view(name, groups, held, admin=admin):
            raise web.HTTPError(404, f"no held job {job_id} is yours to review")
        return held

    def job_view(self, held: HeldJob) -> dict[str, Any]:
        airlock = self.airlock()
        doc = airlock.describe(held)
        doc.update(
            user=held.user,
            datasets=[{"ref": r, "version": v, "release": m} for r, v, m in held.datasets],
            findings=held.findings,
            notebook=held.notebook,
            reviews=held.reviews,
            url=self.page_url("review", held.job_id),
        )
        return doc


class ReviewQueuePage(_PageHandler):
    @web.authenticated
    async def get(self) -> None:
        airlock = self.airlock()
        name, groups, admin = self.caller()
        status = self.get_argument("status", "waiting")
        if status not in ("waiting", "released", "rejected", "all"):
            raise web.HTTPError(400, "status must be waiting, released, rejected or all")
        try:
            page = max(0, int(self.get_argument("page", "0")))
        except ValueError:
            raise web.HTTPError(400, "page must be a number") from None
        providers = airlock.reviewable_providers(name, groups, admin=admin)
        jobs, total = await asyncio.to_thread(
            airlock.queue,
            name,
            groups,
            admin=admin,
            limit=QUEUE_PAGE_SIZE,
            offset=page * QUEUE_PAGE_SIZE,
            status=None if status == "all" else status,
        )
        html = await self.render_template(
            "dcr-review-queue.html",
            jobs=[self.job_view(h) for h in jobs],
            total=total,
            page=page,
            pages=max(1, -(-total // QUEUE_PAGE_SIZE)),
            status=status,
            providers=airlock.provider_names(sorted(providers)),
            reviewer=bool(providers),
            review_url=self.page_url("review"),
            provider_url=self.page_url("provider"),
        )
        self.finish(html)


class ReviewJobPage(_PageHandler):
    @web.authenticated
    async def get(self, job_id: str) -> None:
        held = self.held_or_404(job_id)
        airlock = self.airlock()
        name, _, _ = self.caller()
        opened = await asyncio.to_thread(airlock.open_for_review, held)
        files = []
        for path in sorted(opened.files):
            data = opened.files[path]
            files.append(
                {
                    "path": path,
                    "size": len(data),
                    "kind": kind_of(path),
                    "html": Markup(render_file(path, data)),  # noqa: S704 (render_file escapes every byte it shows)
                    "url": self.page_url("review", held.job_id, "files", quote(path)),
                }
            )
        notebook = next((f for f in files if f["path"] == held.notebook), None)
        self.set_header("Cache-Control", "no-store")
        html = await self.render_template(
            "dcr-review-job.html",
            job=self.job_view(held),
            files=files,
            notebook_file=notebook,
            check=opened.check,
            failure=opened.failure,
            own=held.user == name,
            decided=name in {r.reviewer for r in held.reviews},
            receipt_url=self.page_url("receipts", held.job_id),
            review_url=self.page_url("review"),
            message=self.get_argument("message", ""),
        )
        self.finish(html)

    @web.authenticated
    async def post(self, job_id: str) -> None:
        held = self.held_or_404(job_id)
        airlock = self.airlock()
        name, groups, admin = self.caller()
        decision = self.get_body_argument("decision", "")
        comment = self.get_body_argument("comment", "")
        try:
            await asyncio.to_thread(airlock.decide, name, groups, held.job_id, decision, comment, admin=admin)
        except AirlockRefusal as r:
            return self._refused(r)
        self.log.info("DCR: %s decided %s on %s", name, decision, held.job_id)
        self.redirect(self.page_url("review", held.job_id) + "?message=" + quote(f"recorded: {decision}"))

    def _refused(self, r: AirlockRefusal) -> None:
        """A refused decision (nothing was recorded): its status, and why, for the person who made it."""
        self.set_status(r.status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{r.message}\n")


class ReviewFilePage(_PageHandler):
    @web.authenticated
    async def get(self, job_id: str, path: str) -> None:
        held = self.held_or_404(job_id)
        opened = await asyncio.to_thread(self.airlock().open_for_review, held)
        data = opened.files.get(path)
        if data is None:
            raise web.HTTPError(404, "no such output")
        kind = kind_of(path)
        mime = mimetypes.guess_type(path)[0] if kind == "image" else None
        self.set_header("Content-Type", mime or "application/octet-stream")
        self.set_header("Content-Security-Policy", REPORT_CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        name = path.rsplit("/", 1)[-1].replace('"', "")
        disposition = "inline" if mime else "attachment"
        self.set_header("Content-Disposition", f"{disposition}; filename*=UTF-8''{quote(name)}")
        self.finish(data)


class ProviderPage(_PageHandler):
    @web.authenticated
    async def get(self) -> None:
        airlock = self.airlock()
        name, groups, admin = self.caller()
        providers = sorted(airlock.reviewable_providers(name, groups, admin=admin))
        if not providers:
            raise web.HTTPError(403, "this page is for the reviewers of a data provider")
        policy = airlock.policy
        specs = policy.provider_specs()
        rows = []
        for p in providers:
            datasets = []
            for spec in policy.specs():
                if spec.provider != p:
                    continue
                manifest = policy.manifest(spec.ref)
                datasets.append(
                    {
                        "ref": spec.ref,
                        "version": spec.version,
                        "release": spec.release,
                        "protection": manifest.protection.kind,
                        "files": [f.name for f in manifest.files],
                        "report": url_path_join(
                            self.hub.base_url,
                            API_PREFIX.lstrip("/"),
                            "datasets",
                            spec.provider,
                            spec.dataset,
                            "fidelity-report",
                        )
                        if spec.fidelity_report is not None
                        else None,
                        "store": str(spec.store),
                    }
                )
            rows.append({"key": p, "name": specs[p].name if p in specs else p, "datasets": datasets})
        _, waiting_total = await asyncio.to_thread(airlock.queue, name, groups, admin=admin, limit=0)
        html = await self.render_template(
            "dcr-provider.html",
            providers=rows,
            waiting=waiting_total,
            review_url=self.page_url("review"),
            audit_url=self.page_url("audit"),
            approvals=policy.review_approvals,
        )
        self.finish(html)


class ReceiptPage(_PageHandler):
    @web.authenticated
    async def get(self, job_id: str) -> None:
        airlock = self.airlock()
        name, groups, admin = self.caller()
        try:
            contract.check_job_id(job_id)
        except Exception:
            raise web.HTTPError(404, "no such receipt") from None
        held = airlock.held(job_id)
        if held is None or not (
            held.user == name or admin or airlock.may_view(name, groups, held, admin=admin)
        ):
            raise web.HTTPError(404, f"no receipt of job {job_id} is available to you")
        files = await asyncio.to_thread(airlock.receipt_files, job_id)
        if self.get_argument("format", "") == "json":
            self.set_header("Content-Type", "application/json")
            self.finish(files.get(contract.RECEIPT_FILE, b"{}"))
            return
        manifest = json.loads(files.get(contract.RECEIPT_FILE, b"{}"))
        html = await self.render_template(
            "dcr-receipt.html",
            job=self.job_view(held),
            manifest=json.dumps(manifest, indent=2, sort_keys=True),
            token=files.get(contract.TOKEN_FILE, b"").decode("ascii", "replace").strip(),
        )
        self.finish(html)


def routes() -> list[tuple[str, type, dict[str, Any]]]:
    """The airlock's routes, relative to the hub's prefix."""
    job = "(job-[a-z0-9]+)"
    return [
        (API_PREFIX + f"/airlock/jobs/{job}", HeldJobHandler, {}),
        (API_PREFIX + f"/airlock/jobs/{job}/failure", FailureHandler, {}),
        (API_PREFIX + f"/airlock/jobs/{job}/release", ReleaseHandler, {}),
        (PAGE_PREFIX + "/review", ReviewQueuePage, {}),
        (PAGE_PREFIX + f"/review/{job}", ReviewJobPage, {}),
        (PAGE_PREFIX + f"/review/{job}/files/(.+)", ReviewFilePage, {}),
        (PAGE_PREFIX + "/provider", ProviderPage, {}),
        (PAGE_PREFIX + f"/receipts/{job}", ReceiptPage, {}),
    ]
