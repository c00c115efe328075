"""``dcr local-run``: the secure stage without a hub, for providers and for trying DCR out.

It bundles the notebook, issues a grant with the local development hub key (the one ``dcr provider add``
pins by default), runs the job on an enclave host (an existing one with ``--host-socket``, else one it
starts for the duration of the run), and leaves the decrypted outputs and the receipt in ``--out``.

Stopped (Ctrl-C, ``SIGTERM`` as from ``timeout``, ``SIGHUP``) while its job runs, it cancels the job and
removes what it made: the job's processes, its spool on the host, its temporary files; the exit status is
128 plus the signal's number. Killed outright (``SIGKILL``), its own enclave host dies with it and so do the
job's processes (they die with the host); the host started next on that state directory removes the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dcr_enclave.commands.enclave_host import parse_id_range
from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset, OutputLimits
from dcr_enclave.formats.jwk import public_jwk
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.formats.unsealing import open_dir
from dcr_enclave.pack.bundle_builder import build_bundle, data_references
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import read_private_key
from dcr_enclave.pack.store import DEV_HUB_KEY_FILE, Store
from dcr_enclave.platform.client import HostClient
from dcr_enclave.platform.host import EnclaveHost, HostConfig
from dcr_enclave.platform.sandbox_ids import DEFAULT_COUNT, DEFAULT_FIRST

DEFAULT_STATE = "/var/lib/dcr/enclave-host"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "local-run",
        help="run a notebook on the real data in the local (SIMULATED) enclave and fetch outputs and receipt",
    )
    p.add_argument("notebook", type=Path)
    p.add_argument("--store", required=True, type=Path, help="the dataset store")
    p.add_argument(
        "--out", required=True, type=Path, help="directory for outputs and the receipt (must not exist)"
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="PROVIDER/NAME",
        help="dataset to grant (latest version); default: the /data/... paths the notebook's files mention",
    )
    p.add_argument("--keys", type=Path, help="provider key material (default: STORE/.keys)")
    p.add_argument("--host-socket", type=Path, help="use this running enclave host instead of starting one")
    p.add_argument("--host-state", type=Path, default=Path(DEFAULT_STATE), help="state of the started host")
    p.add_argument("--time-limit", type=int, default=3600, help="seconds (default 3600)")
    p.add_argument(
        "--sandbox-ids",
        type=parse_id_range,
        default=f"{DEFAULT_FIRST}:{DEFAULT_COUNT}",
        help="range of unprivileged ids the jobs' kernels run as, one per job: FIRST:COUNT (default %(default)s); no account may use them",
    )
    p.set_defaults(func=run)


def pick_datasets(store: Store, wanted: list[str], referenced: list[tuple[str, str]]) -> list[GrantedDataset]:
    names: list[tuple[str, str]] = []
    if wanted:
        for w in wanted:
            if w.count("/") != 1:
                raise DCRError(f"--dataset {w!r} must be PROVIDER/NAME")
            p, d = w.split("/")
            names.append((contract.check_name(p, "provider"), contract.check_name(d, "dataset")))
    else:
        names = referenced
        if not names:
            raise DCRError(
                "the notebook mentions no /data/<provider>/<dataset>/ path", hint="name one with --dataset"
            )
    out = []
    for p, d in names:
        versions = [v for v in store.versions(p, d) if not v.retired]
        if not versions:
            raise DCRError(
                f"the store has no usable version of {p}/{d}", hint="register it with `dcr provider add`"
            )
        out.append(GrantedDataset(p, d, versions[-1].version, "auto"))
    return out


class Stopped(Exception):
    """A signal asked ``dcr local-run`` to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame: Any) -> None:
    # One stop is enough: a second signal must not interrupt the clean-up the first one started.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def run(args: argparse.Namespace) -> int:
    # A signal becomes an exception, so that every clean-up below runs (cancel, host shutdown, temp files).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGHUP, _stop)
    try:
        return _run(args)
    except Stopped as e:
        print(
            f"local-run: stopped by {e}; its job, if it had started, was cancelled and removed",
            file=sys.stderr,
        )
        return 128 + e.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    # Every check on the arguments comes before anything is written (host state, keys, --out).
    if args.out.exists() or args.out.is_symlink():
        raise DCRError(f"{args.out} already exists", hint="choose a new --out directory")
    if args.time_limit <= 0:
        raise DCRError(f"--time-limit must be a positive number of seconds, not {args.time_limit}")
    if not args.store.is_dir():
        raise DCRError(f"the store {args.store} does not exist", hint="create it with `dcr provider add`")
    store = Store(args.store)
    keys_dir = args.keys or args.store / ".keys"
    dev_key = keys_dir / DEV_HUB_KEY_FILE
    if not dev_key.is_file():
        # A key made now would be pinned by no provider's condition: every key release would be refused.
        raise DCRError(
            f"there is no local development hub key at {dev_key}",
            hint="register the datasets with `dcr provider add` without --hub-key, or pass --keys",
        )
    hub_key = read_private_key(dev_key)
    print("local-run: using the LOCAL DEVELOPMENT hub key (not for production)", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="dcr-local-run-") as tmp:
        bundle_path = Path(tmp) / "bundle.tar"
        bundle = build_bundle(args.notebook, bundle_path)
        datasets = pick_datasets(store, args.dataset, data_references(bundle, args.notebook.parent))
        private, public = generate_keypair()
        job_id = contract.new_job_id()
        grant = issue_grant(
            hub_key,
            user=getpass.getuser(),
            job_id=job_id,
            bundle_digest=bundle.digest,
            datasets=datasets,
            output_public_key=public,
            output_limits=OutputLimits(),
            time_limit=args.time_limit,
        )
        host, thread = None, None
        if args.host_socket:
            client = HostClient(args.host_socket)
        else:
            sock = Path(tmp) / "host.sock"
            host = EnclaveHost(
                HostConfig(
                    state_dir=args.host_state,
                    socket_path=sock,
                    store=args.store,
                    keys_dir=keys_dir,
                    hub_keys=[public_jwk(hub_key)],
                    sandbox_ids=args.sandbox_ids,
                )
            )
            host.prepare()
            thread = threading.Thread(target=host.serve_forever, daemon=True)
            thread.start()
            client = HostClient(sock)
            _wait_for(client)
        try:
            trust = (
                str(args.host_state / "public" / "jwks.json")
                if host
                else "<the enclave host's public/jwks.json>"
            )
            return _run_job(client, grant, bundle_path, job_id, private, args.out, datasets, trust)
        finally:
            if host:
                host.shutdown()


def _wait_for(client: HostClient) -> None:
    for _ in range(200):
        try:
            client.ping()
            return
        except DCRError:
            time.sleep(0.02)
    client.ping()


def _run_job(
    client: HostClient,
    grant: str,
    bundle_path: Path,
    job_id: str,
    private: bytes,
    out: Path,
    datasets: list[GrantedDataset],
    trust: str,
) -> int:
    job = client.launch(grant, bundle_path)
    try:
        return _follow_job(client, job, job_id, private, out, datasets, trust)
    except BaseException:
        # Stopped or failed while the job ran: it must not run on without anyone waiting for it.
        with contextlib.suppress(DCRError, OSError):
            client.cancel(job_id)
        raise
    finally:
        # The results are in --out (or the run was stopped): nothing of the job stays on the host.
        with contextlib.suppress(DCRError, OSError):
            client.delete(job_id)


def _follow_job(
    client: HostClient,
    job: dict[str, Any],
    job_id: str,
    private: bytes,
    out: Path,
    datasets: list[GrantedDataset],
    trust: str,
) -> int:
    print(f"job {job['job_id']} on the LOCAL SIMULATED enclave; datasets: " + ", ".join(
        f"{d.key}@{d.version[:19]}" for d in datasets), file=sys.stderr)  # fmt: skip
    final: dict[str, Any] = job
    for msg in client.watch(job_id):
        ev = msg.get("event") or {}
        if "state" in ev:
            print(f"  state: {ev['state']}", file=sys.stderr)
        if ev.get("cell"):
            i, n = ev["cell"]
            print(f"  cell {i + 1}/{n}", file=sys.stderr)
        if msg.get("end"):
            final = msg["job"]
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        client.result(job_id, staging)
        if final["state"] not in ("succeeded", "held"):
            f = final.get("failure") or {}
            where = f" in cell {f['cell'] + 1}" if isinstance(f.get("cell"), int) else ""
            ename = f" ({f['ename']})" if f.get("ename") else ""
            os.replace(staging, out)
            print(f"job {job_id} {final['state']}{where}{ename}: {f.get('reason', '')}", file=sys.stderr)
            return 1
        sealed = staging / contract.SEALED_OUTPUTS_FILE
        if sealed.exists():
            open_dir(sealed, staging / contract.OUTPUTS_DIR, private, job_id)
            sealed.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"job {job_id} {final['state']}: outputs and receipt in {out}", file=sys.stderr)
    print(f"verify with: dcr verify {out} --trust {trust}", file=sys.stderr)
    return 0
