"""Building bundles on the user's side: plan (walk and hash the workspace), write the archive.

:func:`plan_bundle` walks the workspace and refuses what must not travel (links leaving the workspace,
directory links, special files, names that are not UTF-8, more files or bytes than the limits), hashing
every file with memory flat in its size; :func:`write_bundle` writes the archive the manifest describes,
refusing any file that changed since planning; :func:`build_bundle` does both. The format is
:mod:`dcr_enclave.formats.bundle`.

Include and exclude patterns are globs over workspace-relative POSIX paths: ``*``, ``?`` and ``[...]``
match within one path component, ``**`` matches any number of components; a pattern without ``/``
matches a file or directory of that name at any depth; a pattern that matches a directory selects (or
excludes) everything under it. Excluded directories are never entered.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dcr_enclave.formats.bundle import (
    CONTROL_RE,
    DEFAULT_EXCLUDE,
    FILES_PREFIX,
    MANIFEST_MEMBER,
    MAX_PATH_BYTES,
    MODE_EXEC,
    MODE_PLAIN,
    READ_BUFFER,
    BundleFile,
    BundleLimits,
    BundleManifest,
    copy_hashed,
    path_problem,
    show_path,
    sort_key,
    validate_notebook,
)
from dcr_enclave.formats.digests import canonical_json, sha256_bytes
from dcr_enclave.formats.errors import DCRError, LimitError


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
        if any(p in ("", ".") for p in parts) or CONTROL_RE.search(body):
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
                f"the bundle would hold more than {limits.max_files} files (reached at {show_path(rel)})",
                hint="exclude what the notebook does not need (exclude patterns) or raise max_files",
            )
        if total > limits.max_bytes:
            raise LimitError(
                f"the bundle would hold more than {limits.max_bytes} bytes (reached at {show_path(rel)}, "
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
                f"cannot read workspace directory {show_path('/'.join(comps) or '.')}: {e.strerror}",
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
            if (problem := path_problem(name)) is not None or len(rel.encode("utf-8")) > MAX_PATH_BYTES:
                raise DCRError(
                    f"workspace path {show_path(rel)} cannot be bundled: {problem or path_problem(rel)}",
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
                        f"workspace path {show_path(rel)} is a {_kind(st.st_mode)}, not a regular file",
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
            f"workspace path {show_path(rel)} is a link to {target!r}, which does not exist",
            hint="remove the broken link",
        ) from None
    if not (as_dir if stat.S_ISDIR(st.st_mode) else as_file):
        return
    tcomps = _inside(root, target)
    if tcomps is None:
        raise DCRError(
            f"workspace path {show_path(rel)} is a link to {target!r}, outside the workspace",
            hint="copy what the notebook needs into the workspace and remove the link",
        )
    if stat.S_ISDIR(st.st_mode):
        raise DCRError(
            f"workspace path {show_path(rel)} is a link to a directory; bundles do not follow directory links",
            hint="replace the link with the directory itself, or exclude it",
        )
    if not stat.S_ISREG(st.st_mode):
        raise DCRError(
            f"workspace path {show_path(rel)} is a link to a {_kind(st.st_mode)}, not a regular file",
            hint="remove the link or exclude it",
        )
    if (p := _excluded_by(exclude, tcomps)) is not None:
        # Otherwise a link would carry an excluded file (say, .env) into the bundle under another name.
        raise DCRError(
            f"workspace path {show_path(rel)} is a link to {show_path('/'.join(tcomps))}, which is excluded "
            f"by pattern {p.text!r}",
            hint="remove the link, or exclude the link as well",
        )
    add(rel, target, st)


def _open_found(f: _Found) -> int:
    """Open a planned file, refusing if it is no longer the same regular file."""
    try:
        fd = os.open(f.source, _OPEN_FLAGS)
    except OSError as e:
        raise DCRError(
            f"cannot read workspace file {show_path(f.path)}: {e.strerror}", hint=_REPLAN
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != f.ident:
        os.close(fd)
        raise DCRError(f"workspace file {show_path(f.path)} was replaced while planning", hint=_REPLAN)
    return fd


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
            digest, n = copy_hashed(src, f.size, buf)
    if n != f.size:
        raise DCRError(f"workspace file {show_path(f.path)} changed size while planning", hint=_REPLAN)
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
        raise DCRError(f"notebook {show_path(f.path)} changed size while planning", hint=_REPLAN)
    return bytes(data)


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
            f"notebook {show_path(nb_path)} is excluded by pattern {p.text!r}",
            hint="move the notebook out of hidden or excluded directories, or change the exclude patterns",
        )
    if (problem := path_problem(nb_path)) is not None:
        raise DCRError(f"notebook path {show_path(nb_path)} cannot be bundled: {problem}", hint="rename it")
    found = _walk(root, nb_comps, inc, exc, limits)
    nb = next((f for f in found if f.path == nb_path), None)
    if nb is None:
        raise DCRError(f"notebook {show_path(nb_path)} was not found in the workspace", hint="check the path")
    # The notebook first: a wrong target is reported before the rest of the workspace is read.
    data = _read_notebook(nb)
    validate_notebook(data, nb.path)
    digests = {nb.path: sha256_bytes(data)}
    buf = bytearray(READ_BUFFER)
    found.sort(key=lambda f: sort_key(f.path))
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
    changed = f"workspace file {show_path(entry.path)} changed since the bundle was planned"
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

            emit(_header(MANIFEST_MEMBER, len(raw), MODE_PLAIN))
            emit(raw)
            emit(_padding(len(raw), tarfile.BLOCKSIZE))
            buf = bytearray(READ_BUFFER)
            for entry in manifest.files:
                with io.FileIO(_open_for_write(root, entry), "rb") as src:
                    mode = MODE_EXEC if entry.executable else MODE_PLAIN
                    emit(_header(FILES_PREFIX + entry.path, entry.size, mode))
                    digest, n = copy_hashed(src, entry.size, buf, emit)
                if n != entry.size or digest != entry.sha256:
                    raise DCRError(
                        f"workspace file {show_path(entry.path)} changed since the bundle was planned "
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


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


_REPLAN = "plan the bundle again"
