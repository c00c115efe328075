"""Notebook bundles: a deterministic, content-addressed snapshot of a notebook and its workspace.

A bundle is what the enclave runs: the notebook plus the workspace files it needs, named by one digest.
The **manifest** lists the notebook's path and every file (POSIX path relative to the workspace, size,
sha256, executable bit), sorted by the UTF-8 bytes of the paths; the bundle digest is the sha256 of the
manifest's canonical JSON. The same workspace gives the same digest on every machine: nothing depends on
mtimes, owners, permission bits other than the owner's execute bit, the umask, directory listing order or
where the workspace lives.

The **archive** is a plain (uncompressed) POSIX tar: ``bundle.json`` (the canonical manifest) first, then
``files/<path>`` in manifest order, every header with mtime 0, uid/gid 0, empty owner names and mode 0644
or 0755. The same manifest and contents give the same archive bytes.

Two sides:

* the user's side (:func:`plan_bundle`, :func:`write_bundle`, :func:`build_bundle`) walks the workspace,
  refuses what must not travel (links leaving the workspace, directory links, special files, names that
  are not UTF-8, more files or bytes than the limits) and hashes every file with memory flat in its size;
* the enclave's side (:func:`extract_bundle`) trusts nothing in the archive: it checks the manifest against
  the digest it was launched with, requires exactly the manifest's members in order, each a regular file
  of the declared size and hash, and extracts into a fresh directory that appears only on success.

Include and exclude patterns are globs over workspace-relative POSIX paths: ``*``, ``?`` and ``[...]``
match within one path component, ``**`` matches any number of components; a pattern without ``/``
matches a file or directory of that name at any depth; a pattern that matches a directory selects (or
excludes) everything under it. Excluded directories are never entered.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, cast

import nbformat

from .digests import DIGEST_RE, canonical_json, check_digest, sha256_bytes, sha256_json
from .errors import DCRError, IntegrityError, LimitError
from .jsonschemas import validate

#: The manifest's ``schema`` value; a different layout gets a new one.
BUNDLE_SCHEMA: Final = "dcr/bundle/v1"
#: Name of the manifest member, the archive's first.
MANIFEST_MEMBER: Final = "bundle.json"
#: Prefix of every file member: ``files/<path>``.
FILES_PREFIX: Final = "files/"
#: Linux limits on a path and on one of its components, in UTF-8 bytes.
MAX_PATH_BYTES: Final = 4096
MAX_NAME_BYTES: Final = 255
#: Hidden files and directories (they often hold credentials: .git, .env, .ssh, .aws, .jupyter), notebook
#: checkpoints and Python byte code.
DEFAULT_EXCLUDE: tuple[str, ...] = (".*", ".ipynb_checkpoints", "__pycache__", "*.pyc")

_READ_SIZE = 1 << 20
_MODE_PLAIN = 0o644
_MODE_EXEC = 0o755
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# ASCII paths whose components do not start with '.' (so are never '.' or '..'), at most 255 bytes each.
_PLAIN_PATH_RE = re.compile(
    r"[^\x00-\x1f\x7f/.][^\x00-\x1f\x7f/]{0,254}(?:/[^\x00-\x1f\x7f/.][^\x00-\x1f\x7f/]{0,254})*"
)
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_REPLAN = "plan the bundle again"
_NOT_OURS = "the archive was not written by write_bundle or was altered; build the bundle again"
# Everything tarfile and the JSON decoder may raise on malformed input; all of it means "not a bundle".
_MALFORMED = (tarfile.TarError, EOFError, ValueError, UnicodeError, OverflowError, RecursionError)


class _Reader(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


@dataclass(frozen=True)
class BundleLimits:
    """Upper bounds on a bundle, enforced while planning (before hashing) and before extracting."""

    max_files: int = 2000
    #: Total bytes of all files.
    max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DCRError(f"bundle limit {name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle."""

    path: str
    size: int
    sha256: str
    executable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "executable": self.executable}


@dataclass(frozen=True)
class BundleManifest:
    """The notebook's path and the bundle's files; valid by construction (see :func:`_check_manifest`)."""

    notebook: str
    files: tuple[BundleFile, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))
        _check_manifest(self.notebook, self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": BUNDLE_SCHEMA,
            "notebook": self.notebook,
            "files": [f.to_json() for f in self.files],
        }

    @cached_property
    def digest(self) -> str:
        """The bundle digest: sha256 of the manifest's canonical JSON."""
        return sha256_json(self.to_json())

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_json(cls, doc: Any) -> BundleManifest:
        """Parse a manifest document, refusing anything the schema or the invariants do not allow."""
        validate(
            doc,
            "bundle.schema.json",
            "bundle manifest",
            error=IntegrityError,
            hint="bundles are made by dcr_enclave.bundle; build it again",
        )
        files = tuple(
            BundleFile(path=f["path"], size=f["size"], sha256=f["sha256"], executable=f["executable"])
            for f in doc["files"]
        )
        return cls(notebook=doc["notebook"], files=files)


# ---------------------------------------------------------------------------------------------------------
# Paths and patterns
# ---------------------------------------------------------------------------------------------------------


def _show(path: str) -> str:
    """A path for a message: quoted, and with undecodable bytes shown as bytes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return repr(os.fsencode(path))
    return repr(path)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _sort_key(path: str) -> bytes:
    return path.encode("utf-8")


def _path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file in a bundle, or None if it can."""
    if path.isascii() and len(path) <= MAX_PATH_BYTES and _PLAIN_PATH_RE.fullmatch(path):
        return None  # the common case, decided by one regex
    if not path:
        return "it is empty"
    if path.startswith("/"):
        return "it is absolute"
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > MAX_PATH_BYTES:
        return f"it is longer than {MAX_PATH_BYTES} bytes"
    if _CONTROL_RE.search(path):
        return "it contains a control character"
    for part in path.split("/"):
        if part == "":
            return "it has an empty component (a doubled or trailing '/')"
        if part in (".", ".."):
            return f"it has a {part!r} component"
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return f"a component is longer than {MAX_NAME_BYTES} bytes"
    return None


class _Pattern:
    """A compiled glob over path components: an NFA whose states are bit masks of positions in ``parts``.

    Bit ``i`` set means "the first ``i`` parts have matched"; bit ``len(parts)`` means the whole pattern
    has. Transitions are cached per state mask, so a step costs one regex match per literal part live in
    that mask, whatever the depth of the path: this keeps the walk cheap for large workspaces.
    """

    def __init__(self, text: str, parts: tuple[str, ...]) -> None:
        self.text = text
        self.parts = parts
        n = len(parts)
        self._match = [None if part == "**" else re.compile(fnmatch.translate(part)).match for part in parts]
        # closure[i]: position i, and the positions after it reachable by "**" matching no component.
        closure = [0] * (n + 1)
        closure[n] = 1 << n
        for i in range(n - 1, -1, -1):
            closure[i] = (1 << i) | (closure[i + 1] if parts[i] == "**" else 0)
        self._closure = closure
        self.start = closure[0]
        self.done = 1 << n
        self._transitions: dict[int, tuple[int, tuple[tuple[Callable[[str], object], int], ...]]] = {}

    def step(self, states: int, comp: str) -> int:
        t = self._transitions.get(states)
        if t is None:
            t = self._transitions[states] = self._compute(states)
        mask, moves = t
        for match, target in moves:
            if match(comp) is not None:
                mask |= target
        return mask

    def _compute(self, states: int) -> tuple[int, tuple[tuple[Callable[[str], object], int], ...]]:
        always = 0
        moves = []
        for i, match in enumerate(self._match):
            if states >> i & 1:
                if match is None:
                    always |= self._closure[i]  # "**" consumes the component and stays
                else:
                    moves.append((match, self._closure[i + 1]))
        return always, tuple(moves)

    def full(self, states: int) -> bool:
        """The path consumed so far matches the pattern."""
        return bool(states & self.done)

    def partial(self, states: int) -> bool:
        """The pattern could still match a path below the one consumed so far."""
        return bool(states & (self.done - 1))

    def matches(self, comps: Sequence[str]) -> bool:
        states = self.start
        for comp in comps:
            states = self.step(states, comp)
        return self.full(states)


def check_patterns(patterns: Iterable[str], what: str) -> list[str]:
    """The patterns as a list if every one is acceptable, else :class:`DCRError` naming the first bad one.

    For configuration checks done before any bundle is built (the server extension's traits).
    """
    return [p.text for p in _parse_patterns(patterns, what)]


def _parse_patterns(patterns: Iterable[str], what: str) -> tuple[_Pattern, ...]:
    if isinstance(patterns, str | bytes):
        raise DCRError(f"{what} patterns must be a list of patterns, not the single string {patterns!r}")
    out = []
    for text in patterns:
        if not isinstance(text, str) or not text:
            raise DCRError(f"{what} pattern {text!r} is not a non-empty string")
        if text.startswith("/"):
            raise DCRError(
                f"{what} pattern {text!r} is an absolute path",
                hint="write patterns relative to the workspace, e.g. 'data/*.csv'",
            )
        body = text[:-1] if text.endswith("/") else text
        parts = tuple(body.split("/"))
        if ".." in parts:
            raise DCRError(
                f"{what} pattern {text!r} contains '..'",
                hint="a bundle holds only files inside the workspace; write patterns relative to it",
            )
        if any(p in ("", ".") for p in parts) or _CONTROL_RE.search(body):
            raise DCRError(
                f"{what} pattern {text!r} has an empty or '.' component or a control character",
                hint="write it like 'data/*.csv' or '**/*.py'",
            )
        # A single component matches at any depth, like a .gitignore entry.
        out.append(_Pattern(text, parts if len(parts) > 1 else ("**", *parts)))
    return tuple(out)


def _matching(patterns: Sequence[_Pattern], comps: Sequence[str]) -> _Pattern | None:
    """The first pattern matching exactly the path ``comps`` (ancestors are the caller's business)."""
    return next((p for p in patterns if p.matches(comps)), None)


def _excluded_by(patterns: Sequence[_Pattern], comps: Sequence[str]) -> _Pattern | None:
    """The pattern excluding ``comps`` or one of its ancestors, if any."""
    for k in range(1, len(comps) + 1):
        if (p := _matching(patterns, comps[:k])) is not None:
            return p
    return None


def _inside(root: str, real: str) -> tuple[str, ...] | None:
    """Components of the resolved path ``real`` relative to the resolved ``root``, or None if outside."""
    if real == root:
        return ()
    prefix = root if root.endswith("/") else root + "/"
    if not real.startswith(prefix):
        return None
    return tuple(real[len(prefix) :].split("/"))


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A selected file as seen while walking: what to open and what it looked like."""

    path: str
    source: str
    size: int
    executable: bool
    ident: tuple[int, int]


def _locate(notebook: Path | str, workspace: Path | str | None) -> tuple[str, tuple[str, ...]]:
    """The resolved workspace and the notebook's components relative to it."""
    nb = Path(notebook)
    if ".." in nb.parts:
        raise DCRError(
            f"notebook path {str(nb)!r} contains '..'",
            hint="pass the notebook's path without '..' (relative to the workspace, or absolute)",
        )
    if workspace is None:
        ws = nb.parent
        nb_abs = nb
    else:
        ws = Path(workspace)
        nb_abs = nb if nb.is_absolute() else ws / nb
    root = os.path.realpath(ws)
    if not os.path.isdir(root):
        raise DCRError(f"workspace {str(ws)!r} is not a directory", hint="pass an existing directory")
    # Resolve the directory only: the notebook itself may be a link, judged like any other link.
    rel = _inside(root, os.path.realpath(nb_abs.parent))
    if rel is None:
        raise DCRError(
            f"notebook {str(nb)!r} is outside the workspace {root!r}",
            hint="move the notebook into the workspace or choose a workspace that contains it",
        )
    comps = (*rel, nb_abs.name)
    if not nb_abs.name.endswith(".ipynb"):
        raise DCRError(f"{str(nb)!r} is not a notebook (not an .ipynb file)", hint="submit a .ipynb notebook")
    try:
        st = os.lstat(nb_abs)
    except OSError:
        raise DCRError(f"notebook {str(nb)!r} does not exist", hint="check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise DCRError(f"notebook {str(nb)!r} is a directory, not a notebook file")
    return root, comps


def _walk(
    root: str,
    nb_comps: tuple[str, ...],
    include: Sequence[_Pattern],
    exclude: Sequence[_Pattern],
    limits: BundleLimits,
) -> list[_Found]:
    """Select the workspace's files, refusing what must not travel and stopping at the first limit."""
    found: list[_Found] = []
    total = 0

    def add(rel: str, source: str, st: os.stat_result) -> None:
        nonlocal total
        total += st.st_size
        if len(found) + 1 > limits.max_files:
            raise LimitError(
                f"the bundle would hold more than {limits.max_files} files (reached at {_show(rel)})",
                hint="exclude what the notebook does not need (exclude patterns) or raise max_files",
            )
        if total > limits.max_bytes:
            raise LimitError(
                f"the bundle would hold more than {limits.max_bytes} bytes (reached at {_show(rel)}, "
                f"{st.st_size} bytes)",
                hint="exclude large files the notebook does not need, or raise max_bytes",
            )
        ident = (st.st_dev, st.st_ino)
        found.append(_Found(rel, source, st.st_size, bool(st.st_mode & stat.S_IXUSR), ident))

    # Pattern matching is incremental: each directory carries every pattern's NFA states after its path,
    # so an entry costs one step per pattern whatever its depth.
    inc_start = tuple(p.start for p in include)
    exc_start = tuple(p.start for p in exclude)
    # (directory on disk, its components, include states, exclude states, included by an ancestor)
    stack: list[tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...], bool]]
    stack = [(root, (), inc_start, exc_start, False)]
    while stack:
        dirpath, comps, inc_states, exc_states, all_in = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name), reverse=True)
        except OSError as e:
            raise DCRError(
                f"cannot read workspace directory {_show('/'.join(comps) or '.')}: {e.strerror}",
                hint="fix its permissions or exclude it",
            ) from None
        rel_dir = "/".join(comps) + "/" if comps else ""
        for entry in entries:
            name = entry.name
            e_exc = tuple([p.step(s, name) for p, s in zip(exclude, exc_states, strict=True)])
            if any([p.full(s) for p, s in zip(exclude, e_exc, strict=True)]):
                continue
            ecomps = (*comps, name)
            e_inc = tuple([p.step(s, name) for p, s in zip(include, inc_states, strict=True)])
            here = all_in or any([p.full(s) for p, s in zip(include, e_inc, strict=True)])
            as_file = here or ecomps == nb_comps
            as_dir = (
                here
                or nb_comps[: len(ecomps)] == ecomps
                or any([p.partial(s) for p, s in zip(include, e_inc, strict=True)])
            )
            if not (as_file or as_dir):
                continue
            rel = rel_dir + name
            # The directory's own path was checked when it was entered: check the new component only.
            if (problem := _path_problem(name)) is not None or len(rel.encode("utf-8")) > MAX_PATH_BYTES:
                raise DCRError(
                    f"workspace path {_show(rel)} cannot be bundled: {problem or _path_problem(rel)}",
                    hint="rename it, or exclude it if the notebook does not need it",
                )
            if entry.is_symlink():
                _add_link(root, entry.path, rel, exclude, as_file, as_dir, add)
            elif entry.is_dir(follow_symlinks=False):
                if as_dir:
                    stack.append((entry.path, ecomps, e_inc, e_exc, here))
            elif as_file:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise DCRError(
                        f"workspace path {_show(rel)} is a {_kind(st.st_mode)}, not a regular file",
                        hint="remove it from the workspace or exclude it",
                    )
                add(rel, entry.path, st)
    return found


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


def _add_link(
    root: str,
    link: str,
    rel: str,
    exclude: Sequence[_Pattern],
    as_file: bool,
    as_dir: bool,
    add: Callable[[str, str, os.stat_result], None],
) -> None:
    """A file link staying in the workspace contributes its target's content under the link's own name.

    A link is judged only if what it points to would be selected (``as_file`` for a file, ``as_dir`` for a
    directory); then it must stay in the workspace, point to a regular file, and that file must not be
    excluded.
    """
    target = os.path.realpath(link)
    try:
        st = os.stat(target)
    except OSError:
        raise DCRError(
            f"workspace path {_show(rel)} is a link to {target!r}, which does not exist",
            hint="remove the broken link",
        ) from None
    if not (as_dir if stat.S_ISDIR(st.st_mode) else as_file):
        return
    tcomps = _inside(root, target)
    if tcomps is None:
        raise DCRError(
            f"workspace path {_show(rel)} is a link to {target!r}, outside the workspace",
            hint="copy what the notebook needs into the workspace and remove the link",
        )
    if stat.S_ISDIR(st.st_mode):
        raise DCRError(
            f"workspace path {_show(rel)} is a link to a directory; bundles do not follow directory links",
            hint="replace the link with the directory itself, or exclude it",
        )
    if not stat.S_ISREG(st.st_mode):
        raise DCRError(
            f"workspace path {_show(rel)} is a link to a {_kind(st.st_mode)}, not a regular file",
            hint="remove the link or exclude it",
        )
    if (p := _excluded_by(exclude, tcomps)) is not None:
        # Otherwise a link would carry an excluded file (say, .env) into the bundle under another name.
        raise DCRError(
            f"workspace path {_show(rel)} is a link to {_show('/'.join(tcomps))}, which is excluded "
            f"by pattern {p.text!r}",
            hint="remove the link, or exclude the link as well",
        )
    add(rel, target, st)


def _open_found(f: _Found) -> int:
    """Open a planned file, refusing if it is no longer the same regular file."""
    try:
        fd = os.open(f.source, _OPEN_FLAGS)
    except OSError as e:
        raise DCRError(f"cannot read workspace file {_show(f.path)}: {e.strerror}", hint=_REPLAN) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != f.ident:
        os.close(fd)
        raise DCRError(f"workspace file {_show(f.path)} was replaced while planning", hint=_REPLAN)
    return fd


def _copy_hashed(
    src: _Reader, size: int, buf: bytearray, sink: Callable[[memoryview], object] | None = None
) -> tuple[str, int]:
    """sha256 of at most ``size + 1`` bytes of ``src`` (one more reveals growth), each piece also sunk."""
    h = hashlib.sha256()
    view = memoryview(buf)
    total = 0
    while total <= size:
        n = src.readinto(view[: min(len(view), size + 1 - total)])
        if not n:
            break
        h.update(view[:n])
        if sink is not None:
            sink(view[:n])
        total += n
    return "sha256:" + h.hexdigest(), total


def _hash_found(f: _Found, buf: bytearray) -> str:
    fd = _open_found(f)
    if f.size < len(buf):
        # Small files (most of a workspace): two plain reads, the second proving the end of the file.
        try:
            data = os.read(fd, f.size + 1)
            while len(data) <= f.size and (more := os.read(fd, f.size + 1 - len(data))):
                data += more
        finally:
            os.close(fd)
        digest, n = sha256_bytes(data), len(data)
    else:
        with io.FileIO(fd, "rb") as src:
            digest, n = _copy_hashed(src, f.size, buf)
    if n != f.size:
        raise DCRError(f"workspace file {_show(f.path)} changed size while planning", hint=_REPLAN)
    return digest


def _read_notebook(f: _Found) -> bytes:
    """The notebook's bytes, read once: the same bytes are validated and hashed."""
    with io.FileIO(_open_found(f), "rb") as src:
        data = bytearray()
        while len(data) <= f.size:
            piece = src.read(f.size + 1 - len(data))
            if not piece:
                break
            data += piece
    if len(data) != f.size:
        raise DCRError(f"notebook {_show(f.path)} changed size while planning", hint=_REPLAN)
    return bytes(data)


def validate_notebook(data: bytes, path: str) -> None:
    """Refuse ``data`` unless it is a valid version 4 notebook (JSON checked by ``nbformat.validate``)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DCRError(
            f"notebook {_show(path)} is not JSON: {_clip(str(e))}",
            hint="a notebook is a JSON file; save it again from JupyterLab",
        ) from None
    version = doc.get("nbformat") if isinstance(doc, dict) else None
    if type(version) is not int or version != 4:
        raise DCRError(
            f"notebook {_show(path)} is not a version 4 notebook (nbformat is {_clip(repr(version), 40)})",
            hint="open it in JupyterLab and save it, which converts it to version 4",
        )
    try:
        with warnings.catch_warnings():
            # Missing cell ids are repaired on a copy; the bytes hashed are the user's own.
            warnings.simplefilter("ignore")
            nbformat.validate(nbformat.from_dict(doc))
    except nbformat.ValidationError as e:
        raise DCRError(
            f"notebook {_show(path)} is not a valid version 4 notebook: {_clip(str(e.message))}",
            hint="open it in JupyterLab, fix what it reports and save it",
        ) from None
    except (TypeError, KeyError, AttributeError, AssertionError, IndexError, ValueError, RecursionError) as e:
        # nbformat's normaliser trips over some malformed shapes before its schema check reports them.
        raise DCRError(
            f"notebook {_show(path)} is not a valid version 4 notebook: {_clip(repr(e))}",
            hint="open it in JupyterLab, fix what it reports and save it",
        ) from None


def plan_bundle(
    notebook: Path | str,
    workspace: Path | str | None = None,
    *,
    include: Iterable[str] = ("**",),
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    limits: BundleLimits = BundleLimits(),
) -> BundleManifest:
    """Walk the workspace, validate and hash the selected files, and return the manifest.

    ``workspace`` defaults to the notebook's directory. With a workspace given, a relative ``notebook``
    is relative to the workspace and an absolute one must lie inside it; ``..`` is refused either way.
    The notebook is always part of the bundle (unless an exclude pattern matches it: that is refused).
    Limits are enforced while walking, before any file is read.
    """
    inc = _parse_patterns(include, "include")
    exc = _parse_patterns(exclude, "exclude")
    root, nb_comps = _locate(notebook, workspace)
    nb_path = "/".join(nb_comps)
    if (p := _excluded_by(exc, nb_comps)) is not None:
        raise DCRError(
            f"notebook {_show(nb_path)} is excluded by pattern {p.text!r}",
            hint="move the notebook out of hidden or excluded directories, or change the exclude patterns",
        )
    if (problem := _path_problem(nb_path)) is not None:
        raise DCRError(f"notebook path {_show(nb_path)} cannot be bundled: {problem}", hint="rename it")
    found = _walk(root, nb_comps, inc, exc, limits)
    nb = next((f for f in found if f.path == nb_path), None)
    if nb is None:
        raise DCRError(f"notebook {_show(nb_path)} was not found in the workspace", hint="check the path")
    # The notebook first: a wrong target is reported before the rest of the workspace is read.
    data = _read_notebook(nb)
    validate_notebook(data, nb.path)
    digests = {nb.path: sha256_bytes(data)}
    buf = bytearray(_READ_SIZE)
    found.sort(key=lambda f: _sort_key(f.path))
    files = tuple(
        BundleFile(f.path, f.size, digests.get(f.path) or _hash_found(f, buf), f.executable) for f in found
    )
    return BundleManifest(nb_path, files)


# ---------------------------------------------------------------------------------------------------------
# Writing the archive
# ---------------------------------------------------------------------------------------------------------


def _header(name: str, size: int, mode: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def _padding(size: int, unit: int) -> bytes:
    return b"\0" * (-size % unit)


def _open_for_write(root: str, entry: BundleFile) -> int:
    """Open a manifest file in the workspace again, with the same rules as planning."""
    changed = f"workspace file {_show(entry.path)} changed since the bundle was planned"
    path = os.path.join(root, *entry.path.split("/"))
    real = os.path.realpath(path)
    if _inside(root, real) is None:
        raise DCRError(f"{changed}: it now leads outside the workspace", hint=_REPLAN)
    parent = os.path.dirname(path)
    if os.path.realpath(parent) != parent:
        raise DCRError(f"{changed}: a directory on its path is now a link", hint=_REPLAN)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as e:
        raise DCRError(f"{changed}: {e.strerror}", hint=_REPLAN) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DCRError(f"{changed}: it is no longer a regular file", hint=_REPLAN)
    if bool(st.st_mode & stat.S_IXUSR) != entry.executable:
        os.close(fd)
        raise DCRError(f"{changed}: its executable bit changed", hint=_REPLAN)
    return fd


def write_bundle(manifest: BundleManifest, workspace: Path | str, dest: Path | str) -> str:
    """Write the bundle archive for ``manifest`` to ``dest`` atomically; return the bundle digest.

    Every file is hashed again as it is copied: if anything differs from the manifest, nothing is written.
    """
    root = os.path.realpath(workspace)
    if not os.path.isdir(root):
        raise DCRError(f"workspace {str(workspace)!r} is not a directory", hint="pass an existing directory")
    dest = Path(dest)
    if dest.is_dir():
        raise DCRError(f"cannot write the bundle to {str(dest)!r}: it is a directory", hint="name a file")
    if not dest.parent.is_dir():
        raise DCRError(f"cannot write {str(dest)!r}: {str(dest.parent)!r} is not a directory")
    raw = canonical_json(manifest.to_json())
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with open(fd, "wb") as out:
            written = 0

            def emit(data: bytes | memoryview) -> None:
                nonlocal written
                out.write(data)
                written += len(data)

            emit(_header(MANIFEST_MEMBER, len(raw), _MODE_PLAIN))
            emit(raw)
            emit(_padding(len(raw), tarfile.BLOCKSIZE))
            buf = bytearray(_READ_SIZE)
            for entry in manifest.files:
                with io.FileIO(_open_for_write(root, entry), "rb") as src:
                    mode = _MODE_EXEC if entry.executable else _MODE_PLAIN
                    emit(_header(FILES_PREFIX + entry.path, entry.size, mode))
                    digest, n = _copy_hashed(src, entry.size, buf, emit)
                if n != entry.size or digest != entry.sha256:
                    raise DCRError(
                        f"workspace file {_show(entry.path)} changed since the bundle was planned "
                        f"({'size' if n != entry.size else 'content'})",
                        hint=_REPLAN,
                    )
                emit(_padding(n, tarfile.BLOCKSIZE))
            emit(b"\0" * (2 * tarfile.BLOCKSIZE))
            emit(_padding(written, tarfile.RECORDSIZE))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return manifest.digest


def build_bundle(
    notebook: Path | str,
    dest: Path | str,
    workspace: Path | str | None = None,
    *,
    include: Iterable[str] = ("**",),
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    limits: BundleLimits = BundleLimits(),
) -> BundleManifest:
    """:func:`plan_bundle` then :func:`write_bundle` to ``dest``."""
    manifest = plan_bundle(notebook, workspace, include=include, exclude=exclude, limits=limits)
    root = os.path.dirname(os.path.abspath(notebook)) if workspace is None else workspace
    write_bundle(manifest, root, dest)
    return manifest


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
        raise IntegrityError(f"bundle archive is malformed: {_clip(str(e))}", hint=_NOT_OURS) from None


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
    _check_member(member, MANIFEST_MEMBER, member.size, _MODE_PLAIN)
    try:
        raw = _read_member(tf, member).read(member.size)
    except _MALFORMED as e:
        raise IntegrityError(f"bundle archive is malformed: {_clip(str(e))}", hint=_NOT_OURS) from None
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
        raise IntegrityError(f"bundle manifest is not JSON: {_clip(str(e))}", hint=_NOT_OURS) from None
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
    buf = bytearray(_READ_SIZE)
    for entry in manifest.files:
        mode = _MODE_EXEC if entry.executable else _MODE_PLAIN
        member = _check_member(_next(tf), FILES_PREFIX + entry.path, entry.size, mode)
        parts = entry.path.split("/")
        # Only this function creates anything under tmp, and only directories and regular files: no
        # link can exist there to redirect a write.
        d = tmp
        for part in parts[:-1]:
            d = os.path.join(d, part)
            if d not in made:
                os.mkdir(d)
                os.chmod(d, _MODE_EXEC)
                made.add(d)
        target = os.path.join(d, parts[-1])
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out:
            try:
                digest, n = _copy_hashed(_read_member(tf, member), entry.size, buf, out.write)
            except _MALFORMED as e:
                raise IntegrityError(
                    f"bundle archive is malformed: {_clip(str(e))}", hint=_NOT_OURS
                ) from None
            if n != entry.size:
                raise IntegrityError(f"bundle archive is truncated inside {member.name!r}", hint=_NOT_OURS)
            if digest != entry.sha256:
                raise IntegrityError(
                    f"bundle file {_show(entry.path)} has sha256 {digest}, the manifest says {entry.sha256}",
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
        raise IntegrityError(
            f"bundle archive is not a tar archive: {_clip(str(e))}", hint=_NOT_OURS
        ) from None


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
        os.chmod(tmp, _MODE_EXEC)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Manifest invariants
# ---------------------------------------------------------------------------------------------------------


def _check_manifest(notebook: str, files: tuple[BundleFile, ...]) -> None:
    """Refuse a manifest that a planner could not have produced (in code what the schema cannot say)."""

    def bad(msg: str) -> IntegrityError:
        return IntegrityError(f"bundle manifest is invalid: {msg}", hint="build the bundle again")

    if not files:
        raise bad("it lists no files")
    paths: set[str] = set()
    prev: bytes | None = None
    for f in files:
        if not isinstance(f, BundleFile):
            raise bad(f"{f!r} is not a BundleFile")
        if not isinstance(f.path, str) or (problem := _path_problem(f.path)) is not None:
            raise bad(f"file path {_clip(repr(f.path))} is unsafe: {problem or 'not a string'}")
        if type(f.size) is not int or f.size < 0:
            raise bad(f"file {f.path!r} has an invalid size {f.size!r}")
        if not isinstance(f.sha256, str) or not DIGEST_RE.match(f.sha256):
            raise bad(f"file {f.path!r} has an invalid sha256 {_clip(repr(f.sha256))}")
        if type(f.executable) is not bool:
            raise bad(f"file {f.path!r} has a non-boolean executable flag")
        key = _sort_key(f.path)
        if prev is not None and key <= prev:
            raise bad(f"file {f.path!r} is duplicated or out of order (files are sorted by UTF-8 bytes)")
        prev = key
        paths.add(f.path)
    for path in paths:
        d = path
        while (cut := d.rfind("/")) > 0:
            d = d[:cut]
            if d in paths:
                raise bad(f"{d!r} is listed as a file and as the directory of {path!r}")
    if not isinstance(notebook, str) or not notebook.endswith(".ipynb"):
        raise bad(f"notebook {_clip(repr(notebook))} is not an .ipynb path")
    if notebook not in paths:
        raise bad(f"notebook {notebook!r} is not one of the files")


#: ``/data/<provider>/<dataset>/`` as written in notebooks and scripts.
_DATA_REF = re.compile(r"/data/([a-z0-9][a-z0-9_-]{0,62})/([a-z0-9][a-z0-9_-]{0,62})/")
#: Files whose text is searched for dataset references.
_TEXT_SUFFIXES = (".ipynb", ".py", ".r", ".sql", ".txt", ".json", ".yaml", ".yml", ".toml", ".cfg", ".md")
_MAX_SCAN_BYTES = 16 * 2**20


def data_references(manifest: BundleManifest, workspace: Path | str) -> list[tuple[str, str]]:
    """The ``(provider, dataset)`` pairs the bundle's text files mention as ``/data/<p>/<d>/...``, sorted.

    Used to grant a job exactly the datasets its code names when the submitter names none.
    """
    found: set[tuple[str, str]] = set()
    budget = _MAX_SCAN_BYTES
    for f in manifest.files:
        if not f.path.lower().endswith(_TEXT_SUFFIXES) or f.size > budget:
            continue
        budget -= f.size
        text = (Path(workspace) / f.path).read_bytes().decode("utf-8", errors="replace")
        found.update(_DATA_REF.findall(text))
    return sorted(found)
