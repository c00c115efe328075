"""The dataset store, its manifests, keys and conditions, and ``dcr provider add`` / ``dcr provider list``."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives import serialization
from traitlets.config import Config

import dcr_enclave.platform
from dcr_enclave.commands import main as cli
from dcr_enclave.formats import streamcrypt
from dcr_enclave.formats.dataset import DatasetVersion, Protection
from dcr_enclave.formats.errors import DCRError, IntegrityError
from dcr_enclave.formats.jwk import jwks, public_jwk, thumbprint
from dcr_enclave.pack.signing_keys import generate_key, read_private_key
from dcr_enclave.pack.store import DEV_HUB_KEY_FILE, Store, expected_version
from dcr_enclave.platform.condition import KeyReleaseCondition, PlatformCondition
from dcr_enclave.platform.key_store import KeyDirectory
from dcr_enclave.platform.measure import current_measurement
from dcr_spawner.policy import DCRPolicy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "insurance"
REAL = DATA / "real.csv"
SYNTHETIC = DATA / "synthetic_mst.csv"
SCHEMAS = Path(streamcrypt.__file__).parent / "schemas"
DCR_SCRIPT = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "dcr"


def _dcr(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _add_args(store: Path, *pairs: tuple[Path, Path], extra: tuple[Any, ...] = ()) -> list[Any]:
    args: list[Any] = ["provider", "add", "--store", store, "--provider", "acme", "--dataset", "insurance"]
    for real, synthetic in pairs or ((REAL, SYNTHETIC),):
        args += ["--real", real, "--synthetic", synthetic]
    return args + list(extra)


def _listing(root: Path) -> dict[str, tuple[int, str, int]]:
    """Every path under ``root`` with its mode, content digest (files) and modification time."""
    out = {}
    for p in sorted(root.rglob("*")) if root.exists() else []:
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[str(p.relative_to(root))] = (st.st_mode, digest, st.st_mtime_ns)
    return out


def _only_version(store: Store) -> DatasetVersion:
    (manifest,) = store.versions("acme", "insurance")
    return manifest


def _decrypted_digests(
    store: Store, manifest: DatasetVersion, keys: KeyDirectory, outdir: Path
) -> dict[str, str]:
    data_key = keys.unwrap(manifest.key.to_json(), manifest.provider, manifest.dataset, manifest.version)
    outdir.mkdir(exist_ok=True)
    digests = {}
    for f in manifest.files:
        digest, size = streamcrypt.decrypt_file(
            store.ciphertext_path(manifest, f.name), outdir / f.name, data_key, manifest.file_context(f.name)
        )
        assert size == f.size
        digests[f.name] = digest
    return digests


@pytest.fixture
def added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """A store with acme/insurance added through the CLI; returns the store root and the CLI's stdout."""
    root = tmp_path / "store"
    code, out, err = _dcr(capsys, *_add_args(root))
    assert code == 0, err
    return root, out


# --------------------------------------------------------------------------------------------------------
# provider add: the happy path
# --------------------------------------------------------------------------------------------------------


def test_store_holds_no_plaintext_row(added: tuple[Path, str]) -> None:
    """After adding the insurance data, no file in the store (manifest, ciphertext, keys, condition, hub
    key) contains any row of the real file, except the synthetic copy, which is not the real data."""
    root, _ = added
    rows = [line for line in REAL.read_bytes().splitlines() if line]
    assert len(rows) > 1000
    manifest = _only_version(Store(root))
    synthetic = Store(root).synthetic_path(manifest, "real.csv")
    scanned = 0
    for p in root.rglob("*"):
        if p.is_file() and p != synthetic:
            content = p.read_bytes()
            leaked = [r for r in rows if r in content]
            assert not leaked, f"{p} contains real rows, e.g. {leaked[0]!r}"
            scanned += 1
    assert scanned >= 5  # manifest, ciphertext, KEK, condition, hub key
    assert synthetic.read_bytes() == SYNTHETIC.read_bytes()


def test_add_prints_hub_snippet_and_condition(added: tuple[Path, str]) -> None:
    """The output holds an executable jupyterhub_config.py snippet naming the version, store, synthetic
    files and release mode, and the stored key-release condition pinning the current enclave measurement
    and the local development hub key (flagged as such)."""
    root, out = added
    manifest = _only_version(Store(root))
    # The hub section (comment rules included) is Python the admin pastes as is: one assignment.
    section = out[out.index("# ---") : out.index("}\n\n") + 1]
    (statement,) = ast.parse(section).body
    assert isinstance(statement, ast.Assign)
    assert ast.unparse(statement.targets[0]) == "c.DCRPolicy.datasets"
    assert ast.literal_eval(statement.value) == {
        "acme/insurance": {
            "version": manifest.version,
            "store": str(root),
            "synthetic": {"real.csv": manifest.file("real.csv").synthetic_sha256},
            "release": "review",
            "entitled": {"users": [], "groups": []},
            "description": "",
        }
    }
    assert "'entitled': {'users': [], 'groups': []},  # who may use it: fill in" in section
    assert "fidelity_report" not in section  # none was written
    keys = KeyDirectory(root / ".keys")
    condition = keys.read_condition("acme", "insurance")
    assert condition is not None
    assert json.dumps(condition.to_json(), indent=2, ensure_ascii=False) in out
    assert condition.versions == (manifest.version,)
    assert condition.enclave_digests == (current_measurement(),)
    hub_key = read_private_key(root / ".keys" / DEV_HUB_KEY_FILE)
    assert condition.hub_key_thumbprints == (thumbprint(public_jwk(hub_key)),)
    assert condition.platform == PlatformCondition.defaults("local")
    assert "LOCAL DEVELOPMENT" in out and "local development only" in out


def test_manifest_validates_against_its_schema(added: tuple[Path, str]) -> None:
    """The written manifest is valid per schemas/dataset-version.schema.json (checked directly with
    jsonschema), has no plaintext digest, and its files live under the version directory."""
    root, _ = added
    manifest = _only_version(Store(root))
    vdir = Store(root).version_dir("acme", "insurance", manifest.version)
    doc = json.loads((vdir / "manifest.json").read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "dataset-version.schema.json").read_text()))
    plain = "sha256:" + hashlib.sha256(REAL.read_bytes()).hexdigest()
    assert plain not in (vdir / "manifest.json").read_text()
    assert doc["files"][0]["ciphertext"] == "real/real.csv.dcrenc"
    assert doc["files"][0]["synthetic"] == "synthetic/real.csv"
    assert doc["key"]["kind"] == "local"
    assert vdir.name == manifest.version_hex


def test_condition_file_validates_against_its_schema(added: tuple[Path, str]) -> None:
    """The stored condition is valid per schemas/key-release-condition.schema.json."""
    root, _ = added
    doc = json.loads((root / ".keys" / "acme" / "conditions" / "insurance.json").read_text())
    schema = Path(dcr_enclave.platform.__file__).parent / "schemas" / "key-release-condition.schema.json"
    jsonschema.validate(doc, json.loads(schema.read_text()))


def test_expected_version_recomputes_from_decrypted_files(added: tuple[Path, str], tmp_path: Path) -> None:
    """Decrypting every file with the unwrapped data key gives the real bytes, and expected_version over
    their digests equals the manifest's version; any other content gives another version."""
    root, _ = added
    store, keys = Store(root), KeyDirectory(root / ".keys")
    manifest = _only_version(store)
    digests = _decrypted_digests(store, manifest, keys, tmp_path / "plain")
    assert (tmp_path / "plain" / "real.csv").read_bytes() == REAL.read_bytes()
    assert expected_version(manifest, digests) == manifest.version
    assert expected_version(manifest, {"real.csv": "sha256:" + "0" * 64}) != manifest.version
    with pytest.raises(IntegrityError, match="do not match the manifest"):
        expected_version(manifest, {"other.csv": digests["real.csv"]})


def test_version_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same content added to two stores (two different data keys and ciphertexts) gets the same
    version, whatever the order of the file pairs; other protection or other synthetic data gets another."""
    other_real = tmp_path / "claims.csv"
    other_real.write_bytes(REAL.read_bytes()[:5000])
    other_syn = tmp_path / "claims-syn.csv"
    other_syn.write_bytes(SYNTHETIC.read_bytes()[:5000])
    pairs = ((REAL, SYNTHETIC), (other_real, other_syn))
    versions = []
    for name, ordered, extra in [
        ("a", pairs, ()),
        ("b", pairs[::-1], ()),
        ("c", pairs, ("--protection", "dp", "--epsilon", "1")),
    ]:
        code, _, err = _dcr(capsys, *_add_args(tmp_path / name, *ordered, extra=extra))
        assert code == 0, err
        versions.append(_only_version(Store(tmp_path / name)))
    a, b, c = versions
    assert a.version == b.version != c.version
    assert a.key.wrapped_data_key != b.key.wrapped_data_key
    assert a.file("real.csv").ciphertext_sha256 != b.file("real.csv").ciphertext_sha256
    changed = tmp_path / "changed-syn.csv"
    changed.write_bytes(SYNTHETIC.read_bytes() + b"\n")
    d = Store(tmp_path / "d").add("acme", "insurance", [(REAL, changed)], KeyDirectory(tmp_path / "d-keys"))
    assert (
        d.manifest.version
        != Store(tmp_path / "e")
        .add("acme", "insurance", [(REAL, SYNTHETIC)], KeyDirectory(tmp_path / "e-keys"))
        .manifest.version
    )


def test_multi_file_dataset_round_trips(tmp_path: Path) -> None:
    """A dataset of several files, added with small chunks, decrypts file by file to the original bytes
    and recomputes its version."""
    second = tmp_path / "second.bin"
    second.write_bytes(os.urandom(50_000))
    second_syn = tmp_path / "second-syn.bin"
    second_syn.write_bytes(os.urandom(50_000))
    store, keys = Store(tmp_path / "store"), KeyDirectory(tmp_path / "keys")
    result = store.add("acme", "insurance", [(REAL, SYNTHETIC), (second, second_syn)], keys, chunk_size=4096)
    assert result.created
    assert [f.name for f in result.manifest.files] == ["real.csv", "second.bin"]
    digests = _decrypted_digests(store, result.manifest, keys, tmp_path / "plain")
    assert (tmp_path / "plain" / "second.bin").read_bytes() == second.read_bytes()
    assert expected_version(result.manifest, digests) == result.manifest.version
    assert store.load("acme", "insurance", result.manifest.version) == result.manifest


def test_existing_version_is_a_no_op(added: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Adding content that is already in the store says so, exits 0 and changes nothing at all (not the
    manifest, ciphertext, keys nor condition)."""
    root, _ = added
    before = _listing(root)
    code, out, _ = _dcr(capsys, *_add_args(root))
    assert code == 0
    assert "already in the store" in out and "nothing changed" in out
    assert _listing(root) == before


def test_second_version_extends_the_condition(
    added: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A new version of a dataset joins the old one in the store and in the condition's versions."""
    root, _ = added
    changed = root.parent / "syn2.csv"
    changed.write_bytes(SYNTHETIC.read_bytes()[:-100])
    code, _, err = _dcr(capsys, *_add_args(root, (REAL, changed)))
    assert code == 0, err
    versions = [m.version for m in Store(root).versions("acme", "insurance")]
    assert len(versions) == 2
    condition = KeyDirectory(root / ".keys").read_condition("acme", "insurance")
    assert condition is not None and set(condition.versions) == set(versions)


def test_hub_key_and_platform_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--hub-key (PEM public key or JWKS), --enclave-digest and --platform confidential-space end up in
    the condition; no development hub key is created then, and a cloud condition without a project is
    flagged as incomplete."""
    hub = generate_key()
    pem = tmp_path / "hub.pub.pem"
    pem.write_bytes(
        hub.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    other = generate_key("RS256")
    jwks_file = tmp_path / "hub.jwks"
    jwks_file.write_text(json.dumps(jwks(hub, other)))
    digest = "sha256:" + "e" * 64
    for i, key_file in enumerate((pem, jwks_file)):
        root = tmp_path / f"store{i}"
        extra = ("--hub-key", key_file, "--enclave-digest", digest, "--platform", "confidential-space")
        code, out, err = _dcr(capsys, *_add_args(root, extra=extra))
        assert code == 0, err
        condition = KeyDirectory(root / ".keys").read_condition("acme", "insurance")
        assert condition is not None
        assert condition.enclave_digests == (digest,)
        assert condition.platform == PlatformCondition.defaults("confidential_space")
        expected = [hub] if key_file == pem else [hub, other]
        assert condition.hub_key_thumbprints == tuple(thumbprint(public_jwk(k)) for k in expected)
        assert not (root / ".keys" / DEV_HUB_KEY_FILE).exists()
        assert "INCOMPLETE" in out and "LOCAL DEVELOPMENT" not in out


def test_keys_are_owner_only(added: tuple[Path, str]) -> None:
    """The keys directory and provider directory are 0700, the KEK and hub key files 0600."""
    root, _ = added
    keys = root / ".keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "acme").stat().st_mode) == 0o700
    (kek,) = (keys / "acme").glob("kek-*.key")
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    assert kek.stat().st_size == 32
    assert stat.S_IMODE((keys / DEV_HUB_KEY_FILE).stat().st_mode) == 0o600


def test_list_shows_the_store(added: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    """provider list prints one row per version with protection, ε, file count and retired flag."""
    root, _ = added
    Store(root).add(
        "acme",
        "claims",
        [(REAL, SYNTHETIC)],
        KeyDirectory(root / ".keys"),
        Protection("dp", "mst", 0.5, 1e-6),
    )
    code, out, _ = _dcr(capsys, "provider", "list", "--store", root)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "PROVIDER",
        "DATASET",
        "VERSION",
        "PROTECTION",
        "EPSILON",
        "FILES",
        "RETIRED",
        "CREATED",
    ]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows["insurance"][:3] == ["acme", "insurance", _only_version(Store(root)).version]
    assert rows["insurance"][3:7] == ["provider-file", "-", "1", "no"]
    assert rows["claims"][3:8] == ["dp", "(mst)", "0.5", "1", "no"]


def test_list_of_missing_store_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Listing a store that does not exist is a clear error, not an empty table."""
    code, _, err = _dcr(capsys, "provider", "list", "--store", tmp_path / "nope")
    assert code != 0 and "does not exist" in err


def test_real_console_script(tmp_path: Path) -> None:
    """The installed `dcr` console script adds and lists a dataset."""
    root = tmp_path / "store"
    add = subprocess.run(
        [DCR_SCRIPT, *map(str, _add_args(root))], capture_output=True, text=True, check=False, timeout=120
    )
    assert add.returncode == 0, add.stderr
    assert "c.DCRPolicy.datasets" in add.stdout
    listed = subprocess.run(
        [DCR_SCRIPT, "provider", "list", "--store", str(root)], capture_output=True, text=True, check=True
    )
    assert _only_version(Store(root)).version in listed.stdout


# --------------------------------------------------------------------------------------------------------
# provider add: refusals change nothing
# --------------------------------------------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[Any], str]]:
    empty = tmp / "empty.csv"
    empty.write_bytes(b"")
    link = tmp / "link.csv"
    link.symlink_to(REAL)
    adir = tmp / "adir"
    adir.mkdir()
    hidden = tmp / ".hidden.csv"
    hidden.write_bytes(b"a,b\n")
    store = tmp / "store"
    loose_keys = tmp / "loose-keys"
    loose_keys.mkdir(mode=0o755)
    loose_keys.chmod(0o755)

    def args(real: Path = REAL, synthetic: Path = SYNTHETIC, *extra: Any) -> list[Any]:
        return _add_args(store, (real, synthetic), extra=extra)

    return {
        "missing real": (args(tmp / "missing.csv"), "does not exist"),
        "missing synthetic": (args(REAL, tmp / "missing.csv"), "does not exist"),
        "directory": (args(adir), "is a directory"),
        "symlink": (args(link), "symbolic link"),
        "symlink synthetic": (args(REAL, link), "symbolic link"),
        "empty": (args(empty), "is empty"),
        "bad file name": (args(hidden), "invalid dataset file name"),
        "synthetic is the real data": (args(REAL, REAL), "same content as the real file"),
        "over --max-bytes": (args(REAL, SYNTHETIC, "--max-bytes", 1000), "over the limit"),
        "bad provider": ([*args()[:5], "Acme!", *args()[6:]], "invalid provider name"),
        "bad dataset": ([*args()[:7], "../x", *args()[8:]], "invalid dataset name"),
        "mismatched pairs": ([*args(), "--real", SYNTHETIC], "1 --synthetic"),
        "duplicate names": ([*args(), "--real", REAL, "--synthetic", SYNTHETIC], "named 'real.csv'"),
        "bad chunk size": (args(REAL, SYNTHETIC, "--chunk-size", 10), "chunk size"),
        "bad enclave digest": (args(REAL, SYNTHETIC, "--enclave-digest", "sha256:xyz"), "--enclave-digest"),
        "dp without epsilon": (args(REAL, SYNTHETIC, "--protection", "dp"), "needs its ε"),
        "epsilon without dp": (args(REAL, SYNTHETIC, "--epsilon", "1"), "differentially private data only"),
        "unreadable hub key": (
            args(REAL, SYNTHETIC, "--hub-key", tmp / "nokey.pem"),
            "cannot read the hub key",
        ),
        "hub key not a key": (args(REAL, SYNTHETIC, "--hub-key", SYNTHETIC), "neither JSON nor PEM"),
        "keys dir open to others": (args(REAL, SYNTHETIC, "--keys", loose_keys), "accessible by others"),
    }


BAD_INPUT_CASES = [
    "missing real",
    "missing synthetic",
    "directory",
    "symlink",
    "symlink synthetic",
    "empty",
    "bad file name",
    "synthetic is the real data",
    "over --max-bytes",
    "bad provider",
    "bad dataset",
    "mismatched pairs",
    "duplicate names",
    "bad chunk size",
    "bad enclave digest",
    "dp without epsilon",
    "epsilon without dp",
    "unreadable hub key",
    "hub key not a key",
    "keys dir open to others",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_refused_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Each bad input exits non-zero with a clear `dcr: error:` message and leaves the store (which already
    holds a version, its keys and its condition) exactly as it was."""
    cases = _bad_inputs(tmp_path)
    assert sorted(cases) == sorted(BAD_INPUT_CASES)
    store = tmp_path / "store"
    other = tmp_path / "other-syn.csv"
    other.write_bytes(SYNTHETIC.read_bytes()[:1000])
    code, _, err = _dcr(capsys, *_add_args(store, (REAL, other)))
    assert code == 0, err
    before = _listing(store)
    args, message = cases[case]
    code, _, err = _dcr(capsys, *args)
    assert code != 0
    assert err.startswith("dcr: error:") and message in err, err
    assert _listing(store) == before


def test_synthetic_name_refusals_change_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--synthetic-name must be a plain file name (no path, not hidden, a dataset file name's characters)
    with the real file's suffix, one per --real, distinct; each refusal says which and what to do, and
    leaves the store (which holds a version already) exactly as it was."""
    store = tmp_path / "store"
    code, _, err = _dcr(capsys, *_add_args(store))
    assert code == 0, err
    before = _listing(store)
    second = tmp_path / "second.csv"
    second.write_bytes(REAL.read_bytes()[:3000])
    two = ("--real", second, "--synthetic", SYNTHETIC)
    cases = {
        ("sub/claims.csv",): "is a path, not a file name",
        ("../claims.csv",): "is a path, not a file name",
        (".claims.csv",): "is a hidden name",
        ("cl aims.csv",): "invalid dataset file name",
        ("claims.parquet",): "does not end in .csv like the real file real.csv",
        ("claims",): "does not end in .csv",
        ("a.csv", "b.csv"): "2 --synthetic-name for 1 --real files",
    }
    for names, message in cases.items():
        extra = [a for n in names for a in ("--synthetic-name", n)]
        code, _, err = _dcr(capsys, *_add_args(store, extra=tuple(extra)))
        assert code != 0 and err.startswith("dcr: error:") and message in err, (names, err)
        assert _listing(store) == before, names
    clash = ("--synthetic-name", "real.csv", "--synthetic-name", "real.csv")
    code, _, err = _dcr(capsys, *_add_args(store, extra=(*two, *clash)))
    assert code != 0 and "two files of the dataset would be named 'real.csv'" in err, err
    # One name for two files: which file it is for would be a guess.
    code, _, err = _dcr(capsys, *_add_args(store, extra=(*two, "--synthetic-name", "x.csv")))
    assert code != 0 and "2 --real files" in err
    assert _listing(store) == before


def test_synthetic_name_names_the_file_in_the_store_and_the_snippet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --synthetic-name the file is stored, listed in the manifest and printed in the hub snippet under
    the chosen name, and the real file decrypts under it; the real file's name is recorded nowhere. The
    printed snippet, with --description, loads into DCRPolicy as it is."""
    store = tmp_path / "store"
    extra = ("--synthetic-name", "claims.csv", "--description", "Insurance charges, 1,338 people")
    code, out, err = _dcr(capsys, *_add_args(store, extra=extra))
    assert code == 0, err
    manifest = _only_version(Store(store))
    assert [f.name for f in manifest.files] == ["claims.csv"]
    assert Store(store).synthetic_path(manifest, "claims.csv").read_bytes() == SYNTHETIC.read_bytes()
    keys = KeyDirectory(store / ".keys")
    assert _decrypted_digests(Store(store), manifest, keys, tmp_path / "plain") == {
        "claims.csv": "sha256:" + hashlib.sha256(REAL.read_bytes()).hexdigest()
    }
    vdir = Store(store).version_dir("acme", "insurance", manifest.version)
    assert all("real.csv" not in p.name for p in vdir.rglob("*"))
    assert "real.csv" not in (vdir / "manifest.json").read_text()
    section = out[out.index("# ---") : out.index("}\n\n") + 1]
    config = Config()
    exec(section, {"c": config})  # noqa: S102 -- what the admin pastes into jupyterhub_config.py
    entry = DCRPolicy(config=config).datasets["acme/insurance"]
    assert entry["synthetic"] == {"claims.csv": manifest.file("claims.csv").synthetic_sha256}
    assert entry["description"] == "Insurance charges, 1,338 people"
    assert entry["entitled"] == {"users": [], "groups": []}


def test_bad_input_into_a_new_store_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused add into a store that does not exist yet does not create it (nor a keys directory)."""
    code, _, err = _dcr(capsys, *_add_args(tmp_path / "store", (REAL, tmp_path / "missing.csv")))
    assert code != 0 and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_add_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of encrypting (after a first file is written) leaves no version directory, no
    temporary directory and no dataset directory behind."""
    second = tmp_path / "second.csv"
    second.write_bytes(REAL.read_bytes()[:3000])
    second_syn = tmp_path / "second-syn.csv"
    second_syn.write_bytes(SYNTHETIC.read_bytes()[:3000])
    real_encrypt = streamcrypt.encrypt_file
    calls = []

    def interrupted(*args: Any, **kwargs: Any) -> tuple[str, int]:
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encrypt(*args, **kwargs)

    monkeypatch.setattr(streamcrypt, "encrypt_file", interrupted)
    store = Store(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        store.add(
            "acme", "insurance", [(REAL, SYNTHETIC), (second, second_syn)], KeyDirectory(tmp_path / "keys")
        )
    assert len(calls) == 2
    assert not (tmp_path / "store" / "acme").exists()
    assert store.versions("acme", "insurance") == []


# --------------------------------------------------------------------------------------------------------
# Keys, manifests and conditions as models
# --------------------------------------------------------------------------------------------------------


def test_wrapped_key_is_bound_to_its_dataset_version(added: tuple[Path, str]) -> None:
    """A wrapped data key unwraps only for the provider, dataset and version it was wrapped for; a
    tampered wrapped key does not unwrap either."""
    root, _ = added
    keys = KeyDirectory(root / ".keys")
    m = _only_version(Store(root))
    key = m.key.to_json()
    assert len(keys.unwrap(key, "acme", "insurance", m.version)) == 32
    with pytest.raises(IntegrityError, match="does not unwrap"):
        keys.unwrap(key, "acme", "claims", m.version)
    with pytest.raises(IntegrityError, match="does not unwrap"):
        keys.unwrap(key, "acme", "insurance", "sha256:" + "1" * 64)
    raw = bytearray(key["wrapped_data_key"].encode())
    raw[5] = ord("A") if raw[5] != ord("A") else ord("B")
    with pytest.raises(IntegrityError):
        keys.unwrap({**key, "wrapped_data_key": raw.decode()}, "acme", "insurance", m.version)


def test_loose_kek_permissions_are_refused(added: tuple[Path, str]) -> None:
    """A KEK file that others can read is refused rather than used."""
    root, _ = added
    keys = KeyDirectory(root / ".keys")
    (kek,) = (root / ".keys" / "acme").glob("kek-*.key")
    kek.chmod(0o644)
    m = _only_version(Store(root))
    with pytest.raises(DCRError, match="readable by others"):
        keys.unwrap(m.key.to_json(), "acme", "insurance", m.version)


def test_kek_is_reused_per_provider(tmp_path: Path) -> None:
    """kek_for returns the same KEK on every call for a provider, and a different one for another."""
    keys = KeyDirectory(tmp_path / "keys")
    first = keys.kek_for("acme")
    assert keys.kek_for("acme") == first
    assert keys.kek_for("globex")[1] != first[1]
    with pytest.raises(DCRError, match="no key-encryption key"):
        keys.kek_for("initech", create=False)


def _manifest_doc(added: tuple[Path, str]) -> dict[str, Any]:
    root, _ = added
    return _only_version(Store(root)).to_json()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["files"][0].update(ciphertext="../../etc/passwd"), "files/0/ciphertext"),
        (lambda d: d["files"][0].update(synthetic="/etc/passwd"), "synthetic"),
        (lambda d: d["files"].append(dict(d["files"][0])), "twice"),
        (lambda d: d.update(provider="Acme"), "provider"),
        (lambda d: d["files"][0].update(name="../x"), "name"),
        (lambda d: d.update(extra=1), "Additional properties"),
        (lambda d: d["encryption"].update(scheme="rot13"), "scheme"),
        (lambda d: d["files"][0].update(ciphertext_size=5), "does not match"),
        (lambda d: d["protection"].update(kind="dp"), "ε"),
    ],
)
def test_manifest_invariants(added: tuple[Path, str], change: Any, message: str) -> None:
    """from_json refuses manifests that break the schema or the invariants it cannot express (paths
    leaving the version directory, duplicate names, sizes that contradict the chunking)."""
    doc = _manifest_doc(added)
    assert DatasetVersion.from_json(doc).to_json() == doc
    change(doc)
    with pytest.raises(DCRError, match=message):
        DatasetVersion.from_json(doc)


@pytest.mark.parametrize("path", ["../real.csv", "real/../../x", "/etc/passwd", "real//x", "real/./x", ""])
def test_manifest_paths_stay_inside_the_version_directory(added: tuple[Path, str], path: str) -> None:
    """The typed model itself (not only the schema) refuses file paths that are absolute, empty or have
    empty, '.' or '..' components."""
    f = _only_version(Store(added[0])).files[0]
    with pytest.raises(DCRError, match="not a plain relative path"):
        dataclasses.replace(f, ciphertext=path)
    with pytest.raises(DCRError, match="not a plain relative path"):
        dataclasses.replace(f, synthetic=path)


def test_store_refuses_a_manifest_in_the_wrong_place(added: tuple[Path, str]) -> None:
    """A manifest copied into another dataset's directory is refused when loaded from there."""
    root, _ = added
    store = Store(root)
    m = _only_version(store)
    target = store.version_dir("acme", "claims", m.version)
    target.mkdir(parents=True)
    (target / "manifest.json").write_bytes(m.dumps())
    with pytest.raises(IntegrityError, match="not acme/claims"):
        store.load("acme", "claims", m.version)


def test_condition_model_round_trips_and_refuses_unsafe_platforms() -> None:
    """Conditions round-trip through JSON with a stable digest; confidential_space defaults pin the
    hardware claims; a cloud condition accepting the simulation or debug images is refused."""
    digest = "sha256:" + "a" * 64
    cs = PlatformCondition.defaults(
        "confidential_space", project_id="dcr-enclaves", service_accounts=["e@x.iam"]
    )
    cond = KeyReleaseCondition("acme", "insurance", (digest,), cs, (digest,), (digest,), None)
    doc = cond.to_json()
    assert doc["platform"]["hwmodel"] == ["GCP_AMD_SEV", "GCP_INTEL_TDX"]
    assert doc["platform"]["dbgstat"] == ["disabled-since-boot"] and doc["platform"]["secboot"] is True
    assert doc["platform"]["support_attributes"] == ["STABLE"]
    again = KeyReleaseCondition.from_json(json.dumps(doc))
    assert again == cond and again.digest == cond.digest
    assert cs.missing() == []
    with pytest.raises(DCRError, match="local simulation"):
        PlatformCondition(
            "confidential_space", ("LOCAL_SIMULATED",), ("CONFIDENTIAL_SPACE",), ("disabled-since-boot",)
        )
    with pytest.raises(DCRError, match="debug"):
        PlatformCondition("confidential_space", ("GCP_AMD_SEV",), ("CONFIDENTIAL_SPACE",), ("enabled",))
    with pytest.raises(DCRError, match="at least one"):
        KeyReleaseCondition("acme", "insurance", (digest,), cs, (), (digest,))
    with pytest.raises(DCRError, match="key-release condition is invalid"):
        KeyReleaseCondition.from_json({**doc, "extra": True})
