"""Where a dataset version lives in a store, and reading its manifest back.

Layout::

    STORE/<provider>/<dataset>/<version hex>/manifest.json
                                            /real/<name>.dcrenc      encrypted real file
                                            /synthetic/<name>        synthetic file, under the same name

``<name>`` is the file's one name in both stages (``/data/<provider>/<dataset>/<name>``): the real file's,
or the one the provider chose (``dcr provider add --synthetic-name``); the real file is encrypted under it.

The enclave reads a store through this class only (it never writes one); providers add and retire versions
with :class:`dcr_enclave.pack.store.Store`, which extends it.
"""

from __future__ import annotations

from pathlib import Path

from dcr_enclave.formats.contract import check_name
from dcr_enclave.formats.dataset import MANIFEST_FILE, MAX_MANIFEST_BYTES, DatasetVersion
from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError, IntegrityError


class StoreLayout:
    """Read-only access to the dataset versions under a store directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    def dataset_dir(self, provider: str, dataset: str) -> Path:
        return self.root / check_name(provider, "provider") / check_name(dataset, "dataset")

    def version_dir(self, provider: str, dataset: str, version: str) -> Path:
        return self.dataset_dir(provider, dataset) / check_digest(version, "dataset version").removeprefix(
            "sha256:"
        )

    def exists(self, provider: str, dataset: str, version: str) -> bool:
        return (self.version_dir(provider, dataset, version) / MANIFEST_FILE).is_file()

    def load(self, provider: str, dataset: str, version: str) -> DatasetVersion:
        """The manifest of one version, checked against where it is stored."""
        path = self.version_dir(provider, dataset, version) / MANIFEST_FILE
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise DCRError(f"no version {version} of {provider}/{dataset} in the store {self.root}") from None
        except OSError as e:
            raise DCRError(f"cannot read {path}: {e.strerror}") from None
        manifest = DatasetVersion.from_json(data)
        if (manifest.provider, manifest.dataset, manifest.version) != (provider, dataset, version):
            raise IntegrityError(
                f"{path} describes {manifest.ref}@{manifest.version}, not {provider}/{dataset}@{version}"
            )
        return manifest

    def _member(self, manifest: DatasetVersion, rel: str) -> Path:
        base = self.version_dir(manifest.provider, manifest.dataset, manifest.version)
        path = base / rel
        # Manifest paths are validated relative paths; refuse anyway if a link in the store leads out.
        if not path.resolve().is_relative_to(base.resolve()):
            raise IntegrityError(f"{path} leads out of its version directory")
        return path

    def ciphertext_path(self, manifest: DatasetVersion, file_name: str) -> Path:
        return self._member(manifest, manifest.file(file_name).ciphertext)

    def synthetic_path(self, manifest: DatasetVersion, file_name: str) -> Path:
        return self._member(manifest, manifest.file(file_name).synthetic)
