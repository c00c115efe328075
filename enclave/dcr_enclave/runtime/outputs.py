"""Collecting a run's outputs from the dead sandbox's working copy and applying the grant's limits.

Outputs are the executed notebook plus the regular files the run created or changed under the working copy
(subfolders allowed). Links, special files and names the receipt cannot carry are refused. A violation is a
kind of problem and a count, never a path: names are the notebook's to choose and can spell out data.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

from dcr_enclave.formats.bundle import BundleManifest
from dcr_enclave.formats.digests import sha256_file
from dcr_enclave.formats.grant import OutputLimits

#: What a path needs to be an output: UTF-8, and no control character or backslash (the receipt's schema
#: and the sealed tar refuse them), at most 4096 bytes with 255 per component.
_BAD_NAME_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_PATH_BYTES = 4096
_MAX_NAME_BYTES = 255


def collect_outputs(work: Path, outputs: Path, bundle: BundleManifest, limits: OutputLimits) -> list[str]:
    """Copy outputs out of the (dead) sandbox's working copy; return the output-limit violations.

    A violation is a kind of problem and a count, never a path: names are the notebook's to choose, the
    violations go into the public receipt and the failure reason, and a name can spell out data.
    """
    original = {f.path: f.sha256 for f in bundle.files}
    links = special = unusable = 0
    picked: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(work):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                special += 1
                continue
            rel = p.relative_to(work).as_posix()
            if rel in original and rel != bundle.notebook and sha256_file(p)[0] == original[rel]:
                continue  # an input the run left unchanged
            if not _usable_output_path(rel):
                unusable += 1
                continue
            picked.append((rel, p, st.st_size))
    violations = []
    if links:
        violations.append(_count(links, "symbolic link", "symbolic links"))
    if special:
        violations.append(_count(special, "special file", "special files"))
    if unusable:
        violations.append(
            _count(
                unusable,
                "file with a name that cannot be an output",
                "files with names that cannot be outputs",
            )
        )
    if limits.allowed_suffixes:
        suffixes = tuple(limits.allowed_suffixes)
        refused = sum(1 for rel, _, _ in picked if not rel.lower().endswith(suffixes))
        if refused:
            violations.append(
                _count(
                    refused,
                    "file of a type the grant does not allow",
                    "files of a type the grant does not allow",
                )
            )
    if len(picked) > limits.max_files:
        violations.append(f"too many files: {len(picked)} > {limits.max_files}")
    total = sum(size for _, _, size in picked)
    if total > limits.max_bytes:
        violations.append(f"too many bytes: {total} > {limits.max_bytes}")
    if not violations:
        for rel, p, _ in picked:
            dest = outputs / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
    return violations


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _usable_output_path(rel: str) -> bool:
    """Whether the receipt and the sealed tar can carry ``rel`` (see :data:`_BAD_NAME_CHAR`)."""
    try:
        encoded = rel.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 (os.walk hands it over with surrogates)
        return False
    return (
        len(encoded) <= _MAX_PATH_BYTES
        and not _BAD_NAME_CHAR.search(rel)
        and all(len(part.encode("utf-8")) <= _MAX_NAME_BYTES for part in rel.split("/"))
    )
