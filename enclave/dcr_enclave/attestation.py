"""Attestation tokens: the Confidential Space claims model, signing and verification against pinned anchors.

A DCR attestation token is a JWT with the claims Google Confidential Space puts in its tokens (``iss``,
``aud``, ``eat_nonce``, ``hwmodel``, ``swname``, ``dbgstat``, ``submods.container.image_digest`` and
``.env``, ...). Google signs the real ones; the local enclave host signs simulated ones with its own key,
under :data:`~dcr_enclave.contract.LOCAL_ISSUER` and hwmodel ``LOCAL_SIMULATED``, so that every consumer
runs the same code path and no simulated token can pass for hardware.

Verification never takes a key from the token: the key is one of the verifier's pinned JWKs, or the leaf
of an ``x5c`` chain that ends at a pinned root certificate. Each step is a separate function so that a
receipt check can report every step on its own line; :func:`verify_token` runs them all and raises
:class:`TokenCheckError` naming the first check that failed.
"""

from __future__ import annotations

import base64
import binascii
import copy
import itertools
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from . import __version__, contract
from .errors import DCRError, IntegrityError
from .jwk import PrivateKey, PublicKey, key_alg, public_key_from_jwk, thumbprint

#: The claims profile of Confidential Space tokens; the local simulation follows the same profile.
EAT_PROFILE: Final = (
    "https://cloud.google.com/confidential-computing/confidential-space/docs/reference/token-claims"
)
#: ``hwmodel`` values of hardware TEEs with memory encryption (``GCP_SHIELDED_VM`` has none, so it is absent).
HARDWARE_HWMODELS: Final = frozenset({"GCP_AMD_SEV", "GCP_AMD_SEV_ES", "GCP_AMD_SEV_SNP", "GCP_INTEL_TDX"})
DBGSTAT_PRODUCTION: Final = "disabled-since-boot"
DBGSTAT_DEBUG: Final = "enabled"
#: The support attribute a production image keeps while it is supported and monitored.
SUPPORT_STABLE: Final = "STABLE"
SIMULATED_NOTE: Final = "SIMULATED (local enclave host, no hardware memory encryption)"

# Confidential Space limits: each nonce 8..88 bytes, at most six of them.
MIN_NONCE_BYTES: Final = 8
MAX_NONCE_BYTES: Final = 88
MAX_NONCES: Final = 6
MAX_TOKEN_BYTES: Final = 64 * 1024
MAX_CHAIN_LENGTH: Final = 5
#: Clock skew tolerated when expiry is checked (key release), in seconds.
LEEWAY_SECONDS: Final = 60


class TokenCheckError(IntegrityError):
    """An attestation token failed one named check (``signature``, ``issuer``, ``nonce``, ...)."""

    def __init__(self, check: str, detail: str, *, hint: str | None = None) -> None:
        super().__init__(f"attestation token failed the {check} check: {detail}", hint=hint)
        self.check = check
        self.detail = detail


# ---------------------------------------------------------------------------------------------------------
# The claims model
# ---------------------------------------------------------------------------------------------------------


def _claim_error(name: str, expected: str) -> DCRError:
    return TokenCheckError("claims", f"claim {name} must be {expected}")


def _opt_str(obj: Mapping[str, Any], key: str, name: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _claim_error(name, "a string")
    return value


def _req_str(obj: Mapping[str, Any], key: str, name: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _claim_error(name, "a non-empty string")
    return value


def _opt_int(obj: Mapping[str, Any], key: str, name: str) -> int | None:
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _claim_error(name, "an integer (seconds since the epoch)")
    return value


def _str_list(obj: Mapping[str, Any], key: str, name: str, *, scalar_ok: bool = False) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if scalar_ok and isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _claim_error(name, "a list of strings")
    return tuple(value)


def _sub_object(obj: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _claim_error(name, "an object")
    return value


def _check_nonces(nonces: Sequence[str]) -> None:
    if len(nonces) > MAX_NONCES:
        raise _claim_error("eat_nonce", f"at most {MAX_NONCES} nonces")
    for n in nonces:
        if not MIN_NONCE_BYTES <= len(n.encode()) <= MAX_NONCE_BYTES:
            raise _claim_error("eat_nonce", f"nonces of {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes each")


@dataclass(frozen=True)
class AttestationClaims:
    """A typed, read-only view of an attestation token's claims (see :meth:`from_payload`)."""

    payload: Mapping[str, Any]
    issuer: str
    audience: tuple[str, ...]
    issued_at: int
    expires_at: int | None
    not_before: int | None
    subject: str | None
    nonces: tuple[str, ...]
    eat_profile: str | None
    secboot: bool | None
    hwmodel: str
    swname: str
    swversion: tuple[str, ...]
    dbgstat: str
    support_attributes: tuple[str, ...]
    image_digest: str | None
    image_reference: str | None
    env: Mapping[str, str]
    args: tuple[str, ...]
    restart_policy: str | None
    project_id: str | None
    zone: str | None
    instance_id: str | None
    instance_name: str | None
    google_service_accounts: tuple[str, ...]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> AttestationClaims:
        """Validate the types of a decoded payload; raises :class:`TokenCheckError` (check ``claims``)."""
        if not isinstance(payload, Mapping):
            raise TokenCheckError("claims", "the payload is not a JSON object")
        aud = payload.get("aud")
        if isinstance(aud, str):
            audience: tuple[str, ...] = (aud,)
        elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
            audience = tuple(aud)
        else:
            raise _claim_error("aud", "a string or a non-empty list of strings")
        iat = _opt_int(payload, "iat", "iat")
        if iat is None:
            raise _claim_error("iat", "present")
        nonces = _str_list(payload, "eat_nonce", "eat_nonce", scalar_ok=True)
        _check_nonces(nonces)
        secboot = payload.get("secboot")
        if secboot is not None and not isinstance(secboot, bool):
            raise _claim_error("secboot", "true or false")
        submods = _sub_object(payload, "submods", "submods")
        cs = _sub_object(submods, "confidential_space", "submods.confidential_space")
        container = _sub_object(submods, "container", "submods.container")
        gce = _sub_object(submods, "gce", "submods.gce")
        env = _sub_object(container, "env", "submods.container.env")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise _claim_error("submods.container.env", "an object of strings")
        instance_id = gce.get("instance_id")
        if isinstance(instance_id, int) and not isinstance(instance_id, bool):
            instance_id = str(instance_id)  # a number in some token versions, a string in others
        elif instance_id is not None and not isinstance(instance_id, str):
            raise _claim_error("submods.gce.instance_id", "a string")
        return cls(
            payload=MappingProxyType(copy.deepcopy(dict(payload))),
            issuer=_req_str(payload, "iss", "iss"),
            audience=audience,
            issued_at=iat,
            expires_at=_opt_int(payload, "exp", "exp"),
            not_before=_opt_int(payload, "nbf", "nbf"),
            subject=_opt_str(payload, "sub", "sub"),
            nonces=nonces,
            eat_profile=_opt_str(payload, "eat_profile", "eat_profile"),
            secboot=secboot,
            hwmodel=_req_str(payload, "hwmodel", "hwmodel"),
            swname=_req_str(payload, "swname", "swname"),
            swversion=_str_list(payload, "swversion", "swversion", scalar_ok=True),
            dbgstat=_req_str(payload, "dbgstat", "dbgstat"),
            support_attributes=_str_list(
                cs, "support_attributes", "submods.confidential_space.support_attributes"
            ),
            image_digest=_opt_str(container, "image_digest", "submods.container.image_digest"),
            image_reference=_opt_str(container, "image_reference", "submods.container.image_reference"),
            env=MappingProxyType(dict(env)),
            args=_str_list(container, "args", "submods.container.args"),
            restart_policy=_opt_str(container, "restart_policy", "submods.container.restart_policy"),
            project_id=_opt_str(gce, "project_id", "submods.gce.project_id"),
            zone=_opt_str(gce, "zone", "submods.gce.zone"),
            instance_id=instance_id,
            instance_name=_opt_str(gce, "instance_name", "submods.gce.instance_name"),
            google_service_accounts=_str_list(payload, "google_service_accounts", "google_service_accounts"),
        )

    @property
    def is_simulated(self) -> bool:
        """True for the local enclave host's tokens: no hardware memory encryption behind them."""
        return self.issuer == contract.LOCAL_ISSUER or self.hwmodel == contract.LOCAL_HWMODEL

    @property
    def is_hardware(self) -> bool:
        """True for a Google-issued token from a memory-encrypting TEE."""
        return (
            not self.is_simulated
            and self.issuer == contract.GOOGLE_ISSUER
            and self.hwmodel in HARDWARE_HWMODELS
        )

    @property
    def issued_at_iso(self) -> str:
        return format_timestamp(self.issued_at)

    def attested_env(self, name: str) -> str | None:
        """The launch variable ``name`` as attested in ``submods.container.env``."""
        return self.env.get(name)


def format_timestamp(seconds: int | float) -> str:
    """Seconds since the epoch as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------
# Signing (the local enclave host and tests; Google signs real tokens)
# ---------------------------------------------------------------------------------------------------------


def sign_token(
    claims: Mapping[str, Any], private_key: PrivateKey, *, kid: str, x5c: Sequence[str] | None = None
) -> str:
    """A JWT over ``claims``: ``alg`` follows the key (ES256 or RS256), with ``kid`` and ``typ: JWT``.

    ``x5c`` (base64 DER certificates, leaf first) makes a PKI-style token like Google's.
    """
    headers: dict[str, Any] = {"kid": kid, "typ": "JWT"}
    if x5c is not None:
        headers["x5c"] = list(x5c)
    return jwt.encode(dict(claims), private_key, algorithm=key_alg(private_key), headers=headers)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    # Nested objects (submods) merge so that a caller can override one sub-claim and keep the rest.
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def local_claims(
    *,
    image_digest: str,
    env: Mapping[str, str],
    audience: str,
    nonces: Sequence[str],
    lifetime: int = 3600,
    **extra: Any,
) -> dict[str, Any]:
    """Claims of a simulated token from the local enclave host.

    ``env`` is the supervisor's launch environment; only :data:`~dcr_enclave.contract.ATTESTED_ENV_NAMES`
    are attested and each must be present. ``extra`` overrides claims (nested objects are merged).
    """
    missing = [n for n in contract.ATTESTED_ENV_NAMES if not env.get(n)]
    if missing:
        raise DCRError(f"cannot attest a launch without {', '.join(missing)}")
    if lifetime <= 0:
        raise DCRError("a token lifetime must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": contract.LOCAL_ISSUER,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "sub": f"{contract.LOCAL_ISSUER}:{env[contract.ENV.JOB_ID]}",
        "eat_profile": EAT_PROFILE,
        "secboot": False,
        "hwmodel": contract.LOCAL_HWMODEL,
        "swname": contract.LOCAL_SWNAME,
        "swversion": [__version__],
        "dbgstat": DBGSTAT_DEBUG,
        "submods": {
            "confidential_space": {"support_attributes": []},
            "container": {
                "image_digest": image_digest,
                "image_reference": "local:dcr-enclave",
                "restart_policy": "Never",
                "env": {n: env[n] for n in contract.ATTESTED_ENV_NAMES},
                "args": [],
            },
        },
    }
    if nonces:
        claims["eat_nonce"] = list(nonces) if len(nonces) > 1 else nonces[0]
    _merge(claims, extra)
    AttestationClaims.from_payload(claims)  # refuse to produce a token its verifiers would refuse
    return claims


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
