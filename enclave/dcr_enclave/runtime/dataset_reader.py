"""Reading the granted datasets in the enclave: key release, manifest and file checks, decryption.

Every key is released and every manifest checked before the first file is decrypted, so a tampered
manifest of any dataset refuses the job with nothing decrypted. The plaintext lands in ``data`` (on the
supervisor's private tmpfs), read-only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.dataset import STORE_ALTERED_HINT, DatasetFile, DatasetVersion
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.grant import Grant
from dcr_enclave.formats.store_layout import StoreLayout
from dcr_enclave.formats.streamcrypt import FileContext, decrypt_file
from dcr_enclave.runtime.platform_link import PlatformLink


def fetch_datasets(
    link: PlatformLink,
    g: Grant,
    grant_token: str,
    hub_jwks: list[dict[str, Any]],
    store_root: Path,
    data: Path,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Release every granted dataset's key, check every manifest and file, then decrypt into ``data``.

    Returns the receipt's dataset entries and the digest of each condition that released a key.
    """
    store = StoreLayout(store_root)
    receipt_datasets = []
    conditions = {}
    # Every key is released and every manifest checked before the first file is decrypted.
    checked: list[tuple[DatasetVersion, bytes, list[tuple[DatasetFile, Path]]]] = []
    for d in g.datasets:
        try:
            manifest: DatasetVersion = store.load(d.provider, d.dataset, d.version)
        except DCRError as e:
            raise type(e)(f"dataset {d.key}: {e.message}", hint=e.hint) from None
        challenge = link.challenge()
        token = link.token(contract.KEY_RELEASE_AUDIENCE, [challenge])
        data_key, conditions[d.key] = link.release(
            provider=d.provider,
            dataset=d.dataset,
            version=d.version,
            wrapped_key=manifest.key.to_json(),
            token=token,
            grant=grant_token,
            hub_jwks=hub_jwks,
            challenge=challenge,
        )
        checked.append((manifest, data_key, check_dataset_files(store, manifest, data_key)))
    for manifest, data_key, files in checked:
        target = data / manifest.provider / manifest.dataset
        target.mkdir(parents=True, exist_ok=True)
        for f, src in files:
            # Each chunk authenticates under associated data naming this provider, dataset, version,
            # file and position, so the plaintext is exactly what the provider encrypted for this
            # version; hashing it again would halve decryption speed for no further assurance.
            ctx = FileContext(manifest.provider, manifest.dataset, manifest.version, f.name)
            decrypt_file(src, target / f.name, data_key, ctx, mode=0o444, digest=False)
        receipt_datasets.append(
            {
                "provider": manifest.provider,
                "dataset": manifest.dataset,
                "version": manifest.version,
                "files": [{"name": f.name, "ciphertext_sha256": f.ciphertext_sha256} for f in manifest.files],
            }
        )
    for p in [data, *data.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o555)
    return receipt_datasets, conditions


def check_dataset_files(
    store: StoreLayout, manifest: DatasetVersion, data_key: bytes
) -> list[tuple[DatasetFile, Path]]:
    """The files to decrypt, once the manifest's file list authenticates under the released data key and
    every encrypted file is in the store at the size the manifest gives; refuses naming the dataset.

    Without the MAC a storage attacker could drop a file entry and the job would run on part of the data;
    the size check catches a missing, truncated or extended file before the first byte is decrypted (the
    decryption's own header and chunk checks stay the authority on content).
    """
    manifest.check_files_mac(data_key)
    files = []
    for f in manifest.files:
        src = store.ciphertext_path(manifest, f.name)
        try:
            st = src.stat()
        except FileNotFoundError:
            problem = "is missing from the store"
        except OSError as e:
            raise DCRError(
                f"dataset {manifest.ref}: cannot read the encrypted file of {f.name}: {e.strerror}"
            ) from None
        else:
            if not stat.S_ISREG(st.st_mode):
                problem = "is not a regular file"
            elif st.st_size != f.ciphertext_size:
                problem = f"is {st.st_size} bytes, not the {f.ciphertext_size} its manifest gives"
            else:
                files.append((f, src))
                continue
        raise IntegrityError(
            f"dataset {manifest.ref} version {manifest.version}: the encrypted file of {f.name} {problem}",
            hint=STORE_ALTERED_HINT,
        )
    return files
