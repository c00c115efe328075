"""Where the per-job grant comes from. Chosen by ``c.DCRExtension.grant_source_class``.

In production the hub's grant service issues grants (it alone holds the hub key and the policy). The
development source below signs grants itself with a local key that the enclave host is told to trust;
it exists for tests, demos and a provider trying DCR on one machine, and says so in the log.

Each source can also answer a **dry run** (:meth:`GrantSource.check`): the same policy questions as a grant
request, for the server's submission preview, without a grant being signed or recorded.

Each source also lists the datasets the user may submit with (:meth:`GrantSource.datasets`, shown by the
JupyterLab extension): the hub's view of the user's entitlements, or every dataset of the local store.
Every entry has the shape of :func:`dataset_entry`.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from traitlets import Enum, Int, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

from dcr_enclave.formats import contract
from dcr_enclave.formats.dataset import PROTECTION_KINDS, DatasetVersion
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset, OutputLimits
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import read_private_key
from dcr_enclave.pack.store import Store

from .errors import APIError, Unavailable


class GrantRefused(APIError):
    status = 403


class NotSupported(APIError):
    status = 501


#: Links the UI may show for a fidelity report: web pages or paths on the hub, never script URLs.
_REPORT_URL_RE = re.compile(r"^(https?://|/)[^\s<>\"']{1,2000}$")
_PROTECTIONS = PROTECTION_KINDS


def dataset_entry(
    *,
    provider: str,
    dataset: str,
    version: str | None,
    release: str | None,
    protection: str | None,
    mechanism: str | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    description: str = "",
    files: list[dict[str, Any]] | None = None,
    fidelity_report: str | None = None,
) -> dict[str, Any]:
    """One dataset as ``GET /dcr/api/datasets`` lists it (``Dataset`` in openapi.yaml)."""
    return {
        "provider": provider,
        "dataset": dataset,
        "version": version,
        "release": release,
        "protection": protection,
        "mechanism": mechanism,
        "epsilon": epsilon,
        "delta": delta,
        "description": description,
        "files": files or [],
        "fidelity_report": fidelity_report,
    }


def _from_manifest(manifest: DatasetVersion, release: str) -> dict[str, Any]:
    p = manifest.protection
    return dataset_entry(
        provider=manifest.provider,
        dataset=manifest.dataset,
        version=manifest.version,
        release=release,
        protection=p.kind,
        mechanism=p.mechanism,
        epsilon=p.epsilon,
        delta=p.delta,
        files=[
            {
                "name": f.name,
                "path": contract.data_path(manifest.provider, manifest.dataset, f.name),
                "synthetic_size": f.synthetic_size,
            }
            for f in manifest.files
        ],
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: Any, limit: int = 2000) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _from_hub(doc: Any) -> dict[str, Any] | None:
    """A dataset entry of the hub's ``/dcr/datasets`` answer, keeping only well-formed fields (the hub is
    trusted, but what reaches the browser is still checked: names, numbers, links)."""
    if not isinstance(doc, dict):
        return None
    provider, dataset = doc.get("provider"), doc.get("dataset")
    if not (isinstance(provider, str) and contract.NAME_RE.match(provider)):
        return None
    if not (isinstance(dataset, str) and contract.NAME_RE.match(dataset)):
        return None
    files = []
    for f in doc.get("files") or []:
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            size = f.get("synthetic_size")
            files.append(
                {
                    "name": f["name"][:200],
                    "path": _text(f.get("path"), 400)
                    or f"{contract.DATA_ROOT}/{provider}/{dataset}/{f['name']}",
                    "synthetic_size": size if isinstance(size, int) and not isinstance(size, bool) else None,
                }
            )
    report = doc.get("fidelity_report")
    version = doc.get("version")
    return dataset_entry(
        provider=provider,
        dataset=dataset,
        version=version if isinstance(version, str) and version.startswith("sha256:") else None,
        release=doc.get("release") if doc.get("release") in ("auto", "review") else None,
        protection=doc.get("protection") if doc.get("protection") in _PROTECTIONS else None,
        mechanism=_text(doc.get("mechanism"), 200),
        epsilon=_number(doc.get("epsilon")),
        delta=_number(doc.get("delta")),
        description=_text(doc.get("description")) or "",
        files=files,
        fidelity_report=report if isinstance(report, str) and _REPORT_URL_RE.match(report) else None,
    )


class GrantSource(LoggingConfigurable):
    """Obtains the hub's grant for one job."""

    async def request(
        self,
        *,
        job_id: str,
        bundle_digest: str,
        datasets: list[tuple[str, str]],
        output_public_key: bytes,
    ) -> str:
        """A grant (JWT) for ``job_id``; ``datasets`` are the ``(provider, dataset)`` pairs wanted, or empty
        for "every dataset this user is entitled to". Refusals raise :class:`GrantRefused`."""
        raise NotImplementedError

    async def check(self, *, bundle_digest: str, datasets: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Ask what :meth:`request` would be answered for a job with this bundle and these datasets, without
        a grant being signed or recorded: the granted datasets (``{"provider", "dataset", "version",
        "release"}``), or the refusal :meth:`request` would raise (same status, same message). Sources that
        cannot tell raise :class:`NotSupported`."""
        raise NotSupported(f"{type(self).__name__} cannot check a submission without granting it")

    async def datasets(self) -> list[dict[str, Any]]:
        """The datasets this user may ask grants for, each shaped by :func:`dataset_entry`, sorted by
        provider and dataset. Sources that cannot tell raise :class:`NotSupported` (501)."""
        raise NotSupported(f"{type(self).__name__} cannot list datasets")

    # The hub's airlock: where held results go for review. Sources without one raise NotSupported.

    async def airlock_deliver(self, job_id: str, result: bytes) -> dict[str, Any]:
        """Hand a held result to the airlock; the review status (see ``model.Job.review``)."""
        raise NotSupported(f"{type(self).__name__} has no airlock: held outputs cannot be reviewed")

    async def airlock_deliver_failure(self, job_id: str, sealed: bytes) -> dict[str, Any]:
        """Hand a failed run's sealed detail to the airlock, for reviewers who may release it."""
        raise NotSupported(f"{type(self).__name__} has no airlock: held outputs cannot be reviewed")

    async def airlock_status(self, job_id: str) -> dict[str, Any]:
        raise NotSupported(f"{type(self).__name__} has no airlock: held outputs cannot be reviewed")

    async def airlock_release(self, job_id: str) -> bytes:
        raise NotSupported(f"{type(self).__name__} has no airlock: held outputs cannot be reviewed")


class DevGrantSource(GrantSource):
    """Signs grants with a local development hub key, for every dataset of a local store.

    **Not for production**: whoever can read the key can authorise any job on any dataset whose provider
    condition pins this key. The hub's grant service replaces it.
    """

    key_file = Unicode(
        "",
        help="""Private key (PEM) this source signs grants with: the local development hub key.

        Example::

            c.DevGrantSource.key_file = "/srv/dcr/store/.keys/local-hub-key.pem"

        Security: anyone who can read this file can grant any job. Use it only on a single-user development
        machine; in production grants come from the hub's grant service.
        """,
    ).tag(config=True)

    store = Unicode(
        "",
        help="""Dataset store whose latest versions are granted (``dcr provider add --store``).

        Example::

            c.DevGrantSource.store = "/srv/dcr/store"

        Security: every dataset of this store is granted to every job this server submits, with no
        entitlement check: point it only at a store of development or demonstration data.
        """,
    ).tag(config=True)

    release = Enum(
        ["auto", "review"],
        default_value="auto",
        help="""Release mode written into development grants.

        Example::

            c.DevGrantSource.release = "auto"

        Security: ``auto`` releases outputs to the researcher as soon as the enclave's checks pass;
        ``review`` holds them until the provider releases them.
        """,
    ).tag(config=True)

    time_limit = Int(
        3600,
        help="""Seconds a granted job may run; the grant expires shortly after. A positive number.

        Example::

            c.DevGrantSource.time_limit = 600

        Security: the enclave stops the job at this limit; a long limit lets a job hold data keys and
        the machine longer.
        """,
    ).tag(config=True)

    @validate("key_file", "store")
    def _absolute(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if value and not Path(value).is_absolute():
            raise ValueError(
                f"DevGrantSource.{proposal['trait'].name} must be an absolute path, not {value!r}"
            )
        return value

    @validate("time_limit")
    def _positive(self, proposal: Any) -> int:
        if proposal["value"] <= 0:
            raise ValueError("DevGrantSource.time_limit must be a positive number of seconds")
        return int(proposal["value"])

    async def request(
        self,
        *,
        job_id: str,
        bundle_digest: str,
        datasets: list[tuple[str, str]],
        output_public_key: bytes,
    ) -> str:
        return await asyncio.to_thread(self._issue, job_id, bundle_digest, datasets, output_public_key)

    async def check(self, *, bundle_digest: str, datasets: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [d.to_json() for d in await asyncio.to_thread(self._granted, datasets)]

    async def datasets(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._list_datasets)

    def _list_datasets(self) -> list[dict[str, Any]]:
        if not self.store:
            raise GrantRefused(
                "the development grant source is not configured", hint="set c.DevGrantSource.store"
            )
        store = Store(Path(self.store))
        out = []
        for provider in store.providers():
            for dataset in store.datasets(provider):
                # The version a development grant would name: the newest one not retired.
                versions = [v for v in store.versions(provider, dataset) if not v.retired]
                if versions:
                    out.append(_from_manifest(versions[-1], self.release))
        return out

    def _granted(self, wanted: list[tuple[str, str]]) -> list[GrantedDataset]:
        """The datasets a development grant names: the newest unretired version of each one wanted (or of
        every dataset in the store)."""
        if not self.key_file or not self.store:
            raise GrantRefused(
                "the development grant source is not configured",
                hint="set c.DevGrantSource.key_file and c.DevGrantSource.store",
            )
        store = Store(Path(self.store))
        pairs = wanted or [(p, d) for p in store.providers() for d in store.datasets(p)]
        granted = []
        for provider, dataset in pairs:
            versions = [v for v in store.versions(provider, dataset) if not v.retired]
            if not versions:
                raise GrantRefused(f"no dataset {provider}/{dataset} is available to you")
            granted.append(GrantedDataset(provider, dataset, versions[-1].version, self.release))
        if not granted:
            raise GrantRefused("there is no dataset to grant")
        return granted

    def _issue(self, job_id: str, bundle_digest: str, wanted: list[tuple[str, str]], public: bytes) -> str:
        granted = self._granted(wanted)
        self.log.warning("DCR: signing a grant with the LOCAL DEVELOPMENT hub key (not for production)")
        try:
            return issue_grant(
                read_private_key(self.key_file),
                user=getpass.getuser(),
                job_id=contract.check_job_id(job_id),
                bundle_digest=bundle_digest,
                datasets=granted,
                output_public_key=public,
                output_limits=OutputLimits(),
                time_limit=self.time_limit,
            )
        except DCRError as e:
            raise GrantRefused(f"grant refused: {e.message}", hint=e.hint) from None


class HubGrantSource(GrantSource):
    """Asks the hub's grant service (``POST {JUPYTERHUB_API_URL}/dcr/grants``) with this server's hub token.

    The production source: the hub checks who this server belongs to, the entitlement, quotas and rate
    limits, records the job and signs the grant with its key. Refusals (4xx) become :class:`GrantRefused`
    with the hub's status and message; an unreachable hub or a 5xx becomes ``Unavailable`` (503), so the
    job can be submitted again.
    """

    api_url = Unicode(
        help="""The hub's API URL (``http://`` or ``https://``); default: ``$JUPYTERHUB_API_URL``, which
        JupyterHub gives every server.

        Example::

            c.HubGrantSource.api_url = "http://hub.internal:8081/hub/api"

        Security: grant requests carry this server's hub API token; send them to your hub only, over
        ``https://`` (or JupyterHub's internal SSL) when the hub is on another machine.
        """,
    ).tag(config=True)

    request_timeout = Int(
        30,
        help="""Seconds to wait for the hub's answer before the submission is reported unavailable; a
        positive number.

        Example::

            c.HubGrantSource.request_timeout = 10

        Security: no security decision depends on it. A request that times out may still have been
        granted and recorded by the hub (the job is then kept, failed, and counts against quotas).
        """,
    ).tag(config=True)

    @validate("api_url")
    def _valid_api_url(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if value:  # empty: $JUPYTERHUB_API_URL
            try:
                parts = urllib.parse.urlsplit(value)
            except ValueError:
                parts = None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise TraitError(
                    "HubGrantSource.api_url must be an http:// or https:// URL of the hub's API, like "
                    f"'http://hub.internal:8081/hub/api', not {value!r}"
                )
        return value

    @validate("request_timeout")
    def _valid_request_timeout(self, proposal: Any) -> int:
        value = proposal["value"]
        if value <= 0:
            raise TraitError(
                f"HubGrantSource.request_timeout must be a positive number of seconds, not {value!r}"
            )
        return int(value)

    def _env_api_url(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    async def request(
        self,
        *,
        job_id: str,
        bundle_digest: str,
        datasets: list[tuple[str, str]],
        output_public_key: bytes,
    ) -> str:
        body = {
            "job_id": job_id,
            "bundle_digest": bundle_digest,
            "datasets": [f"{p}/{d}" for p, d in datasets],
            "output_public_key": base64.urlsafe_b64encode(output_public_key).rstrip(b"=").decode(),
        }
        doc = await self._call("POST", "/dcr/grants", body, expect=201, field="grant", what="the grant")
        self.log.info("DCR: grant %s from the hub for %s", doc.get("grant_id"), job_id)
        return str(doc["grant"])

    async def check(self, *, bundle_digest: str, datasets: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """``POST {api_url}/dcr/grants`` with ``"dry_run": true``: the hub runs every check of a grant
        request (entitlement, versions, quotas, request rate) and answers what it would grant, or the
        refusal the real request would get; it signs and records nothing."""
        body = {
            "bundle_digest": bundle_digest,
            "datasets": [f"{p}/{d}" for p, d in datasets],
            "dry_run": True,
        }
        try:
            doc = await self._call(
                "POST", "/dcr/grants", body, expect=200, field="datasets", what="the dry run"
            )
        except GrantRefused as e:
            if e.status == 400 and "dry_run" in e.message:  # a hub from before dry runs
                raise NotSupported("the hub does not answer dry runs") from None
            raise
        return [d for d in doc["datasets"] if isinstance(d, dict)]

    async def datasets(self) -> list[dict[str, Any]]:
        """``GET {api_url}/dcr/datasets``: the hub's list of the datasets this server's user is entitled to."""
        doc = await self._call(
            "GET", "/dcr/datasets", None, expect=200, field="datasets", what="the dataset list"
        )
        entries = [e for e in (_from_hub(d) for d in doc["datasets"]) if e is not None]
        return sorted(entries, key=lambda e: (e["provider"], e["dataset"]))

    # -- the hub's airlock (held results) ------------------------------------------------------------------

    async def airlock_deliver(self, job_id: str, result: bytes) -> dict[str, Any]:
        """``POST {api_url}/dcr/airlock/jobs/<id>``: hand a held result (a tar of the receipt files and the
        sealed files) to the hub, which checks it against the attested receipt; the review status."""
        resp = await self._send(
            "POST", f"/dcr/airlock/jobs/{job_id}", result, "application/x-tar", "the held result's delivery"
        )
        return self._answer(resp, expect=(200, 201), field="status", what="the held result's delivery")

    async def airlock_deliver_failure(self, job_id: str, sealed: bytes) -> dict[str, Any]:
        """``POST {api_url}/dcr/airlock/jobs/<id>/failure``: a failed run's detail as the enclave sealed it."""
        what = "the failure detail's delivery"
        resp = await self._send(
            "POST", f"/dcr/airlock/jobs/{job_id}/failure", sealed, "application/octet-stream", what
        )
        return self._answer(resp, expect=(200, 201), field="status", what=what)

    async def airlock_status(self, job_id: str) -> dict[str, Any]:
        """``GET {api_url}/dcr/airlock/jobs/<id>``: who decides, how far they are, the outcome."""
        resp = await self._send("GET", f"/dcr/airlock/jobs/{job_id}", None, None, "the review status")
        return self._answer(resp, expect=(200,), field="status", what="the review status")

    async def airlock_release(self, job_id: str) -> bytes:
        """``GET {api_url}/dcr/airlock/jobs/<id>/release``: the released result, sealed to the job's key."""
        resp = await self._send(
            "GET", f"/dcr/airlock/jobs/{job_id}/release", None, None, "the released outputs"
        )
        if resp.code != 200:
            self._answer(resp, expect=(200,), field="", what="the released outputs")
        return bytes(resp.body or b"")

    # -- requests ---------------------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, expect: int, field: str, what: str
    ) -> dict[str, Any]:
        """One JSON request to the hub's DCR API with this server's token; the hub's refusals pass through."""
        raw = json.dumps(body).encode() if body is not None else None
        resp = await self._send(method, path, raw, "application/json" if body is not None else None, what)
        return self._answer(resp, expect=(expect,), field=field, what=what)

    async def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
        what: str,
        *,
        extra: dict[str, str] | None = None,
    ) -> HTTPResponse:
        """One request to the hub's API with this server's token (``extra``: more headers)."""
        api_url = (self.api_url or self._env_api_url()).rstrip("/")
        # The token comes from the environment only: it is this server's credential, never configuration.
        token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if not api_url or not token:
            raise Unavailable(
                "this server has no hub API URL or token (JUPYTERHUB_API_URL, JUPYTERHUB_API_TOKEN)",
                hint="HubGrantSource works in servers started by JupyterHub",
            )
        headers = {**(extra or {}), "Authorization": f"token {token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        # JupyterHub's internal SSL, when enabled, gives each server a client certificate for the hub.
        req = HTTPRequest(
            api_url + path,
            method=method,
            headers=headers,
            body=body,
            request_timeout=self.request_timeout,
            client_key=os.environ.get("JUPYTERHUB_SSL_KEYFILE") or None,
            client_cert=os.environ.get("JUPYTERHUB_SSL_CERTFILE") or None,
            ca_certs=os.environ.get("JUPYTERHUB_SSL_CLIENT_CA") or None,
        )
        try:
            return await AsyncHTTPClient().fetch(req, raise_error=False)
        except (TimeoutError, OSError, HTTPClientError) as e:
            raise Unavailable(f"{what} from the hub cannot be reached ({type(e).__name__})") from None

    def _answer(
        self, resp: HTTPResponse, *, expect: tuple[int, ...], field: str, what: str
    ) -> dict[str, Any]:
        try:
            doc = json.loads(resp.body or b"{}")
        except ValueError:
            doc = {}
        message = str(doc.get("error", "")) if isinstance(doc, dict) else ""
        if resp.code == 401:
            # The hub rejected this server's own token: not the caller's credential (their request reached
            # this server), and nothing they can fix by sending another token.
            raise GrantRefused(
                f"the hub did not accept this server's own API token for {what}",
                hint="restart your server from the hub's home page; if that does not help, tell the hub's "
                "administrator",
            )
        if 400 <= resp.code < 500:
            # 403 not entitled, 429 over quota, ...: the hub's answer (which says what to do) is passed on.
            refused = GrantRefused(message or f"the hub refused {what} (HTTP {resp.code})")
            refused.status = resp.code
            raise refused
        if resp.code not in expect or not isinstance(doc, dict) or field not in doc:
            raise Unavailable(
                f"{what} from the hub failed (HTTP {resp.code}{': ' + message if message else ''})"
            )
        return doc
