"""Running a command as another unprivileged account, the way a researcher's processes run.

A test that plays "another account" needs that account to run the project's Python, wherever the checkout
and the interpreter live: under ``/root`` (mode 0700) a plain ``setpriv`` could not even start it. The
command runs in the same sandbox a researcher's server gets (:mod:`dcr_spawner.sandbox_mounts`, as
:class:`dcr_spawner.local.DCRLocalSpawner` starts it), which shows the interpreter and the packages again
read-only and nothing else of what lies under a closed directory; ``/tmp`` stays the host's, so sockets and
files the test shares there are reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

from dcr_spawner import sandbox_mounts

#: The packages a probe imports (their checkout must be readable).
PACKAGES = ("dcr_enclave", "dcr_spawner")


def run_as(uid: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(cmd, **kwargs)`` as ``uid`` (its own group, no others) in a researcher's sandbox."""
    base = tempfile.mkdtemp(prefix="dcr-other-")
    try:
        os.chmod(base, 0o755)
        home = os.path.join(base, f"u{uid}")
        os.mkdir(home, 0o755)
        plan = sandbox_mounts.build_plan(
            mode="root", account=f"uid{uid}", uid=uid, gid=uid, groups=[uid], home=home, home_base=base,
            files=[], hidden=[], private_tmp_size="",
            needed=sandbox_mounts.python_roots() + sandbox_mounts.package_roots(PACKAGES),
        )  # fmt: skip
        return subprocess.run(sandbox_mounts.helper_argv(plan, cmd), **kwargs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
