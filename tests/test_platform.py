"""The enclave platform as the hub sees it (``dcr_spawner.platform``): what every server a DCR spawner starts
is told, what the hub checks at start, and the ``dcr hub-key`` command that comes before everything."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from hub_harness import INSURANCE_REAL, INSURANCE_SYNTHETIC, dataset_entry, register_dataset
from traitlets import TraitError
from traitlets.config import Config

from dcr_enclave.commands.main import main as cli_main
from dcr_enclave.formats.errors import DCRError
from dcr_server_ext.app import DCRExtension
from dcr_spawner import DCRPolicy
from dcr_spawner.hubkey import load_or_create_hub_key
from dcr_spawner.platform import EnclavePlatform, LocalEnclaveHost, make_server_args

DIGEST = "sha256:" + "ab" * 32


def test_server_args_are_literal_command_line_settings() -> None:
    """Strings as they are, everything else as JSON, sorted by section and trait."""
    args = make_server_args(
        {
            "LocalBackend": {"socket_path": "/run/dcr/a b.sock"},
            "DCRExtension": {"trust_jwks": ["/x", "/y z"], "trust_roots": [], "n": 2},
            "ServerApp": {"terminado_settings": {"shell_command": "/bin/bash"}},
        }
    )
    assert args == [
        "--DCRExtension.n=2",
        "--DCRExtension.trust_jwks=/x",
        "--DCRExtension.trust_jwks=/y z",
        "--DCRExtension.trust_roots=[]",
        "--LocalBackend.socket_path=/run/dcr/a b.sock",
        "--ServerApp.terminado_settings=shell_command=/bin/bash",
    ]


def test_the_local_host_tells_servers_the_hub_grants_its_socket_and_anchors() -> None:
    """The local platform's server settings: the hub's grant service (never the development one), the
    local backend at the configured socket, the pinned anchors and digests; the paths servers must read."""
    c = Config()
    c.LocalEnclaveHost.socket_path = "/run/dcr-test/host.sock"
    c.LocalEnclaveHost.trust_jwks = ["/var/lib/dcr/enclave-host/public/jwks.json", "sha256:" + "cd" * 32]
    c.LocalEnclaveHost.enclave_digests = [DIGEST]
    platform = DCRPolicy(config=c).platform()
    assert isinstance(platform, LocalEnclaveHost)
    assert platform.server_config() == {
        "DCRExtension": {
            "grant_source_class": "dcr_server_ext.grant_sources.HubGrantSource",
            "backend_class": "dcr_server_ext.backends.local.LocalBackend",
            "trust_jwks": ["/var/lib/dcr/enclave-host/public/jwks.json", "sha256:" + "cd" * 32],
            "trust_roots": [],
            "enclave_digests": [DIGEST],
        },
        "LocalBackend": {"socket_path": "/run/dcr-test/host.sock"},
    }
    assert platform.server_paths() == ["/run/dcr-test", "/var/lib/dcr/enclave-host/public"]


def test_a_server_reads_the_settings_back_as_given(tmp_path: Path) -> None:
    """What make_server_args writes, a Jupyter server's command line reads back to the same values."""
    from jupyter_server.serverapp import ServerApp

    from dcr_enclave.formats.jwk import jwks
    from dcr_enclave.pack.signing_keys import generate_key

    anchors = [tmp_path / "one.json", tmp_path / "two.json"]
    for a in anchors:
        a.write_text(json.dumps(jwks(generate_key("ES256"))))
    config = LocalEnclaveHost(
        socket_path=str(tmp_path / "a b.sock"), trust_jwks=[str(a) for a in anchors], enclave_digests=[DIGEST]
    ).server_config()
    config["ServerApp"] = {"terminado_settings": {"shell_command": "/bin/sh"}}
    app = ServerApp()
    app.parse_command_line(make_server_args(config))
    assert app.terminado_settings == {"shell_command": "/bin/sh"}
    ext = DCRExtension(config=app.config)
    assert ext.grant_source_class.__name__ == "HubGrantSource"
    assert ext.backend_class.__name__ == "LocalBackend"
    assert ext.trust_jwks == [str(a) for a in anchors]
    assert ext.enclave_digests == [DIGEST] and ext.trust_roots == []
    from dcr_server_ext.backends.local import LocalBackend

    assert LocalBackend(config=app.config).socket_path == str(tmp_path / "a b.sock")


@pytest.mark.parametrize(
    ("trait", "value", "words"),
    [
        ("socket_path", "run/host.sock", "not an absolute path"),
        ("enclave_digests", ["sha256:short"], "LocalEnclaveHost.enclave_digests"),
        ("trust_jwks", ["jwks.json"], "not an absolute path"),
        ("trust_roots", ["sha256:" + "ab" * 32], "not an absolute path"),
    ],
)
def test_bad_settings_are_refused_naming_the_trait(trait: str, value: object, words: str) -> None:
    with pytest.raises(TraitError, match=words):
        LocalEnclaveHost(**{trait: value})


def test_anchors_the_servers_cannot_read_stop_the_hub(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pinned JWKS a server's account could not read would stop every server: the hub refuses at start,
    naming the trait and the file; empty pins are allowed with a warning each."""
    public = tmp_path / "public"
    public.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    jwks = public / "jwks.json"
    jwks.write_text("{}")
    jwks.chmod(0o600)
    host = LocalEnclaveHost(socket_path=str(tmp_path / "host.sock"), trust_jwks=[str(jwks)])
    with pytest.raises(DCRError, match=r"c\.LocalEnclaveHost\.trust_jwks: .*jwks\.json is mode 0600"):
        host.check_at_start()
    caplog.set_level(logging.WARNING)
    empty = LocalEnclaveHost(socket_path=str(tmp_path / "host.sock"))
    empty.check_at_start()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "trust_jwks is empty" in warned and "enclave_digests is empty" in warned
    assert "no enclave host listens" in warned


def test_a_condition_pinned_to_another_hub_key_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset registered without --hub-key pins the local development key: at start the hub names the
    dataset, both thumbprints and the fix; one registered with this hub's key is not mentioned."""
    store = tmp_path / "store"
    hub = load_or_create_hub_key(tmp_path / "hub" / "key.pem")
    public = tmp_path / "hub.jwks"
    public.write_text(json.dumps(hub.jwks()))
    dev = register_dataset(store, "acme", "insurance", [(INSURANCE_REAL, INSURANCE_SYNTHETIC)])
    ours = register_dataset(
        store, "acme", "claims", [(INSURANCE_REAL, INSURANCE_SYNTHETIC)], "--hub-key", str(public)
    )
    policy = DCRPolicy(
        datasets={
            "acme/insurance": dataset_entry(dev, store, users=["a"]),
            "acme/claims": dataset_entry(ours, store, users=["a"]),
        }
    )
    caplog.set_level(logging.ERROR)
    policy.platform().check_datasets(policy, hub.thumbprint)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("DCR: acme/insurance: the provider's key-release condition accepts grants")
    assert hub.thumbprint in errors[0] and "local development key" in errors[0]
    assert "--hub-key hub.jwks" in errors[0]
    assert errors[0] in capsys.readouterr().err


def test_the_base_platform_knows_no_ends_and_checks_no_conditions() -> None:
    platform = EnclavePlatform()
    assert platform.ended(["g1"]) == set()
    assert platform.server_config()["DCRExtension"]["grant_source_class"].endswith("HubGrantSource")


def test_hub_key_is_made_once_before_the_hub_and_its_public_half_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dcr hub-key` creates the key owner-only, writes the public JWKS 0644 (what providers and the enclave
    host pin), keeps an existing key, and refuses a key file others can read, changing nothing."""
    key, public = tmp_path / "hub" / "dcr-hub-key.pem", tmp_path / "pub" / "hub.jwks"
    assert cli_main(["hub-key", str(key), "--public", str(public)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    first = json.loads(public.read_text())
    assert first == load_or_create_hub_key(key).jwks()
    assert cli_main(["hub-key", str(key)]) == 0  # kept, printed
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1]) == first
    key.chmod(0o644)
    before = public.read_bytes()
    assert cli_main(["hub-key", str(key), "--public", str(public)]) == 2
    assert "readable by others" in capsys.readouterr().err
    assert public.read_bytes() == before
