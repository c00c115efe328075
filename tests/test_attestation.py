"""Attestation tokens: the claims model, signing, and verification against pinned anchors only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from receipt_factory import (
    BUNDLE_DIGEST,
    HUB_KEY_THUMBPRINT,
    IMAGE_DIGEST,
    JOB_ID,
    Pki,
    Signer,
    hardware_claims,
    make_pki,
    make_signer,
    raw_token,
)

from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import AttestationClaims, TokenCheckError
from dcr_enclave.formats.digests import sha256_bytes
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.platform.signer import local_claims, sign_token
from dcr_enclave.verify.token import verify_token

NONCE = sha256_bytes(b"a receipt manifest")
ENV = {
    contract.ENV.JOB_ID: JOB_ID,
    contract.ENV.BUNDLE_DIGEST: BUNDLE_DIGEST,
    contract.ENV.HUB_KEY_THUMBPRINT: HUB_KEY_THUMBPRINT,
}


def claims(**extra: Any) -> dict[str, Any]:
    return local_claims(
        image_digest=IMAGE_DIGEST, env=ENV, audience=contract.RECEIPT_AUDIENCE, nonces=[NONCE], **extra
    )


def check(token: str, *, keys: list[dict[str, Any]] | None, root: bytes | None = None, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "issuers": {contract.GOOGLE_ISSUER, contract.LOCAL_ISSUER},
        "audience": contract.RECEIPT_AUDIENCE,
        "nonce": NONCE,
        "require_hardware": False,
        "verify_exp": False,
    }
    options.update(kwargs)
    return verify_token(token, trusted_keys=keys, trust_root_pem=root, **options)


def failed_check(token: str, **kwargs: Any) -> str:
    with pytest.raises(TokenCheckError) as info:
        check(token, **kwargs)
    return info.value.check


@pytest.fixture(scope="module")
def signer() -> Signer:
    return make_signer()


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


# ---------------------------------------------------------------------------------------------------------
# Claims and signing
# ---------------------------------------------------------------------------------------------------------


def test_local_claims_follow_the_confidential_space_model() -> None:
    """Local claims carry Confidential Space's claim names with the simulation's platform values."""
    c = claims()
    assert c["iss"] == contract.LOCAL_ISSUER
    assert c["hwmodel"] == contract.LOCAL_HWMODEL
    assert c["swname"] == contract.LOCAL_SWNAME
    assert c["dbgstat"] == "enabled"
    assert c["secboot"] is False
    assert c["eat_nonce"] == NONCE
    assert c["submods"]["container"]["image_digest"] == IMAGE_DIGEST
    assert c["submods"]["container"]["env"] == ENV
    assert c["exp"] - c["iat"] == 3600


def test_local_claims_attest_only_the_attested_launch_names() -> None:
    """Launch variables outside ATTESTED_ENV_NAMES (paths, the grant) never enter the claims."""
    env = dict(ENV, DCR_BUNDLE_URI="/spool/bundle", DCR_GRANT="eyJ...")
    c = local_claims(image_digest=IMAGE_DIGEST, env=env, audience="a", nonces=[NONCE])
    assert set(c["submods"]["container"]["env"]) == set(contract.ATTESTED_ENV_NAMES)


def test_local_claims_refuse_a_missing_attested_name() -> None:
    """Without the job id (or any attested name) no claims are produced."""
    env = {k: v for k, v in ENV.items() if k != contract.ENV.JOB_ID}
    with pytest.raises(DCRError, match=contract.ENV.JOB_ID):
        local_claims(image_digest=IMAGE_DIGEST, env=env, audience="a", nonces=[NONCE])


@pytest.mark.parametrize("nonces", [["short"], ["x" * 89], [NONCE] * 7])
def test_local_claims_refuse_nonces_outside_the_limits(nonces: list[str]) -> None:
    """Nonces must be 8 to 88 bytes each and at most six, as Confidential Space requires."""
    with pytest.raises(TokenCheckError, match="eat_nonce"):
        local_claims(image_digest=IMAGE_DIGEST, env=ENV, audience="a", nonces=nonces)


def test_extra_claims_merge_into_nested_objects() -> None:
    """Overriding one sub-claim keeps its siblings (the container env survives an image_reference change)."""
    c = claims(submods={"container": {"image_reference": "ref"}})
    assert c["submods"]["container"]["image_reference"] == "ref"
    assert c["submods"]["container"]["env"] == ENV


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_sign_token_header(alg: str) -> None:
    """sign_token takes alg from the key and sets kid and typ JWT."""
    s = make_signer(alg)
    header = jwt.get_unverified_header(s.sign(claims()))
    assert header == {"alg": alg, "kid": s.thumbprint, "typ": "JWT"}


def test_claims_view(signer: Signer) -> None:
    """AttestationClaims exposes typed fields; a local token is simulated and not hardware."""
    c = check(signer.sign(claims()), keys=[signer.public_jwk])
    assert isinstance(c, AttestationClaims)
    assert c.image_digest == IMAGE_DIGEST
    assert dict(c.env) == ENV
    assert c.nonces == (NONCE,)
    assert c.hwmodel == contract.LOCAL_HWMODEL
    assert c.is_simulated and not c.is_hardware
    assert c.attested_env(contract.ENV.JOB_ID) == JOB_ID
    with pytest.raises(TypeError):
        c.payload["iss"] = "x"  # type: ignore[index]


def test_claims_view_of_hardware_token(signer: Signer) -> None:
    """A Google-style token parses its gce submodule, service accounts and support attributes."""
    c = check(signer.sign(claims(**hardware_claims())), keys=[signer.public_jwk], require_hardware=True)
    assert c.is_hardware and not c.is_simulated
    assert c.support_attributes == ("LATEST", "STABLE", "USABLE")
    assert (c.project_id, c.zone, c.instance_name) == ("p", "europe-west4-a", "enclave-1")
    assert c.google_service_accounts == ("enclave@p.iam.gserviceaccount.com",)


@pytest.mark.parametrize(
    ("change", "claim"),
    [
        ({"iat": "yesterday"}, "iat"),
        ({"eat_nonce": 5}, "eat_nonce"),
        ({"aud": []}, "aud"),
        ({"hwmodel": None}, "hwmodel"),
        ({"secboot": "yes"}, "secboot"),
        ({"submods": {"container": {"env": {"A": 1}}}}, "submods.container.env"),
        ({"submods": {"confidential_space": {"support_attributes": "STABLE"}}}, "support_attributes"),
    ],
)
def test_from_payload_checks_types(change: dict[str, Any], claim: str) -> None:
    """Claims of the wrong type are refused naming the claim."""
    payload = claims()
    payload.update(change)
    with pytest.raises(TokenCheckError, match=claim):
        AttestationClaims.from_payload(payload)


def test_eat_nonce_list_form() -> None:
    """eat_nonce may be a list of nonces; each is a candidate."""
    c = AttestationClaims.from_payload(claims(eat_nonce=["another-nonce", NONCE]))
    assert c.nonces == ("another-nonce", NONCE)


# ---------------------------------------------------------------------------------------------------------
# Verification against pinned keys
# ---------------------------------------------------------------------------------------------------------


def test_verify_local_token(signer: Signer) -> None:
    """A local token verifies against its pinned signer key."""
    assert check(signer.sign(claims()), keys=[signer.public_jwk]).issuer == contract.LOCAL_ISSUER


def test_unpinned_signer_fails(signer: Signer) -> None:
    """A token from a key that is not pinned fails 'signature'."""
    assert failed_check(make_signer().sign(claims()), keys=[signer.public_jwk]) == "signature"


def test_key_in_token_header_is_never_used(signer: Signer) -> None:
    """A token carrying its own key (jwk header) still verifies only against the pinned keys."""
    attacker = make_signer()
    token = jwt.encode(
        claims(),
        attacker.key,
        algorithm="ES256",
        headers={"kid": signer.thumbprint, "jwk": attacker.public_jwk},
    )
    assert failed_check(token, keys=[signer.public_jwk]) == "signature"


def test_kid_selects_and_unknown_kid_tries_every_key(signer: Signer) -> None:
    """The pinned key is found by kid; with an unknown kid every pinned key is tried."""
    other = make_signer()
    keys = [other.public_jwk, signer.public_jwk]
    assert check(signer.sign(claims()), keys=keys)
    token = sign_token(claims(), signer.key, kid="google-style-key-id")
    assert check(token, keys=keys)


def test_algorithm_must_fit_the_pinned_key_type(signer: Signer) -> None:
    """An ES256 token never verifies against a pinned RSA key, and a key pinned for RS256 is not used for ES256."""
    rsa_signer = make_signer("RS256")
    with pytest.raises(TokenCheckError, match="no pinned key fits alg ES256"):
        check(signer.sign(claims()), keys=[rsa_signer.public_jwk])
    mislabelled = dict(signer.public_jwk, alg="RS256")
    with pytest.raises(DCRError, match="unusable pinned key"):
        check(signer.sign(claims()), keys=[mislabelled])


def test_alg_none_is_refused(signer: Signer) -> None:
    """alg none fails the 'algorithm' check."""
    token = raw_token({"alg": "none", "typ": "JWT"}, claims())
    assert failed_check(token, keys=[signer.public_jwk]) == "algorithm"


def test_hmac_with_public_key_is_refused(signer: Signer) -> None:
    """HS256 keyed with the pinned public key's PEM fails the 'algorithm' check."""
    pem = signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": signer.thumbprint}
    unsigned = raw_token(header, claims()).rsplit(".", 1)[0]
    token = raw_token(header, claims(), hmac.new(pem, unsigned.encode(), hashlib.sha256).digest())
    assert failed_check(token, keys=[signer.public_jwk]) == "algorithm"


def test_oversized_and_malformed_tokens_fail_format(signer: Signer) -> None:
    """Tokens that are not compact JWS, or are huge, fail 'format' before any parsing of claims."""
    assert failed_check("not-a-token", keys=[signer.public_jwk]) == "format"
    assert failed_check("a." * 40000 + "b", keys=[signer.public_jwk]) == "format"


def test_deeply_nested_json_is_refused_not_crashing(signer: Signer, pki: Pki) -> None:
    """Hostile nesting in a header or (for x5c tokens, read before the chain) a payload is a refusal."""
    deep = b"[" * 12000 + b"]" * 12000
    enc = base64.urlsafe_b64encode(deep).rstrip(b"=").decode()
    assert failed_check(f"{enc}.e30.c2ln", keys=[signer.public_jwk]) == "format"
    header = base64.urlsafe_b64encode(b'{"alg":"ES256","x5c":["AA=="]}').rstrip(b"=").decode()
    with pytest.raises(TokenCheckError):
        check(f"{header}.{enc}.c2ln", keys=None, root=pki.root_pem)


@pytest.mark.parametrize(
    ("kwargs", "extra", "name"),
    [
        ({"issuers": {contract.GOOGLE_ISSUER}}, {}, "issuer"),
        ({"audience": contract.KEY_RELEASE_AUDIENCE}, {}, "audience"),
        ({}, {"aud": [contract.RECEIPT_AUDIENCE, "other"]}, "audience"),
        ({"nonce": sha256_bytes(b"fresh challenge")}, {}, "nonce"),
        ({"require_hardware": True}, {}, "hardware"),
        ({}, {"hwmodel": "GCP_INTEL_TDX"}, "platform"),
    ],
)
def test_claim_checks(signer: Signer, kwargs: dict[str, Any], extra: dict[str, Any], name: str) -> None:
    """Issuer, audience, nonce, hardware and platform each fail under their own name."""
    token = signer.sign(claims(**extra))
    assert failed_check(token, keys=[signer.public_jwk], **kwargs) == name


def test_expiry_is_checked_only_when_asked(signer: Signer) -> None:
    """An expired token fails 'expiry' with verify_exp (key release) and verifies without it (receipts)."""
    iat = int(time.time()) - 7200
    token = signer.sign(claims(iat=iat, nbf=iat, exp=iat + 60))
    assert failed_check(token, keys=[signer.public_jwk], verify_exp=True) == "expiry"
    assert check(token, keys=[signer.public_jwk], verify_exp=False).expires_at == iat + 60


def _support(attrs: list[str]) -> Any:
    def change(c: dict[str, Any]) -> None:
        c["submods"]["confidential_space"]["support_attributes"] = attrs

    return change


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda c: c.update(swname="GCE"), "swname"),
        (lambda c: c.update(dbgstat="enabled"), "dbgstat"),
        (_support(["USABLE"]), "STABLE"),
        (_support([]), "STABLE"),
        (lambda c: c.update(hwmodel="GCP_SHIELDED_VM"), "hwmodel"),
        (lambda c: c.update(hwmodel=contract.LOCAL_HWMODEL), "hwmodel"),
        (lambda c: c.update(secboot=False), "secboot"),
    ],
)
def test_google_platform_claims(signer: Signer, change: Any, problem: str) -> None:
    """A Google token must be production Confidential Space on a memory-encrypting TEE with STABLE support."""
    payload = claims(**hardware_claims())
    change(payload)
    with pytest.raises(TokenCheckError, match=problem) as info:
        check(signer.sign(payload), keys=[signer.public_jwk])
    assert info.value.check == "platform"


# ---------------------------------------------------------------------------------------------------------
# PKI tokens (x5c chains to a pinned root)
# ---------------------------------------------------------------------------------------------------------


def pki_token(pki: Pki, *, include_root: bool = True, **extra: Any) -> str:
    return sign_token(
        claims(**hardware_claims(), **extra), pki.leaf_key, kid="leaf", x5c=pki.x5c(include_root=include_root)
    )


@pytest.mark.parametrize("include_root", [True, False])
def test_x5c_chain_to_pinned_root(pki: Pki, include_root: bool) -> None:
    """A chain leaf → intermediate (→ root) verifies against the pinned root, root included or not."""
    c = check(pki_token(pki, include_root=include_root), keys=None, root=pki.root_pem, require_hardware=True)
    assert c.is_hardware


def test_x5c_chain_to_another_root_fails(pki: Pki) -> None:
    """A chain to a root that is not pinned fails 'signature'."""
    assert failed_check(pki_token(pki), keys=None, root=make_pki("Other Root").root_pem) == "signature"


def test_x5c_without_pinned_root_is_not_trusted(pki: Pki, signer: Signer) -> None:
    """With only pinned keys, a token's own x5c chain is ignored: its leaf key is not pinned."""
    assert failed_check(pki_token(pki), keys=[signer.public_jwk]) == "signature"


def test_x5c_token_signed_by_another_key_fails(pki: Pki) -> None:
    """A valid chain does not help a token that its leaf key did not sign."""
    token = sign_token(claims(**hardware_claims()), make_signer().key, kid="leaf", x5c=pki.x5c())
    with pytest.raises(TokenCheckError, match="does not verify"):
        check(token, keys=None, root=pki.root_pem)


def test_x5c_chain_out_of_order_fails(pki: Pki) -> None:
    """Certificates must each be issued by the next one."""
    chain = pki.x5c()
    token = sign_token(
        claims(**hardware_claims()), pki.leaf_key, kid="leaf", x5c=[chain[1], chain[0], chain[2]]
    )
    assert failed_check(token, keys=None, root=pki.root_pem) == "signature"


def test_x5c_leaf_not_valid_at_iat_fails(pki: Pki) -> None:
    """The chain must be valid when the token was issued (the leaf did not exist a week ago)."""
    iat = int((datetime.now(UTC) - timedelta(days=7)).timestamp())
    token = pki_token(pki, iat=iat, nbf=iat, exp=iat + 3600)
    with pytest.raises(TokenCheckError, match="not valid at iat"):
        check(token, keys=None, root=pki.root_pem)


def test_x5c_issuer_must_be_a_ca(pki: Pki) -> None:
    """A certificate that is not a CA cannot issue another in the chain."""
    fake_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    # A leaf issued by the (non-CA) real leaf, correctly signed by it.
    fake = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake Signer")]))
        .issuer_name(pki.leaf.subject)
        .public_key(fake_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(pki.leaf_key, hashes.SHA256())
    )
    der = base64.b64encode(fake.public_bytes(serialization.Encoding.DER)).decode()
    token = sign_token(claims(**hardware_claims()), fake_key, kid="fake", x5c=[der, *pki.x5c()])
    with pytest.raises(TokenCheckError, match="not a CA"):
        check(token, keys=None, root=pki.root_pem)


def test_root_without_x5c_fails(signer: Signer, pki: Pki) -> None:
    """With only a pinned root, a token without an x5c chain cannot verify."""
    with pytest.raises(TokenCheckError, match="no x5c chain"):
        check(signer.sign(claims()), keys=None, root=pki.root_pem)


def test_no_anchor_is_refused(signer: Signer) -> None:
    """Verification without any pinned anchor is refused outright."""
    with pytest.raises(DCRError, match="no trust anchor"):
        check(signer.sign(claims()), keys=None)
