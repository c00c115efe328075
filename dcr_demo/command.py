"""``dcr demo``: the whole DCR on this machine, on 127.0.0.1, with demo users, datasets and a sample notebook.

Registered in the ``dcr.commands`` entry-point group (``demo = dcr_demo.command:register``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError

from .prepare import prepare
from .run import run_demo

DEFAULT_DIR = ".demo"
DEFAULT_PORT = 8000
DEFAULT_ACCOUNT_PREFIX = "dcr-demo-"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the demo: a JupyterHub on 127.0.0.1 with demo users and datasets and the local enclave",
        description=(
            "Start DCR on this machine: JupyterHub (DCR's local spawner, grant service and JupyterLab) with two "
            "researchers, one data provider and its reviewer, the local SIMULATED enclave host, and three demo "
            "datasets whose real rows come from a seeded generator and whose synthetic versions are made with "
            "differential privacy on the first run (one of them releases outputs only after the reviewer "
            "approves them). Prints the URL and the logins; Ctrl-C stops everything. Run as root: "
            "each researcher's server runs as its own system account (created on first login)."
        ),
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(DEFAULT_DIR),
        metavar="DIR",
        help=f"demo directory: data, store, keys, hub database, logs (default {DEFAULT_DIR}; reused by later runs)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port of the hub on 127.0.0.1 (default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--proxy",
        metavar="PATH",
        help="configurable-http-proxy executable (default: the checkout's .npm/, then $PATH)",
    )
    p.add_argument(
        "--account-prefix",
        default=DEFAULT_ACCOUNT_PREFIX,
        metavar="PREFIX",
        help=f"prefix of the system accounts created for the demo users (default {DEFAULT_ACCOUNT_PREFIX})",
    )
    p.add_argument(
        "--review-time-quantum",
        type=float,
        default=contract.DEFAULT_TIME_QUANTUM,
        metavar="SECONDS",
        help="seconds to which the enclave rounds up the end of a job under review, so that its length "
        "tells little about the data (default %(default)s; the enclave host's --review-time-quantum)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    if not args.review_time_quantum > 0:
        raise DCRError(
            f"--review-time-quantum must be a positive number of seconds, not {args.review_time_quantum}",
            hint="leave it out for the default (60)",
        )
    demo = prepare(args.dir, args.port, args.proxy, args.account_prefix, say)
    try:
        return run_demo(demo, say, review_time_quantum=args.review_time_quantum)
    finally:
        os.close(demo.lock_fd)
