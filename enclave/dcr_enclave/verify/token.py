"""Verifying attestation tokens against pinned anchors, one function per check.

Verification never takes a key from the token: the key is one of the verifier's pinned JWKs, or the leaf
of an ``x5c`` chain that ends at a pinned root certificate. Each step is a separate function so that a
receipt check can report every step on its own line; :func:`verify_token` runs them all and raises
:class:`~dcr_enclave.formats.attestation.TokenCheckError` naming the first check that failed.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import (
    DBGSTAT_PRODUCTION,
    HARDWARE_HWMODELS,
    LEEWAY_SECONDS,
    MAX_CHAIN_LENGTH,
    MAX_TOKEN_BYTES,
    SIMULATED_NOTE,
    SUPPORT_STABLE,
    AttestationClaims,
    TokenCheckError,
    format_timestamp,
)
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import PublicKey, public_key_from_jwk, thumbprint

# ---------------------------------------------------------------------------------------------------------
# Verification, one function per check
# ---------------------------------------------------------------------------------------------------------


def token_header(token: str | bytes) -> dict[str, Any]:
    """The unverified JOSE header of a compact JWT; raises check ``format``."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenCheckError("format", "the token is not ASCII") from None
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenCheckError("format", f"the token is larger than {MAX_TOKEN_BYTES} bytes")
    if token.count(".") != 2:
        raise TokenCheckError("format", "not a compact JWS (header.payload.signature)")
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, RecursionError) as e:
        raise TokenCheckError("format", f"unreadable header: {e}") from None
    return header


def check_algorithm(header: Mapping[str, Any]) -> str:
    """The header's ``alg`` if DCR accepts it (ES256, RS256); ``none`` and HMAC never."""
    alg = header.get("alg")
    if alg not in contract.ACCEPTED_ALGORITHMS:
        raise TokenCheckError(
            "algorithm", f"alg {alg!r} is not accepted (only {', '.join(contract.ACCEPTED_ALGORITHMS)})"
        )
    return str(alg)


def key_fits_alg(alg: str, key: PublicKey) -> bool:
    """Whether ``key`` is the key type ``alg`` needs (ES256: EC P-256, RS256: RSA)."""
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    return isinstance(key, rsa.RSAPublicKey)


def load_trust_roots(pem: bytes) -> list[x509.Certificate]:
    """Root certificates from PEM (one or more); refuses anything else."""
    try:
        roots = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise DCRError(f"the trust root is not a PEM certificate: {e}") from None
    if not roots:
        raise DCRError("the trust root holds no certificate")
    return roots


def _cert_name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(no subject)"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _valid_at(cert: x509.Certificate, when: datetime) -> bool:
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


def verify_chain(
    x5c: Any, roots: Sequence[x509.Certificate], at: int
) -> tuple[x509.Certificate, x509.Certificate]:
    """The leaf and the pinned root of an ``x5c`` chain that verifies up to ``roots``, valid at ``at``.

    Each certificate must be issued (and signed) by the next; the last either is a pinned root or is
    issued by one. Every issuer must be a CA. Raises check ``signature``.
    """
    if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
        raise TokenCheckError("signature", "x5c must be a non-empty list of base64 certificates")
    if len(x5c) > MAX_CHAIN_LENGTH:
        raise TokenCheckError("signature", f"x5c chain longer than {MAX_CHAIN_LENGTH} certificates")
    try:
        chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
    except (ValueError, binascii.Error) as e:
        raise TokenCheckError("signature", f"unreadable x5c certificate: {e}") from None
    when = datetime.fromtimestamp(at, UTC)
    for cert, parent in itertools.pairwise(chain):
        _check_link(cert, parent)
    last = chain[-1]
    last_der = last.public_bytes(Encoding.DER)
    anchor = next((r for r in roots if r.public_bytes(Encoding.DER) == last_der), None)
    if anchor is None:
        # The chain stops below the root: the last certificate must be issued by a pinned root.
        candidates = [r for r in roots if r.subject == last.issuer]
        if not candidates:
            raise TokenCheckError(
                "signature", f"the x5c chain ends at {last.issuer.rfc4514_string()!r}, not at a pinned root"
            )
        errors = []
        for root in candidates:
            try:
                _check_link(last, root)
            except TokenCheckError as e:
                errors.append(e.detail)
            else:
                anchor = root
                break
        if anchor is None:
            raise TokenCheckError("signature", "; ".join(errors))
    for cert in [*chain, anchor]:
        if not _valid_at(cert, when):
            raise TokenCheckError(
                "signature",
                f"x5c certificate {_cert_name(cert)!r} was not valid at iat {format_timestamp(at)}",
            )
    return chain[0], anchor


def _check_link(cert: x509.Certificate, parent: x509.Certificate) -> None:
    if not _is_ca(parent):
        raise TokenCheckError("signature", f"x5c issuer {_cert_name(parent)!r} is not a CA")
    try:
        cert.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise TokenCheckError(
            "signature", f"x5c certificate {_cert_name(cert)!r} is not signed by {_cert_name(parent)!r}"
        ) from None


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature verified: its header, claims and the pinned anchor that vouched for it."""

    header: Mapping[str, Any]
    claims: AttestationClaims
    alg: str
    anchor: str


def _decode(token: str, key: PublicKey, alg: str, verify_exp: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "verify_signature": True,
        "verify_exp": verify_exp,
        "verify_nbf": verify_exp,
        "verify_iat": False,
        "verify_aud": False,
        "verify_iss": False,
        "verify_sub": False,
        "verify_jti": False,
        "require": ["exp"] if verify_exp else [],
    }
    return jwt.decode(token, key=key, algorithms=[alg], options=options, leeway=LEEWAY_SECONDS)  # type: ignore[arg-type]


def pinned_public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key of a pinned JWK; any unusable JWK is a :class:`DCRError`."""
    try:
        return public_key_from_jwk(dict(jwk))
    except DCRError as e:  # e.g. an "alg" member that does not fit the key type
        raise DCRError(f"unusable pinned key {jwk.get('kid', '')!r}: {e.message}") from None


def _unverified_iat(token: str) -> int:
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, RecursionError) as e:
        raise TokenCheckError("signature", f"unreadable payload: {e}") from None
    iat = payload.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int):
        raise TokenCheckError("claims", "claim iat must be an integer (seconds since the epoch)")
    return iat


def verify_signature(
    token: str | bytes,
    *,
    trusted_keys: Sequence[Mapping[str, Any]] | None,
    trust_root_pem: bytes | None,
    verify_exp: bool,
) -> VerifiedToken:
    """Verify the signature against pinned anchors only, then type-check the claims.

    The key is a pinned JWK (matched by ``kid`` or thumbprint, else every pinned key is tried) whose type
    fits ``alg``, or the leaf of an ``x5c`` chain to a pinned root. Keys carried by the token (``jwk``,
    ``jku``, ``x5u``, an ``x5c`` without a pinned root) are never used.
    """
    header = token_header(token)
    text = token.decode("ascii").strip() if isinstance(token, bytes) else token.strip()
    try:
        alg = check_algorithm(header)
    except TokenCheckError as e:
        raise TokenCheckError("signature", e.detail) from None
    if not trusted_keys and not trust_root_pem:
        raise DCRError("no trust anchor pinned", hint="pin a signer key or a root certificate")
    failures: list[str] = []

    def attempt(key: PublicKey, anchor: str) -> VerifiedToken | None:
        try:
            payload = _decode(text, key, alg, verify_exp)
        except jwt.ExpiredSignatureError:
            raise TokenCheckError("expiry", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenCheckError("expiry", "the token is not valid yet (nbf)") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenCheckError("expiry", f"the token has no {e.claim} claim") from None
        except jwt.InvalidSignatureError:
            failures.append(f"signature does not verify with {anchor}")
            return None
        except (jwt.PyJWTError, RecursionError) as e:
            raise TokenCheckError("signature", f"unreadable token: {e}") from None
        return VerifiedToken(header, AttestationClaims.from_payload(payload), alg, anchor)

    if trust_root_pem and "x5c" in header:
        roots = load_trust_roots(trust_root_pem)
        try:
            leaf, root = verify_chain(header["x5c"], roots, _unverified_iat(text))
        except TokenCheckError as e:
            failures.append(e.detail)
        else:
            leaf_key = leaf.public_key()
            if not isinstance(leaf_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or not key_fits_alg(
                alg, leaf_key
            ):
                failures.append(f"the x5c leaf key does not fit alg {alg}")
            elif done := attempt(leaf_key, f"x5c chain to pinned root {_cert_name(root)!r}"):
                return done
    elif trust_root_pem and not trusted_keys:
        failures.append("the token carries no x5c chain for the pinned root")

    pinned = [(jwk, pinned_public_key(jwk)) for jwk in trusted_keys or ()]
    kid = header.get("kid")
    by_kid = [(j, k) for j, k in pinned if kid is not None and kid in (j.get("kid"), thumbprint(dict(j)))]
    fitting = [(j, k) for j, k in (by_kid or pinned) if key_fits_alg(alg, k) and j.get("alg") in (None, alg)]
    if pinned and not fitting:
        failures.append(f"no pinned key fits alg {alg}")
    for jwk_, key in fitting:
        if done := attempt(key, f"pinned key {thumbprint(dict(jwk_))}"):
            return done
    raise TokenCheckError("signature", "; ".join(failures) or "no pinned anchor verifies the token")


def check_issuer(claims: AttestationClaims, issuers: Collection[str]) -> str:
    if claims.issuer not in issuers:
        raise TokenCheckError("issuer", f"{claims.issuer!r} is not one of {', '.join(sorted(issuers))}")
    return claims.issuer


def check_audience(claims: AttestationClaims, audience: str) -> str:
    if claims.audience != (audience,):
        raise TokenCheckError("audience", f"{', '.join(claims.audience)!r} is not {audience!r}")
    return audience


def check_nonce(claims: AttestationClaims, nonce: str) -> str:
    if nonce not in claims.nonces:
        shown = ", ".join(claims.nonces) or "none"
        raise TokenCheckError("nonce", f"{nonce} is not among the token's nonces ({shown})")
    return nonce


def check_platform(claims: AttestationClaims) -> str:
    """The platform claims fit the issuer: production Confidential Space for Google, the simulation locally."""
    summary = f"hwmodel {claims.hwmodel}, swname {claims.swname}, dbgstat {claims.dbgstat}"
    if claims.issuer == contract.GOOGLE_ISSUER:
        problems = []
        if claims.swname != contract.HARDWARE_SWNAME:
            problems.append(f"swname {claims.swname!r} is not {contract.HARDWARE_SWNAME}")
        if claims.dbgstat != DBGSTAT_PRODUCTION:
            problems.append(f"dbgstat {claims.dbgstat!r} is not {DBGSTAT_PRODUCTION} (a debug image)")
        if SUPPORT_STABLE not in claims.support_attributes:
            problems.append(f"support attributes {list(claims.support_attributes)} lack {SUPPORT_STABLE}")
        if claims.hwmodel not in HARDWARE_HWMODELS:
            problems.append(f"hwmodel {claims.hwmodel!r} is not a memory-encrypting TEE")
        if claims.secboot is not True:
            problems.append("secboot is not true")
        if problems:
            raise TokenCheckError("platform", "; ".join(problems))
        return f"{summary}, support {','.join(claims.support_attributes)}"
    if claims.issuer == contract.LOCAL_ISSUER:
        if claims.hwmodel != contract.LOCAL_HWMODEL or claims.swname != contract.LOCAL_SWNAME:
            raise TokenCheckError(
                "platform",
                f"a local enclave host token must say hwmodel {contract.LOCAL_HWMODEL} and swname "
                f"{contract.LOCAL_SWNAME}, not {claims.hwmodel} and {claims.swname}",
            )
        return f"{SIMULATED_NOTE}: {summary}"
    raise TokenCheckError("platform", f"no platform rules for issuer {claims.issuer!r}")


def check_hardware(claims: AttestationClaims) -> str:
    """Only a Google-issued token from a memory-encrypting TEE passes (``--require-hardware``)."""
    if claims.is_simulated:
        raise TokenCheckError("hardware", f"the token is {SIMULATED_NOTE}")
    if not claims.is_hardware:
        raise TokenCheckError("hardware", f"{claims.issuer} hwmodel {claims.hwmodel!r} is not a hardware TEE")
    return f"hardware TEE {claims.hwmodel}"


def verify_token(
    token: str | bytes,
    *,
    trusted_keys: Sequence[Mapping[str, Any]] | None,
    trust_root_pem: bytes | None,
    issuers: Collection[str],
    audience: str,
    nonce: str | None,
    require_hardware: bool,
    verify_exp: bool,
) -> AttestationClaims:
    """Every check in turn; raises :class:`TokenCheckError` naming the first that fails."""
    check_algorithm(token_header(token))
    claims = verify_signature(
        token, trusted_keys=trusted_keys, trust_root_pem=trust_root_pem, verify_exp=verify_exp
    ).claims
    check_issuer(claims, issuers)
    check_audience(claims, audience)
    if nonce is not None:
        check_nonce(claims, nonce)
    check_platform(claims)
    if require_hardware:
        check_hardware(claims)
    return claims
