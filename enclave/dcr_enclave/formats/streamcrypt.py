"""Dataset file encryption: a STREAM construction over AES-256-GCM.

An encrypted file is a fixed-size header followed by chunks. The header holds a magic, the format
version, the chunk size, the total plaintext length, a random salt and an HMAC over those fields. From the
dataset version's data key and the salt, HKDF-SHA256 derives a per-file AES key and a header MAC key; the
HKDF info binds provider, dataset, version and file name. Because every file gets its own key, the chunk
nonce can simply be the chunk counter plus a last-chunk flag (the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár) and still never repeat under one key.

Every chunk's associated data binds the header bytes, the file context (provider, dataset, version, file
name), the chunk index and the last-chunk flag. So flipped bytes, reordered chunks, chunks spliced in from
another file (even one encrypted under the same data key), truncation (also exactly at a chunk boundary)
and trailing bytes all fail, each with an :class:`~dcr_enclave.formats.errors.IntegrityError` that names the file
and the kind of failure. The header MAC also makes the format key-committing: a wrong data key is reported
at the header, before any chunk is touched.

Encryption and decryption stream through two fixed buffers of one chunk each, so memory stays flat in file
size. :func:`decrypt_file` writes to a temporary file beside the destination and renames it into place
only after the last chunk authenticated; on any failure the temporary file is deleted, so no partial
plaintext is ever left behind.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dcr_enclave.formats.contract import check_file_name, check_name
from dcr_enclave.formats.digests import canonical_json, check_digest
from dcr_enclave.formats.errors import DCRError, IntegrityError

#: The manifest's ``encryption.scheme`` for this format.
SCHEME: Final = "dcr-stream-aes256gcm-v1"
#: First bytes of every encrypted file; the high byte and newline catch text-mode mangling.
MAGIC: Final = b"\x89DCRENC\n"
FORMAT_VERSION: Final = 1

DEFAULT_CHUNK_SIZE: Final = 1 << 20
#: Bounds on the chunk size: small enough that a hostile header cannot make a reader allocate much,
#: large enough that per-chunk overhead (16-byte tag, one AEAD call) stays negligible.
MIN_CHUNK_SIZE: Final = 1 << 10
MAX_CHUNK_SIZE: Final = 16 << 20
#: Largest plaintext a header may declare (keeps chunk counters and offsets far inside 64 bits).
MAX_PLAINTEXT_SIZE: Final = 1 << 50

DATA_KEY_SIZE: Final = 32
SALT_SIZE: Final = 32
TAG_SIZE: Final = 16
HEADER_MAC_SIZE: Final = 32

# magic, format version, reserved (zero), chunk size, plaintext length, salt
_FIELDS = struct.Struct(f">{len(MAGIC)}sHHIQ{SALT_SIZE}s")
HEADER_SIZE: Final = _FIELDS.size + HEADER_MAC_SIZE
_HKDF_INFO_PREFIX = SCHEME.encode() + b"\x00"
_CHUNK_AD = struct.Struct(">QB")


class Readable(Protocol):
    """What the streaming functions read from: a binary file or any stream with ``readinto``."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...
    def read(self, size: int = -1, /) -> bytes | None: ...


class Writable(Protocol):
    def write(self, data: memoryview, /) -> int | None: ...


@dataclass(frozen=True)
class FileContext:
    """Where a file belongs: every key and every chunk of the file is bound to these four values."""

    provider: str
    dataset: str
    version: str
    file_name: str

    def __post_init__(self) -> None:
        check_name(self.provider, "provider")
        check_name(self.dataset, "dataset")
        check_digest(self.version, "dataset version")
        check_file_name(self.file_name)

    @property
    def label(self) -> str:
        """How error messages name the file."""
        return f"{self.provider}/{self.dataset}/{self.file_name} (version {self.version[:19]}…)"

    def encode(self) -> bytes:
        return canonical_json(
            {
                "provider": self.provider,
                "dataset": self.dataset,
                "version": self.version,
                "file": self.file_name,
            }
        )


@dataclass(frozen=True)
class Header:
    """The parsed fields of an encrypted file's header."""

    chunk_size: int
    plaintext_size: int
    salt: bytes
    raw: bytes

    @property
    def chunk_count(self) -> int:
        """Number of chunks; an empty file still has one (empty, final) chunk."""
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def ciphertext_size(self) -> int:
        return ciphertext_size(self.plaintext_size, self.chunk_size)


def ciphertext_size(plaintext_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Size of the encrypted file for a plaintext of ``plaintext_size`` bytes."""
    chunks = max(1, -(-plaintext_size // chunk_size))
    return HEADER_SIZE + plaintext_size + chunks * TAG_SIZE


def check_chunk_size(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise DCRError(
            f"chunk size {chunk_size!r} is out of range",
            hint=f"use {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes (default {DEFAULT_CHUNK_SIZE})",
        )
    return chunk_size


def _check_data_key(data_key: bytes) -> None:
    if not isinstance(data_key, bytes | bytearray) or len(data_key) != DATA_KEY_SIZE:
        raise DCRError(f"a data key must be {DATA_KEY_SIZE} bytes")


def _derive(data_key: bytes, salt: bytes, ctx: FileContext) -> tuple[AESGCM, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_HKDF_INFO_PREFIX + ctx.encode()).derive(
        bytes(data_key)
    )
    return AESGCM(okm[:32]), okm[32:]


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _read_exactly(src: Readable, view: memoryview) -> int:
    """Fill ``view`` from ``src``; returns how many bytes arrived (fewer only at end of stream)."""
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _write_all(out: Writable, view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = out.write(view[done:])
        if n is None:
            raise DCRError("output stream would block; decrypt to a blocking file or pipe")
        done += n


class _Chunks:
    """Shared state of one file's chunk sequence: per-chunk sizes, nonces and associated data."""

    def __init__(self, header: Header, aead: AESGCM, ctx: FileContext) -> None:
        self.header = header
        self.aead = aead
        self.count = header.chunk_count
        # Header bytes and context are the same for every chunk; only index and flag vary.
        self.ad_prefix = header.raw + struct.pack(">I", len(ctx_bytes := ctx.encode())) + ctx_bytes

    def plaintext_len(self, index: int) -> int:
        if index < self.count - 1:
            return self.header.chunk_size
        return self.header.plaintext_size - (self.count - 1) * self.header.chunk_size

    def nonce_ad(self, index: int) -> tuple[bytes, bytes]:
        last = index == self.count - 1
        return _nonce(index, last), self.ad_prefix + _CHUNK_AD.pack(index, last)


def _build_header(chunk_size: int, plaintext_size: int, salt: bytes, mac_key: bytes) -> Header:
    fields = _FIELDS.pack(MAGIC, FORMAT_VERSION, 0, chunk_size, plaintext_size, salt)
    raw = fields + hmac.digest(mac_key, fields, "sha256")
    return Header(chunk_size=chunk_size, plaintext_size=plaintext_size, salt=salt, raw=raw)


def read_header(src: Readable, ctx: FileContext) -> Header:
    """Read and check the header's structure (not yet its MAC: that needs the key)."""
    raw = bytearray(HEADER_SIZE)
    got = _read_exactly(src, memoryview(raw))
    if got < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise IntegrityError(f"{ctx.label} is not a DCR encrypted file (bad magic)")
    if got < HEADER_SIZE:
        raise IntegrityError(f"{ctx.label}: bad header (truncated inside the header, {got} bytes)")
    _magic, version, reserved, chunk_size, size, salt = _FIELDS.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise IntegrityError(
            f"{ctx.label}: bad header (unsupported format version {version})",
            hint="this DCR reads format version 1; re-encrypt with this version or upgrade",
        )
    if reserved != 0 or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or size > MAX_PLAINTEXT_SIZE:
        raise IntegrityError(f"{ctx.label}: bad header (reserved field, chunk size or length out of range)")
    return Header(chunk_size=chunk_size, plaintext_size=size, salt=salt, raw=bytes(raw))


def encrypt_stream(
    src: Readable,
    out: Writable,
    data_key: bytes,
    ctx: FileContext,
    plaintext_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[str, str, int]:
    """Encrypt exactly ``plaintext_size`` bytes of ``src`` to ``out``.

    Returns ``(plaintext_sha256, ciphertext_sha256, ciphertext_size)``. Refuses a source that turns out
    shorter or longer than announced (a file that changed while it was read).
    """
    _check_data_key(data_key)
    check_chunk_size(chunk_size)
    if not 0 <= plaintext_size <= MAX_PLAINTEXT_SIZE:
        raise DCRError(f"cannot encrypt {ctx.label}: size {plaintext_size} is out of range")
    salt = secrets.token_bytes(SALT_SIZE)
    aead, mac_key = _derive(data_key, salt, ctx)
    header = _build_header(chunk_size, plaintext_size, salt, mac_key)
    chunks = _Chunks(header, aead, ctx)
    plain_hash, cipher_hash = hashlib.sha256(), hashlib.sha256()
    _write_all(out, memoryview(header.raw))
    cipher_hash.update(header.raw)
    written = len(header.raw)
    pbuf, cbuf = bytearray(chunk_size), bytearray(chunk_size + TAG_SIZE)
    pview, cview = memoryview(pbuf), memoryview(cbuf)
    for index in range(chunks.count):
        n = chunks.plaintext_len(index)
        if _read_exactly(src, pview[:n]) != n:
            raise DCRError(f"{ctx.label} became shorter while it was being encrypted", hint="retry")
        nonce, ad = chunks.nonce_ad(index)
        aead.encrypt_into(nonce, pview[:n], ad, cview[: n + TAG_SIZE])
        plain_hash.update(pview[:n])
        cipher_hash.update(cview[: n + TAG_SIZE])
        _write_all(out, cview[: n + TAG_SIZE])
        written += n + TAG_SIZE
    if src.read(1):
        raise DCRError(f"{ctx.label} grew while it was being encrypted", hint="retry")
    return "sha256:" + plain_hash.hexdigest(), "sha256:" + cipher_hash.hexdigest(), written


def _temp_beside(dest: Path) -> tuple[int, str]:
    """A new owner-only temporary file in ``dest``'s directory (so the final rename is atomic)."""
    try:
        return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DCRError(f"cannot write beside {dest}: {e.strerror}") from None


def open_source(src: Path) -> io.FileIO:
    try:
        return open(src, "rb", buffering=0)
    except OSError as e:
        raise DCRError(f"cannot read {src}: {e.strerror}") from None


def encrypt_file(
    src: Path,
    dest: Path,
    data_key: bytes,
    ctx: FileContext,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    expected_sha256: str | None = None,
) -> tuple[str, int]:
    """Encrypt ``src`` to ``dest`` (atomically); returns ``(ciphertext_sha256, ciphertext_size)``.

    With ``expected_sha256``, refuses (and leaves no ``dest``) when the plaintext read is not the one
    the caller hashed earlier: the file changed between the two passes.
    """
    src, dest = Path(src), Path(dest)
    fd, tmp = _temp_beside(dest)
    try:
        with open_source(src) as fin, os.fdopen(fd, "wb", buffering=0) as fout:
            size = os.fstat(fin.fileno()).st_size
            plain, cipher, written = encrypt_stream(fin, fout, data_key, ctx, size, chunk_size)
            if expected_sha256 is not None and plain != expected_sha256:
                raise DCRError(f"{src} changed while it was being encrypted", hint="retry")
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except OSError as e:  # disk full, I/O error: nothing half-written stays behind either
        Path(tmp).unlink(missing_ok=True)
        raise DCRError(f"cannot encrypt {src} to {dest}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return cipher, written


def decrypt_stream(
    src: Readable,
    out: Writable,
    data_key: bytes,
    ctx: FileContext,
    *,
    ciphertext_size: int | None = None,
    digest: bool = True,
) -> tuple[str | None, int]:
    """Decrypt ``src`` to ``out``; returns ``(plaintext_sha256, plaintext_size)``.

    With ``digest=False`` the plaintext is not hashed (the first element is ``None``): every chunk is
    still authenticated under associated data naming provider, dataset, version, file and position,
    which is what makes the output trustworthy; the digest only serves recomputing the version.

    When the caller knows the ciphertext's size (a regular file), passing it makes a truncated or
    extended file fail right after the header authenticated, before any chunk is decrypted.

    Each chunk is written only after it authenticated, but a failure can come after earlier chunks were
    written: a caller that gets :class:`IntegrityError` must discard everything written to ``out``
    (:func:`decrypt_file` does).
    """
    _check_data_key(data_key)
    header = read_header(src, ctx)
    aead, mac_key = _derive(data_key, header.salt, ctx)
    if not hmac.compare_digest(
        hmac.digest(mac_key, header.raw[: _FIELDS.size], "sha256"), header.raw[_FIELDS.size :]
    ):
        raise IntegrityError(
            f"{ctx.label}: header does not authenticate",
            hint="wrong data key, a file of another dataset, version or file name, or a tampered header",
        )
    if ciphertext_size is not None and ciphertext_size != header.ciphertext_size:
        raise _size_error(ctx, header, ciphertext_size)
    chunks = _Chunks(header, aead, ctx)
    plain_hash = hashlib.sha256()
    cbuf, pbuf = bytearray(header.chunk_size + TAG_SIZE), bytearray(header.chunk_size)
    cview, pview = memoryview(cbuf), memoryview(pbuf)
    total = 0
    for index in range(chunks.count):
        n = chunks.plaintext_len(index)
        got = _read_exactly(src, cview[: n + TAG_SIZE])
        if got < n + TAG_SIZE:
            raise _truncated_error(ctx, chunks.count, index, at_boundary=got == 0)
        nonce, ad = chunks.nonce_ad(index)
        try:
            aead.decrypt_into(nonce, cview[: n + TAG_SIZE], ad, pview[:n])
        except InvalidTag:
            raise IntegrityError(
                f"{ctx.label}: chunk {index} of {chunks.count} does not authenticate",
                hint="the chunk was tampered with, reordered or spliced in from another file",
            ) from None
        if digest:
            plain_hash.update(pview[:n])
        _write_all(out, pview[:n])
        total += n
    if src.read(1):
        raise _trailing_error(ctx)
    if total != header.plaintext_size:  # cannot happen by construction; kept as a last line of defence
        raise IntegrityError(f"{ctx.label}: length mismatch ({total} != {header.plaintext_size} bytes)")
    return ("sha256:" + plain_hash.hexdigest() if digest else None), total


def decrypt_file(
    src: Path, dest: Path, data_key: bytes, ctx: FileContext, *, mode: int = 0o600, digest: bool = True
) -> tuple[str | None, int]:
    """Decrypt ``src`` to ``dest``; returns ``(plaintext_sha256, plaintext_size)``.

    ``dest`` appears (with permissions ``mode``) only once the whole file authenticated; on any failure
    nothing is left in ``dest``'s directory.
    """
    src, dest = Path(src), Path(dest)
    fd, tmp = _temp_beside(dest)
    try:
        with open_source(src) as fin, os.fdopen(fd, "wb", buffering=0) as fout:
            size = os.fstat(fin.fileno()).st_size
            result = decrypt_stream(fin, fout, data_key, ctx, ciphertext_size=size, digest=digest)
            os.fchmod(fout.fileno(), mode)
        os.replace(tmp, dest)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DCRError(f"cannot decrypt {src} to {dest}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def _truncated_error(ctx: FileContext, count: int, index: int, *, at_boundary: bool) -> IntegrityError:
    if at_boundary:
        return IntegrityError(
            f"{ctx.label}: truncated at a chunk boundary: the file ends before chunk {index} of {count} "
            f"(the chunk with the last-chunk flag, {count - 1}, never arrived)"
        )
    return IntegrityError(f"{ctx.label}: truncated inside chunk {index} of {count}")


def _trailing_error(ctx: FileContext) -> IntegrityError:
    return IntegrityError(f"{ctx.label}: trailing data after the last chunk")


def _size_error(ctx: FileContext, header: Header, actual: int) -> IntegrityError:
    """The precise failure for a file whose size contradicts its authenticated header."""
    if actual > header.ciphertext_size:
        return _trailing_error(ctx)
    full, rest = divmod(max(0, actual - HEADER_SIZE), header.chunk_size + TAG_SIZE)
    return _truncated_error(ctx, header.chunk_count, full, at_boundary=rest == 0)
