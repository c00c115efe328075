"""Checking a receipt directory offline against trust anchors the verifier pins.

:func:`check_receipt_dir` reports every check, passed or failed, without raising: the manifest's schema and
invariants, the attestation token (signature against a pinned key or a chain to a pinned root, issuer,
audience, nonce = the manifest's sha256, platform claims), the pinned enclave measurement, optionally the
pinned hub key (the attested thumbprint of the key the enclave verified the job's grant with) and every
output file's digest.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import MAX_TOKEN_BYTES, AttestationClaims, TokenCheckError
from dcr_enclave.formats.digests import check_digest, sha256_bytes
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.jwk import MAX_JWKS_BYTES, parse_jwks, thumbprint
from dcr_enclave.formats.receipt import (
    CLOCK_SKEW_SECONDS,
    MAX_RECEIPT_BYTES,
    RECEIPT_SCHEMA,
    REVEAL_SCHEMA,
    SALT_HEX_CHARS,
    OutputEntry,
    ReceiptManifest,
    hash_regular_file,
    output_commitment,
    scan_outputs,
)
from dcr_enclave.verify.token import (
    VerifiedToken,
    check_algorithm,
    check_audience,
    check_hardware,
    check_issuer,
    check_platform,
    key_fits_alg,
    pinned_public_key,
    token_header,
    verify_signature,
)

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


def open_commitment(raw: bytes, commitment: str) -> tuple[OutputEntry, ...]:
    """The outputs a reveal document lists, once it matches ``commitment``; IntegrityError otherwise."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError("the output reveal is not JSON") from None
    ok_shape = (
        isinstance(doc, dict)
        and set(doc) == {"schema", "salt", "outputs"}
        and doc["schema"] == REVEAL_SCHEMA
        and isinstance(doc["salt"], str)
        and len(doc["salt"]) == SALT_HEX_CHARS
        and isinstance(doc["outputs"], list)
    )
    if not ok_shape:
        raise IntegrityError("the output reveal is not a dcr/output-reveal/v1 document")
    if output_commitment(doc) != commitment:
        raise IntegrityError("the output reveal does not match the receipt's commitment")
    entries = []
    for o in doc["outputs"]:
        if not (isinstance(o, dict) and set(o) == {"path", "size", "sha256"}):
            raise IntegrityError("the output reveal lists a malformed output")
        entries.append(
            OutputEntry(str(o["path"]), int(o["size"]), check_digest(o["sha256"], "output sha256"))
        )
    return tuple(entries)


def _commitment_check(d: Path, manifest: ReceiptManifest) -> tuple[Check, tuple[OutputEntry, ...] | None]:
    """A held receipt's outputs: revealed (and checked against the commitment) or still committed."""
    commitment = manifest.release["outputs_commitment"]
    reveal = d / contract.REVEAL_FILE
    if not reveal.exists() and not reveal.is_symlink():
        return Check(
            "output commitment", True, f"held: outputs committed to ({commitment}), not revealed"
        ), None
    try:
        entries = open_commitment(_read_limited(reveal, MAX_RECEIPT_BYTES), commitment)
    except DCRError as e:
        return Check("output commitment", False, e.message), None
    return Check(
        "output commitment", True, f"{contract.REVEAL_FILE} opens it: {len(entries)} output(s)"
    ), entries


def _disclosure_check(manifest: ReceiptManifest) -> Check:
    """What the enclave's disclosure checks on tables found (kinds only; the schema and invariants have
    already refused a released receipt with findings)."""
    found = manifest.output_check.get("disclosure")
    if found is None:
        return Check("disclosure checks", True, "not recorded (the receipt predates them)")
    if not found:
        return Check("disclosure checks", True, "no finding")
    return Check(
        "disclosure checks",
        True,
        f"{'; '.join(found)}: outputs {'held for review' if manifest.decision == 'held' else 'refused'}",
    )


def _output_checks(
    root: Path, manifest: ReceiptManifest, revealed: tuple[OutputEntry, ...] | None
) -> list[Check]:
    listed = {o.path: o for o in (manifest.outputs if revealed is None else revealed)}
    problems: list[str] = []
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        present: dict[str, Path] = {}
        problems.append(f"{contract.OUTPUTS_DIR} is not a directory")
    elif root.is_dir():
        try:
            present, problems = scan_outputs(root)
        except OSError as e:
            present, problems = {}, [f"{contract.OUTPUTS_DIR} is unreadable ({e.strerror})"]
    else:
        present = {}
    changed: list[str] = []
    for path, entry in listed.items():
        if path not in present:
            continue
        try:
            digest, size = hash_regular_file(present[path])
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
    expected_hub_keys: Collection[str] = (),
    require_hardware: bool = False,
    issuers: Collection[str] = (contract.GOOGLE_ISSUER, contract.LOCAL_ISSUER),
    audience: str = contract.RECEIPT_AUDIENCE,
) -> list[Check]:
    """Every check of a receipt directory, passed or failed; never raises for a failed check.

    Trust comes only from the arguments: ``trusted_keys`` (JWKs), ``trusted_thumbprints`` (RFC 7638; the
    key itself may then come from the receipt's ``signer-jwks.json``, but only a key with a pinned
    thumbprint is used) and ``trust_root_pem`` (root certificates for ``x5c`` tokens). ``exp`` is not
    checked: receipts are verified long after their tokens expire. With ``expected_hub_keys`` (RFC 7638
    thumbprints) the check "pinned hub key" requires the hub key the enclave verified the job's grant with,
    as the token attests it, to be one of them.
    """
    for t in trusted_thumbprints:
        check_digest(t, "a pinned key thumbprint")
    for t in expected_enclave_digests:
        check_digest(t, "an expected enclave digest")
    for t in expected_hub_keys:
        check_digest(t, "a pinned hub key thumbprint")
    if not trusted_keys and not trusted_thumbprints and not trust_root_pem:
        raise DCRError(
            "no trust anchor pinned", hint="pin the signer's key or thumbprint, or a root certificate"
        )
    d = Path(directory)
    checks: list[Check] = []

    # -- files ----------------------------------------------------------------------------------------
    limits = {contract.RECEIPT_FILE: MAX_RECEIPT_BYTES, contract.TOKEN_FILE: MAX_TOKEN_BYTES}
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
        checks.append(_disclosure_check(manifest))
        revealed = None
        if manifest.decision == "held":
            check, revealed = _commitment_check(d, manifest)
            checks.append(check)
        checks.extend(_output_checks(d / contract.OUTPUTS_DIR, manifest, revealed))
    else:
        for name in ("disclosure checks", "output digests", "no output added", "no output removed"):
            checks.append(Check(name, False, "not checked: no valid manifest"))

    # -- the token ------------------------------------------------------------------------------------
    token_raw = raw[contract.TOKEN_FILE]
    verified: VerifiedToken | None = None
    header: dict[str, Any] | None = None
    keys: list[dict[str, Any]] = []
    try:
        if token_raw is None:
            raise DCRError(f"{contract.TOKEN_FILE} unreadable")
        header = token_header(token_raw)
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
        verified = verify_signature(
            token_raw, trusted_keys=keys, trust_root_pem=trust_root_pem, verify_exp=False
        )
        checks.append(Check("signature", True, f"verified with {verified.anchor}"))
    except TokenCheckError as e:
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
            expected_hub_keys=expected_hub_keys,
            require_hardware=require_hardware,
        )
    )
    return checks


def _algorithm_check(
    header: Mapping[str, Any],
    verified: VerifiedToken | None,
    keys: Sequence[Mapping[str, Any]],
    trust_root_pem: bytes | None,
) -> Check:
    """The algorithm is accepted and fits the pinned key's type (never ``none``, never HMAC)."""
    try:
        alg = check_algorithm(header)
    except TokenCheckError as e:
        return Check("algorithm", False, e.detail)
    if verified is not None:
        return Check("algorithm", True, f"{alg}, fits the key that verified the signature")
    if trust_root_pem and "x5c" in header:
        return Check("algorithm", True, f"{alg} (accepted)")
    fitting = []
    for k in keys:
        try:
            fitting.append(key_fits_alg(alg, pinned_public_key(k)))
        except DCRError:
            fitting.append(False)
    if keys and not any(fitting):
        return Check("algorithm", False, f"{alg} fits none of the pinned keys")
    return Check("algorithm", True, f"{alg} (accepted)")


def _claim_checks(
    claims: AttestationClaims | None,
    manifest: ReceiptManifest | None,
    receipt_raw: bytes | None,
    *,
    issuers: Collection[str],
    audience: str,
    expected_enclave_digests: Collection[str],
    expected_hub_keys: Collection[str] = (),
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
            except TokenCheckError as e:
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
        if not expected_enclave_digests:
            # Any workload of the platform could have signed this token: without the code pinned, a
            # valid signature says nothing about what ran.
            raise DCRError(
                f"no enclave digest is pinned, so any code could have produced this receipt (it names "
                f"{claims.image_digest}); pin the enclave code you expect"
            )
        if claims.image_digest not in expected_enclave_digests:
            raise DCRError(
                f"the token's image digest {claims.image_digest} is not one of the expected "
                f"{_list(sorted(expected_enclave_digests))}"
            )
        return f"{claims.image_digest} is an expected enclave"

    def pinned_hub_key() -> str:
        assert claims is not None
        # The attested launch environment names the key the enclave verified the grant with (the manifest
        # copies it; the "hub key" check holds the two together).
        attested = claims.attested_env(contract.ENV.HUB_KEY_THUMBPRINT)
        if attested is None:
            raise DCRError(
                f"the token attests no {contract.ENV.HUB_KEY_THUMBPRINT}: no hub key can be pinned"
            )
        if attested not in expected_hub_keys:
            raise DCRError(
                f"the job's grant was verified with hub key {attested}, which is not one of the pinned hub "
                f"keys ({_list(sorted(expected_hub_keys))}): another hub authorised this job"
            )
        return f"{attested} is a pinned hub key (attested {contract.ENV.HUB_KEY_THUMBPRINT})"

    def platform() -> str:
        assert claims is not None
        detail = check_platform(claims)
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
        return check_issuer(claims, issuers)

    def audience_() -> str:
        assert claims is not None
        return check_audience(claims, audience)

    def hardware() -> str:
        assert claims is not None
        return check_hardware(claims)

    run("issuer", issuer)
    run("audience", audience_)
    run("nonce", nonce)
    run("enclave digest", enclave_digest, needs_manifest=True)
    run("bundle digest", env_check(contract.ENV.BUNDLE_DIGEST, "bundle_digest"), needs_manifest=True)
    run("hub key", env_check(contract.ENV.HUB_KEY_THUMBPRINT, "hub_key_thumbprint"), needs_manifest=True)
    run("job id", env_check(contract.ENV.JOB_ID, "job_id"), needs_manifest=True)
    run("pinned enclave digest", pinned_digest)
    if expected_hub_keys:
        run("pinned hub key", pinned_hub_key)
    run("platform", platform)
    if require_hardware:
        run("hardware", hardware)
    run("issued at", issued_at)
    return out
