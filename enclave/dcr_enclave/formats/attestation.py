"""Attestation tokens: the Confidential Space claims model.

A DCR attestation token is a JWT with the claims Google Confidential Space puts in its tokens (``iss``,
``aud``, ``eat_nonce``, ``hwmodel``, ``swname``, ``dbgstat``, ``submods.container.image_digest`` and
``.env``, ...). Google signs the real ones; the local enclave host signs simulated ones
(:mod:`dcr_enclave.platform.signer`) under :data:`~dcr_enclave.formats.contract.LOCAL_ISSUER` and hwmodel
``LOCAL_SIMULATED``, so that every consumer runs the same code path and no simulated token can pass for
hardware. Verification is :mod:`dcr_enclave.verify.token`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError, IntegrityError

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
