"""The enclave measurement: one digest over the code the enclave runs and the Python environment it runs with.

In the cloud the measurement is the container image digest, which pins the code, the interpreter and every
library. Locally the enclave host runs the supervisor from a root-owned, read-only image and measures:

1. **the code**: the files of ``dcr_enclave/__init__.py``, ``formats/`` and ``runtime/`` in the image
   (:data:`MEASURED_PARTS`), the only parts of the package the supervisor imports. The local platform, the
   verifier, the producers and the commands are not in the image, so editing them leaves the measurement
   unchanged;
2. **the environment** (:func:`environment_manifest`): the interpreter's executable and version, and every
   file under each directory on the enclave interpreter's import path (the standard library, its compiled
   modules and site-packages with every installed distribution, listed by name and version), by content.

The two digests are combined into the image digest (:func:`combine`). Byte-compiled caches are left out of
both: the image's are compiled with checked hashes, so Python uses them only while they match the measured
source; the environment's are checked by Python against their source's size and modification time.

Hashing a large environment takes seconds (two gigabytes: about 3 s from the page cache, 13 s cold), so file
digests are kept in a cache keyed by device, inode, size, modification and change time; a later
measurement re-reads only what changed (about 0.5 s for 76,000 files). The cache lives in this process and,
for ``dcr enclave-host``, in a root-owned file of its state directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from dcr_enclave.formats.digests import canonical_json, sha256_bytes, sha256_file
from dcr_enclave.formats.errors import DCRError

#: What of the ``dcr_enclave`` package the enclave image holds (and the measurement covers).
MEASURED_PARTS: Final = ("__init__.py", "formats", "runtime")
SCHEMA: Final = "dcr/measurement/v2"
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")

_Key = tuple[int, int, int, int, int]
_cache: dict[str, tuple[_Key, str]] = {}
_cache_lock = threading.Lock()


def _stat_key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str, st: os.stat_result) -> str:
    """The file's sha256, from the cache while its device, inode, size, mtime and ctime are unchanged."""
    key = _stat_key(st)
    hit = _cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    digest = sha256_file(path)[0]
    with _cache_lock:
        _cache[path] = (key, digest)
    return digest


def _tree_entries(base: str, top: str, skip: frozenset[str] = frozenset()) -> list[list[Any]]:
    """(path relative to ``base``, size, digest, executable) of every file under ``top``; refuses links."""
    entries: list[list[Any]] = []
    cut = len(base.rstrip("/")) + 1

    def add(path: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise DCRError(f"cannot measure {path}: not a regular file")
        entries.append([path[cut:], st.st_size, file_digest(path, st), bool(st.st_mode & stat.S_IXUSR)])

    def walk(directory: str) -> None:
        with os.scandir(directory) as it:
            found = list(it)
        for entry in found:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in _SKIP_DIRS and entry.path not in skip:
                    walk(entry.path)
            elif not entry.name.endswith(_SKIP_SUFFIXES):
                add(entry.path, entry.stat(follow_symlinks=False))

    if os.path.isdir(top) and not os.path.islink(top):
        walk(top)
    else:
        add(top, os.lstat(top))
    entries.sort(key=lambda e: str(e[0]).encode("utf-8", "surrogateescape"))
    return entries


def measure_tree(root: str | Path, parts: Sequence[str] | None = None) -> str:
    """``sha256:...`` over the sorted (path, size, digest, executable) of every file under ``root``.

    ``parts`` limits it to those names directly under ``root`` (each a file or a directory). Links and
    special files are refused: a measured install holds regular files only.
    """
    base = Path(root)
    if not base.is_dir():
        raise DCRError(f"cannot measure {base}: not a directory")
    entries: list[list[Any]] = []
    for top in [base / p for p in parts] if parts is not None else [base]:
        if not top.exists():
            raise DCRError(f"cannot measure {top}: it is missing")
        entries += _tree_entries(str(base), str(top))
    entries.sort(key=lambda e: str(e[0]).encode())
    return sha256_bytes(canonical_json({"schema": "dcr/measurement/v1", "files": entries}))


@functools.cache
def import_path() -> tuple[str, ...]:
    """The directories the enclave's interpreter imports from: ``sys.path`` of this interpreter in isolated
    mode (``python -I``, as the supervisor and the kernel run), without zip files or path hooks."""
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            "import json, site, sys; site.main(); print(json.dumps(sys.path))",
        ],
        capture_output=True,
        check=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    ).stdout
    found: list[str] = []
    for entry in json.loads(out):
        if entry and os.path.isdir(entry) and (real := os.path.realpath(entry)) not in found:
            found.append(real)
    return tuple(found)


def _interpreter() -> dict[str, Any]:
    exe = Path(os.path.realpath(sys.executable))
    files = [exe]
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and ".so" in str(ldlib):
        lib = Path(str(libdir), str(ldlib))
        if lib.is_file():
            files.append(lib.resolve())
    return {
        "version": sys.version,
        "files": [[str(f), file_digest(str(f), f.stat())] for f in files],
    }


def _distributions(paths: Sequence[str]) -> list[list[str]]:
    found = set()
    for dist in metadata.distributions(path=list(paths)):
        name = dist.metadata["Name"]
        if name:
            found.add((str(name), str(dist.version)))
    return [list(d) for d in sorted(found)]


def environment_manifest(paths: Sequence[str] | None = None) -> dict[str, Any]:
    """The interpreter, the import path's files by content and the installed distributions, with a digest.

    ``paths`` defaults to :func:`import_path`. A directory that lies inside another one on the path is
    measured once, as part of the outer one; an outer one skips it only where it is listed itself.
    """
    dirs = [os.path.realpath(p) for p in (paths if paths is not None else import_path())]
    listed = frozenset(dirs)
    trees = []
    for d in dirs:
        # A base interpreter's site-packages below its standard library is importable only when listed.
        unlisted = {os.path.join(d, n) for n in ("site-packages", "dist-packages")} - listed
        skip = frozenset(unlisted | (listed - {d}))
        entries = _tree_entries(d, d, skip)
        trees.append([d, sha256_bytes(canonical_json(entries)), len(entries)])
    doc = {
        "schema": "dcr/environment/v1",
        "interpreter": _interpreter(),
        "paths": trees,
        "distributions": _distributions(dirs),
    }
    return {**doc, "digest": sha256_bytes(canonical_json(doc))}


def combine(code_digest: str, environment_digest: str) -> str:
    """The image digest: code and environment together."""
    return sha256_bytes(
        canonical_json({"schema": SCHEMA, "code": code_digest, "environment": environment_digest})
    )


def package_root() -> Path:
    """The directory of the ``dcr_enclave`` package this process imported."""
    return Path(__file__).resolve().parent.parent


def current_measurement() -> str:
    """The image digest an enclave host on this machine would report for this package and interpreter
    (the default a provider's condition pins)."""
    code = measure_tree(package_root(), MEASURED_PARTS)
    return combine(code, environment_manifest()["digest"])


def load_cache(path: Path) -> None:
    """Add the digests saved by :func:`save_cache` (a missing or unreadable cache is ignored)."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        saved = json.loads(path.read_text())
        with _cache_lock:
            for name, (key, digest) in saved.items():
                _cache.setdefault(name, (tuple(key), digest))  # type: ignore[arg-type]


def save_cache(path: Path) -> None:
    """Save the digest cache (owner-only, replaced atomically)."""
    with _cache_lock:
        data = json.dumps({k: [list(v[0]), v[1]] for k, v in _cache.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)
