"""All of Google the tests talk to, started together, and a provider's registration through it.

:func:`register_version` does what a provider does with ``dcr provider add --store gs://... --kms-key``
and ``dcr provider policy --gcp``, with the same code (:mod:`dcr_enclave.pack.gcp`): the data key wrapped
by the KMS fake, the version uploaded to the storage emulator, the pool provider's condition deployed on
the STS fake and the key's decrypt binding given to that provider's principals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dcr_enclave.formats.contract import GsUri
from dcr_enclave.formats.dataset import DatasetVersion
from dcr_enclave.pack.gcp import KmsKeyWrapper, upload_version
from dcr_enclave.pack.store import Store
from dcr_enclave.platform.condition import KeyReleaseCondition, PlatformCondition
from dcr_enclave.platform.condition_cel import compile_wip_condition
from dcr_enclave.platform.sandbox_ids import DEFAULT_COUNT, DEFAULT_FIRST, SandboxIds
from gcp_fakes.issuer import FakeAttestationIssuer
from gcp_fakes.kms import KmsFake
from gcp_fakes.storage import StorageEmulator
from gcp_fakes.sts import StsFake


@dataclass
class Google:
    issuer: FakeAttestationIssuer
    storage: StorageEmulator
    sts: StsFake
    kms: KmsFake

    @classmethod
    def start(cls, buckets: Iterable[str] = ()) -> Google:
        storage = StorageEmulator().start()
        sts = StsFake().start()
        google = cls(FakeAttestationIssuer(), storage, sts, KmsFake(sts).start())
        for name in buckets:
            storage.create_bucket(name)
        return google

    def stop(self) -> None:
        self.kms.stop()
        self.sts.stop()
        self.storage.stop()


def register_version(
    google: Google,
    store: Store,
    provider: str,
    dataset: str,
    files: list[tuple[Path, Path]],
    *,
    kms_key: str,
    wip_provider: str,
    upload_to: GsUri,
    enclave_digests: tuple[str, ...],
    hub_key_thumbprints: tuple[str, ...],
    project: str,
    service_accounts: tuple[str, ...],
) -> tuple[DatasetVersion, KeyReleaseCondition]:
    """Register a version wrapped by ``kms_key``, upload it under ``upload_to`` and deploy its condition."""
    google.kms.create_key(kms_key)
    added = store.add(provider, dataset, files, keys=KmsKeyWrapper(kms_key, endpoint=google.kms.endpoint))
    rel = added.path.relative_to(store.root).as_posix()
    upload_version(added.path, rel, upload_to, google.storage.client())
    cond = KeyReleaseCondition(
        provider=provider,
        dataset=dataset,
        versions=(added.manifest.version,),
        platform=PlatformCondition.defaults(
            "confidential_space", project_id=project, service_accounts=service_accounts
        ),
        enclave_digests=enclave_digests,
        hub_key_thumbprints=hub_key_thumbprints,
    )
    principal = google.sts.add_provider(wip_provider, compile_wip_condition(cond), google.issuer)
    google.kms.allow_decrypt(kms_key, principal)
    return added.manifest, cond


#: The notebook the cloud tests run on ``acme/insurance``: it counts the real rows into an output file.
COUNT_ROWS = [
    "import csv, os\n"
    "rows = list(csv.DictReader(open('/data/acme/insurance/real.csv')))\n"
    "os.makedirs('results', exist_ok=True)\n"
    "open('results/summary.csv', 'w').write(f'rows\\n{len(rows)}\\n')",
    "print('done')",
]


def vm_sandbox_ids(state: Path) -> tuple[int, int]:
    """A kernel account for a test "VM": from the range just above the enclave host's default, so a VM in
    one test lane never shares an id with a local job's kernel in the other (each allocator only knows the
    ids its own state file handed out and the ones running at the time)."""
    return SandboxIds(state, first=DEFAULT_FIRST + DEFAULT_COUNT, count=DEFAULT_COUNT).allocate()
