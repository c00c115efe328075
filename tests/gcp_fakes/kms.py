"""A fake of Cloud KMS over REST: ``cryptoKeys/*:encrypt`` and ``:decrypt`` with CRC32C fields.

Encrypt is allowed to any bearer token (the provider wrapping a data key); decrypt only to a federated STS
token whose principal set the key's ``allow_decrypt`` bindings name (``roles/cloudkms.cryptoKeyDecrypter``
on ``principalSet://...``). Errors have Google's JSON error shape.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gcp_fakes._http import LoopbackServer, Reply, json_reply
from gcp_fakes.sts import StsFake

_PATH_RE = re.compile(
    r"^/v1/(?P<name>projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/:]+):(?P<op>encrypt|decrypt)$"
)


@dataclass
class _Key:
    material: bytes
    decrypters: set[str] = field(default_factory=set)


def _status(code: int, status: str, message: str) -> Reply:
    return json_reply(code, {"error": {"code": code, "message": message, "status": status}})


def _int64(v: Any) -> int | None:
    return None if v is None else int(v)


class KmsFake:
    """Serves from construction (``start`` is a no-op kept for symmetry); ``sts`` says which principal set a
    federated access token stands for (set it before the first decrypt when not given here)."""

    def __init__(self, sts: StsFake | None = None) -> None:
        self.sts = sts
        self._keys: dict[str, _Key] = {}
        self.decrypts: list[tuple[str, str]] = []
        #: Test knob: answer decrypts with a plaintext CRC32C that does not match (a corrupted response).
        self.corrupt_plaintext_crc = False
        self._http = LoopbackServer(self._handle)
        self._http.start()

    @property
    def endpoint(self) -> str:
        return self._http.endpoint

    def start(self) -> KmsFake:
        return self

    def stop(self) -> None:
        self._http.stop()

    def create_key(self, name: str) -> None:
        self._keys[name] = _Key(AESGCM.generate_key(bit_length=256))

    def allow_decrypt(self, name: str, principal_set: str) -> None:
        self._keys[name].decrypters.add(principal_set)

    def revoke_decrypt(self, name: str) -> None:
        """Remove every decrypt binding of the key."""
        self._keys[name].decrypters.clear()

    def _handle(self, method: str, path: str, headers: Any, body: bytes) -> Reply:
        m = _PATH_RE.match(path.split("?")[0])
        if method != "POST" or not m:
            return _status(404, "NOT_FOUND", f"no such method {path}")
        name, op = m["name"], m["op"]
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            return _status(401, "UNAUTHENTICATED", "Request is missing required authentication credential.")
        key = self._keys.get(name)
        if key is None:
            return _status(404, "NOT_FOUND", f"CryptoKey {name} not found.")
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return _status(400, "INVALID_ARGUMENT", "Invalid JSON payload.")
        if op == "encrypt":
            return self._encrypt(name, key, req)
        principal = self.sts.principal_of(auth.removeprefix("Bearer ")) if self.sts else None
        if principal is None or principal not in key.decrypters:
            self.decrypts.append((name, "denied"))
            return _status(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudkms.cryptoKeyVersions.useToDecrypt' denied on resource '{name}' (or it may not exist).",
            )
        return self._decrypt(name, key, req, principal)

    def _encrypt(self, name: str, key: _Key, req: dict[str, Any]) -> Reply:
        plaintext = base64.b64decode(req.get("plaintext", ""))
        crc = _int64(req.get("plaintextCrc32c"))
        if crc is not None and crc != google_crc32c.value(plaintext):
            return _status(
                400,
                "INVALID_ARGUMENT",
                "The checksum in field plaintext_crc32c did not match the data in field plaintext.",
            )
        nonce = os.urandom(12)
        ciphertext = b"\x01" + nonce + AESGCM(key.material).encrypt(nonce, plaintext, name.encode())
        return json_reply(
            200,
            {
                "name": name + "/cryptoKeyVersions/1",
                "ciphertext": base64.b64encode(ciphertext).decode(),
                "ciphertextCrc32c": str(google_crc32c.value(ciphertext)),
                "verifiedPlaintextCrc32c": crc is not None,
                "verifiedAdditionalAuthenticatedDataCrc32c": False,
            },
        )

    def _decrypt(self, name: str, key: _Key, req: dict[str, Any], principal: str) -> Reply:
        ciphertext = base64.b64decode(req.get("ciphertext", ""))
        crc = _int64(req.get("ciphertextCrc32c"))
        if crc is not None and crc != google_crc32c.value(ciphertext):
            return _status(
                400,
                "INVALID_ARGUMENT",
                "The checksum in field ciphertext_crc32c did not match the data in field ciphertext.",
            )
        try:
            plaintext = AESGCM(key.material).decrypt(ciphertext[1:13], ciphertext[13:], name.encode())
        except (InvalidTag, ValueError):
            return _status(400, "INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
        self.decrypts.append((name, principal))
        return json_reply(
            200,
            {
                "plaintext": base64.b64encode(plaintext).decode(),
                "plaintextCrc32c": str(
                    google_crc32c.value(plaintext) ^ (1 if self.corrupt_plaintext_crc else 0)
                ),
                "usedPrimary": True,
            },
        )
