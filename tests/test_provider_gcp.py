"""A provider's Google Cloud side: ``dcr provider policy --gcp``, and ``dcr provider add`` with cloud options."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from dcr_enclave.commands import main as cli
from dcr_enclave.formats import contract
from dcr_enclave.formats.contract import GsUri
from dcr_enclave.pack.gcp import attribute_mapping, parse_store, principal_set
from dcr_enclave.platform.key_store import KeyDirectory

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "insurance"
PROJECT = "dcr-enclaves"
ACCOUNT = f"enclave@{PROJECT}.iam.gserviceaccount.com"
IMAGE = "sha256:" + "a" * 64
WIP = "projects/123456/locations/global/workloadIdentityPools/dcr-pool/providers/acme-claims"
KMS = "projects/acme-keys/locations/europe-west4/keyRings/dcr/cryptoKeys/claims"


def _dcr(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    real, synthetic = tmp_path / "claims.csv", tmp_path / "claims-synthetic.csv"
    real.write_bytes(b"".join((DATA / "real.csv").read_bytes().splitlines(keepends=True)[:40]))
    synthetic.write_bytes(b"".join((DATA / "synthetic_mst.csv").read_bytes().splitlines(keepends=True)[:40]))
    return real, synthetic


def _add(store: Any, files: tuple[Path, Path], *extra: Any) -> list[Any]:
    return [
        "provider", "add", "--store", store, "--provider", "acme", "--dataset", "claims",
        "--real", files[0], "--synthetic", files[1], "--synthetic-name", "claims.csv",
        "--enclave-digest", IMAGE, *extra,
    ]  # fmt: skip


CLOUD = ("--platform", "confidential-space", "--project-id", PROJECT, "--service-account", ACCOUNT)


@pytest.fixture
def registered(tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> Path:
    """A confidential_space condition in a keys directory (the local store wraps with a local key)."""
    keys = tmp_path / "keys"
    code, _out, err = _dcr(capsys, *_add(tmp_path / "store", files, *CLOUD, "--keys", keys))
    assert code == 0, err
    return keys


def _policy(keys: Path, *extra: Any) -> list[Any]:
    return [
        "provider", "policy", "--keys", keys, "--provider", "acme", "--dataset", "claims", "--gcp",
        "--wip-provider", WIP, "--kms-key", KMS, "--store", "gs://acme-dcr/datasets", *extra,
    ]  # fmt: skip


def test_policy_json_compiles_the_condition_and_binds_decrypt_to_one_pool_provider(
    registered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pool provider's condition is compiled from the stored condition (image, production image,
    hardware, hub key, dataset version); KMS decrypt is bound only to that provider's principals (never
    a service account, never the whole pool); the enclave's account may read the dataset objects."""
    code, out, err = _dcr(capsys, *_policy(registered, "--format", "json"))
    assert code == 0, err
    doc = json.loads(out)
    cond = KeyDirectory(registered).read_condition("acme", "claims")
    assert cond is not None
    (version,) = cond.versions
    wip = doc["workload_identity_pool"]
    assert (
        wip["pool"] == "dcr-pool" and wip["provider"] == "acme-claims" and wip["project_number"] == "123456"
    )
    assert wip["issuer_uri"] == "https://confidentialcomputing.googleapis.com/"
    text = wip["attribute_condition"]
    for clause in (
        "assertion.swname == 'CONFIDENTIAL_SPACE'",
        "assertion.dbgstat == 'disabled-since-boot'",
        "assertion.hwmodel in ['GCP_AMD_SEV', 'GCP_INTEL_TDX']",
        f"assertion.submods.container.image_digest in ['{IMAGE}']",
        f"'{ACCOUNT}' in assertion.google_service_accounts",
        f"assertion.submods.container.env.{contract.ENV.DATASETS}.contains(',acme/claims@{version},')",
        f"assertion.submods.container.env.{contract.ENV.HUB_KEY_THUMBPRINT} in ['{cond.hub_key_thumbprints[0]}']",
    ):
        assert clause in text
    assert wip["attribute_mapping"] == {
        "google.subject": "assertion.sub",
        "attribute.dcr_wip_provider": "'acme-claims'",
    }
    member = (
        "principalSet://iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/"
        "dcr-pool/attribute.dcr_wip_provider/acme-claims"
    )
    assert doc["iam_bindings"] == [
        {"resource": KMS, "role": "roles/cloudkms.cryptoKeyDecrypter", "member": member},
        {
            "resource": "gs://acme-dcr",
            "role": "roles/storage.objectViewer",
            "member": f"serviceAccount:{ACCOUNT}",
            "condition_prefix": "projects/_/buckets/acme-dcr/objects/datasets/",
        },
    ]
    assert principal_set(WIP) == member and attribute_mapping(WIP) == wip["attribute_mapping"]


def test_policy_text_is_gcloud_commands(registered: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _dcr(capsys, *_policy(registered))
    assert code == 0, err
    assert "gcloud iam workload-identity-pools providers create-oidc acme-claims" in out
    assert "--allowed-audiences=dcr:key-release" in out
    assert "gcloud kms keys add-iam-policy-binding claims --keyring=dcr --location=europe-west4" in out
    assert "--role=roles/cloudkms.cryptoKeyDecrypter" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("--wip-provider", "projects/abc/locations/global/workloadIdentityPools/p/providers/q"),
            "not a Workload",
        ),
        (("--kms-key", "projects/x/keyRings/r"), "not a Cloud KMS key"),
        (("--store", "s3://bucket"), "not a Cloud Storage location"),
        (("--dataset", "other"), "no key-release condition"),
    ],
)
def test_policy_refuses_bad_input(
    registered: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str], message: str
) -> None:
    args = _policy(registered)
    args[args.index(change[0]) + 1] = change[1]
    code, out, err = _dcr(capsys, *args)
    assert code != 0 and message in err and out == ""


def test_policy_refuses_a_local_condition(tmp_path: Path, files: tuple[Path, Path], capsys: Any) -> None:
    """A local-platform condition has no pool to compile to."""
    keys = tmp_path / "keys"
    assert _dcr(capsys, *_add(tmp_path / "store", files, "--keys", keys))[0] == 0
    code, _out, err = _dcr(capsys, *_policy(keys))
    assert code != 0 and "confidential_space" in err


def test_policy_refuses_a_condition_over_googles_length_limit(
    tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    digests = [a for i in range(60) for a in ("--enclave-digest", f"sha256:{i:064x}")]
    assert _dcr(capsys, *_add(tmp_path / "store", files, *CLOUD, "--keys", keys, *digests))[0] == 0
    code, _out, err = _dcr(capsys, *_policy(keys))
    assert code != 0 and "4096" in err


@pytest.mark.parametrize(
    ("store", "extra", "message"),
    [
        ("gs://acme-dcr/datasets", (*CLOUD, "--keys", "KEYS"), "needs --kms-key"),
        ("gs://acme-dcr/datasets", (*CLOUD, "--kms-key", KMS), "needs --kms-key"),
        ("gs://Bad_Bucket", (*CLOUD, "--kms-key", KMS, "--keys", "KEYS"), "not a Cloud Storage location"),
        ("DIR", ("--kms-key", KMS), "--platform confidential-space"),
        ("DIR", (*CLOUD, "--kms-key", "not-a-key"), "not a Cloud KMS key"),
        ("DIR", (*CLOUD, "--hub-copy", "DIR"), "only for a gs://"),
        ("s3://acme-dcr/datasets", (*CLOUD, "--keys", "KEYS"), "neither a directory nor a Cloud Storage"),
    ],
)
def test_add_refuses_inconsistent_cloud_options_and_writes_nothing(
    tmp_path: Path,
    files: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    store: str,
    extra: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a store refused by mistake as a relative directory would land here
    sub = {"KEYS": str(tmp_path / "keys"), "DIR": str(tmp_path / "store")}
    args = _add(sub.get(store, store), files, *(sub.get(e, e) for e in extra))
    code, _out, err = _dcr(capsys, *args)
    assert code != 0 and message in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "keys").exists()


def test_store_locations() -> None:
    assert str(parse_store("gs://acme-dcr")) == "gs://acme-dcr/"
    assert parse_store("gs://acme-dcr/a/b") == GsUri("acme-dcr", "a/b/")
    for bad in ("gs://acme-dcr/a/../b", "gs://acme-dcr/a//b", "gs:/acme", "gs://A"):
        with pytest.raises(Exception, match="not a Cloud Storage location"):
            parse_store(bad)


@pytest.fixture(scope="module")
def cloud() -> Any:
    """The pinned Cloud Storage emulator and the KMS fake, on loopback."""
    from gcp_fakes.kms import KmsFake
    from gcp_fakes.storage import StorageEmulator

    storage, kms = StorageEmulator().start(), KmsFake().start()
    storage.create_bucket("acme-dcr")
    kms.create_key(KMS)
    try:
        yield storage, kms
    finally:
        kms.stop()
        storage.stop()


def _gs_add(tmp_path: Path, files: tuple[Path, Path], cloud: Any, prefix: str, *extra: Any) -> list[Any]:
    storage, kms = cloud
    return _add(
        f"gs://acme-dcr/{prefix}", files, *CLOUD, "--kms-key", KMS, "--keys", tmp_path / "keys",
        "--kms-endpoint", kms.endpoint, "--storage-endpoint", storage.endpoint, *extra,
    )  # fmt: skip


def test_add_to_a_gs_store_wraps_with_kms_and_uploads_the_version(
    tmp_path: Path, files: tuple[Path, Path], cloud: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data key is wrapped by Cloud KMS (the manifest names the key), the version's objects land in
    the store layout under the prefix (manifest, ciphertext, synthetic file), the hub copy holds the same
    manifest, and the snippet carries the cloud entry; a second run is a no-op."""
    from dcr_enclave.formats.dataset import DatasetVersion

    storage, _kms = cloud
    args = _gs_add(tmp_path, files, cloud, "datasets", "--hub-copy", tmp_path / "hub")
    code, out, err = _dcr(capsys, *args)
    assert code == 0, err
    names = sorted(b.name for b in storage.client().list_blobs("acme-dcr", prefix="datasets/"))
    manifest_name = next(n for n in names if n.endswith("/manifest.json"))
    version_dir = manifest_name.removesuffix("manifest.json")
    assert manifest_name.startswith("datasets/acme/claims/")
    assert {n.removeprefix(version_dir) for n in names} == {
        "manifest.json", "real/claims.csv.dcrenc", "synthetic/claims.csv",
    }  # fmt: skip
    manifest = DatasetVersion.from_json(
        storage.client().bucket("acme-dcr").blob(manifest_name).download_as_bytes()
    )
    assert manifest.key.to_json()["kind"] == "gcp-kms" and manifest.key.to_json()["name"] == KMS
    hub_manifest = tmp_path / "hub" / manifest_name.removeprefix("datasets/")
    assert DatasetVersion.from_json(hub_manifest.read_bytes()) == manifest
    assert "'cloud': {'store': 'gs://acme-dcr/datasets/'" in out and f"'kms_key': {KMS!r}" in out
    assert f"'store': {str(tmp_path / 'hub')!r}" in out
    # Again, into a new hub copy: the same content digest, the objects already there with the same bytes.
    args = _gs_add(tmp_path, files, cloud, "datasets", "--hub-copy", tmp_path / "hub2")
    code, out, err = _dcr(capsys, *args)
    assert code == 0, err
    assert "is already in gs://acme-dcr/datasets/; nothing changed" in out
    assert sorted(b.name for b in storage.client().list_blobs("acme-dcr", prefix="datasets/")) == names


def test_add_to_a_gs_store_refuses_an_object_with_other_content(
    tmp_path: Path, files: tuple[Path, Path], cloud: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version's objects never change: a stray object with other bytes under its name is refused."""
    storage, _kms = cloud
    code, _out, err = _dcr(capsys, *_gs_add(tmp_path, files, cloud, "first"))
    assert code == 0, err
    (synthetic,) = [
        b for b in storage.client().list_blobs("acme-dcr", prefix="first/") if "/synthetic/" in b.name
    ]
    target = "second/" + synthetic.name.removeprefix("first/")
    storage.client().bucket("acme-dcr").blob(target).upload_from_string(b"not the synthetic file")
    code, _out, err = _dcr(capsys, *_gs_add(tmp_path / "again", files, cloud, "second"))
    assert code != 0 and "already exists with other content" in err
    assert not [
        b
        for b in storage.client().list_blobs("acme-dcr", prefix="second/")
        if b.name.endswith("manifest.json")
    ]


def test_add_without_google_credentials_says_how_to_sign_in_and_writes_nothing(
    tmp_path: Path,
    files: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without Application Default Credentials (no credentials file, no gcloud sign-in, not on Google
    Cloud), ``--kms-key`` stops before any work with how to sign in, for a gs:// store and a directory."""
    for name in [n for n in os.environ if n.startswith(("GOOGLE_", "CLOUDSDK_", "GCE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud sign-in there
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # not on Google Cloud: no metadata server is asked
    for var in ("GCE_METADATA_HOST", "GCE_METADATA_IP"):
        monkeypatch.setenv(var, "127.0.0.1:9")  # and were one asked, it would be on loopback
    for store in ("gs://acme-dcr/datasets", tmp_path / "store"):
        args = _add(store, files, *CLOUD, "--kms-key", KMS, "--keys", tmp_path / "keys")
        code, _out, err = _dcr(capsys, *args)
        assert code == 2 and "no Google credentials were found" in err, err
        assert "gcloud auth application-default login" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "keys").exists()


def test_add_refused_by_kms_writes_nothing(
    tmp_path: Path, files: tuple[Path, Path], cloud: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key KMS does not know (or will not use for this caller): the error names the key and the role
    needed, and no store, keys directory or object is left behind."""
    storage, kms = cloud
    other = KMS.replace("/claims", "/unknown")
    for store in ("gs://acme-dcr/refused", tmp_path / "store"):
        args = _add(
            store, files, *CLOUD, "--kms-key", other, "--keys", tmp_path / "keys",
            "--kms-endpoint", kms.endpoint, "--storage-endpoint", storage.endpoint,
        )  # fmt: skip
        code, _out, err = _dcr(capsys, *args)
        assert code != 0 and other in err and "roles/cloudkms.cryptoKeyEncrypter" in err, err
    assert not (tmp_path / "store").exists() and not (tmp_path / "keys").exists()
    assert list(storage.client().list_blobs("acme-dcr", prefix="refused/")) == []
