"""``dcr audit verify`` and ``dcr audit export``: the hub's audit trail, read from its database.

Both open the database ``--db-url`` gives, or the one ``c.DCRPolicy.db_url`` in ``--config`` names, and
change nothing in it: a missing file, or a database that is not a DCR hub's, is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from dcr_enclave.formats.errors import DCRError

from .audit import db_url_from_config, iter_events, write_csv, write_json
from .hubdb import HubDB

#: ``dcr audit verify``'s exit status when the chain is broken (errors exit 2, as every DCR command).
BROKEN = 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="verify or export the hub's hash-chained audit trail",
        description="The hub's audit trail (dcr_hub_audit): every grant and refusal, the enclave's launches, "
        "key releases and refusals and job ends, and the airlock's decisions, hash-chained.",
    )
    cmds = p.add_subparsers(dest="audit_command", required=True, metavar="{verify,export}")
    v = cmds.add_parser(
        "verify",
        help="check that no audit row was altered, deleted or inserted",
        description="Walk the whole chain: every row must hash to its recorded hash, link to the row "
        "before it, and the last row must be the head recorded beside the table. Exit 0 with a summary, "
        f"or {BROKEN} naming the first bad row.",
    )
    _db_args(v)
    v.set_defaults(func=run_verify)
    e = cmds.add_parser(
        "export",
        help="write the audit events as CSV or JSON",
        description="Write every audit event, oldest first, with its hashes (JSON also carries the head).",
    )
    _db_args(e)
    e.add_argument("--format", choices=("csv", "json"), default="json", help="output format (default: json)")
    e.add_argument(
        "--provider",
        metavar="NAME",
        action="append",
        help="only the events naming a dataset of this provider (repeatable)",
    )
    e.add_argument(
        "--output", "-o", type=Path, metavar="FILE", help="write here (created 0600); default: stdout"
    )
    e.set_defaults(func=run_export)


def _db_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--db-url", metavar="URL", help="the hub's DCR database (c.DCRPolicy.db_url)")
    g.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="the hub's jupyterhub_config.py: its c.DCRPolicy.db_url is used (a relative SQLite path is "
        "taken relative to the file's directory, the hub's working directory)",
    )


def open_db(args: argparse.Namespace) -> HubDB:
    url = args.db_url if args.db_url else db_url_from_config(args.config)
    db = HubDB(url, create=False)
    try:
        db.check_existing()
    except DCRError:
        db.dispose()
        raise
    return db


def run_verify(args: argparse.Namespace) -> int:
    db = open_db(args)
    try:
        result = db.verify_audit()
    finally:
        db.dispose()
    head_id, head_hash, _count = result.head
    if result.ok:
        print(f"audit chain OK: {result.rows} rows verified in {db.url}, head row {head_id} hash {head_hash}")
        return 0
    print(
        f"audit chain BROKEN at row {result.bad_id} ({result.problem}): {result.message}. "
        "Do not write to the database: keep a copy as evidence, compare it with a backup or an earlier "
        "`dcr audit export` (and the head recorded there), and find who had write access to it.",
        file=sys.stderr,
    )
    return BROKEN


def run_export(args: argparse.Namespace) -> int:
    db = open_db(args)
    try:
        head = db.audit_head()
        with _output(args.output) as out:
            events = iter_events(db, args.provider)
            n = write_csv(events, out) if args.format == "csv" else write_json(events, out, head=head)
    finally:
        db.dispose()
    if args.output is not None:
        print(f"{n} audit events written to {args.output} (head row {head[0]} hash {head[1]})")
    return 0


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DCRError(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "w", newline="") as f:
        yield f
