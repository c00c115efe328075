"""Dataset versions over time: pinned grants keep decrypting old versions; retired versions get no new grants.

The key release goes through the real :class:`~dcr_enclave.platform.broker.KeyBroker` (challenge, attestation token,
grant, the provider's condition compiled to CEL) and the released key decrypts the real ciphertext.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dcr_enclave.commands.local_run import pick_datasets
from dcr_enclave.formats import contract, streamcrypt
from dcr_enclave.formats.dataset import DatasetVersion
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.formats.jwk import public_jwk, thumbprint
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.pack import store as store_module
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import generate_key, load_or_create_key
from dcr_enclave.pack.store import DEV_HUB_KEY_FILE, Store
from dcr_enclave.platform.broker import AuditLog, KeyBroker
from dcr_enclave.platform.key_store import KeyDirectory
from dcr_enclave.platform.measure import current_measurement
from dcr_enclave.platform.signer import local_claims, sign_token

CliResult = tuple[int, str, str]
BUNDLE = "sha256:" + "b" * 64


def _listing(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (
            st.st_mode,
            hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "",
        )
    return out


def _add(run_cli: Callable[..., CliResult], root: Path, real: Path, synthetic: Path) -> DatasetVersion:
    before = {m.version for m in Store(root).versions("acme", "insurance")}
    code, _, err = run_cli(
        "provider", "add", "--store", root, "--provider", "acme", "--dataset", "insurance",
        "--real", real, "--synthetic", synthetic,
    )  # fmt: skip
    assert code == 0, err
    (new,) = [m for m in Store(root).versions("acme", "insurance") if m.version not in before]
    return new


@pytest.fixture(autouse=True)
def _distinct_creation_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each add gets its own creation second, so "newest" is well defined however fast the test runs."""
    seconds = iter(range(10, 60))
    monkeypatch.setattr(store_module, "utc_now", lambda: f"2030-01-01T00:00:{next(seconds):02d}Z")


@pytest.fixture
def two_versions(
    tmp_path: Path, run_cli: Callable[..., CliResult], insurance_real: Path, insurance_synthetic: Path
) -> tuple[Path, DatasetVersion, DatasetVersion, Path]:
    """A store with version 1 (the insurance rows) and version 2 (a changed real file) of acme/insurance."""
    root = tmp_path / "store"
    v1 = _add(run_cli, root, insurance_real, insurance_synthetic)
    changed = tmp_path / "v2" / insurance_real.name
    changed.parent.mkdir()
    changed.write_bytes(insurance_real.read_bytes() + b"64,male,30.1,0,no,northwest,12000.5\n")
    v2 = _add(run_cli, root, changed, insurance_synthetic)
    return root, v1, v2, changed


def _grant(root: Path, job_id: str, version: str) -> str:
    hub = load_or_create_key(root / ".keys" / DEV_HUB_KEY_FILE)
    _, public = generate_keypair()
    return issue_grant(
        hub,
        user="alice",
        job_id=job_id,
        bundle_digest=BUNDLE,
        datasets=[GrantedDataset("acme", "insurance", version, "auto")],
        output_public_key=public,
    )


def _release(root: Path, tmp_path: Path, manifest: DatasetVersion, grant: str, job_id: str) -> bytes:
    """Ask a real key broker for ``manifest``'s data key, as the enclave supervisor does."""
    signer = generate_key()
    hub_public = public_jwk(load_or_create_key(root / ".keys" / DEV_HUB_KEY_FILE))
    broker = KeyBroker(root / ".keys", [public_jwk(signer)], AuditLog(tmp_path / "audit.log"))
    challenge = broker.new_challenge(job_id)
    env = {
        contract.ENV.JOB_ID: job_id,
        contract.ENV.BUNDLE_DIGEST: BUNDLE,
        contract.ENV.HUB_KEY_THUMBPRINT: thumbprint(hub_public),
    }
    claims = local_claims(
        image_digest=current_measurement(),
        env=env,
        audience=contract.KEY_RELEASE_AUDIENCE,
        nonces=[challenge],
    )
    request: dict[str, Any] = {
        "challenge": challenge,
        "provider": manifest.provider,
        "dataset": manifest.dataset,
        "version": manifest.version,
        "token": sign_token(claims, signer, kid=public_jwk(signer)["kid"]),
        "hub_jwks": [hub_public],
        "grant": grant,
        "wrapped_key": manifest.key.to_json(),
    }
    key, _ = broker.release(request, job_id=job_id)
    return key


def _decrypt(root: Path, manifest: DatasetVersion, key: bytes, out: Path) -> bytes:
    name = manifest.files[0].name
    streamcrypt.decrypt_file(
        Store(root).ciphertext_path(manifest, name), out, key, manifest.file_context(name)
    )
    return out.read_bytes()


def test_grant_pinned_to_version_1_still_decrypts_it_after_version_2(
    two_versions: tuple[Path, DatasetVersion, DatasetVersion, Path], tmp_path: Path, insurance_real: Path
) -> None:
    """After version 2 is added (and even after version 1 is retired), a grant that pins version 1 gets
    version 1's data key from the broker, and it decrypts version 1's ciphertext to the original bytes."""
    root, v1, v2, _ = two_versions
    assert v1.version != v2.version
    job_id = contract.new_job_id()
    grant = _grant(root, job_id, v1.version)  # issued while version 1 was current
    code_before = _decrypt(root, v1, _release(root, tmp_path, v1, grant, job_id), tmp_path / "a.csv")
    assert code_before == insurance_real.read_bytes()
    Store(root).retire("acme", "insurance", v1.version)
    key = _release(root, tmp_path, Store(root).load("acme", "insurance", v1.version), grant, job_id)
    assert _decrypt(root, v1, key, tmp_path / "b.csv") == insurance_real.read_bytes()


def test_grant_for_version_1_gets_no_key_for_version_2(
    two_versions: tuple[Path, DatasetVersion, DatasetVersion, Path], tmp_path: Path
) -> None:
    """A grant pinned to version 1 cannot be used to release version 2's key: the pin is exact."""
    root, v1, v2, _ = two_versions
    job_id = contract.new_job_id()
    grant = _grant(root, job_id, v1.version)
    with pytest.raises(DCRError, match="does not name"):
        _release(root, tmp_path, v2, grant, job_id)


def test_retired_version_gets_no_new_grant(
    two_versions: tuple[Path, DatasetVersion, DatasetVersion, Path], run_cli: Callable[..., CliResult]
) -> None:
    """`dcr provider retire` marks the version retired (version digest unchanged); the store then refuses it
    as the version of a new grant, and the grant pickers (local-run and Store.grantable) choose the newest
    unretired version instead."""
    root, v1, v2, _ = two_versions
    store = Store(root)
    assert store.grantable("acme", "insurance").version == v2.version
    code, out, err = run_cli(
        "provider", "retire", "--store", root, "--provider", "acme", "--dataset", "insurance",
        "--version", v2.version,
    )  # fmt: skip
    assert code == 0, err
    assert "Retired acme/insurance" in out
    retired = store.load("acme", "insurance", v2.version)
    assert retired.retired and retired.version == v2.version
    with pytest.raises(DCRError, match="retired"):
        store.grantable("acme", "insurance", v2.version)
    assert store.grantable("acme", "insurance").version == v1.version
    (picked,) = pick_datasets(store, ["acme/insurance"], [])
    assert picked.version == v1.version
    code, out, _ = run_cli("provider", "list", "--store", root)
    rows = {line.split()[2]: line.split() for line in out.splitlines()[1:]}
    assert rows[v2.version][6] == "yes" and rows[v1.version][6] == "no"
    store.retire("acme", "insurance", v1.version)
    with pytest.raises(DCRError, match="no unretired version"):
        store.grantable("acme", "insurance")


def test_retire_again_and_condition_keeps_retired_versions(
    two_versions: tuple[Path, DatasetVersion, DatasetVersion, Path],
    run_cli: Callable[..., CliResult],
    tmp_path: Path,
    insurance_synthetic: Path,
) -> None:
    """Retiring twice changes nothing the second time; a version added after a retirement leaves the retired
    version in the provider's condition (its pinned grants must keep working)."""
    root, v1, _, changed = two_versions
    args = ("provider", "retire", "--store", root, "--provider", "acme", "--dataset", "insurance")
    assert run_cli(*args, "--version", v1.version)[0] == 0
    before = _listing(root)
    code, out, _ = run_cli(*args, "--version", v1.version)
    assert code == 0 and "already retired" in out
    assert _listing(root) == before
    third = tmp_path / "v3" / changed.name
    third.parent.mkdir()
    third.write_bytes(changed.read_bytes() + b"30,female,22.0,1,no,southeast,4000.25\n")
    _add(run_cli, root, third, insurance_synthetic)
    condition = KeyDirectory(root / ".keys").read_condition("acme", "insurance")
    assert condition is not None and v1.version in condition.versions
    assert len(condition.versions) == 3


@pytest.mark.parametrize(
    ("version", "message"),
    [("sha256:" + "0" * 64, "no version"), ("sha256:xyz", "--version"), ("latest", "--version")],
)
def test_retire_refusals_change_nothing(
    two_versions: tuple[Path, DatasetVersion, DatasetVersion, Path],
    run_cli: Callable[..., CliResult],
    version: str,
    message: str,
) -> None:
    """Retiring an unknown or malformed version is a clear error and leaves the store as it was."""
    root = two_versions[0]
    before = _listing(root)
    code, _, err = run_cli(
        "provider", "retire", "--store", root, "--provider", "acme", "--dataset", "insurance",
        "--version", version,
    )  # fmt: skip
    assert code != 0 and err.startswith("dcr: error:") and message in err, err
    assert _listing(root) == before
