"""``dcr verify``: check a receipt directory offline against trust anchors the verifier pins.

Nothing in the receipt is trusted on its own: ``--trust`` pins a signer key (by RFC 7638 thumbprint, or a
JWKS/JWK/PEM public key file) and ``--trust-root`` pins a root CA certificate for PKI tokens, both parsed by
:mod:`dcr_enclave.verify.trust` with the rules the server extension applies to its trust anchors. Every
check prints one line, ``PASS name: detail`` or ``FAIL name: detail``. Exit status: 0 when every check
passes, 1 when any fails, 2 for usage errors (a trust anchor refused included).

``--hub-key`` pins the hub whose grants the verifier accepts: the receipt's token attests the thumbprint of
the hub key the enclave verified the job's grant with, and the check "pinned hub key" fails unless it is
one of the pinned keys (given like ``--trust``: ``sha256:<thumbprint>`` or a JWKS/JWK/PEM public key file,
such as the hub's ``/hub/api/dcr/jwks``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import thumbprint
from dcr_enclave.verify.receipt import check_receipt_dir
from dcr_enclave.verify.trust import CLI_ROOT_OPTION, CLI_SIGNER_OPTION, load_trust_anchors

HUB_KEY_OPTION = "--hub-key"


def hub_key_pins(entries: list[str], base_dir: Path) -> list[str]:
    """The thumbprints ``--hub-key`` pins: given as ``sha256:...``, or of the public keys in the files given
    (parsed like ``--trust``: a private key, a certificate or a key for encryption is refused)."""
    anchors = load_trust_anchors(entries, (), signer_option=HUB_KEY_OPTION, base_dir=base_dir)
    return list(dict.fromkeys([*anchors.thumbprints, *(thumbprint(k) for k in anchors.keys)]))


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
        CLI_SIGNER_OPTION,
        action="append",
        default=[],
        metavar="FINGERPRINT|JWKS_FILE",
        help=(
            "a signer key to trust: sha256:<RFC 7638 thumbprint> (the key may then be read from the receipt's "
            "signer-jwks.json) or a JWKS/JWK/PEM public key file; repeatable"
        ),
    )
    p.add_argument(
        CLI_ROOT_OPTION,
        action="append",
        default=[],
        metavar="PEM",
        help="a PEM file of root CA certificates that x5c chains in PKI tokens must end at; repeatable",
    )
    p.add_argument(
        "--enclave-digest",
        action="append",
        default=[],
        metavar="sha256:...",
        help=(
            "an enclave image digest you expect (required: a receipt never verifies against unpinned code; "
            "`dcr enclave-host` prints the local one, a provider's condition lists those it releases keys "
            "to); the token's must be one of them; repeatable"
        ),
    )
    p.add_argument(
        HUB_KEY_OPTION,
        action="append",
        default=[],
        metavar="FILE|sha256:THUMBPRINT",
        help=(
            "a hub key whose grants you accept: sha256:<RFC 7638 thumbprint> or a JWKS/JWK/PEM public key "
            "file (e.g. the hub's /hub/api/dcr/jwks); the hub key the enclave verified the job's grant with, "
            "as the token attests it, must be one of them; repeatable"
        ),
    )
    p.add_argument(
        "--require-hardware",
        action="store_true",
        help="fail unless the token comes from a hardware TEE (rejects the local simulation)",
    )
    p.set_defaults(func=run)


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
    # The parser the server extension uses for c.DCRExtension.trust_jwks/trust_roots; relative paths are
    # relative to the current directory here.
    anchors = load_trust_anchors(args.trust, args.trust_root, base_dir=Path.cwd())
    digests = [check_digest(d, f"--enclave-digest {d!r}") for d in args.enclave_digest]
    hub_keys = hub_key_pins(args.hub_key, Path.cwd())
    checks = check_receipt_dir(
        directory,
        trusted_keys=anchors.keys,
        trusted_thumbprints=anchors.thumbprints,
        trust_root_pem=anchors.roots_pem,
        expected_enclave_digests=digests,
        expected_hub_keys=hub_keys,
        require_hardware=args.require_hardware,
        issuers={contract.GOOGLE_ISSUER, contract.LOCAL_ISSUER},
        audience=contract.RECEIPT_AUDIENCE,
    )
    print(f"receipt {directory}")
    for c in checks:
        print(c)
    failed = [c for c in checks if not c.passed]
    if not digests:
        print("note: pin the enclave code you expect with --enclave-digest sha256:...")
    if not hub_keys:
        print("note: pin the hub whose grants you accept with --hub-key FILE|sha256:...")
    if failed:
        print(f"receipt NOT verified: {len(failed)} of {len(checks)} checks failed")
        return 1
    print(f"receipt verified: all {len(checks)} checks passed")
    return 0
