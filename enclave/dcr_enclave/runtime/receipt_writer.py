"""Writing a receipt in the enclave: the manifest from its parts, output digests, the receipt directory.

The manifest model is :mod:`dcr_enclave.formats.receipt`; checking a receipt is
:mod:`dcr_enclave.verify.receipt`, which never imports this module.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import canonical_json
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import public_key_from_jwk
from dcr_enclave.formats.receipt import OutputEntry, ReceiptManifest, hash_regular_file, scan_outputs

# ---------------------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------------------


def output_entries(outputs_dir: str | Path) -> list[dict[str, Any]]:
    """``{"path", "size", "sha256"}`` for every file under ``outputs_dir``, sorted by UTF-8 path bytes.

    Links and special files are refused: outputs are regular files.
    """
    root = Path(outputs_dir)
    if root.is_symlink() or not root.is_dir():
        raise DCRError(f"outputs directory {root} is not a directory")
    files, problems = scan_outputs(root)
    if problems:
        raise DCRError(f"refusing outputs that are not regular files: {'; '.join(problems[:5])}")
    entries = []
    for rel in sorted(files, key=lambda r: r.encode("utf-8", "surrogateescape")):
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise DCRError(f"output name {rel!r} is not UTF-8") from None
        digest, size = hash_regular_file(files[rel])
        entries.append(OutputEntry(rel, size, digest).to_json())
    return entries


# ---------------------------------------------------------------------------------------------------------
# Writing a receipt directory
# ---------------------------------------------------------------------------------------------------------


def _jwks_doc(signer_jwks: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = signer_jwks.get("keys") if isinstance(signer_jwks, Mapping) else list(signer_jwks)
    if not isinstance(keys, list) or not keys:
        raise DCRError("the signer JWKS holds no keys")
    for k in keys:
        public_key_from_jwk(dict(k))  # refuses private or symmetric material
    return {"keys": [dict(k) for k in keys]}


def write_receipt_dir(
    directory: str | Path,
    manifest: ReceiptManifest,
    token: str,
    signer_jwks: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``receipt.json``, ``attestation.jwt`` and ``signer-jwks.json`` into ``directory``.

    The token must carry the manifest's digest as a nonce. Each file is written to a temporary file and
    renamed into place only once all three are ready; an existing, different receipt is never replaced.
    """
    d = Path(directory)
    body = manifest.to_bytes()
    try:
        payload = json.loads(_b64url(token.split(".")[1]))
        nonces = payload.get("eat_nonce")
    except (IndexError, ValueError, AttributeError):
        raise DCRError("the attestation token is not a readable JWT") from None
    if manifest.digest not in ([nonces] if isinstance(nonces, str) else nonces or []):
        raise DCRError("the attestation token's nonce is not this manifest's sha256", hint="attest it again")
    files = {
        contract.RECEIPT_FILE: body,
        contract.TOKEN_FILE: token.encode("ascii") + b"\n",
        contract.SIGNER_JWKS_FILE: canonical_json(_jwks_doc(signer_jwks)) + b"\n",
    }
    existing = d / contract.RECEIPT_FILE
    if existing.exists() and existing.read_bytes() != body:
        raise DCRError(f"{existing} already holds another receipt", hint="write receipts to a new directory")
    d.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.")
            temps[name] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # receipts are public
        # receipt.json last: its presence means the receipt is complete.
        for name in (contract.SIGNER_JWKS_FILE, contract.TOKEN_FILE, contract.RECEIPT_FILE):
            os.replace(temps.pop(name), d / name)
    finally:
        for tmp in temps.values():
            os.unlink(tmp)
    return d


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
