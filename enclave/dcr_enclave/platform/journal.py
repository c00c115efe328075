"""The enclave host's event journal: the job events the hub copies into its audit trail.

One JSON object per line in ``<state>/events.jsonl`` (root-only, ``0600``, only ever appended to): ``journal``
(the journal's random id, the same on every line), ``run`` (the id of the host run that wrote it), ``seq``
(1, 2, 3, ... over the whole journal), ``time`` and ``event``, with the structured fields of
:data:`FIELDS` only:

- ``launch``: ``job_id``, ``grant_id``, ``user``, ``datasets`` (``provider/dataset`` of each granted dataset);
- ``key_released``: ``job_id``, ``grant_id``, ``user``, ``dataset``, ``version``;
- ``key_refused``: ``job_id``, ``dataset``, ``version`` (when well-formed), ``reason_code`` (the kind of
  check that failed, one of :data:`dcr_enclave.platform.broker.REFUSAL_CODES`);
- ``end``: ``job_id``, ``grant_id``, ``user``, ``state`` and, for a failure, ``reason_code``.

Free text (refusal messages, failure reasons) never enters the journal: nothing a notebook chooses does.

Readers page through it with a **cursor**, an opaque string ``<journal>:<seq>:<offset>`` naming the last
event read and the byte offset after it (:meth:`HostJournal.read`); a cursor of another journal (or none)
reads from the start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Final

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError

#: The fields an event may carry besides ``journal``, ``run``, ``seq``, ``time`` and ``event``.
FIELDS: Final = frozenset(
    {"job_id", "grant_id", "user", "datasets", "dataset", "version", "state", "reason_code"}
)
#: The events journalled (the host's audit log has others, such as ``cancel``).
EVENTS: Final = frozenset({"launch", "key_released", "key_refused", "end"})
#: Most events one read returns.
MAX_PAGE: Final = 500


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def journal_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """An audit record's fields as the journal keeps them: ``provider`` and ``dataset`` become one
    ``dataset`` reference, and values from a request are kept only when well-formed (names, a digest)."""
    out = {k: v for k, v in fields.items() if k in FIELDS and k != "dataset"}
    provider, dataset = fields.get("provider"), fields.get("dataset")
    if isinstance(provider, str) and isinstance(dataset, str):
        with contextlib.suppress(DCRError):
            out["dataset"] = (
                f"{contract.check_name(provider, 'provider')}/{contract.check_name(dataset, 'dataset')}"
            )
    if not (isinstance(out.get("version"), str) and _DIGEST.fullmatch(out["version"])):
        out.pop("version", None)
    for name in ("job_id", "grant_id", "user", "state", "reason_code"):
        if name in out and not (isinstance(out[name], str) and len(out[name]) <= 255):
            out.pop(name)
    if "datasets" in out and not isinstance(out["datasets"], list):
        out.pop("datasets")
    return out


class HostJournal:
    """Append-only, owner-only JSON lines with a journal id, a run id and a sequence number."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.run_id = secrets.token_hex(8)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            self.journal_id, self.seq, self.size = self._scan(fd)
        finally:
            os.close(fd)

    def _scan(self, fd: int) -> tuple[str, int, int]:
        """The journal id and the last sequence number of an existing journal (a new id for an empty one);
        a torn last line (a host killed mid-write) is cut off so the next line starts clean."""
        journal_id, seq, good = "", 0, 0
        with os.fdopen(os.dup(fd), "rb") as f:
            offset = 0
            for line in f:
                offset += len(line)
                try:
                    doc = json.loads(line) if line.endswith(b"\n") else None
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    break
                journal_id = journal_id or str(doc.get("journal", ""))
                seq, good = int(doc.get("seq", seq)), offset
        if good != os.fstat(fd).st_size:
            os.ftruncate(fd, good)
        return journal_id or secrets.token_hex(8), seq, good

    def append(self, event: str, **fields: Any) -> None:
        if event not in EVENTS:
            return
        with self._lock:
            doc = {k: v for k, v in journal_fields(fields).items() if v is not None}
            doc.update(
                journal=self.journal_id, run=self.run_id, seq=self.seq + 1, time=time.time(), event=event
            )
            line = (json.dumps(doc, sort_keys=True) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            self.seq += 1
            self.size += len(line)

    def cursor(self, seq: int, offset: int) -> str:
        return f"{self.journal_id}:{seq}:{offset}"

    def read(self, after: Any, limit: int = MAX_PAGE) -> dict[str, Any]:
        """The events after the cursor ``after`` (at most ``limit``), the cursor after them and whether
        there are more."""
        if after is not None and not isinstance(after, str):
            raise DCRError("events needs after: a cursor string (or none)")
        limit = max(1, min(int(limit), MAX_PAGE))
        with self._lock:
            end_seq, end = self.seq, self.size
        seq, offset = 0, 0
        if after:
            parts = after.split(":")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                raise DCRError("malformed events cursor")
            if parts[0] == self.journal_id:
                seq, offset = int(parts[1]), int(parts[2])
                if seq > end_seq or offset > end:
                    raise DCRError("the events cursor is past the end of this host's journal")
        events: list[dict[str, Any]] = []
        with open(self.path, "rb") as f:
            f.seek(offset)
            while len(events) < limit and offset < end:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                doc = json.loads(line)
                if doc.get("seq") != seq + 1:
                    raise DCRError("the events cursor does not point at an event boundary of this journal")
                events.append(doc)
                seq, offset = seq + 1, offset + len(line)
        return {"events": events, "cursor": self.cursor(seq, offset), "more": offset < end}
