"""Issuing grants: the hub (and local development) signs a per-job grant with its private key."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import DisclosureRules, Grant, GrantedDataset, OutputLimits
from dcr_enclave.formats.jwk import PrivateKey, key_alg, public_jwk


def build_grant(
    *,
    user: str,
    job_id: str,
    bundle_digest: str,
    datasets: list[GrantedDataset],
    output_public_key: bytes,
    output_limits: OutputLimits | None = None,
    time_limit: int = 3600,
    memory_bytes: int = 4 * 2**30,
    airlock_public_key: bytes | None = None,
    disclosure: DisclosureRules | None = None,
    grant_id: str | None = None,
    now: int | None = None,
) -> Grant:
    """The grant for one job, checked but not signed (the hub's dry run stops here); it expires shortly
    after the job's time limit."""
    contract.check_job_id(job_id)
    check_digest(bundle_digest, "bundle digest")
    if len(output_public_key) != 32:
        raise DCRError("the job's output public key must be a 32-byte X25519 key")
    if not datasets:
        raise DCRError("a grant must name at least one dataset")
    iat = int(time.time()) if now is None else now
    return Grant(
        grant_id=grant_id or contract.new_grant_id(),
        user=user,
        job_id=job_id,
        bundle_digest=bundle_digest,
        datasets=tuple(datasets),
        output_public_key=_b64(output_public_key),
        output_limits=output_limits or OutputLimits(),
        time_limit=time_limit,
        memory_bytes=memory_bytes,
        airlock_public_key=_b64(airlock_public_key) if airlock_public_key else None,
        disclosure=disclosure,
        issued_at=iat,
        expires_at=iat + time_limit + 600,
    )


def sign_grant(key: PrivateKey, grant: Grant) -> str:
    """The grant as a JWT signed with the hub's ``key`` (its RFC 7638 thumbprint as ``kid``)."""
    kid = public_jwk(key)["kid"]
    return jwt.encode(
        grant.claims(), key, algorithm=key_alg(key), headers={"typ": contract.GRANT_TYP, "kid": kid}
    )


def issue_grant(key: PrivateKey, **fields: Any) -> str:
    """Build (:func:`build_grant`, which takes the same keyword arguments and checks them) and sign a grant."""
    return sign_grant(key, build_grant(**fields))


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
