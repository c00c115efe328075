"""The manifest's file-list MAC: registration writes it, the enclave checks it before decrypting anything.

The store is untrusted and the enclave does not hash the plaintext, so without the MAC a storage attacker
could drop a file entry from a manifest and the job would run on part of the data. These tests register
datasets through ``dcr provider add``, tamper with the stored manifest or files, and drive the code the
supervisor runs: :func:`dcr_enclave.runtime.dataset_reader.check_dataset_files` and ``Supervisor.fetch_datasets`` itself
(with a link that releases keys from the provider's keys directory).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest

from dcr_enclave.formats import streamcrypt
from dcr_enclave.formats.dataset import SCHEMA_ID, SCHEMA_ID_V1, DatasetVersion
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.pack.store import Store
from dcr_enclave.platform.key_store import KeyDirectory
from dcr_enclave.runtime.dataset_reader import check_dataset_files
from dcr_enclave.runtime.supervisor import Launch, Supervisor

CliResult = tuple[int, str, str]
SCHEMA = Path(streamcrypt.__file__).parent / "schemas" / "dataset-version.schema.json"
#: A row only the second real file holds: finding it decrypted anywhere means that file was decrypted.
EXTRA_ROW = "north,fa1cbe11,42"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _add(run_cli: Callable[..., CliResult], root: Path, dataset: str, *pairs: tuple[Path, Path]) -> str:
    args: list[Any] = ["provider", "add", "--store", root, "--provider", "acme", "--dataset", dataset]
    for real, synthetic in pairs:
        args += ["--real", real, "--synthetic", synthetic]
    code, out, err = run_cli(*args)
    assert code == 0, err
    return out


@pytest.fixture
def two_files(
    tmp_path: Path, run_cli: Callable[..., CliResult], insurance_real: Path, insurance_synthetic: Path
) -> Store:
    """A store with acme/insurance registered with two files: the insurance rows and regions.csv."""
    extra = _write(tmp_path / "in" / "regions.csv", f"region,code,n\n{EXTRA_ROW}\nsouth,0b5e55ed,7\n")
    extra_syn = _write(tmp_path / "in" / "regions-syn.csv", "region,code,n\neast,d00dfeed,1\n")
    root = tmp_path / "store"
    _add(run_cli, root, "insurance", (insurance_real, insurance_synthetic), (extra, extra_syn))
    return Store(root)


def _manifest(store: Store, dataset: str = "insurance") -> DatasetVersion:
    (m,) = store.versions("acme", dataset)
    return m


def _data_key(store: Store, m: DatasetVersion) -> bytes:
    return KeyDirectory(store.default_keys_dir).unwrap(m.key, m.provider, m.dataset, m.version)


def _manifest_path(store: Store, m: DatasetVersion) -> Path:
    return store.version_dir(m.provider, m.dataset, m.version) / "manifest.json"


def _rewrite(store: Store, m: DatasetVersion, change: Callable[[dict[str, Any]], None]) -> None:
    """Tamper with the stored manifest as a storage attacker would: edit its JSON in place."""
    path = _manifest_path(store, m)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def _drop_second_file(doc: dict[str, Any]) -> None:
    del doc["files"][1]


def _resize_first_file(doc: dict[str, Any]) -> None:
    # Consistent with the chunking, so only the MAC can tell.
    f, chunk = doc["files"][0], doc["encryption"]["chunk_size"]
    f["size"] -= 1
    f["ciphertext_size"] = streamcrypt.ciphertext_size(f["size"], chunk)


def _rename_second_file(doc: dict[str, Any]) -> None:
    doc["files"][1]["name"] = "renamed.csv"


def _change_ciphertext_digest(doc: dict[str, Any]) -> None:
    doc["files"][0]["ciphertext_sha256"] = "sha256:" + "0" * 64


def _alter_mac(doc: dict[str, Any]) -> None:
    mac = doc["files_mac"]
    doc["files_mac"] = mac[:-1] + ("0" if mac[-1] != "0" else "1")


def _strip_mac_as_v1(doc: dict[str, Any]) -> None:
    del doc["files_mac"]
    doc["schema"] = SCHEMA_ID_V1


TAMPERING = {
    "file entry removed": (_drop_second_file, "does not authenticate"),
    "size changed": (_resize_first_file, "does not authenticate"),
    "file renamed": (_rename_second_file, "does not authenticate"),
    "ciphertext digest changed": (_change_ciphertext_digest, "does not authenticate"),
    "MAC altered": (_alter_mac, "does not authenticate"),
    "MAC removed (v1 manifest)": (_strip_mac_as_v1, "no file-list MAC"),
}


def test_registration_writes_a_files_mac_the_data_key_verifies(two_files: Store) -> None:
    """`dcr provider add` writes a v2 manifest, valid per its schema, whose files_mac verifies under the
    version's data key and only under it; the enclave's check returns every file, in manifest order."""
    m = _manifest(two_files)
    doc = json.loads(_manifest_path(two_files, m).read_text())
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["schema"] == SCHEMA_ID == "dcr/dataset-version/v2"
    assert doc["files_mac"].startswith("hmac-sha256:") and len(doc["files_mac"]) == len("hmac-sha256:") + 64
    key = _data_key(two_files, m)
    m.check_files_mac(key)
    assert m.compute_files_mac(key) == doc["files_mac"]
    files = check_dataset_files(two_files, m, key)
    assert [(f.name, p) for f, p in files] == [
        (f.name, two_files.ciphertext_path(m, f.name)) for f in m.files
    ]
    with pytest.raises(IntegrityError, match="does not authenticate"):
        m.check_files_mac(bytes(32))


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_manifest_is_refused_naming_the_dataset(two_files: Store, case: str) -> None:
    """A stored manifest with a file entry removed, a size changed, a file renamed, a ciphertext digest
    changed, its MAC altered or its MAC removed (as a v1 manifest) still loads, but the check the supervisor
    runs with the released key refuses it with an IntegrityError naming the dataset and what to do."""
    m = _manifest(two_files)
    key = _data_key(two_files, m)
    change, message = TAMPERING[case]
    _rewrite(two_files, m, change)
    tampered = two_files.load(m.provider, m.dataset, m.version)
    with pytest.raises(IntegrityError, match=message) as e:
        check_dataset_files(two_files, tampered, key)
    assert "acme/insurance" in e.value.message
    assert "dcr provider add" in (e.value.hint or "")


def test_v2_manifest_without_its_mac_is_refused_when_read(two_files: Store) -> None:
    """Removing files_mac but keeping schema v2 fails the schema (files_mac is required in v2); a v1
    manifest that carries a files_mac is refused too."""
    m = _manifest(two_files)
    _rewrite(two_files, m, lambda d: d.pop("files_mac"))
    with pytest.raises(DCRError, match="files_mac"):
        two_files.load(m.provider, m.dataset, m.version)
    doc = m.to_json()
    doc["schema"] = SCHEMA_ID_V1
    with pytest.raises(DCRError, match="invalid"):
        DatasetVersion.from_json(doc)


@pytest.mark.parametrize("how", ["deleted", "truncated", "extended", "directory"])
def test_missing_or_resized_ciphertext_is_refused_before_decrypting(two_files: Store, how: str) -> None:
    """With the manifest intact, an encrypted file that is missing, shorter or longer than the manifest
    says, or not a regular file, is refused before any file is decrypted, naming the dataset and file."""
    m = _manifest(two_files)
    key = _data_key(two_files, m)
    target = two_files.ciphertext_path(m, "regions.csv")
    data = target.read_bytes()
    target.unlink()
    if how == "truncated":
        target.write_bytes(data[:-1])
    elif how == "extended":
        target.write_bytes(data + b"\0")
    elif how == "directory":
        target.mkdir()
    expected = {
        "deleted": "missing",
        "truncated": "bytes, not the",
        "extended": "bytes, not the",
        "directory": "not a regular file",
    }[how]
    with pytest.raises(IntegrityError, match=expected) as e:
        check_dataset_files(two_files, m, key)
    assert "acme/insurance" in e.value.message and "regions.csv" in e.value.message


class _KeysLink:
    """A TEE link whose key release unwraps with the provider's keys directory (no attestation here)."""

    def __init__(self, keys: KeyDirectory) -> None:
        self.keys = keys
        self.released: list[str] = []

    def challenge(self) -> str:
        return "challenge"

    def token(self, audience: str, nonces: list[str]) -> str:
        return "token"

    def release(self, **req: Any) -> tuple[bytes, str]:
        self.released.append(f"{req['provider']}/{req['dataset']}")
        key = self.keys.unwrap(req["wrapped_key"], req["provider"], req["dataset"], req["version"])
        return key, "sha256:" + "c" * 64


def _fetch(store: Store, tmp_path: Path, datasets: list[str]) -> tuple[Supervisor, _KeysLink, Any]:
    """A supervisor whose fetch_datasets is about to run for ``datasets`` (newest versions)."""
    launch = Launch(
        job_id="job-test",
        bundle_digest="sha256:" + "b" * 64,
        bundle_path=tmp_path / "bundle.tar",
        grant_token="grant",
        hub_key_thumbprint="thumb",
        hub_jwks=[],
        store=store.root,
        output=tmp_path / "out",
    )
    link = _KeysLink(KeyDirectory(store.default_keys_dir))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sup = Supervisor(launch, cast(Any, link), scratch, (65534, 65534))
    sup.data.mkdir()
    grant = types.SimpleNamespace(
        datasets=[GrantedDataset("acme", d, _manifest(store, d).version, "auto") for d in datasets]
    )
    return sup, link, grant


@pytest.fixture
def two_datasets(
    two_files: Store, tmp_path: Path, run_cli: Callable[..., CliResult], insurance_real: Path,
    insurance_synthetic: Path,
) -> Store:  # fmt: skip
    """``two_files`` plus acme/claims (one file) in the same store."""
    _add(run_cli, two_files.root, "claims", (insurance_real, insurance_synthetic))
    return two_files


def test_supervisor_decrypts_untouched_datasets(
    two_datasets: Store, tmp_path: Path, insurance_real: Path
) -> None:
    """Untouched manifests pass: Supervisor.fetch_datasets decrypts every file of every granted dataset
    to /data/<provider>/<dataset>/<file>, byte for byte, and lists them for the receipt."""
    sup, _link, grant = _fetch(two_datasets, tmp_path, ["insurance", "claims"])
    receipt, conditions = sup.fetch_datasets(grant)
    assert (sup.data / "acme" / "insurance" / "real.csv").read_bytes() == insurance_real.read_bytes()
    assert EXTRA_ROW in (sup.data / "acme" / "insurance" / "regions.csv").read_text()
    assert (sup.data / "acme" / "claims" / "real.csv").read_bytes() == insurance_real.read_bytes()
    assert [[f["name"] for f in d["files"]] for d in receipt] == [["real.csv", "regions.csv"], ["real.csv"]]
    assert set(conditions) == {"acme/insurance", "acme/claims"}


@pytest.mark.parametrize("case", ["file entry removed", "MAC altered", "MAC removed (v1 manifest)"])
def test_supervisor_refuses_a_tampered_dataset_with_nothing_decrypted(
    two_datasets: Store, tmp_path: Path, case: str
) -> None:
    """The attack the MAC closes: regions.csv's entry is removed from acme/insurance's manifest (its
    ciphertext stays in the store), or the MAC is altered or removed. Supervisor.fetch_datasets, granted
    acme/claims (untouched) then acme/insurance, refuses naming acme/insurance after its key release and
    before decrypting anything: /data stays empty, also of acme/claims. The job never runs on part of
    the data."""
    _rewrite(two_datasets, _manifest(two_datasets), TAMPERING[case][0])
    sup, link, grant = _fetch(two_datasets, tmp_path, ["claims", "insurance"])
    with pytest.raises(IntegrityError, match=TAMPERING[case][1]) as e:
        sup.fetch_datasets(grant)
    assert "acme/insurance" in e.value.message
    assert link.released == ["acme/claims", "acme/insurance"]
    assert list(sup.data.rglob("*")) == []


def test_re_registering_a_v1_version_adds_the_mac(
    two_files: Store, tmp_path: Path, run_cli: Callable[..., CliResult], insurance_real: Path,
    insurance_synthetic: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A version whose manifest predates the MAC (v1, here retired) is refused by the enclave's check;
    `dcr provider add` with the same files rebuilds it in place under a new data key with a valid MAC,
    the same version, creation time and retired flag, and leaves no temporary directory; a second add is
    then a no-op."""
    m = _manifest(two_files)
    code, _, err = run_cli(
        "provider", "retire", "--store", two_files.root, "--provider", "acme", "--dataset", "insurance",
        "--version", m.version,
    )  # fmt: skip
    assert code == 0, err
    _rewrite(two_files, m, _strip_mac_as_v1)
    old = two_files.load(m.provider, m.dataset, m.version)
    assert old.files_mac is None and old.retired
    with pytest.raises(IntegrityError, match="no file-list MAC"):
        check_dataset_files(two_files, old, _data_key(two_files, old))

    extra = (tmp_path / "in" / "regions.csv", tmp_path / "in" / "regions-syn.csv")
    out = _add(run_cli, two_files.root, "insurance", (insurance_real, insurance_synthetic), extra)
    assert "Re-registered acme/insurance version " + m.version in out
    new = _manifest(two_files)
    assert (new.version, new.created, new.retired) == (m.version, m.created, True)
    assert new.key != old.key and new.files_mac is not None
    assert json.loads(_manifest_path(two_files, new).read_text())["schema"] == SCHEMA_ID
    assert len(check_dataset_files(two_files, new, _data_key(two_files, new))) == 2
    assert sorted(p.name for p in two_files.dataset_dir("acme", "insurance").iterdir()) == [m.version_hex]

    out = _add(run_cli, two_files.root, "insurance", (insurance_real, insurance_synthetic), extra)
    assert "nothing changed" in out
    assert _manifest(two_files) == new


def test_retiring_keeps_the_mac_valid(two_files: Store, run_cli: Callable[..., CliResult]) -> None:
    """`dcr provider retire` (which has no data key) changes only the retired flag, which the MAC does not
    cover: the retired manifest still passes the enclave's check and `dcr provider list` shows it."""
    m = _manifest(two_files)
    code, _, err = run_cli(
        "provider", "retire", "--store", two_files.root, "--provider", "acme", "--dataset", "insurance",
        "--version", m.version,
    )  # fmt: skip
    assert code == 0, err
    retired = _manifest(two_files)
    assert retired.retired and retired.files_mac == m.files_mac
    check_dataset_files(two_files, retired, _data_key(two_files, retired))
    code, out, err = run_cli("provider", "list", "--store", two_files.root)
    assert code == 0, err
    assert m.version in out and "yes" in out
