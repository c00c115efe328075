"""Hub-side pieces of the demo, imported by the ``jupyterhub_config.py`` that ``dcr demo`` writes.

:class:`HomeSeeder` is the spawner's ``pre_spawn_hook``: on a researcher's first spawn it puts the demo's
files (the sample notebook) into their home. The home belongs to the user, so the hub (root) never follows a
path in it: it opens the home itself without following links, creates each file *exclusively* relative to
that directory (an existing file or link of that name is never written through), and gives it to the account.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from dcr_enclave.formats.errors import DCRError

#: ``<MARKER>.<file name>`` is left in the home once a file is given, so a file the user deletes is not
#: brought back at the next spawn.
MARKER: Final = ".dcr-demo-seeded"


class HomeSeeder:
    """``c.Spawner.pre_spawn_hook``: copy ``files`` (name in the home → source path) on the first spawn.

    Only users with at least one entitled dataset get the files (the provider account has no ``/data``).
    """

    def __init__(self, files: Mapping[str, str | Path]) -> None:
        for name in files:
            if not name or "/" in name or name.startswith(".") or name in ("..", "."):
                raise DCRError(f"HomeSeeder: {name!r} must be a plain file name in the home")
        self.files = {name: Path(src) for name, src in files.items()}

    async def __call__(self, spawner: Any) -> None:
        if not spawner.entitlements():
            return
        account = await spawner.ensure_account() if spawner.isolated else spawner.shared_account()
        try:
            given = seed_home(account.home, account.uid, account.gid, self.files)
        except OSError as e:
            # Not fatal: the server starts without the sample; the hub log says why.
            spawner.log.warning("DCR demo: could not seed the home of %s: %s", spawner.user.name, e)
            return
        for name in given:
            spawner.log.info("DCR demo: copied %s into the home of %s", name, spawner.user.name)


def _create(dir_fd: int, name: str, data: bytes, uid: int, gid: int) -> bool:
    """Create ``name`` in the directory exclusively; False when something of that name exists already."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        os.fchown(fd, uid, gid)
        f.write(data)
    return True


def seed_home(home: str, uid: int, gid: int, files: Mapping[str, Path]) -> list[str]:
    """Give each file to the home once (see the module docstring); returns the names copied now."""
    dir_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(dir_fd)
        if st.st_uid != uid:
            raise OSError(errno.EPERM, f"{home} is not owned by uid {uid}")
        given = []
        for name, src in files.items():
            marker = f"{MARKER}.{name}"
            try:
                os.stat(marker, dir_fd=dir_fd, follow_symlinks=False)
                continue  # given before
            except FileNotFoundError:
                pass
            if _create(dir_fd, name, src.read_bytes(), uid, gid):
                given.append(name)
            _create(dir_fd, marker, b"", uid, gid)
        return given
    finally:
        os.close(dir_fd)
