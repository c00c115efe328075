"""Outputs sealed to a recipient's X25519 key: the job's key in the researcher's server, or the airlock's.

A sealed file is a small header followed by a STREAM AES-256-GCM body (:mod:`dcr_enclave.formats.streamcrypt`):

    magic (8) | format version (1) | kind (1) | ephemeral X25519 public key (32) | recipient public key (32)

The sender makes a fresh ephemeral key pair, computes the X25519 shared secret with the recipient's public
key and derives the body's 32-byte data key with HKDF-SHA256, whose info binds a context string, the kind
(one file or a directory tar), both public keys and the job id; that is the shape of HPKE's base mode
(RFC 9180) without its wire format. The body's STREAM context is built from the job id too, and its
header MAC makes a wrong key fail before any chunk is read. A wrong private key, another job id, a flipped
byte anywhere, truncation or trailing bytes all end in :class:`~dcr_enclave.formats.errors.IntegrityError`, and
the destination is only ever renamed into place once everything authenticated.

Directories travel as a deterministic tar (sorted names, zero times and owners, normalised modes, regular
files and directories only) streamed straight into the encryption, so the clear text never touches disk on
the sealing side. Opening checks each member's name and type before writing it, extracts into a private
staging directory beside the destination and renames it into place only once the whole tar is in.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dcr_enclave.formats import streamcrypt
from dcr_enclave.formats.contract import check_job_id
from dcr_enclave.formats.digests import canonical_json
from dcr_enclave.formats.errors import DCRError, IntegrityError

MAGIC: Final = b"\x89DCRSEAL"
FORMAT_VERSION: Final = 1
KEY_SIZE: Final = 32
KIND_FILE: Final = 1
KIND_TAR: Final = 2
KIND_NAMES: Final = {KIND_FILE: "file", KIND_TAR: "tar"}
HEADER = struct.Struct(f">{len(MAGIC)}sBB{KEY_SIZE}s{KEY_SIZE}s")
HEADER_SIZE: Final = HEADER.size
_HKDF_CONTEXT: Final = b"dcr-sealed-output-v1\x00"
_STREAM_PROVIDER: Final = "dcr-sealed"

#: Bounds on what :func:`open_dir` will unpack, whatever the sealed tar says.
MAX_MEMBERS: Final = 100_000
MAX_NAME_BYTES: Final = 4096
_BLOCK: Final = tarfile.BLOCKSIZE
READ_SIZE: Final = 1 << 20


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw 32-byte ``(private, public)``."""
    sk = X25519PrivateKey.generate()
    return _raw_private(sk), raw_public_key(sk.public_key())


def public_key(recipient_private: bytes) -> bytes:
    """The raw public key that belongs to a raw X25519 private key."""
    return raw_public_key(private_key_from_raw(recipient_private).public_key())


def _raw_private(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def raw_public_key(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_key_from_raw(raw: bytes) -> X25519PrivateKey:
    if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_SIZE:
        raise DCRError(f"an X25519 private key must be {KEY_SIZE} raw bytes")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def public_key_from_raw(raw: bytes) -> X25519PublicKey:
    if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_SIZE:
        raise DCRError(f"an X25519 public key must be {KEY_SIZE} raw bytes")
    return X25519PublicKey.from_public_bytes(bytes(raw))


def derive_data_key(shared: bytes, kind: int, eph_pub: bytes, recipient_pub: bytes, job_id: str) -> bytes:
    info = _HKDF_CONTEXT + bytes([kind]) + eph_pub + recipient_pub + canonical_json({"job_id": job_id})
    return HKDF(algorithm=hashes.SHA256(), length=streamcrypt.DATA_KEY_SIZE, salt=None, info=info).derive(
        shared
    )


def stream_context(kind: int, eph_pub: bytes, recipient_pub: bytes, job_id: str) -> streamcrypt.FileContext:
    # The body is bound to the job (dataset slot), the key pair (version slot) and the kind (file slot).
    return streamcrypt.FileContext(
        provider=_STREAM_PROVIDER,
        dataset=job_id,
        version="sha256:" + hashlib.sha256(eph_pub + recipient_pub).hexdigest(),
        file_name=KIND_NAMES[kind],
    )


def exchange(sk: X25519PrivateKey, pk: X25519PublicKey) -> bytes:
    try:
        return sk.exchange(pk)
    except ValueError:  # an all-zero shared secret: a low-order point posing as a public key
        raise IntegrityError("the X25519 public key is degenerate (low-order point)") from None


# ---------------------------------------------------------------------------------------------------------
# Sealing and opening a byte stream
# ---------------------------------------------------------------------------------------------------------


def staging_dir(dest: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    except OSError as e:
        raise DCRError(f"cannot write beside {dest}: {e.strerror}") from None


def temp_file(dest: Path) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DCRError(f"cannot write beside {dest}: {e.strerror}") from None


def _seal_stream(
    src: streamcrypt.Readable, size: int, dest: Path, recipient_public: bytes, job_id: str, kind: int
) -> None:
    check_job_id(job_id)
    recipient = public_key_from_raw(recipient_public)
    recipient_raw = raw_public_key(recipient)
    eph = X25519PrivateKey.generate()
    eph_raw = raw_public_key(eph.public_key())
    key = derive_data_key(exchange(eph, recipient), kind, eph_raw, recipient_raw, job_id)
    fd, tmp = temp_file(dest)
    try:
        with os.fdopen(fd, "wb", buffering=0) as out:
            out.write(HEADER.pack(MAGIC, FORMAT_VERSION, kind, eph_raw, recipient_raw))
            streamcrypt.encrypt_stream(
                src, out, key, stream_context(kind, eph_raw, recipient_raw, job_id), size
            )
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seal_file(src: Path, dest: Path, recipient_public: bytes, *, job_id: str) -> None:
    """Seal the file ``src`` to ``recipient_public`` for ``job_id``, writing ``dest`` atomically."""
    with streamcrypt.open_source(Path(src)) as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DCRError(f"{src} is not a regular file")
        _seal_stream(fin, st.st_size, Path(dest), recipient_public, job_id, KIND_FILE)


#: Held results are padded before they are sealed: their sealed size is visible outside the enclave (to
#: the researcher's server and storage) before any reviewer has looked, and the notebook chooses what it
#: writes. Sizes are rounded up to 64 KiB, 256 KiB, 1 MiB, ... (x4), or to a cap when that is smaller.
PAD_FLOOR: Final = 64 * 2**10
PAD_FACTOR: Final = 4


def padded_size(n: int, cap: int) -> int:
    """The size ``n`` bytes are padded to: the smallest of :data:`PAD_FLOOR` x 4^k that holds them, or
    ``cap`` when that is smaller; never less than ``n`` (what is over the cap shows its size)."""
    size = PAD_FLOOR
    while size < n:
        size *= PAD_FACTOR
    return max(n, min(size, cap))


def pad_json(data: bytes, cap: int) -> bytes:
    """A JSON document padded with trailing spaces (still the same JSON) to :func:`padded_size`."""
    return data + b" " * (padded_size(len(data), cap) - len(data))


def seal_bytes(data: bytes, dest: Path, recipient_public: bytes, *, job_id: str) -> None:
    """Seal ``data`` as a sealed file (:func:`open_file` opens it), writing ``dest`` atomically."""
    _seal_stream(io.BytesIO(data), len(data), Path(dest), recipient_public, job_id, KIND_FILE)


# ---------------------------------------------------------------------------------------------------------
# Directories as deterministic tar streams
# ---------------------------------------------------------------------------------------------------------


def check_member_name(name: str, where: str) -> str:
    """A relative POSIX path of plain components; refuses anything that could leave the destination."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise DCRError(f"{where}: member name {name!r} is not valid UTF-8") from None
    parts = name.split("/")
    if (
        not name
        or len(encoded) > MAX_NAME_BYTES
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in name)
        or any(len(p.encode("utf-8")) > 255 for p in parts)
    ):
        raise DCRError(
            f"{where}: refusing the member name {name!r}",
            hint="names must be relative paths of plain components: no '..', '.', empty parts, "
            "leading '/', backslashes or control characters",
        )
    return name


def _tarinfo(name: str, *, is_dir: bool, size: int = 0, executable: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    ti.mode = 0o755 if is_dir or executable else 0o644
    ti.size = 0 if is_dir else size
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _scan(root: Path) -> list[tuple[tarfile.TarInfo, Path | None]]:
    """Every member under ``root`` in a fixed order; refuses links and special files."""
    try:
        st = os.lstat(root)
    except OSError as e:
        raise DCRError(f"cannot read the output directory {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DCRError(f"{root} is not a directory (links are refused)")
    members: list[tuple[tarfile.TarInfo, Path | None]] = []

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name.encode("utf-8", "surrogateescape")):
            rel = prefix + entry.name
            check_member_name(rel, str(root))
            est = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(est.st_mode):
                members.append((_tarinfo(rel, is_dir=True), None))
                walk(Path(entry.path), rel + "/")
            elif stat.S_ISREG(est.st_mode):
                ti = _tarinfo(rel, is_dir=False, size=est.st_size, executable=bool(est.st_mode & 0o111))
                members.append((ti, Path(entry.path)))
            else:
                kind = "a symbolic link" if stat.S_ISLNK(est.st_mode) else "a special file"
                raise DCRError(
                    f"refusing to seal {entry.path}: it is {kind}",
                    hint="outputs may only be regular files and directories",
                )

    walk(root, "")
    return members


def _headers(ti: tarfile.TarInfo) -> bytes:
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


class _TarStream(io.RawIOBase):
    """The tar of a scanned directory, produced on demand: headers, file data, padding, end blocks.

    Its exact length is known before the first byte (so the STREAM header can carry it), and a file that
    changes size while it is read is refused instead of producing a tar that lies about it.
    """

    def __init__(
        self, members: list[tuple[tarfile.TarInfo, Path | None]], pad_cap: int | None = None
    ) -> None:
        super().__init__()
        self.size = sum(len(_headers(ti)) + -(-ti.size // _BLOCK) * _BLOCK for ti, _ in members) + 2 * _BLOCK
        # Zeros after the end-of-archive blocks: tar readers stop at the end marker.
        padding = 0 if pad_cap is None else padded_size(self.size, pad_cap) - self.size
        self.size += padding
        self._pieces = self._generate(members, padding)
        self._pending = memoryview(b"")

    @staticmethod
    def _generate(members: list[tuple[tarfile.TarInfo, Path | None]], padding: int = 0) -> Iterator[bytes]:
        for ti, path in members:
            yield _headers(ti)
            if path is None:
                continue
            left = ti.size
            with open(path, "rb", buffering=0) as f:
                while left:
                    piece = f.read(min(READ_SIZE, left))
                    if not piece:
                        raise DCRError(f"{path} became shorter while it was being sealed", hint="retry")
                    left -= len(piece)
                    yield piece
                if f.read(1):
                    raise DCRError(f"{path} grew while it was being sealed", hint="retry")
            if pad := -ti.size % _BLOCK:
                yield bytes(pad)
        yield bytes(2 * _BLOCK)
        while padding:
            piece = min(padding, READ_SIZE)
            padding -= piece
            yield bytes(piece)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        while not self._pending:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._pending = memoryview(piece)
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def seal_dir(
    src_dir: Path, dest_file: Path, recipient_public: bytes, job_id: str, *, pad_cap: int | None = None
) -> None:
    """Pack ``src_dir`` as a deterministic tar and seal it to ``recipient_public`` for ``job_id``; with
    ``pad_cap``, the tar is padded to :func:`padded_size` (zeros after its end marker)."""
    try:
        stream = _TarStream(_scan(Path(src_dir)), pad_cap)
        _seal_stream(stream, stream.size, Path(dest_file), recipient_public, job_id, KIND_TAR)
    except OSError as e:
        raise DCRError(f"cannot seal {src_dir}: {e.strerror} ({e.filename})") from None


def seal_tar_payload(payload: bytes, dest: Path, recipient_public: bytes, *, job_id: str) -> None:
    """Seal the bytes of a tar already made (an opened sealed directory, re-sealed to another recipient)."""
    _seal_stream(io.BytesIO(payload), len(payload), Path(dest), recipient_public, job_id, KIND_TAR)
