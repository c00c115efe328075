"""The local dataset store: where dataset versions live on disk, and how one is added.

Layout::

    STORE/<provider>/<dataset>/<version hex>/manifest.json
                                            /real/<name>.dcrenc      encrypted real file
                                            /synthetic/<name>        synthetic file, under the same name
    STORE/.keys/                             default keys directory (owner-only; see dcr_enclave.platform.key_store)

A version directory is immutable once it exists (except the manifest's ``retired`` flag, which is not part
of the version digest and is replaced atomically by :meth:`Store.retire`): adding builds it under a temporary
name in the dataset's directory and renames it into place as the last step, so an interrupted or failed add
leaves nothing half-written. A version whose manifest predates the file-list MAC (schema v1, refused by the
enclave) is rebuilt when the same content is added again, and swapped in for the old directory. Ciphertext
and manifests are not secret; the synthetic files are meant for entitled users:
restrict the store root's own permissions if others on the machine must not read them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from dcr_enclave.formats import streamcrypt
from dcr_enclave.formats.contract import check_file_name, check_name
from dcr_enclave.formats.dataset import (
    MANIFEST_FILE,
    DatasetFile,
    DatasetVersion,
    Protection,
    key_from_json,
    utc_now,
)
from dcr_enclave.formats.digests import READ_SIZE, check_digest, sha256_json
from dcr_enclave.formats.errors import DCRError, IntegrityError, LimitError
from dcr_enclave.formats.store_layout import StoreLayout
from dcr_enclave.platform.key_store import new_data_key

#: The local development hub key, in the keys directory (created by ``dcr provider add`` when no hub key
#: is given). For local development only: a real hub has its own key and providers pin its thumbprint.
DEV_HUB_KEY_FILE: Final = "local-hub-key.pem"
KEYS_DIR_NAME: Final = ".keys"
REAL_DIR: Final = "real"
SYNTHETIC_DIR: Final = "synthetic"
CIPHERTEXT_SUFFIX: Final = ".dcrenc"
DEFAULT_MAX_BYTES: Final = 16 << 30
_VERSION_DIR_RE = re.compile(r"^[0-9a-f]{64}$")
_DIR_MODE = 0o755
_FILE_MODE = 0o644


class KeyWrapper(Protocol):
    """What wraps a version's data key: a local keys directory, or a Cloud KMS key (:mod:`.gcp`)."""

    def wrap(self, provider: str, dataset: str, version: str, data_key: bytes) -> dict[str, Any]: ...


@dataclass(frozen=True)
class InputFile:
    """A validated input file and what its first read found."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class PreparedVersion:
    """A dataset version computed from validated inputs, before anything is written."""

    provider: str
    dataset: str
    version: str
    protection: Protection
    #: (dataset file name, real input, synthetic input), sorted by name.
    files: tuple[tuple[str, InputFile, InputFile], ...]


@dataclass(frozen=True)
class AddResult:
    manifest: DatasetVersion
    #: False when the version was already in the store (nothing was changed).
    created: bool
    path: Path
    #: True when an existing v1 version (no file-list MAC) was rebuilt and replaced.
    upgraded: bool = False


def _open_input(path: Path, what: str, max_bytes: int) -> tuple[int, os.stat_result]:
    """Open an input read-only, refusing links, non-regular, empty and oversized files."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise DCRError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise DCRError(f"cannot inspect {what} {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise DCRError(f"{what} {path} is a symbolic link", hint="pass the file itself, not a link")
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DCRError(f"{what} {path} is {kind}", hint="pass a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise DCRError(f"cannot read {what} {path}: {e.strerror}") from None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
        os.close(fd)
        raise DCRError(f"{what} {path} was replaced while being opened", hint="retry")
    if fst.st_size == 0:
        os.close(fd)
        raise DCRError(f"{what} {path} is empty", hint="a dataset file must hold data")
    if fst.st_size > max_bytes:
        os.close(fd)
        raise LimitError(
            f"{what} {path} is {fst.st_size} bytes, over the limit of {max_bytes}", hint="raise --max-bytes"
        )
    return fd, fst


def inspect_input(path: str | Path, what: str, max_bytes: int = DEFAULT_MAX_BYTES) -> InputFile:
    """Validate one input file and hash it (the first of the two passes over every input)."""
    p = Path(path)
    fd, st = _open_input(p, what, max_bytes)
    h, total = hashlib.sha256(), 0
    with os.fdopen(fd, "rb", buffering=0) as f:
        buf = memoryview(bytearray(READ_SIZE))
        while n := f.readinto(buf):
            h.update(buf[:n])
            total += n
    if total != st.st_size:
        raise DCRError(f"{what} {p} changed while it was being read", hint="retry")
    return InputFile(p, total, "sha256:" + h.hexdigest())


def _copy_verified(src: Path, dest: Path, expected: InputFile) -> None:
    """Copy ``src`` to a new ``dest``, refusing if the bytes are not the ones hashed in the first pass."""
    fd, _ = _open_input(src, "synthetic file", 1 << 62)  # a changed size is caught by the digest below
    h, total = hashlib.sha256(), 0
    with os.fdopen(fd, "rb", buffering=0) as fin, open(dest, "xb") as fout:
        buf = memoryview(bytearray(READ_SIZE))
        while n := fin.readinto(buf):
            h.update(buf[:n])
            fout.write(buf[:n])
            total += n
        fout.flush()
        os.fsync(fout.fileno())
    if total != expected.size or "sha256:" + h.hexdigest() != expected.sha256:
        raise DCRError(f"synthetic file {src} changed while the dataset was being added", hint="retry")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store(StoreLayout):
    """A local store directory of dataset versions: listing, adding and retiring them."""

    @property
    def default_keys_dir(self) -> Path:
        return self.root / KEYS_DIR_NAME

    # Listing -----------------------------------------------------------------------------------------

    def providers(self) -> list[str]:
        return self._names(self.root)

    def datasets(self, provider: str) -> list[str]:
        return self._names(self.root / check_name(provider, "provider"))

    @staticmethod
    def _names(path: Path) -> list[str]:
        if not path.is_dir():
            return []
        return sorted(
            p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink() and _is_name(p.name)
        )

    def versions(self, provider: str, dataset: str) -> list[DatasetVersion]:
        """Every version of a dataset in the store (retired ones included), oldest first."""
        d = self.dataset_dir(provider, dataset)
        if not d.is_dir():
            return []
        found = [
            self.load(provider, dataset, "sha256:" + p.name)
            for p in d.iterdir()
            if _VERSION_DIR_RE.match(p.name) and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=lambda m: (m.created, m.version))

    def manifests(self) -> Iterator[DatasetVersion]:
        """Every version in the store, by provider, dataset, then age."""
        for provider in self.providers():
            for dataset in self.datasets(provider):
                yield from self.versions(provider, dataset)

    def grantable(self, provider: str, dataset: str, version: str | None = None) -> DatasetVersion:
        """The version a new grant may name: ``version`` itself unless retired, else the newest unretired one.

        Retiring stops new grants only: a grant issued earlier still names its version, and the provider's
        condition keeps every version, so such a job still gets its data key.
        """
        if version is not None:
            manifest = self.load(provider, dataset, version)
            if manifest.retired:
                raise DCRError(
                    f"version {version} of {provider}/{dataset} is retired: it gets no new grants",
                    hint="grant a current version (see `dcr provider list`)",
                )
            return manifest
        current = [m for m in self.versions(provider, dataset) if not m.retired]
        if not current:
            raise DCRError(
                f"the store {self.root} has no unretired version of {provider}/{dataset}",
                hint="add one with `dcr provider add`",
            )
        return current[-1]

    def retire(self, provider: str, dataset: str, version: str) -> tuple[DatasetVersion, bool]:
        """Mark a version retired (no new grants); returns the manifest and whether it changed.

        Only the manifest's ``retired`` flag changes (it is not part of the version digest); the new
        manifest replaces the old one atomically. Files and keys stay, so pinned grants still decrypt.
        """
        manifest = self.load(provider, dataset, version)
        if manifest.retired:
            return manifest, False
        retired = DatasetVersion.from_json({**manifest.to_json(), "retired": True})
        path = self.version_dir(provider, dataset, version) / MANIFEST_FILE
        tmp = path.parent / f".{MANIFEST_FILE}.{secrets.token_hex(6)}"
        try:
            with open(tmp, "xb") as f:
                f.write(retired.dumps())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DCRError(f"cannot retire {provider}/{dataset} version {version}: {e}") from None
        return retired, True

    # Adding ------------------------------------------------------------------------------------------

    def prepare(
        self,
        provider: str,
        dataset: str,
        files: Sequence[tuple[str | Path, str | Path]],
        protection: Protection,
        max_bytes: int = DEFAULT_MAX_BYTES,
        names: Sequence[str | None] | None = None,
    ) -> PreparedVersion:
        """Validate ``(real, synthetic)`` input pairs and compute the version; writes nothing.

        Each file's name -- the one name it has in both stages, ``/data/<provider>/<dataset>/<name>`` in the
        sandbox (synthetic) and in the enclave (real) -- is the real file's, unless ``names`` gives another
        for that pair (``None`` keeps the real file's).
        """
        check_name(provider, "provider")
        check_name(dataset, "dataset")
        if not files:
            raise DCRError(
                "a dataset version needs at least one file", hint="pass --real FILE --synthetic FILE"
            )
        if names is not None and len(names) != len(files):
            raise DCRError(f"{len(names)} file names given for {len(files)} file pairs")
        entries: dict[str, tuple[str, InputFile, InputFile]] = {}
        for i, (real_path, synthetic_path) in enumerate(files):
            chosen = names[i] if names is not None else None
            name = chosen if chosen is not None else Path(real_path).name
            try:
                check_file_name(name)
            except DCRError as e:
                what = f"file name {chosen!r}" if chosen is not None else f"real file {real_path}"
                raise DCRError(f"{what}: {e.message}", hint=e.hint) from None
            if name in entries:
                raise DCRError(
                    f"two files of the dataset would be named {name!r}",
                    hint="a dataset's file names must be unique",
                )
            real = inspect_input(real_path, "real file", max_bytes)
            synthetic = inspect_input(synthetic_path, "synthetic file", max_bytes)
            if real.sha256 == synthetic.sha256:
                raise DCRError(
                    f"the synthetic file {synthetic_path} has the same content as the real file {real_path}",
                    hint="the synthetic version is shown to researchers; it must not be the real data",
                )
            entries[name] = (name, real, synthetic)
        ordered = tuple(entries[n] for n in sorted(entries))
        version = compute_version(
            provider, dataset, ((n, r.size, r.sha256, s.sha256) for n, r, s in ordered), protection
        )
        return PreparedVersion(provider, dataset, version, protection, ordered)

    def commit(
        self,
        prepared: PreparedVersion,
        keys: KeyWrapper,
        chunk_size: int = streamcrypt.DEFAULT_CHUNK_SIZE,
        progress: Callable[[int, int], None] | None = None,
    ) -> AddResult:
        """Encrypt and copy a prepared version into the store; a no-op when the version is already there.

        ``progress(done, total)`` is called from a watcher thread a few times a second with the bytes
        written so far (ciphertext and synthetic copies) and the total expected.
        """
        streamcrypt.check_chunk_size(chunk_size)
        if progress is None:
            return self._commit(prepared, keys, chunk_size)
        total = sum(streamcrypt.ciphertext_size(r.size, chunk_size) + s.size for _, r, s in prepared.files)
        final = self.version_dir(prepared.provider, prepared.dataset, prepared.version)
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.25):
                progress(min(total, _bytes_under(final.parent, f".tmp-{final.name[:16]}-")), total)

        watcher = threading.Thread(target=watch, name="dcr-store-progress", daemon=True)
        watcher.start()
        try:
            result = self._commit(prepared, keys, chunk_size)
        finally:
            stop.set()
            watcher.join()
        progress(total, total)
        return result

    def _commit(self, prepared: PreparedVersion, keys: KeyWrapper, chunk_size: int) -> AddResult:
        p = prepared
        final = self.version_dir(p.provider, p.dataset, p.version)
        previous = None
        if self.exists(p.provider, p.dataset, p.version):
            previous = self.load(p.provider, p.dataset, p.version)
            if previous.files_mac is not None:
                return AddResult(previous, False, final)
            # A v1 manifest, which the enclave refuses: rebuild the version from the provider's files (the
            # version digest says they are the same content) and swap it in.
        created_dirs: list[Path] = []
        tmp = final.parent / f".tmp-{final.name[:16]}-{secrets.token_hex(6)}"
        try:
            created_dirs = self._make_dirs(final.parent)
            tmp.mkdir(mode=_DIR_MODE)
            manifest = self._build(p, tmp, keys, chunk_size, previous)
            _fsync_dir(tmp)
            if previous is not None:
                _swap_in(tmp, final)
                _fsync_dir(final.parent)
                return AddResult(manifest, True, final, upgraded=True)
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another add of the same content won the race: its version is the same data.
                shutil.rmtree(tmp)
                return AddResult(self.load(p.provider, p.dataset, p.version), False, final)
            _fsync_dir(final.parent)
        except OSError as e:  # disk full, permissions: a clear refusal, and nothing left behind
            _discard(tmp, created_dirs)
            raise DCRError(f"cannot add {p.provider}/{p.dataset} to the store {self.root}: {e}") from None
        except BaseException:  # refusals, Ctrl-C
            _discard(tmp, created_dirs)
            raise
        return AddResult(manifest, True, final)

    def add(
        self,
        provider: str,
        dataset: str,
        files: Sequence[tuple[str | Path, str | Path]],
        keys: KeyWrapper,
        protection: Protection | None = None,
        chunk_size: int = streamcrypt.DEFAULT_CHUNK_SIZE,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> AddResult:
        """Add a dataset version from ``(real, synthetic)`` file pairs (see :meth:`prepare`, :meth:`commit`)."""
        streamcrypt.check_chunk_size(chunk_size)
        prepared = self.prepare(
            provider, dataset, files, protection or Protection("provider-file"), max_bytes
        )
        return self.commit(prepared, keys, chunk_size)

    def _make_dirs(self, path: Path) -> list[Path]:
        """Create ``path`` and missing parents; returns the ones created, outermost first."""
        missing = []
        for d in [path, *path.parents]:
            if d.exists():
                break
            missing.append(d)
        for d in reversed(missing):
            try:
                d.mkdir(mode=_DIR_MODE)
            except FileExistsError:
                continue
        return list(reversed(missing))

    def _build(
        self,
        p: PreparedVersion,
        tmp: Path,
        keys: KeyWrapper,
        chunk_size: int,
        previous: DatasetVersion | None = None,
    ) -> DatasetVersion:
        """Encrypt and copy into ``tmp``; a rebuilt ``previous`` version keeps its creation time and flag."""
        data_key = new_data_key()
        key = keys.wrap(p.provider, p.dataset, p.version, data_key)
        (tmp / REAL_DIR).mkdir(mode=_DIR_MODE)
        (tmp / SYNTHETIC_DIR).mkdir(mode=_DIR_MODE)
        files = []
        for name, real, synthetic in p.files:
            ciphertext = f"{REAL_DIR}/{name}{CIPHERTEXT_SUFFIX}"
            synthetic_rel = f"{SYNTHETIC_DIR}/{name}"
            ctx = streamcrypt.FileContext(p.provider, p.dataset, p.version, name)
            digest, size = streamcrypt.encrypt_file(
                real.path, tmp / ciphertext, data_key, ctx, chunk_size, expected_sha256=real.sha256
            )
            os.chmod(tmp / ciphertext, _FILE_MODE)
            _copy_verified(synthetic.path, tmp / synthetic_rel, synthetic)
            os.chmod(tmp / synthetic_rel, _FILE_MODE)
            files.append(
                DatasetFile(
                    name, real.size, ciphertext, digest, size, synthetic_rel, synthetic.sha256, synthetic.size
                )
            )
        manifest = DatasetVersion.from_json(
            DatasetVersion(
                provider=p.provider,
                dataset=p.dataset,
                version=p.version,
                created=previous.created if previous else utc_now(),
                files=tuple(files),
                chunk_size=chunk_size,
                key=key_from_json(key),
                protection=p.protection,
                retired=previous.retired if previous else False,
            )
            .with_files_mac(data_key)  # commits to the file list under a key only the data key gives
            .to_json()
        )  # the round trip through from_json validates the manifest against its schema before it is written
        with open(tmp / MANIFEST_FILE, "xb") as f:
            f.write(manifest.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp / MANIFEST_FILE, _FILE_MODE)
        return manifest


def _bytes_under(parent: Path, prefix: str) -> int:
    """Bytes in the files under ``parent``'s entries named ``prefix...`` (a version being built)."""
    total = 0
    try:
        for entry in parent.iterdir():
            if entry.name.startswith(prefix):
                for f in entry.rglob("*"):
                    with contextlib.suppress(OSError):
                        total += f.lstat().st_size if f.is_file() else 0
    except OSError:
        pass
    return total


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace the version directory ``final`` with the rebuilt ``tmp``; on failure the old one stays."""
    old = final.parent / f".old-{final.name[:16]}-{secrets.token_hex(6)}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(old, final)
        shutil.rmtree(old, ignore_errors=True)  # only when something else took its place meanwhile
        raise
    shutil.rmtree(old, ignore_errors=True)


def _discard(tmp: Path, created_dirs: list[Path]) -> None:
    """Remove a half-built version directory and the (still empty) directories created for it."""
    shutil.rmtree(tmp, ignore_errors=True)
    for d in reversed(created_dirs):
        try:
            d.rmdir()
        except OSError:
            break  # not empty: something else lives there now


def _is_name(value: str) -> bool:
    try:
        check_name(value, "store entry")
    except DCRError:
        return False
    return True


def compute_version(
    provider: str, dataset: str, files: Iterable[tuple[str, int, str, str]], protection: Protection
) -> str:
    """The content digest naming a dataset version.

    ``files`` holds ``(name, plaintext size, plaintext sha256, synthetic sha256)``; their order does not
    matter (they are sorted by name), so the same content always gets the same version.
    """
    entries = sorted(
        ({"name": n, "size": s, "sha256": d, "synthetic_sha256": sd} for n, s, d, sd in files),
        key=lambda e: str(e["name"]),
    )
    return sha256_json(
        {"provider": provider, "dataset": dataset, "files": entries, "protection": protection.to_json()}
    )


def expected_version(manifest: DatasetVersion, plaintext_digests: Mapping[str, str]) -> str:
    """The version these decrypted files would have; equal to ``manifest.version`` when they are genuine.

    ``plaintext_digests`` maps every file name of ``manifest`` to its decrypted content's sha256.
    """
    names = {f.name for f in manifest.files}
    if set(plaintext_digests) != names:
        raise IntegrityError(
            f"decrypted files of {manifest.ref} do not match the manifest: "
            f"expected {sorted(names)}, got {sorted(plaintext_digests)}"
        )
    return compute_version(
        manifest.provider,
        manifest.dataset,
        (
            (f.name, f.size, check_digest(plaintext_digests[f.name], f.name), f.synthetic_sha256)
            for f in manifest.files
        ),
        manifest.protection,
    )
