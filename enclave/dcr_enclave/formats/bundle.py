"""The bundle format: a deterministic, content-addressed snapshot of a notebook and its workspace.

A bundle is what the enclave runs: the notebook plus the workspace files it needs, named by one digest.
The **manifest** lists the notebook's path and every file (POSIX path relative to the workspace, size,
sha256, executable bit), sorted by the UTF-8 bytes of the paths; the bundle digest is the sha256 of the
manifest's canonical JSON. The same workspace gives the same digest on every machine: nothing depends on
mtimes, owners, permission bits other than the owner's execute bit, the umask, directory listing order or
where the workspace lives.

The **archive** is a plain (uncompressed) POSIX tar: ``bundle.json`` (the canonical manifest) first, then
``files/<path>`` in manifest order, every header with mtime 0, uid/gid 0, empty owner names and mode 0644
or 0755. The same manifest and contents give the same archive bytes.

This module holds the model both sides share; the user's side is
:mod:`dcr_enclave.pack.bundle_builder`, the enclave's :mod:`dcr_enclave.runtime.bundle_extractor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final, Protocol

import nbformat

from dcr_enclave.formats.digests import DIGEST_RE, sha256_json
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.jsonschemas import validate

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

READ_BUFFER = 1 << 20
MODE_PLAIN = 0o644
MODE_EXEC = 0o755
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# ASCII paths whose components do not start with '.' (so are never '.' or '..'), at most 255 bytes each.
_PLAIN_PATH_RE = re.compile(
    r"[^\x00-\x1f\x7f/.][^\x00-\x1f\x7f/]{0,254}(?:/[^\x00-\x1f\x7f/.][^\x00-\x1f\x7f/]{0,254})*"
)


class Reader(Protocol):
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


def show_path(path: str) -> str:
    """A path for a message: quoted, and with undecodable bytes shown as bytes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return repr(os.fsencode(path))
    return repr(path)


def clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def sort_key(path: str) -> bytes:
    return path.encode("utf-8")


def path_problem(path: str) -> str | None:
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
    if CONTROL_RE.search(path):
        return "it contains a control character"
    for part in path.split("/"):
        if part == "":
            return "it has an empty component (a doubled or trailing '/')"
        if part in (".", ".."):
            return f"it has a {part!r} component"
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return f"a component is longer than {MAX_NAME_BYTES} bytes"
    return None


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
        if not isinstance(f.path, str) or (problem := path_problem(f.path)) is not None:
            raise bad(f"file path {clip(repr(f.path))} is unsafe: {problem or 'not a string'}")
        if type(f.size) is not int or f.size < 0:
            raise bad(f"file {f.path!r} has an invalid size {f.size!r}")
        if not isinstance(f.sha256, str) or not DIGEST_RE.match(f.sha256):
            raise bad(f"file {f.path!r} has an invalid sha256 {clip(repr(f.sha256))}")
        if type(f.executable) is not bool:
            raise bad(f"file {f.path!r} has a non-boolean executable flag")
        key = sort_key(f.path)
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
        raise bad(f"notebook {clip(repr(notebook))} is not an .ipynb path")
    if notebook not in paths:
        raise bad(f"notebook {notebook!r} is not one of the files")


def copy_hashed(
    src: Reader, size: int, buf: bytearray, sink: Callable[[memoryview], object] | None = None
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


def validate_notebook(data: bytes, path: str) -> None:
    """Refuse ``data`` unless it is a valid version 4 notebook (JSON checked by ``nbformat.validate``)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DCRError(
            f"notebook {show_path(path)} is not JSON: {clip(str(e))}",
            hint="a notebook is a JSON file; save it again from JupyterLab",
        ) from None
    version = doc.get("nbformat") if isinstance(doc, dict) else None
    if type(version) is not int or version != 4:
        raise DCRError(
            f"notebook {show_path(path)} is not a version 4 notebook (nbformat is {clip(repr(version), 40)})",
            hint="open it in JupyterLab and save it, which converts it to version 4",
        )
    try:
        with warnings.catch_warnings():
            # Missing cell ids are repaired on a copy; the bytes hashed are the user's own.
            warnings.simplefilter("ignore")
            nbformat.validate(nbformat.from_dict(doc))
    except nbformat.ValidationError as e:
        raise DCRError(
            f"notebook {show_path(path)} is not a valid version 4 notebook: {clip(str(e.message))}",
            hint="open it in JupyterLab, fix what it reports and save it",
        ) from None
    except (TypeError, KeyError, AttributeError, AssertionError, IndexError, ValueError, RecursionError) as e:
        # nbformat's normaliser trips over some malformed shapes before its schema check reports them.
        raise DCRError(
            f"notebook {show_path(path)} is not a valid version 4 notebook: {clip(repr(e))}",
            hint="open it in JupyterLab, fix what it reports and save it",
        ) from None
