"""Outputs sealed to an X25519 key (dcr_enclave.formats.sealing): round trips, refusals, nothing left half-done."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from dcr_enclave.formats import sealing, streamcrypt, unsealing
from dcr_enclave.formats.errors import DCRError, IntegrityError, LimitError

JOB = "job-" + "ab" * 12
OTHER_JOB = "job-" + "cd" * 12


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    return sealing.generate_keypair()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory like a job's outputs: nested folders, an empty one, an executable, a non-ASCII name."""
    root = tmp_path / "outputs"
    (root / "figures" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "result.csv").write_text("a,b\n1,2\n")
    (root / "figures" / "plot.bin").write_bytes(os.urandom(3 * 2**20 + 17))  # several STREAM chunks
    (root / "figures" / "deep" / "résumé ü.txt").write_text("naïve\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "zero").write_bytes(b"")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, bytes | None, int]]:
    """Every entry under ``root``: kind, content and permission bits."""
    out: dict[str, tuple[str, bytes | None, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_file_round_trip(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    """A multi-chunk file opens to exactly its bytes, owner-only, and the sealed form is not the clear text."""
    sk, pk = keys
    data = os.urandom(2 * 2**20 + 5)
    (tmp_path / "in").write_bytes(data)
    sealing.seal_file(tmp_path / "in", tmp_path / "in.sealed", pk, job_id=JOB)
    assert data[:4096] not in (tmp_path / "in.sealed").read_bytes()
    unsealing.open_file(tmp_path / "in.sealed", tmp_path / "out", sk, job_id=JOB)
    assert (tmp_path / "out").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o600
    assert listing(tmp_path) == ["in", "in.sealed", "out"]


def test_empty_file_round_trip(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    """An empty file seals and opens to an empty file."""
    sk, pk = keys
    (tmp_path / "in").write_bytes(b"")
    sealing.seal_file(tmp_path / "in", tmp_path / "s", pk, job_id=JOB)
    unsealing.open_file(tmp_path / "s", tmp_path / "out", sk, job_id=JOB)
    assert (tmp_path / "out").read_bytes() == b""


def test_public_key_matches_generated_pair(keys: tuple[bytes, bytes]) -> None:
    """The public key derived from a private key is the one generated with it."""
    sk, pk = keys
    assert sealing.public_key(sk) == pk
    assert len(sk) == len(pk) == 32


def test_dir_round_trip(tmp_path: Path, tree: Path, keys: tuple[bytes, bytes]) -> None:
    """A directory opens to the same names, contents, empty folders and executable bits."""
    sk, pk = keys
    sealing.seal_dir(tree, tmp_path / "out.sealed", pk, JOB)
    unsealing.open_dir(tmp_path / "out.sealed", tmp_path / "opened", sk, JOB)
    want = {
        k: (kind, data, 0o755 if kind == "dir" else mode & 0o755)
        for k, (kind, data, mode) in snapshot(tree).items()
    }
    assert snapshot(tmp_path / "opened") == want
    assert listing(tmp_path) == ["opened", "out.sealed", "outputs"]


def test_dir_tar_is_deterministic(tmp_path: Path, tree: Path) -> None:
    """The same tree packs to the same bytes: sorted names, no times, owners or umask in the tar."""
    first = sealing._TarStream(sealing._scan(tree))
    data = first.read()
    assert len(data) == first.size
    os.utime(tree / "result.csv", (1, 1))
    (tree / "result.csv").chmod(0o600)
    assert sealing._TarStream(sealing._scan(tree)).read() == data
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    # Depth first, each directory's entries sorted, a directory before what it holds.
    assert [m.name for m in members] == [
        "empty",
        "figures",
        "figures/deep",
        "figures/deep/résumé ü.txt",
        "figures/plot.bin",
        "result.csv",
        "run.sh",
        "zero",
    ]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert {m.name: m.mode for m in members if not m.isdir()}["result.csv"] == 0o644


def test_two_seals_differ_but_both_open(tmp_path: Path, tree: Path, keys: tuple[bytes, bytes]) -> None:
    """Each seal uses a fresh ephemeral key, so sealing twice gives two different files that both open."""
    sk, pk = keys
    sealing.seal_dir(tree, tmp_path / "a", pk, JOB)
    sealing.seal_dir(tree, tmp_path / "b", pk, JOB)
    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()
    unsealing.open_dir(tmp_path / "b", tmp_path / "opened", sk, JOB)


@pytest.fixture
def sealed(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    data = os.urandom(2**20 + 1234)
    (tmp_path / "plain").write_bytes(data)
    sealing.seal_file(tmp_path / "plain", tmp_path / "sealed", keys[1], job_id=JOB)
    (tmp_path / "plain").unlink()
    return tmp_path / "sealed"


def assert_refused_without_output(sealed: Path, sk: bytes, job_id: str = JOB) -> IntegrityError:
    before = listing(sealed.parent)
    with pytest.raises(IntegrityError) as info:
        unsealing.open_file(sealed, sealed.parent / "out", sk, job_id=job_id)
    assert listing(sealed.parent) == before  # no output, no temporary file
    return info.value


def test_wrong_key_is_refused(sealed: Path) -> None:
    """Another private key cannot open the file; nothing is written."""
    err = assert_refused_without_output(sealed, sealing.generate_keypair()[0])
    assert "another key" in str(err)


def test_wrong_job_id_is_refused(sealed: Path, keys: tuple[bytes, bytes]) -> None:
    """The right key with another job's id does not open it: the job id is bound into the key."""
    assert_refused_without_output(sealed, keys[0], OTHER_JOB)


def test_flipped_byte_is_refused(sealed: Path, keys: tuple[bytes, bytes]) -> None:
    """A flipped bit anywhere (magic, version, kind, either key, STREAM header, a chunk, the last tag) fails."""
    original = sealed.read_bytes()
    size = len(original)
    for offset in (0, 8, 9, 10, 45, sealing.HEADER_SIZE + 3, sealing.HEADER_SIZE + 80, size // 2, size - 1):
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        sealed.write_bytes(bytes(tampered))
        assert_refused_without_output(sealed, keys[0])


def test_truncated_is_refused(sealed: Path, keys: tuple[bytes, bytes]) -> None:
    """A sealed file cut anywhere, including inside its header and at a chunk boundary, fails."""
    original = sealed.read_bytes()
    # sealed header + STREAM header + the first full chunk with its tag
    boundary = (
        sealing.HEADER_SIZE + streamcrypt.HEADER_SIZE + streamcrypt.DEFAULT_CHUNK_SIZE + streamcrypt.TAG_SIZE
    )
    for length in (0, 5, sealing.HEADER_SIZE - 1, sealing.HEADER_SIZE, sealing.HEADER_SIZE + 50, boundary):
        sealed.write_bytes(original[:length])
        assert_refused_without_output(sealed, keys[0])
    sealed.write_bytes(original[:-1])
    assert_refused_without_output(sealed, keys[0])


def test_trailing_bytes_are_refused(sealed: Path, keys: tuple[bytes, bytes]) -> None:
    """Bytes appended after the last chunk are refused."""
    sealed.write_bytes(sealed.read_bytes() + b"\x00")
    assert_refused_without_output(sealed, keys[0])


def test_sealed_file_and_sealed_dir_are_not_interchangeable(
    tmp_path: Path, tree: Path, sealed: Path, keys: tuple[bytes, bytes]
) -> None:
    """A sealed file does not open as a directory, nor a sealed directory as a file."""
    sk, pk = keys
    with pytest.raises(IntegrityError, match="not a sealed tar"):
        unsealing.open_dir(sealed, tmp_path / "d", sk, JOB)
    sealing.seal_dir(tree, tmp_path / "dir.sealed", pk, JOB)
    with pytest.raises(IntegrityError, match="not a sealed file"):
        unsealing.open_file(tmp_path / "dir.sealed", tmp_path / "f", sk, job_id=JOB)
    assert not (tmp_path / "d").exists() and not (tmp_path / "f").exists()


def test_open_dir_refuses_tampering_and_leaves_nothing(
    tmp_path: Path, tree: Path, keys: tuple[bytes, bytes]
) -> None:
    """A tampered, truncated or misaddressed sealed directory leaves no destination and no staging."""
    sk, pk = keys
    sealed = tmp_path / "dir.sealed"
    sealing.seal_dir(tree, sealed, pk, JOB)
    original = sealed.read_bytes()
    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0x01
    cases = [
        (original[:-40], sk, JOB),
        (bytes(flipped), sk, JOB),
        (original, sk, OTHER_JOB),
        (original, sealing.generate_keypair()[0], JOB),
    ]
    for data, key, job in cases:
        sealed.write_bytes(data)
        with pytest.raises(IntegrityError):
            unsealing.open_dir(sealed, tmp_path / "opened", key, job)
        assert listing(tmp_path) == ["dir.sealed", "outputs"]


def _seal_tar(tmp_path: Path, pk: bytes, build: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Seal a hand-made tar, as a compromised sender could."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in build:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    dest = tmp_path / "hostile.sealed"
    sealing._seal_stream(io.BytesIO(raw), len(raw), dest, pk, JOB, sealing.KIND_TAR)
    return dest


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    return ti, None


HOSTILE = {
    "parent": [_file("../evil")],
    "absolute": [_file("/tmp/evil")],
    "nested parent": [_special("a", tarfile.DIRTYPE), _file("a/../../evil")],
    "dot": [_file("./x")],
    "empty part": [_special("a", tarfile.DIRTYPE), _file("a//b")],
    "backslash": [_file("a\\..\\evil")],
    "control char": [_file("x\ny")],
    "symlink": [_special("link", tarfile.SYMTYPE, "/etc/passwd")],
    "hard link": [_file("x"), _special("hl", tarfile.LNKTYPE, "x")],
    "fifo": [_special("fifo", tarfile.FIFOTYPE)],
    "device": [_special("dev", tarfile.CHRTYPE)],
    "duplicate": [_file("x", b"first"), _file("x", b"second")],
    "file under file": [_file("x"), _file("x/y")],
    "missing parent": [_file("nodir/y")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_open_dir_refuses_hostile_members(tmp_path: Path, keys: tuple[bytes, bytes], case: str) -> None:
    """Member names that leave the destination, links, special files and collisions are all refused."""
    sk, pk = keys
    sealed = _seal_tar(tmp_path, pk, HOSTILE[case])
    with pytest.raises(DCRError):
        unsealing.open_dir(sealed, tmp_path / "opened", sk, JOB)
    assert listing(tmp_path) == ["hostile.sealed"]
    assert not (tmp_path.parent / "evil").exists()


def test_open_dir_enforces_limits(tmp_path: Path, tree: Path, keys: tuple[bytes, bytes]) -> None:
    """More members or bytes than the caller allows is a LimitError, and nothing is left."""
    sk, pk = keys
    sealing.seal_dir(tree, tmp_path / "s", pk, JOB)
    with pytest.raises(LimitError):
        unsealing.open_dir(tmp_path / "s", tmp_path / "o", sk, JOB, max_files=3)
    with pytest.raises(LimitError):
        unsealing.open_dir(tmp_path / "s", tmp_path / "o", sk, JOB, max_bytes=2**20)
    assert listing(tmp_path) == ["outputs", "s"]


def test_open_dir_refuses_an_existing_destination(
    tmp_path: Path, tree: Path, keys: tuple[bytes, bytes]
) -> None:
    """Opening never merges into or replaces an existing directory."""
    sk, pk = keys
    sealing.seal_dir(tree, tmp_path / "s", pk, JOB)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("mine")
    with pytest.raises(DCRError, match="already exists"):
        unsealing.open_dir(tmp_path / "s", tmp_path / "o", sk, JOB)
    assert listing(tmp_path / "o") == ["keep"]


def test_seal_dir_refuses_links_and_special_files(
    tmp_path: Path, tree: Path, keys: tuple[bytes, bytes]
) -> None:
    """A symlink or FIFO among the outputs is refused before anything is written."""
    pk = keys[1]
    (tree / "figures" / "link").symlink_to("/etc/passwd")
    with pytest.raises(DCRError, match="symbolic link"):
        sealing.seal_dir(tree, tmp_path / "s", pk, JOB)
    (tree / "figures" / "link").unlink()
    os.mkfifo(tree / "pipe")
    with pytest.raises(DCRError, match="special file"):
        sealing.seal_dir(tree, tmp_path / "s", pk, JOB)
    (tree / "pipe").unlink()
    (tmp_path / "alias").symlink_to(tree)
    with pytest.raises(DCRError, match="not a directory"):
        sealing.seal_dir(tmp_path / "alias", tmp_path / "s", pk, JOB)
    assert listing(tmp_path) == ["alias", "outputs"]


def test_seal_refuses_bad_keys_and_job_ids(tmp_path: Path, keys: tuple[bytes, bytes]) -> None:
    """A malformed or degenerate public key, or a malformed job id, is refused and writes nothing."""
    (tmp_path / "in").write_bytes(b"data")
    for bad_key in (b"short", bytes(32)):
        with pytest.raises(DCRError):
            sealing.seal_file(tmp_path / "in", tmp_path / "s", bad_key, job_id=JOB)
    with pytest.raises(DCRError, match="job id"):
        sealing.seal_file(tmp_path / "in", tmp_path / "s", keys[1], job_id="../job")
    with pytest.raises(DCRError, match="cannot read"):
        sealing.seal_file(tmp_path / "missing", tmp_path / "s", keys[1], job_id=JOB)
    assert listing(tmp_path) == ["in"]


def test_padded_sizes_are_few_and_capped() -> None:
    from dcr_enclave.formats.sealing import pad_json, padded_size

    kib, mib = 2**10, 2**20
    assert [padded_size(n, 50 * mib) for n in (0, 1, 64 * kib, 64 * kib + 1, 3 * mib)] == [
        64 * kib, 64 * kib, 64 * kib, 256 * kib, 4 * mib,
    ]  # fmt: skip
    assert padded_size(20 * mib, 50 * mib) == 50 * mib  # the cap, not 64 MiB
    assert padded_size(60 * mib, 50 * mib) == 60 * mib  # over the cap: its own size
    doc = b'{"a":1}'
    assert json.loads(pad_json(doc, mib)) == {"a": 1} and len(pad_json(doc, mib)) == 64 * kib


def test_a_padded_sealed_directory_opens_to_the_same_files(tmp_path: Path) -> None:
    """Padding is zeros after the tar's end marker: the opened tree is exactly the source."""
    from dcr_enclave.formats.sealing import padded_size, seal_dir
    from dcr_enclave.formats.unsealing import open_dir, open_to_memory, tar_members

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha" * 100)
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    private, public = sealing.generate_keypair()
    job = "job-" + "ab" * 12
    seal_dir(src, tmp_path / "padded", public, job, pad_cap=2**20)
    seal_dir(src, tmp_path / "plain", public, job)
    payload = open_to_memory(tmp_path / "padded", private, job_id=job, tar=True, max_bytes=2**22)
    assert len(payload) == padded_size(
        len(open_to_memory(tmp_path / "plain", private, job_id=job, tar=True, max_bytes=2**22)), 2**20
    )
    assert tar_members(payload, "outputs") == {"a.txt": b"alpha" * 100, "sub/b.bin": bytes(range(256)) * 10}
    open_dir(tmp_path / "padded", tmp_path / "out", private, job)
    assert (tmp_path / "out" / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 10
