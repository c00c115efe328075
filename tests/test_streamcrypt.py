"""The dataset file encryption (STREAM over AES-256-GCM): round trips, every tamper class, flat memory."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.streamcrypt import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    MIN_CHUNK_SIZE,
    TAG_SIZE,
    FileContext,
    ciphertext_size,
    decrypt_file,
    decrypt_stream,
    encrypt_file,
)

CS = MIN_CHUNK_SIZE  # small chunks, so small files have many of them
VERSION = "sha256:" + "ab" * 32
CTX = FileContext("acme", "insurance", VERSION, "real.csv")
# 4 full chunks and a short last one.
TAMPER_SIZE = 4 * CS + 404


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def _encrypt(tmp_path: Path, data: bytes, key: bytes, ctx: FileContext = CTX, chunk_size: int = CS) -> Path:
    src = tmp_path / f"plain-{ctx.dataset}-{ctx.file_name}"
    src.write_bytes(data)
    dest = tmp_path / f"{ctx.dataset}-{ctx.file_name}.dcrenc"
    encrypt_file(src, dest, key, ctx, chunk_size)
    return dest


def _chunk(ct: bytes, i: int) -> slice:
    start = HEADER_SIZE + i * (CS + TAG_SIZE)
    return slice(start, start + CS + TAG_SIZE)


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 2 * CS, 37 * CS + 11])
def test_round_trip_multi_chunk(tmp_path: Path, key: bytes, size: int) -> None:
    """Files of every size relative to the chunk size (empty, one byte, around one and many chunks)
    decrypt to the same bytes, with the plaintext digest and size reported and the ciphertext size known."""
    data = os.urandom(size)
    src = tmp_path / "plain"
    src.write_bytes(data)
    enc = tmp_path / "cipher"
    digest, ct_size = encrypt_file(src, enc, key, CTX, CS)
    assert ct_size == enc.stat().st_size == ciphertext_size(size, CS)
    assert digest == "sha256:" + hashlib.sha256(enc.read_bytes()).hexdigest()
    out = tmp_path / "out" / "real.csv"
    out.parent.mkdir()
    assert decrypt_file(enc, out, key, CTX) == ("sha256:" + hashlib.sha256(data).hexdigest(), size)
    assert out.read_bytes() == data
    assert os.listdir(out.parent) == ["real.csv"]


def test_round_trip_default_chunk_size_and_stream(tmp_path: Path, key: bytes) -> None:
    """With the default 1 MiB chunks a multi-megabyte file round-trips through both the file and the
    streaming API, and the ciphertext does not contain the plaintext."""
    data = os.urandom(3 * DEFAULT_CHUNK_SIZE + 5)
    enc = _encrypt(tmp_path, data, key, chunk_size=DEFAULT_CHUNK_SIZE)
    ct = enc.read_bytes()
    assert data[:64] not in ct
    out = io.BytesIO()
    with open(enc, "rb") as f:
        digest, size = decrypt_stream(f, out, key, CTX)
    assert out.getvalue() == data
    assert (digest, size) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def test_same_plaintext_encrypts_differently(tmp_path: Path, key: bytes) -> None:
    """Two encryptions of the same file under the same data key differ (fresh salt, so fresh file key)."""
    data = os.urandom(3 * CS)
    a = _encrypt(tmp_path, data, key).read_bytes()
    b = _encrypt(tmp_path, data, key).read_bytes()
    assert a[HEADER_SIZE:] != b[HEADER_SIZE:]


# --------------------------------------------------------------------------------------------------------
# Tampering: every manipulation fails with IntegrityError naming the class, and leaves no output behind
# --------------------------------------------------------------------------------------------------------


def _flip(ct: bytes, offset: int) -> bytes:
    b = bytearray(ct)
    b[offset] ^= 0x01
    return bytes(b)


def _swap_chunks(ct: bytes, i: int, j: int) -> bytes:
    b = bytearray(ct)
    b[_chunk(ct, i)], b[_chunk(ct, j)] = ct[_chunk(ct, j)], ct[_chunk(ct, i)]
    return bytes(b)


def _set_length(ct: bytes, size: int) -> bytes:
    b = bytearray(ct)
    # magic, version (2), reserved (2), chunk size (4), then the 8-byte plaintext length
    struct.pack_into(">Q", b, len(MAGIC) + 8, size)
    return bytes(b)


def _splice(other: bytes) -> Callable[[bytes], bytes]:
    def splice(ct: bytes) -> bytes:
        b = bytearray(ct)
        b[_chunk(ct, 2)] = other[_chunk(other, 2)]
        return bytes(b)

    return splice


TAMPERS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated mid-chunk": (lambda ct: ct[:-1], "truncated inside chunk 4 of 5"),
    "truncated mid-middle-chunk": (
        lambda ct: ct[: _chunk(ct, 2).start + 100],
        "truncated inside chunk 2 of 5",
    ),
    "truncated at a chunk boundary": (lambda ct: ct[: _chunk(ct, 4).start], "truncated at a chunk boundary"),
    "truncated after the header": (lambda ct: ct[:HEADER_SIZE], "truncated at a chunk boundary"),
    "truncated inside the header": (lambda ct: ct[: HEADER_SIZE - 1], "bad header"),
    "reordered chunks": (lambda ct: _swap_chunks(ct, 1, 2), "chunk 1 of 5 does not authenticate"),
    "last chunk moved first": (
        lambda ct: ct[:HEADER_SIZE] + ct[_chunk(ct, 4).start :] + ct[HEADER_SIZE : _chunk(ct, 4).start],
        "chunk 0 of 5 does not authenticate",
    ),
    "flipped magic": (lambda ct: _flip(ct, 0), "bad magic"),
    "flipped format version": (lambda ct: _flip(ct, len(MAGIC) + 1), "unsupported format version"),
    "flipped salt": (lambda ct: _flip(ct, HEADER_SIZE - 40), "header does not authenticate"),
    "flipped header MAC": (lambda ct: _flip(ct, HEADER_SIZE - 1), "header does not authenticate"),
    "flipped chunk size": (lambda ct: _flip(ct, len(MAGIC) + 6), "header does not authenticate"),
    "header length field changed": (
        lambda ct: _set_length(ct, TAMPER_SIZE - 1),
        "header does not authenticate",
    ),
    "header length field grown": (
        lambda ct: _set_length(ct, TAMPER_SIZE + CS),
        "header does not authenticate",
    ),
    "flipped ciphertext byte": (
        lambda ct: _flip(ct, _chunk(ct, 3).start + 10),
        "chunk 3 of 5 does not authenticate",
    ),
    "flipped tag byte": (lambda ct: _flip(ct, _chunk(ct, 0).stop - 1), "chunk 0 of 5 does not authenticate"),
    "flipped byte in last chunk": (lambda ct: _flip(ct, len(ct) - 20), "chunk 4 of 5 does not authenticate"),
    "trailing bytes": (lambda ct: ct + b"\x00", "trailing data after the last chunk"),
    "trailing chunk": (lambda ct: ct + ct[_chunk(ct, 1)], "trailing data after the last chunk"),
    "not an encrypted file": (lambda ct: b"age,sex,bmi\n" * 100, "bad magic"),
    "empty file": (lambda ct: b"", "bad magic"),
}


def _expect_failure(tmp_path: Path, tampered: bytes, key: bytes, ctx: FileContext, match: str) -> None:
    """Both APIs refuse; decrypt_file leaves nothing (no output, no temporary file) in the output dir."""
    bad = tmp_path / "tampered.dcrenc"
    bad.write_bytes(tampered)
    outdir = tmp_path / "out"
    outdir.mkdir(exist_ok=True)
    with pytest.raises(IntegrityError, match=match) as info:
        decrypt_file(bad, outdir / ctx.file_name, key, ctx)
    assert ctx.file_name in str(info.value)
    assert os.listdir(outdir) == []
    with open(bad, "rb") as f, pytest.raises(IntegrityError, match=match):
        decrypt_stream(f, io.BytesIO(), key, ctx)


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampering_is_detected(tmp_path: Path, key: bytes, name: str) -> None:
    """Each tamper class (truncation mid-chunk and at a chunk boundary, reordering, flipped bytes in
    header, ciphertext and tag, a changed length field, trailing bytes) raises IntegrityError naming the
    file and the class, and no plaintext is left behind."""
    ct = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key).read_bytes()
    tamper, match = TAMPERS[name]
    _expect_failure(tmp_path, tamper(ct), key, CTX, match)


def test_wrong_key_is_detected(tmp_path: Path, key: bytes) -> None:
    """A wrong data key fails at the header, before any chunk is decrypted."""
    ct = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key).read_bytes()
    _expect_failure(tmp_path, ct, os.urandom(32), CTX, "header does not authenticate")


def test_chunk_spliced_from_another_file_of_the_same_dataset_fails(tmp_path: Path, key: bytes) -> None:
    """A chunk taken from another file of the same dataset version, encrypted under the same data key at
    the same chunk index, does not authenticate in this file."""
    ct = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key).read_bytes()
    sibling = FileContext(CTX.provider, CTX.dataset, CTX.version, "other.csv")
    other = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key, sibling).read_bytes()
    _expect_failure(tmp_path, _splice(other)(ct), key, CTX, "chunk 2 of 5 does not authenticate")


def test_chunk_spliced_from_another_dataset_fails(tmp_path: Path, key: bytes) -> None:
    """A chunk from another dataset (even one sharing the data key) does not authenticate."""
    ct = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key).read_bytes()
    foreign = FileContext(CTX.provider, "claims", CTX.version, CTX.file_name)
    other = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key, foreign).read_bytes()
    _expect_failure(tmp_path, _splice(other)(ct), key, CTX, "chunk 2 of 5 does not authenticate")


@pytest.mark.parametrize(
    "ctx",
    [
        FileContext(CTX.provider, CTX.dataset, CTX.version, "other.csv"),
        FileContext(CTX.provider, "claims", CTX.version, CTX.file_name),
        FileContext("globex", CTX.dataset, CTX.version, CTX.file_name),
        FileContext(CTX.provider, CTX.dataset, "sha256:" + "cd" * 32, CTX.file_name),
    ],
    ids=["file name", "dataset", "provider", "version"],
)
def test_whole_file_under_another_name_fails(tmp_path: Path, key: bytes, ctx: FileContext) -> None:
    """A complete, untouched encrypted file does not decrypt as another file, dataset, provider or
    version, even under the same data key."""
    ct = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key).read_bytes()
    _expect_failure(tmp_path, ct, key, ctx, "header does not authenticate")


def test_decrypt_does_not_replace_existing_output_on_failure(tmp_path: Path, key: bytes) -> None:
    """A failed decryption leaves an existing destination file exactly as it was."""
    ct = _encrypt(tmp_path, os.urandom(TAMPER_SIZE), key).read_bytes()
    bad = tmp_path / "bad"
    bad.write_bytes(ct[:-1])
    dest = tmp_path / "dest"
    dest.write_bytes(b"previous")
    with pytest.raises(IntegrityError):
        decrypt_file(bad, dest, key, CTX)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_encrypt_refuses_a_source_that_changed(tmp_path: Path, key: bytes) -> None:
    """encrypt_file with the digest of an earlier read refuses when the content differs, leaving no file."""
    src = tmp_path / "plain"
    src.write_bytes(b"one content")
    dest = tmp_path / "out.dcrenc"
    with pytest.raises(DCRError, match="changed while it was being encrypted"):
        encrypt_file(src, dest, key, CTX, CS, expected_sha256="sha256:" + "00" * 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


@pytest.mark.parametrize("chunk_size", [0, MIN_CHUNK_SIZE - 1, 64 << 20])
def test_chunk_size_is_bounded(tmp_path: Path, key: bytes, chunk_size: int) -> None:
    """Chunk sizes outside the documented bounds are refused before anything is written."""
    src = tmp_path / "plain"
    src.write_bytes(b"x")
    with pytest.raises(DCRError, match="chunk size"):
        encrypt_file(src, tmp_path / "out", key, CTX, chunk_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


@pytest.mark.parametrize(
    "args",
    [
        ("ACME", "insurance", VERSION, "real.csv"),
        ("acme", "../x", VERSION, "real.csv"),
        ("acme", "insurance", "sha256:zz", "real.csv"),
        ("acme", "insurance", VERSION, "../real.csv"),
        ("acme", "insurance", VERSION, ".hidden"),
    ],
)
def test_file_context_validates_its_fields(args: tuple[str, str, str, str]) -> None:
    """A FileContext refuses names that are not valid provider/dataset/file names or a digest."""
    with pytest.raises(DCRError):
        FileContext(*args)


def test_short_data_key_is_refused(tmp_path: Path) -> None:
    """Data keys are exactly 32 bytes."""
    src = tmp_path / "plain"
    src.write_bytes(b"x")
    with pytest.raises(DCRError, match="32 bytes"):
        encrypt_file(src, tmp_path / "out", b"k" * 16, CTX)


# --------------------------------------------------------------------------------------------------------
# Memory stays flat in file size
# --------------------------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from dcr_enclave.formats.streamcrypt import FileContext, decrypt_file
    ctx = FileContext("acme", "insurance", "sha256:" + "ab" * 32, "big.bin")
    decrypt_file(Path(sys.argv[1]), Path(sys.argv[2]), bytes.fromhex(sys.argv[3]), ctx)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def _peak_rss_kib(tmp_path: Path, mib: int, key: bytes) -> int:
    src = tmp_path / f"plain-{mib}"
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(block)
    enc = tmp_path / f"enc-{mib}"
    encrypt_file(src, enc, key, FileContext("acme", "insurance", VERSION, "big.bin"))
    src.unlink()
    out = tmp_path / f"out-{mib}"
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(enc), str(out), key.hex()],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stat().st_size == mib << 20
    return int(proc.stdout.strip())


def test_decrypt_memory_is_flat_in_file_size(tmp_path: Path, key: bytes) -> None:
    """Decrypting a 160 MiB file peaks at about the same resident memory as a 16 MiB file.

    Threshold: the files differ by 144 MiB, so any buffering proportional to the file would raise the
    peak by well over 100 MiB. Streaming holds two chunk buffers (about 2 MiB for the default 1 MiB
    chunks) whatever the size; allowing 16 MiB of growth leaves room for allocator and interpreter noise
    while still being nine times smaller than the size difference.
    """
    small = _peak_rss_kib(tmp_path, 16, key)
    large = _peak_rss_kib(tmp_path, 160, key)
    assert large - small < 16 * 1024, f"peak RSS grew from {small} KiB to {large} KiB"
