"""The receipt: a public, data-free manifest of a job and the attestation token that signs it.

The manifest binds the bundle digest, the enclave measurement, the grant (claims and digest), the datasets
with their versions and ciphertext digests, the policy digests, every output file's sha256, the output
check and the release decision. The enclave asks its platform for an attestation token whose nonce is the
sha256 of the manifest's exact bytes (canonical JSON), so the token vouches for every byte of it.

A receipt directory holds ``receipt.json``, ``attestation.jwt``, ``signer-jwks.json`` (a convenience copy
of the signer's keys that is never trusted on its own) and, once decrypted by the recipient,
``outputs/<path>``. :func:`check_receipt_dir` checks one against trust anchors the verifier pins and
reports every check, passed or failed, without raising.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from dcr_enclave.formats.digests import canonical_json, sha256_bytes, sha256_json, sha256_stream
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.jsonschemas import validate

RECEIPT_SCHEMA: Final = "dcr/receipt/v1"
#: What a receipt may say about refused outputs: the kinds of problem, never a count, size or name (all of
#: them the notebook's to choose, and the receipt is public). The order is the order they are listed in.
VIOLATION_KINDS: Final = (
    "symbolic links present",
    "special files present",
    "names that cannot be outputs",
    "file types the grant does not allow",
    "over the file limit",
    "over the byte limit",
)
#: What a receipt may say about the statistical disclosure checks on tables
#: (:mod:`dcr_enclave.runtime.disclosure`): kinds of finding, each once, in this order; never a file, row,
#: value or threshold-derived figure. Outputs with any of them are held for review, never released at once.
DISCLOSURE_KINDS: Final = (
    "frequency cells below the minimum count",
    "suppressed cells recoverable from totals",
    "dominated cells",
    "extreme values of records",
    "tables too large to check",
    "tables that cannot be read",
)
#: The document that opens a held receipt's output commitment (sealed with the outputs until release).
REVEAL_SCHEMA: Final = "dcr/output-reveal/v1"
SALT_HEX_CHARS: Final = 64
MAX_RECEIPT_BYTES: Final = 32 * 1024 * 1024
#: Tolerated difference between the token's clock and the verifier's, in seconds.
CLOCK_SKEW_SECONDS: Final = 300
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputEntry:
    """One output file: its path under ``outputs/``, size and sha256."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ReceiptManifest:
    """A receipt manifest, valid by construction (schema plus the invariants in :func:`_check_invariants`).

    Nested parts other than the outputs stay plain JSON objects: they are what the schema describes.
    """

    job_id: str
    notebook: str
    bundle_digest: str
    enclave: Mapping[str, str]
    hub_key_thumbprint: str
    grant: Mapping[str, Any]
    datasets: tuple[Mapping[str, Any], ...]
    policies: Mapping[str, Any]
    outputs: tuple[OutputEntry, ...]
    output_check: Mapping[str, Any]
    release: Mapping[str, str]
    started_at: str
    finished_at: str

    def __post_init__(self) -> None:
        # Round-trip through the validator so that a directly constructed manifest is as checked as a parsed one.
        _validate(self.to_json())

    @property
    def enclave_kind(self) -> str:
        return self.enclave["kind"]

    @property
    def image_digest(self) -> str:
        return self.enclave["image_digest"]

    @property
    def decision(self) -> str:
        return self.release["decision"]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": RECEIPT_SCHEMA,
            "job_id": self.job_id,
            "notebook": self.notebook,
            "bundle_digest": self.bundle_digest,
            "enclave": dict(self.enclave),
            "hub_key_thumbprint": self.hub_key_thumbprint,
            "grant": json.loads(json.dumps(self.grant)),
            "datasets": json.loads(json.dumps(list(self.datasets))),
            "policies": json.loads(json.dumps(self.policies)),
            "outputs": [o.to_json() for o in self.outputs],
            "output_check": json.loads(json.dumps(self.output_check)),
            "release": dict(self.release),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }

    def to_bytes(self) -> bytes:
        """The exact bytes of ``receipt.json`` (canonical JSON)."""
        return canonical_json(self.to_json())

    @cached_property
    def digest(self) -> str:
        """sha256 of :meth:`to_bytes`: the nonce the attestation token must carry."""
        return sha256_bytes(self.to_bytes())

    @classmethod
    def from_json(cls, doc: Any) -> ReceiptManifest:
        """Parse a manifest document, refusing anything the schema or the invariants do not allow."""
        _validate(doc)
        return cls(
            job_id=doc["job_id"],
            notebook=doc["notebook"],
            bundle_digest=doc["bundle_digest"],
            enclave=dict(doc["enclave"]),
            hub_key_thumbprint=doc["hub_key_thumbprint"],
            grant=doc["grant"],
            datasets=tuple(doc["datasets"]),
            policies=doc["policies"],
            outputs=tuple(OutputEntry(o["path"], o["size"], o["sha256"]) for o in doc["outputs"]),
            output_check=doc["output_check"],
            release=dict(doc["release"]),
            started_at=doc["started_at"],
            finished_at=doc["finished_at"],
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ReceiptManifest:
        """Parse ``receipt.json``; its bytes must be the canonical JSON of what they hold."""
        if len(raw) > MAX_RECEIPT_BYTES:
            raise IntegrityError(f"receipt manifest is larger than {MAX_RECEIPT_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IntegrityError(f"receipt manifest is not JSON: {e}") from None
        except RecursionError:
            raise IntegrityError("receipt manifest is nested too deeply") from None
        manifest = cls.from_json(doc)
        # Canonical bytes rule out duplicate keys and any second reading of the signed bytes.
        if manifest.to_bytes() != raw:
            raise IntegrityError("receipt manifest is not in canonical form (sorted keys, no white space)")
        return manifest


def _validate(doc: Any) -> None:
    validate(doc, "receipt.schema.json", "receipt manifest", error=IntegrityError)
    _check_invariants(doc)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _check_invariants(doc: Mapping[str, Any]) -> None:
    """What the schema cannot say: order, uniqueness and agreement between parts."""

    def bad(msg: str) -> IntegrityError:
        return IntegrityError(f"receipt manifest is invalid: {msg}")

    prev: bytes | None = None
    paths: set[str] = set()
    for o in doc["outputs"]:
        key = o["path"].encode("utf-8", "surrogateescape")
        if prev is not None and key <= prev:
            raise bad(f"output {o['path']!r} is duplicated or out of order (sorted by UTF-8 bytes)")
        prev = key
        paths.add(o["path"])
    for path in paths:
        parts = path.split("/")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in paths:
                raise bad(f"{'/'.join(parts[:k])!r} is listed as a file and as the directory of {path!r}")
    check = doc["output_check"]
    kinds = [VIOLATION_KINDS.index(v) for v in check["violations"]]
    if kinds != sorted(set(kinds)):
        raise bad("output_check.violations must list each kind once, in the order of VIOLATION_KINDS")
    held = doc["release"]["decision"] == "held"
    if held != ("outputs_commitment" in doc["release"]):
        raise bad("a held receipt, and only a held one, commits to its outputs (release.outputs_commitment)")
    if held and doc["outputs"]:
        raise bad("a held receipt names no output: it commits to them until they are released")
    found = [DISCLOSURE_KINDS.index(v) for v in check.get("disclosure", [])]
    if found != sorted(set(found)):
        raise bad("output_check.disclosure must list each kind once, in the order of DISCLOSURE_KINDS")
    if check["passed"] != (not check["violations"]):
        raise bad("output_check.passed must be true exactly when there are no violations")
    if doc["release"]["decision"] == "released" and not check["passed"]:
        raise bad("outputs that failed the output check cannot be released")
    if doc["release"]["decision"] == "released" and check.get("disclosure"):
        raise bad("outputs with disclosure findings cannot be released without review")
    keys = set()
    for d in doc["datasets"]:
        key = f"{d['provider']}/{d['dataset']}"
        if key in keys:
            raise bad(f"dataset {key} is listed twice")
        keys.add(key)
        names = [f["name"] for f in d["files"]]
        if len(set(names)) != len(names):
            raise bad(f"dataset {key} lists a file twice")
    stray = set(doc["policies"]["conditions"]) - keys
    if stray:
        raise bad(f"conditions for datasets the receipt does not list: {', '.join(sorted(stray))}")
    if _parse_time(doc["started_at"]) > _parse_time(doc["finished_at"]):
        raise bad("started_at is after finished_at")
    # The grant's claims must describe this job; checked when present (the grant format is the hub's).
    claims = doc["grant"]["claims"]
    for field in ("job_id", "bundle_digest"):
        if field in claims and claims[field] != doc[field]:
            raise bad(f"the grant's {field} {claims[field]!r} is not the receipt's {doc[field]!r}")
    granted = claims.get("datasets")
    if isinstance(granted, list):
        versions = {
            f"{g.get('provider')}/{g.get('dataset')}": g.get("version")
            for g in granted
            if isinstance(g, dict)
        }
        for d in doc["datasets"]:
            key = f"{d['provider']}/{d['dataset']}"
            if versions.get(key) != d["version"]:
                raise bad(f"dataset {key} at {d['version']} is not granted")


def format_time(seconds: float) -> str:
    """A receipt timestamp: UTC, RFC 3339, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def make_reveal(outputs: Sequence[OutputEntry | Mapping[str, Any]], salt: bytes) -> dict[str, Any]:
    """The document a held receipt's commitment opens to: the outputs and a random salt (32 bytes)."""
    if len(salt) * 2 != SALT_HEX_CHARS:
        raise DCRError("the commitment salt must be 32 bytes")
    entries = [o.to_json() if isinstance(o, OutputEntry) else dict(o) for o in outputs]
    return {"schema": REVEAL_SCHEMA, "salt": salt.hex(), "outputs": entries}


def output_commitment(reveal: Mapping[str, Any]) -> str:
    """sha256 of the reveal document's canonical JSON: names, sizes and digests stay hidden behind the salt."""
    return sha256_json(dict(reveal))


def build_manifest(
    *,
    job_id: str,
    notebook: str,
    bundle_digest: str,
    enclave_kind: str,
    image_digest: str,
    hub_key_thumbprint: str,
    grant_token: str | bytes,
    grant_claims: Mapping[str, Any],
    datasets: Sequence[Mapping[str, Any]],
    output_policy: str,
    conditions: Mapping[str, str],
    outputs: Iterable[OutputEntry | Mapping[str, Any]],
    violations: Sequence[str],
    disclosure: Sequence[str],
    release_mode: str,
    decision: str,
    started_at: float,
    finished_at: float,
    outputs_commitment: str | None = None,
) -> ReceiptManifest:
    """A manifest from its parts; the grant digest is computed from the grant JWT's bytes."""
    raw_grant = grant_token.encode() if isinstance(grant_token, str) else grant_token
    return ReceiptManifest.from_json(
        {
            "schema": RECEIPT_SCHEMA,
            "job_id": job_id,
            "notebook": notebook,
            "bundle_digest": bundle_digest,
            "enclave": {"kind": enclave_kind, "image_digest": image_digest},
            "hub_key_thumbprint": hub_key_thumbprint,
            "grant": {"digest": sha256_bytes(raw_grant), "claims": dict(grant_claims)},
            "datasets": [dict(d) for d in datasets],
            "policies": {"output_policy": output_policy, "conditions": dict(conditions)},
            "outputs": [o.to_json() if isinstance(o, OutputEntry) else dict(o) for o in outputs],
            "output_check": {
                "passed": not violations,
                "violations": list(violations),
                "disclosure": list(disclosure),
            },
            "release": {"mode": release_mode, "decision": decision}
            | ({"outputs_commitment": outputs_commitment} if outputs_commitment else {}),
            "started_at": format_time(started_at),
            "finished_at": format_time(finished_at),
        }
    )


def hash_regular_file(path: Path) -> tuple[str, int]:
    """Digest and size of a regular file, streamed; never follows a link or blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DCRError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            return sha256_stream(f)
    finally:
        os.close(fd)


def scan_outputs(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under ``root`` by relative path, and what is there but cannot be an output."""
    files: dict[str, Path] = {}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if _CONTROL_RE.search(rel):
                problems.append(f"{rel!r}: control characters in the name")
                continue
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: a symbolic link")
            elif stat.S_ISDIR(mode):
                continue
            elif not stat.S_ISREG(mode):
                problems.append(f"{rel}: a special file")
            else:
                files[rel] = p
    # os.walk lists links to directories among dirnames but never enters them.
    return files, problems
