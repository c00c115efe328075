"""A fake of Google's Confidential Space attestation issuer: PKI (x5c) and OIDC tokens, claim shapes."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import EAT_PROFILE
from dcr_enclave.formats.jwk import public_jwk

TOKEN_LIFETIME = 3600


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DCR test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    subject: str, key: rsa.RSAPrivateKey, issuer: str, issuer_key: rsa.RSAPrivateKey, *, ca: bool
) -> x509.Certificate:
    now = datetime.now(UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return b.sign(issuer_key, hashes.SHA256())


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeAttestationIssuer:
    """Root CA → intermediate → signing leaf for PKI tokens; a separate key for OIDC tokens (``.jwks``)."""

    def __init__(self, name: str = "Fake Confidential Space") -> None:
        self._root_key, self._int_key, self._leaf_key, self._oidc_key = _key(), _key(), _key(), _key()
        self.root = _cert(f"{name} Root", self._root_key, f"{name} Root", self._root_key, ca=True)
        self.intermediate = _cert(
            f"{name} Intermediate", self._int_key, f"{name} Root", self._root_key, ca=True
        )
        self.leaf = _cert(f"{name} Signer", self._leaf_key, f"{name} Intermediate", self._int_key, ca=False)
        self.root_pem: bytes = self.root.public_bytes(serialization.Encoding.PEM)
        self.jwks: dict[str, Any] = {"keys": [public_jwk(self._oidc_key)]}

    def x5c(self) -> list[str]:
        return [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
            for c in (self.leaf, self.intermediate)
        ]

    def issue(self, claims: dict[str, Any], audience: str, nonces: list[str], token_type: str = "PKI") -> str:  # noqa: S107 (token_type is a kind)
        now = int(time.time())
        payload = {
            **claims,
            "iss": contract.GOOGLE_ISSUER,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME,
        }
        if nonces:
            payload["eat_nonce"] = nonces[0] if len(nonces) == 1 else list(nonces)
        if token_type == "PKI":
            return jwt.encode(payload, self._leaf_key, algorithm="RS256", headers={"x5c": self.x5c()})
        if token_type == "OIDC":
            kid = self.jwks["keys"][0]["kid"]
            return jwt.encode(payload, self._oidc_key, algorithm="RS256", headers={"kid": kid})
        raise ValueError(f"unknown token type {token_type!r}")


def vm_claims(
    *,
    image_digest: str,
    env: dict[str, str],
    project_id: str = "dcr-enclaves",
    project_number: str = "123456789012",
    zone: str = "europe-west4-a",
    instance_name: str = "dcr-job",
    instance_id: str = "4242424242424242",
    service_accounts: list[str] | None = None,
    hwmodel: str = "GCP_AMD_SEV",
    dbgstat: str = "disabled-since-boot",
    support: list[str] | None = None,
    restart_policy: str = "Never",
    secboot: bool = True,
    image_reference: str | None = None,
) -> dict[str, Any]:
    """The claims a Confidential Space VM's tokens carry (minus iss/aud/iat/exp/nonces, set per token)."""
    accounts = (
        service_accounts
        if service_accounts is not None
        else [f"dcr-workload@{project_id}.iam.gserviceaccount.com"]
    )
    return {
        "sub": f"https://www.googleapis.com/compute/v1/projects/{project_id}/zones/{zone}/instances/{instance_name}",
        "eat_profile": EAT_PROFILE,
        "secboot": secboot,
        "oemid": 11129,
        "hwmodel": hwmodel,
        "swname": contract.HARDWARE_SWNAME,
        "swversion": ["250300"],
        "dbgstat": dbgstat,
        "submods": {
            "confidential_space": {
                "support_attributes": list(
                    support if support is not None else ["STABLE", "LATEST", "USABLE"]
                ),
                "monitoring_enabled": {"memory": False},
            },
            "container": {
                "image_reference": image_reference
                or f"europe-docker.pkg.dev/{project_id}/dcr/enclave@{image_digest}",
                "image_digest": image_digest,
                "restart_policy": restart_policy,
                "image_id": image_digest,
                "env": dict(env),
                "args": ["python", "-m", "dcr_enclave.cloud"],
            },
            "gce": {
                "zone": zone,
                "project_id": project_id,
                "project_number": project_number,
                "instance_name": instance_name,
                "instance_id": instance_id,
            },
        },
        "google_service_accounts": accounts,
    }
