"""The hub's audit views: who may read which part of the audit trail, as JSON, CSV or a page.

- ``GET /hub/api/dcr/audit?format=json|csv[&provider=NAME]`` -- hub admins get every event; a provider's
  reviewers (``c.DCRPolicy.providers[...]["reviewers"]``, users and groups) get the events naming a
  dataset of a provider they review; anyone else ``403``. JSON: ``{"verification", "head", "events"}``,
  every field of each event (hashes included) and, for an event of a job, its ``receipt_url``
  (``<hub>/hub/dcr/receipts/<job_id>``). CSV: a header row, then one row per event.
- ``GET /hub/dcr/audit[?provider=NAME]`` -- the same events as a page of the hub (JupyterHub's templates),
  with the chain's verification at the top and the download links.

Both are read-only GETs, answered to the hub's login cookie or an API token; both first copy the enclave
platform's new events in (:func:`dcr_spawner.audit.ingest_platform_events`), so they show what has
happened up to now. :func:`routes` lists them for the hub (``dcr_spawner.enable(c)`` adds them).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final
from urllib.parse import urlencode

from jupyterhub.handlers.base import BaseHandler
from jupyterhub.user import User
from jupyterhub.utils import url_path_join
from tornado import web

from .audit import csv_text, event_json, ingest_platform_events, iter_events
from .grant_service import API_PREFIX, SETTINGS_KEY, GrantService, _DCRHandler

#: Most events the page shows (the newest); the downloads have them all.
PAGE_EVENTS: Final = 500
#: Where the receipt pages are (built elsewhere; this module only links to them).
RECEIPTS_PATH: Final = "dcr/receipts"


class AuditAccess:
    """What one hub user may read of the audit trail: everything (an admin), or the events of the
    providers they review."""

    def __init__(self, service: GrantService, user: User) -> None:
        groups = {g.name for g in user.orm_user.groups}
        self.admin = bool(user.admin)
        specs = service.policy.provider_specs()
        self.providers = sorted(p for p, spec in specs.items() if spec.may_review(user.name, groups))
        self.known = set(specs)

    @property
    def allowed(self) -> bool:
        return self.admin or bool(self.providers)

    def selection(self, provider: str | None) -> list[str] | None:
        """The providers whose events to show (``None``: all), or ``PermissionError``."""
        if provider:
            if self.admin or provider in self.providers:
                return [provider]
            raise PermissionError(f"you do not review the datasets of provider {provider!r}")
        return None if self.admin else list(self.providers)


async def _collect(
    service: GrantService, providers: list[str] | None, limit: int | None = None
) -> dict[str, Any]:
    """Ingest the platform's new events, verify the chain, read the events (off the event loop)."""

    def work() -> dict[str, Any]:
        ingest_platform_events(service.db, service.policy.platform())
        verification = service.db.verify_audit()
        events = list(iter_events(service.db, providers))
        if limit is not None:
            events = events[-limit:]
        return {"verification": verification, "head": service.db.audit_head(), "events": events}

    return await asyncio.to_thread(work)


def _receipt_base(handler: Any) -> str:
    return (handler.subdomain_host or "") + url_path_join(handler.hub.base_url, RECEIPTS_PATH)


class AuditAPIHandler(_DCRHandler):
    """``GET /hub/api/dcr/audit``."""

    async def get(self) -> None:
        service = self.grant_service
        if service is None:
            return self._unavailable()
        user = self.current_user
        if user is None:
            return self._json(403, {"error": "log in to the hub, or send a hub API token"})
        if not isinstance(user, User):
            return self._json(403, {"error": "the audit trail is for hub users"})
        access = AuditAccess(service, user)
        if not access.allowed:
            return self._json(403, {"error": "the audit trail is for hub admins and providers' reviewers"})
        fmt = self.get_argument("format", "json")
        if fmt not in ("json", "csv"):
            return self._json(400, {"error": "format must be json or csv"})
        try:
            providers = access.selection(self.get_argument("provider", None))
        except PermissionError as e:
            return self._json(403, {"error": str(e)})
        got = await _collect(service, providers)
        base = _receipt_base(self)
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        if fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="dcr-audit.csv"')
            return self.finish(csv_text(got["events"], base))
        head = got["head"]
        doc = {
            "verification": got["verification"].to_json(),
            "head": {"id": head[0], "hash": head[1], "count": head[2]},
            "providers": providers,
            "events": [event_json(e, base) for e in got["events"]],
        }
        self.set_status(200)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc))


class AuditPageHandler(BaseHandler):
    """``GET /hub/dcr/audit``: the audit trail as a page of the hub."""

    @web.authenticated
    async def get(self) -> None:
        service: GrantService | None = self.settings.get(SETTINGS_KEY)
        if service is None:
            raise web.HTTPError(503, "the DCR grant service is not running on this hub")
        user = self.current_user
        if not isinstance(user, User):
            raise web.HTTPError(403)
        access = AuditAccess(service, user)
        if not access.allowed:
            raise web.HTTPError(403, "The audit trail is for hub admins and providers' reviewers.")
        provider = self.get_argument("provider", None) or None
        try:
            providers = access.selection(provider)
        except PermissionError as e:
            raise web.HTTPError(403, str(e)) from None
        got = await _collect(service, providers, PAGE_EVENTS)
        base = _receipt_base(self)
        api = url_path_join(self.hub.base_url, API_PREFIX.lstrip("/"), "audit")
        query = "&" + urlencode({"provider": provider}) if provider else ""
        html = await self.render_template(
            "dcr-audit.html",
            verification=got["verification"],
            head=got["head"],
            events=[event_json(e, base) for e in reversed(got["events"])],
            shown_limit=PAGE_EVENTS,
            providers=providers,
            choices=sorted(access.known) if access.admin else access.providers,
            provider=provider,
            csv_url=f"{api}?format=csv{query}",
            json_url=f"{api}?format=json{query}",
            page_url=url_path_join(self.hub.base_url, "dcr/audit"),
        )
        self.set_header("Cache-Control", "no-store")
        self.finish(html)


def routes() -> list[tuple[str, type, dict[str, Any]]]:
    """The audit views' routes, relative to the hub's prefix (``/hub``)."""
    return [
        (API_PREFIX + "/audit", AuditAPIHandler, {}),
        ("/dcr/audit", AuditPageHandler, {}),
    ]
