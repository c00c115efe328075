"""The hub's keys: the grant signing key (published as a JWKS) and the airlock's X25519 key.

Both live in owner-only files (0600) the hub generates on its first start. An existing key is never
replaced: a key file that is unreadable, not a key, a link, or readable by others stops the hub at start,
because a silently regenerated key would invalidate every provider's condition that pins its thumbprint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dcr_enclave.formats import sealing
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import PrivateKey, key_alg, public_jwk
from dcr_enclave.pack.signing_keys import generate_key, write_private_key
from dcr_enclave.platform.key_store import read_private_file, write_private_file

_MAX_PEM_BYTES = 64 * 1024


@dataclass(frozen=True)
class HubKey:
    """The hub's grant signing key with its public forms."""

    path: Path
    private: PrivateKey
    public_jwk: dict[str, Any]

    @property
    def thumbprint(self) -> str:
        """RFC 7638 thumbprint (``sha256:<hex>``) that providers and the enclave pin."""
        return str(self.public_jwk["kid"])

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document, with the thumbprint beside the keys for people who pin it."""
        return {"keys": [self.public_jwk], "thumbprint": self.thumbprint}


@dataclass(frozen=True)
class AirlockKey:
    """The X25519 key outputs under review are sealed to (raw 32-byte halves)."""

    path: Path
    private: bytes
    public: bytes


def _prepare_parent(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)


def load_or_create_hub_key(path: str | Path, alg: str = "ES256") -> HubKey:
    """The hub key at ``path``; generated (ES256, 0600) when the file does not exist.

    Refuses a key file that is a link, readable by others, or not an EC P-256/RSA private key in PEM.
    """
    p = Path(path).absolute()
    if not os.path.lexists(p):
        _prepare_parent(p)
        try:
            write_private_key(p, generate_key(alg))
        except DCRError:
            if not p.exists():  # lost a creation race: the winner's key is used below
                raise
        except OSError as e:
            raise DCRError(f"cannot create the hub key {p}: {e.strerror}") from None
    data = read_private_file(p, _MAX_PEM_BYTES)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise DCRError(f"the hub key {p} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise DCRError(f"the hub key {p} must be an EC P-256 or RSA private key")
    key_alg(key)  # refuses curves other than P-256
    return HubKey(p, key, public_jwk(key))


def load_or_create_airlock_key(path: str | Path) -> AirlockKey:
    """The airlock's raw X25519 private key at ``path``; generated (0600) when absent."""
    p = Path(path).absolute()
    if not os.path.lexists(p):
        _prepare_parent(p)
        private, _ = sealing.generate_keypair()
        try:
            write_private_file(p, private, replace=False)
        except DCRError:
            if not p.exists():
                raise
        except OSError as e:
            raise DCRError(f"cannot create the airlock key {p}: {e.strerror}") from None
    raw = read_private_file(p, 64)
    if len(raw) != sealing.KEY_SIZE:
        raise DCRError(f"the airlock key {p} is not a raw {sealing.KEY_SIZE}-byte X25519 private key")
    return AirlockKey(p, raw, sealing.public_key(raw))
