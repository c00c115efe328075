"""Signing keys as JWKs: generation, storage, public JWKS and RFC 7638 thumbprints.

DCR pins keys by thumbprint: ``sha256:<hex>`` of the RFC 7638 canonical form of the public JWK (only the
required members, sorted, no white space). The hub key, the enclave host's attestation signer and test
signers all go through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from dcr_enclave.formats.digests import canonical_json, sha256_bytes
from dcr_enclave.formats.errors import DCRError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# RFC 7638 section 3.2: the members that define each key type.
_REQUIRED_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}
MAX_JWKS_BYTES = 256 * 1024


def key_alg(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise DCRError(f"EC keys must be on P-256, not {key.curve.name}")
        return "ES256"
    return "RS256"


def public_jwk(key: PrivateKey | PublicKey) -> dict[str, Any]:
    """The public JWK of ``key`` with ``kid`` = thumbprint, ``alg`` and ``use: sig``."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else key
    alg = key_alg(pub)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
    jwk = {k: jwk[k] for k in _REQUIRED_MEMBERS[jwk["kty"]]}
    jwk.update(alg=alg, use="sig", kid=thumbprint(jwk))
    return jwk


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint of a public JWK, written ``sha256:<hex>``."""
    kty = jwk.get("kty")
    if kty not in _REQUIRED_MEMBERS:
        raise DCRError(f"unsupported JWK key type {kty!r}", hint="keys must be EC P-256 or RSA")
    try:
        members = {k: jwk[k] for k in _REQUIRED_MEMBERS[kty]}
    except KeyError as e:
        raise DCRError(f"JWK lacks the member {e.args[0]!r}") from None
    return sha256_bytes(canonical_json(members))


def jwks(*keys: PrivateKey | PublicKey) -> dict[str, Any]:
    return {"keys": [public_jwk(k) for k in keys]}


def public_key_from_jwk(jwk: dict[str, Any]) -> PublicKey:
    """The public key of a JWK; refuses private members, symmetric keys and unsupported curves."""
    if not isinstance(jwk, dict):
        raise DCRError("a JWK must be a JSON object")
    if "d" in jwk or jwk.get("kty") == "oct":
        raise DCRError(
            "refusing a JWK with private or symmetric key material", hint="publish public keys only"
        )
    thumbprint(jwk)  # validates kty and members
    try:
        key = jwt.PyJWK(jwk).key
    except (jwt.PyJWTError, ValueError, TypeError, NotImplementedError) as e:
        # NotImplementedError: PyJWT's answer to an "alg" it has no key type for (such as "none").
        raise DCRError(f"unreadable JWK: {e or type(e).__name__}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise DCRError("a JWK here must hold a public EC or RSA key")
    key_alg(key)
    return key


def parse_jwks(text: str | bytes, what: str = "JWKS") -> list[dict[str, Any]]:
    """Public keys from a JWKS document, a single JWK or a PEM public key; refuses anything else."""
    if len(text) > MAX_JWKS_BYTES:
        raise DCRError(f"{what} is larger than {MAX_JWKS_BYTES} bytes")
    raw = text.encode() if isinstance(text, str) else text
    if raw.lstrip().startswith(b"-----BEGIN"):
        try:
            pem_key = serialization.load_pem_public_key(raw)
        except ValueError as e:
            raise DCRError(f"{what} is not a readable PEM public key: {e}") from None
        if not isinstance(pem_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise DCRError(f"{what} must hold an EC P-256 or RSA public key")
        return [public_jwk(pem_key)]
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DCRError(f"{what} is neither JSON nor PEM: {e}") from None
    keys = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not isinstance(keys, list) or not keys:
        raise DCRError(f"{what} holds no keys")
    out = []
    for k in keys:
        public_key_from_jwk(k)
        out.append(k)
    return out


def load_jwks_file(path: str | Path, what: str = "JWKS file") -> list[dict[str, Any]]:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_JWKS_BYTES:
            raise DCRError(f"{what} {p} is larger than {MAX_JWKS_BYTES} bytes")
        return parse_jwks(p.read_bytes(), f"{what} {p}")
    except OSError as e:
        raise DCRError(f"cannot read {what} {p}: {e.strerror}") from None
