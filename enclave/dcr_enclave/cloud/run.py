"""One job on Confidential Space: stage inputs from Cloud Storage, run the supervisor, write the results.

Order, each step refusing before the next (the supervisor's own steps are in
:mod:`dcr_enclave.runtime.supervisor`):

1. read the launch environment; every name of :data:`~dcr_enclave.formats.contract.LAUNCH_ENV_NAMES` must be
   there, the URIs must be ``gs://``; mount the private tmpfs (this process is in its own mount namespace:
   :mod:`dcr_enclave.cloud.__main__` saw to it);
2. the supervisor verifies the grant; only then is the bundle copied onto the tmpfs (and checked against
   its digest by extraction);
3. for each granted dataset, from the store the *grant* names (``cloud.store``, else STORE_URI): its
   manifest, refused unless its key is the Cloud KMS key the grant pins, then its encrypted files, all onto
   the tmpfs; then the supervisor's key release (:class:`~dcr_enclave.cloud.link.CloudLink`), checks and
   decryption as locally; the ciphertext copies are dropped once decrypted;
4. under review, nothing more is written before the next multiple of the time quantum since the start:
   the hub sees when objects appear and when the VM stops, and how long the notebook ran is its code's to
   choose (the local enclave host holds back the end the same way);
5. the results (sealed outputs, sealed details, the receipt) are written under OUTPUT_URI create-only,
   ``receipt.json`` last; a failed job writes its sealed detail (if any) and ``failure.json`` last. The
   completion object's presence means the job is over; exit status 0 or 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dcr_enclave.cloud.gcs import Bucketed, storage_client
from dcr_enclave.cloud.link import CloudLink
from dcr_enclave.formats import contract
from dcr_enclave.formats.bundle import BundleLimits, BundleManifest
from dcr_enclave.formats.contract import ENV, GsUri, parse_gs_uri
from dcr_enclave.formats.dataset import MANIFEST_FILE, MAX_MANIFEST_BYTES, KmsKey
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import Grant
from dcr_enclave.formats.jwk import parse_jwks
from dcr_enclave.formats.store_layout import StoreLayout
from dcr_enclave.runtime.supervisor import JobFailed, Launch, Supervisor, mount_scratch

#: The bundle object may be this much bigger than its files (tar headers, its manifest).
BUNDLE_OVERHEAD_BYTES = 16 * 2**20
#: What a failed job may upload besides ``failure.json``: nothing the run produced but the sealed detail.
FAILURE_FILES = (contract.SEALED_FAILURE_FILE,)


class CloudLaunch:
    """The launch environment with its Cloud Storage locations, read once."""

    def __init__(self, env: Mapping[str, str], scratch: Path) -> None:
        missing = [n for n in contract.LAUNCH_ENV_NAMES if not env.get(n)]
        if missing:
            raise DCRError(f"launch environment lacks {', '.join(missing)}")
        self.bundle = parse_gs_uri(env[ENV.BUNDLE_URI], ENV.BUNDLE_URI)
        self.store = parse_gs_uri(env[ENV.STORE_URI], ENV.STORE_URI)
        self.output = _prefix(parse_gs_uri(env[ENV.OUTPUT_URI], ENV.OUTPUT_URI))
        self.progress = _prefix(parse_gs_uri(env[ENV.PROGRESS_URI], ENV.PROGRESS_URI))
        staged = scratch / "in"
        self.launch = Launch(
            job_id=contract.check_job_id(env[ENV.JOB_ID]),
            bundle_digest=env[ENV.BUNDLE_DIGEST],
            bundle_path=staged / "bundle.tar",
            grant_token=env[ENV.GRANT],
            hub_key_thumbprint=env[ENV.HUB_KEY_THUMBPRINT],
            hub_jwks=parse_jwks(env[ENV.HUB_JWKS], "hub JWKS"),
            store=staged / "store",
            output=scratch / "result",
        )


def _prefix(uri: GsUri) -> GsUri:
    return uri if not uri.name or uri.name.endswith("/") else GsUri(uri.bucket, uri.name + "/")


class CloudSupervisor(Supervisor):
    """The supervisor, with its inputs staged from Cloud Storage onto its private tmpfs."""

    def __init__(
        self,
        cloud: CloudLaunch,
        link: CloudLink,
        storage: Bucketed,
        scratch: Path,
        ids: tuple[int, int],
        time_quantum: float = contract.DEFAULT_TIME_QUANTUM,
    ) -> None:
        super().__init__(cloud.launch, link, scratch, ids, time_quantum)
        self.cloud = cloud
        self.cloud_link = link
        self.storage = storage
        self.grant: Grant | None = None

    def verify_grant(self) -> Grant:
        g = super().verify_grant()
        self.cloud_link.bind(g)
        self.grant = g
        return g

    def hold_until_quantum(self) -> None:
        """Under review, sleep until the next multiple of the time quantum since the start (see module doc).
        Before the grant verified nothing of the notebook's has run, and there is nothing to hide."""
        if self.grant is None or self.grant.release_mode != "review":
            return
        q = self.time_quantum
        due = self.started_at + math.ceil(max(time.time() - self.started_at, 1e-9) / q) * q
        while (left := due - time.time()) > 0:
            time.sleep(left)

    def unpack(self) -> BundleManifest:
        self.storage.download(
            self.cloud.bundle,
            self.launch.bundle_path,
            max_bytes=BundleLimits().max_bytes + BUNDLE_OVERHEAD_BYTES,
            what="the bundle",
        )
        try:
            return super().unpack()
        finally:
            self.launch.bundle_path.unlink(missing_ok=True)

    def fetch_datasets(self, g: Grant) -> tuple[list[dict[str, Any]], dict[str, str]]:
        self.stage_datasets(g)
        try:
            return super().fetch_datasets(g)
        finally:
            # Decrypted (or refused): the tmpfs holds the plaintext only from here on.
            shutil.rmtree(self.launch.store, ignore_errors=True)

    def stage_datasets(self, g: Grant) -> None:
        """Copy each granted version's manifest, then (once its key is the one the grant pins) its
        encrypted files, from the store the grant names into a local store on the tmpfs."""
        local = StoreLayout(self.launch.store)
        for d in g.datasets:
            if d.cloud is None:
                raise DCRError(
                    f"dataset {d.key}: the grant names no Cloud KMS key or Workload Identity provider",
                    hint="the hub's policy needs a 'cloud' entry for every dataset on confidential_space",
                )
            root = _prefix(parse_gs_uri(d.cloud.store, f"dataset {d.key} store"))
            rel = f"{d.provider}/{d.dataset}/{d.version.removeprefix('sha256:')}/"
            vdir = local.version_dir(d.provider, d.dataset, d.version)
            self.storage.download(
                root.child(rel + MANIFEST_FILE),
                vdir / MANIFEST_FILE,
                max_bytes=MAX_MANIFEST_BYTES,
                what=f"the manifest of dataset {d.key}",
            )
            manifest = local.load(d.provider, d.dataset, d.version)
            if not isinstance(manifest.key, KmsKey) or manifest.key.name != d.cloud.kms_key:
                raise DCRError(
                    f"dataset {d.key}: its manifest's data key is not wrapped by the Cloud KMS key the grant "
                    f"pins ({d.cloud.kms_key})",
                    hint="the store holds a version registered under another key: ask the provider",
                )
            for f in manifest.files:
                self.storage.download(
                    root.child(rel + f.ciphertext),
                    local.ciphertext_path(manifest, f.name),
                    max_bytes=f.ciphertext_size,
                    what=f"the encrypted file {f.name} of dataset {d.key}",
                )


def sandbox_ids(env: Mapping[str, str]) -> tuple[int, int]:
    value = env.get(contract.CLOUD_SANDBOX_IDS)
    if not value:
        return contract.CLOUD_KERNEL_UID, contract.CLOUD_KERNEL_GID
    try:
        uid, gid = (int(x) for x in value.split(":"))
    except ValueError:
        raise DCRError(f"{contract.CLOUD_SANDBOX_IDS} must be uid:gid") from None
    if uid < 1000 or gid < 1000:
        raise DCRError(f"{contract.CLOUD_SANDBOX_IDS} must name an unprivileged account")
    return uid, gid


def scratch_bytes(env: Mapping[str, str]) -> int:
    """The tmpfs's size limit: as set, else half the machine's memory (a limit, not an allocation)."""
    if value := env.get(contract.CLOUD_SCRATCH_BYTES):
        if not value.isdigit() or int(value) < 2**20:
            raise DCRError(f"{contract.CLOUD_SCRATCH_BYTES} must be a number of bytes (at least 1 MiB)")
        return int(value)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 2 * 2**30


def upload_results(
    storage: Bucketed, result: Path, output: GsUri, names: tuple[str, ...] | None = None
) -> None:
    """Upload what the supervisor wrote (only ``names``, when given), ``receipt.json`` last; create-only."""
    if not result.is_dir():  # the job failed before the tmpfs was there
        return
    present = sorted(p.name for p in result.iterdir() if p.is_file() and not p.is_symlink())
    chosen = [n for n in present if names is None or n in names]
    for name in sorted(chosen, key=lambda n: n == contract.RECEIPT_FILE):
        storage.create(output.child(name), result / name)


def write_failure(storage: Bucketed, result: Path, output: GsUri, report: dict[str, Any]) -> None:
    upload_results(storage, result, output, FAILURE_FILES)
    storage.create(
        output.child(contract.FAILURE_FILE), json.dumps(report).encode(), content_type="application/json"
    )


def run(env: Mapping[str, str]) -> int:
    """The job, start to end; 0 once the receipt is written, 1 once the failure is."""
    scratch = Path(env.get(contract.CLOUD_SCRATCH) or contract.DEFAULT_CLOUD_SCRATCH)
    storage = Bucketed(storage_client(env))
    try:
        cloud = CloudLaunch(env, scratch)
    except DCRError as e:
        # Without a valid launch there is nowhere trustworthy to report to but the (debug-only) log.
        print(json.dumps({"kind": contract.Progress.FAILED, "reason": str(e)}), file=sys.stderr)
        return 1
    link = CloudLink(env, storage, cloud.progress)
    report: dict[str, Any]
    sup: CloudSupervisor | None = None
    try:
        try:
            quantum = float(env.get(contract.CLOUD_TIME_QUANTUM) or contract.DEFAULT_TIME_QUANTUM)
        except ValueError:
            quantum = math.nan
        if not 0 < quantum < math.inf:
            raise DCRError(f"{contract.CLOUD_TIME_QUANTUM} must be a positive number of seconds")
        mount_scratch(scratch, scratch_bytes(env))
        cloud.launch.output.mkdir(mode=0o700)  # the supervisor seals and writes its results here
        sup = CloudSupervisor(cloud, link, storage, scratch, sandbox_ids(env), quantum)
        sup.run()
        sup.hold_until_quantum()
        upload_results(storage, scratch / "result", cloud.output)
        return 0
    except JobFailed as e:
        report = e.report
    except DCRError as e:
        report = {"reason": str(e), "cell": None, "ename": None}
    except Exception as e:  # a bug: say which kind, never the message (it could carry data)
        report = {"reason": f"supervisor error ({type(e).__name__})", "cell": None, "ename": None}
    if sup is not None:
        sup.hold_until_quantum()
    with contextlib.suppress(DCRError, OSError):  # the failure object below is what counts
        link.progress({"kind": contract.Progress.FAILED, **report})
    try:
        write_failure(storage, scratch / "result", cloud.output, report)
    except DCRError as e:
        print(json.dumps({"kind": contract.Progress.FAILED, "reason": str(e)}), file=sys.stderr)
    return 1


def main() -> int:
    return run(dict(os.environ))
