"""``dcr verify``: check a receipt directory offline against trust anchors the verifier pins.

Nothing in the receipt is trusted on its own: ``--trust`` pins a signer key (by RFC 7638 thumbprint, or a
JWKS/PEM file) and ``--trust-root`` pins a root certificate for PKI tokens. Every check prints one line,
``PASS name: detail`` or ``FAIL name: detail``. Exit status: 0 when every check passes, 1 when any fails,
2 for usage errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import DIGEST_RE, check_digest
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import load_jwks_file
from dcr_enclave.verify.receipt import check_receipt_dir
from dcr_enclave.verify.token import load_trust_roots

MAX_ROOT_BYTES = 256 * 1024


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check a job's receipt against pinned trust anchors",
        description=(
            "Check a receipt directory (receipt.json, attestation.jwt, outputs/) offline. Trust anchors are "
            "never taken from the receipt: pin the signer with --trust and/or a root with --trust-root."
        ),
    )
    p.add_argument("receipt", metavar="DIR", help="the receipt directory")
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="FINGERPRINT|JWKS_FILE",
        help=(
            "a signer key to trust: sha256:<RFC 7638 thumbprint> (the key may then be read from the receipt's "
            "signer-jwks.json) or a JWKS/JWK/PEM public key file; repeatable"
        ),
    )
    p.add_argument(
        "--trust-root",
        action="append",
        default=[],
        metavar="PEM",
        help="a root certificate (PEM) that x5c chains in PKI tokens must end at; repeatable",
    )
    p.add_argument(
        "--enclave-digest",
        action="append",
        default=[],
        metavar="sha256:...",
        help="an enclave image digest you expect; the token's must be one of them; repeatable",
    )
    p.add_argument(
        "--require-hardware",
        action="store_true",
        help="fail unless the token comes from a hardware TEE (rejects the local simulation)",
    )
    p.set_defaults(func=run)


def _read_roots(paths: list[str]) -> bytes | None:
    if not paths:
        return None
    pem = b""
    for path in paths:
        p = Path(path)
        try:
            if p.stat().st_size > MAX_ROOT_BYTES:
                raise DCRError(f"trust root {p} is larger than {MAX_ROOT_BYTES} bytes")
            data = p.read_bytes()
        except OSError as e:
            raise DCRError(f"cannot read the trust root {p}: {e.strerror}") from None
        load_trust_roots(data)  # refuse a non-certificate now, as a usage error
        pem += data + b"\n"
    return pem


def _looks_like_certificate(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4096).lstrip().startswith(b"-----BEGIN CERTIFICATE")
    except OSError:
        return False  # load_jwks_file reports why it cannot be read


def _pins(values: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    keys: list[dict[str, Any]] = []
    thumbprints: list[str] = []
    for value in values:
        if value.startswith("sha256:"):
            thumbprints.append(check_digest(value, f"--trust {value!r}"))
            continue
        p = Path(value)
        if not p.exists() and DIGEST_RE.match("sha256:" + value):
            raise DCRError(f"--trust {value!r} is neither a file nor a thumbprint", hint="write sha256:<hex>")
        if _looks_like_certificate(p):
            raise DCRError(f"--trust {p} holds a certificate", hint="pin root certificates with --trust-root")
        keys.extend(load_jwks_file(p, "trusted JWKS file"))
    return keys, thumbprints


def run(args: argparse.Namespace) -> int:
    if not args.trust and not args.trust_root:
        raise DCRError(
            "no trust anchor given",
            hint="pin the signer with --trust sha256:<thumbprint> or --trust JWKS_FILE, or a root with "
            "--trust-root PEM; nothing in the receipt is trusted on its own",
        )
    directory = Path(args.receipt)
    if not directory.is_dir():
        raise DCRError(f"{directory} is not a receipt directory")
    keys, thumbprints = _pins(args.trust)
    roots = _read_roots(args.trust_root)
    digests = [check_digest(d, f"--enclave-digest {d!r}") for d in args.enclave_digest]
    checks = check_receipt_dir(
        directory,
        trusted_keys=keys,
        trusted_thumbprints=thumbprints,
        trust_root_pem=roots,
        expected_enclave_digests=digests,
        require_hardware=args.require_hardware,
        issuers={contract.GOOGLE_ISSUER, contract.LOCAL_ISSUER},
        audience=contract.RECEIPT_AUDIENCE,
    )
    print(f"receipt {directory}")
    for c in checks:
        print(c)
    failed = [c for c in checks if not c.passed]
    if not digests:
        print(
            "note: the enclave image digest is not pinned (use --enclave-digest to pin the code you expect)"
        )
    if failed:
        print(f"receipt NOT verified: {len(failed)} of {len(checks)} checks failed")
        return 1
    print(f"receipt verified: all {len(checks)} checks passed")
    return 0
