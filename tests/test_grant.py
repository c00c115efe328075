"""The grant as the enclave reads it: ``verify_grant`` accepts exactly the hub's grant for one job.

Every refusal names the failed check. Tokens are built here by hand (any header, any claims, any key) so
that each check is reached on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import (
    LEEWAY_SECONDS,
    MAX_GRANT_BYTES,
    GrantedDataset,
    OutputLimits,
    output_public_key_bytes,
    verify_grant,
)
from dcr_enclave.formats.jwk import PrivateKey, key_alg, public_jwk
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import generate_key

BUNDLE = "sha256:" + "b1" * 32
VERSION = "sha256:" + "d2" * 32
OUTPUT_KEY = bytes(range(32))
AIRLOCK_KEY = bytes(range(32, 64))
DATASETS = [
    GrantedDataset("acme", "insurance", VERSION, "review"),
    GrantedDataset("globex", "visits", "sha256:" + "e3" * 32, "auto"),
]


@pytest.fixture(scope="module")
def hub() -> PrivateKey:
    return generate_key("ES256")


@pytest.fixture(scope="module")
def rsa_hub() -> PrivateKey:
    return generate_key("RS256")


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _grant(key: PrivateKey, **kw: Any) -> str:
    args: dict[str, Any] = {
        "user": "alice",
        "job_id": "job-" + "0a" * 12,
        "bundle_digest": BUNDLE,
        "datasets": DATASETS,
        "output_public_key": OUTPUT_KEY,
        "output_limits": OutputLimits(max_files=7, max_bytes=1000, allowed_suffixes=(".csv",)),
        "time_limit": 600,
        "memory_bytes": 2**30,
        "airlock_public_key": AIRLOCK_KEY,
    }
    args.update(kw)
    return issue_grant(key, **args)


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _sign(claims: dict[str, Any], key: PrivateKey, **header: Any) -> str:
    """A token over ``claims`` signed by ``key``; ``header`` overrides the grant header (``typ=None``
    leaves the type out)."""
    h: dict[str, Any] = {"typ": contract.GRANT_TYP, "kid": public_jwk(key)["kid"], **header}
    return jwt.encode(claims, key, algorithm=key_alg(key), headers=h)


def _raw(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    part = [_b64(json.dumps(x).encode()) for x in (header, claims)]
    return ".".join([*part, _b64(signature)])


def _verify(token: Any, key: PrivateKey, **kw: Any) -> Any:
    jwk = public_jwk(key)
    return verify_grant(token, [jwk], hub_key_thumbprint=jwk["kid"], **kw)


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_valid_grant_round_trips(alg: str, hub: PrivateKey, rsa_hub: PrivateKey) -> None:
    """A grant issued by the pinned hub key verifies (with job id and bundle digest pinned), and every field
    it was issued with comes back unchanged: user, job, bundle, datasets with versions and release modes,
    output and airlock keys, limits, time and memory limits, issue and expiry times, the token itself."""
    key = hub if alg == "ES256" else rsa_hub
    now = int(time.time())
    token = _grant(key, now=now, grant_id="grant-" + "c4" * 16)
    g = _verify(token, key, job_id="job-" + "0a" * 12, bundle_digest=BUNDLE, now=now)
    assert (g.grant_id, g.user, g.job_id, g.bundle_digest) == (
        "grant-" + "c4" * 16,
        "alice",
        "job-" + "0a" * 12,
        BUNDLE,
    )
    assert g.datasets == tuple(DATASETS)
    assert output_public_key_bytes(g) == OUTPUT_KEY
    assert g.airlock_public_key == _b64(AIRLOCK_KEY)
    assert g.output_limits == OutputLimits(max_files=7, max_bytes=1000, allowed_suffixes=(".csv",))
    assert (g.time_limit, g.memory_bytes) == (600, 2**30)
    assert (g.issued_at, g.expires_at) == (now, now + 600 + 600)
    assert g.token == token
    assert g.release_mode == "review"
    # What the verified grant says is exactly what was signed.
    assert g.claims() == _claims(token)


def test_clock_skew_within_leeway_is_tolerated(hub: PrivateKey) -> None:
    """A grant issued a little in the future (hub clock ahead, within the leeway) or expired a moment ago
    (within the leeway) still verifies: hub and enclave clocks need not agree to the second."""
    ahead = int(time.time()) + LEEWAY_SECONDS // 2
    _verify(_grant(hub, now=ahead), hub)
    c = _claims(_grant(hub))
    c["exp"] = int(time.time()) - LEEWAY_SECONDS // 2
    _verify(_sign(c, hub), hub)


def _hs256_with_public_key(key: PrivateKey, claims: dict[str, Any]) -> str:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": contract.GRANT_TYP, "kid": public_jwk(key)["kid"]}
    unsigned = _raw(header, claims).rsplit(".", 1)[0]
    return _raw(header, claims, hmac.new(pem, unsigned.encode(), hashlib.sha256).digest())


def _set(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        c.update(changes)

    return change


def _drop(name: str) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        del c[name]

    return change


def _limits(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        c["output_limits"] = {**c["output_limits"], **changes}
        c["output_limits"] = {k: v for k, v in c["output_limits"].items() if v is not _DROP}

    return change


def _dataset(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        d = {**c["datasets"][0], **changes}
        c["datasets"] = [{k: v for k, v in d.items() if v is not _DROP}, *c["datasets"][1:]]

    return change


_DROP = object()
_PAST = int(time.time()) - 100_000
_FUTURE = int(time.time()) + 100_000


# (what is wrong, how the claims change, what the refusal says)
CLAIM_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("wrong issuer", _set(iss="someone-else"), "wrong issuer"),
    ("wrong audience", _set(aud="dcr:key-release"), "wrong audience"),
    ("audience list without ours", _set(aud=["other"]), "wrong audience"),
    ("expired", _set(iat=_PAST, nbf=_PAST, exp=_PAST + 600), "expired"),
    ("not yet valid", _set(nbf=_FUTURE, iat=_FUTURE, exp=_FUTURE + 600), "not yet valid"),
    ("iat not a number", _set(iat="yesterday"), "iat"),
    *[(f"missing {n}", _drop(n), n) for n in ("exp", "iat", "nbf", "jti", "sub", "aud", "iss")],
    *[
        (f"missing {n}", _drop(n), n)
        for n in ("job_id", "bundle_digest", "datasets", "output_key", "output_limits", "time_limit")
    ],
    ("missing memory_bytes", _drop("memory_bytes"), "memory_bytes"),
    ("malformed grant id", _set(jti="grant-1"), "grant id"),
    ("malformed job id", _set(job_id="job-../../etc"), "job id"),
    ("malformed bundle digest", _set(bundle_digest="md5:abc"), "bundle digest"),
    ("output key too short", _set(output_key=_b64(b"x" * 16)), "output key"),
    ("output key not base64url", _set(output_key="!!!not base64!!!"), "base64"),
    ("airlock key too long", _set(airlock_key=_b64(b"x" * 33)), "airlock key"),
    ("time limit zero", _set(time_limit=0), "time_limit"),
    ("time limit a string", _set(time_limit="600"), "time_limit"),
    ("memory negative", _set(memory_bytes=-1), "memory_bytes"),
    ("memory a boolean", _set(memory_bytes=True), "memory_bytes"),
    ("datasets not a list", _set(datasets={"provider": "acme"}), "datasets"),
    ("datasets a number", _set(datasets=5), "datasets"),
    ("datasets a string", _set(datasets="acme/insurance"), "datasets"),
    ("no datasets", _set(datasets=[]), "no dataset"),
    ("dataset not an object", _set(datasets=["acme/insurance"]), "dataset must be an object"),
    ("dataset without provider", _dataset(provider=_DROP), "provider"),
    ("dataset provider traversal", _dataset(provider=".."), "provider"),
    ("dataset name with slash", _dataset(dataset="insurance/../x"), "dataset"),
    ("dataset without version", _dataset(version=_DROP), "version"),
    ("dataset version not a digest", _dataset(version="latest"), "version"),
    ("dataset release mode unknown", _dataset(release="always"), "release mode"),
    (
        "dataset named twice",
        lambda c: c.update(
            datasets=[c["datasets"][0], {**c["datasets"][0], "version": "sha256:" + "f0" * 32}]
        ),
        "acme/insurance",
    ),
    ("limits not an object", _set(output_limits=[100, 1000]), "output_limits"),
    ("limits without max_bytes", _limits(max_bytes=_DROP), "max_bytes"),
    ("limits max_files zero", _limits(max_files=0), "max_files"),
    ("limits max_bytes a float", _limits(max_bytes=1.5), "max_bytes"),
    ("limits suffixes a string", _limits(allowed_suffixes=".csv"), "allowed_suffixes"),
    ("limits suffixes a number", _limits(allowed_suffixes=3), "allowed_suffixes"),
    ("limits suffix not a string", _limits(allowed_suffixes=[".csv", 7]), "allowed_suffixes"),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in CLAIM_CASES], ids=[c[0] for c in CLAIM_CASES])
def test_malformed_claims_are_refused(
    hub: PrivateKey, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    """A grant correctly signed by the pinned hub key but with a wrong, missing or malformed claim is refused
    with a DCRError naming what is wrong (never another exception)."""
    claims = _claims(_grant(hub))
    change(claims)
    with pytest.raises(DCRError, match=message) as info:
        _verify(_sign(claims, hub), hub)
    assert str(info.value).startswith("grant refused: ")


# (what is wrong, how the token is made from (hub key, good claims), what the refusal says)
TOKEN_CASES: list[tuple[str, Callable[[PrivateKey, dict[str, Any]], Any], str]] = [
    ("alg none", lambda k, c: _raw({"alg": "none", "typ": contract.GRANT_TYP}, c), "algorithm 'none'"),
    ("HS256 keyed with the public key", _hs256_with_public_key, "algorithm 'HS256'"),
    ("RS256 for an EC hub key", lambda k, c: _sign(c, generate_key("RS256")), "algorithm 'RS256'"),
    ("signed by another key", lambda k, c: _sign(c, generate_key("ES256")), "signature does not verify"),
    ("signature stripped", lambda k, c: _sign(c, k).rsplit(".", 1)[0] + ".", "signature does not verify"),
    ("typ JWT", lambda k, c: _sign(c, k, typ="JWT"), "type 'JWT'"),
    ("typ missing", lambda k, c: _sign(c, k, typ=None), "type None"),
    ("not a JWT", lambda k, c: "not-a-token", "malformed token"),
    ("header not JSON", lambda k, c: _b64(b"{oops") + "." + _sign(c, k).split(".", 1)[1], "malformed token"),
    ("oversized", lambda k, c: _sign({**c, "pad": "x" * MAX_GRANT_BYTES}, k), "larger than allowed"),
    ("not a string", lambda k, c: _sign(c, k).encode(), "missing or larger than allowed"),
    ("None", lambda k, c: None, "missing or larger than allowed"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in TOKEN_CASES], ids=[c[0] for c in TOKEN_CASES])
def test_bad_tokens_are_refused(hub: PrivateKey, make: Callable[..., Any], message: str) -> None:
    """A token with the wrong algorithm (none, HMAC keyed with the public key, another key type), the wrong
    or no JWT type, another signer, no signature, a malformed encoding, or more than MAX_GRANT_BYTES is
    refused with a message naming the problem, whatever its claims say."""
    token = make(hub, _claims(_grant(hub)))
    with pytest.raises(DCRError, match=message):
        _verify(token, hub)


def test_only_the_pinned_hub_key_is_used(hub: PrivateKey) -> None:
    """The thumbprint pin decides which key verifies: a grant is refused when no key in the JWKS has the
    pinned thumbprint, and a JWKS that also carries the signer's key does not help a grant signed by a key
    other than the pinned one."""
    other = generate_key("ES256")
    token = _grant(other)
    with pytest.raises(DCRError, match="no hub key with the pinned thumbprint"):
        verify_grant(token, [public_jwk(other)], hub_key_thumbprint=public_jwk(hub)["kid"])
    with pytest.raises(DCRError, match="signature does not verify"):
        verify_grant(token, [public_jwk(other), public_jwk(hub)], hub_key_thumbprint=public_jwk(hub)["kid"])
    with pytest.raises(DCRError, match="thumbprint"):
        verify_grant(_grant(hub), [public_jwk(hub)], hub_key_thumbprint="not-a-digest")


def test_grant_for_another_job_or_bundle_is_refused(hub: PrivateKey) -> None:
    """When the caller pins the job id or the bundle digest, a grant naming another is refused, saying so."""
    token = _grant(hub)
    with pytest.raises(DCRError, match=r"it is for job job-0a0a.*, not job-ffff"):
        _verify(token, hub, job_id="job-" + "ff" * 12)
    with pytest.raises(DCRError, match="another bundle digest"):
        _verify(token, hub, bundle_digest="sha256:" + "00" * 32)
    # Pinned to the right values, the same token verifies.
    _verify(token, hub, job_id="job-" + "0a" * 12, bundle_digest=BUNDLE)


def test_expiry_is_checked_against_the_callers_clock(hub: PrivateKey) -> None:
    """With ``now`` given, a grant whose expiry is more than the leeway before it is refused as expired."""
    now = int(time.time())
    token = _grant(hub, now=now, time_limit=60)
    exp = now + 60 + 600
    _verify(token, hub, now=exp + LEEWAY_SECONDS)
    with pytest.raises(DCRError, match="expired"):
        _verify(token, hub, now=exp + LEEWAY_SECONDS + 1)


def test_supervisor_refuses_an_attested_dataset_list_other_than_the_grants(tmp_path: Any) -> None:
    """``DCR_DATASETS`` is what a cloud provider's pool condition pins: a launch whose value differs from
    the verified grant's datasets in any way (a version, an extra or a missing dataset) is refused before
    anything else happens; without the variable (the local host) the grant alone decides."""
    from dcr_enclave.formats.grant import GrantedDataset
    from dcr_enclave.formats.sealing import generate_keypair
    from dcr_enclave.runtime.supervisor import Launch, Supervisor

    key = generate_key()
    jwk = public_jwk(key)
    job_id, bundle = contract.new_job_id(), "sha256:" + "ab" * 32
    v1, v2 = "sha256:" + "01" * 32, "sha256:" + "02" * 32
    granted = [GrantedDataset("acme", "claims", v1, "auto"), GrantedDataset("zed", "labs", v2, "auto")]
    token = issue_grant(
        key, user="t", job_id=job_id, bundle_digest=bundle, datasets=granted,
        output_public_key=generate_keypair()[1],
    )  # fmt: skip

    def supervisor(datasets: str | None) -> Supervisor:
        env = {
            contract.ENV.JOB_ID: job_id, contract.ENV.BUNDLE_DIGEST: bundle, contract.ENV.BUNDLE_URI: "/b",
            contract.ENV.GRANT: token, contract.ENV.HUB_KEY_THUMBPRINT: jwk["kid"],
            contract.ENV.HUB_JWKS: json.dumps({"keys": [jwk]}), contract.ENV.STORE_URI: "/s",
            contract.ENV.OUTPUT_URI: "/o",
        }  # fmt: skip
        if datasets is not None:
            env[contract.ENV.DATASETS] = datasets
        return Supervisor(Launch.from_env(env), link=None, scratch=tmp_path, sandbox_ids=(1, 1))  # type: ignore[arg-type]

    exact = contract.datasets_env_value([("zed", "labs", v2), ("acme", "claims", v1)])
    assert exact == f",acme/claims@{v1},zed/labs@{v2},"
    assert supervisor(exact).verify_grant().job_id == job_id
    assert supervisor(None).verify_grant().job_id == job_id
    for wrong in (
        contract.datasets_env_value([("acme", "claims", v2), ("zed", "labs", v2)]),
        contract.datasets_env_value([("acme", "claims", v1)]),
        contract.datasets_env_value([("acme", "claims", v1), ("zed", "labs", v2), ("zed", "x", v1)]),
        exact[1:],
    ):
        with pytest.raises(DCRError, match="DCR_DATASETS"):
            supervisor(wrong).verify_grant()
