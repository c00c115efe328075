"""Collecting a run's outputs from the dead sandbox's working copy and applying the grant's limits.

Outputs are the executed notebook plus the regular files the run created or changed under the working copy
(subfolders allowed). Links, special files and names the receipt cannot carry are refused. A violation is a
kind of problem, never a count, a size or a path: all of them are the notebook's to choose and can spell out
data. The figures are kept for reviewers, sealed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from dcr_enclave.formats.bundle import BundleManifest
from dcr_enclave.formats.digests import sha256_file
from dcr_enclave.formats.grant import OutputLimits
from dcr_enclave.formats.receipt import VIOLATION_KINDS

#: What a path needs to be an output: UTF-8, and no control character or backslash (the receipt's schema
#: and the sealed tar refuse them), at most 4096 bytes with 255 per component.
_BAD_NAME_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_PATH_BYTES = 4096
_MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class OutputCheck:
    """The output check's result: public kinds, and the exact figures for reviewers only."""

    #: Kinds of problem from :data:`~dcr_enclave.formats.receipt.VIOLATION_KINDS`, in that order. Public:
    #: they go into the receipt and the failure reason, so they carry no count, size or name.
    kinds: list[str]
    #: The same with counts and figures; only ever sealed to the reviewers' key.
    details: list[str]


def collect_outputs(work: Path, outputs: Path, bundle: BundleManifest, limits: OutputLimits) -> OutputCheck:
    """Copy outputs out of the (dead) sandbox's working copy once they pass the grant's limits.

    Every count and size here is the notebook's to choose (a count can be a real age, a size a real amount),
    so the public result is the kind of each problem only; the figures are for reviewers.
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
    suffixes = tuple(limits.allowed_suffixes)
    refused = sum(1 for rel, _, _ in picked if not rel.lower().endswith(suffixes)) if suffixes else 0
    total = sum(size for _, _, size in picked)
    found = {
        "symbolic links present": (links > 0, f"{links} symbolic link(s)"),
        "special files present": (special > 0, f"{special} special file(s)"),
        "names that cannot be outputs": (unusable > 0, f"{unusable} file(s) with unusable names"),
        "file types the grant does not allow": (refused > 0, f"{refused} file(s) of a type not allowed"),
        "over the file limit": (len(picked) > limits.max_files, f"{len(picked)} files > {limits.max_files}"),
        "over the byte limit": (total > limits.max_bytes, f"{total} bytes > {limits.max_bytes}"),
    }
    assert tuple(found) == VIOLATION_KINDS
    check = OutputCheck(
        kinds=[kind for kind, (hit, _) in found.items() if hit],
        details=[detail for hit, detail in found.values() if hit],
    )
    if not check.kinds:
        for rel, p, _ in picked:
            dest = outputs / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
    return check


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
