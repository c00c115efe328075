"""``dcr enclave-host``: run the local TEE platform simulation (root only)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.jwk import load_jwks_file
from dcr_enclave.platform import process_visibility
from dcr_enclave.platform.client import DEFAULT_SOCKET
from dcr_enclave.platform.host import EnclaveHost, HostConfig
from dcr_enclave.platform.measure import current_measurement, load_cache
from dcr_enclave.platform.sandbox_ids import DEFAULT_COUNT, DEFAULT_FIRST

DEFAULT_STATE = "/var/lib/dcr/enclave-host"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "enclave-host",
        help="run the local enclave host (a SIMULATED TEE: isolation, attestation and key release, no memory encryption)",
        description=(
            "The local stand-in for Google Confidential Space: runs enclave jobs from a measured, read-only "
            "install, signs simulated attestation tokens, and releases providers' data keys under their "
            "conditions. Must run as root. Its image digest is also in STATE/public/image-digest once it runs."
        ),
    )
    p.add_argument(
        "--print-measurement",
        action="store_true",
        help="print the image digest (sha256:...) a host started now from this install would report, and "
        "exit; needs no root and no other option (a digest cache in --state that this account owns makes "
        "it faster)",
    )
    p.add_argument(
        "--store", type=Path, help="the providers' encrypted dataset store (required to run the host)"
    )
    p.add_argument("--keys", type=Path, help="the providers' key material (default: STORE/.keys)")
    p.add_argument(
        "--hub-key",
        action="append",
        type=Path,
        help="public key (PEM or JWKS) of a hub whose grants this host accepts; repeatable (at least one "
        "is required to run the host)",
    )
    p.add_argument(
        "--state", type=Path, default=Path(DEFAULT_STATE), help=f"state directory (default {DEFAULT_STATE})"
    )
    p.add_argument(
        "--socket", type=Path, default=Path(DEFAULT_SOCKET), help=f"unix socket (default {DEFAULT_SOCKET})"
    )
    p.add_argument(
        "--sandbox-ids",
        type=parse_id_range,
        default=f"{DEFAULT_FIRST}:{DEFAULT_COUNT}",
        help="range of unprivileged ids the jobs' kernels run as, one per job: FIRST:COUNT (default %(default)s); no account may use them",
    )
    p.add_argument(
        "--review-time-quantum",
        type=float,
        default=contract.DEFAULT_TIME_QUANTUM,
        help="seconds to which the end of a job under review is rounded up (default %(default)s)",
    )
    p.add_argument(
        "--job-nice",
        type=int,
        default=HostConfig.job_nice,
        choices=range(20),
        metavar="0-19",
        help="nice value of every process of a job, so that the servers and the hub stay responsive under "
        "load (default %(default)s); the job's account cannot lower it",
    )
    p.add_argument(
        "--job-cpu-weight",
        type=int,
        default=HostConfig.job_cpu_weight,
        metavar="1-10000",
        help="CPU weight of all jobs together against everything else (cgroup v2 scale, default 100 for a "
        "group; v1 cpu.shares scaled to match; default %(default)s); ignored without a cpu cgroup controller",
    )
    p.add_argument(
        "--allow-visible-processes",
        action="store_true",
        help="start although /proc is not mounted hidepid=invisible, so that every account of this machine can "
        "read the process titles of enclave jobs; only where no untrusted account can log in (docs/sandbox.md)",
    )
    p.set_defaults(func=run, usage_error=p.error)


def parse_id_range(text: str) -> tuple[int, int]:
    first, sep, count = text.partition(":")
    if not (sep and first.isdigit() and count.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST:COUNT (e.g. 2100000000:1000000)")
    return int(first), int(count)


def build_host(args: argparse.Namespace) -> EnclaveHost:
    hub_keys = [k for path in args.hub_key for k in load_jwks_file(path, "hub key")]
    cfg = HostConfig(
        state_dir=args.state,
        socket_path=args.socket,
        store=args.store,
        keys_dir=args.keys or args.store / ".keys",
        hub_keys=hub_keys,
        sandbox_ids=args.sandbox_ids,
        review_time_quantum=args.review_time_quantum,
        job_nice=args.job_nice,
        job_cpu_weight=args.job_cpu_weight,
    )
    host = EnclaveHost(cfg)
    host.prepare()
    return host


def print_measurement(state: Path) -> int:
    """Print what a host started now with this interpreter and package would report as its image digest
    (:func:`~dcr_enclave.platform.measure.current_measurement`: the measured parts of this package and the
    interpreter's environment, as the host copies and measures them at start)."""
    cache = state / "measure-cache.json"
    with contextlib.suppress(OSError):
        st = cache.stat()
        # Only a cache this account wrote (the host's own, for root): anyone else's could make it lie.
        if st.st_uid == os.geteuid() and not st.st_mode & 0o022:
            load_cache(cache)
    print(current_measurement(), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.print_measurement:
        return print_measurement(args.state)
    missing = [o for o, v in (("--store", args.store), ("--hub-key", args.hub_key)) if not v]
    if missing:
        args.usage_error(f"the following arguments are required: {', '.join(missing)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warning = process_visibility.check(args.allow_visible_processes)  # before anything is written
    host = build_host(args)
    if warning:
        print(f"enclave host: {warning}", flush=True)
    print(
        f"enclave host: SIMULATED TEE (no hardware memory encryption), image {host.measurement()}", flush=True
    )
    print(f"enclave host: attestation JWKS at {args.state / 'public' / 'jwks.json'}", flush=True)

    def stop(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        host.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        host.shutdown()
    return 0
