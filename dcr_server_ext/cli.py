"""The researcher's ``dcr`` commands, against their running Jupyter server's ``/dcr/api``.

``dcr submit NOTEBOOK [--dataset P/D ...] [--wait]``, ``dcr jobs``, ``dcr job ID [--wait]``,
``dcr cancel ID`` and ``dcr fetch ID --out DIR``. They reach the ``dcr`` command through the
``dcr.commands`` entry point group (``register``).

Which server, and with which token, in this order:

* ``--url`` and ``--token``;
* Jupyter's environment: ``JUPYTER_SERVER_URL`` and ``JUPYTER_SERVER_ROOT`` (set in JupyterLab terminals),
  ``JUPYTER_TOKEN`` or ``JUPYTER_TOKEN_FILE`` (the server's own token settings);
* JupyterHub's single-user environment: ``JUPYTERHUB_SERVICE_URL`` (where the server listens, with
  ``JUPYTERHUB_SERVICE_PREFIX``) and ``JUPYTERHUB_API_TOKEN``;
* the servers ``jupyter server list`` knows (their info files in the runtime directory) when exactly one
  is running, or the one whose URL was given.

Requests carry ``Authorization: token ...``; proxies and redirects are never followed, so the token goes
to the named server only. Refusals from the server are printed with its own message and a non-zero exit.

Waiting follows the server's event bus (``/api/events/subscribe``) and falls back to polling when the
socket cannot be opened or drops (a server restart, say); both resynchronise with ``GET`` on the job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import canonical_json
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.receipt import ReceiptManifest
from dcr_enclave.runtime.receipt_writer import write_receipt_dir

from .events import EVENT_SCHEMA_ID

API: Final = "dcr/api"
EVENTS_PATH: Final = "api/events/subscribe"
#: Seconds an HTTP request may take (a submit builds the bundle and obtains the grant first).
REQUEST_TIMEOUT: Final = 120.0
#: Polling period when no event stream is available.
POLL_SECONDS: Final = 1.0
#: Without an event stream, how often to try opening one again.
RESUBSCRIBE_SECONDS: Final = 5.0
#: With an event stream, the job is re-read this often anyway (a missed event costs at most this).
RESYNC_SECONDS: Final = 15.0
#: How long ``--wait`` rides out a server it cannot reach (a restart) before giving up.
UNREACHABLE_GRACE_SECONDS: Final = 120.0
#: Largest error body read from the server; a refusal is one short JSON message.
MAX_ERROR_BODY: Final = 64 * 1024
MAX_EVENT_BYTES: Final = 64 * 1024
DOWNLOAD_CHUNK: Final = 256 * 1024
#: States after which ``--wait`` stops: the terminal ones, and ``held`` (its outputs await review).
STOP_STATES: Final = contract.TERMINAL_STATES | {"held"}
#: Exit status of ``--wait`` when the job ended without success (failed, cancelled, rejected in review), and
#: when it is held for review (a job released after review is a success: exit 0).
EXIT_JOB_FAILED: Final = 1
EXIT_JOB_HELD: Final = 3
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LOOPBACK_FOR_ANY: Final = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 (hosts a server binds to, mapped away)


class ServerError(DCRError):
    """The server refused a request; ``message`` is its own ``{"error": ...}`` text."""

    def __init__(self, status: int, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}", hint=hint)
        self.status = status
        self.server_message = message


class Unreachable(DCRError):
    """The server did not answer at all (not running, wrong URL, restarting)."""


class JobDidNotSucceed(DCRError):
    exit_code = EXIT_JOB_FAILED


class JobHeld(DCRError):
    exit_code = EXIT_JOB_HELD


# -- which server ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    #: Base URL of the Jupyter server, ending in "/" (includes a JupyterHub prefix like /user/name/).
    url: str
    token: str
    #: The server's root directory as this machine sees it, when known (to turn local paths into API paths).
    root: Path | None = None


def _normal_url(url: str, what: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DCRError(f"{what} {url!r} is not an http(s) URL", hint="like http://127.0.0.1:8888/")
    if parts.query or parts.fragment:
        # Not echoed: a query is where a token would be.
        raise DCRError(f"{what} must not carry a query or fragment", hint="pass the token with --token")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _hub_url(env: Mapping[str, str]) -> str | None:
    """The single-user server's own URL from JupyterHub's spawn environment."""
    service_url = env.get("JUPYTERHUB_SERVICE_URL")
    if not service_url:
        return None
    parts = urllib.parse.urlsplit(service_url)
    host = parts.hostname or ""
    # A server bound to every interface is reached on loopback from inside its own container.
    if host in _LOOPBACK_FOR_ANY or f"[{host}]" in _LOOPBACK_FOR_ANY:
        netloc = f"127.0.0.1:{parts.port}" if parts.port else "127.0.0.1"
    else:
        netloc = parts.netloc
    path = parts.path
    prefix = env.get("JUPYTERHUB_SERVICE_PREFIX", "")
    if path in ("", "/") and prefix:
        path = prefix
    return urllib.parse.urlunsplit((parts.scheme or "http", netloc, path, "", ""))


def _env_token(env: Mapping[str, str]) -> str | None:
    if env.get("JUPYTER_TOKEN"):
        return env["JUPYTER_TOKEN"]
    if env.get("JUPYTER_TOKEN_FILE"):
        try:
            return Path(env["JUPYTER_TOKEN_FILE"]).read_text().strip() or None
        except OSError as e:
            raise DCRError(
                f"cannot read JUPYTER_TOKEN_FILE {env['JUPYTER_TOKEN_FILE']}: {e.strerror}"
            ) from None
    return env.get("JUPYTERHUB_API_TOKEN") or None


def _running_servers() -> list[dict[str, Any]]:
    """What ``jupyter server list`` shows (imported late: it pulls in the whole server)."""
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:  # the CLI works without jupyter_server installed, given a URL and token
        return []
    return [s for s in list_running_servers() if isinstance(s, dict) and s.get("url")]


def resolve_server(
    url: str | None = None,
    token: str | None = None,
    root: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Server:
    """The server to talk to, from flags first, then Jupyter's and JupyterHub's environment."""
    env = os.environ if env is None else env
    found_url = url or env.get("JUPYTER_SERVER_URL") or _hub_url(env)
    found_token = token or _env_token(env)
    found_root = root or env.get("JUPYTER_SERVER_ROOT") or None
    if not found_url or not found_token:
        running = _running_servers()
        if found_url:
            wanted = _normal_url(found_url, "--url")
            running = [s for s in running if _normal_url(str(s["url"]), "server URL") == wanted]
        if len(running) == 1:
            info = running[0]
            found_url = found_url or str(info["url"])
            found_token = found_token or str(info.get("token") or "") or None
            found_root = found_root or info.get("root_dir") or None
        elif not found_url:
            if running:
                urls = ", ".join(str(s["url"]) for s in running)
                raise DCRError(f"several Jupyter servers are running ({urls})", hint="pick one with --url")
            raise DCRError(
                "no Jupyter server to talk to",
                hint="pass --url and --token, or run dcr in a JupyterLab terminal (JUPYTER_SERVER_URL)",
            )
    if not found_token:
        raise DCRError(
            f"no token for the Jupyter server at {found_url}",
            hint="pass --token, or set JUPYTER_TOKEN (JUPYTERHUB_API_TOKEN under JupyterHub)",
        )
    return Server(_normal_url(found_url, "--url"), found_token, Path(found_root) if found_root else None)


# -- talking to it --------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would carry the Authorization header elsewhere; a refusal is clearer.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """Minimal JSON client of ``/dcr/api`` (stdlib only)."""

    def __init__(self, server: Server, timeout: float = REQUEST_TIMEOUT) -> None:
        self.server = server
        self.timeout = timeout
        # No proxies: the token must go to the named server, and a loopback server is never behind one.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        full = urllib.parse.urljoin(self.server.url, path)
        if query:
            full += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return full

    @contextlib.contextmanager
    def open(
        self, method: str, path: str, body: Any = None, query: Mapping[str, Any] | None = None
    ) -> Iterator[Any]:
        """The open HTTP response (for streaming); refusals raise :class:`ServerError`."""
        data = None
        headers = {"Authorization": f"token {self.server.token}", "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif method == "POST":
            data = b""
        req = urllib.request.Request(self.url(path, query), data=data, headers=headers, method=method)  # noqa: S310 (http(s) checked)
        try:
            resp = self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                raise _refusal(e.code, e.headers.get("Location"), e.read(MAX_ERROR_BODY)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise Unreachable(
                f"cannot reach the Jupyter server at {self.server.url}: {reason}",
                hint="is it running? check --url or JUPYTER_SERVER_URL",
            ) from None
        with resp:
            try:
                yield resp
            except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
                raise Unreachable(
                    f"the connection to the Jupyter server at {self.server.url} broke: {e!r}",
                    hint="try again",
                ) from None

    def call(self, method: str, path: str, body: Any = None, query: Mapping[str, Any] | None = None) -> Any:
        with self.open(method, path, body, query) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise DCRError(
                f"the server at {self.server.url} answered {path} with something that is not JSON",
                hint="is the DCR server extension enabled (jupyter server extension list)?",
            ) from None

    # The API, one method per endpoint.

    def submit(self, path: str, datasets: list[str] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"path": path}
        if datasets:
            body["datasets"] = datasets
        job: dict[str, Any] = self.call("POST", f"{API}/jobs", body)
        return job

    def jobs(self, offset: int | None = None, limit: int | None = None) -> dict[str, Any]:
        page: dict[str, Any] = self.call("GET", f"{API}/jobs", query={"offset": offset, "limit": limit})
        return page

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.call("GET", f"{API}/jobs/{_job_id(job_id)}")
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.call("POST", f"{API}/jobs/{_job_id(job_id)}/cancel")
        return job

    def outputs(self, job_id: str) -> list[dict[str, Any]]:
        files: list[dict[str, Any]] = self.call("GET", f"{API}/jobs/{_job_id(job_id)}/outputs")["files"]
        return files

    def receipt(self, job_id: str) -> dict[str, Any]:
        receipt: dict[str, Any] = self.call("GET", f"{API}/jobs/{_job_id(job_id)}/receipt")
        return receipt

    def output_path(self, job_id: str, rel: str) -> str:
        return f"{API}/jobs/{_job_id(job_id)}/outputs/{urllib.parse.quote(rel, safe='/')}"


def _job_id(value: str) -> str:
    # Checked here too: the id becomes part of a URL path.
    if not contract.JOB_ID_RE.match(value):
        raise DCRError(
            f"not a job id: {value!r}", hint="job ids look like job-<24 hex digits>; dcr jobs lists yours"
        )
    return value


def _refusal(status: int, location: str | None, body: bytes) -> ServerError:
    message = ""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        # The DCR API writes {"error": ...}; jupyter_server's own refusals write {"message": ...}.
        message = str(doc.get("error") or doc.get("message") or doc.get("reason") or "")
    if not message:
        message = body.decode("utf-8", "replace").strip().splitlines()[0][:300] if body.strip() else ""
    hint = None
    if status == 401 or (status == 403 and _credentials_refused(message)):
        hint = "the server refused the token: check --token, JUPYTER_TOKEN or JUPYTERHUB_API_TOKEN"
    elif 300 <= status < 400:
        message = message or f"redirected to {location}"
        hint = (
            "the URL must be the Jupyter server's base URL and the token valid (redirects are not followed)"
        )
    elif status == 404 and not isinstance(doc, dict):
        hint = "is the DCR server extension enabled on this server (jupyter server extension list)?"
    return ServerError(status, _clean(message) or "(no message)", hint=hint)


def _credentials_refused(message: str) -> bool:
    """Whether a 403 is the server refusing the request's credentials (jupyter_server's own answers: the
    bare reason phrase when the token is not accepted, or the authorizer's refusal), not a refusal the
    request earned with a valid token, such as the hub's policy answer that names the datasets."""
    return message in ("", "Forbidden") or message.startswith("User is not authorized")


# -- waiting for a job ----------------------------------------------------------------------------------


class _Progress:
    """Prints each state change and cell step of one job once (to stderr: stdout is for results).

    A job only moves forward (lifecycle order, then cell order), so anything older than what was shown
    is dropped: events queued before a ``GET`` arrive after it.
    """

    def __init__(self, job_id: str, out: IO[str]) -> None:
        self.job_id = job_id
        self.out = out
        self.rank: tuple[int, int] | None = None

    def show(self, state: str, cell: int | None, cells: int | None, reason: str | None) -> None:
        if state not in contract.JOB_STATES:
            return
        rank = (contract.JOB_STATES.index(state), -1 if cell is None else cell)
        if self.rank is not None and rank <= self.rank:
            return
        state_changed = self.rank is None or self.rank[0] != rank[0]
        self.rank = rank
        if state == "running" and cells:
            step = f"cell {cell + 1}/{cells}" if cell is not None else f"0/{cells} cells"
            line = f"{self.job_id}: running, {step}"
        elif state_changed:
            line = f"{self.job_id}: {state}" + (f" ({_clean(reason)})" if reason else "")
        else:
            return
        print(line, file=self.out, flush=True)

    def show_job(self, job: Mapping[str, Any]) -> None:
        progress = job.get("progress") or {}
        self.show(
            str(job["state"]),
            progress.get("cell"),
            progress.get("cells"),
            (job.get("failure") or {}).get("reason"),
        )

    def show_review(self, job: Mapping[str, Any]) -> None:
        """The review line of a job that stopped held, released or rejected (who decides, or decided)."""
        text = review_text(job)
        if text is not None:
            comment = _comment(job)
            print(f"{self.job_id}: {text}" + (f": “{comment}”" if comment else ""), file=self.out, flush=True)


class _Events:
    """The server's event stream, read into a queue; ``None`` in the queue means it closed."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while (raw := await self.conn.read_message()) is not None:
                with contextlib.suppress(ValueError, TypeError):
                    msg = json.loads(raw)
                    if isinstance(msg, dict) and msg.get("schema_id") == EVENT_SCHEMA_ID:
                        self.queue.put_nowait(msg)
        finally:
            self.queue.put_nowait(None)

    def close(self) -> None:
        self.task.cancel()
        self.conn.close()


async def subscribe(server: Server) -> _Events | None:
    """Open ``/api/events/subscribe``; ``None`` when the server offers no event stream to this token."""
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import WebSocketError, websocket_connect

    parts = urllib.parse.urlsplit(urllib.parse.urljoin(server.url, EVENTS_PATH))
    ws_url = urllib.parse.urlunsplit(
        ("wss" if parts.scheme == "https" else "ws", parts.netloc, parts.path, "", "")
    )
    request = HTTPRequest(
        ws_url, headers={"Authorization": f"token {server.token}"}, connect_timeout=10, request_timeout=10
    )
    try:
        conn = await websocket_connect(request, max_message_size=MAX_EVENT_BYTES, ping_interval=20)
    except (HTTPClientError, WebSocketError, OSError):  # TimeoutError is an OSError
        return None
    return _Events(conn)


async def follow(
    client: Client, job: dict[str, Any], events: _Events | None = None, *, out: IO[str] | None = None
) -> dict[str, Any]:
    """Show the job's progress until it stops (``STOP_STATES``); returns the job as the server has it then.

    ``events`` is an already open subscription (open it before submitting, so no change is missed).
    """
    progress = _Progress(str(job["id"]), out or sys.stderr)
    progress.show_job(job)
    unreachable_since: float | None = None
    # A server that refused a subscription is asked again only now and then.
    next_subscribe = time.monotonic() + RESUBSCRIBE_SECONDS if events is None else 0.0
    try:
        while job["state"] not in STOP_STATES:
            if events is None and time.monotonic() >= next_subscribe:
                events = await subscribe(client.server)
                next_subscribe = time.monotonic() + RESUBSCRIBE_SECONDS
                if events is not None:
                    job = await _reread(client, job)  # changes while there was no stream
                    progress.show_job(job)
                    continue
            timeout = POLL_SECONDS if events is None else RESYNC_SECONDS
            msg: dict[str, Any] | None = None
            if events is not None:
                try:
                    msg = await asyncio.wait_for(events.queue.get(), timeout)
                except TimeoutError:
                    msg = None
                else:
                    if msg is None:  # the stream closed (server stopping?): poll and try again
                        events = None
                        next_subscribe = 0.0
                        continue
            else:
                await asyncio.sleep(timeout)
            if msg is not None:
                if msg.get("job_id") != job["id"]:
                    continue
                progress.show(str(msg.get("state")), msg.get("cell"), msg.get("cells"), msg.get("reason"))
                if msg.get("state") not in STOP_STATES:
                    continue
            try:
                job = await _reread(client, job)
                unreachable_since = None
            except Unreachable:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > UNREACHABLE_GRACE_SECONDS:
                    raise
                continue
            progress.show_job(job)
    finally:
        if events is not None:
            events.close()
    progress.show_review(job)
    return job


async def _reread(client: Client, job: Mapping[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(client.job, str(job["id"]))


def _reviewers(names: Any) -> str:
    """ "the data provider", "Riverside Hospital", "A and B", "A, B and C"."""
    names = [_clean(n) for n in names or []]
    if not names:
        return "the data provider"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _approvals(review: Mapping[str, Any]) -> str:
    required = review.get("required_approvals") or 1
    return f"{review.get('approvals') or 0} of {required} approval{'' if required == 1 else 's'}"


def review_text(job: Mapping[str, Any]) -> str | None:
    """Where a held job's review is, or how it ended, in one line (``None`` for other jobs): "held for
    review by Riverside Hospital (1 of 2 approvals)", "held, not yet sent for review (<note>)", "released
    after review by Riverside Hospital", "rejected in review by Riverside Hospital". The reviewers' comment
    is not in it (see ``_describe`` and ``_outcome``)."""
    state = job.get("state")
    if state not in ("held", "released", "rejected"):
        return None
    review = job.get("review")
    if not isinstance(review, Mapping):
        # A server from before the review field, or a job without one.
        return "held for the data provider's review" if state == "held" else f"{state} after review"
    by = f" by {_reviewers(review.get('reviewers'))}"
    note = f" ({_clean(review['note'])})" if review.get("note") else ""
    if state == "held":
        status = review.get("status")
        if status == "unsent":
            return f"held, not yet sent for review{note}"
        if status == "released":
            return f"approved{by}; the outputs are being opened"
        if status == "rejected":
            return f"rejected in review{by}"
        return f"held for review{by} ({_approvals(review)})"
    return f"{'released after review' if state == 'released' else 'rejected in review'}{by}"


def _comment(job: Mapping[str, Any]) -> str | None:
    review = job.get("review")
    if isinstance(review, Mapping) and review.get("comment"):
        return _clean(review["comment"])
    return None


def _outcome(job: Mapping[str, Any]) -> None:
    """Raise unless the job succeeded or was released after review (``--wait``'s exit status)."""
    state = job["state"]
    if state in ("succeeded", "released"):
        return
    if state == "held":
        raise JobHeld(
            f"job {job['id']} is {review_text(job)}",
            hint=f"dcr job {job['id']} --wait follows it further",
        )
    failure = job.get("failure") or {}
    message = f"job {job['id']} {state}"
    if state == "rejected":
        message = f"job {job['id']} {review_text(job)}"
        if _comment(job):
            message += f": “{_comment(job)}”"
    if failure.get("reason"):
        message += f": {_clean(failure['reason'])}"
    if failure.get("cell") is not None:
        ename = f", {_clean(failure['ename'])}" if failure.get("ename") else ""
        message += f" (cell {failure['cell'] + 1}{ename})"
    raise JobDidNotSucceed(message)


def _clean(text: Any) -> str:
    """Server text fit for a terminal: control characters (escape sequences) become '?'."""
    return _CONTROL_RE.sub("?", str(text))


# -- the commands ---------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(resolve_server(args.url, args.token, getattr(args, "root", None)))


def _api_path(notebook: str, root: Path | None) -> str:
    """The notebook's path as the server names it: relative to its root, '/'-separated."""
    local = Path(notebook)
    if root is not None and (local.is_absolute() or local.exists()):
        for full, base in (
            (os.path.abspath(local), os.path.abspath(root)),
            (os.path.realpath(local), os.path.realpath(root)),
        ):
            rel = os.path.relpath(full, base)
            if rel != ".." and not rel.startswith(".." + os.sep):
                return PurePosixPath(*Path(rel).parts).as_posix()
        raise DCRError(f"{notebook} is not inside the server's root directory {root}")
    if local.is_absolute():
        raise DCRError(
            f"cannot tell where {notebook} lies under the server's root directory",
            hint="give the path relative to the server root, or name the root with --root",
        )
    return PurePosixPath(*local.parts).as_posix()


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def _describe(job: Mapping[str, Any]) -> str:
    progress = job.get("progress") or {}
    lines = [
        f"id:        {job['id']}",
        f"notebook:  {job['notebook']}",
        f"state:     {job['state']}",
    ]
    if progress.get("cells"):
        cell = progress.get("cell")
        lines.append(f"progress:  cell {cell + 1 if cell is not None else 0}/{progress['cells']}")
    lines += [f"created:   {job['created']}", f"updated:   {job['updated']}"]
    for d in job.get("datasets") or []:
        version = d.get("version") or "(not granted yet)"
        lines.append(f"dataset:   {d['provider']}/{d['dataset']} {version} release={d.get('release') or '-'}")
    bundle = job.get("bundle") or {}
    lines.append(
        f"bundle:    {bundle.get('digest')} ({bundle.get('files')} files, {bundle.get('bytes')} bytes)"
    )
    enclave = job.get("enclave")
    if enclave:
        sim = " SIMULATED" if enclave.get("simulated") else ""
        lines.append(f"enclave:   {enclave.get('kind')}{sim} {enclave.get('image_digest') or ''}".rstrip())
    review = job.get("review") if isinstance(job.get("review"), Mapping) else None
    if review_text(job) is not None:
        lines.append(f"review:    {review_text(job)}")
    if review and review.get("comment"):
        lines.append(f"comment:   {_clean(review['comment'])}")
    if review and review.get("decided_at"):
        lines.append(f"decided:   {_clean(review['decided_at'])}")
    if job.get("failure"):
        f = job["failure"]
        where = f" in cell {f['cell'] + 1}" if f.get("cell") is not None else ""
        ename = f" ({_clean(f['ename'])})" if f.get("ename") else ""
        lines.append(f"failure:   {_clean(f.get('reason'))}{where}{ename}")
    if job.get("outputs_path"):
        lines.append(f"outputs:   {job['outputs_path']} (in the server's root directory)")
    lines.append(f"receipt:   {'yes' if job.get('receipt') else 'no'}")
    return "\n".join(lines)


def run_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    path = _api_path(args.notebook, client.server.root)

    async def submit_and_follow() -> dict[str, Any]:
        # Subscribe first: every event after the submission is then seen.
        events = await subscribe(client.server) if args.wait else None
        try:
            job = await asyncio.to_thread(client.submit, path, args.dataset or None)
        except BaseException:
            if events is not None:
                events.close()
            raise
        if not args.wait:
            return job
        if not args.json:
            print(f"submitted {job['id']} ({job['notebook']})", file=sys.stderr, flush=True)
        return await follow(client, job, events)

    job = asyncio.run(submit_and_follow())
    if args.json:
        _print_json(job)
    else:
        print(job["id"])
    if args.wait:
        _outcome(job)
    return 0


def run_jobs(args: argparse.Namespace) -> int:
    page = _client(args).jobs(args.offset, args.limit)
    if args.json:
        _print_json(page)
        return 0
    rows = [("ID", "STATE", "PROGRESS", "CREATED", "NOTEBOOK")]
    for job in page["jobs"]:
        progress = job.get("progress") or {}
        step = ""
        if progress.get("cells"):
            cell = progress.get("cell")
            step = f"{cell + 1 if cell is not None else 0}/{progress['cells']}"
        rows.append((job["id"], job["state"], step, job["created"], job["notebook"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    shown = len(page["jobs"])
    first = page["offset"] + 1 if shown else page["offset"]
    print(f"({first}-{page['offset'] + shown} of {page['total']})", file=sys.stderr)
    return 0


def run_job(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.wait:

        async def follow_existing() -> dict[str, Any]:
            events = await subscribe(client.server)
            return await follow(client, await asyncio.to_thread(client.job, args.job_id), events)

        job = asyncio.run(follow_existing())
    else:
        job = client.job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        print(_describe(job))
    if args.wait:
        _outcome(job)
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job_id)
    if args.json:
        _print_json(job)
    else:
        print(f"{job['id']}: {job['state']}")
    return 0


def _check_output_rel(rel: Any) -> PurePosixPath:
    # The listing decides where files land on this machine: nothing may point outside --out.
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise IntegrityError(f"the server listed a malformed output path: {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(p in ("", ".", "..") for p in rel.split("/")):
        raise IntegrityError(f"the server listed an output path outside the outputs: {rel!r}")
    return pure


def _download(client: Client, job_id: str, rel: str, dest: Path, expected: str, size: int) -> None:
    h = hashlib.sha256()
    n = 0
    with open(dest, "xb") as f, client.open("GET", client.output_path(job_id, rel)) as resp:
        os.fchmod(f.fileno(), 0o600)
        while chunk := resp.read(DOWNLOAD_CHUNK):
            h.update(chunk)
            n += len(chunk)
            if n > size:
                break
            f.write(chunk)
    digest = "sha256:" + h.hexdigest()
    if n != size or digest != expected:
        raise IntegrityError(
            f"output {rel} did not arrive intact ({n} bytes, {digest}; the receipt says {size} bytes, {expected})",
            hint="fetch again",
        )


def fetch(client: Client, job_id: str, out: Path) -> list[str]:
    """Download a finished job's receipt and outputs into ``out`` in ``dcr verify``'s layout.

    ``receipt.json``, ``attestation.jwt`` and ``signer-jwks.json`` come out byte for byte as the enclave
    wrote them (the manifest is canonical JSON and must hash to the token's nonce); every output is checked
    against the manifest's size and sha256 while it streams in. Everything lands in a staging directory
    beside ``out`` that is renamed into place only when complete. Returns the output paths.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DCRError(f"{out} already exists", hint="fetch into a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    receipt = client.receipt(job_id)
    manifest_doc = receipt.get("manifest")
    try:
        manifest = ReceiptManifest.from_json(manifest_doc)
    except DCRError as e:
        raise IntegrityError(f"the server's receipt manifest is not valid: {e.message}") from None
    if manifest.to_bytes() != canonical_json(manifest_doc):
        raise IntegrityError("the server's receipt manifest differs from the one the enclave signed")
    if manifest.job_id != job_id:
        raise IntegrityError(f"the server sent the receipt of {manifest.job_id} for {job_id}")
    by_path = {o.path: o for o in manifest.outputs}
    listed = client.outputs(job_id) if manifest.outputs else []
    names = []
    for item in listed:
        rel = _check_output_rel(item.get("path"))
        entry = by_path.get(rel.as_posix())
        if entry is None or item.get("sha256") != entry.sha256 or item.get("size") != entry.size:
            raise IntegrityError(f"the server lists output {rel} unlike the receipt does")
        names.append(rel.as_posix())
    missing = sorted(set(by_path) - set(names))
    if missing:
        raise DCRError(f"the server does not offer output(s) {', '.join(missing)} of job {job_id}")
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        # The enclave wrote these files with this very function: same bytes, nonce checked again.
        write_receipt_dir(staging, manifest, str(receipt.get("token", "")), receipt.get("signer_jwks") or {})
        outputs = staging / contract.OUTPUTS_DIR
        outputs.mkdir(mode=0o700)
        for name in names:
            dest = outputs.joinpath(*PurePosixPath(name).parts)
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            entry = by_path[name]
            _download(client, job_id, name, dest, entry.sha256, entry.size)
        os.replace(staging, out)  # an empty ``out`` is replaced, anything else was refused above
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return names


def run_fetch(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.job(args.job_id)
    if job["state"] not in STOP_STATES:
        raise DCRError(
            f"job {job['id']} has not finished ({job['state']})", hint=f"dcr job {job['id']} --wait"
        )
    names = fetch(client, job["id"], Path(args.out))
    print(f"{args.out}: receipt and {len(names)} output(s); check it with: dcr verify {args.out} --trust ...")
    return 0


def register(subparsers: Any) -> None:
    """Add ``submit``, ``jobs``, ``job``, ``cancel`` and ``fetch`` to the ``dcr`` command."""
    conn = argparse.ArgumentParser(add_help=False)
    group = conn.add_argument_group("server")
    group.add_argument(
        "--url", help="the Jupyter server's base URL (default: JUPYTER_SERVER_URL, JUPYTERHUB_SERVICE_URL)"
    )
    group.add_argument(
        "--token",
        help="its token (default: JUPYTER_TOKEN, JUPYTER_TOKEN_FILE, JUPYTERHUB_API_TOKEN); prefer the environment, "
        "command lines are visible to other users",
    )
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument("--json", action="store_true", help="print the server's JSON")

    p = subparsers.add_parser(
        "submit",
        parents=[conn, fmt],
        help="submit a notebook from your Jupyter server to the enclave",
        description="Bundle NOTEBOOK on your Jupyter server and run it, unchanged, on the real data in the enclave.",
    )
    p.add_argument(
        "notebook", metavar="NOTEBOOK", help="path of the notebook (relative to the server root, or local)"
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="PROVIDER/DATASET",
        help="dataset to ask for; repeatable (default: the /data/... paths the workspace mentions)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job; exit 0 only if it succeeds or is released after review, 3 while it is held for review",
    )
    p.add_argument(
        "--root",
        help="the server's root directory, to turn a local path into the server's (default: JUPYTER_SERVER_ROOT)",
    )
    p.set_defaults(func=run_submit)

    p = subparsers.add_parser("jobs", parents=[conn, fmt], help="list your enclave jobs, newest first")
    p.add_argument("--limit", type=int, help="jobs per page (server default 50, at most 500)")
    p.add_argument("--offset", type=int, help="jobs to skip")
    p.set_defaults(func=run_jobs)

    p = subparsers.add_parser("job", parents=[conn, fmt], help="show one enclave job")
    p.add_argument("job_id", metavar="ID")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job until it ends or is held; exit 0 only if it succeeds or is released after review, "
        "3 while it is held for review",
    )
    p.set_defaults(func=run_job)

    p = subparsers.add_parser("cancel", parents=[conn, fmt], help="cancel an enclave job")
    p.add_argument("job_id", metavar="ID")
    p.set_defaults(func=run_cancel)

    p = subparsers.add_parser(
        "fetch",
        parents=[conn],
        help="download a job's outputs and receipt for dcr verify",
        description="Write receipt.json, attestation.jwt, signer-jwks.json and outputs/ into a new directory.",
    )
    p.add_argument("job_id", metavar="ID")
    p.add_argument(
        "--out", required=True, type=Path, help="directory to create (must not exist, or be empty)"
    )
    p.set_defaults(func=run_fetch)
