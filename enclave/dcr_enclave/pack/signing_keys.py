"""Private signing keys on disk: the one loader for the hub key, the enclave host's signer and tests.

PKCS#8 PEM, owner-only (0600), written atomically and never overwritten. Only producers use this module:
nothing in the enclave runtime or the verifier imports it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import PrivateKey, key_alg
from dcr_enclave.platform.key_store import read_private_file


def write_private_key(path: str | Path, key: PrivateKey) -> None:
    """Write ``key`` as PKCS#8 PEM, owner-only (0600), atomically; never overwrites an existing key."""
    p = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
        os.close(fd)
        os.link(tmp, p)  # fails if p exists: a key is never silently replaced
    except FileExistsError:
        raise DCRError(f"refusing to overwrite the existing key {p}") from None
    finally:
        os.unlink(tmp)


#: A PEM private key is a few kilobytes; a bigger file is refused before it is parsed.
MAX_PEM_BYTES = 64 * 1024


def read_private_key(path: str | Path, *, owner_only: bool = False) -> PrivateKey:
    """The EC P-256 or RSA private key in the PEM file ``path``.

    ``owner_only`` (the hub key, the enclave host's signer): refuse a link, a file others can read and an
    oversized one, reading it once through one descriptor.
    """
    p = Path(path)
    if owner_only:
        data = read_private_file(p, MAX_PEM_BYTES)
    else:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise DCRError(f"cannot read the private key {p}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise DCRError(f"{p} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise DCRError(f"{p} must hold an EC P-256 or RSA private key")
    key_alg(key)
    return key


def load_or_create_key(path: str | Path, alg: str = "ES256", *, owner_only: bool = False) -> PrivateKey:
    """The key at ``path``, created (0600) if absent. Used for persisted signer keys."""
    p = Path(path)
    if not p.exists():
        try:
            write_private_key(p, generate_key(alg))
        except DCRError:
            if not p.exists():  # lost a creation race: fine if the winner's key is there
                raise
    return read_private_key(p, owner_only=owner_only)


def generate_key(alg: str = "ES256") -> PrivateKey:
    """A fresh signing key for ``alg`` (ES256: P-256; RS256: RSA 3072)."""
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise DCRError(f"unsupported signing algorithm {alg!r}", hint="use ES256 or RS256")
