"""``docs/install.md``, followed as written: an admin's first real install, end to end.

The test reads the guide and does what it says, in its order:

- every ``bash`` block runs as it is in ``bash -euo pipefail`` (the ``sh`` blocks need a real systemd, the
  network or a host-wide ``/proc`` change, and are not run);
- the ``python`` block is written as ``/etc/dcr/jupyterhub_config.py``, with the two values the guide says
  to paste (the version ``dcr provider add`` printed, the digest ``dcr enclave-host --print-measurement``
  printed) filled in from those commands' output;
- the shipped systemd units (``deploy/systemd/``) pass ``systemd-analyze verify``, and both services are
  started with their units' own ``ExecStart``, working directory, ``PATH``, umask and runtime directory.

What differs from a real machine, and only that: every path of the guide lives under a scratch directory
(``/opt/dcr/venv`` is this checkout's virtualenv); the hub's ports are free loopback ports; the login is
JupyterHub's DummyAuthenticator (there is no identity provider here), the researchers' accounts get a
unique prefix and a scratch home base, and the proxy is this checkout's configurable-http-proxy; the test's admin
API token is a JupyterHub service; the enclave host is told ``--allow-visible-processes`` where this machine's ``/proc`` is not ``hidepid=invisible``
(the guide's ``sh`` step the test cannot take). These lines are appended to the guide's configuration, which
is otherwise unchanged.

Then two researchers use it: alice (entitled through a group) submits a notebook that reads the real file,
the job succeeds and her receipt verifies with ``dcr verify`` against the anchors the guide pins; bob's
submission is refused with a message naming the dataset. The enclave host logged the job's events and
removes its socket when stopped.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_harness import PASSWORD, REPO, Hub, chp_command, delete_account, free_port

from dcr_enclave.pack.store import Store
from dcr_enclave.platform.process_visibility import hidden_here
from dcr_spawner.hubdb import HubDB
from dcr_spawner.platform import LocalEnclaveHost

GUIDE = REPO / "docs" / "install.md"
UNITS = REPO / "deploy" / "systemd"
VENV = Path(sys.prefix)
#: The guide's roots, moved under the scratch directory (the virtualenv: to this checkout's).
ROOTS = ("/opt/dcr/venv", "/etc/dcr", "/var/lib/dcr", "/srv/dcr", "/run/dcr")
SHARED = REPO.parent / "shared" / "data" / "insurance"


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced code block, in order."""
    return [
        (m["lang"], m["body"])
        for m in re.finditer(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", text, re.M | re.S)
    ]


class Relocation:
    def __init__(self, base: Path) -> None:
        self.map = {root: str(VENV) if root == "/opt/dcr/venv" else f"{base}{root}" for root in ROOTS}

    def __call__(self, text: str) -> str:
        for root, new in self.map.items():
            text = text.replace(root, new)
        return text

    def path(self, p: str) -> Path:
        return Path(self(p))


def unit_settings(text: str) -> dict[str, str]:
    """``key -> value`` of a unit file's [Service] section (the keys the test uses occur once)."""
    service = text.split("[Service]", 1)[1].split("\n[", 1)[0]
    out = {}
    for line in service.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


class GuideHub(Hub):
    """The hub as the guide's unit starts it, with the guide's configuration (plus the test's lines)."""

    def __init__(self, workdir: Path, config: str, unit: dict[str, str], extra: str) -> None:
        super().__init__(workdir)
        self.config_file = Path(shlex.split(unit["ExecStart"])[-1])
        self.guide_config = config
        self.unit = unit
        self.test_lines = extra

    def write_config(self) -> None:
        self.config_file.write_text(self.guide_config + "\n# --- the test's lines ---\n" + self.test_lines)

    def launch(self) -> None:
        self.write_config()
        path = self.unit["Environment"].removeprefix("PATH=")
        env = {"PATH": f"{Path(chp_command()).parent}{os.pathsep}{path}", "LANG": "C.UTF-8"}
        log = open(self.log_file, "wb")  # noqa: SIM115 - handed to the child and closed below
        try:
            self.proc = subprocess.Popen(
                shlex.split(self.unit["ExecStart"]),
                cwd=self.unit["WorkingDirectory"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: os.umask(int(self.unit["UMask"], 8)),
            )
        finally:
            log.close()


@pytest.fixture
def install(tmp_path: Path) -> Iterator[dict[str, object]]:
    base = tmp_path / "machine"
    base.mkdir()
    move = Relocation(base)
    guide = blocks(GUIDE.read_text())
    ran: list[str] = []
    outputs: dict[str, str] = {}
    prefix = f"di{secrets.token_hex(3)}-"
    host: subprocess.Popen[bytes] | None = None
    hub: GuideHub | None = None
    try:
        # Everything the guide has the admin type, in its order.
        for lang, body in guide:
            if lang == "bash":
                if "provider add" in body:  # the provider's files, where the guide says they wait
                    shutil.copy(SHARED / "real.csv", move.path("/srv/dcr/incoming/insurance.csv"))
                    shutil.copy(
                        SHARED / "synthetic_mst.csv", move.path("/srv/dcr/incoming/insurance-synthetic.csv")
                    )
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", move(body)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert done.returncode == 0, f"{body}\n{done.stdout}\n{done.stderr}"
                outputs[body] = done.stdout
                ran.append(body)
            elif lang == "python":
                assert body.startswith("# /etc/dcr/jupyterhub_config.py\n")
                config_text = body
                move.path("/etc/dcr/jupyterhub_config.py").write_text("")  # the next block chmods it
        assert len(ran) == 5, ran

        # The two values the guide says to paste.
        (version,) = [m.version for m in Store(move.path("/srv/dcr/store")).versions("acme", "insurance")]
        (digest_out,) = [out for body, out in outputs.items() if "--print-measurement" in body]
        digest = digest_out.strip().splitlines()[-1]
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest_out
        config_text = config_text.replace("sha256:(the version dcr provider add printed)", version)
        config_text = config_text.replace(
            "sha256:(the digest dcr enclave-host --print-measurement printed)", digest
        )
        ports = {"8000": free_port(), "8081": free_port(), "8001": free_port()}
        for old, new in ports.items():
            config_text = config_text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        config_text = move(config_text)

        # The units: valid for systemd, then started as systemd would.
        units = {}
        for unit in sorted(UNITS.glob("*.service")):
            moved = tmp_path / "units" / unit.name
            moved.parent.mkdir(exist_ok=True)
            moved.write_text(move(unit.read_text()))
            check = subprocess.run(["systemd-analyze", "verify", str(moved)], capture_output=True, text=True)
            assert check.returncode == 0 and check.stderr == "", check.stderr
            units[unit.stem] = unit_settings(moved.read_text())
        assert set(units) == {"dcr-enclave-host", "dcr-hub"}

        host_unit = units["dcr-enclave-host"]
        run_dir = move.path("/run/dcr")
        run_dir.mkdir(mode=int(host_unit["RuntimeDirectoryMode"], 8), parents=True, exist_ok=True)
        host_log = tmp_path / "enclave-host.log"
        with open(host_log, "wb") as log:
            host = subprocess.Popen(
                [
                    *shlex.split(host_unit["ExecStart"]),
                    *([] if hidden_here() else ["--allow-visible-processes"]),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
                preexec_fn=lambda: os.umask(int(host_unit["UMask"], 8)),
            )
        socket_path = run_dir / "enclave-host.sock"
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            assert host.poll() is None, host_log.read_text()
            assert time.monotonic() < deadline, host_log.read_text()
            time.sleep(0.1)
        published = move.path("/var/lib/dcr/enclave-host/public/image-digest").read_text().strip()
        assert published == digest  # what the host runs is what the guide had the admin pin

        test_lines = "\n".join(
            [
                'c.JupyterHub.authenticator_class = "dummy"',
                f"c.DummyAuthenticator.password = {PASSWORD!r}",
                f"c.ConfigurableHTTPProxy.command = [{chp_command()!r}]",
                f"c.DCRLocalSpawner.account_prefix = {prefix!r}",
                f"c.DCRLocalSpawner.home_base = {str(base / 'home')!r}",
                "c.Spawner.http_timeout = 120",
            ]
        )
        hub = GuideHub(move.path("/var/lib/dcr/hub"), config_text, units["dcr-hub"], test_lines)
        # The harness's admin service (a token the test uses to make the researchers' API tokens).
        hub.test_lines += "\n" + "\n".join(
            line
            for line in hub.base_config().splitlines()
            if line.startswith(("c.JupyterHub.services", "c.JupyterHub.load_roles"))
        )
        hub.port, hub.hub_port, hub.proxy_api_port = ports["8000"], ports["8081"], ports["8001"]
        hub.start()
        yield {
            "hub": hub,
            "move": move,
            "digest": digest,
            "host": host,
            "host_log": host_log,
            "socket": socket_path,
            "prefix": prefix,
        }
    finally:
        if hub is not None:
            hub.stop()
        if host is not None and host.poll() is None:
            host.send_signal(signal.SIGTERM)
            host.wait(30)
        for line in Path("/etc/passwd").read_text().splitlines():
            if line.startswith(prefix):
                delete_account(line.split(":", 1)[0])


#: A notebook that reads the dataset's file and records how many rows it saw and the file's digest.
def _cells(path: str) -> list[str]:
    return [
        "import hashlib, pandas as pd\n"
        f"df = pd.read_csv({path!r})\n"
        f"digest = hashlib.sha256(open({path!r}, 'rb').read()).hexdigest()\n"
        "open('rows.txt', 'w').write(f'{len(df)} {digest}')"
    ]


def test_the_install_guide_brings_up_a_working_hub(install: dict[str, object]) -> None:
    hub = install["hub"]
    assert isinstance(hub, GuideHub)
    move = install["move"]
    assert isinstance(move, Relocation)
    data = "/data/acme/insurance/insurance.csv"

    # alice, entitled through her group, runs a notebook on the real file; her server was told nothing.
    alice = hub.new_token("alice")
    hub.spawn("alice", session=hub.login("alice"))
    hub.put_notebook("alice", "analysis.ipynb", _cells(data), token=alice)
    r = hub.server_api("alice", "POST", "dcr/api/jobs", token=alice, json_body={"path": "analysis.ipynb"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 180
    while True:
        job = hub.server_api("alice", "GET", f"dcr/api/jobs/{job_id}", token=alice).json()
        if job["state"] in ("succeeded", "failed", "cancelled", "held", "released", "rejected"):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "succeeded", job
    real = (SHARED / "real.csv").read_bytes()
    r = hub.server_api(
        "alice", "GET", f"api/contents/dcr-jobs/{job_id}/outputs/rows.txt?content=1", token=alice
    )
    rows, digest = r.json()["content"].split()
    assert int(rows) == len(real.splitlines()) - 1  # every real row, header aside
    assert digest == hashlib.sha256(real).hexdigest()  # the real file, not the synthetic one

    # Her receipt verifies offline with exactly the anchors the guide pins, and in her server too.
    r = hub.server_api("alice", "GET", f"dcr/api/jobs/{job_id}/verify", token=alice)
    verdict = r.json()
    assert r.status_code == 200 and verdict["verified"] is True, r.text
    assert all(c["passed"] for c in verdict["checks"]), verdict
    home = Path(hub.server_env("alice")["HOME"])
    verify = subprocess.run(
        [
            str(VENV / "bin" / "dcr"), "verify", str(home / "dcr-jobs" / job_id),
            "--trust", str(move.path("/var/lib/dcr/enclave-host/public/jwks.json")),
            "--enclave-digest", str(install["digest"]),
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # bob is not entitled: refused, naming the dataset.
    bob = hub.new_token("bob")
    hub.spawn("bob", session=hub.login("bob"))
    hub.put_notebook("bob", "analysis.ipynb", _cells(data), token=bob)
    r = hub.server_api(
        "bob",
        "POST",
        "dcr/api/jobs",
        token=bob,
        json_body={"path": "analysis.ipynb", "datasets": ["acme/insurance"]},
    )
    assert r.status_code == 403, r.text
    assert "acme/insurance" in r.json()["error"], r.text

    # The hub can tell that alice's job ended (her concurrency slot is free at once).
    records = HubDB("sqlite:///" + str(move.path("/var/lib/dcr/hub/dcr-hub.sqlite")))
    granted = records.job(job_id)
    records.dispose()
    assert granted is not None and granted.user == "alice"
    platform = LocalEnclaveHost(socket_path=str(install["socket"]))
    assert platform.ended([granted.grant_id, "never-launched"]) == {granted.grant_id}

    # The enclave host logged the job's events, and removes its socket when it stops.
    host = install["host"]
    assert isinstance(host, subprocess.Popen)
    host.send_signal(signal.SIGTERM)
    host.wait(30)
    log = Path(str(install["host_log"])).read_text()
    events = re.findall(rf"job={job_id} event=(\w+)", log)
    assert events[0] == "launch" and events[-1] == "end" and "key_released" in events, log
    assert not Path(str(install["socket"])).exists()
