"""Whether other accounts on this machine can watch the enclave's processes through ``/proc``.

A notebook chooses its kernel's process title (``prctl``, ``argv`` of anything it starts) and how much CPU and
memory it uses over time; on a ``/proc`` mounted without ``hidepid`` every account on the machine reads those
of every process, live. Researchers' servers started by DCR's local spawner have a ``/proc`` of their own (a
PID namespace per server) and the enclave's kernel one of its own too, so neither sees the other; what
remains is any other account of the machine, which sees the host's ``/proc``. Only root can close that, for
the whole machine: ``hidepid=invisible`` makes every process invisible to other accounts (root still sees
all). :func:`check` makes ``dcr enclave-host`` refuse to start without it, unless the operator states that
no untrusted account can log in to this machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from dcr_enclave.formats.errors import DCRError

MOUNTINFO: Final = "/proc/self/mountinfo"
#: ``hidepid`` values that hide other accounts' processes entirely (``noaccess``/1 still lists their pids).
HIDING: Final = frozenset({"invisible", "2", "ptraceable", "4"})
HOW_TO: Final = (
    "mount -o remount,hidepid=invisible /proc, and make it permanent with the line "
    "'proc /proc proc defaults,hidepid=invisible 0 0' in /etc/fstab (docs/sandbox.md); or, where no untrusted "
    "account can log in to this machine, start with --allow-visible-processes"
)


def proc_hidepid(mountinfo: str) -> str | None:
    """The ``hidepid`` option of the file system mounted at ``/proc`` (the last one: it is on top), if any.

    ``mountinfo`` is the text of ``/proc/self/mountinfo``: ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... -
    FSTYPE SOURCE SUPEROPTS`` per line.
    """
    found: str | None = None
    on_proc = False
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or fields[4] != "/proc":
            continue
        on_proc = True
        found = None
        if tail[0] == "proc":
            for opt in tail[2].split(","):
                key, _, value = opt.partition("=")
                if key == "hidepid":
                    found = value
    return found if on_proc else None


def processes_hidden(mountinfo: str) -> bool:
    """True when ``/proc`` hides every process from the accounts that do not own it."""
    return proc_hidepid(mountinfo) in HIDING


def hidden_here(mountinfo_path: str = MOUNTINFO) -> bool:
    """:func:`processes_hidden` for this process's ``/proc``."""
    return processes_hidden(Path(mountinfo_path).read_text())


def check(allow_visible: bool, mountinfo_path: str = MOUNTINFO) -> str | None:
    """Refuse to run enclave jobs on a machine whose ``/proc`` shows them to every account.

    Returns a warning to log when ``allow_visible`` lets it pass anyway, ``None`` when ``/proc`` hides them.
    """
    text = Path(mountinfo_path).read_text()
    if processes_hidden(text):
        return None
    what = (
        f"/proc on this machine is mounted with hidepid={proc_hidepid(text) or 'off'}: every account can read the "
        "process titles, CPU time and memory of the enclave's processes while a job runs"
    )
    if not allow_visible:
        raise DCRError(f"{what}; refusing to start", hint=HOW_TO)
    return f"WARNING: {what} (--allow-visible-processes)"
