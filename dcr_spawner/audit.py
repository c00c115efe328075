"""The hub's audit trail around :class:`~dcr_spawner.hubdb.HubDB`: the enclave platform's events copied in,
exports, and finding the database a hub's configuration names.

**Platform events.** The platform (:meth:`~dcr_spawner.platform.EnclavePlatform.audit_events`) reports
each job's launch, every data key released or refused and the job's end. :func:`ingest_platform_events`
reads them after the cursor stored in ``dcr_hub_meta`` and appends them as :data:`EVENT_NAMES` events,
moving the cursor in the same transaction, so each platform event is in the audit table exactly once
(across repeated reads, concurrent readers and hub restarts). The hub runs it periodically
(``c.<Platform>.audit_interval``) and the audit views run it before they answer.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TextIO

from dcr_enclave.formats.errors import DCRError

from .hubdb import AuditEvent, HubDB, NewAuditEvent

log = logging.getLogger("dcr_spawner.audit")

#: Platform event -> audit event name.
EVENT_NAMES: Final = {
    "launch": "enclave.launch",
    "key_released": "enclave.key_released",
    "key_refused": "enclave.key_refused",
    "end": "enclave.end",
}
#: The ``status`` an audit row of each platform event gets (an end's depends on its state).
_STATUS: Final = {"launch": 201, "key_released": 200, "key_refused": 403}
#: Most pages of platform events one ingestion reads (the periodic run picks up the rest).
MAX_PAGES: Final = 20
#: Columns of a CSV export, in order (``receipt_url`` only when the exporter knows the hub's address).
CSV_COLUMNS: Final = (
    "id",
    "at",
    "time",
    "event",
    "user",
    "status",
    "job_id",
    "grant_id",
    "datasets",
    "reason",
    "detail",
    "prev_hash",
    "hash",
)

_ingest_lock = threading.Lock()
#: The last failure to read the platform's events, per database object (so it is logged once).
_last_error: dict[int, str] = {}


def _text(value: Any, limit: int = 255) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def platform_event(
    ev: Mapping[str, Any], jobs: Mapping[str, tuple[str, tuple[str, ...]]]
) -> NewAuditEvent | None:
    """The audit event of one platform event (``None`` for an event this hub does not record)."""
    kind = ev.get("event")
    if kind not in EVENT_NAMES:
        return None
    job_id = _text(ev.get("job_id"), 64)
    known = jobs.get(job_id or "")
    host_grant = _text(ev.get("grant_id"), 64)
    # The hub's own record of the job names the grant and its datasets; the platform's word is kept beside.
    grant_id = known[0] if known else host_grant
    if kind in ("key_released", "key_refused"):
        refs = [r] if (r := _text(ev.get("dataset"))) else []
    elif known:
        refs = list(known[1])
    else:
        refs = [r for r in ev.get("datasets") or [] if isinstance(r, str)]
    state = _text(ev.get("state"), 32)
    code = _text(ev.get("reason_code"), 64)
    status = _STATUS.get(kind, 500 if state == "failed" else 200)
    detail: dict[str, Any] = {
        "source": "enclave-platform",
        "platform_journal": _text(ev.get("journal"), 64),
        "platform_run": _text(ev.get("run"), 64),
        "platform_seq": ev.get("seq") if isinstance(ev.get("seq"), int) else None,
    }
    if state:
        detail["state"] = state
    if code:
        detail["reason_code"] = code
    if (version := _text(ev.get("version"), 80)) is not None:
        detail["version"] = version
    if host_grant and host_grant != grant_id:
        detail["platform_grant_id"] = host_grant
    if not known:
        detail["unknown_job"] = True  # not a job this hub granted (or its record is gone)
    when = ev.get("time")
    return NewAuditEvent(
        EVENT_NAMES[kind],
        status,
        user=_text(ev.get("user")),
        job_id=job_id,
        grant_id=grant_id,
        reason=code or "",
        detail=detail,
        datasets=refs,
        at=int(when) if isinstance(when, int | float) else None,
    )


def ingest_platform_events(db: HubDB, platform: Any, *, max_pages: int = MAX_PAGES) -> int:
    """Copy the platform's new job events into the audit table (synchronous; the views call it before
    they answer, the hub periodically). Returns how many were recorded; a platform that cannot be asked
    now is logged and left for the next run."""
    recorded = 0
    with _ingest_lock:
        for _ in range(max_pages):
            cursor = db.platform_cursor()
            try:
                page = platform.audit_events(cursor)
            except DCRError as e:
                # Said once per distinct failure (the periodic read would repeat it every few seconds).
                level = logging.DEBUG if _last_error.get(id(db)) == str(e) else logging.WARNING
                _last_error[id(db)] = str(e)
                log.log(level, "DCR: cannot read the enclave platform's job events: %s", e)
                return recorded
            _last_error.pop(id(db), None)
            if page is None:
                return recorded
            events, new_cursor, more = page
            if not events and new_cursor == cursor:
                return recorded
            jobs = db.job_grants(e["job_id"] for e in events if isinstance(e.get("job_id"), str))
            rows = [
                r for e in events if isinstance(e, Mapping) and (r := platform_event(e, jobs)) is not None
            ]
            n = db.ingest_platform_events(rows, expected_cursor=cursor, new_cursor=new_cursor)
            if n is None:
                continue  # another process moved the cursor first: read again from where it is now
            recorded += n
            if not more:
                break
    if recorded:
        log.info("DCR: %d enclave platform event(s) recorded in the audit trail", recorded)
    return recorded


# Exports ------------------------------------------------------------------------------------------------


def iter_events(db: HubDB, providers: Iterable[str] | None = None, page: int = 5000) -> Iterator[AuditEvent]:
    """Every audit event (of ``providers``' datasets, when given), oldest first, read a page at a time."""
    wanted = None if providers is None else list(providers)
    after = 0
    while True:
        rows = db.events(providers=wanted, after_id=after, limit=page)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].id


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def event_json(e: AuditEvent, receipt_base: str | None = None) -> dict[str, Any]:
    doc = {**e.to_json(), "time": _iso(e.at)}
    if receipt_base is not None:
        doc["receipt_url"] = f"{receipt_base.rstrip('/')}/{e.job_id}" if e.job_id else None
    return doc


def write_json(
    events: Iterable[AuditEvent], out: TextIO, *, head: tuple[int, str, int], receipt_base: str | None = None
) -> int:
    """``{"head": {...}, "events": [...]}``, streamed; returns the number of events."""
    out.write('{"head": ' + json.dumps({"id": head[0], "hash": head[1], "count": head[2]}) + ', "events": [')
    n = 0
    for e in events:
        out.write(("\n" if n == 0 else ",\n") + json.dumps(event_json(e, receipt_base), sort_keys=True))
        n += 1
    out.write("\n]}\n")
    return n


def csv_header(receipt_base: str | None = None) -> list[str]:
    return [*CSV_COLUMNS, *(["receipt_url"] if receipt_base is not None else [])]


def csv_row(e: AuditEvent, receipt_base: str | None = None) -> list[Any]:
    doc = event_json(e, receipt_base)
    doc["datasets"] = ",".join(e.datasets)
    doc["detail"] = json.dumps(e.detail, sort_keys=True)
    return ["" if doc.get(c) is None else doc[c] for c in csv_header(receipt_base)]


def write_csv(events: Iterable[AuditEvent], out: TextIO, *, receipt_base: str | None = None) -> int:
    """A header row, then one row per event; returns the number of events."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(csv_header(receipt_base))
    n = 0
    for e in events:
        w.writerow(csv_row(e, receipt_base))
        n += 1
    return n


def csv_text(events: Iterable[AuditEvent], receipt_base: str | None = None) -> str:
    buf = io.StringIO()
    write_csv(events, buf, receipt_base=receipt_base)
    return buf.getvalue()


# The database a hub's configuration names --------------------------------------------------------------


def db_url_from_config(config_file: Path) -> str:
    """``c.DCRPolicy.db_url`` of a ``jupyterhub_config.py`` (the default when it sets none), read with
    traitlets' loader. A relative SQLite path is resolved as the hub resolves it, against the hub's working
    directory, taken to be the configuration file's directory (give ``--db-url`` otherwise)."""
    from sqlalchemy.engine import make_url
    from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader

    from .policy import DCRPolicy

    path = Path(config_file).absolute()
    if not path.is_file():
        raise DCRError(f"no hub configuration file at {path}")
    try:
        config = PyFileConfigLoader(path.name, str(path.parent)).load_config()
    except ConfigFileNotFound:
        raise DCRError(f"no hub configuration file at {path}") from None
    except Exception as e:  # the file is Python: whatever it raises is a configuration error
        raise DCRError(f"cannot load {path}: {e.__class__.__name__}: {e}") from None
    url = str(DCRPolicy(config=config).db_url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_absolute():
        url = parsed.set(database=str(path.parent / parsed.database)).render_as_string(hide_password=False)
    return url
