"""Extracting a bundle in the enclave: the archive is hostile until proven otherwise.

:func:`extract_bundle` checks the manifest against the digest the enclave was launched with, requires
exactly the manifest's members in order, each a regular file of the declared size and hash, and extracts
into a fresh directory that appears only on success. The format is :mod:`dcr_enclave.formats.bundle`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, cast

from dcr_enclave.formats.bundle import (
    FILES_PREFIX,
    MANIFEST_MEMBER,
    MAX_PATH_BYTES,
    MODE_EXEC,
    MODE_PLAIN,
    READ_BUFFER,
    BundleLimits,
    BundleManifest,
    clip,
    copy_hashed,
    show_path,
    validate_notebook,
)
from dcr_enclave.formats.digests import check_digest, sha256_bytes
from dcr_enclave.formats.errors import DCRError, IntegrityError, LimitError

# ---------------------------------------------------------------------------------------------------------
# Extracting, in the enclave: the archive is hostile until proven otherwise
# ---------------------------------------------------------------------------------------------------------


def _max_manifest_bytes(limits: BundleLimits) -> int:
    # Per entry: a path of at most MAX_PATH_BYTES (doubled if every character were escaped) plus fields.
    return 1024 + (limits.max_files + 1) * (2 * MAX_PATH_BYTES + 256)


def _next(tf: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return tf.next()
    except _MALFORMED as e:
        raise IntegrityError(f"bundle archive is malformed: {clip(str(e))}", hint=_NOT_OURS) from None


def _check_member(member: tarfile.TarInfo | None, name: str, size: int, mode: int) -> tarfile.TarInfo:
    """Refuse a member unless it is exactly the regular file the manifest says comes next."""
    if member is None:
        raise IntegrityError(f"bundle archive ends before member {name!r}", hint=_NOT_OURS)
    got = member.name
    if got.startswith("/"):
        raise IntegrityError(f"bundle archive member {got!r} has an absolute name", hint=_NOT_OURS)
    if ".." in got.split("/"):
        raise IntegrityError(f"bundle archive member {got!r} has a '..' in its name", hint=_NOT_OURS)
    if member.issym() or member.islnk():
        raise IntegrityError(
            f"bundle archive member {got!r} is a link (to {member.linkname!r})", hint=_NOT_OURS
        )
    if member.ischr() or member.isblk():
        raise IntegrityError(f"bundle archive member {got!r} is a device", hint=_NOT_OURS)
    if member.isfifo():
        raise IntegrityError(f"bundle archive member {got!r} is a named pipe (FIFO)", hint=_NOT_OURS)
    if member.type != tarfile.REGTYPE or member.issparse():
        raise IntegrityError(
            f"bundle archive member {got!r} is not a plain regular file (type {member.type!r})",
            hint=_NOT_OURS,
        )
    if got != name:
        raise IntegrityError(
            f"bundle archive member {got!r} where the manifest says {name!r} comes next", hint=_NOT_OURS
        )
    if member.size != size:
        raise IntegrityError(
            f"bundle archive member {got!r} is {member.size} bytes, the manifest says {size}", hint=_NOT_OURS
        )
    if member.mode != mode:
        raise IntegrityError(
            f"bundle archive member {got!r} has mode {member.mode:o}, expected {mode:o}", hint=_NOT_OURS
        )
    return member


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> io.BufferedReader:
    src = tf.extractfile(member)
    if src is None:  # pragma: no cover - _check_member admits regular files only
        raise IntegrityError(f"bundle archive member {member.name!r} has no data", hint=_NOT_OURS)
    return cast(io.BufferedReader, src)  # tarfile's ExFileObject


def _read_manifest(tf: tarfile.TarFile, expected_digest: str, limits: BundleLimits) -> BundleManifest:
    member = _next(tf)
    if member is None or member.name != MANIFEST_MEMBER:
        got = "nothing" if member is None else repr(member.name)
        raise IntegrityError(f"bundle archive starts with {got}, not {MANIFEST_MEMBER!r}", hint=_NOT_OURS)
    cap = _max_manifest_bytes(limits)
    if member.size > cap:
        raise LimitError(
            f"bundle manifest is {member.size} bytes, more than {cap} allowed with these limits",
            hint="the bundle has too many files; exclude files when building it",
        )
    _check_member(member, MANIFEST_MEMBER, member.size, MODE_PLAIN)
    try:
        raw = _read_member(tf, member).read(member.size)
    except _MALFORMED as e:
        raise IntegrityError(f"bundle archive is malformed: {clip(str(e))}", hint=_NOT_OURS) from None
    if len(raw) != member.size:
        raise IntegrityError("bundle archive is truncated inside the manifest", hint=_NOT_OURS)
    got_digest = sha256_bytes(raw)
    if got_digest != expected_digest:
        raise IntegrityError(
            f"bundle digest {got_digest} is not the expected {expected_digest}",
            hint="this is not the bundle the job was granted for; submit the notebook again",
        )
    try:
        doc = json.loads(raw.decode("utf-8"))
    except _MALFORMED as e:
        raise IntegrityError(f"bundle manifest is not JSON: {clip(str(e))}", hint=_NOT_OURS) from None
    manifest = BundleManifest.from_json(doc)
    if manifest.digest != got_digest:
        # Same content, other bytes: the digest names canonical JSON only, so there is one form per bundle.
        raise IntegrityError("bundle manifest is not in canonical JSON form", hint=_NOT_OURS)
    if len(manifest.files) > limits.max_files:
        raise LimitError(
            f"bundle holds {len(manifest.files)} files, more than the limit of {limits.max_files}",
            hint="exclude files the notebook does not need when building the bundle",
        )
    if manifest.total_bytes > limits.max_bytes:
        raise LimitError(
            f"bundle holds {manifest.total_bytes} bytes, more than the limit of {limits.max_bytes}",
            hint="exclude large files the notebook does not need when building the bundle",
        )
    return manifest


def _extract_into(
    tf: tarfile.TarFile, tmp: str, expected_digest: str, limits: BundleLimits
) -> BundleManifest:
    manifest = _read_manifest(tf, expected_digest, limits)
    made: set[str] = {tmp}
    buf = bytearray(READ_BUFFER)
    for entry in manifest.files:
        mode = MODE_EXEC if entry.executable else MODE_PLAIN
        member = _check_member(_next(tf), FILES_PREFIX + entry.path, entry.size, mode)
        parts = entry.path.split("/")
        # Only this function creates anything under tmp, and only directories and regular files: no
        # link can exist there to redirect a write.
        d = tmp
        for part in parts[:-1]:
            d = os.path.join(d, part)
            if d not in made:
                os.mkdir(d)
                os.chmod(d, MODE_EXEC)
                made.add(d)
        target = os.path.join(d, parts[-1])
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out:
            try:
                digest, n = copy_hashed(_read_member(tf, member), entry.size, buf, out.write)
            except _MALFORMED as e:
                raise IntegrityError(f"bundle archive is malformed: {clip(str(e))}", hint=_NOT_OURS) from None
            if n != entry.size:
                raise IntegrityError(f"bundle archive is truncated inside {member.name!r}", hint=_NOT_OURS)
            if digest != entry.sha256:
                raise IntegrityError(
                    f"bundle file {show_path(entry.path)} has sha256 {digest}, the manifest says {entry.sha256}",
                    hint=_NOT_OURS,
                )
            os.fchmod(out.fileno(), mode)
    extra = _next(tf)
    if extra is not None:
        raise IntegrityError(
            f"bundle archive has member {extra.name!r} after the last file of the manifest", hint=_NOT_OURS
        )
    with open(os.path.join(tmp, *manifest.notebook.split("/")), "rb") as f:
        validate_notebook(f.read(), manifest.notebook)
    return manifest


def _open_tar(f: BinaryIO) -> tarfile.TarFile:
    try:
        # Stream mode: members are read strictly in order, memory flat in the archive's size.
        return tarfile.open(fileobj=f, mode="r|", encoding="utf-8", errors="strict")
    except _MALFORMED as e:
        raise IntegrityError(f"bundle archive is not a tar archive: {clip(str(e))}", hint=_NOT_OURS) from None


def extract_bundle(
    archive: Path | str,
    dest_dir: Path | str,
    *,
    expected_digest: str,
    limits: BundleLimits = BundleLimits(),
) -> BundleManifest:
    """Check and extract a bundle archive into ``dest_dir`` (which must not exist); return its manifest.

    The archive must be exactly what :func:`write_bundle` writes for a manifest whose digest is
    ``expected_digest``. Extraction goes to a temporary directory beside ``dest_dir``, renamed into place
    only when every check passed; on any failure nothing is left behind.
    """
    check_digest(expected_digest, "expected bundle digest")
    dest = Path(dest_dir)
    if os.path.lexists(dest):
        raise DCRError(
            f"bundle destination {str(dest)!r} already exists", hint="extract into a new directory"
        )
    if not dest.parent.is_dir():
        raise DCRError(f"cannot extract into {str(dest)!r}: {str(dest.parent)!r} is not a directory")
    if not os.path.isfile(archive):
        raise DCRError(f"bundle archive {str(archive)!r} is not a file")
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        with open(archive, "rb") as f, _open_tar(f) as tf:
            manifest = _extract_into(tf, tmp, expected_digest, limits)
        os.chmod(tmp, MODE_EXEC)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


_NOT_OURS = "the archive was not written by write_bundle or was altered; build the bundle again"


# Everything tarfile and the JSON decoder may raise on malformed input; all of it means "not a bundle".
_MALFORMED = (tarfile.TarError, EOFError, ValueError, UnicodeError, OverflowError, RecursionError)
