"""The hub's DCR policy: trait validation, validation against stores and hub groups, entitlements, keys,
and a real JupyterHub refusing to start (before it serves) on each kind of bad policy."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from hub_harness import (
    INSURANCE_SYNTHETIC,
    Hub,
    Stores,
    dataset_entry,
    make_stores,
    policy_config,
    write_fidelity_reports,
)
from traitlets.config import Config

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import DisclosureRules, OutputLimits
from dcr_enclave.formats.jwk import public_jwk, thumbprint
from dcr_enclave.pack.signing_keys import generate_key, read_private_key, write_private_key
from dcr_spawner import DCRPolicy, PolicyError, enable
from dcr_spawner.audit_views import routes as audit_routes
from dcr_spawner.grant_service import GrantsHandler
from dcr_spawner.hubkey import load_or_create_airlock_key, load_or_create_hub_key

NO_SUCH_VERSION = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    return make_stores(tmp_path_factory.mktemp("policy-stores"), "--release", "auto")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both fidelity reports of acme/insurance's real.csv, as `dcr provider add --report-epsilon` writes them."""
    return write_fidelity_reports(tmp_path_factory.mktemp("reports"))


def _datasets(s: Stores, **overrides: Any) -> dict[str, Any]:
    d = {
        "acme/insurance": dataset_entry(s.insurance, s.root, users=["alice"], groups=["analysts"]),
        "globex/visits": dataset_entry(s.visits, s.root, groups=["researchers"], release="auto"),
    }
    d.update(overrides)
    return d


# ---------------------------------------------------------------------------------------------------------
# Entitlements
# ---------------------------------------------------------------------------------------------------------


def test_entitlements_follow_users_and_groups(stores: Stores) -> None:
    """Users named in a dataset's entitlement or members of its groups get it, with the version's synthetic
    files as absolute paths in the store; everyone else gets nothing."""
    policy = DCRPolicy(datasets=_datasets(stores))
    policy.validate_against_hub({"analysts", "researchers", "unrelated"})

    alice = policy.entitled("alice", set())
    assert [e.ref for e in alice] == ["acme/insurance"]
    (e,) = alice
    assert (e.provider, e.dataset, e.version, e.release) == (
        "acme",
        "insurance",
        stores.insurance.version,
        "review",
    )
    assert set(e.synthetic) == {"real.csv"}
    path = e.synthetic["real.csv"]
    assert path.is_absolute() and path.read_bytes() == INSURANCE_SYNTHETIC.read_bytes()
    assert e.data_paths() == {"/data/acme/insurance/real.csv": path}

    both = policy.entitled("bob", {"analysts", "researchers"})
    assert [x.ref for x in both] == ["acme/insurance", "globex/visits"]
    assert both[1].release == "auto"
    assert both[1].synthetic["visits.csv"].read_text().startswith("patient,age")
    assert policy.entitled("carol", {"unrelated"}) == []


def test_policy_loads_from_hub_config(stores: Stores) -> None:
    """The policy is read from ``c.DCRPolicy.*`` as written in jupyterhub_config.py, with defaults for
    what is not set."""
    c = Config()
    c.DCRPolicy.datasets = _datasets(stores)
    c.DCRPolicy.output_limits = {"max_files": 5, "allowed_suffixes": [".CSV", ".png"]}
    c.DCRPolicy.quotas = {"jobs_per_day_per_user": 7}
    c.DCRPolicy.memory_limit = "2G"
    c.DCRPolicy.time_limit = 900
    policy = DCRPolicy(config=c)
    assert policy.limits() == OutputLimits(
        max_files=5, max_bytes=OutputLimits().max_bytes, allowed_suffixes=(".csv", ".png")
    )
    assert policy.quota("jobs_per_day_per_user") == 7
    assert policy.quota("concurrent_jobs_per_user") == 2
    assert (policy.memory_limit, policy.time_limit) == (2 * 2**30, 900)


def test_disclosure_thresholds_are_the_strictest_over_the_jobs_datasets(stores: Stores) -> None:
    """A dataset's own thresholds override the global ones for it; a job over several datasets gets the
    highest thresholds, and extremes only if every dataset allows them; no setting: the enclave's
    defaults."""
    assert DCRPolicy().disclosure_rules(["acme/insurance"]) == DisclosureRules()
    a = dataset_entry(stores.insurance, stores.root, users=["alice"])
    b = dataset_entry(stores.visits, stores.root, users=["alice"])
    a["disclosure"] = {"min_cell_count": 20, "allow_extremes": True}
    b["disclosure"] = {"dominance_min_contributors": 2, "allow_extremes": True}
    policy = DCRPolicy(
        datasets={"acme/insurance": a, "globex/visits": b},
        disclosure_checks={"min_cell_count": 5, "dominance_min_contributors": 4},
    )
    assert policy.disclosure_rules(["acme/insurance"]) == DisclosureRules(20, 4, True)
    assert policy.disclosure_rules(["globex/visits"]) == DisclosureRules(5, 2, True)
    assert policy.disclosure_rules(["acme/insurance", "globex/visits"]) == DisclosureRules(20, 4, True)
    del b["disclosure"]["allow_extremes"]
    policy = DCRPolicy(datasets={"acme/insurance": a, "globex/visits": b})
    assert policy.disclosure_rules(["acme/insurance", "globex/visits"]) == DisclosureRules(20, 3, False)


def test_release_defaults_to_review(stores: Stores) -> None:
    """A dataset whose entry does not say how outputs are released is under review (the safe default)."""
    entry = dataset_entry(stores.insurance, stores.root, users=["alice"])
    del entry["release"]
    policy = DCRPolicy(datasets={"acme/insurance": entry})
    policy.validate_against_hub(set())
    assert policy.entitled("alice", set())[0].release == "review"


def test_provider_snippet_is_accepted_and_checked(stores: Stores) -> None:
    """The snippet ``dcr provider add`` prints (with its ``synthetic`` digests) works once entitlements are
    added, and a digest that does not match the version's manifest is refused."""
    f = stores.insurance.files[0]
    entry = dataset_entry(stores.insurance, stores.root, users=["alice"])
    entry["synthetic"] = {f.name: f.synthetic_sha256}
    DCRPolicy(datasets={"acme/insurance": entry}).validate_against_hub(set())

    entry["synthetic"] = {f.name: "sha256:" + "1" * 64}
    with pytest.raises(PolicyError, match=r"digest of real\.csv differs.*\['synthetic'\]"):
        DCRPolicy(datasets={"acme/insurance": entry}).validate_against_hub(set())


# ---------------------------------------------------------------------------------------------------------
# Shape errors name provider, dataset and trait
# ---------------------------------------------------------------------------------------------------------

BAD_ENTRIES = [
    ("acme", {}, "datasets['acme']", "not '<provider>/<dataset>'"),
    ("Acme/insurance", {}, "datasets['Acme/insurance']", "invalid provider name"),
    ("acme/insurance", {"version": "latest"}, "['version']", "is not a dataset version"),
    ("acme/insurance", {"store": "relative/store"}, "['store']", "not an absolute path"),
    ("acme/insurance", {"release": "sometimes"}, "['release']", "'sometimes' is not a release mode"),
    ("acme/insurance", {"entitled": {"users": "alice"}}, "['entitled']['users']", "list of names"),
    ("acme/insurance", {"entitled": {"roles": ["x"]}}, "['entitled']", "'users' and/or 'groups'"),
    ("acme/insurance", {"colour": "red"}, "datasets['acme/insurance']", "unknown key(s) ['colour']"),
    ("acme/insurance", {"fidelity_report": "r.html"}, "['fidelity_report']", "not an absolute path"),
    ("acme/insurance", {"fidelity_report": "/r/real.csv"}, "['fidelity_report']", "(.html or .json)"),
    ("acme/insurance", {"disclosure": {"min_cell_count": 0}}, "['disclosure']", "min_cell_count"),
    ("acme/insurance", {"disclosure": {"allow_extremes": "yes"}}, "['disclosure']", "allow_extremes"),
    ("acme/insurance", {"disclosure": {"k": 5}}, "['disclosure']", "unknown key(s) ['k']"),
]


@pytest.mark.parametrize(("ref", "change", "trait", "message"), BAD_ENTRIES)
def test_malformed_dataset_entries_are_refused(
    stores: Stores, ref: str, change: dict[str, Any], trait: str, message: str
) -> None:
    """Each malformed ``c.DCRPolicy.datasets`` entry is refused when set, naming the trait path and
    (where the key parses) the provider and dataset."""
    entry = {**dataset_entry(stores.insurance, stores.root, users=["alice"]), **change}
    with pytest.raises(PolicyError) as info:
        DCRPolicy(datasets={ref: entry})
    text = str(info.value)
    assert trait in text and message in text
    assert "c.DCRPolicy." in text
    if ref == "acme/insurance":
        assert "provider 'acme'" in text and "dataset 'insurance'" in text


@pytest.mark.parametrize(
    ("trait", "value", "message"),
    [
        ("quotas", {"jobs_per_week": 3}, "unknown quota(s) ['jobs_per_week']"),
        ("quotas", {"jobs_per_day_per_user": 0}, "quotas['jobs_per_day_per_user']"),
        ("output_limits", {"max_bytes": -1}, "output_limits['max_bytes']"),
        ("output_limits", {"allowed_suffixes": ["csv"]}, "output_limits['allowed_suffixes']"),
        ("output_limits", {"max_size": 1}, "unknown key(s) ['max_size']"),
        ("time_limit", 5, "c.DCRPolicy.time_limit"),
        ("memory_limit", "1M", "c.DCRPolicy.memory_limit"),
        ("hub_key_file", " ", "c.DCRPolicy.hub_key_file"),
        ("disclosure_checks", {"min_cell_count": -3}, "c.DCRPolicy.disclosure_checks"),
        ("disclosure_checks", {"dominance_min_contributors": True}, "dominance_min_contributors"),
        ("disclosure_checks", {"min_count": 5}, "unknown key(s) ['min_count']"),
    ],
)
def test_malformed_limits_are_refused(trait: str, value: Any, message: str) -> None:
    """Limits, quotas and key locations are checked when set; the refusal names the trait."""
    with pytest.raises(PolicyError) as info:
        DCRPolicy(**{trait: value})
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Validation against the stores and the hub
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def store_copy(stores: Stores, tmp_path: Path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(stores.root, dest, symlinks=True)
    return dest


def test_unknown_dataset_is_refused(stores: Stores) -> None:
    """A dataset the store has never heard of stops validation, naming it."""
    entry = dataset_entry(stores.insurance, stores.root, users=["alice"])
    with pytest.raises(PolicyError, match=r"has no dataset acme/claims.*provider 'acme', dataset 'claims'"):
        DCRPolicy(datasets={"acme/claims": entry}).validate_against_hub(set())


def test_unknown_version_is_refused(stores: Stores) -> None:
    """A version that is not in the store stops validation and lists the versions that are."""
    entry = {**dataset_entry(stores.insurance, stores.root, users=["alice"]), "version": NO_SUCH_VERSION}
    with pytest.raises(PolicyError) as info:
        DCRPolicy(datasets={"acme/insurance": entry}).validate_against_hub(set())
    assert "is not in the store" in str(info.value) and "['version']" in str(info.value)
    assert stores.insurance.version in str(info.value)


def test_missing_group_is_refused(stores: Stores) -> None:
    """An entitlement naming a group the hub does not have stops validation, naming the group."""
    policy = DCRPolicy(datasets=_datasets(stores))
    with pytest.raises(PolicyError, match=r"'researchers' do not exist.*dataset 'visits'.*\['groups'\]"):
        policy.validate_against_hub({"analysts"})


def test_missing_synthetic_file_is_refused(stores: Stores, store_copy: Path) -> None:
    """A version whose synthetic file is gone from the store stops validation."""
    m = stores.insurance
    (store_copy / "acme" / "insurance" / m.version_hex / m.files[0].synthetic).unlink()
    entry = dataset_entry(m, store_copy, users=["alice"])
    with pytest.raises(PolicyError, match=r"synthetic file real\.csv is missing"):
        DCRPolicy(datasets={"acme/insurance": entry}).validate_against_hub(set())


def test_changed_synthetic_file_is_refused(stores: Stores, store_copy: Path) -> None:
    """A synthetic file whose size no longer matches the manifest stops validation."""
    m = stores.insurance
    with open(store_copy / "acme" / "insurance" / m.version_hex / m.files[0].synthetic, "ab") as f:
        f.write(b"extra,row\n")
    entry = dataset_entry(m, store_copy, users=["alice"])
    with pytest.raises(PolicyError, match="is not the regular file of"):
        DCRPolicy(datasets={"acme/insurance": entry}).validate_against_hub(set())


def test_retired_version_is_refused(stores: Stores, store_copy: Path) -> None:
    """A version its provider retired is not offered: validation stops and says so."""
    m = stores.insurance
    path = store_copy / "acme" / "insurance" / m.version_hex / "manifest.json"
    doc = json.loads(path.read_text())
    doc["retired"] = True
    path.write_text(json.dumps(doc))
    entry = dataset_entry(m, store_copy, users=["alice"])
    with pytest.raises(PolicyError, match="retired"):
        DCRPolicy(datasets={"acme/insurance": entry}).validate_against_hub(set())


# ---------------------------------------------------------------------------------------------------------
# Fidelity reports
# ---------------------------------------------------------------------------------------------------------


def test_researcher_fidelity_report_is_accepted(stores: Stores, reports: dict[str, Path]) -> None:
    """A dataset may name the researcher-facing fidelity report (HTML or JSON) of its file; the policy
    reads it back, checked, with the media type it is served as."""
    for suffix, media in (("html", "text/html; charset=utf-8"), ("json", "application/json")):
        entry = dataset_entry(stores.insurance, stores.root, users=["alice"])
        entry["fidelity_report"] = str(reports[f"researchers.{suffix}"])
        policy = DCRPolicy(datasets={"acme/insurance": entry})
        policy.validate_against_hub(set())
        report = policy.fidelity_report("acme/insurance")
        assert report is not None and report.media_type == media and report.file == "real.csv"
        assert report.data == reports[f"researchers.{suffix}"].read_bytes()
    assert DCRPolicy(datasets=_datasets(stores)).fidelity_report("acme/insurance") is None


def test_unusable_fidelity_report_is_refused(
    stores: Stores, reports: dict[str, Path], tmp_path: Path
) -> None:
    """The provider-only report (computed from the real rows), a missing or unreadable file, a page that is
    not a researcher report, and the report of another dataset's file are refused when the policy is
    validated, naming the trait; a report replaced after validation is refused when it is read again."""
    not_a_report = tmp_path / "notes.html"
    not_a_report.write_text("<!doctype html><html><head><title>Notes</title></head><body>hi</body></html>")
    directory = tmp_path / "dir.html"
    directory.mkdir()
    ins = dataset_entry(stores.insurance, stores.root, users=["alice"])
    visits = dataset_entry(stores.visits, stores.root, users=["alice"])
    cases = [
        ("acme/insurance", ins, reports["provider-only.html"], "is the provider-only fidelity report"),
        ("acme/insurance", ins, reports["provider-only.json"], "is the provider-only fidelity report"),
        ("acme/insurance", ins, tmp_path / "gone.html", "does not exist"),
        ("acme/insurance", ins, directory, "is not a regular file"),
        ("acme/insurance", ins, not_a_report, "is not a researcher-facing fidelity report"),
        ("globex/visits", visits, reports["researchers.html"], "is the report of 'real.csv'"),
    ]
    for ref, entry, path, message in cases:
        policy = DCRPolicy(datasets={ref: {**entry, "fidelity_report": str(path)}})
        with pytest.raises(PolicyError) as info:
            policy.validate_against_hub(set())
        text = str(info.value)
        assert message in text and f"datasets[{ref!r}]['fidelity_report']" in text, text

    swapped = tmp_path / "swapped.html"
    shutil.copy(reports["researchers.html"], swapped)
    policy = DCRPolicy(datasets={"acme/insurance": {**ins, "fidelity_report": str(swapped)}})
    policy.validate_against_hub(set())
    shutil.copy(reports["provider-only.html"], swapped)
    with pytest.raises(PolicyError, match="provider-only"):
        policy.fidelity_report("acme/insurance")


def test_report_markers_match_what_dcr_provider_writes() -> None:
    """The audience names and schema the hub checks are the ones dcr_provider writes into every report."""
    from dcr_provider import fidelity
    from dcr_spawner import policy

    assert policy.REPORT_FOR_RESEARCHERS == fidelity.RESEARCHERS
    assert policy.REPORT_PROVIDER_ONLY == fidelity.PROVIDER
    assert policy.REPORT_SCHEMA == fidelity.REPORT_SCHEMA


# ---------------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------------

PROVIDERS = {
    "acme": {"name": "ACME Insurance", "reviewers": {"users": ["rita"], "groups": ["acme-reviewers"]}},
    "globex": {"name": "Globex Health"},
}


def test_providers_name_reviewers(stores: Stores) -> None:
    """Declared providers carry a display name and reviewers (users and groups); without declarations the
    providers are those of the dataset keys, with their key as name and no reviewers."""
    policy = DCRPolicy(datasets=_datasets(stores), providers=PROVIDERS)
    policy.validate_against_hub({"analysts", "researchers", "acme-reviewers"})
    acme = policy.provider("acme")
    assert acme is not None and acme.name == "ACME Insurance" and acme.declared
    assert acme.may_review("rita", set()) and acme.may_review("sam", {"acme-reviewers"})
    assert not acme.may_review("alice", {"analysts"})
    globex = policy.provider("globex")
    assert globex is not None and not globex.may_review("rita", {"acme-reviewers"})
    assert policy.provider("initech") is None

    implicit = DCRPolicy(datasets=_datasets(stores))
    implicit.validate_against_hub({"analysts", "researchers"})
    assert sorted(implicit.provider_specs()) == ["acme", "globex"]
    p = implicit.provider("acme")
    assert p is not None and p.name == "acme" and not p.declared and not p.may_review("rita", set())


@pytest.mark.parametrize(
    ("providers", "trait", "message"),
    [
        ({"Acme": {}}, "providers['Acme']", "invalid provider name"),
        ({"acme": "ACME"}, "providers['acme']", "must be a dict"),
        ({"acme": {"reviewer": ["rita"]}}, "providers['acme']", "unknown key(s) ['reviewer']"),
        ({"acme": {"name": " "}}, "providers['acme']['name']", "is not a display name"),
        ({"acme": {"reviewers": ["rita"]}}, "providers['acme']['reviewers']", "'users' and/or 'groups'"),
        ({"acme": {"reviewers": {"users": "rita"}}}, "['reviewers']['users']", "list of names"),
    ],
)
def test_malformed_providers_are_refused(providers: dict[str, Any], trait: str, message: str) -> None:
    """Each malformed ``c.DCRPolicy.providers`` entry is refused when set, naming the trait."""
    with pytest.raises(PolicyError) as info:
        DCRPolicy(providers=providers)
    text = str(info.value)
    assert trait in text and message in text and "c.DCRPolicy." in text


def test_providers_are_checked_against_datasets_and_groups(stores: Stores) -> None:
    """Once providers are declared, a dataset of an undeclared provider, a declared provider without a
    dataset and a reviewers' group the hub does not have each stop validation, naming the trait."""
    groups = {"analysts", "researchers", "acme-reviewers"}
    cases = [
        (
            {"acme": PROVIDERS["acme"]},
            groups,
            "provider 'globex' is not declared",
            "datasets['globex/visits']",
        ),
        (
            {**PROVIDERS, "initech": {}},
            groups,
            "no dataset in c.DCRPolicy.datasets belongs to this provider",
            "providers['initech']",
        ),
        (PROVIDERS, groups - {"acme-reviewers"}, "'acme-reviewers' do not exist", "['reviewers']['groups']"),
    ]
    for providers, hub_groups, message, trait in cases:
        policy = DCRPolicy(datasets=_datasets(stores), providers=providers)
        with pytest.raises(PolicyError) as info:
            policy.validate_against_hub(hub_groups)
        assert message in str(info.value) and trait in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------


def test_hub_key_is_generated_owner_only_and_kept(tmp_path: Path) -> None:
    """The hub key is created 0600 on first use and the same key (same thumbprint) is loaded afterwards."""
    path = tmp_path / "keys" / "hub.pem"
    first = load_or_create_hub_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_hub_key(path)
    assert again.thumbprint == first.thumbprint == thumbprint(first.public_jwk)
    assert again.jwks() == {"keys": [first.public_jwk], "thumbprint": first.thumbprint}
    airlock = load_or_create_airlock_key(tmp_path / "keys" / "airlock.key")
    assert len(airlock.public) == 32
    assert load_or_create_airlock_key(airlock.path).public == airlock.public


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (b"not a key\n", 0o600, "not an unencrypted PEM private key"),
        (None, 0o644, "readable by others"),
    ],
)
def test_unusable_hub_key_is_refused(tmp_path: Path, content: bytes | None, mode: int, message: str) -> None:
    """An existing hub key that is not a key or that others can read is refused, never replaced."""
    path = tmp_path / "hub.pem"
    if content is None:
        load_or_create_hub_key(path)
    else:
        path.write_bytes(content)
    os.chmod(path, mode)
    before = path.read_bytes()
    with pytest.raises(DCRError, match=message):
        load_or_create_hub_key(path)
    assert path.read_bytes() == before


def test_hub_key_is_the_shared_signing_key_format(tmp_path: Path) -> None:
    """The hub key is an ordinary DCR signing key file: one written by ``signing_keys`` (as ``dcr`` tools
    write them) loads as the hub key, and the one the hub generates loads with the shared reader."""
    given = tmp_path / "given.pem"
    write_private_key(given, generate_key("RS256"))
    assert load_or_create_hub_key(given).public_jwk == public_jwk(read_private_key(given))
    made = load_or_create_hub_key(tmp_path / "made.pem")
    assert public_jwk(read_private_key(made.path)) == made.public_jwk
    assert made.public_jwk["alg"] == "ES256"


@pytest.mark.parametrize("loader", [load_or_create_hub_key, load_or_create_airlock_key])
def test_key_behind_a_link_is_refused_and_nothing_is_created(tmp_path: Path, loader: Any) -> None:
    """A key path that is a link (to a good key, or dangling) is refused, never followed or replaced."""
    good = loader(tmp_path / "real.key").path
    for target in (good, tmp_path / "nowhere"):
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target)
        with pytest.raises(DCRError, match="must not be links"):
            loader(link)
        assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (b"\x01" * 31, 0o600, "not a raw 32-byte X25519 private key"),
        (b"\x01" * 65, 0o600, "larger than 64 bytes"),
        (b"\x01" * 32, 0o640, "readable by others"),
    ],
)
def test_unusable_airlock_key_is_refused(tmp_path: Path, content: bytes, mode: int, message: str) -> None:
    """An existing airlock key of the wrong size or readable by others is refused, never replaced."""
    path = tmp_path / "airlock.key"
    path.write_bytes(content)
    os.chmod(path, mode)
    with pytest.raises(DCRError, match=message):
        load_or_create_airlock_key(path)
    assert path.read_bytes() == content


# ---------------------------------------------------------------------------------------------------------
# Enabling
# ---------------------------------------------------------------------------------------------------------


def test_enable_adds_the_routes_once_and_keeps_others() -> None:
    """``dcr_spawner.enable(c)`` adds DCR's routes (grant service, airlock, audit) to the hub's extra
    handlers, keeps the admin's own, and does not add them twice."""
    c = Config()
    mine = ("/my/page", GrantsHandler, {})
    c.JupyterHub.extra_handlers = [mine]
    enable(c)
    enable(c)
    paths = [h[0] for h in c.JupyterHub.extra_handlers]
    job = "(job-[a-z0-9]+)"
    assert paths == [
        "/my/page",
        "/api/dcr/grants",
        "/api/dcr/jwks",
        "/api/dcr/datasets",
        "/api/dcr/datasets/([^/]+)/([^/]+)/fidelity-report",
        f"/api/dcr/airlock/jobs/{job}",
        f"/api/dcr/airlock/jobs/{job}/failure",
        f"/api/dcr/airlock/jobs/{job}/release",
        "/dcr/review",
        f"/dcr/review/{job}",
        f"/dcr/review/{job}/files/(.+)",
        "/dcr/provider",
        f"/dcr/receipts/{job}",
        *[h[0] for h in audit_routes()],
        "/api/dcr/cloud/jobs/([^/]+)(?:/(cancel|result))?",
    ]


# ---------------------------------------------------------------------------------------------------------
# A real hub refuses to start
# ---------------------------------------------------------------------------------------------------------


def _bad_unknown_dataset(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    d = {"acme/claims": dataset_entry(s.insurance, s.root, users=["alice"])}
    return policy_config(d), ["provider 'acme'", "dataset 'claims'", "has no dataset acme/claims"]


def _bad_unknown_version(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    d = _datasets(s)
    d["acme/insurance"] = {**d["acme/insurance"], "version": NO_SUCH_VERSION}
    return policy_config(d), [
        "dataset 'insurance'",
        "['version']",
        f"version {NO_SUCH_VERSION} is not in the store",
    ]


def _bad_missing_group(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    d = _datasets(s)
    d["globex/visits"] = dataset_entry(s.visits, s.root, groups=["nurses"], release="auto")
    return policy_config(d), ["provider 'globex'", "dataset 'visits'", "['entitled']['groups']", "'nurses'"]


def _bad_missing_synthetic(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    store = tmp / "store"
    shutil.copytree(s.root, store, symlinks=True)
    m = s.visits
    (store / "globex" / "visits" / m.version_hex / m.files[0].synthetic).unlink()
    d = {"globex/visits": dataset_entry(m, store, groups=["researchers"])}
    return policy_config(d), ["dataset 'visits'", "synthetic file visits.csv is missing"]


def _bad_hub_key(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    key = tmp / "hub-key.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    os.chmod(key, 0o600)
    return policy_config(_datasets(s), hub_key_file=str(key)), [
        "c.DCRPolicy.hub_key_file",
        "not an unencrypted PEM",
    ]


def _bad_release(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    d = _datasets(s)
    d["acme/insurance"] = {**d["acme/insurance"], "release": "whenever"}
    return policy_config(d), ["dataset 'insurance'", "['release']", "'whenever' is not a release mode"]


def _bad_fidelity_report(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    provider_only = reports["provider-only.html"]
    d = _datasets(s)
    d["acme/insurance"] = {**d["acme/insurance"], "fidelity_report": str(provider_only)}
    return policy_config(d), [
        "dataset 'insurance'",
        "['fidelity_report']",
        "is the provider-only fidelity report",
    ]


def _bad_reviewers_group(s: Stores, tmp: Path, reports: dict[str, Path]) -> tuple[str, list[str]]:
    providers = {"acme": {"reviewers": {"groups": ["auditors"]}}, "globex": {}}
    return policy_config(_datasets(s), providers=providers), [
        "provider 'acme'",
        "c.DCRPolicy.providers['acme']['reviewers']['groups']",
        "'auditors' do not exist",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        _bad_unknown_dataset,
        _bad_unknown_version,
        _bad_missing_group,
        _bad_missing_synthetic,
        _bad_hub_key,
        _bad_release,
        _bad_fidelity_report,
        _bad_reviewers_group,
    ],
    ids=lambda f: f.__name__.removeprefix("_bad_"),
)
def test_hub_refuses_to_start_on_bad_policy(
    stores: Stores, tmp_path: Path, reports: dict[str, Path], case: Any
) -> None:
    """A real JupyterHub with a bad DCR policy exits with a non-zero status before it serves, and its
    output names the provider, dataset and trait at fault."""
    config, expected = case(stores, tmp_path, reports)
    hub = Hub(tmp_path / "hub", config=config, groups={"analysts": ["bob"], "researchers": ["alice"]})
    result = hub.run_to_exit()
    assert result.returncode != 0
    assert not result.served, "the hub served before refusing its policy"
    line = next(x for x in result.log.splitlines() if x.startswith("DCR: the hub cannot start:"))
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    # Nothing was generated for a policy that was refused before its keys were reached.
    if case is not _bad_hub_key:
        assert not (hub.workdir / "dcr-hub-key.pem").exists()


@pytest.mark.slow
@pytest.mark.parametrize("spawner", ["dcr-local", "dcr-kube"])
def test_dcr_spawner_alone_stops_a_hub_with_a_bad_policy(
    stores: Stores, tmp_path: Path, spawner: str
) -> None:
    """A real JupyterHub using a DCR spawner but never calling ``dcr_spawner.enable(c)`` still checks the
    policy at start: with an entitlement naming a group the hub does not have, it exits non-zero before it
    serves, naming the trait."""
    d = _datasets(stores)
    d["globex/visits"] = dataset_entry(stores.visits, stores.root, groups=["nurses"], release="auto")
    config = policy_config(d, enable=False) + f"c.DCRLocalSpawner.home_base = {str(tmp_path / 'homes')!r}\n"
    assert "enable" not in config
    hub = Hub(tmp_path / "hub", spawner_class=spawner, config=config, groups={"analysts": ["bob"]})
    result = hub.run_to_exit()
    assert result.returncode != 0
    assert not result.served, "the hub served before refusing its policy"
    line = next(x for x in result.log.splitlines() if x.startswith("DCR: the hub cannot start:"))
    assert "c.DCRPolicy.datasets['globex/visits']['entitled']['groups']" in line and "'nurses'" in line
    assert not (hub.workdir / "dcr-hub-key.pem").exists()


@pytest.mark.slow
def test_dcr_spawner_alone_serves_the_grant_service(stores: Stores, tmp_path: Path) -> None:
    """With a good policy and a DCR spawner but no ``enable(c)``, the hub starts with the grant service
    in place: the JWKS of a key it generated, and a user's entitled datasets."""
    config = policy_config(_datasets(stores), enable=False)
    groups = {"analysts": ["bob"], "researchers": ["alice"]}
    with Hub(tmp_path / "hub", spawner_class="dcr-kube", config=config, groups=groups) as hub:
        jwks = hub.api("GET", "/dcr/jwks", token="")
        assert jwks.status_code == 200, jwks.text
        assert jwks.json()["thumbprint"] == load_or_create_hub_key(hub.workdir / "dcr-hub-key.pem").thumbprint
        listed = hub.api("GET", "/dcr/datasets", token=hub.new_token("alice")).json()["datasets"]
        assert [(d["provider"], d["dataset"]) for d in listed] == [
            ("acme", "insurance"),
            ("globex", "visits"),
        ]
        assert "DCR: grant service routes added for DCRKubeSpawner" in hub.log()
