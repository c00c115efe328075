"""The hub's keys: the grant signing key (published as a JWKS) and the airlock's X25519 key.

Both live in owner-only files (0600) the hub generates on its first start. An existing key is never
replaced: a key file that is unreadable, not a key, a link, or readable by others stops the hub at start,
because a silently regenerated key would invalidate every provider's condition that pins its thumbprint.

The signing key is a PEM file written (PKCS#8) and parsed by :mod:`dcr_enclave.pack.signing_keys`, the one
loader of private signing keys; the airlock key is 32 raw bytes. Both are read through the key store's
owner-only file reader, which refuses links, loose modes and oversized files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcr_enclave.formats import sealing
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import PrivateKey, public_jwk
from dcr_enclave.pack.signing_keys import generate_key, read_private_key, write_private_key
from dcr_enclave.platform.key_store import read_private_file, write_private_file


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


def _create_once(path: Path, what: str, write: Callable[[Path], None]) -> None:
    """Create the key file at ``path`` with ``write`` unless something (even a dangling link) is there."""
    if os.path.lexists(path):
        return
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    try:
        write(path)
    except DCRError:
        if not path.exists():  # lost a creation race: the winner's key is used
            raise
    except OSError as e:
        raise DCRError(f"cannot create the {what} {path}: {e.strerror}") from None


def load_or_create_hub_key(path: str | Path, alg: str = "ES256") -> HubKey:
    """The hub key at ``path``; generated (ES256, 0600) when the file does not exist.

    Refuses a key file that is a link, readable by others, or not an EC P-256/RSA private key in PEM.
    """
    p = Path(path).absolute()
    _create_once(p, "hub key", lambda q: write_private_key(q, generate_key(alg)))
    # The owner-only checks (no link, not readable by others, size) come first; the shared signing-key
    # reader then parses the same file. Whoever could swap the file between the two reads could as well
    # replace the key itself, so the second open gives no one more.
    key = read_private_key(p, owner_only=True)
    return HubKey(p, key, public_jwk(key))


def load_or_create_airlock_key(path: str | Path) -> AirlockKey:
    """The airlock's raw X25519 private key at ``path``; generated (0600) when absent."""
    p = Path(path).absolute()
    _create_once(
        p, "airlock key", lambda q: write_private_file(q, sealing.generate_keypair()[0], replace=False)
    )
    raw = read_private_file(p, 64)
    if len(raw) != sealing.KEY_SIZE:
        raise DCRError(f"the airlock key {p} is not a raw {sealing.KEY_SIZE}-byte X25519 private key")
    return AirlockKey(p, raw, sealing.public_key(raw))
