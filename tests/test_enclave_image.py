"""The enclave image's Dockerfile, checked against the launch contract (the image is not built here).

The launch-policy labels must be exactly what :data:`dcr_enclave.formats.contract.LAUNCH_POLICY_LABELS` says
(the operator may set the contract's launch variables and nothing else; logs only on debug images; the
capability the kernel sandbox needs), the base pinned by digest, every Python package installed from the
hash-locked ``image-requirements.txt`` at the versions the tests run, a fixed non-root kernel account, the
supervisor as the entry point, and none of the test-only ``DCR_CLOUD_*`` variables set by the image.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import pytest

from dcr_enclave.formats import contract

ENCLAVE = Path(__file__).resolve().parents[1] / "enclave"
DOCKERFILE = ENCLAVE / "Dockerfile"
LOCK = ENCLAVE / "image-requirements.txt"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def labels(instrs: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for word, rest in instrs:
        if word == "LABEL":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                assert key not in found, f"label {key} set twice"
                found[key] = value
    return found


@pytest.fixture(scope="module")
def instrs() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _args(instrs: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for w, rest in instrs if w == word]


def test_launch_policy_labels_are_the_contracts(instrs: list[tuple[str, str]]) -> None:
    tee = {k: v for k, v in labels(instrs).items() if k.startswith("tee.")}
    assert tee == contract.LAUNCH_POLICY_LABELS
    assert tee["tee.launch_policy.allow_env_override"].split(",") == list(contract.LAUNCH_ENV_NAMES)
    assert tee["tee.launch_policy.log_redirect"] == "debugonly"
    # What the operator may never do: override the command (the supervisor's namespace marker is an
    # argument), mount host paths, or get the cgroup namespace.
    for forbidden in ("allow_cmd_override", "allow_mount_destinations", "allow_cgroups"):
        assert f"tee.launch_policy.{forbidden}" not in tee


def test_the_base_is_pinned_by_digest_and_is_the_locks_python(instrs: list[tuple[str, str]]) -> None:
    bases = _args(instrs, "FROM")
    assert len(bases) == 1
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", bases[0])


def test_python_packages_come_only_from_the_hash_lock(instrs: list[tuple[str, str]]) -> None:
    runs = [r for r in _args(instrs, "RUN") if "pip install" in r]
    assert runs
    locked = [r for r in runs if "--require-hashes" in r]
    assert len(locked) == 1 and "-r /tmp/image-requirements.txt" in locked[0]
    assert "--only-binary=:all:" in locked[0] and "--no-deps" in locked[0]
    assert "image-requirements.txt /tmp/image-requirements.txt" in " ".join(_args(instrs, "COPY"))
    # The one other install is the enclave package from this tree: no index, no dependencies.
    for r in runs:
        if r not in locked:
            assert "--no-index" in r and "--no-deps" in r and "/src/enclave" in r.split()


def _lock() -> dict[str, str]:
    text = LOCK.read_text()
    body = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
    pins: dict[str, str] = {}
    for line in filter(None, (x.strip() for x in body.splitlines())):
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)( +--hash=sha256:[0-9a-f]{64})+", line)
        assert m, f"not a pinned, hashed requirement: {line!r}"
        pins[m[1].lower().replace("_", "-")] = m[2]
    return pins


def test_the_lock_pins_the_tested_versions_of_the_enclave_and_kernel_environment() -> None:
    pins = _lock()
    for name in (
        # the enclave's own dependencies and its runtime and gcp extras
        *("cryptography", "pyjwt", "jsonschema", "nbformat"),
        *("nbclient", "jupyter-client", "ipykernel", "cel-expr-python", "pyseccomp"),
        *("google-auth", "google-cloud-storage", "google-cloud-kms", "google-crc32c"),
        # the kernel's analysis packages, as in the single-user environment
        *("numpy", "pandas", "matplotlib"),
    ):
        assert name in pins, f"{name} is not in the image's lock"
    requires = importlib.metadata.requires("jupyterhub-dcr-enclave") or []
    for req in requires:
        name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"the enclave requires {name}, which the lock lacks"
    drift = {
        name: (version, importlib.metadata.version(name))
        for name, version in pins.items()
        if name not in ("setuptools", "wheel") and importlib.metadata.version(name) != version
    }
    assert not drift, f"the lock is not the tested environment (lock, venv): {drift}"


def test_a_fixed_non_root_kernel_account_and_the_supervisor_as_entry_point(
    instrs: list[tuple[str, str]],
) -> None:
    runs = " ".join(_args(instrs, "RUN"))
    uid, gid = contract.CLOUD_KERNEL_UID, contract.CLOUD_KERNEL_GID
    assert uid >= 1000 and gid >= 1000
    assert f"useradd --system --uid {uid} --gid {gid}" in runs
    assert f"groupadd --system --gid {gid}" in runs
    assert "--shell /usr/sbin/nologin" in runs
    # The supervisor needs the container's root (its tmpfs, bubblewrap); the kernel never runs as it.
    assert _args(instrs, "USER") == []
    assert [json.loads(e) for e in _args(instrs, "ENTRYPOINT")] == [["python", "-m", "dcr_enclave.cloud"]]
    assert _args(instrs, "CMD") == []


def test_the_image_sets_no_dcr_variable(instrs: list[tuple[str, str]]) -> None:
    """The test-only DCR_CLOUD_* names take their defaults in production, and the launch variables come from
    the operator (attested): the image sets none of them."""
    env_text = " ".join(_args(instrs, "ENV")) + " " + " ".join(_args(instrs, "ARG"))
    assert "DCR_" not in env_text


def test_bubblewrap_and_seccomp_are_installed(instrs: list[tuple[str, str]]) -> None:
    runs = " ".join(_args(instrs, "RUN"))
    assert re.search(r"apt-get install [^&]*\bbubblewrap\b[^&]*\blibseccomp2\b", runs)
