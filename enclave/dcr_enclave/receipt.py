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

import base64
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from . import attestation, contract
from .digests import canonical_json, check_digest, sha256_bytes, sha256_stream
from .errors import DCRError, IntegrityError
from .jsonschemas import validate
from .jwk import MAX_JWKS_BYTES, parse_jwks, public_key_from_jwk, thumbprint

RECEIPT_SCHEMA: Final = "dcr/receipt/v1"
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
    if check["passed"] != (not check["violations"]):
        raise bad("output_check.passed must be true exactly when there are no violations")
    if doc["release"]["decision"] == "released" and not check["passed"]:
        raise bad("outputs that failed the output check cannot be released")
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
    release_mode: str,
    decision: str,
    started_at: float,
    finished_at: float,
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
            "output_check": {"passed": not violations, "violations": list(violations)},
            "release": {"mode": release_mode, "decision": decision},
            "started_at": format_time(started_at),
            "finished_at": format_time(finished_at),
        }
    )


# ---------------------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------------------


def _hash_regular(path: Path) -> tuple[str, int]:
    """Digest and size of a regular file, streamed; never follows a link or blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DCRError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            return sha256_stream(f)
    finally:
        os.close(fd)


def _scan(root: Path) -> tuple[dict[str, Path], list[str]]:
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


def output_entries(outputs_dir: str | Path) -> list[dict[str, Any]]:
    """``{"path", "size", "sha256"}`` for every file under ``outputs_dir``, sorted by UTF-8 path bytes.

    Links and special files are refused: outputs are regular files.
    """
    root = Path(outputs_dir)
    if root.is_symlink() or not root.is_dir():
        raise DCRError(f"outputs directory {root} is not a directory")
    files, problems = _scan(root)
    if problems:
        raise DCRError(f"refusing outputs that are not regular files: {'; '.join(problems[:5])}")
    entries = []
    for rel in sorted(files, key=lambda r: r.encode("utf-8", "surrogateescape")):
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise DCRError(f"output name {rel!r} is not UTF-8") from None
        digest, size = _hash_regular(files[rel])
        entries.append(OutputEntry(rel, size, digest).to_json())
    return entries


# ---------------------------------------------------------------------------------------------------------
# Writing a receipt directory
# ---------------------------------------------------------------------------------------------------------


def _jwks_doc(signer_jwks: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = signer_jwks.get("keys") if isinstance(signer_jwks, Mapping) else list(signer_jwks)
    if not isinstance(keys, list) or not keys:
        raise DCRError("the signer JWKS holds no keys")
    for k in keys:
        public_key_from_jwk(dict(k))  # refuses private or symmetric material
    return {"keys": [dict(k) for k in keys]}


def write_receipt_dir(
    directory: str | Path,
    manifest: ReceiptManifest,
    token: str,
    signer_jwks: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``receipt.json``, ``attestation.jwt`` and ``signer-jwks.json`` into ``directory``.

    The token must carry the manifest's digest as a nonce. Each file is written to a temporary file and
    renamed into place only once all three are ready; an existing, different receipt is never replaced.
    """
    d = Path(directory)
    body = manifest.to_bytes()
    try:
        payload = json.loads(_b64url(token.split(".")[1]))
        nonces = payload.get("eat_nonce")
    except (IndexError, ValueError, AttributeError):
        raise DCRError("the attestation token is not a readable JWT") from None
    if manifest.digest not in ([nonces] if isinstance(nonces, str) else nonces or []):
        raise DCRError("the attestation token's nonce is not this manifest's sha256", hint="attest it again")
    files = {
        contract.RECEIPT_FILE: body,
        contract.TOKEN_FILE: token.encode("ascii") + b"\n",
        contract.SIGNER_JWKS_FILE: canonical_json(_jwks_doc(signer_jwks)) + b"\n",
    }
    existing = d / contract.RECEIPT_FILE
    if existing.exists() and existing.read_bytes() != body:
        raise DCRError(f"{existing} already holds another receipt", hint="write receipts to a new directory")
    d.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.")
            temps[name] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # receipts are public
        # receipt.json last: its presence means the receipt is complete.
        for name in (contract.SIGNER_JWKS_FILE, contract.TOKEN_FILE, contract.RECEIPT_FILE):
            os.replace(temps.pop(name), d / name)
    finally:
        for tmp in temps.values():
            os.unlink(tmp)
    return d


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# ---------------------------------------------------------------------------------------------------------
# Checking a receipt directory
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One check's outcome; ``str()`` is the line ``dcr verify`` prints."""

    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


def _read_limited(path: Path, limit: int) -> bytes:
    """A regular file's bytes (no links), at most ``limit`` of them; raises DCRError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DCRError("missing") from None
    except OSError as e:
        raise DCRError(f"unreadable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DCRError("not a regular file")
        if st.st_size > limit:
            raise DCRError(f"larger than {limit} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise DCRError(f"larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


def _list(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _output_checks(root: Path, manifest: ReceiptManifest) -> list[Check]:
    listed = {o.path: o for o in manifest.outputs}
    problems: list[str] = []
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        present: dict[str, Path] = {}
        problems.append(f"{contract.OUTPUTS_DIR} is not a directory")
    elif root.is_dir():
        try:
            present, problems = _scan(root)
        except OSError as e:
            present, problems = {}, [f"{contract.OUTPUTS_DIR} is unreadable ({e.strerror})"]
    else:
        present = {}
    changed: list[str] = []
    for path, entry in listed.items():
        if path not in present:
            continue
        try:
            digest, size = _hash_regular(present[path])
        except (OSError, DCRError) as e:
            changed.append(f"{path} (unreadable: {getattr(e, 'strerror', None) or e})")
            continue
        if (digest, size) != (entry.sha256, entry.size):
            changed.append(
                f"{path} (sha256 {digest}, size {size}; receipt says {entry.sha256}, {entry.size})"
            )
    checked = len([p for p in listed if p in present])
    added = sorted(set(present) - set(listed)) + problems
    removed = sorted(set(listed) - set(present))
    return [
        Check(
            "output digests",
            not changed,
            f"changed: {_list(changed)}" if changed else f"{checked} output file(s) match their sha256",
        ),
        Check(
            "no output added",
            not added,
            f"not in the receipt: {_list(added)}" if added else "no file beyond the receipt's outputs",
        ),
        Check(
            "no output removed",
            not removed,
            f"missing: {_list(removed)}" if removed else f"all {len(listed)} output(s) present",
        ),
    ]


def _pinned_from_thumbprints(raw: bytes | None, thumbprints: Collection[str]) -> tuple[list[dict], list[str]]:
    """The keys of the receipt's signer JWKS whose thumbprints are pinned, and the pins left unmatched."""
    if raw is None:
        return [], list(thumbprints)
    keys = parse_jwks(raw, contract.SIGNER_JWKS_FILE)
    chosen = [k for k in keys if thumbprint(k) in thumbprints]
    found = {thumbprint(k) for k in chosen}
    return chosen, [t for t in thumbprints if t not in found]


def check_receipt_dir(
    directory: str | Path,
    *,
    trusted_keys: Sequence[Mapping[str, Any]] = (),
    trusted_thumbprints: Collection[str] = (),
    trust_root_pem: bytes | None = None,
    expected_enclave_digests: Collection[str] = (),
    require_hardware: bool = False,
    issuers: Collection[str] = (contract.GOOGLE_ISSUER, contract.LOCAL_ISSUER),
    audience: str = contract.RECEIPT_AUDIENCE,
) -> list[Check]:
    """Every check of a receipt directory, passed or failed; never raises for a failed check.

    Trust comes only from the arguments: ``trusted_keys`` (JWKs), ``trusted_thumbprints`` (RFC 7638; the
    key itself may then come from the receipt's ``signer-jwks.json``, but only a key with a pinned
    thumbprint is used) and ``trust_root_pem`` (root certificates for ``x5c`` tokens). ``exp`` is not
    checked: receipts are verified long after their tokens expire.
    """
    for t in trusted_thumbprints:
        check_digest(t, "a pinned key thumbprint")
    for t in expected_enclave_digests:
        check_digest(t, "an expected enclave digest")
    if not trusted_keys and not trusted_thumbprints and not trust_root_pem:
        raise DCRError(
            "no trust anchor pinned", hint="pin the signer's key or thumbprint, or a root certificate"
        )
    d = Path(directory)
    checks: list[Check] = []

    # -- files ----------------------------------------------------------------------------------------
    limits = {contract.RECEIPT_FILE: MAX_RECEIPT_BYTES, contract.TOKEN_FILE: attestation.MAX_TOKEN_BYTES}
    if trusted_thumbprints:
        limits[contract.SIGNER_JWKS_FILE] = MAX_JWKS_BYTES
    raw: dict[str, bytes | None] = {}
    bad_files: list[str] = []
    for name, limit in limits.items():
        try:
            raw[name] = _read_limited(d / name, limit)
        except DCRError as e:
            raw[name] = None
            bad_files.append(f"{name} {e.message}")
    checks.append(
        Check("files", not bad_files, _list(bad_files) if bad_files else ", ".join(limits) + " present")
    )

    # -- manifest and outputs -------------------------------------------------------------------------
    manifest: ReceiptManifest | None = None
    receipt_raw = raw[contract.RECEIPT_FILE]
    if receipt_raw is None:
        checks.append(Check("manifest schema", False, f"not checked: {contract.RECEIPT_FILE} unreadable"))
    else:
        try:
            manifest = ReceiptManifest.from_bytes(receipt_raw)
        except DCRError as e:
            checks.append(Check("manifest schema", False, e.message))
        else:
            checks.append(
                Check(
                    "manifest schema",
                    True,
                    f"{RECEIPT_SCHEMA}, {manifest.job_id}, {len(manifest.outputs)} output(s), "
                    f"decision {manifest.decision}",
                )
            )
    if manifest is not None:
        checks.extend(_output_checks(d / contract.OUTPUTS_DIR, manifest))
    else:
        for name in ("output digests", "no output added", "no output removed"):
            checks.append(Check(name, False, "not checked: no valid manifest"))

    # -- the token ------------------------------------------------------------------------------------
    token_raw = raw[contract.TOKEN_FILE]
    verified: attestation.VerifiedToken | None = None
    header: dict[str, Any] | None = None
    keys: list[dict[str, Any]] = []
    try:
        if token_raw is None:
            raise DCRError(f"{contract.TOKEN_FILE} unreadable")
        header = attestation.token_header(token_raw)
        keys = [dict(k) for k in trusted_keys]
        if trusted_thumbprints:
            chosen, unmatched = _pinned_from_thumbprints(
                raw.get(contract.SIGNER_JWKS_FILE), trusted_thumbprints
            )
            keys.extend(chosen)
            if not keys and not trust_root_pem:
                raise DCRError(
                    f"no key in {contract.SIGNER_JWKS_FILE} has a pinned thumbprint ({_list(unmatched)})"
                )
        verified = attestation.verify_signature(
            token_raw, trusted_keys=keys, trust_root_pem=trust_root_pem, verify_exp=False
        )
        checks.append(Check("signature", True, f"verified with {verified.anchor}"))
    except attestation.TokenCheckError as e:
        checks.append(
            Check("signature", False, f"{e.check}: {e.detail}" if e.check != "signature" else e.detail)
        )
    except DCRError as e:
        checks.append(Check("signature", False, e.message))
    if header is None:
        checks.append(Check("algorithm", False, "not checked: no readable token header"))
    else:
        checks.append(_algorithm_check(header, verified, keys, trust_root_pem))

    checks.extend(
        _claim_checks(
            verified.claims if verified else None,
            manifest,
            receipt_raw,
            issuers=issuers,
            audience=audience,
            expected_enclave_digests=expected_enclave_digests,
            require_hardware=require_hardware,
        )
    )
    return checks


def _algorithm_check(
    header: Mapping[str, Any],
    verified: attestation.VerifiedToken | None,
    keys: Sequence[Mapping[str, Any]],
    trust_root_pem: bytes | None,
) -> Check:
    """The algorithm is accepted and fits the pinned key's type (never ``none``, never HMAC)."""
    try:
        alg = attestation.check_algorithm(header)
    except attestation.TokenCheckError as e:
        return Check("algorithm", False, e.detail)
    if verified is not None:
        return Check("algorithm", True, f"{alg}, fits the key that verified the signature")
    if trust_root_pem and "x5c" in header:
        return Check("algorithm", True, f"{alg} (accepted)")
    fitting = []
    for k in keys:
        try:
            fitting.append(attestation.key_fits_alg(alg, attestation.pinned_public_key(k)))
        except DCRError:
            fitting.append(False)
    if keys and not any(fitting):
        return Check("algorithm", False, f"{alg} fits none of the pinned keys")
    return Check("algorithm", True, f"{alg} (accepted)")


def _claim_checks(
    claims: attestation.AttestationClaims | None,
    manifest: ReceiptManifest | None,
    receipt_raw: bytes | None,
    *,
    issuers: Collection[str],
    audience: str,
    expected_enclave_digests: Collection[str],
    require_hardware: bool,
) -> list[Check]:
    """The checks that read the verified claims; each fails as 'not checked' without them."""
    unsigned = "not checked: the token's signature did not verify"
    no_manifest = "not checked: no valid manifest"
    out: list[Check] = []

    def run(name: str, fn: Callable[[], str], *, needs_manifest: bool = False) -> None:
        if claims is None:
            out.append(Check(name, False, unsigned))
        elif needs_manifest and manifest is None:
            out.append(Check(name, False, no_manifest))
        else:
            try:
                out.append(Check(name, True, fn()))
            except attestation.TokenCheckError as e:
                out.append(Check(name, False, e.detail))
            except DCRError as e:
                out.append(Check(name, False, e.message))

    def env_check(var: str, field: str) -> Callable[[], str]:
        def fn() -> str:
            assert claims is not None and manifest is not None
            want = getattr(manifest, field)
            got = claims.attested_env(var)
            if got != want:
                raise DCRError(f"the receipt's {field} {want} is not the attested {var} {got}")
            return f"{want} (attested {var})"

        return fn

    def nonce() -> str:
        assert claims is not None
        if receipt_raw is None:
            raise DCRError(f"{contract.RECEIPT_FILE} unreadable")
        digest = sha256_bytes(receipt_raw)
        if digest not in claims.nonces:
            raise DCRError(
                f"the token's nonce ({_list(list(claims.nonces)) or 'none'}) is not the sha256 of "
                f"{contract.RECEIPT_FILE} ({digest}): the manifest is not the one attested"
            )
        return f"{digest} = sha256 of {contract.RECEIPT_FILE}"

    def enclave_digest() -> str:
        assert claims is not None and manifest is not None
        if claims.image_digest != manifest.image_digest:
            raise DCRError(
                f"the receipt says {manifest.image_digest}, the token's "
                f"submods.container.image_digest is {claims.image_digest}"
            )
        return f"{manifest.image_digest} (submods.container.image_digest)"

    def pinned_digest() -> str:
        assert claims is not None
        if claims.image_digest not in expected_enclave_digests:
            raise DCRError(
                f"the token's image digest {claims.image_digest} is not one of the expected "
                f"{_list(sorted(expected_enclave_digests))}"
            )
        return f"{claims.image_digest} is an expected enclave"

    def platform() -> str:
        assert claims is not None
        detail = attestation.check_platform(claims)
        if manifest is not None:
            want_simulated = manifest.enclave_kind == "local"
            if claims.is_simulated != want_simulated:
                raise DCRError(
                    f"the receipt says enclave kind {manifest.enclave_kind} but the token is "
                    f"{'simulated' if claims.is_simulated else 'from ' + claims.issuer}"
                )
        return detail

    def issued_at() -> str:
        assert claims is not None
        if claims.issued_at > time.time() + CLOCK_SKEW_SECONDS:
            raise DCRError(f"iat {claims.issued_at_iso} is in the future")
        return f"{claims.issued_at_iso} (exp not checked: receipts are verified after their tokens expire)"

    def issuer() -> str:
        assert claims is not None
        return attestation.check_issuer(claims, issuers)

    def audience_() -> str:
        assert claims is not None
        return attestation.check_audience(claims, audience)

    def hardware() -> str:
        assert claims is not None
        return attestation.check_hardware(claims)

    run("issuer", issuer)
    run("audience", audience_)
    run("nonce", nonce)
    run("enclave digest", enclave_digest, needs_manifest=True)
    run("bundle digest", env_check(contract.ENV.BUNDLE_DIGEST, "bundle_digest"), needs_manifest=True)
    run("hub key", env_check(contract.ENV.HUB_KEY_THUMBPRINT, "hub_key_thumbprint"), needs_manifest=True)
    run("job id", env_check(contract.ENV.JOB_ID, "job_id"), needs_manifest=True)
    if expected_enclave_digests:
        run("pinned enclave digest", pinned_digest)
    run("platform", platform)
    if require_hardware:
        run("hardware", hardware)
    run("issued at", issued_at)
    return out
