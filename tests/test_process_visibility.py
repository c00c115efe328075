"""Reading /proc's hidepid setting from mountinfo, and the refusal ``dcr enclave-host`` builds on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.platform import process_visibility as pv

PLAIN = "22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
HIDDEN = "22 27 0:21 / /proc rw,relatime - proc proc rw,hidepid=invisible\n"
OTHERS = (
    "27 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "23 22 0:22 / /proc/sys/fs/binfmt_misc rw,relatime shared:13 - autofs systemd-1 rw,fd=30\n"
)


@pytest.mark.parametrize(
    ("text", "value", "hidden"),
    [
        (OTHERS + PLAIN, None, False),
        (OTHERS + HIDDEN, "invisible", True),
        ("22 27 0:21 / /proc rw - proc proc rw,hidepid=2,gid=4\n", "2", True),
        ("22 27 0:21 / /proc rw - proc proc rw,hidepid=ptraceable\n", "ptraceable", True),
        # noaccess still lists every pid (how many processes run, when they start and end): not enough.
        ("22 27 0:21 / /proc rw - proc proc rw,hidepid=noaccess\n", "noaccess", False),
        ("22 27 0:21 / /proc rw - proc proc rw,hidepid=1\n", "1", False),
        # Mounted twice: the last one is on top and is what everyone sees.
        (HIDDEN + PLAIN, None, False),
        (PLAIN + HIDDEN, "invisible", True),
        # A hidepid below /proc or on another file system does not count.
        ("23 22 0:22 / /proc/x rw - proc proc rw,hidepid=invisible\n" + PLAIN, None, False),
        ("", None, False),
    ],
)
def test_hidepid_of_the_proc_mount(text: str, value: str | None, hidden: bool) -> None:
    assert pv.proc_hidepid(text) == value
    assert pv.processes_hidden(text) is hidden


def test_check_refuses_a_visible_proc_naming_the_fix_unless_allowed(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(OTHERS + PLAIN)
    with pytest.raises(DCRError) as e:
        pv.check(False, str(info))
    assert "hidepid=off" in str(e.value) and "refusing to start" in str(e.value)
    assert "mount -o remount,hidepid=invisible /proc" in str(e.value) and "/etc/fstab" in str(e.value)
    warning = pv.check(True, str(info))
    assert warning is not None and warning.startswith("WARNING:") and "--allow-visible-processes" in warning
    info.write_text(OTHERS + HIDDEN)
    assert pv.check(False, str(info)) is None


@pytest.mark.root
@pytest.mark.parametrize("hidepid", ["off", "invisible"])
def test_enclave_host_refuses_to_start_on_a_proc_that_shows_every_process(
    tmp_path: Path, hidepid: str
) -> None:
    """``dcr enclave-host`` on a /proc without hidepid stops before it writes anything, naming the fix; on
    one with hidepid=invisible it gets past the check (here to the next refusal: the store does not exist).
    Each run gets a /proc of its own in a private mount namespace: the host's stays as it is."""
    state = tmp_path / "state"
    options = "" if hidepid == "off" else "-o hidepid=invisible "
    cmd = (
        f'mount -t proc {options}proc /proc && exec "$0" -m dcr_enclave enclave-host --store "$1" '
        f'--hub-key "$2" --state "$3" --socket "$4"'
    )
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd, sys.executable,
         str(tmp_path / "no-store"), str(tmp_path / "hub.pem"), str(state), str(tmp_path / "host.sock")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    if hidepid == "off":
        assert "hidepid=off" in r.stderr and "refusing to start" in r.stderr, r.stderr
        assert "hidepid=invisible" in r.stderr and "--allow-visible-processes" in r.stderr
    else:
        assert "hidepid" not in r.stderr, r.stderr
    assert not state.exists() and not (tmp_path / "host.sock").exists()
