"""Tests of the notebook bundle: determinism, every refusal, include/exclude, and the enclave's extraction."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest

from dcr_enclave.formats.bundle import DEFAULT_EXCLUDE, BundleFile, BundleLimits, BundleManifest
from dcr_enclave.formats.digests import canonical_json, sha256_bytes, sha256_json
from dcr_enclave.formats.errors import DCRError, IntegrityError, LimitError
from dcr_enclave.pack import bundle_builder as bundle_mod
from dcr_enclave.pack.bundle_builder import build_bundle, plan_bundle, write_bundle
from dcr_enclave.runtime.bundle_extractor import extract_bundle

# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


def notebook_bytes(source: str = "print('hello')") -> bytes:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(source))
    return nbformat.writes(nb).encode()


#: The regular files of the sample workspace (relative path -> content); run.sh is executable.
SAMPLE: dict[str, bytes] = {
    "nb.ipynb": notebook_bytes(),
    "data/a.csv": b"x,y\n1,2\n",
    "data/sub/b.txt": b"deep\n",
    "data/sub/c.csv": b"c\n",
    "run.sh": b"#!/bin/sh\necho hi\n",
    "é.txt": b"accent\n",
    "a-b.txt": b"dash\n",
    "B.txt": b"upper\n",
    "empty.txt": b"",
}
#: Files DEFAULT_EXCLUDE keeps out.
HIDDEN: dict[str, bytes] = {
    ".env": b"TOKEN=secret\n",
    ".git/config": b"[core]\n",
    "data/.aws/credentials": b"key\n",
    "__pycache__/m.cpython-311.pyc": b"\0\0",
    "data/m.pyc": b"\0",
    ".ipynb_checkpoints/nb-checkpoint.ipynb": notebook_bytes(),
}


def make_workspace(
    root: Path, *, reverse: bool = False, plain_mode: int = 0o644, exec_mode: int = 0o755
) -> Path:
    """Create the sample workspace under ``root`` (files in sorted or reversed creation order)."""
    items = sorted({**SAMPLE, **HIDDEN}.items(), reverse=reverse)
    for rel, content in items:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        p.chmod(exec_mode if rel == "run.sh" else plain_mode)
    (root / "link.csv").symlink_to("data/a.csv")
    return root


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty directory for archives and extractions; tests check it stays empty on refusal."""
    d = tmp_path / "out"
    d.mkdir()
    return d


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def refuse(fn: Callable[[], object], out: Path, *needles: str, exc: type[DCRError] = DCRError) -> DCRError:
    """Run ``fn``, expect ``exc`` whose message names every needle and gives a hint; ``out`` stays empty."""
    with pytest.raises(exc) as info:
        fn()
    err = info.value
    for needle in needles:
        assert needle in err.message, (needle, err.message)
    assert err.hint, f"refusal without advice: {err.message}"
    assert list(out.iterdir()) == []
    return err


def paths(manifest: BundleManifest) -> list[str]:
    return [f.path for f in manifest.files]


# ---------------------------------------------------------------------------------------------------------
# Determinism and the manifest
# ---------------------------------------------------------------------------------------------------------


def test_digest_and_archive_identical_across_copies(tmp_path: Path) -> None:
    """Two copies of a workspace give the same digest and byte-identical archives, whatever their location,
    mtimes, owners, umask, permission bits other than execute, and creation (hence listing) order."""
    one = make_workspace(tmp_path / "one" / "ws")
    with umask(0o077):
        two = make_workspace(
            tmp_path / "two" / "deeper" / "other", reverse=True, plain_mode=0o600, exec_mode=0o700
        )
    for i, p in enumerate(sorted(two.rglob("*"))):
        os.utime(p, (1_000_000 + i, 2_000_000 + i), follow_symlinks=False)
        os.chown(p, 4242, 4343, follow_symlinks=False)
    os.chown(two, 4242, 4343)
    assert (two / "data/a.csv").stat().st_uid != (one / "data/a.csv").stat().st_uid

    m1 = plan_bundle(one / "nb.ipynb")
    m2 = plan_bundle(two / "nb.ipynb")
    assert m1 == m2
    assert m1.digest == m2.digest
    with umask(0o077):
        d2 = write_bundle(m2, two, tmp_path / "two.tar")
    d1 = write_bundle(m1, one, tmp_path / "one.tar")
    assert d1 == d2 == m1.digest
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_digest_follows_content_and_execute_bit(ws: Path) -> None:
    """The digest changes when a file's content changes or its owner-execute bit flips."""
    base = plan_bundle(ws / "nb.ipynb").digest
    (ws / "data/a.csv").write_bytes(b"x,y\n1,3\n")
    changed = plan_bundle(ws / "nb.ipynb").digest
    (ws / "empty.txt").chmod(0o744)
    executable = plan_bundle(ws / "nb.ipynb")
    assert len({base, changed, executable.digest}) == 3
    assert {f.path: f.executable for f in executable.files}["empty.txt"] is True


def test_manifest_contents_sorted_by_utf8_bytes(ws: Path) -> None:
    """The manifest lists each selected file once with its size and sha256, sorted by UTF-8 bytes; the
    digest is the sha256 of the manifest's canonical JSON."""
    m = plan_bundle(ws / "nb.ipynb")
    assert paths(m) == sorted([*SAMPLE, "link.csv"], key=lambda p: p.encode())
    by_path = {f.path: f for f in m.files}
    for rel, content in SAMPLE.items():
        assert by_path[rel].size == len(content)
        assert by_path[rel].sha256 == sha256_bytes(content)
        assert by_path[rel].executable is (rel == "run.sh")
    assert m.notebook == "nb.ipynb"
    assert m.total_bytes == sum(len(c) for c in SAMPLE.values()) + len(SAMPLE["data/a.csv"])
    doc = m.to_json()
    assert doc["schema"] == "dcr/bundle/v1"
    assert m.digest == sha256_json(doc)
    assert BundleManifest.from_json(json.loads(canonical_json(doc))) == m


def test_archive_layout_is_deterministic_tar(ws: Path, out: Path) -> None:
    """The archive is a tar with bundle.json (the canonical manifest) first, then files/<path> in manifest
    order, every header with mtime 0, uid/gid 0, empty owner names and mode 0644 or 0755."""
    m = build_bundle(ws / "nb.ipynb", out / "b.tar")
    with tarfile.open(out / "b.tar") as tf:
        members = tf.getmembers()
        assert [x.name for x in members] == ["bundle.json"] + ["files/" + p for p in paths(m)]
        manifest_member = tf.extractfile(members[0])
        assert manifest_member is not None
        assert manifest_member.read() == canonical_json(m.to_json())
        for x, f in zip(members[1:], m.files, strict=True):
            assert x.isreg() and x.size == f.size
            assert x.mode == (0o755 if f.executable else 0o644)
    for x in members:
        assert (x.mtime, x.uid, x.gid, x.uname, x.gname) == (0, 0, 0, "", "")
    assert [p.name for p in out.iterdir()] == ["b.tar"]


def test_workspace_argument_and_relative_notebook(ws: Path) -> None:
    """With a workspace given, the notebook may be relative to it or absolute inside it; the manifest
    names it relative to the workspace."""
    (ws / "data/sub/nb2.ipynb").write_bytes(notebook_bytes("1"))
    a = plan_bundle(Path("data/sub/nb2.ipynb"), ws)
    b = plan_bundle(ws / "data/sub/nb2.ipynb", ws)
    c = plan_bundle(ws / "data/sub/nb2.ipynb")
    assert a == b
    assert a.notebook == "data/sub/nb2.ipynb"
    assert c.notebook == "nb2.ipynb"
    assert paths(c) == sorted(["b.txt", "c.csv", "nb2.ipynb"])


def test_from_json_refuses_schema_violations(ws: Path) -> None:
    """from_json refuses documents the schema forbids: unknown fields, wrong schema id, bad digests."""
    doc = plan_bundle(ws / "nb.ipynb").to_json()
    for bad in (
        {**doc, "extra": 1},
        {**doc, "schema": "dcr/bundle/v2"},
        {**doc, "files": [{**doc["files"][0], "sha256": "md5:00"}, *doc["files"][1:]]},
        {**doc, "files": [{**doc["files"][0], "size": -1}, *doc["files"][1:]]},
        {**doc, "notebook": "nb.py"},
    ):
        with pytest.raises(IntegrityError, match="bundle manifest is invalid"):
            BundleManifest.from_json(bad)


# ---------------------------------------------------------------------------------------------------------
# Include and exclude
# ---------------------------------------------------------------------------------------------------------


def test_default_exclude_keeps_hidden_checkpoints_and_bytecode_out(ws: Path) -> None:
    """By default hidden files and directories (at any depth), checkpoints, __pycache__ and *.pyc are left
    out, and nothing inside a hidden directory is inspected (a FIFO or outside link there is ignored)."""
    os.mkfifo(ws / ".git" / "fifo")
    (ws / "data" / ".aws" / "out").symlink_to("/etc")
    m = plan_bundle(ws / "nb.ipynb")
    assert set(paths(m)) == {*SAMPLE, "link.csv"}
    assert not set(paths(m)) & set(HIDDEN)
    assert {".ipynb_checkpoints", "__pycache__", "*.pyc"} <= set(DEFAULT_EXCLUDE)


def test_include_patterns_select_files_and_the_notebook_always(ws: Path) -> None:
    """Include patterns select files (a pattern without '/' at any depth, '**' across directories); the
    notebook is always included."""
    assert paths(plan_bundle(ws / "nb.ipynb", include=("data/*.csv",))) == ["data/a.csv", "nb.ipynb"]
    assert paths(plan_bundle(ws / "nb.ipynb", include=("*.csv",))) == [
        "data/a.csv",
        "data/sub/c.csv",
        "link.csv",
        "nb.ipynb",
    ]
    assert paths(plan_bundle(ws / "nb.ipynb", include=("**/b.txt",))) == ["data/sub/b.txt", "nb.ipynb"]
    assert paths(plan_bundle(ws / "nb.ipynb", include=("data/sub",))) == [
        "data/sub/b.txt",
        "data/sub/c.csv",
        "nb.ipynb",
    ]
    assert paths(plan_bundle(ws / "nb.ipynb", include=())) == ["nb.ipynb"]


def test_include_prunes_directories_it_cannot_match(ws: Path) -> None:
    """A directory link or FIFO where no include pattern can reach is not inspected, hence not refused."""
    (ws / "elsewhere").mkdir()
    (ws / "elsewhere" / "dirlink").symlink_to("/etc")
    os.mkfifo(ws / "elsewhere" / "fifo")
    assert paths(plan_bundle(ws / "nb.ipynb", include=("data/**",))) == [
        "data/a.csv",
        "data/sub/b.txt",
        "data/sub/c.csv",
        "nb.ipynb",
    ]


def test_exclude_patterns_remove_files_and_subtrees(ws: Path) -> None:
    """Exclude patterns remove matching files and whole directories; the caller's list replaces the
    default one."""
    m = plan_bundle(ws / "nb.ipynb", exclude=(*DEFAULT_EXCLUDE, "data/sub", "*.txt"))
    assert paths(m) == ["data/a.csv", "link.csv", "nb.ipynb", "run.sh"]
    m = plan_bundle(
        ws / "nb.ipynb", include=("data/**",), exclude=("__pycache__", "*.pyc", ".ipynb_checkpoints")
    )
    assert "data/.aws/credentials" in paths(m)


def test_file_link_inside_workspace_carries_target_content(ws: Path) -> None:
    """A link to a file inside the workspace is bundled under the link's name with the target's content
    and execute bit; extraction produces a regular file."""
    (ws / "tool").symlink_to("run.sh")
    m = plan_bundle(ws / "nb.ipynb")
    by_path = {f.path: f for f in m.files}
    assert by_path["link.csv"].sha256 == sha256_bytes(SAMPLE["data/a.csv"])
    assert by_path["tool"].executable is True
    assert by_path["tool"].sha256 == by_path["run.sh"].sha256


# ---------------------------------------------------------------------------------------------------------
# Refusals while planning and writing: each names the problem and writes nothing
# ---------------------------------------------------------------------------------------------------------


def test_refuses_dotdot_in_notebook_argument(ws: Path, out: Path) -> None:
    """A notebook argument with '..' is refused."""
    refuse(
        lambda: build_bundle(Path("data/../nb.ipynb"), out / "b.tar", ws), out, "'data/../nb.ipynb'", "'..'"
    )


def test_refuses_notebook_outside_workspace(ws: Path, out: Path, tmp_path: Path) -> None:
    """A notebook outside the given workspace is refused."""
    other = tmp_path / "other.ipynb"
    other.write_bytes(notebook_bytes())
    refuse(lambda: build_bundle(other, out / "b.tar", ws), out, str(other), "outside the workspace")


def test_refuses_notebook_behind_directory_link_leaving_workspace(
    ws: Path, out: Path, tmp_path: Path
) -> None:
    """A relative notebook path that resolves outside the workspace through a directory link is refused."""
    (tmp_path / "far").mkdir()
    (tmp_path / "far" / "nb.ipynb").write_bytes(notebook_bytes())
    (ws / "far").symlink_to(tmp_path / "far")
    refuse(lambda: build_bundle(Path("far/nb.ipynb"), out / "b.tar", ws), out, "far/nb.ipynb", "outside")


@pytest.mark.parametrize(
    ("option", "pattern", "needle"),
    [
        ("include", "/etc/*", "absolute"),
        ("exclude", "/data", "absolute"),
        ("include", "../secrets/*", "'..'"),
        ("exclude", "data/../x", "'..'"),
    ],
)
def test_refuses_absolute_or_dotdot_patterns(
    ws: Path, out: Path, option: str, pattern: str, needle: str
) -> None:
    """Include and exclude patterns that are absolute or contain '..' are refused, naming the pattern."""
    refuse(
        lambda: build_bundle(ws / "nb.ipynb", out / "b.tar", **{option: (pattern,)}),  # type: ignore[arg-type]
        out,
        repr(pattern),
        needle,
        option,
    )


def test_refuses_file_link_leaving_workspace(ws: Path, out: Path, tmp_path: Path) -> None:
    """A link to a file outside the workspace is refused, naming the link and its target."""
    (tmp_path / "secret.txt").write_text("s")
    (ws / "data" / "leak.txt").symlink_to(tmp_path / "secret.txt")
    refuse(
        lambda: build_bundle(ws / "nb.ipynb", out / "b.tar"), out, "'data/leak.txt'", "outside the workspace"
    )


def test_refuses_directory_link(ws: Path, out: Path) -> None:
    """A link to a directory, even one inside the workspace, is refused."""
    (ws / "alias").symlink_to("data")
    refuse(lambda: build_bundle(ws / "nb.ipynb", out / "b.tar"), out, "'alias'", "link to a directory")


def test_refuses_directory_link_leaving_workspace(ws: Path, out: Path) -> None:
    """A link to a directory outside the workspace is refused as leaving the workspace."""
    (ws / "etc").symlink_to("/etc")
    refuse(lambda: build_bundle(ws / "nb.ipynb", out / "b.tar"), out, "'etc'", "outside the workspace")


def test_refuses_dangling_link(ws: Path, out: Path) -> None:
    """A link to nothing is refused, naming the link."""
    (ws / "gone.csv").symlink_to("missing.csv")
    refuse(lambda: build_bundle(ws / "nb.ipynb", out / "b.tar"), out, "'gone.csv'", "does not exist")


def test_refuses_link_to_excluded_file(ws: Path, out: Path) -> None:
    """A link that would smuggle an excluded file (here .env) in under another name is refused."""
    (ws / "settings.txt").symlink_to(".env")
    refuse(lambda: build_bundle(ws / "nb.ipynb", out / "b.tar"), out, "'settings.txt'", "'.env'", "excluded")


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_refuses_special_files(ws: Path, out: Path, kind: str) -> None:
    """FIFOs, sockets and device nodes in the selection are refused, naming the path and its kind."""
    target = ws / "data" / "special"
    with contextlib_socket(kind, target):
        refuse(
            lambda: build_bundle(ws / "nb.ipynb", out / "b.tar"),
            out,
            "'data/special'",
            {"fifo": "FIFO", "socket": "socket", "device": "device"}[kind],
        )


@contextmanager
def contextlib_socket(kind: str, path: Path) -> Iterator[None]:
    """Create a special file of ``kind`` at ``path`` for the duration of the block."""
    if kind == "fifo":
        os.mkfifo(path)
        yield
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(path))
            yield
    else:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        yield


def test_refuses_names_that_are_not_utf8(ws: Path, out: Path) -> None:
    """A file name that is not valid UTF-8 is refused, shown as bytes."""
    fd = os.open(os.fsencode(ws / "data") + b"/bad\xff.csv", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    refuse(lambda: build_bundle(ws / "nb.ipynb", out / "b.tar"), out, "bad\\xff.csv", "not valid UTF-8")


def test_refuses_too_many_files_before_hashing(ws: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More files than max_files is a LimitError raised while walking, before any file is read."""
    monkeypatch.setattr(bundle_mod, "copy_hashed", _must_not_hash)
    monkeypatch.setattr(bundle_mod, "_read_notebook", _must_not_hash)
    err = refuse(
        lambda: build_bundle(ws / "nb.ipynb", out / "b.tar", limits=BundleLimits(max_files=3)),
        out,
        "more than 3 files",
        exc=LimitError,
    )
    assert "max_files" in (err.hint or "")


def test_refuses_too_many_bytes_before_hashing(ws: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More bytes than max_bytes is a LimitError raised while walking, before any file is read."""
    monkeypatch.setattr(bundle_mod, "copy_hashed", _must_not_hash)
    monkeypatch.setattr(bundle_mod, "_read_notebook", _must_not_hash)
    (ws / "data" / "big.bin").write_bytes(b"\0" * 5000)
    err = refuse(
        lambda: build_bundle(ws / "nb.ipynb", out / "b.tar", limits=BundleLimits(max_bytes=4096)),
        out,
        "more than 4096 bytes",
        "data/big.bin",
        exc=LimitError,
    )
    assert "max_bytes" in (err.hint or "")


def _must_not_hash(*args: object, **kwargs: object) -> None:
    raise AssertionError("a file was read although a limit was already exceeded")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("nb.py", b"print(1)\n", "not a notebook"),
        ("nb.ipynb", b"{not json", "is not JSON"),
        (
            "nb.ipynb",
            json.dumps({"nbformat": 3, "nbformat_minor": 0, "worksheets": []}).encode(),
            "version 4",
        ),
        (
            "nb.ipynb",
            json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": "x"}).encode(),
            "not a valid version 4 notebook",
        ),
        (
            "nb.ipynb",
            json.dumps(
                {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{"cell_type": "nonsense"}]}
            ).encode(),
            "not a valid version 4 notebook",
        ),
    ],
)
def test_refuses_invalid_notebooks(tmp_path: Path, out: Path, name: str, content: bytes, needle: str) -> None:
    """A target that is not an .ipynb, not JSON, not version 4, or fails nbformat.validate is refused."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / name).write_bytes(content)
    refuse(lambda: build_bundle(tmp_path / "w" / name, out / "b.tar"), out, name, needle)


def test_refuses_excluded_notebook(ws: Path, out: Path) -> None:
    """A notebook matched by an exclude pattern (here inside a hidden directory) is refused."""
    (ws / ".hidden").mkdir()
    (ws / ".hidden" / "nb.ipynb").write_bytes(notebook_bytes())
    refuse(
        lambda: build_bundle(Path(".hidden/nb.ipynb"), out / "b.tar", ws),
        out,
        "'.hidden/nb.ipynb'",
        "excluded by pattern '.*'",
    )


def test_refuses_missing_notebook(ws: Path, out: Path) -> None:
    """A notebook that does not exist is refused, naming it."""
    refuse(lambda: build_bundle(ws / "none.ipynb", out / "b.tar"), out, "none.ipynb", "does not exist")


@pytest.mark.parametrize("change", ["content", "size", "removed", "executable", "linked-out"])
def test_write_refuses_workspace_changed_since_planning(
    ws: Path, out: Path, tmp_path: Path, change: str
) -> None:
    """write_bundle re-hashes every file and refuses, writing nothing, if the workspace changed since
    planning."""
    m = plan_bundle(ws / "nb.ipynb")
    target = ws / "data" / "a.csv"
    if change == "content":
        target.write_bytes(b"x,y\n9,9\n")
    elif change == "size":
        target.write_bytes(b"x,y\n1,2\n3,4\n")
    elif change == "removed":
        target.unlink()
    elif change == "executable":
        target.chmod(0o755)
    else:
        (tmp_path / "a.csv").write_bytes(SAMPLE["data/a.csv"])
        target.unlink()
        target.symlink_to(tmp_path / "a.csv")
    refuse(
        lambda: write_bundle(m, ws, out / "b.tar"),
        out,
        "'data/a.csv'",
        "changed since the bundle was planned",
    )


# ---------------------------------------------------------------------------------------------------------
# Extraction: round trip
# ---------------------------------------------------------------------------------------------------------


def test_extract_round_trip(ws: Path, tmp_path: Path) -> None:
    """An archive extracts to exactly the planned files with their contents and 0644/0755 modes, whatever
    the umask, and returns the same manifest."""
    m = build_bundle(ws / "nb.ipynb", tmp_path / "b.tar")
    dest = tmp_path / "x" / "work"
    dest.parent.mkdir()
    with umask(0o077):
        got = extract_bundle(tmp_path / "b.tar", dest, expected_digest=m.digest)
    assert got == m
    assert sorted(p.name for p in dest.parent.iterdir()) == ["work"]
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == sorted(paths(m))
    for f in m.files:
        p = dest / f.path
        assert not p.is_symlink()
        assert sha256_bytes(p.read_bytes()) == f.sha256
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if f.executable else 0o644)
    assert (dest / "link.csv").read_bytes() == SAMPLE["data/a.csv"]
    for d in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_extract_refuses_existing_destination(ws: Path, tmp_path: Path) -> None:
    """Extraction never writes into an existing destination."""
    m = build_bundle(ws / "nb.ipynb", tmp_path / "b.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DCRError, match="already exists"):
        extract_bundle(tmp_path / "b.tar", dest, expected_digest=m.digest)
    assert list(dest.iterdir()) == []


def test_extract_refuses_wrong_digest(ws: Path, tmp_path: Path, out: Path) -> None:
    """An archive whose manifest digest is not the expected one is refused and nothing is extracted."""
    build_bundle(ws / "nb.ipynb", tmp_path / "b.tar")
    other = sha256_bytes(b"another bundle")
    refuse(
        lambda: extract_bundle(tmp_path / "b.tar", out / "work", expected_digest=other),
        out,
        other,
        "not the expected",
        exc=IntegrityError,
    )
    with pytest.raises(DCRError, match="not a digest"):
        extract_bundle(tmp_path / "b.tar", out / "work", expected_digest="sha256:xyz")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Extraction: hostile archives, crafted by hand
# ---------------------------------------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]

HOSTILE_FILES: dict[str, bytes] = {"nb.ipynb": notebook_bytes(), "a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}


def reg(name: str, data: bytes, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def special(name: str, type_: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    info.mode = 0o644
    return info, b""


def manifest_for(files: dict[str, bytes], notebook: str = "nb.ipynb") -> BundleManifest:
    entries = [BundleFile(p, len(c), sha256_bytes(c), False) for p, c in files.items()]
    return BundleManifest(notebook, tuple(sorted(entries, key=lambda f: f.path.encode())))


def legit(files: dict[str, bytes] = HOSTILE_FILES) -> tuple[BundleManifest, list[Member]]:
    m = manifest_for(files)
    members = [reg("bundle.json", canonical_json(m.to_json()))]
    members += [reg("files/" + f.path, files[f.path]) for f in m.files]
    return m, members


def write_tar(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def raw_manifest_member(doc: object) -> tuple[Member, str]:
    """A manifest member with arbitrary (canonical) content, and the digest that makes it 'expected'."""
    raw = canonical_json(doc)
    return reg("bundle.json", raw), sha256_bytes(raw)


def test_crafted_legitimate_archive_extracts(tmp_path: Path, out: Path) -> None:
    """The hand-crafting helpers produce an archive extract_bundle accepts (so refusals below are due to
    the one thing each test changes)."""
    m, members = legit()
    extract_bundle(write_tar(tmp_path / "a.tar", members), out / "work", expected_digest=m.digest)
    assert (out / "work" / "sub" / "b.txt").read_bytes() == HOSTILE_FILES["sub/b.txt"]


def hostile_cases() -> list[tuple[str, Callable[[list[Member]], list[Member]], str, type[DCRError]]]:
    def replace(i: int, member: Member) -> Callable[[list[Member]], list[Member]]:
        return lambda ms: [*ms[:i], member, *ms[i + 1 :]]

    # legit() order: bundle.json, files/a.txt, files/nb.ipynb, files/sub/b.txt
    return [
        ("absolute-name", replace(1, reg("/files/a.txt", b"alpha\n")), "absolute name", IntegrityError),
        ("dotdot-name", replace(1, reg("files/../../a.txt", b"alpha\n")), "'..'", IntegrityError),
        (
            "dotted-prefix",
            replace(1, reg("./files/a.txt", b"alpha\n")),
            "where the manifest says",
            IntegrityError,
        ),
        (
            "symlink",
            replace(1, special("files/a.txt", tarfile.SYMTYPE, "/etc/passwd")),
            "is a link",
            IntegrityError,
        ),
        (
            "hardlink",
            replace(1, special("files/a.txt", tarfile.LNKTYPE, "bundle.json")),
            "is a link",
            IntegrityError,
        ),
        ("char-device", replace(1, special("files/a.txt", tarfile.CHRTYPE)), "is a device", IntegrityError),
        ("block-device", replace(1, special("files/a.txt", tarfile.BLKTYPE)), "is a device", IntegrityError),
        ("fifo", replace(1, special("files/a.txt", tarfile.FIFOTYPE)), "FIFO", IntegrityError),
        (
            "directory",
            lambda ms: [ms[0], special("files/sub", tarfile.DIRTYPE), *ms[1:]],
            "not a plain",
            IntegrityError,
        ),
        ("reordered", lambda ms: [ms[0], ms[2], ms[1], ms[3]], "where the manifest says", IntegrityError),
        ("duplicate", lambda ms: [*ms[:2], ms[1], *ms[2:]], "where the manifest says", IntegrityError),
        ("extra-at-end", lambda ms: [*ms, reg("files/zzz.txt", b"z")], "after the last file", IntegrityError),
        ("missing", lambda ms: ms[:-1], "ends before member", IntegrityError),
        ("size-differs", replace(1, reg("files/a.txt", b"alpha!\n")), "the manifest says 6", IntegrityError),
        ("hash-differs", replace(1, reg("files/a.txt", b"ALPHA\n")), "has sha256", IntegrityError),
        ("mode-differs", replace(1, reg("files/a.txt", b"alpha\n", 0o4755)), "mode", IntegrityError),
        ("manifest-not-first", lambda ms: [ms[1], ms[0], *ms[2:]], "not 'bundle.json'", IntegrityError),
        ("no-manifest", lambda ms: ms[1:], "not 'bundle.json'", IntegrityError),
        ("empty", lambda ms: [], "bundle archive", IntegrityError),
    ]


@pytest.mark.parametrize(
    ("case", "mutate", "needle", "exc"), hostile_cases(), ids=[c[0] for c in hostile_cases()]
)
def test_extract_refuses_hostile_archive(
    tmp_path: Path,
    out: Path,
    case: str,
    mutate: Callable[[list[Member]], list[Member]],
    needle: str,
    exc: type[DCRError],
) -> None:
    """Each hostile archive class (bad names, links, devices, FIFOs, directories, reordered, duplicate,
    extra or missing members, wrong sizes, hashes or modes, no manifest first) is refused and leaves
    nothing behind."""
    m, members = legit()
    archive = write_tar(tmp_path / f"{case}.tar", mutate(members))
    refuse(lambda: extract_bundle(archive, out / "work", expected_digest=m.digest), out, needle, exc=exc)


@pytest.mark.parametrize(
    ("case", "mutate", "needle"),
    [
        ("unsorted", lambda fs: list(reversed(fs)), "out of order"),
        ("duplicate", lambda fs: [fs[0], *fs], "duplicated"),
        ("absolute", lambda fs: [{**fs[0], "path": "/etc/cron.d/x"}, *fs[1:]], "bundle manifest is invalid"),
        ("dotdot", lambda fs: [{**fs[0], "path": "../../x"}, *fs[1:]], "bundle manifest is invalid"),
        (
            "file-and-dir",
            lambda fs: [*fs[:2], {**fs[0], "path": "sub"}, *fs[2:]],
            "as a file and as the directory",
        ),
    ],
)
def test_extract_refuses_manifest_breaking_invariants(
    tmp_path: Path,
    out: Path,
    case: str,
    mutate: Callable[[list[dict[str, object]]], list[object]],
    needle: str,
) -> None:
    """A manifest that matches the expected digest but breaks the invariants (sorted, unique, safe relative
    paths, no file where a directory must be) is refused before anything is written."""
    m, members = legit()
    doc = m.to_json()
    doc["files"] = mutate(doc["files"])
    member, digest = raw_manifest_member(doc)
    archive = write_tar(tmp_path / f"{case}.tar", [member, *members[1:]])
    refuse(
        lambda: extract_bundle(archive, out / "work", expected_digest=digest), out, needle, exc=IntegrityError
    )


def test_extract_refuses_manifest_without_notebook_among_files(tmp_path: Path, out: Path) -> None:
    """A manifest whose notebook is not one of its files is refused."""
    m, members = legit()
    doc = {**m.to_json(), "notebook": "other.ipynb"}
    member, digest = raw_manifest_member(doc)
    archive = write_tar(tmp_path / "a.tar", [member, *members[1:]])
    refuse(
        lambda: extract_bundle(archive, out / "work", expected_digest=digest),
        out,
        "not one of the files",
        exc=IntegrityError,
    )


def test_extract_refuses_non_canonical_manifest(tmp_path: Path, out: Path) -> None:
    """A manifest whose bytes are not its canonical JSON is refused even when those bytes have the expected
    digest: a bundle has exactly one manifest encoding."""
    m, members = legit()
    raw = json.dumps(m.to_json(), indent=1).encode()
    archive = write_tar(tmp_path / "a.tar", [reg("bundle.json", raw), *members[1:]])
    refuse(
        lambda: extract_bundle(archive, out / "work", expected_digest=sha256_bytes(raw)),
        out,
        "canonical",
        exc=IntegrityError,
    )


@pytest.mark.parametrize(
    ("limits", "needle"), [(BundleLimits(max_files=2), "3 files"), (BundleLimits(max_bytes=10), "bytes")]
)
def test_extract_refuses_over_limits(tmp_path: Path, out: Path, limits: BundleLimits, needle: str) -> None:
    """A bundle over the extraction limits (files or bytes) is refused from its manifest, before any file
    is written."""
    m, members = legit()
    archive = write_tar(tmp_path / "a.tar", members)
    refuse(
        lambda: extract_bundle(archive, out / "work", expected_digest=m.digest, limits=limits),
        out,
        needle,
        exc=LimitError,
    )


def test_extract_refuses_invalid_notebook_in_archive(tmp_path: Path, out: Path) -> None:
    """An archive whose notebook is not a valid notebook is refused after the checks and removed."""
    m, members = legit({**HOSTILE_FILES, "nb.ipynb": b"{}"})
    archive = write_tar(tmp_path / "a.tar", members)
    refuse(
        lambda: extract_bundle(archive, out / "work", expected_digest=m.digest), out, "nb.ipynb", "version 4"
    )


@pytest.mark.parametrize("case", ["not-tar", "gzip", "truncated"])
def test_extract_refuses_malformed_archives(tmp_path: Path, out: Path, case: str) -> None:
    """Bytes that are not an uncompressed tar, a compressed bundle, and a truncated bundle are refused."""
    m, members = legit({**HOSTILE_FILES, "big.bin": os.urandom(20000)})
    good = write_tar(tmp_path / "good.tar", members).read_bytes()
    data = {
        "not-tar": os.urandom(4096),
        "gzip": gzip.compress(good),
        "truncated": good[: 512 * 8],
    }[case]
    archive = tmp_path / "bad.tar"
    archive.write_bytes(data)
    refuse(
        lambda: extract_bundle(archive, out / "work", expected_digest=m.digest),
        out,
        "bundle archive",
        exc=IntegrityError,
    )


def test_extract_leaves_nothing_when_failing_late(tmp_path: Path, out: Path) -> None:
    """A failure at the last member removes the files already extracted (no partial directory remains)."""
    m, members = legit()
    members[-1] = reg(members[-1][0].name, b"BETA\n")
    archive = write_tar(tmp_path / "a.tar", members)
    refuse(
        lambda: extract_bundle(archive, out / "work", expected_digest=m.digest),
        out,
        "sub/b.txt",
        exc=IntegrityError,
    )
