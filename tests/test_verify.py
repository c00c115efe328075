"""``dcr verify`` and the receipt model: untouched receipts pass, every tampering fails the check it should."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from receipt_factory import (
    IMAGE_DIGEST,
    OTHER_IMAGE_DIGEST,
    Pki,
    Receipt,
    Signer,
    hardware_claims,
    make_manifest,
    make_pki,
    make_receipt,
    make_signer,
    raw_token,
    receipt_claims,
)

from dcr_enclave.commands.main import main
from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import format_timestamp
from dcr_enclave.formats.digests import canonical_json, sha256_bytes
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import public_jwk, thumbprint
from dcr_enclave.formats.receipt import VIOLATION_KINDS, ReceiptManifest
from dcr_enclave.pack.signing_keys import generate_key
from dcr_enclave.runtime.receipt_writer import output_entries, write_receipt_dir
from dcr_enclave.verify.receipt import check_receipt_dir

LINE_RE = re.compile(r"^(PASS|FAIL) ([^:]+): (.*)$")
ALWAYS = [
    "files",
    "manifest schema",
    "disclosure checks",
    "output digests",
    "no output added",
    "no output removed",
    "signature",
    "algorithm",
    "issuer",
    "audience",
    "nonce",
    "enclave digest",
    "bundle digest",
    "hub key",
    "job id",
    "pinned enclave digest",
    "platform",
    "issued at",
]


class Result:
    """What ``dcr verify`` printed and returned, with the check lines parsed."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err
        self.checks: dict[str, tuple[bool, str]] = {}
        for line in out.splitlines():
            if m := LINE_RE.match(line):
                self.checks[m.group(2)] = (m.group(1) == "PASS", m.group(3))

    @property
    def failed(self) -> set[str]:
        return {name for name, (ok, _) in self.checks.items() if not ok}

    def detail(self, name: str) -> str:
        return self.checks[name][1]


#: Pass to the ``verify`` fixture to run ``dcr verify`` without any ``--enclave-digest``.
UNPINNED = object()


@pytest.fixture
def verify(capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: Any) -> Result:
        """``dcr verify`` with ``args``; the factory's enclave digest is pinned unless a test pins its own
        (``--enclave-digest``) or none (``UNPINNED`` in ``args``)."""
        words = [str(a) for a in args if a is not UNPINNED]
        if "--enclave-digest" not in words and UNPINNED not in args:
            words += ["--enclave-digest", IMAGE_DIGEST]
        code = main(["verify", *words])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def signer() -> Signer:
    return make_signer()


@pytest.fixture
def receipt(tmp_path: Path, signer: Signer) -> Receipt:
    return make_receipt(tmp_path / "receipt", signer)


def pin(r: Receipt) -> list[str]:
    return ["--trust", r.signer.thumbprint]


# ---------------------------------------------------------------------------------------------------------
# The untouched receipt
# ---------------------------------------------------------------------------------------------------------


def test_untouched_receipt_passes_every_check(receipt: Receipt, verify: Any) -> None:
    """An untouched, simulated receipt passes every check, one PASS line each, exit 0, marked SIMULATED."""
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 0, r.out
    assert r.failed == set()
    assert set(ALWAYS) <= set(r.checks)
    assert "SIMULATED (local enclave host, no hardware memory encryption)" in r.detail("platform")
    assert receipt.signer.thumbprint in r.detail("signature")
    assert r.detail("nonce").startswith(receipt.manifest.digest)
    assert "receipt verified" in r.out


def test_trust_by_jwks_file_passes(receipt: Receipt, verify: Any, tmp_path: Path) -> None:
    """--trust FILE pins the keys in that JWKS file; the receipt's own signer-jwks.json is then not read."""
    pinned = receipt.signer.write_jwks(tmp_path / "pinned.json")
    receipt.jwks_path.unlink()
    r = verify(receipt.dir, "--trust", pinned)
    assert r.code == 0, r.out


def test_trust_by_pem_public_key_passes(receipt: Receipt, verify: Any, tmp_path: Path) -> None:
    """--trust FILE also takes a PEM public key."""
    pem = receipt.signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "signer.pem").write_bytes(pem)
    assert verify(receipt.dir, "--trust", tmp_path / "signer.pem").code == 0


def test_rsa_signer_passes(tmp_path: Path, verify: Any) -> None:
    """An RS256 signer verifies like an ES256 one."""
    r = make_receipt(tmp_path / "r", make_signer("RS256"))
    res = verify(r.dir, *pin(r))
    assert res.code == 0, res.out
    assert res.detail("algorithm").startswith("RS256")


# ---------------------------------------------------------------------------------------------------------
# Tampered outputs and manifests
# ---------------------------------------------------------------------------------------------------------


def test_changed_output_byte_fails_output_digests(receipt: Receipt, verify: Any) -> None:
    """One byte changed in one output fails 'output digests', naming the file."""
    path = receipt.outputs_dir / "results/summary.csv"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert r.failed == {"output digests"}
    assert "results/summary.csv" in r.detail("output digests")


def test_added_output_fails(receipt: Receipt, verify: Any) -> None:
    """A file the receipt does not list fails 'no output added'."""
    (receipt.outputs_dir / "results" / "extra.csv").write_text("smuggled\n")
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert r.failed == {"no output added"}
    assert "results/extra.csv" in r.detail("no output added")


def test_removed_output_fails(receipt: Receipt, verify: Any) -> None:
    """A listed file that is gone fails 'no output removed'."""
    (receipt.outputs_dir / "results/figures/note.txt").unlink()
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert r.failed == {"no output removed"}
    assert "results/figures/note.txt" in r.detail("no output removed")


def test_output_replaced_by_link_fails(receipt: Receipt, verify: Any, tmp_path: Path) -> None:
    """An output replaced by a link to identical bytes is not the output: links are never followed."""
    target = receipt.outputs_dir / "results/summary.csv"
    copy = tmp_path / "copy.csv"
    copy.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(copy)
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert {"no output added", "no output removed"} <= r.failed
    assert "symbolic link" in r.detail("no output added")


def test_edited_manifest_fails_nonce(receipt: Receipt, verify: Any) -> None:
    """A manifest re-serialised (canonically) with one field changed is well-formed but fails 'nonce'."""
    doc = json.loads(receipt.receipt_path.read_bytes())
    doc["notebook"] = "another.ipynb"
    receipt.receipt_path.write_bytes(canonical_json(doc))
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert r.failed == {"nonce"}
    assert "not the one attested" in r.detail("nonce")


def test_non_canonical_manifest_fails_schema(receipt: Receipt, verify: Any) -> None:
    """The same manifest pretty-printed is refused: only canonical bytes are read."""
    doc = json.loads(receipt.receipt_path.read_bytes())
    receipt.receipt_path.write_text(json.dumps(doc, indent=2))
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert "canonical" in r.detail("manifest schema")
    assert "manifest schema" in r.failed


def test_hostile_manifest_fails_schema(receipt: Receipt, verify: Any) -> None:
    """A deeply nested receipt.json is a failed check, not a crash."""
    receipt.receipt_path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert {"manifest schema", "nonce"} <= r.failed


def test_manifest_enclave_digest_differing_from_token_fails(
    tmp_path: Path, signer: Signer, verify: Any
) -> None:
    """A receipt claiming another enclave digest than the token attests fails 'enclave digest'."""
    r = make_receipt(
        tmp_path / "r",
        signer,
        manifest_overrides={"enclave": {"kind": "local", "image_digest": OTHER_IMAGE_DIGEST}},
        claims=lambda m: receipt_claims(m, image_digest=IMAGE_DIGEST),
    )
    res = verify(r.dir, *pin(r))
    assert res.code == 1
    assert res.failed == {"enclave digest"}
    assert OTHER_IMAGE_DIGEST in res.detail("enclave digest")


@pytest.mark.parametrize(
    ("var", "check"),
    [
        (contract.ENV.BUNDLE_DIGEST, "bundle digest"),
        (contract.ENV.HUB_KEY_THUMBPRINT, "hub key"),
        (contract.ENV.JOB_ID, "job id"),
    ],
)
def test_attested_launch_env_must_match_manifest(
    tmp_path: Path, signer: Signer, verify: Any, var: str, check: str
) -> None:
    """Bundle digest, hub key thumbprint and job id in the manifest must equal the attested launch env."""
    other = "job-" + "cd" * 12 if var == contract.ENV.JOB_ID else sha256_bytes(b"other")
    r = make_receipt(
        tmp_path / "r",
        signer,
        claims=lambda m: receipt_claims(m, submods={"container": {"env": {var: other}}}),
    )
    res = verify(r.dir, *pin(r))
    assert res.code == 1
    assert res.failed == {check}


def test_hub_key_pins_the_hub_that_granted_the_job(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """--hub-key (a thumbprint, or the hub's JWKS as /hub/api/dcr/jwks serves it, repeatable) adds the check
    'pinned hub key': it passes when the attested hub key thumbprint is pinned, and fails, naming both, when
    it is not; without --hub-key there is no such check, only a note."""
    hub = generate_key()
    hub_jwk = public_jwk(hub)
    r = make_receipt(tmp_path / "r", signer, manifest_overrides={"hub_key_thumbprint": thumbprint(hub_jwk)})
    jwks_file = tmp_path / "hub-jwks.json"
    jwks_file.write_text(json.dumps({"keys": [hub_jwk], "thumbprint": thumbprint(hub_jwk)}))
    other = thumbprint(public_jwk(generate_key()))

    unpinned = verify(r.dir, *pin(r))
    assert unpinned.code == 0 and "pinned hub key" not in unpinned.checks
    assert "note: pin the hub whose grants you accept with --hub-key" in unpinned.out
    for pins in (["--hub-key", thumbprint(hub_jwk)], ["--hub-key", other, "--hub-key", jwks_file]):
        ok = verify(r.dir, *pin(r), *pins)
        assert ok.code == 0, ok.out
        assert ok.detail("pinned hub key").startswith(f"{thumbprint(hub_jwk)} is a pinned hub key")
        assert "--hub-key" not in ok.out
    wrong = verify(r.dir, *pin(r), "--hub-key", other)
    assert wrong.code == 1 and wrong.failed == {"pinned hub key"}
    assert wrong.detail("pinned hub key") == (
        f"the job's grant was verified with hub key {thumbprint(hub_jwk)}, which is not one of the pinned "
        f"hub keys ({other}): another hub authorised this job"
    )
    assert "receipt NOT verified: 1 of" in wrong.out


def test_hub_key_refuses_what_is_not_a_hub_public_key(
    receipt: Receipt, verify: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--hub-key takes what --trust takes and refuses the same way (exit 2, naming --hub-key): the hub's
    private key file, a malformed thumbprint, a missing file."""
    private = tmp_path / "dcr-hub-key.pem"
    private.write_bytes(
        generate_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for value, message in (
        (private, "--hub-key"),
        ("sha256:xyz", "is not a key thumbprint"),
        (tmp_path / "missing.json", "cannot read the file"),
    ):
        r = verify(receipt.dir, *pin(receipt), "--hub-key", value)
        assert r.code == 2 and message in r.err and "--hub-key" in r.err, (value, r.err)
    assert "holds a private key" in verify(receipt.dir, *pin(receipt), "--hub-key", private).err


# ---------------------------------------------------------------------------------------------------------
# Forged and altered tokens
# ---------------------------------------------------------------------------------------------------------


def test_altered_signature_fails(receipt: Receipt, verify: Any) -> None:
    """A token whose signature bytes were altered fails 'signature'."""
    head, body, sig = receipt.token.split(".")
    i = len(sig) // 2
    sig = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]
    receipt.replace_token(f"{head}.{body}.{sig}")
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert "signature" in r.failed
    assert "does not verify" in r.detail("signature")


def test_other_key_with_replaced_signer_jwks_fails(receipt: Receipt, verify: Any) -> None:
    """A token signed by another key, with signer-jwks.json swapped for that key's, fails against the pin."""
    attacker = make_signer()
    receipt.replace_token(attacker.sign(receipt_claims(receipt.manifest)))
    attacker.write_jwks(receipt.jwks_path)
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert "signature" in r.failed
    assert "pinned thumbprint" in r.detail("signature")
    # The claim checks depend on a verified token and so cannot pass either.
    assert r.detail("issuer").startswith("not checked")


def test_a_signer_jwks_with_an_alg_none_key_fails_cleanly(receipt: Receipt, verify: Any) -> None:
    """A receipt whose signer-jwks.json holds a key marked "alg": "none" is not verified, and the verifier
    says so instead of failing with a traceback."""
    doc = json.loads(receipt.jwks_path.read_text())
    for k in doc["keys"]:
        k["alg"] = "none"
    receipt.jwks_path.write_text(json.dumps(doc))
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert "signature" in r.failed


def test_other_key_fails_against_pinned_jwks_file(receipt: Receipt, verify: Any, tmp_path: Path) -> None:
    """A token signed by another key fails against a pinned JWKS file, whatever the receipt holds."""
    attacker = make_signer()
    receipt.replace_token(attacker.sign(receipt_claims(receipt.manifest)))
    attacker.write_jwks(receipt.jwks_path)
    pinned = receipt.signer.write_jwks(tmp_path / "pinned.json")
    r = verify(receipt.dir, "--trust", pinned)
    assert r.code == 1
    assert "signature" in r.failed


def test_alg_none_fails(receipt: Receipt, verify: Any) -> None:
    """An unsigned token (alg none) fails 'algorithm' and 'signature'."""
    header = {"alg": "none", "typ": "JWT", "kid": receipt.signer.thumbprint}
    receipt.replace_token(raw_token(header, receipt.claims))
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert {"algorithm", "signature"} <= r.failed
    assert "'none'" in r.detail("algorithm")


@pytest.mark.parametrize("secret_form", ["pem", "jwk"])
def test_hs256_with_public_key_as_secret_fails(receipt: Receipt, verify: Any, secret_form: str) -> None:
    """An HS256 token keyed with the signer's public key (PEM or JWK text) fails 'algorithm'."""
    if secret_form == "pem":
        secret = receipt.signer.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        secret = json.dumps(receipt.signer.public_jwk).encode()
    header = {"alg": "HS256", "typ": "JWT", "kid": receipt.signer.thumbprint}
    unsigned = raw_token(header, receipt.claims).rsplit(".", 1)[0]
    mac = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
    receipt.replace_token(raw_token(header, receipt.claims, mac))
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert {"algorithm", "signature"} <= r.failed
    assert "HS256" in r.detail("algorithm")


def test_algorithm_not_fitting_pinned_key_type_fails(receipt: Receipt, verify: Any, tmp_path: Path) -> None:
    """An ES256 token against a pinned RSA key fails 'algorithm' (and 'signature'): key types never mix."""
    pinned = make_signer("RS256").write_jwks(tmp_path / "rsa.json")
    r = verify(receipt.dir, "--trust", pinned)
    assert r.code == 1
    assert {"algorithm", "signature"} <= r.failed
    assert "fits none of the pinned keys" in r.detail("algorithm")


def test_wrong_issuer_fails(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """A token from an issuer other than Google or the local host fails 'issuer'."""
    r = make_receipt(tmp_path / "r", signer, claims=lambda m: receipt_claims(m, iss="https://issuer.example"))
    res = verify(r.dir, *pin(r))
    assert res.code == 1
    assert "issuer" in res.failed
    assert "https://issuer.example" in res.detail("issuer")


def test_wrong_audience_fails(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """A key-release token presented as a receipt's token fails 'audience'."""
    r = make_receipt(
        tmp_path / "r", signer, claims=lambda m: receipt_claims(m, audience=contract.KEY_RELEASE_AUDIENCE)
    )
    res = verify(r.dir, *pin(r))
    assert res.code == 1
    assert res.failed == {"audience"}


def test_nonce_not_matching_fails(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """A token over another manifest (another nonce) fails 'nonce'."""
    r = make_receipt(tmp_path / "r", signer)
    other = receipt_claims(r.manifest, nonces=[sha256_bytes(b"another manifest")])
    r.replace_token(signer.sign(other))
    res = verify(r.dir, *pin(r))
    assert res.code == 1
    assert res.failed == {"nonce"}


def test_garbage_token_fails_without_crashing(receipt: Receipt, verify: Any) -> None:
    """A token file holding garbage gives failed checks and exit 1, not an exception."""
    receipt.token_path.write_bytes(b"\xff\xfenot a token")
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert {"signature", "algorithm", "issuer"} <= r.failed


def test_missing_token_fails_files(receipt: Receipt, verify: Any) -> None:
    """A receipt without its token fails 'files' and every token check."""
    receipt.token_path.unlink()
    r = verify(receipt.dir, *pin(receipt))
    assert r.code == 1
    assert {"files", "signature", "nonce", "platform"} <= r.failed
    assert contract.TOKEN_FILE in r.detail("files")


# ---------------------------------------------------------------------------------------------------------
# Enclave digests and the platform
# ---------------------------------------------------------------------------------------------------------


def test_enclave_digest_pin(receipt: Receipt, verify: Any) -> None:
    """--enclave-digest passes when it names the token's image digest and fails for another enclave."""
    ok = verify(
        receipt.dir, *pin(receipt), "--enclave-digest", OTHER_IMAGE_DIGEST, "--enclave-digest", IMAGE_DIGEST
    )
    assert ok.code == 0, ok.out
    assert ok.checks["pinned enclave digest"][0]
    bad = verify(receipt.dir, *pin(receipt), "--enclave-digest", OTHER_IMAGE_DIGEST)
    assert bad.code == 1
    assert bad.failed == {"pinned enclave digest"}
    assert IMAGE_DIGEST in bad.detail("pinned enclave digest")


def test_a_receipt_never_verifies_without_a_pinned_enclave_digest(receipt: Receipt, verify: Any) -> None:
    """With the signer pinned but no enclave digest, the receipt is not verified: any workload of the
    platform could have produced it. The output says what to pin."""
    r = verify(receipt.dir, *pin(receipt), UNPINNED)
    assert r.code == 1
    assert r.failed == {"pinned enclave digest"}
    assert "no enclave digest is pinned" in r.detail("pinned enclave digest")
    assert "--enclave-digest" in r.out


def test_require_hardware_fails_simulated(receipt: Receipt, verify: Any) -> None:
    """--require-hardware fails the local enclave host's simulated token."""
    r = verify(receipt.dir, *pin(receipt), "--require-hardware")
    assert r.code == 1
    assert r.failed == {"hardware"}
    assert "SIMULATED" in r.detail("hardware")


def hardware_receipt(directory: Path, signer: Signer, **kwargs: Any) -> Receipt:
    return make_receipt(
        directory,
        signer,
        manifest_overrides={"enclave": {"kind": "confidential_space", "image_digest": IMAGE_DIGEST}},
        claims=lambda m: receipt_claims(m, **hardware_claims()),
        **kwargs,
    )


def test_hardware_token_passes_require_hardware(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """A Confidential-Space-style token (Google issuer, TDX, production image) passes --require-hardware."""
    r = hardware_receipt(tmp_path / "r", signer)
    res = verify(r.dir, *pin(r), "--require-hardware", "--enclave-digest", IMAGE_DIGEST)
    assert res.code == 0, res.out
    assert "GCP_INTEL_TDX" in res.detail("hardware")
    assert "SIMULATED" not in res.out


def test_enclave_kind_must_fit_the_token(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """A receipt saying confidential_space over a simulated token fails 'platform'."""
    r = make_receipt(
        tmp_path / "r",
        signer,
        manifest_overrides={"enclave": {"kind": "confidential_space", "image_digest": IMAGE_DIGEST}},
    )
    res = verify(r.dir, *pin(r))
    assert res.code == 1
    assert res.failed == {"platform"}


def test_pki_token_chained_to_pinned_root_passes(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """An x5c token whose chain ends at the pinned root passes with --trust-root alone."""
    pki = make_pki()
    r = hardware_receipt(tmp_path / "r", signer, x5c=pki.x5c(), token_key=pki.leaf_key)
    (tmp_path / "root.pem").write_bytes(pki.root_pem)
    res = verify(r.dir, "--trust-root", tmp_path / "root.pem", "--require-hardware")
    assert res.code == 0, res.out
    assert "x5c chain" in res.detail("signature")


def test_pki_token_chained_to_another_root_fails(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """An x5c chain to a root other than the pinned one fails 'signature'."""
    pki, other = make_pki(), make_pki("Another Root")
    r = hardware_receipt(tmp_path / "r", signer, x5c=pki.x5c(), token_key=pki.leaf_key)
    (tmp_path / "other.pem").write_bytes(other.root_pem)
    res = verify(r.dir, "--trust-root", tmp_path / "other.pem")
    assert res.code == 1
    assert "signature" in res.failed
    assert "pinned root" in res.detail("signature")


def test_expired_token_still_verifies_and_reports_iat(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """A receipt whose token expired long ago still verifies; its iat is reported as ISO time."""
    iat = int(time.time()) - 400 * 86400
    r = make_receipt(
        tmp_path / "r", signer, claims=lambda m: receipt_claims(m, iat=iat, nbf=iat, exp=iat + 3600)
    )
    res = verify(r.dir, *pin(r))
    assert res.code == 0, res.out
    assert res.detail("issued at").startswith(format_timestamp(iat))


def test_future_iat_fails(tmp_path: Path, signer: Signer, verify: Any) -> None:
    """A token issued (by its own account) a day in the future fails 'issued at'."""
    iat = int(time.time()) + 86400
    r = make_receipt(
        tmp_path / "r", signer, claims=lambda m: receipt_claims(m, iat=iat, nbf=iat, exp=iat + 60)
    )
    res = verify(r.dir, *pin(r))
    assert res.code == 1
    assert res.failed == {"issued at"}


# ---------------------------------------------------------------------------------------------------------
# Usage errors
# ---------------------------------------------------------------------------------------------------------


def test_no_trust_anchor_is_a_usage_error(receipt: Receipt, verify: Any) -> None:
    """Without --trust or --trust-root, verify refuses with exit 2 and says what to pin."""
    r = verify(receipt.dir)
    assert r.code == 2
    assert "no trust anchor" in r.err
    assert "--trust" in r.err


@pytest.mark.parametrize("value", ["sha256:1234", "/nonexistent/jwks.json"])
def test_bad_trust_value_is_a_usage_error(receipt: Receipt, verify: Any, value: str) -> None:
    """A malformed thumbprint or an unreadable JWKS file is a usage error (exit 2)."""
    r = verify(receipt.dir, "--trust", value)
    assert r.code == 2
    assert r.err.startswith("dcr: error:")


def test_certificate_as_trust_key_is_a_usage_error(receipt: Receipt, verify: Any, tmp_path: Path) -> None:
    """A certificate passed to --trust is refused with a pointer to --trust-root."""
    (tmp_path / "root.pem").write_bytes(make_pki().root_pem)
    r = verify(receipt.dir, "--trust", tmp_path / "root.pem")
    assert r.code == 2
    assert "--trust-root" in r.err


def test_missing_directory_is_a_usage_error(tmp_path: Path, verify: Any, signer: Signer) -> None:
    """A receipt path that is not a directory is a usage error."""
    r = verify(tmp_path / "absent", "--trust", signer.thumbprint)
    assert r.code == 2


def test_bad_enclave_digest_is_a_usage_error(receipt: Receipt, verify: Any) -> None:
    """--enclave-digest must be a sha256 digest."""
    assert verify(receipt.dir, *pin(receipt), "--enclave-digest", "latest").code == 2


# ---------------------------------------------------------------------------------------------------------
# Trust anchors: one parser for `dcr verify --trust/--trust-root` and c.DCRExtension.trust_jwks/trust_roots
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AnchorMaterial:
    """What the trust anchor cases are made from: a directory to write files in, the plain receipt's signer
    and the PKI whose chain the hardware receipt carries."""

    dir: Path
    signer: Signer
    pki: Pki

    def file(self, name: str, data: bytes | str) -> str:
        path = self.dir / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def public_pem(self, key: Any = None) -> bytes:
        key = key or self.signer.key
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.signer.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def jwk_file(self, **changes: Any) -> str:
        return self.file("key.json", json.dumps({**self.signer.public_jwk, **changes}))

    def cert_pem(self, cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)


def _fifo(m: AnchorMaterial) -> str:
    os.mkfifo(m.dir / "fifo")
    return str(m.dir / "fifo")


def _p384_jwk(m: AnchorMaterial) -> str:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    return m.file("p384.json", ECAlgorithm.to_jwk(key))


#: (case, what to give, the refusal's words or None for accepted) for signer anchors.
SIGNER_CASES: list[tuple[str, Callable[[AnchorMaterial], str], str | None]] = [
    ("jwks file", lambda m: m.file("jwks.json", json.dumps(m.signer.jwks())), None),
    ("single jwk", lambda m: m.jwk_file(), None),
    ("pem public key", lambda m: m.file("signer.pem", m.public_pem()), None),
    ("pem public key after a comment", lambda m: m.file("s.pem", b"# the signer\n" + m.public_pem()), None),
    ("jwk with alg and use", lambda m: m.jwk_file(alg="ES256", use="sig"), None),
    ("thumbprint", lambda m: m.signer.thumbprint, None),
    (
        "thumbprint in capitals",
        lambda m: "sha256:" + m.signer.thumbprint[7:].upper(),
        "is not a key thumbprint",
    ),
    ("short thumbprint", lambda m: "sha256:1234", "is not a key thumbprint"),
    (
        "thumbprint without sha256:",
        lambda m: m.signer.thumbprint[7:],
        "is neither a file nor a key thumbprint",
    ),
    ("empty entry", lambda m: "", "is no trust anchor"),
    ("path with white space around", lambda m: " " + m.jwk_file(), "surrounding white space"),
    ("missing file", lambda m: str(m.dir / "missing.json"), "cannot read the file"),
    ("directory", lambda m: str(m.dir), "is not a regular file"),
    ("fifo", _fifo, "is not a regular file"),
    ("empty file", lambda m: m.file("empty.json", b""), "is empty"),
    ("oversized file", lambda m: m.file("big.json", b" " * (256 * 1024 + 1)), "is larger than"),
    ("not a key file", lambda m: m.file("notes.txt", "hello"), "is neither JSON nor PEM"),
    ("empty jwks", lambda m: m.file("none.json", '{"keys": []}'), "holds no keys"),
    (
        "root certificate",
        lambda m: m.file("root.pem", m.pki.root_pem),
        "holds a certificate, not a signer key",
    ),
    ("private key pem", lambda m: m.file("key.pem", m.private_pem()), "holds a private key"),
    ("private jwk", lambda m: m.jwk_file(d="c2VjcmV0"), "private or symmetric key material"),
    (
        "symmetric jwk",
        lambda m: m.file("oct.json", '{"kty": "oct", "k": "c2VjcmV0"}'),
        "private or symmetric",
    ),
    ("encryption jwk", lambda m: m.jwk_file(use="enc"), "not for signatures"),
    ("jwk for alg none", lambda m: m.jwk_file(alg="none"), "says alg 'none'"),
    ("jwk for HS256", lambda m: m.jwk_file(alg="HS256"), "says alg 'HS256'"),
    ("jwk for another curve's alg", lambda m: m.jwk_file(alg="ES384"), "says alg 'ES384'"),
    ("P-384 key", _p384_jwk, "P-256"),
    (
        "two pem public keys",
        lambda m: m.file("two.pem", m.public_pem() + m.public_pem(generate_key())),
        "exactly one PEM public key",
    ),
]

#: The same for root anchors.
ROOT_CASES: list[tuple[str, Callable[[AnchorMaterial], str], str | None]] = [
    ("root certificate", lambda m: m.file("root.pem", m.pki.root_pem), None),
    (
        "root and intermediate",
        lambda m: m.file("ca.pem", m.pki.root_pem + m.cert_pem(m.pki.intermediate)),
        None,
    ),
    ("root after a subject line", lambda m: m.file("r.pem", b"subject=CN = Test\n" + m.pki.root_pem), None),
    ("leaf certificate", lambda m: m.file("leaf.pem", m.cert_pem(m.pki.leaf)), "is not a CA certificate"),
    ("jwks file", lambda m: m.file("jwks.json", json.dumps(m.signer.jwks())), "holds no PEM certificate"),
    (
        "pem public key",
        lambda m: m.file("signer.pem", m.public_pem()),
        "holds no PEM certificate (it holds PUBLIC",
    ),
    (
        "root with a private key",
        lambda m: m.file("r.pem", m.pki.root_pem + m.private_pem()),
        "holds a private key",
    ),
    (
        "root with a public key",
        lambda m: m.file("r.pem", m.pki.root_pem + m.public_pem()),
        "besides certificates",
    ),
    ("thumbprint", lambda m: m.signer.thumbprint, "is a key thumbprint, not a certificate file"),
    ("truncated certificate", lambda m: m.file("t.pem", m.pki.root_pem[:-30]), "without its END line"),
    ("empty entry", lambda m: "", "is no trust anchor"),
    ("missing file", lambda m: str(m.dir / "missing.pem"), "cannot read the file"),
    ("directory", lambda m: str(m.dir), "is not a regular file"),
    ("empty file", lambda m: m.file("empty.pem", b"\n"), "is empty"),
    ("oversized file", lambda m: m.file("big.pem", b"\n" * (256 * 1024 + 1)), "is larger than"),
]

#: How the two paths name the two kinds of anchor.
OPTIONS = {
    "signer": ("--trust", "trust_jwks"),
    "root": ("--trust-root", "trust_roots"),
}


@pytest.fixture
def anchor_material(tmp_path: Path, signer: Signer) -> AnchorMaterial:
    (tmp_path / "anchors").mkdir()
    return AnchorMaterial(tmp_path / "anchors", signer, make_pki())


#: The extensions made here log to a plain logger: an Application left to make its own reconfigures logging
#: process-wide (logging.config.dictConfig closes every handler), and a handler that absl, loaded by the
#: synthesis tests, registered over pytest's capture would then close that capture under pytest.
EXTENSION_LOG = logging.getLogger("test_verify.extension")


def _extension_refusal(trait: str, value: str) -> tuple[str | None, Any]:
    """What DCRExtension says to ``c.DCRExtension.<trait> = [value]``: (refusal or None, the extension)."""
    from traitlets import TraitError
    from traitlets.config import Config

    from dcr_server_ext.app import DCRExtension

    try:
        app = DCRExtension(config=Config({"DCRExtension": {trait: [value]}}), log=EXTENSION_LOG)
    except TraitError as e:
        return str(e), None
    return None, app


def _as_cli(extension_message: str) -> str:
    return extension_message.replace("DCRExtension.trust_roots", "--trust-root").replace(
        "DCRExtension.trust_jwks", "--trust"
    )


@pytest.mark.parametrize(
    ("kind", "make", "refusal"),
    [pytest.param("signer", make, refusal, id=f"signer: {case}") for case, make, refusal in SIGNER_CASES]
    + [pytest.param("root", make, refusal, id=f"root: {case}") for case, make, refusal in ROOT_CASES],
)
def test_dcr_verify_and_the_server_extension_accept_and_refuse_the_same_anchors(
    kind: str,
    make: Callable[[AnchorMaterial], str],
    refusal: str | None,
    anchor_material: AnchorMaterial,
    verify: Any,
) -> None:
    """Every trust anchor `dcr verify` accepts the server extension accepts, and the other way round: the
    same signer keys (--trust / c.DCRExtension.trust_jwks) and root certificates (--trust-root /
    c.DCRExtension.trust_roots). A refusal is the same message on both paths, naming the option, what is
    wrong and what to do; an accepted anchor verifies the receipt it belongs to on both paths."""
    m = anchor_material
    value = make(m)
    option, trait = OPTIONS[kind]
    if kind == "signer":
        receipt = make_receipt(m.dir.parent / "receipt", m.signer)
    else:
        receipt = hardware_receipt(
            m.dir.parent / "receipt", m.signer, x5c=m.pki.x5c(), token_key=m.pki.leaf_key
        )

    cli = verify(receipt.dir, option, value)
    refused, app = _extension_refusal(trait, value)

    if refusal is None:
        assert cli.code == 0, cli.out + cli.err
        assert refused is None, refused
        anchors = app.load_trust()
        checks = check_receipt_dir(
            receipt.dir,
            trusted_keys=anchors.keys,
            trusted_thumbprints=anchors.thumbprints,
            trust_root_pem=anchors.roots_pem,
            expected_enclave_digests=[IMAGE_DIGEST],
        )
        assert [c.name for c in checks if not c.passed] == []
        assert {a["kind"] for a in anchors.described} <= {"key", "thumbprint", "root"}
    else:
        assert cli.code == 2 and cli.out == "", cli.out
        assert refused is not None, f"the extension accepted what dcr verify refused: {cli.err}"
        assert refusal in refused, refused
        assert refused.startswith(f"DCRExtension.{trait} ")
        # Word for word the same refusal, each naming its own option.
        assert cli.err == f"dcr: error: {_as_cli(refused)}\n"


def test_relative_anchor_paths_are_relative_to_the_current_directory_only_on_the_command_line(
    receipt: Receipt, verify: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one difference between the paths, and on purpose: `dcr verify --trust jwks.json` reads the file
    in the current directory, while a server started elsewhere refuses a relative path in its
    configuration and says to write the full path."""
    receipt.signer.write_jwks(tmp_path / "jwks.json")
    monkeypatch.chdir(tmp_path)
    assert verify(receipt.dir, "--trust", "jwks.json").code == 0
    refused, _ = _extension_refusal("trust_jwks", "jwks.json")
    assert refused is not None and "DCRExtension.trust_jwks 'jwks.json' must be an absolute path" in refused


def test_a_receipt_key_with_a_pinned_thumbprint_in_a_file_and_a_root_combine(
    tmp_path: Path, signer: Signer, verify: Any
) -> None:
    """Signer keys and roots pinned together: a PKI token verifies through the root, a plain one through
    the key; dcr verify and the extension's anchors agree on both receipts."""
    from traitlets.config import Config

    from dcr_server_ext.app import DCRExtension

    pki = make_pki()
    plain = make_receipt(tmp_path / "plain", signer)
    chained = hardware_receipt(tmp_path / "chained", signer, x5c=pki.x5c(), token_key=pki.leaf_key)
    jwks_file = signer.write_jwks(tmp_path / "jwks.json")
    (tmp_path / "root.pem").write_bytes(pki.root_pem)
    args = ["--trust", jwks_file, "--trust-root", tmp_path / "root.pem"]
    app = DCRExtension(
        config=Config(
            {"DCRExtension": {"trust_jwks": [str(jwks_file)], "trust_roots": [str(tmp_path / "root.pem")]}}
        ),
        log=EXTENSION_LOG,
    )
    anchors = app.load_trust()
    assert [a["kind"] for a in anchors.described] == ["key", "root"]
    for r in (plain, chained):
        assert verify(r.dir, *args).code == 0
        checks = check_receipt_dir(
            r.dir,
            trusted_keys=anchors.keys,
            trust_root_pem=anchors.roots_pem,
            trusted_thumbprints=(),
            expected_enclave_digests=[IMAGE_DIGEST],
        )
        assert all(c.passed for c in checks), [str(c) for c in checks if not c.passed]


# ---------------------------------------------------------------------------------------------------------
# The receipt model
# ---------------------------------------------------------------------------------------------------------


def test_manifest_round_trips_through_canonical_bytes(receipt: Receipt) -> None:
    """receipt.json holds the manifest's canonical bytes; parsing them gives the same manifest and digest."""
    raw = receipt.receipt_path.read_bytes()
    parsed = ReceiptManifest.from_bytes(raw)
    assert parsed == receipt.manifest
    assert parsed.digest == sha256_bytes(raw)


def _doc(receipt: Receipt) -> dict[str, Any]:
    return receipt.manifest.to_json()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["outputs"].reverse(), "out of order"),
        (lambda d: d["outputs"].append(dict(d["outputs"][-1])), "out of order"),
        (lambda d: d["output_check"].update(violations=["over the file limit"]), "output_check.passed"),
        (
            lambda d: (
                d["output_check"].update(passed=False, violations=["over the byte limit"]),
                d["release"].update(decision="released"),
            ),
            "cannot be released",
        ),
        (
            lambda d: d["output_check"].update(
                passed=False, violations=["over the byte limit", "symbolic links present"]
            ),
            "in the order of VIOLATION_KINDS",
        ),
        (lambda d: d["release"].update(decision="held"), "only a held one, commits"),
        (lambda d: d["release"].update(outputs_commitment=d["bundle_digest"]), "only a held one, commits"),
        (
            lambda d: d["release"].update(decision="held", outputs_commitment=d["bundle_digest"]),
            "a held receipt names no output",
        ),
        (lambda d: d["policies"]["conditions"].update({"acme/other": d["bundle_digest"]}), "conditions"),
        (lambda d: d["grant"]["claims"].update(job_id="job-" + "ee" * 12), "grant's job_id"),
        (lambda d: d.update(started_at="2030-01-01T00:00:00Z"), "started_at"),
        (lambda d: d["datasets"][0].update(version=d["bundle_digest"]), "not granted"),
        (lambda d: d["outputs"][0].update(path="../escape"), "outputs/0/path"),
        (lambda d: d.update(extra=1), "Additional properties"),
        (lambda d: d["enclave"].update(kind="laptop"), "enclave/kind"),
    ],
)
def test_manifest_invariants_refused(receipt: Receipt, mutate: Any, message: str) -> None:
    """Manifests the enclave could not have produced are refused with a message naming the problem."""
    doc = _doc(receipt)
    mutate(doc)
    with pytest.raises(DCRError, match=re.escape(message)):
        ReceiptManifest.from_json(doc)


@pytest.mark.parametrize(
    "violation",
    [
        "secret-19_female_27.9: links are not outputs",
        "leak/4449.462.bin: file type not allowed by the grant",
        "2 symbolic links to 4449.462",
        "1 symbolic link\nrow 7",
        "2 symbolic links",
        "too many bytes: 52428801 > 52428800",
        "x" * 81,
    ],
)
def test_violations_carry_no_names(receipt: Receipt, violation: str) -> None:
    """The schema admits output-check violations only as fixed kinds: a violation naming a file, or giving a
    count or a size (all of them the notebook's to choose, perhaps from the data), makes the manifest
    invalid."""
    doc = _doc(receipt)
    doc["output_check"] = {"passed": False, "violations": [violation]}
    doc["outputs"] = []
    doc["release"]["decision"] = "rejected"
    with pytest.raises(DCRError, match="output_check/violations"):
        ReceiptManifest.from_json(doc)


def test_violation_kinds_the_enclave_writes_are_valid(receipt: Receipt) -> None:
    """Every kind the supervisor writes passes the schema, alone and all together in their order."""
    doc = _doc(receipt)
    doc["outputs"] = []
    doc["release"]["decision"] = "rejected"
    for kind in VIOLATION_KINDS:
        doc["output_check"] = {"passed": False, "violations": [kind]}
        assert ReceiptManifest.from_json(doc).output_check["violations"] == [kind]
    doc["output_check"] = {"passed": False, "violations": list(VIOLATION_KINDS)}
    assert ReceiptManifest.from_json(doc).output_check["violations"] == list(VIOLATION_KINDS)
    doc["output_check"] = {"passed": False, "violations": [VIOLATION_KINDS[0]] * 2}
    with pytest.raises(DCRError, match="output_check/violations"):
        ReceiptManifest.from_json(doc)


def test_output_entries_sorted_and_refuse_links(tmp_path: Path) -> None:
    """output_entries lists files by UTF-8 path bytes with size and sha256, and refuses links and FIFOs."""
    out = tmp_path / "out"
    (out / "b").mkdir(parents=True)
    (out / "b" / "z.txt").write_bytes(b"z")
    (out / "a.txt").write_bytes(b"aa")
    (out / "B.txt").write_bytes(b"")
    entries = output_entries(out)
    assert [e["path"] for e in entries] == ["B.txt", "a.txt", "b/z.txt"]
    assert entries[1] == {"path": "a.txt", "size": 2, "sha256": sha256_bytes(b"aa")}
    (out / "link").symlink_to(out / "a.txt")
    with pytest.raises(DCRError, match="link"):
        output_entries(out)
    (out / "link").unlink()
    os.mkfifo(out / "fifo")
    with pytest.raises(DCRError, match="special file"):
        output_entries(out)


def test_write_receipt_dir_refuses_token_over_another_manifest(tmp_path: Path, signer: Signer) -> None:
    """A token whose nonce is not the manifest's digest is refused and nothing is written."""
    (tmp_path / "o").mkdir()
    manifest = make_manifest(tmp_path / "o")
    token = signer.sign(receipt_claims(manifest, nonces=[sha256_bytes(b"other")]))
    target = tmp_path / "receipt"
    with pytest.raises(DCRError, match="nonce"):
        write_receipt_dir(target, manifest, token, signer.jwks())
    assert not target.exists()


def test_write_receipt_dir_never_replaces_another_receipt(receipt: Receipt, tmp_path: Path) -> None:
    """Writing a different receipt over an existing one is refused and leaves the first intact."""
    before = receipt.receipt_path.read_bytes()
    other = make_manifest(receipt.outputs_dir, notebook="other.ipynb")
    token = receipt.signer.sign(receipt_claims(other))
    with pytest.raises(DCRError, match="another receipt"):
        write_receipt_dir(receipt.dir, other, token, receipt.signer.jwks())
    assert receipt.receipt_path.read_bytes() == before
    assert [p.name for p in receipt.dir.iterdir() if p.name.startswith(".")] == []


def test_write_receipt_dir_refuses_private_jwks(tmp_path: Path, signer: Signer) -> None:
    """The signer JWKS copy must hold public keys only."""
    (tmp_path / "o").mkdir()
    manifest = make_manifest(tmp_path / "o")
    private = dict(signer.public_jwk, d="c2VjcmV0")
    with pytest.raises(DCRError, match="private"):
        write_receipt_dir(
            tmp_path / "r", manifest, signer.sign(receipt_claims(manifest)), {"keys": [private]}
        )


def test_check_receipt_dir_needs_an_anchor(receipt: Receipt) -> None:
    """check_receipt_dir refuses to run without a pinned anchor rather than trusting the receipt."""
    with pytest.raises(DCRError, match="no trust anchor"):
        check_receipt_dir(receipt.dir)


def test_check_receipt_dir_reports_each_check(receipt: Receipt) -> None:
    """check_receipt_dir returns one Check per check, in a stable order, all passed for an untouched receipt."""
    checks = check_receipt_dir(
        receipt.dir, trusted_thumbprints=[receipt.signer.thumbprint], expected_enclave_digests=[IMAGE_DIGEST]
    )
    assert [c.name for c in checks] == ALWAYS
    assert all(c.passed for c in checks)
    assert str(checks[0]).startswith("PASS files: ")
