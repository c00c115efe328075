"""The hub's grant service: per-job grants for the user's server, in the hub process.

:class:`GrantService` holds what a grant needs (policy, keys, records) and the web handlers below serve it,
under the hub's API prefix (through ``JupyterHub.extra_handlers``):

- ``POST /hub/api/dcr/grants`` -- the user's server asks, with its hub API token, for a grant for one job:
  ``{"job_id", "bundle_digest", "datasets": ["provider/dataset", ...] (empty: every entitled dataset),
  "output_public_key": "<base64url X25519>"}`` -> ``201 {"grant", "grant_id", "job_id", "expires_at",
  "datasets", "hub_key_thumbprint"}``. Refusals are ``400/401/403/409/429 {"error": "..."}`` and every one
  is written to the audit log. With ``"dry_run": true`` (``job_id`` and ``output_public_key`` then
  optional) the same checks run and the answer is ``200`` with what would be granted, or the refusal the
  real request would get; nothing is signed or recorded.
- ``GET /hub/api/dcr/jwks`` -- public: the hub key's JWKS and thumbprint, for enclaves and providers.
- ``GET /hub/api/dcr/datasets`` -- the caller's entitled datasets (provider, version, protection, ε, files,
  and the link to the fidelity report when the policy names one).
- ``GET /hub/api/dcr/datasets/<provider>/<dataset>/fidelity-report`` -- that researcher-facing report, to
  entitled users only (token or the hub's login cookie, so a browser can follow the link), inert (a
  sandboxing Content-Security-Policy: no scripts, no requests).

The service is started, and its routes added, by the start hook (:mod:`dcr_spawner.hub_start`, armed by
``dcr_spawner.enable(c)`` or by loading a DCR spawner); until then every route answers 503.

Caller authentication is JupyterHub's own: the request's API token resolves to a hub user (never a
service), and the token must carry ``users:activity`` for that user, which every single-user server's token
and every full user token have. Entitlement uses the user's groups as they are in the hub's database at
that moment, so removing someone from a group takes the dataset out of their next grant.

Note: ``JupyterHub.extra_handlers`` logs a deprecation warning since JupyterHub 3.1 (the maintainers point
to services). It is still the only way to answer inside the hub process, where the hub's own token checks
and group membership are at hand without a second copy of either.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.user import User
from jupyterhub.utils import url_path_join

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import DIGEST_RE
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.pack.grant_issuer import build_grant, issue_grant
from dcr_enclave.pack.store import Store

from .hubdb import GrantedJob, HubDB, Usage
from .hubkey import AirlockKey, HubKey, load_or_create_airlock_key, load_or_create_hub_key
from .policy import DCRPolicy, PolicyError, parse_provider

#: The key in the hub's tornado settings under which the running service is found.
SETTINGS_KEY: Final = "dcr_grant_service"
API_PREFIX: Final = "/api/dcr"
MAX_BODY_BYTES: Final = 64 * 1024
MAX_DATASETS_PER_JOB: Final = 100
#: Grants outlive the job's time limit by this much (set by ``dcr_enclave.grant.issue_grant``).
GRANT_GRACE_SECONDS: Final = 600
#: A fidelity report is shown as a document, never run: no scripts, no requests, no framing, an opaque
#: origin; only its inline styles and data: images (the plots ``dcr provider`` embeds) are allowed.
REPORT_CSP: Final = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'; sandbox"
)


class Refusal(Exception):
    """A grant request the service turns down: an HTTP status and a message for the researcher."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class GrantRequest:
    #: ``None`` only in a dry run that names no job (the server's preview has none yet).
    job_id: str | None
    bundle_digest: str
    datasets: list[str]
    #: ``None`` only in a dry run that sends no key.
    output_public_key: bytes | None
    dry_run: bool = False


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def is_dry_run(body: bytes) -> bool:
    """Whether ``body`` asks for a dry run (``"dry_run": true``), even if it is otherwise malformed: a dry
    run's refusals are answered, not recorded."""
    if len(body) > MAX_BODY_BYTES:
        return False
    try:
        doc = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("dry_run") is True


def parse_request(body: bytes) -> GrantRequest:
    """Parse and check a grant request body; :class:`Refusal` (400) saying what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise Refusal(400, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        doc = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Refusal(400, "the request body is not JSON") from None
    if not isinstance(doc, dict):
        raise Refusal(400, "the request body must be a JSON object")
    unknown = set(doc) - {"job_id", "bundle_digest", "datasets", "output_public_key", "dry_run"}
    if unknown:
        raise Refusal(400, f"unknown field(s) {sorted(unknown)}")
    dry_run = doc.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise Refusal(400, '"dry_run" must be true or false')
    job_id = doc.get("job_id")
    if not (dry_run and job_id is None) and (
        not isinstance(job_id, str) or not contract.JOB_ID_RE.match(job_id)
    ):
        raise Refusal(400, '"job_id" must look like job-<24 hex digits>')
    digest = doc.get("bundle_digest")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise Refusal(400, '"bundle_digest" must be sha256:<64 hex digits>')
    datasets = doc.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise Refusal(400, '"datasets" must be a list of "provider/dataset" names')
    if len(datasets) > MAX_DATASETS_PER_JOB:
        raise Refusal(400, f"a job may name at most {MAX_DATASETS_PER_JOB} datasets")
    key = doc.get("output_public_key")
    raw: bytes | None = None
    if not (dry_run and key is None):
        try:
            raw = _b64url_decode(key) if isinstance(key, str) and len(key) <= 64 else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise Refusal(400, '"output_public_key" must be a base64url 32-byte X25519 public key')
    return GrantRequest(job_id, digest, list(dict.fromkeys(datasets)), raw, dry_run)


def _shown(refs: list[str], limit: int = 10) -> str:
    """The dataset names of a refusal as the researcher wrote them, bounded (a request may name 100)."""
    names = [r if len(r) <= 130 else r[:127] + "..." for r in refs[:limit]]
    more = f" and {len(refs) - limit} more" if len(refs) > limit else ""
    return ", ".join(names) + more


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class GrantService:
    """Policy, keys and records: everything a grant needs, independent of the web layer."""

    policy: DCRPolicy
    db: HubDB
    hub_key: HubKey
    airlock_key: AirlockKey
    clock: Callable[[], float] = field(default=time.time)
    #: One worker thread runs every database step: the hub's event loop never waits on a commit, and
    #: grants are serialised, so checking the quotas and recording the grant happen as one step.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcr-grants")
    )

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a (database) step of this service on its worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args, **kwargs))

    @classmethod
    def start(cls, policy: DCRPolicy, hub_groups: set[str], base_dir: Path | None = None) -> GrantService:
        """Validate the policy against the hub, load or create the keys, open the records database.

        Raises :class:`PolicyError` (or :class:`DCRError`) naming what is wrong.
        """
        policy.validate_against_hub(hub_groups)
        hub_key = _with_trait(
            "hub_key_file", lambda: load_or_create_hub_key(policy.resolve_path(policy.hub_key_file, base_dir))
        )
        airlock = _with_trait(
            "airlock_key_file",
            lambda: load_or_create_airlock_key(policy.resolve_path(policy.airlock_key_file, base_dir)),
        )
        db = _with_trait("db_url", lambda: _open_db(policy.db_url))
        policy.log.info(
            "DCR: grant service ready; hub key %s (thumbprint %s), records in %s, %d dataset(s)",
            hub_key.path,
            hub_key.thumbprint,
            db.url,
            len(policy.datasets),
        )
        return cls(policy, db, hub_key, airlock)

    # Grants -------------------------------------------------------------------------------------------

    def issue(self, user: str, groups: set[str], body: bytes, *, remote: str = "") -> dict[str, Any]:
        """Check and grant one job for ``user``; :class:`Refusal` on any refusal (already audited).

        One read transaction for every count, one write transaction for the grant: the rate limit comes
        first (malformed requests count too), then the request's shape, the entitlement, the quotas.

        A dry run (``"dry_run": true``) runs the same checks in the same order and answers what would be
        granted, or raises the same :class:`Refusal`; it signs nothing and writes nothing (no job, no audit
        entry, and it does not count toward the request rate).
        """
        now = int(self.clock())
        req: GrantRequest | None = None
        dry_run = is_dry_run(body)
        try:
            first: Refusal | None = None
            granted: list[GrantedDataset] = []
            try:
                req = parse_request(body)
                granted = self._entitled_datasets(user, groups, req.datasets)
            except Refusal as r:
                first = r
            self._note_ended_jobs(user, now)
            usage = self.db.usage(user, [d.key for d in granted], now)
            per_minute = self.policy.quota("grant_requests_per_minute")
            if usage.requests_last_minute >= per_minute:
                raise Refusal(
                    429,
                    f"too many grant requests: at most {per_minute} a minute",
                    headers={"Retry-After": "60"},
                )
            if first is not None:
                raise first
            assert req is not None
            self._check_quotas(usage)
            if req.dry_run:
                return self._would_grant(user, req, granted, now)
            return self._grant(user, req, granted, now, remote)
        except Refusal as r:
            if not dry_run:
                self.refuse(
                    r,
                    user=user,
                    job_id=req.job_id if req else None,
                    datasets=req.datasets if req else [],
                    remote=remote,
                )
            raise

    def refuse(
        self,
        refusal: Refusal,
        *,
        user: str | None,
        job_id: str | None = None,
        datasets: list[str] | None = None,
        remote: str = "",
        service: str | None = None,
    ) -> None:
        """Write a refusal to the audit log (a service that asked is named in the detail, not as a user)."""
        detail: dict[str, Any] = {"datasets": datasets or [], "remote": remote}
        if service is not None:
            detail["service"] = service
        self.db.audit(
            "grant.refused",
            status=refusal.status,
            user=user,
            job_id=job_id,
            reason=refusal.message,
            detail=detail,
            at=int(self.clock()),
        )

    def _entitled_datasets(self, user: str, groups: set[str], wanted: list[str]) -> list[GrantedDataset]:
        entitled = self.policy.entitled_refs(user, groups)
        if wanted:
            # Unknown and not-entitled datasets get the same answer: the reply names only what was asked
            # for, so it does not reveal what exists.
            outside = [ref for ref in wanted if ref not in entitled]
            if outside:
                raise self._not_entitled(outside)
        elif not entitled:
            raise Refusal(
                403,
                "you are not entitled to any dataset: ask the hub's administrator for access to the "
                "datasets you need",
            )
        refs = wanted or entitled
        out = []
        for ref in refs:
            spec = self.policy.spec(ref)
            assert spec is not None
            try:  # read afresh: a provider may retire the pinned version while the hub runs
                Store(spec.store).grantable(spec.provider, spec.dataset, spec.version)
            except DCRError as e:
                raise Refusal(403, f"{ref}: {e.message}") from None
            out.append(granted_dataset(spec))
        return out

    def _note_ended_jobs(self, user: str, now: int) -> None:
        """Ask the platform which of the user's running jobs have ended, so they stop counting at once (a
        job that failed in a second must not hold a quota slot until its time limit)."""
        unended = self.db.unended_grants(user, now)
        if unended:
            ended = self.policy.platform().ended(unended)
            if ended:
                self.db.record_ends(ended & set(unended), now)

    def _not_entitled(self, refs: list[str]) -> Refusal:
        """The refusal for datasets the user asked for and may not use, saying whom to ask.

        The provider is named when ``c.DCRPolicy.providers`` gives the provider part of a name a display
        name, whether or not the dataset exists: the answer for ``acme/secret`` and ``acme/no-such`` is the
        same.
        """
        declared = {
            p: parse_provider(p, spec).name
            for p, spec in self.policy.providers.items()
            if isinstance(spec, Mapping) and "name" in spec
        }
        by_provider: dict[str, list[str]] = {}
        for ref in refs:
            name = declared.get(ref.partition("/")[0])
            if name is not None:
                by_provider.setdefault(name, []).append(ref)
        who = ""
        if len(by_provider) == 1 and sum(map(len, by_provider.values())) == len(refs):
            who = f" (data provider: {next(iter(by_provider))})"
        elif by_provider:
            each = "; ".join(f"{name} for {_shown(r)}" for name, r in by_provider.items())
            who = f" (data providers: {each})"
        return Refusal(
            403, f"you are not entitled to {_shown(refs)}: ask the hub's administrator for access{who}"
        )

    def _check_quotas(self, usage: Usage) -> None:
        concurrent = self.policy.quota("concurrent_jobs_per_user")
        if usage.running_jobs >= concurrent:
            raise Refusal(
                429,
                f"you have {concurrent} job(s) running, the most allowed at once; "
                "try again when one has ended",
            )
        per_day = self.policy.quota("jobs_per_day_per_user")
        if usage.jobs_last_day >= per_day:
            raise Refusal(429, f"you have had {per_day} job(s) in the last 24 hours, the most allowed")
        per_dataset = self.policy.quota("jobs_per_day_per_dataset")
        for ref, n in usage.dataset_jobs_last_day.items():
            if n >= per_dataset:
                raise Refusal(
                    429, f"{ref} has had {per_dataset} job(s) in the last 24 hours, the most allowed"
                )

    def _would_grant(
        self, user: str, req: GrantRequest, datasets: list[GrantedDataset], now: int
    ) -> dict[str, Any]:
        """A dry run's answer: what :meth:`_grant` would sign, checked the same way, nothing signed or
        recorded. A job id it names must still be free (job ids are single-use)."""
        policy = self.policy
        if req.job_id is not None and self.db.job_exists(req.job_id):
            raise Refusal(409, f"job {req.job_id} already has a grant")
        try:
            g = build_grant(
                user=user,
                job_id=req.job_id or contract.new_job_id(),
                bundle_digest=req.bundle_digest,
                datasets=datasets,
                output_public_key=req.output_public_key or bytes(32),
                output_limits=policy.limits(),
                time_limit=policy.time_limit,
                memory_bytes=policy.memory_limit,
                now=now,
            )
        except DCRError as e:
            raise Refusal(400, f"grant refused: {e}") from None
        return {
            "dry_run": True,
            "user": user,
            "datasets": [d.to_json() for d in g.datasets],
            "output_limits": g.output_limits.to_json(),
            "time_limit": g.time_limit,
            "memory_bytes": g.memory_bytes,
            "hub_key_thumbprint": self.hub_key.thumbprint,
        }

    def _grant(
        self, user: str, req: GrantRequest, datasets: list[GrantedDataset], now: int, remote: str
    ) -> dict[str, Any]:
        policy = self.policy
        assert req.job_id is not None and req.output_public_key is not None
        grant_id = contract.new_grant_id()
        try:
            token = issue_grant(
                self.hub_key.private,
                user=user,
                job_id=req.job_id,
                bundle_digest=req.bundle_digest,
                datasets=datasets,
                output_public_key=req.output_public_key,
                output_limits=policy.limits(),
                time_limit=policy.time_limit,
                memory_bytes=policy.memory_limit,
                # Every grant: outputs with disclosure findings are held for review under "auto" too.
                airlock_public_key=self.airlock_key.public,
                disclosure=policy.disclosure_rules(d.key for d in datasets),
                grant_id=grant_id,
                now=now,
            )
        except DCRError as e:
            raise Refusal(400, f"grant refused: {e}") from None
        expires_at = now + policy.time_limit + GRANT_GRACE_SECONDS
        job = GrantedJob(
            grant_id=grant_id,
            job_id=req.job_id,
            user=user,
            bundle_digest=req.bundle_digest,
            output_public_key=base64.urlsafe_b64encode(req.output_public_key).rstrip(b"=").decode(),
            issued_at=now,
            ends_at=now + policy.time_limit,
            expires_at=expires_at,
            datasets=tuple((d.key, d.version, d.release) for d in datasets),
        )
        try:
            self.db.record_grant(job, {"remote": remote, "bundle_digest": req.bundle_digest})
        except DCRError:
            raise Refusal(409, f"job {req.job_id} already has a grant") from None
        return {
            "grant": token,
            "grant_id": grant_id,
            "job_id": req.job_id,
            "expires_at": _iso(expires_at),
            "datasets": [d.to_json() for d in datasets],
            "hub_key_thumbprint": self.hub_key.thumbprint,
        }

    # Read-only views ----------------------------------------------------------------------------------

    def datasets_for(
        self, user: str, groups: set[str], report_base: str | None = None
    ) -> list[dict[str, Any]]:
        """The datasets view of ``user``; ``report_base`` is the URL the fidelity report routes hang from
        (``.../api/dcr/datasets``), without which no report link is given."""
        out = []
        for e in self.policy.entitled(user, groups):
            manifest = self.policy.manifest(e.ref)
            spec = self.policy.spec(e.ref)
            p = e.protection
            report = None
            if spec is not None and spec.fidelity_report is not None and report_base is not None:
                report = f"{report_base.rstrip('/')}/{e.provider}/{e.dataset}/fidelity-report"
            out.append(
                {
                    "provider": e.provider,
                    "dataset": e.dataset,
                    "version": e.version,
                    "release": e.release,
                    "protection": p.kind,
                    "mechanism": p.mechanism,
                    "epsilon": p.epsilon,
                    "delta": p.delta,
                    "description": str(self.policy.datasets[e.ref].get("description", "")),
                    "files": [
                        {
                            "name": f.name,
                            "path": contract.data_path(e.provider, e.dataset, f.name),
                            "synthetic_size": f.synthetic_size,
                        }
                        for f in manifest.files
                    ],
                    "fidelity_report": report,
                }
            )
        return out

    def entitled_report(self, user: str, groups: set[str], ref: str) -> bool:
        """Whether ``user`` may read the fidelity report of ``ref``: the policy names one, and the user is
        entitled to the dataset or reviews for its provider (the provider's page links to it)."""
        spec = self.policy.spec(ref)
        if spec is None or spec.fidelity_report is None:
            return False
        provider = self.policy.provider(spec.provider)
        reviewer = provider is not None and provider.may_review(user, groups)
        return reviewer or ref in self.policy.entitled_refs(user, groups)


def granted_dataset(spec: Any) -> GrantedDataset:
    """The grant's entry for a policy dataset, with its ``cloud`` entry (KMS key, pool provider, store) when
    the policy gives one: the enclave uses exactly these, never what storage says."""
    doc: dict[str, Any] = {
        "provider": spec.provider,
        "dataset": spec.dataset,
        "version": spec.version,
        "release": spec.release,
    }
    if spec.cloud is not None:
        doc["cloud"] = dict(spec.cloud)
    return GrantedDataset.from_json(doc)


def _with_trait(trait: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except PolicyError:
        raise
    except DCRError as e:
        raise PolicyError(e.message, trait=trait, hint=e.hint) from None


def _open_db(url: str) -> HubDB:
    db = HubDB(url)
    db.setup()
    return db


# ---------------------------------------------------------------------------------------------------------
# Web layer
# ---------------------------------------------------------------------------------------------------------


class _DCRHandler(APIHandler):
    """JSON in, JSON out, errors as ``{"error": "..."}``."""

    @property
    def grant_service(self) -> GrantService | None:
        return self.settings.get(SETTINGS_KEY)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self._json(status_code, {"error": message})

    def _json(self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.set_header(k, v)
        self.finish(json.dumps(doc))

    def _unavailable(self) -> None:
        self._json(503, {"error": "the DCR grant service is not running on this hub (see the hub's log)"})

    def _caller(self, *, token_only: bool) -> tuple[User, set[str]] | Refusal:
        """The hub user making this request and their groups, or why the request is refused."""
        user = self.current_user
        if user is None:
            return Refusal(
                401,
                "no valid hub API token: send your server's token as 'Authorization: token <JUPYTERHUB_API_TOKEN>'",
            )
        if not isinstance(user, User):
            return Refusal(403, "grants are for hub users; a service token cannot request one")
        if token_only and self.get_token() is None:
            return Refusal(401, "grant requests must carry a hub API token, not a browser cookie")
        if not self.has_scope(f"users:activity!user={user.name}"):
            return Refusal(403, f"this token may not act for {user.name} (it lacks users:activity)")
        return user, {g.name for g in user.orm_user.groups}

    def _reader(self) -> tuple[GrantService, User, set[str]] | None:
        """For the read-only routes (token or login cookie): the service and the calling user with their
        groups, or None once the refusal has been answered."""
        service = self.grant_service
        if service is None:
            self._unavailable()
            return None
        caller = self._caller(token_only=False)
        if isinstance(caller, Refusal):
            self._json(caller.status, {"error": caller.message})
            return None
        return service, *caller


class GrantsHandler(_DCRHandler):
    async def post(self) -> None:
        service = self.grant_service
        if service is None:
            return self._unavailable()
        remote = self.request.remote_ip or ""
        caller = self._caller(token_only=True)
        if isinstance(caller, Refusal):
            current = self.current_user
            if isinstance(current, User) or current is None:
                await service.run(service.refuse, caller, user=getattr(current, "name", None), remote=remote)
            else:
                await service.run(service.refuse, caller, user=None, remote=remote, service=str(current.name))
            return self._json(caller.status, {"error": caller.message})
        user, groups = caller  # read from the hub's database here, on the hub's own thread
        try:
            doc = await service.run(service.issue, user.name, groups, self.request.body, remote=remote)
        except Refusal as r:
            what = "dry run" if is_dry_run(self.request.body) else "grant"
            self.log.info("DCR: %s refused to %s (%d): %s", what, user.name, r.status, r.message)
            return self._json(r.status, {"error": r.message}, r.headers)
        if doc.get("dry_run"):
            self.log.debug("DCR: dry run for %s: would grant %d dataset(s)", user.name, len(doc["datasets"]))
            return self._json(200, doc)
        self.log.info("DCR: grant %s issued to %s for %s", doc["grant_id"], user.name, doc["job_id"])
        self._json(201, doc)


class JWKSHandler(_DCRHandler):
    def check_xsrf_cookie(self) -> None:
        return None  # public, read-only, no credentials needed

    async def get(self) -> None:
        service = self.grant_service
        if service is None:
            return self._unavailable()
        self.set_header("Cache-Control", "public, max-age=300")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(service.hub_key.jwks()))


class DatasetsHandler(_DCRHandler):
    async def get(self) -> None:
        if (reader := self._reader()) is None:
            return
        service, user, groups = reader
        datasets = service.datasets_for(user.name, groups, report_base=self.report_base())
        self._json(200, {"user": user.name, "datasets": datasets})

    def report_base(self) -> str:
        """Where the browser finds the report routes: a path on the hub, or the hub's own host when user
        servers are on subdomains (the link is followed from the server's page)."""
        return (self.subdomain_host or "") + url_path_join(
            self.hub.base_url, API_PREFIX.lstrip("/"), "datasets"
        )


class FidelityReportHandler(_DCRHandler):
    async def get(self, provider: str, dataset: str) -> None:
        if (reader := self._reader()) is None:
            return
        service, user, groups = reader
        ref = f"{provider}/{dataset}"
        # Unknown, not entitled and without a report get the same answer: nothing about what exists.
        if not service.entitled_report(user.name, groups, ref):
            return self._json(404, {"error": f"no fidelity report of {ref} is available to you"})
        try:
            report = await asyncio.to_thread(service.policy.fidelity_report, ref)
        except DCRError as e:
            # Checked at start; changed since (moved, replaced by the provider-only report, ...).
            self.log.error("DCR: not serving the fidelity report of %s: %s", ref, e)
            return self._json(503, {"error": f"the fidelity report of {ref} is not available now"})
        if report is None:
            return self._json(404, {"error": f"no fidelity report of {ref} is available to you"})
        self.set_status(200)
        self.set_header("Content-Type", report.media_type)
        self.set_header("Content-Security-Policy", REPORT_CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header(
            "Content-Disposition", f'inline; filename="{provider}-{dataset}-fidelity{report.path.suffix}"'
        )
        self.finish(report.data)


def routes() -> list[tuple[str, type, dict[str, Any]]]:
    """The grant service's routes, relative to the hub's prefix (``dcr_spawner.enable(c)`` adds them)."""
    return [
        (API_PREFIX + "/grants", GrantsHandler, {}),
        (API_PREFIX + "/jwks", JWKSHandler, {}),
        (API_PREFIX + "/datasets", DatasetsHandler, {}),
        (API_PREFIX + "/datasets/([^/]+)/([^/]+)/fidelity-report", FidelityReportHandler, {}),
    ]
