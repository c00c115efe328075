"""Test helpers that make receipts the way an enclave would, signed by a test signer.

A receipt here is real in every part but its origin: real output files, a manifest built and validated by
:mod:`dcr_enclave.receipt`, and an attestation token over the manifest's digest signed by a key the test
pins. Helpers also forge what an attacker would (raw tokens with any header, test PKI chains).
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import canonical_json, sha256_bytes
from dcr_enclave.formats.jwk import PrivateKey, jwks, public_jwk, thumbprint
from dcr_enclave.formats.receipt import ReceiptManifest, build_manifest, make_reveal, output_commitment
from dcr_enclave.formats.sealing import seal_bytes, seal_dir
from dcr_enclave.pack.signing_keys import generate_key
from dcr_enclave.platform.signer import local_claims, sign_token
from dcr_enclave.runtime.receipt_writer import output_entries, write_receipt_dir

IMAGE_DIGEST = sha256_bytes(b"test enclave image")
OTHER_IMAGE_DIGEST = sha256_bytes(b"another enclave image")
BUNDLE_DIGEST = sha256_bytes(b"test bundle")
JOB_ID = "job-" + "ab" * 12
HUB_KEY_THUMBPRINT = sha256_bytes(b"test hub key")
GRANT_TOKEN = "eyJ0ZXN0IjoiZ3JhbnQifQ.eyJqb2IiOiJ0ZXN0In0.c2ln"
# The public data set lives beside the repository (read in place, never copied into it).
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "insurance"


def default_outputs() -> dict[str, bytes]:
    """Outputs like a notebook over the public insurance data would write (a notebook and a summary)."""
    rows = (DATA_DIR / "synthetic_mst.csv").read_text().splitlines()[1:]
    smokers = sum(1 for r in rows if r.split(",")[4] == "yes")
    notebook = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode()
    return {
        "analysis.ipynb": notebook,
        "results/summary.csv": f"rows,smokers\n{len(rows)},{smokers}\n".encode(),
        "results/figures/note.txt": b"no figure\n",
    }


@dataclass
class Signer:
    """A test attestation signer: a private key and its public JWK (kid = RFC 7638 thumbprint)."""

    key: PrivateKey

    @property
    def public_jwk(self) -> dict[str, Any]:
        return public_jwk(self.key)

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.public_jwk)

    def jwks(self) -> dict[str, Any]:
        return jwks(self.key)

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def sign(self, claims: Mapping[str, Any], *, x5c: list[str] | None = None) -> str:
        return sign_token(claims, self.key, kid=self.thumbprint, x5c=x5c)


def make_signer(alg: str = "ES256") -> Signer:
    return Signer(generate_key(alg))


def make_manifest(outputs_dir: Path, **overrides: Any) -> ReceiptManifest:
    """A valid manifest over the files in ``outputs_dir``; ``overrides`` replace top-level fields."""
    version = sha256_bytes(b"insurance dataset version 1")
    grant_claims = {
        "iss": contract.GRANT_ISSUER,
        "aud": contract.GRANT_AUDIENCE,
        "job_id": JOB_ID,
        "bundle_digest": BUNDLE_DIGEST,
        "datasets": [{"provider": "acme", "dataset": "insurance", "version": version, "release": "auto"}],
    }
    doc = build_manifest(
        job_id=JOB_ID,
        notebook="analysis.ipynb",
        bundle_digest=BUNDLE_DIGEST,
        enclave_kind="local",
        image_digest=IMAGE_DIGEST,
        hub_key_thumbprint=HUB_KEY_THUMBPRINT,
        grant_token=GRANT_TOKEN,
        grant_claims=grant_claims,
        datasets=[
            {
                "provider": "acme",
                "dataset": "insurance",
                "version": version,
                "files": [{"name": "real.csv", "ciphertext_sha256": sha256_bytes(b"ciphertext of real.csv")}],
            }
        ],
        output_policy=sha256_bytes(canonical_json({"max_files": 10, "max_bytes": 1 << 20})),
        conditions={"acme/insurance": sha256_bytes(b"condition")},
        outputs=output_entries(outputs_dir),
        violations=[],
        disclosure=[],
        release_mode="auto",
        decision="released",
        started_at=1_700_000_000,
        finished_at=1_700_000_060,
    ).to_json()
    doc.update(overrides)
    return ReceiptManifest.from_json(doc)


def attested_env(manifest: ReceiptManifest) -> dict[str, str]:
    return {
        contract.ENV.JOB_ID: manifest.job_id,
        contract.ENV.BUNDLE_DIGEST: manifest.bundle_digest,
        contract.ENV.HUB_KEY_THUMBPRINT: manifest.hub_key_thumbprint,
    }


def hardware_claims() -> dict[str, Any]:
    """Overrides that make local claims look like a production Confidential Space token."""
    return {
        "iss": contract.GOOGLE_ISSUER,
        "hwmodel": "GCP_INTEL_TDX",
        "swname": contract.HARDWARE_SWNAME,
        "swversion": ["250301"],
        "dbgstat": "disabled-since-boot",
        "secboot": True,
        "sub": "https://www.googleapis.com/compute/v1/projects/p/zones/europe-west4-a/instances/enclave-1",
        "google_service_accounts": ["enclave@p.iam.gserviceaccount.com"],
        "submods": {
            "confidential_space": {"support_attributes": ["LATEST", "STABLE", "USABLE"]},
            "container": {"image_reference": "europe-docker.pkg.dev/p/dcr/enclave@" + IMAGE_DIGEST},
            "gce": {
                "project_id": "p",
                "zone": "europe-west4-a",
                "instance_id": "1",
                "instance_name": "enclave-1",
            },
        },
    }


def receipt_claims(manifest: ReceiptManifest, **extra: Any) -> dict[str, Any]:
    """Claims an enclave host would attest for ``manifest`` (nonce = its digest); ``extra`` overrides."""
    return local_claims(
        image_digest=extra.pop("image_digest", manifest.image_digest),
        env=attested_env(manifest),
        audience=extra.pop("audience", contract.RECEIPT_AUDIENCE),
        nonces=extra.pop("nonces", [manifest.digest]),
        **extra,
    )


@dataclass
class Receipt:
    """A receipt directory on disk and what made it."""

    dir: Path
    manifest: ReceiptManifest
    token: str
    claims: dict[str, Any]
    signer: Signer
    outputs: dict[str, bytes] = field(default_factory=dict)

    @property
    def outputs_dir(self) -> Path:
        return self.dir / contract.OUTPUTS_DIR

    @property
    def token_path(self) -> Path:
        return self.dir / contract.TOKEN_FILE

    @property
    def receipt_path(self) -> Path:
        return self.dir / contract.RECEIPT_FILE

    @property
    def jwks_path(self) -> Path:
        return self.dir / contract.SIGNER_JWKS_FILE

    def replace_token(self, token: str) -> None:
        self.token_path.write_text(token + "\n")


def make_receipt(
    directory: Path,
    signer: Signer,
    *,
    outputs: Mapping[str, bytes] | None = None,
    manifest_overrides: Mapping[str, Any] | None = None,
    claims: Callable[[ReceiptManifest], dict[str, Any]] | None = None,
    x5c: list[str] | None = None,
    token_key: PrivateKey | None = None,
) -> Receipt:
    """Write a complete receipt into ``directory``: outputs, manifest, token and signer JWKS.

    ``claims`` builds the token claims from the manifest (default :func:`receipt_claims`); ``token_key``
    signs with another key than ``signer``'s (``x5c`` leaf keys).
    """
    files = dict(default_outputs() if outputs is None else outputs)
    out = directory / contract.OUTPUTS_DIR
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    out.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(out, **dict(manifest_overrides or {}))
    token_claims = (claims or receipt_claims)(manifest)
    if token_key is not None:
        token = sign_token(token_claims, token_key, kid="leaf", x5c=x5c)
    else:
        token = signer.sign(token_claims, x5c=x5c)
    write_receipt_dir(directory, manifest, token, signer.jwks())
    return Receipt(directory, manifest, token, token_claims, signer, files)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes = b"") -> str:
    """A compact JWS with any header and signature: how an attacker writes tokens."""
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature)]
    )


# ---------------------------------------------------------------------------------------------------------
# Test PKI: a root, an intermediate and a leaf, like Google's attestation PKI
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def x5c(self, *, include_root: bool = True) -> list[str]:
        chain = [self.leaf, self.intermediate] + ([self.root] if include_root else [])
        return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def make_pki(name: str = "Test Attestation Root", *, leaf_valid_days: float = 30) -> Pki:
    """A three-level EC chain; the leaf is valid from a day ago for ``leaf_valid_days`` days."""
    now = datetime.now(UTC)
    start, end = now - timedelta(days=365), now + timedelta(days=3650)
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert(name, root_key, name, root_key, ca=True, not_before=start, not_after=end)
    inter = _cert(f"{name} Intermediate", inter_key, name, root_key, ca=True, not_before=start, not_after=end)
    leaf = _cert(
        "Attestation Signer",
        leaf_key,
        f"{name} Intermediate",
        inter_key,
        ca=False,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=leaf_valid_days),
    )
    return Pki(root_key, root, inter, leaf_key, leaf)


def held_result_tar(
    tmp: Path,
    granted: Mapping[str, Any],
    signer: Signer,
    *,
    hub_thumbprint: str,
    airlock_public: bytes,
    outputs: Mapping[str, bytes],
    sealed_outputs: Mapping[str, bytes] | None = None,
    decision: str = "held",
    seal_to: bytes | None = None,
) -> bytes:
    """The tar a researcher's server hands the hub's airlock for a held job, made as the enclave makes it:
    a receipt over the real grant the hub issued (``granted``: its answer), attested by ``signer``, with the
    outputs and the reveal of their commitment sealed to the airlock. ``sealed_outputs`` seals other bytes
    than the receipt commits to (a forgery); ``seal_to`` another key than the airlock's."""
    job_id = str(granted["job_id"])
    work = Path(tempfile.mkdtemp(dir=tmp, prefix="held-"))
    out_dir = work / "outputs"
    out_dir.mkdir()
    for rel, data in outputs.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_bytes(data)
    entries = output_entries(out_dir)
    reveal = make_reveal(entries, secrets.token_bytes(32))
    token = str(granted["grant"])
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    held = decision == "held"
    manifest = build_manifest(
        job_id=job_id,
        notebook="analysis.ipynb",
        bundle_digest=claims["bundle_digest"],
        enclave_kind="local",
        image_digest=IMAGE_DIGEST,
        hub_key_thumbprint=hub_thumbprint,
        grant_token=token,
        grant_claims=claims,
        datasets=[
            {
                "provider": d["provider"],
                "dataset": d["dataset"],
                "version": d["version"],
                "files": [{"name": "real.csv", "ciphertext_sha256": sha256_bytes(b"ciphertext")}],
            }
            for d in claims["datasets"]
        ],
        output_policy=sha256_bytes(b"limits"),
        conditions={},
        outputs=[] if held else entries,
        violations=[],
        disclosure=[],
        release_mode="review",
        decision=decision,
        started_at=1_700_000_000,
        finished_at=1_700_000_060,
        outputs_commitment=output_commitment(reveal) if held else None,
    )
    result = work / "result"
    target = seal_to or airlock_public
    write_receipt_dir(result, manifest, signer.sign(receipt_claims(manifest)), signer.jwks())
    sealed_dir = out_dir
    if sealed_outputs is not None:
        sealed_dir = work / "forged"
        for rel, data in sealed_outputs.items():
            (sealed_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (sealed_dir / rel).write_bytes(data)
    seal_dir(sealed_dir, result / contract.SEALED_OUTPUTS_FILE, target, job_id)
    seal_bytes(canonical_json(reveal), result / contract.SEALED_REVEAL_FILE, target, job_id=job_id)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(result.iterdir()):
            tf.add(p, arcname=p.name)
    return buf.getvalue()
