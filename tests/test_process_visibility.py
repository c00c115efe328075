"""Reading /proc's hidepid setting from mountinfo, and the refusal ``dcr enclave-host`` builds on it."""

from __future__ import annotations

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
