"""The provider's key-release condition compiled to CEL and evaluated (dcr_enclave.platform.condition_cel)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
from cel_expr_python import cel

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError, LimitError
from dcr_enclave.platform import condition_cel as release_policy
from dcr_enclave.platform.condition import KeyReleaseCondition, PlatformCondition
from dcr_enclave.platform.condition_cel import (
    cel_string_literal,
    clauses,
    compile_condition,
    compile_wip_condition,
    evaluate,
)

PROJECT = "dcr-enclaves"
ACCOUNT = "enclave@dcr-enclaves.iam.gserviceaccount.com"


def digest(ch: str) -> str:
    return "sha256:" + ch * 64


VERSION, IMAGE, HUB_TP, BUNDLE = digest("1"), digest("a"), digest("c"), digest("b")


def cs_condition(**changes: Any) -> dict[str, Any]:
    """A complete Confidential Space condition pinning every field, bundle digests included."""
    platform = PlatformCondition.defaults(
        "confidential_space", project_id=PROJECT, service_accounts=(ACCOUNT,)
    )
    doc = KeyReleaseCondition(
        provider="insurer",
        dataset="claims",
        versions=(VERSION,),
        platform=platform,
        enclave_digests=(IMAGE,),
        hub_key_thumbprints=(HUB_TP,),
        bundle_digests=(BUNDLE,),
    ).to_json()
    doc.update(changes)
    return doc


def cs_claims() -> dict[str, Any]:
    """Token claims of a production Confidential Space VM that satisfies :func:`cs_condition`."""
    return {
        "iss": contract.GOOGLE_ISSUER,
        "hwmodel": "GCP_AMD_SEV",
        "swname": "CONFIDENTIAL_SPACE",
        "dbgstat": "disabled-since-boot",
        "secboot": True,
        "google_service_accounts": [ACCOUNT],
        "submods": {
            "container": {
                "image_digest": IMAGE,
                "env": {
                    contract.ENV.JOB_ID: "job-" + "0" * 24,
                    contract.ENV.BUNDLE_DIGEST: BUNDLE,
                    contract.ENV.HUB_KEY_THUMBPRINT: HUB_TP,
                    contract.ENV.DATASETS: contract.datasets_env_value(
                        [("acme", "other", digest("9")), ("insurer", "claims", VERSION)]
                    ),
                },
            },
            "confidential_space": {"support_attributes": ["LATEST", "STABLE", "USABLE"]},
            "gce": {"project_id": PROJECT},
        },
    }


def request() -> dict[str, Any]:
    return {
        "provider": "insurer",
        "dataset": "claims",
        "version": VERSION,
        "bundle_digest": BUNDLE,
        "hub_key_thumbprint": HUB_TP,
    }


def test_matching_claims_are_allowed() -> None:
    """Claims and request that meet every pin release the key, with no failed clause."""
    d = evaluate(cs_condition(), cs_claims(), request())
    assert d.allowed is True
    assert d.failed == []
    assert d.expression == compile_condition(cs_condition())


def _env(claims: dict[str, Any]) -> dict[str, str]:
    return claims["submods"]["container"]["env"]


def _set_hub(claims: dict[str, Any], req: dict[str, Any]) -> None:
    # An unpinned hub key, consistently in token and request, so only the pin fails (not the binding).
    _env(claims)[contract.ENV.HUB_KEY_THUMBPRINT] = req["hub_key_thumbprint"] = digest("d")


def _set_bundle(claims: dict[str, Any], req: dict[str, Any]) -> None:
    _env(claims)[contract.ENV.BUNDLE_DIGEST] = req["bundle_digest"] = digest("e")


MUTATIONS: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "provider": lambda c, r: r.update(provider="other"),
    "dataset": lambda c, r: r.update(dataset="other"),
    "versions": lambda c, r: r.update(version=digest("2")),
    "platform.hwmodel": lambda c, r: c.update(hwmodel="GCP_SHIELDED_VM"),
    "platform.swname": lambda c, r: c.update(swname="GCE"),
    "platform.dbgstat": lambda c, r: c.update(dbgstat="enabled"),
    "platform.secboot": lambda c, r: c.update(secboot=False),
    "platform.support_attributes": lambda c, r: c["submods"]["confidential_space"].update(
        support_attributes=["USABLE"]
    ),
    "platform.project_id": lambda c, r: c["submods"]["gce"].update(project_id="someone-else"),
    "platform.service_accounts": lambda c, r: c.update(
        google_service_accounts=["x@y.iam.gserviceaccount.com"]
    ),
    "enclave_digests": lambda c, r: c["submods"]["container"].update(image_digest=digest("f")),
    "hub_key_thumbprints": _set_hub,
    "bundle_digests": _set_bundle,
    "binding.hub_key_thumbprint": lambda c, r: r.update(hub_key_thumbprint=digest("d")),
    "binding.bundle_digest": lambda c, r: r.update(bundle_digest=digest("e")),
}


@pytest.mark.parametrize("clause", sorted(MUTATIONS))
def test_each_field_denies_and_is_named(clause: str) -> None:
    """Breaking one pin denies the release and names exactly that clause."""
    claims, req = cs_claims(), request()
    MUTATIONS[clause](claims, req)
    d = evaluate(cs_condition(), claims, req)
    assert d.allowed is False
    assert d.failed_clauses == [clause]


def test_every_clause_has_a_mutation() -> None:
    """The per-field test above covers every clause the full condition compiles to."""
    assert {cl.name for cl in clauses(cs_condition())} == set(MUTATIONS)


def test_unpinned_bundles_allow_any_granted_bundle() -> None:
    """With bundle_digests null any bundle passes, but the grant must still name the launched bundle."""
    cond = cs_condition(bundle_digests=None)
    claims, req = cs_claims(), request()
    _set_bundle(claims, req)
    assert evaluate(cond, claims, req).allowed is True
    assert "bundle_digests" not in {cl.name for cl in clauses(cond)}
    req["bundle_digest"] = digest("9")
    assert evaluate(cond, claims, req).failed_clauses == ["binding.bundle_digest"]


def test_several_failures_are_all_named() -> None:
    """Every failing clause is reported, not only the first."""
    claims, req = cs_claims(), request()
    claims["dbgstat"] = "enabled"
    req["version"] = digest("2")
    assert sorted(evaluate(cs_condition(), claims, req).failed_clauses) == ["platform.dbgstat", "versions"]


def test_missing_claim_is_an_error_that_denies() -> None:
    """A claim absent from the token is a CEL error (not false, not a crash): denied, with the reason."""
    claims = cs_claims()
    del claims["submods"]["gce"]
    d = evaluate(cs_condition(), claims, request())
    assert d.allowed is False
    assert d.failed_clauses == ["platform.project_id"]
    assert "error:" in d.failed[0] and "gce" in d.failed[0]


def test_claim_of_the_wrong_type_denies() -> None:
    """secboot as the string "true" is not the boolean true."""
    claims = cs_claims()
    claims["secboot"] = "true"
    assert evaluate(cs_condition(), claims, request()).failed_clauses == ["platform.secboot"]


def test_request_value_of_the_wrong_type_denies() -> None:
    """A request value that is not a string cannot be bound: the whole evaluation errors and denies."""
    req = request()
    req["version"] = 1
    d = evaluate(cs_condition(), cs_claims(), req)
    assert d.allowed is False
    assert d.failed and all("error:" in f for f in d.failed)


def test_read_only_claims_views_are_accepted() -> None:
    """Verified claims arrive as read-only mappings (MappingProxyType); they evaluate like dicts."""
    claims = cs_claims()
    frozen = MappingProxyType({**claims, "submods": MappingProxyType(claims["submods"])})
    assert evaluate(cs_condition(), frozen, request()).allowed is True


def test_injection_in_a_request_value_does_not_change_the_meaning() -> None:
    """A dataset name that would close a string literal and add `|| true` is just an unequal value."""
    req = request()
    req["dataset"] = "claims' || true || '"
    d = evaluate(cs_condition(), cs_claims(), req)
    assert d.allowed is False
    assert d.failed_clauses == ["dataset"]
    assert "|| true" not in d.expression


def test_injection_in_a_claim_value_does_not_change_the_meaning() -> None:
    """A token claim crafted as CEL syntax is compared as data."""
    claims = cs_claims()
    claims["hwmodel"] = "GCP_AMD_SEV' || true || '"
    assert evaluate(cs_condition(), claims, request()).failed_clauses == ["platform.hwmodel"]


def test_condition_values_never_appear_in_the_expression() -> None:
    """The broker's expression only names variables: no condition value is spliced into its text."""
    text = compile_condition(cs_condition())
    for value in (
        VERSION,
        IMAGE,
        HUB_TP,
        BUNDLE,
        PROJECT,
        ACCOUNT,
        "insurer",
        "claims",
        "STABLE",
        "GCP_AMD_SEV",
    ):
        assert value not in text


def test_quoted_condition_value_is_refused() -> None:
    """A condition whose dataset holds quotes is invalid: compiling refuses, evaluating denies."""
    bad = cs_condition(dataset="claims' || true || '")
    with pytest.raises(DCRError, match="dataset"):
        compile_condition(bad)
    d = evaluate(bad, cs_claims(), request())
    assert d.allowed is False
    assert d.failed_clauses == ["condition"]


def test_local_condition_has_no_cloud_clauses() -> None:
    """The local platform pins hwmodel, swname and dbgstat only, and local tokens satisfy it."""
    cond = cs_condition(platform=PlatformCondition.defaults("local").to_json(), bundle_digests=None)
    names = {cl.name for cl in clauses(cond)}
    assert not names & {"platform.secboot", "platform.support_attributes", "platform.project_id"}
    claims = cs_claims()
    del claims["submods"]["gce"], claims["submods"]["confidential_space"], claims["google_service_accounts"]
    claims.update(
        iss=contract.LOCAL_ISSUER,
        hwmodel=contract.LOCAL_HWMODEL,
        swname=contract.LOCAL_SWNAME,
        dbgstat="enabled",
    )
    del claims["secboot"]
    assert evaluate(cond, claims, request()).allowed is True
    assert evaluate(cs_condition(), claims, request()).allowed is False


@pytest.mark.parametrize(
    "value",
    [
        "'",
        '"',
        "\\",
        "' || true || '",
        "\\' || true || \\'",
        "a\nb\r\t",
        "a\x00b",
        "é",
        "😀",
        "\\u0027",
        "${x}",
    ],
)
def test_cel_string_literal_denotes_exactly_its_value(value: str) -> None:
    """Whatever a value holds, its literal parses as one string equal to it (no early end, no syntax)."""
    env = cel.NewEnv(variables={"s": cel.Type.STRING})
    lit = cel_string_literal(value)
    # size() counts code points: the literal is one string of exactly the value's length.
    assert env.compile(f"size({lit})").eval().value() == len(value)
    if "\x00" not in value:  # the binding cuts bound strings at NUL (see test_nul_in_claims_is_refused)
        result = env.compile(f"{lit} == s").eval(data={"s": value})
        assert result.type() == cel.Type.BOOL and result.value() is True
        assert env.compile(f"{lit} == s").eval(data={"s": value + "x"}).value() is False


def test_nul_in_claims_is_refused() -> None:
    """A claim with a NUL is refused before binding (the CEL binding would cut it short and match a pin)."""
    claims = cs_claims()
    claims["submods"]["container"]["image_digest"] = IMAGE + "\x00anything"
    d = evaluate(cs_condition(), claims, request())
    assert d.allowed is False
    assert d.failed_clauses == ["input"]
    assert "NUL" in d.failed[0]


def test_cel_string_literal_refuses_lone_surrogates() -> None:
    """A Python string that is not valid Unicode cannot be written as a CEL literal."""
    with pytest.raises(DCRError, match="surrogate"):
        cel_string_literal("\ud800")


def test_wip_condition_contains_the_expected_clauses() -> None:
    """The Workload Identity Pool condition pins the platform, identity, image, hub key and bundles."""
    text = compile_wip_condition(cs_condition())
    expected = [
        "assertion.swname == 'CONFIDENTIAL_SPACE'",
        "assertion.hwmodel in ['GCP_AMD_SEV', 'GCP_INTEL_TDX']",
        "assertion.dbgstat == 'disabled-since-boot'",
        "assertion.secboot == true",
        "'STABLE' in assertion.submods.confidential_space.support_attributes",
        f"assertion.submods.gce.project_id == '{PROJECT}'",
        f"'{ACCOUNT}' in assertion.google_service_accounts",
        f"assertion.submods.container.image_digest in ['{IMAGE}']",
        f"assertion.submods.container.env.DCR_HUB_KEY_THUMBPRINT in ['{HUB_TP}']",
        f"assertion.submods.container.env.DCR_BUNDLE_DIGEST in ['{BUNDLE}']",
        f"assertion.submods.container.env.DCR_DATASETS.contains(',insurer/claims@{VERSION},')",
    ]
    assert text.split(" && ") == expected


def test_wip_condition_pins_the_granted_dataset_versions() -> None:
    """The key goes only to a job whose attested dataset list names one of the condition's versions,
    exactly: another version, another dataset of the same provider, or a name that merely starts the
    same way does not satisfy it; several versions become a disjunction."""
    cond = cs_condition(versions=[VERSION, digest("2")])
    text = compile_wip_condition(cond)
    assert f"(assertion.submods.container.env.DCR_DATASETS.contains(',insurer/claims@{VERSION},') || " in text

    def with_datasets(*refs: tuple[str, str, str]) -> dict[str, Any]:
        claims = cs_claims()
        claims["submods"]["container"]["env"][contract.ENV.DATASETS] = contract.datasets_env_value(list(refs))
        return claims

    assert _wip_eval(text, with_datasets(("insurer", "claims", digest("2")))) is True
    for refs in (
        [("insurer", "claims", digest("3"))],
        [("insurer", "claims2", VERSION)],
        [("insurer", "other", VERSION)],
        [],
    ):
        assert _wip_eval(text, with_datasets(*refs)) is False, refs
    claims = cs_claims()
    del claims["submods"]["container"]["env"][contract.ENV.DATASETS]
    # A missing variable is an evaluation error, never true: Google denies the exchange.
    try:
        outcome = _wip_eval(text, claims)
    except Exception:
        outcome = "error"
    assert outcome is not True


def _wip_eval(text: str, claims: dict[str, Any]) -> Any:
    env = cel.NewEnv(variables={"assertion": cel.Type.Map(cel.Type.STRING, cel.Type.DYN)})
    return env.compile(text).eval(data={"assertion": claims}).value()


def test_wip_condition_is_valid_cel_that_decides_like_the_broker() -> None:
    """The WIP text compiles with assertion as its only variable, holds for good claims, fails for bad ones."""
    text = compile_wip_condition(cs_condition())
    assert _wip_eval(text, cs_claims()) is True
    for clause in (
        "platform.hwmodel",
        "platform.support_attributes",
        "enclave_digests",
        "hub_key_thumbprints",
    ):
        claims, req = cs_claims(), request()
        MUTATIONS[clause](claims, req)
        assert _wip_eval(text, claims) is False


def test_wip_condition_with_several_accounts_accepts_any_of_them() -> None:
    """Several service accounts become a disjunction: the VM runs as one of them."""
    cond = cs_condition()
    cond["platform"]["service_accounts"] = [ACCOUNT, "other@dcr-enclaves.iam.gserviceaccount.com"]
    text = compile_wip_condition(cond)
    claims = cs_claims()
    claims["google_service_accounts"] = ["other@dcr-enclaves.iam.gserviceaccount.com"]
    assert _wip_eval(text, claims) is True
    claims["google_service_accounts"] = ["third@dcr-enclaves.iam.gserviceaccount.com"]
    assert _wip_eval(text, claims) is False


def test_wip_condition_refuses_the_local_platform() -> None:
    """The local simulation has no Workload Identity Pool: compiling one for it is refused."""
    cond = cs_condition(platform=PlatformCondition.defaults("local").to_json())
    with pytest.raises(DCRError, match="confidential_space"):
        compile_wip_condition(cond)


def test_wip_condition_refuses_an_incomplete_cloud_condition() -> None:
    """Without the enclave project and service account pinned, the condition is not deployable."""
    cond = cs_condition()
    cond["platform"]["project_id"] = None
    with pytest.raises(DCRError, match="project_id"):
        compile_wip_condition(cond)


def test_wip_condition_respects_googles_length_limit() -> None:
    """Too many pinned digests for Google's 4096-character limit is refused with a hint."""
    cond = cs_condition(enclave_digests=[f"sha256:{i:064x}" for i in range(60)])
    with pytest.raises(LimitError, match="4096"):
        compile_wip_condition(cond)


def test_condition_is_not_mutated() -> None:
    """Evaluating leaves the caller's condition, claims and request untouched."""
    cond, claims, req = cs_condition(), cs_claims(), request()
    before = copy.deepcopy((cond, claims, req))
    evaluate(cond, claims, req)
    assert (cond, claims, req) == before


def test_missing_evaluator_denies_but_compilers_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the CEL library, evaluate denies naming the evaluator; compiling needs no library."""
    monkeypatch.setattr(release_policy, "_env", None)
    monkeypatch.setitem(sys.modules, "cel_expr_python", None)  # makes the import fail
    d = evaluate(cs_condition(), cs_claims(), request())
    assert d.allowed is False
    assert d.failed_clauses == ["evaluator"]
    assert "not installed" in d.failed[0]
    assert compile_condition(cs_condition()) and compile_wip_condition(cs_condition())


def test_disagreeing_evaluator_denies(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the whole expression and its clauses ever disagree, the release is denied, not decided by one."""
    # A broken evaluator: every clause holds alone, the conjunction does not.
    monkeypatch.setattr(release_policy, "_run", lambda env, text, data: " && " not in text)
    d = evaluate(cs_condition(), cs_claims(), request())
    assert d.allowed is False
    assert d.failed_clauses == ["expression"]
    monkeypatch.setattr(release_policy, "_run", lambda env, text, data: " && " in text)
    d = evaluate(cs_condition(), cs_claims(), request())
    assert d.allowed is False
    assert "expression" in d.failed_clauses
