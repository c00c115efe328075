"""The DatasetVersion manifest: one immutable, content-addressed version of a provider's dataset.

A manifest names the encrypted real files and the synthetic files of a dataset version, how the real files
are encrypted, the wrapped data key (or the Cloud KMS key that unwraps it), the protection of the synthetic
version (provider file, differentially private with ε and δ, or random) and a MAC over its file list.

The version is a digest over the content: provider, dataset, each file's name, size, real plaintext digest
and synthetic digest, and the protection. Plaintext digests are deliberately *not* stored: anyone holding a
manifest could otherwise confirm a guess of a single file. :func:`dcr_enclave.pack.store.expected_version`
recomputes the version from decrypted files (``dcr provider`` checks a registration with it).

The enclave does not: it decrypts with ``digest=False`` and relies on authenticated encryption instead.
Each file's key is derived from the version's data key (which unwraps only for this provider, dataset and
version) and each chunk's associated data names provider, dataset, version, file and position, so a file
that decrypts is exactly the one the provider encrypted under that name for that version. Hashing the
plaintext as well would halve decryption speed.

Which files a version has is pinned by ``files_mac``: an HMAC-SHA256, under a key HKDF derives from the
data key with its own label, over provider, dataset, version, the encryption parameters and every field of
every file entry (:meth:`DatasetVersion.files_commitment`). Only the data key's holder can compute it, so
the enclave (:meth:`DatasetVersion.check_files_mac`, once the key is released and before any file is
decrypted) notices a storage attacker who removes, renames or resizes a file entry. ``created`` and
``retired`` are not covered (``dcr provider retire`` changes the flag without the key), nor is the wrapped
key (its own authenticated encryption binds it to the version).

Schema ``dcr/dataset-version/v2`` requires ``files_mac``. Manifests written before it (``.../v1``) are
still read, so stores can be listed and retired, but the enclave refuses them: re-registering the same
files with ``dcr provider add`` rebuilds the version with the MAC (same content, same version).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dcr_enclave.formats import streamcrypt
from dcr_enclave.formats.contract import check_file_name, check_name
from dcr_enclave.formats.digests import canonical_json, check_digest, sha256_json
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.jsonschemas import FORMATS_PACKAGE, validate

#: What registration writes: v1 plus the required ``files_mac``.
SCHEMA_ID: Final = "dcr/dataset-version/v2"
#: Manifests from before the file-list MAC: still read and listed, refused by the enclave.
SCHEMA_ID_V1: Final = "dcr/dataset-version/v1"
SCHEMA_FILE: Final = "dataset-version.schema.json"
MANIFEST_FILE: Final = "manifest.json"
#: A manifest is small (at most 1000 files); anything bigger is refused before parsing.
MAX_MANIFEST_BYTES: Final = 1 << 20
PROTECTION_KINDS: Final = ("provider-file", "dp", "random")
FILES_MAC_PREFIX: Final = "hmac-sha256:"
_FILES_MAC_RE = re.compile(r"^hmac-sha256:[0-9a-f]{64}$")
#: HKDF info of the file-list MAC key. The per-file keys use streamcrypt's info (scheme name, NUL, file
#: context) and a random salt, so this key is independent of every file key.
_FILES_MAC_INFO: Final = b"dcr/dataset-version/files-mac/v1"
#: What to do about a version whose files or manifest were altered in the store (adding the same files
#: again is a no-op while the version directory exists).
STORE_ALTERED_HINT: Final = (
    "the store was altered: restore this version's directory from a copy you trust, or delete it and "
    "register the same files again with `dcr provider add` (same files, same version)"
)


def validate_schema(doc: Any, schema_file: str, what: str, package: str = FORMATS_PACKAGE) -> None:
    """Validate ``doc`` against a schema shipped in ``package``'s ``schemas/``; refuse naming the first error."""
    validate(doc, schema_file, what, package=package)


def parse_json_document(doc: Mapping[str, Any] | str | bytes, what: str) -> dict[str, Any]:
    """A JSON object from text or an already-parsed mapping, with a size bound on text."""
    if isinstance(doc, Mapping):
        return dict(doc)
    if len(doc) > MAX_MANIFEST_BYTES:
        raise DCRError(f"{what} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        parsed = json.loads(doc)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DCRError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise DCRError(f"{what} must be a JSON object")
    return parsed


def check_relpath(value: str, what: str) -> str:
    """A path relative to a version directory: no absolute path, no empty, ``.`` or ``..`` component."""
    parts = value.split("/") if isinstance(value, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts) or PurePosixPath(value).is_absolute():
        raise DCRError(f"{what} {value!r} is not a plain relative path")
    return value


def utc_now() -> str:
    """Creation time to the microsecond: versions added in the same second still sort in order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Protection:
    """How the synthetic version protects the real data."""

    kind: str
    mechanism: str | None = None
    epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        # ε = 1 and ε = 1.0 must name the same version: numbers are compared and digested as floats.
        for what in ("epsilon", "delta"):
            value = getattr(self, what)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise DCRError(f"{what} must be a number, not {value!r}")
                object.__setattr__(self, what, float(value))
        if self.kind not in PROTECTION_KINDS:
            raise DCRError(
                f"unknown protection kind {self.kind!r}", hint=f"use one of {', '.join(PROTECTION_KINDS)}"
            )
        if self.kind == "dp":
            if self.epsilon is None:
                raise DCRError("differentially private synthetic data needs its ε", hint="pass --epsilon")
        elif self.epsilon is not None or self.delta is not None:
            raise DCRError(f"ε and δ apply to differentially private data only, not to {self.kind!r}")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise DCRError(f"ε must be a positive finite number, not {self.epsilon!r}")
        if self.delta is not None and not (math.isfinite(self.delta) and 0 <= self.delta < 1):
            raise DCRError(f"δ must be in [0, 1), not {self.delta!r}")
        if self.mechanism is not None and not (
            isinstance(self.mechanism, str) and 0 < len(self.mechanism) <= 200
        ):
            raise DCRError("the protection mechanism must be a short non-empty name")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "mechanism": self.mechanism, "epsilon": self.epsilon, "delta": self.delta}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Protection:
        return cls(doc["kind"], doc.get("mechanism"), doc.get("epsilon"), doc.get("delta"))


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset version, by the one name it has in both stages."""

    name: str
    size: int
    ciphertext: str
    ciphertext_sha256: str
    ciphertext_size: int
    synthetic: str
    synthetic_sha256: str
    synthetic_size: int

    def __post_init__(self) -> None:
        check_file_name(self.name)
        check_relpath(self.ciphertext, f"ciphertext path of {self.name}")
        check_relpath(self.synthetic, f"synthetic path of {self.name}")
        check_digest(self.ciphertext_sha256, f"ciphertext digest of {self.name}")
        check_digest(self.synthetic_sha256, f"synthetic digest of {self.name}")
        for what in ("size", "ciphertext_size", "synthetic_size"):
            value = getattr(self, what)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DCRError(f"{what} of {self.name} must be a non-negative integer")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "ciphertext": self.ciphertext,
            "ciphertext_sha256": self.ciphertext_sha256,
            "ciphertext_size": self.ciphertext_size,
            "synthetic": self.synthetic,
            "synthetic_sha256": self.synthetic_sha256,
            "synthetic_size": self.synthetic_size,
        }


@dataclass(frozen=True)
class LocalKey:
    """A data key wrapped under a provider's local key-encryption key (see :mod:`dcr_enclave.platform.key_store`)."""

    kek_id: str
    wrapped_data_key: str
    kind: str = field(default="local", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "kek_id": self.kek_id, "wrapped_data_key": self.wrapped_data_key}


@dataclass(frozen=True)
class KmsKey:
    """A data key wrapped by a Cloud KMS key; ``name`` is the full cryptoKeys resource name."""

    name: str
    wrapped_data_key: str
    kind: str = field(default="gcp-kms", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "wrapped_data_key": self.wrapped_data_key}


KeyRef = LocalKey | KmsKey


def key_from_json(doc: Mapping[str, Any]) -> KeyRef:
    if doc.get("kind") == "local":
        return LocalKey(doc["kek_id"], doc["wrapped_data_key"])
    if doc.get("kind") == "gcp-kms":
        return KmsKey(doc["name"], doc["wrapped_data_key"])
    raise DCRError(f"unknown data key kind {doc.get('kind')!r}", hint="expected 'local' or 'gcp-kms'")


@dataclass(frozen=True)
class DatasetVersion:
    """A parsed, validated dataset version manifest."""

    provider: str
    dataset: str
    version: str
    created: str
    files: tuple[DatasetFile, ...]
    chunk_size: int
    key: KeyRef
    protection: Protection
    retired: bool = False
    scheme: str = streamcrypt.SCHEME
    #: ``hmac-sha256:<hex>`` over :meth:`files_commitment`; ``None`` only in a v1 manifest.
    files_mac: str | None = None

    def __post_init__(self) -> None:
        check_name(self.provider, "provider")
        check_name(self.dataset, "dataset")
        check_digest(self.version, "dataset version")
        if self.files_mac is not None and not (
            isinstance(self.files_mac, str) and _FILES_MAC_RE.match(self.files_mac)
        ):
            raise DCRError(
                f"the file-list MAC of {self.ref} is not of the form {FILES_MAC_PREFIX}<64 hex digits>"
            )
        if self.scheme != streamcrypt.SCHEME:
            raise DCRError(
                f"unsupported encryption scheme {self.scheme!r}", hint=f"expected {streamcrypt.SCHEME}"
            )
        streamcrypt.check_chunk_size(self.chunk_size)
        if not self.files:
            raise DCRError(f"dataset version {self.ref} has no files")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise DCRError(f"dataset version {self.ref} lists a file name twice")
        paths = [p for f in self.files for p in (f.ciphertext, f.synthetic)]
        if len(set(paths)) != len(paths):
            raise DCRError(f"dataset version {self.ref} maps two files to the same path")
        for f in self.files:
            if f.ciphertext_size != streamcrypt.ciphertext_size(f.size, self.chunk_size):
                raise DCRError(
                    f"ciphertext size of {f.name} does not match its plaintext size and chunk size"
                )

    @property
    def ref(self) -> str:
        """``<provider>/<dataset>``, the name the hub's policy uses."""
        return f"{self.provider}/{self.dataset}"

    @property
    def version_hex(self) -> str:
        return self.version.removeprefix("sha256:")

    def file(self, name: str) -> DatasetFile:
        for f in self.files:
            if f.name == name:
                return f
        raise DCRError(f"dataset version {self.ref}@{self.version} has no file {name!r}")

    def file_context(self, name: str) -> streamcrypt.FileContext:
        """What every chunk of this version's file ``name`` is bound to."""
        return streamcrypt.FileContext(self.provider, self.dataset, self.version, self.file(name).name)

    def files_commitment(self) -> bytes:
        """What ``files_mac`` covers: canonical JSON of the version's identity, encryption and file entries.

        Every field of every file entry is in (name, plaintext size, ciphertext path, digest and size,
        synthetic path, digest and size), files sorted by name, so no entry can be dropped, added, renamed,
        resized or pointed elsewhere without the data key.
        """
        return canonical_json(
            {
                "provider": self.provider,
                "dataset": self.dataset,
                "version": self.version,
                "encryption": {"scheme": self.scheme, "chunk_size": self.chunk_size},
                "files": [f.to_json() for f in sorted(self.files, key=lambda f: f.name)],
            }
        )

    def _files_hmac(self, data_key: bytes) -> HMAC:
        if not isinstance(data_key, bytes | bytearray) or len(data_key) != streamcrypt.DATA_KEY_SIZE:
            raise DCRError(f"a data key must be {streamcrypt.DATA_KEY_SIZE} bytes")
        mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_FILES_MAC_INFO).derive(
            bytes(data_key)
        )
        h = HMAC(mac_key, hashes.SHA256())
        h.update(self.files_commitment())
        return h

    def compute_files_mac(self, data_key: bytes) -> str:
        """The ``files_mac`` this manifest's file list has under ``data_key`` (registration writes it)."""
        return FILES_MAC_PREFIX + self._files_hmac(data_key).finalize().hex()

    def with_files_mac(self, data_key: bytes) -> DatasetVersion:
        """This manifest, committed to its file list under ``data_key``."""
        return dataclasses.replace(self, files_mac=self.compute_files_mac(data_key))

    def check_files_mac(self, data_key: bytes) -> None:
        """Refuse (:class:`IntegrityError` naming the dataset) unless ``files_mac`` authenticates the file
        list under the released ``data_key``; the comparison is constant-time."""
        if self.files_mac is None:
            raise IntegrityError(
                f"the manifest of dataset {self.ref} version {self.version} has no file-list MAC "
                f"(a {SCHEMA_ID_V1} manifest): the enclave cannot tell whether files were removed from it",
                hint="re-register the dataset with `dcr provider add` and the same files: the version stays "
                "the same and its manifest gets the MAC",
            )
        try:
            self._files_hmac(data_key).verify(bytes.fromhex(self.files_mac.removeprefix(FILES_MAC_PREFIX)))
        except InvalidSignature:
            raise IntegrityError(
                f"the file list in the manifest of dataset {self.ref} version {self.version} does not "
                "authenticate: a file entry was removed, added, renamed or changed, or the MAC was altered",
                hint=STORE_ALTERED_HINT,
            ) from None

    def to_json(self) -> dict[str, Any]:
        doc = {
            "schema": SCHEMA_ID if self.files_mac is not None else SCHEMA_ID_V1,
            "provider": self.provider,
            "dataset": self.dataset,
            "version": self.version,
            "created": self.created,
            "files": [f.to_json() for f in self.files],
            "encryption": {"scheme": self.scheme, "chunk_size": self.chunk_size},
            "key": self.key.to_json(),
            "protection": self.protection.to_json(),
            "retired": self.retired,
        }
        if self.files_mac is not None:
            doc["files_mac"] = self.files_mac
        return doc

    def dumps(self) -> bytes:
        """The manifest as it is written to disk: indented, sorted keys, trailing newline."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()

    @property
    def digest(self) -> str:
        """sha256 of the manifest's canonical JSON."""
        return sha256_json(self.to_json())

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | str | bytes) -> DatasetVersion:
        """Parse and validate a manifest (schema, then the invariants the schema cannot express)."""
        data = parse_json_document(doc, "dataset version manifest")
        validate_schema(data, SCHEMA_FILE, "dataset version manifest")
        return cls(
            provider=data["provider"],
            dataset=data["dataset"],
            version=data["version"],
            created=data["created"],
            files=tuple(DatasetFile(**f) for f in data["files"]),
            chunk_size=data["encryption"]["chunk_size"],
            key=key_from_json(data["key"]),
            protection=Protection.from_json(data["protection"]),
            retired=data["retired"],
            scheme=data["encryption"]["scheme"],
            files_mac=data.get("files_mac"),
        )
