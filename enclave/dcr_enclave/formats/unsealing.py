"""Opening sealed outputs: the recipient's side of :mod:`dcr_enclave.formats.sealing`.

The format, and sealing, are defined there; opening lives apart because the enclave only ever seals: what
the enclave runs does not import this module. A sealed file opens into its destination only if every byte
authenticates; a sealed directory's tar stream is checked member by member (names, types, counts, sizes)
before anything appears at its destination.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from dcr_enclave.formats import streamcrypt
from dcr_enclave.formats.contract import check_job_id
from dcr_enclave.formats.errors import DCRError, IntegrityError, LimitError
from dcr_enclave.formats.sealing import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    KIND_FILE,
    KIND_NAMES,
    KIND_TAR,
    MAGIC,
    MAX_MEMBERS,
    READ_SIZE,
    check_member_name,
    derive_data_key,
    exchange,
    private_key_from_raw,
    public_key_from_raw,
    raw_public_key,
    staging_dir,
    stream_context,
    temp_file,
)


def _open_stream(
    src: streamcrypt.Readable,
    out: streamcrypt.Writable,
    recipient_private: bytes,
    job_id: str,
    kind: int,
    label: str,
) -> int:
    """Decrypt a sealed stream into ``out``; the caller discards ``out`` on any exception."""
    check_job_id(job_id)
    sk = private_key_from_raw(recipient_private)
    own_pub = raw_public_key(sk.public_key())
    raw = src.read(HEADER_SIZE) or b""
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise IntegrityError(f"{label} is not a DCR sealed file (bad magic)")
    if len(raw) < HEADER_SIZE:
        raise IntegrityError(f"{label}: truncated inside the sealed header")
    _magic, version, got_kind, eph_raw, recipient_raw = HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise IntegrityError(f"{label}: unsupported sealed format version {version}")
    if got_kind != kind:
        what = KIND_NAMES.get(got_kind, f"kind {got_kind}")
        raise IntegrityError(
            f"{label} holds a sealed {what}, not a sealed {KIND_NAMES[kind]}",
            hint="open a sealed directory with open_dir and a sealed file with open_file",
        )
    if recipient_raw != own_pub:
        raise IntegrityError(
            f"{label} is sealed to another key",
            hint="use the private key of the job (or the airlock) it names",
        )
    # Derived from our own public key, not the header's copy: the header only serves the message above.
    key = derive_data_key(exchange(sk, public_key_from_raw(eph_raw)), kind, eph_raw, own_pub, job_id)
    ctx = stream_context(kind, eph_raw, own_pub, job_id)
    try:
        _digest, size = streamcrypt.decrypt_stream(src, out, key, ctx)
    except IntegrityError as e:
        raise IntegrityError(
            f"{label} does not open: {e.message}",
            hint="wrong job id or key, or the file was truncated or altered",
        ) from None
    return size


def open_file(src: Path, dest: Path, recipient_private: bytes, *, job_id: str) -> None:
    """Open the sealed file ``src`` into ``dest`` (0600); ``dest`` appears only if everything authenticated."""
    src, dest = Path(src), Path(dest)
    fd, tmp = temp_file(dest)
    try:
        with streamcrypt.open_source(src) as fin, os.fdopen(fd, "wb", buffering=0) as fout:
            _open_stream(fin, fout, recipient_private, job_id, KIND_FILE, str(src))
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_dir(
    sealed_file: Path,
    dest_dir: Path,
    recipient_private: bytes,
    job_id: str,
    *,
    max_files: int = MAX_MEMBERS,
    max_bytes: int | None = None,
) -> None:
    """Open a sealed directory into ``dest_dir`` (created 0700), which must not exist yet.

    ``dest_dir`` appears, complete, only on success.

    Refuses (and leaves nothing behind) on any integrity failure, a member that is not a regular file or
    directory, a hostile or duplicate member name, or more than ``max_files`` members / ``max_bytes`` bytes.
    """
    sealed_file, dest_dir = Path(sealed_file), Path(dest_dir)
    if os.path.lexists(dest_dir):
        raise DCRError(f"{dest_dir} already exists", hint="open into a new directory")
    staging = staging_dir(dest_dir)
    try:
        payload = staging / "payload.tar"
        with streamcrypt.open_source(sealed_file) as fin, open(payload, "xb", buffering=0) as fout:
            _open_stream(fin, fout, recipient_private, job_id, KIND_TAR, str(sealed_file))
        tree = staging / "tree"
        tree.mkdir(mode=0o700)
        _extract(payload, tree, str(sealed_file), max_files, max_bytes)
        payload.unlink()
        os.rename(tree, dest_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(payload: Path, tree: Path, label: str, max_files: int, max_bytes: int | None) -> None:
    seen: set[str] = set()
    dir_modes: list[tuple[Path, int]] = []
    total = 0
    try:
        with tarfile.open(
            payload, mode="r:", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict"
        ) as tf:
            for m in tf:
                name = _checked_name(m, seen, label, max_files)
                target = tree / name
                if m.type == tarfile.DIRTYPE:
                    # 0700 while filling it; the recorded mode is applied once everything is in place.
                    os.mkdir(target, 0o700)
                    dir_modes.append((target, m.mode & 0o755))
                elif m.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    total += m.size
                    if max_bytes is not None and total > max_bytes:
                        raise LimitError(f"{label} holds more than {max_bytes} bytes")
                    _write_member(tf, m, target, label)
                else:
                    raise DCRError(
                        f"{label}: refusing the member {name!r}: only regular files and directories are allowed"
                    )
    except tarfile.TarError as e:
        raise IntegrityError(f"{label}: the sealed directory is not a well-formed tar: {e}") from None
    except FileNotFoundError:
        raise DCRError(f"{label}: a member comes before the directory that holds it") from None
    except (FileExistsError, NotADirectoryError):
        raise DCRError(f"{label}: members collide (a file and a directory of the same name)") from None
    for path, mode in reversed(dir_modes):
        os.chmod(path, mode)


def _checked_name(m: tarfile.TarInfo, seen: set[str], label: str, max_files: int) -> str:
    """A member's name once it is safe, new and within the count: what both openers check first."""
    name = check_member_name(m.name, label)
    if name in seen:
        raise DCRError(f"{label}: the member {name!r} appears twice")
    seen.add(name)
    if len(seen) > max_files:
        raise LimitError(f"{label} holds more than {max_files} members")
    return name


def _write_member(tf: tarfile.TarFile, m: tarfile.TarInfo, target: Path, label: str) -> None:
    src = tf.extractfile(m)
    assert src is not None  # a regular member always has a data stream
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb", buffering=0) as out:
        left = m.size
        while left:
            piece = src.read(min(READ_SIZE, left))
            if not piece:
                raise IntegrityError(f"{label}: the member {m.name!r} is cut short")
            out.write(piece)
            left -= len(piece)
        os.fchmod(out.fileno(), m.mode & 0o755)


class _BoundedBuffer(io.BytesIO):
    """Where an opened stream lands in memory; refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int, label: str) -> None:
        super().__init__()
        self.limit = limit
        self.label = label

    def write(self, data: Any, /) -> int:
        if self.tell() + len(data) > self.limit:
            raise LimitError(f"{self.label} opens to more than {self.limit} bytes")
        return super().write(data)


def open_to_memory(src: Path, recipient_private: bytes, *, job_id: str, tar: bool, max_bytes: int) -> bytes:
    """Open a sealed file (or, with ``tar``, a sealed directory's tar) into memory, never onto disk.

    For whoever may read outputs but must not keep them (the hub's airlock shows held outputs to
    reviewers and re-seals them on release). Everything authenticates before the bytes are returned.
    """
    out = _BoundedBuffer(max_bytes, str(src))
    with streamcrypt.open_source(Path(src)) as fin:
        _open_stream(fin, out, recipient_private, job_id, KIND_TAR if tar else KIND_FILE, str(src))
    return out.getvalue()


def tar_members(payload: bytes, label: str, *, max_files: int = MAX_MEMBERS) -> dict[str, bytes]:
    """The regular files of an opened sealed directory's tar, by path, checked as :func:`open_dir` checks
    them (names, types, duplicates); directories are implied by the paths."""
    files: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:", encoding="utf-8", errors="strict") as tf:
            for m in tf:
                name = _checked_name(m, seen, label, max_files)
                if m.type == tarfile.DIRTYPE:
                    continue
                if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise DCRError(f"{label}: refusing the member {name!r}: not a regular file or directory")
                data = tf.extractfile(m)
                assert data is not None
                files[name] = data.read(m.size)
                if len(files[name]) != m.size:
                    raise IntegrityError(f"{label}: the member {name!r} is cut short")
    except tarfile.TarError as e:
        raise IntegrityError(f"{label}: the sealed directory is not a well-formed tar: {e}") from None
    return files
