"""Local key management: providers' key-encryption keys (KEKs), data-key wrapping and stored conditions.

This is the local stand-in for a cloud KMS. Each provider has a directory under the keys directory holding
its KEKs (``kek-<id>.key``, 32 random bytes, owner-only) and its key-release conditions
(``conditions/<dataset>.json``). Every dataset version gets a fresh 32-byte data key, stored in its
manifest only wrapped: AES-256-GCM under the provider's KEK, with associated data binding provider,
dataset, version and KEK id, so a wrapped key copied into another dataset's or version's manifest does
not unwrap.

In the local platform the keys directory is read by the root-owned enclave host's key broker only, which
unwraps a data key when the provider's condition holds. Nothing else needs, or should get, read access.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dcr_enclave.formats.contract import check_name
from dcr_enclave.formats.dataset import KmsKey, LocalKey
from dcr_enclave.formats.digests import canonical_json, check_digest
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.platform.condition import KeyReleaseCondition

KEK_SIZE: Final = 32
DATA_KEY_SIZE: Final = 32
_NONCE_SIZE = 12
#: KEK ids sort by creation time, so the newest KEK is the last name.
KEK_ID_RE: Final = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
CONDITIONS_DIR: Final = "conditions"
_WRAP_PURPOSE = "dcr/wrapped-data-key/v1"


def new_data_key() -> bytes:
    """A fresh data key for one dataset version."""
    return secrets.token_bytes(DATA_KEY_SIZE)


def _wrap_ad(provider: str, dataset: str, version: str, kek_id: str) -> bytes:
    return canonical_json(
        {
            "purpose": _WRAP_PURPOSE,
            "provider": provider,
            "dataset": dataset,
            "version": version,
            "kek_id": kek_id,
        }
    )


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) owner-only; refuse an existing one that others can enter or list."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise DCRError(
            f"{path} is not a directory", hint="key material lives in a plain, owner-only directory"
        )
    if st.st_mode & 0o077:
        raise DCRError(
            f"the key directory {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):o})",
            hint=f"run: chmod 700 {path}",
        )
    return path


def write_private_file(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` owner-only (0600) and atomically.

    With ``replace=False`` an existing file is never overwritten (key material must never be lost).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists
    except FileExistsError:
        raise DCRError(f"refusing to overwrite the existing key file {path}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_private_dir(path: Path, owner: int) -> Path:
    """Refuse ``path`` unless it is a directory (not a link) owned by ``owner`` that no one else can enter."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise DCRError(
            f"the key directory {path} does not exist",
            hint="register a dataset there first (dcr provider add, as the account that will read it) or pass --keys",
        ) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DCRError(f"the key directory {path} is not a directory", hint="pass its real path, not a link")
    if st.st_uid != owner or st.st_mode & 0o077:
        raise DCRError(
            f"the key directory {path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
            f"it must be owned by uid {owner} and closed to group and others",
            hint=f"run: chown -R {owner}:{owner} {path} && chmod 700 {path}",
        )
    return path


def read_private_file(path: Path, max_bytes: int, *, owner: int | None = None) -> bytes:
    """Read an owner-only regular file; refuse links, loose permissions, another ``owner`` and oversized
    files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DCRError(f"key file {path} does not exist") from None
    except OSError as e:
        raise DCRError(
            f"cannot open key file {path}: {e.strerror}", hint="key files must not be links"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DCRError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise DCRError(
                f"key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o})",
                hint=f"run: chmod 600 {path}",
            )
        if owner is not None and st.st_uid != owner:
            raise DCRError(
                f"key file {path} is owned by uid {st.st_uid}, not {owner}",
                hint=f"run: chown {owner}:{owner} {path}",
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DCRError(f"key file {path} is larger than {max_bytes} bytes")
    return data


class KeyDirectory:
    """One keys directory: ``<path>/<provider>/kek-<id>.key`` and ``<path>/<provider>/conditions/``.

    With ``owner`` set, every KEK and condition read must be a file owned by that uid (the key broker
    passes its own, root's).
    """

    def __init__(self, path: str | Path, *, owner: int | None = None) -> None:
        self.path = Path(path)
        self.owner = owner

    def provider_dir(self, provider: str, *, create: bool = False) -> Path:
        d = self.path / check_name(provider, "provider")
        if create:
            ensure_private_dir(self.path)
            ensure_private_dir(d)
        return d

    @contextmanager
    def _lock(self, provider: str) -> Iterator[None]:
        """Serialise KEK creation per provider, so two concurrent adds agree on one KEK."""
        d = self.provider_dir(provider, create=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def kek_ids(self, provider: str) -> list[str]:
        """The provider's KEK ids, oldest first."""
        d = self.provider_dir(provider)
        if not d.is_dir():
            return []
        ids = (p.name[4:-4] for p in d.iterdir() if p.name.startswith("kek-") and p.name.endswith(".key"))
        return sorted(i for i in ids if KEK_ID_RE.match(i))

    def kek_path(self, provider: str, kek_id: str) -> Path:
        if not isinstance(kek_id, str) or not KEK_ID_RE.match(kek_id):
            raise DCRError(f"invalid KEK id {kek_id!r}")
        return self.provider_dir(provider) / f"kek-{kek_id}.key"

    def read_kek(self, provider: str, kek_id: str) -> bytes:
        data = read_private_file(self.kek_path(provider, kek_id), KEK_SIZE, owner=self.owner)
        if len(data) != KEK_SIZE:
            raise DCRError(f"KEK {kek_id} of {provider} is not {KEK_SIZE} bytes")
        return data

    def kek_for(self, provider: str, create: bool = True) -> tuple[str, bytes]:
        """The provider's current (newest) KEK, created on first use when ``create``."""
        ids = self.kek_ids(provider)
        if not ids:
            if not create:
                raise DCRError(f"no key-encryption key for provider {provider!r} in {self.path}")
            with self._lock(provider):
                ids = self.kek_ids(provider)
                if not ids:
                    kek_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
                    write_private_file(
                        self.kek_path(provider, kek_id), secrets.token_bytes(KEK_SIZE), replace=False
                    )
                    ids = [kek_id]
        return ids[-1], self.read_kek(provider, ids[-1])

    def wrap(self, provider: str, dataset: str, version: str, data_key: bytes) -> dict[str, Any]:
        """Wrap ``data_key`` for one dataset version; returns the manifest's ``key`` object."""
        check_name(dataset, "dataset")
        check_digest(version, "dataset version")
        if len(data_key) != DATA_KEY_SIZE:
            raise DCRError(f"a data key must be {DATA_KEY_SIZE} bytes")
        kek_id, kek = self.kek_for(provider)
        nonce = secrets.token_bytes(_NONCE_SIZE)
        sealed = AESGCM(kek).encrypt(nonce, bytes(data_key), _wrap_ad(provider, dataset, version, kek_id))
        return {
            "kind": "local",
            "kek_id": kek_id,
            "wrapped_data_key": base64.b64encode(nonce + sealed).decode(),
        }

    def unwrap(
        self, manifest_key: Mapping[str, Any] | LocalKey | KmsKey, provider: str, dataset: str, version: str
    ) -> bytes:
        """The data key of ``provider/dataset@version``; :class:`IntegrityError` if it was wrapped for another.

        ``manifest_key`` is the manifest's ``key`` object, as JSON or as the typed model.
        """
        if isinstance(manifest_key, LocalKey | KmsKey):
            manifest_key = manifest_key.to_json()
        check_name(dataset, "dataset")
        check_digest(version, "dataset version")
        if manifest_key.get("kind") != "local":
            raise DCRError(
                f"the data key of {provider}/{dataset} is held by {manifest_key.get('kind')!r}, not the local KEKs"
            )
        kek_id = str(manifest_key.get("kek_id"))
        kek = self.read_kek(provider, kek_id)
        try:
            blob = base64.b64decode(str(manifest_key.get("wrapped_data_key")), validate=True)
        except (binascii.Error, ValueError):
            raise IntegrityError(f"the wrapped data key of {provider}/{dataset} is not base64") from None
        if len(blob) != _NONCE_SIZE + DATA_KEY_SIZE + 16:
            raise IntegrityError(f"the wrapped data key of {provider}/{dataset} has the wrong length")
        try:
            return AESGCM(kek).decrypt(
                blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], _wrap_ad(provider, dataset, version, kek_id)
            )
        except InvalidTag:
            raise IntegrityError(
                f"the wrapped data key does not unwrap for {provider}/{dataset}@{version}",
                hint="it was wrapped for another dataset or version, or under another KEK, or was tampered with",
            ) from None

    # Conditions ------------------------------------------------------------------------------------------

    def condition_path(self, provider: str, dataset: str) -> Path:
        return self.provider_dir(provider) / CONDITIONS_DIR / f"{check_name(dataset, 'dataset')}.json"

    def write_condition(self, condition: KeyReleaseCondition) -> Path:
        """Store (replace) the condition of ``condition.provider/condition.dataset``, atomically."""
        path = self.condition_path(condition.provider, condition.dataset)
        self.provider_dir(condition.provider, create=True)
        ensure_private_dir(path.parent)
        text = canonical_json(condition.to_json()) + b"\n"
        write_private_file(path, text, replace=True)
        return path

    def read_condition(self, provider: str, dataset: str) -> KeyReleaseCondition | None:
        """The stored condition of ``provider/dataset``, or ``None`` if the provider has set none."""
        path = self.condition_path(provider, dataset)
        if not path.exists():
            return None
        condition = KeyReleaseCondition.from_json(read_private_file(path, 1 << 20, owner=self.owner))
        if (condition.provider, condition.dataset) != (provider, dataset):
            raise IntegrityError(f"the condition in {path} is for {condition.ref}, not {provider}/{dataset}")
        return condition
