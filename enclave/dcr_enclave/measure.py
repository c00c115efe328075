"""The enclave measurement: one digest over the files of an installed enclave.

In the cloud the measurement is the container image digest. Locally the enclave host runs the supervisor
from a root-owned, read-only install and its measurement is this digest over that install's files, so a
change to any byte of the code changes it. Byte-compiled caches are left out: the host compiles them with
checked hashes, so Python uses a cache only while it matches the (measured) source it was compiled from.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .digests import canonical_json, sha256_bytes, sha256_file
from .errors import DCRError

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def measure_tree(root: str | Path) -> str:
    """``sha256:...`` over the sorted (path, size, digest, executable) of every file under ``root``.

    Links and special files are refused: a measured install holds regular files only.
    """
    base = Path(root)
    if not base.is_dir():
        raise DCRError(f"cannot measure {base}: not a directory")
    entries = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(_SKIP_SUFFIXES):
                continue
            path = Path(dirpath, name)
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise DCRError(f"cannot measure {path}: not a regular file")
            digest, size = sha256_file(path)
            rel = path.relative_to(base).as_posix()
            entries.append([rel, size, digest, bool(st.st_mode & stat.S_IXUSR)])
    entries.sort(key=lambda e: str(e[0]).encode())
    return sha256_bytes(canonical_json({"schema": "dcr/measurement/v1", "files": entries}))


def package_root() -> Path:
    """The directory of the ``dcr_enclave`` package this process imported."""
    return Path(__file__).resolve().parent


def current_measurement() -> str:
    """Measurement of the enclave code this process runs (the default a provider's condition pins)."""
    return measure_tree(package_root())
