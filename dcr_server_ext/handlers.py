"""REST handlers under ``/dcr/api`` (described by ``openapi.yaml``).

Every handler is a jupyter_server ``APIHandler``: authenticated by the server's identity provider
(``@web.authenticated``), authorized by its authorizer on the resource ``"dcr"`` (``@authorized``: GET is
``read``, POST is ``write``), with the server's XSRF and origin checks. Refusals are JSON
``{"error": "..."}`` with the status of the :class:`~dcr_server_ext.errors.APIError` raised (any other
:class:`~dcr_enclave.formats.errors.DCRError` is a 400); bodies are checked here (size, JSON, fields, types) and
paths again in the manager, which owns the decision.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from dcr_enclave.formats.contract import JOB_ID_RE, NAME_RE
from dcr_enclave.formats.errors import DCRError

from .errors import APIError, NotFound, TooLarge
from .manager import JobManager

AUTH_RESOURCE = "dcr"
#: Largest request body accepted (a submit body is a path and a few dataset names).
MAX_BODY_BYTES = 64 * 1024
MAX_PATH_CHARS = 4096
MAX_DATASETS = 50
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: Output files are sent in chunks of this size, flushed one by one (memory flat in file size).
CHUNK_BYTES = 256 * 1024

_SUBMIT_FIELDS = ("path", "datasets")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UINT_RE = re.compile(r"^[0-9]{1,9}$")
_JOB = r"(?P<job_id>[^/]+)"

F = TypeVar("F", bound=Callable[..., Awaitable[None]])


def _refusals(method: F) -> F:
    """Turn DCR's refusals into HTTP errors carrying their message (written as ``{"error": ...}``)."""

    @functools.wraps(method)
    async def wrapper(self: DCRHandler, *args: Any, **kwargs: Any) -> None:
        try:
            await method(self, *args, **kwargs)
        except DCRError as e:
            status = e.status if isinstance(e, APIError) else 400
            # "%s" keeps a '%' in the message from being read as a format directive by tornado; a lone
            # surrogate the request carried is escaped, or the server log could not write the message.
            message = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
            raise web.HTTPError(status, "%s", message) from None

    return cast(F, wrapper)


class DCRHandler(APIHandler):
    """Common ground: JSON errors, the manager, and a bounded request body."""

    auth_resource = AUTH_RESOURCE

    @property
    def manager(self) -> JobManager:
        return cast(JobManager, self.settings["dcr_manager"])

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError):
            if exc.log_message:
                message = exc.log_message % exc.args if exc.args else exc.log_message
        elif exc is not None:
            message = "internal error (the server log has the details)"
        self.finish(json.dumps({"error": message}), set_content_type="application/json")

    def read_json_object(self, allowed: tuple[str, ...], *, optional: bool = False) -> dict[str, Any]:
        """The request body as a JSON object with only ``allowed`` fields (400 otherwise, 413 if too big)."""
        body = self.request.body
        if len(body) > MAX_BODY_BYTES:
            raise TooLarge(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        if not body.strip():
            if optional:
                return {}
            raise APIError('the request body must be a JSON object, e.g. {"path": "analysis.ipynb"}')
        try:
            # Decoded here: json.loads would guess UTF-16/32 from the bytes; JSON on the wire is UTF-8.
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError("the request body is not UTF-8") from None
        try:
            doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise APIError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:
            # json.loads recurses once per level: a body of 30,000 "[" exhausts the stack.
            raise APIError("malformed JSON: nested too deeply") from None
        if not isinstance(doc, dict):
            raise APIError(f"the request body must be a JSON object, not {type(doc).__name__}")
        unknown = sorted(set(doc) - set(allowed))
        if unknown:
            expected = ", ".join(allowed) if allowed else "none"
            raise APIError(f"unknown field(s): {', '.join(unknown)} (expected: {expected})")
        return doc

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        # Tornado has read the body by now; refuse a big one before any further work.
        if len(self.request.body) > MAX_BODY_BYTES:
            raise web.HTTPError(413, "%s", f"the request body is larger than {MAX_BODY_BYTES} bytes")

    def check_job_id(self, job_id: str) -> str:
        if not JOB_ID_RE.match(job_id):
            raise NotFound(f"no such job: {job_id!r} (job ids look like job-<24 hex digits>)")
        return job_id


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise APIError(f"field {key!r} appears twice in the request body")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise APIError(f"{name} is not valid JSON")


def _check_notebook_path(path: Any) -> str:
    """Shape checks on the submitted path (the manager resolves it against the server root)."""
    if not isinstance(path, str):
        raise APIError(f'"path" must be a string, not {type(path).__name__}')
    if not path.strip():
        raise APIError('"path" is empty: give the notebook\'s path relative to the server root')
    if len(path) > MAX_PATH_CHARS or _CONTROL_RE.search(path):
        raise APIError('"path" is too long or contains a control character')
    if not is_utf8(path):
        raise APIError('"path" is not valid Unicode (it holds a lone surrogate, e.g. "\\ud800")')
    if path.startswith("/"):
        raise APIError(
            f"notebook path {path!r} is absolute: give it relative to the server root, like 'work/analysis.ipynb'"
        )
    parts = path.split("/")
    if ".." in parts:
        raise APIError(f"notebook path {path!r} contains '..': the notebook must be inside the server root")
    if any(p in ("", ".") for p in parts):
        raise APIError(f"notebook path {path!r} has an empty or '.' component")
    if any(p.startswith(".") for p in parts):
        raise APIError(
            f"notebook path {path!r} is hidden (a component starts with '.'): hidden files are not submitted"
        )
    if not path.endswith(".ipynb"):
        raise APIError(f"{path!r} is not a notebook: the path must end in .ipynb")
    return path


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: JSON's ``\\ud800`` escapes decode to lone surrogates, which
    no file name holds and which the file system calls refuse with ``UnicodeEncodeError``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_datasets(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise APIError(f'"datasets" must be a list of "provider/dataset" names, not {type(value).__name__}')
    if len(value) > MAX_DATASETS:
        raise APIError(f'"datasets" lists {len(value)} datasets; at most {MAX_DATASETS} are allowed')
    for item in value:
        if not isinstance(item, str):
            raise APIError(f'each entry of "datasets" must be a "provider/dataset" string, not {item!r}')
        parts = item.split("/")
        if len(parts) != 2 or not all(NAME_RE.match(p) for p in parts):
            raise APIError(
                f'dataset {item[:200]!r} is not "provider/dataset" (lowercase letters, digits, "-" and "_")'
            )
    return list(value)


def _query_int(handler: DCRHandler, name: str, default: int, low: int, high: int) -> int:
    raw = handler.get_query_argument(name, None)
    if raw is None:
        return default
    if not _UINT_RE.match(raw) or not low <= int(raw) <= high:
        raise APIError(f"query parameter {name!r} must be an integer from {low} to {high}, not {raw[:40]!r}")
    return int(raw)


def _query_flag(handler: DCRHandler, name: str) -> bool:
    raw = handler.get_query_argument(name, None)
    if raw is None or raw in ("0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise APIError(f"query parameter {name!r} must be 1, 0, true or false, not {raw[:40]!r}")


class JobsHandler(DCRHandler):
    """``/dcr/api/jobs``: list (GET) and submit (POST)."""

    @web.authenticated
    @authorized
    @_refusals
    async def get(self) -> None:
        offset = _query_int(self, "offset", 0, 0, 10**9)
        limit = _query_int(self, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        jobs, total = await self.manager.alist(offset, limit)
        self.finish(
            json.dumps({"jobs": [j.to_api() for j in jobs], "total": total, "offset": offset, "limit": limit})
        )

    @web.authenticated
    @authorized
    @_refusals
    async def post(self) -> None:
        dry_run = _query_flag(self, "dry_run")
        doc = self.read_json_object(_SUBMIT_FIELDS)
        if "path" not in doc:
            raise APIError('the request body needs "path": the notebook\'s path relative to the server root')
        path = _check_notebook_path(doc["path"])
        datasets = _check_datasets(doc.get("datasets"))
        if dry_run:
            # What would be submitted (files, sizes, digest, datasets); nothing is stored or granted.
            self.finish(json.dumps(await self.manager.preview(path, datasets)))
            return
        job = await self.manager.submit(path, datasets)
        self.set_status(201)
        self.set_header("Location", self.request.path.rstrip("/") + "/" + job.id)
        self.finish(json.dumps(job.to_api()))


class JobHandler(DCRHandler):
    """``/dcr/api/jobs/<id>``: one job."""

    @web.authenticated
    @authorized
    @_refusals
    async def get(self, job_id: str) -> None:
        job = await self.manager.aget(self.check_job_id(job_id))
        self.finish(json.dumps(job.to_api()))


class CancelHandler(DCRHandler):
    """``/dcr/api/jobs/<id>/cancel``: stop a job (409 once it has ended)."""

    @web.authenticated
    @authorized
    @_refusals
    async def post(self, job_id: str) -> None:
        self.read_json_object((), optional=True)
        job = await self.manager.cancel(self.check_job_id(job_id))
        self.finish(json.dumps(job.to_api()))


class OutputsHandler(DCRHandler):
    """``/dcr/api/jobs/<id>/outputs``: the job's output files with sizes, digests and content types."""

    @web.authenticated
    @authorized
    @_refusals
    async def get(self, job_id: str) -> None:
        files = self.manager.outputs(self.check_job_id(job_id))
        self.finish(json.dumps({"files": files}))


def _check_output_path(rel: str) -> str:
    if not rel or len(rel) > MAX_PATH_CHARS or _CONTROL_RE.search(rel) or "\\" in rel:
        raise APIError(
            f"output path {rel[:200]!r} is empty, too long or contains a control character or '\\'"
        )
    if rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
        raise APIError(
            f"output path {rel[:200]!r} must be relative to the job's outputs, without '..', '.' or empty parts"
        )
    return rel


class OutputFileHandler(DCRHandler):
    """``/dcr/api/jobs/<id>/outputs/<path>``: one output file, streamed as a download."""

    def compute_etag(self) -> str | None:
        return None  # the body is flushed in chunks; its digest is in the outputs listing

    @web.authenticated
    @authorized
    @_refusals
    async def get(self, job_id: str, rel: str) -> None:
        path, content_type = self.manager.output_file(self.check_job_id(job_id), _check_output_path(rel))
        try:
            # O_NOFOLLOW: the manager checked every component; a link swapped in since is refused here.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            raise NotFound(f"job {job_id} has no output {rel!r}") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"job {job_id} has no output {rel!r}")
            name = rel.rsplit("/", 1)[-1]
            self.set_header("Content-Type", content_type)
            self.set_header("Content-Length", str(st.st_size))
            # Always a download: outputs come from researcher code and must not render on this origin.
            self.set_header("Content-Disposition", _attachment(name))
            self.set_header("X-Content-Type-Options", "nosniff")
            remaining = st.st_size
            while remaining > 0:
                chunk = f.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                self.write(chunk)
                await self.flush()
        self.finish(set_content_type=content_type)


def _attachment(name: str) -> str:
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


class ReceiptHandler(DCRHandler):
    """``/dcr/api/jobs/<id>/receipt``: the public, data-free receipt (manifest, token, signer JWKS)."""

    @web.authenticated
    @authorized
    @_refusals
    async def get(self, job_id: str) -> None:
        self.finish(json.dumps(self.manager.receipt(self.check_job_id(job_id))))


class VerifyHandler(DCRHandler):
    """``/dcr/api/jobs/<id>/verify``: the checks of ``dcr verify`` against the deployment's trust anchors."""

    @web.authenticated
    @authorized
    @_refusals
    async def get(self, job_id: str) -> None:
        self.finish(json.dumps(await self.manager.verify(self.check_job_id(job_id))))


class DatasetsHandler(DCRHandler):
    """``/dcr/api/datasets``: the datasets this user may submit with (provider, version, protection)."""

    @web.authenticated
    @authorized
    @_refusals
    async def get(self) -> None:
        self.finish(json.dumps({"datasets": await self.manager.datasets()}))


class NotFoundHandler(DCRHandler):
    """Anything else under ``/dcr/api``: a JSON 404 instead of the server's HTML page."""

    def _missing(self) -> None:
        raise web.HTTPError(404, "%s", f"no such DCR API endpoint: {self.request.path}")

    @web.authenticated
    @authorized
    async def get(self, *args: Any) -> None:
        self._missing()

    @web.authenticated
    @authorized
    async def post(self, *args: Any) -> None:
        self._missing()


default_handlers: list[tuple[str, type[DCRHandler]]] = [
    (r"/dcr/api/jobs/?", JobsHandler),
    (rf"/dcr/api/jobs/{_JOB}/?", JobHandler),
    (rf"/dcr/api/jobs/{_JOB}/cancel/?", CancelHandler),
    (rf"/dcr/api/jobs/{_JOB}/outputs/?", OutputsHandler),
    (rf"/dcr/api/jobs/{_JOB}/outputs/(?P<rel>.+)", OutputFileHandler),
    (rf"/dcr/api/jobs/{_JOB}/receipt/?", ReceiptHandler),
    (rf"/dcr/api/jobs/{_JOB}/verify/?", VerifyHandler),
    (r"/dcr/api/datasets/?", DatasetsHandler),
    (r"/dcr/api(?:/.*)?", NotFoundHandler),
]
