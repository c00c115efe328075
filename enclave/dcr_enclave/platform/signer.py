"""The local enclave host's token signer: simulated Confidential Space tokens under its own key.

Google signs real tokens; this signer exists for the local simulation and tests. Its tokens say
``hwmodel: LOCAL_SIMULATED``, ``swname: DCR_LOCAL_SIMULATION`` and ``dbgstat: enabled``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt

from dcr_enclave import __version__
from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import DBGSTAT_DEBUG, EAT_PROFILE, AttestationClaims
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import PrivateKey, key_alg

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

    ``env`` is the supervisor's launch environment; only :data:`~dcr_enclave.formats.contract.ATTESTED_ENV_NAMES`
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
