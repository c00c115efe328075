"""The local sandbox's mount plan, without root: :func:`make_mount_plan` against literal plans.

The builder is given every fact about the host, so these tests name paths that need not exist here and
compare the whole plan -- and the JSON argument the sandbox's first process receives -- with literal
values. What the helper does with a plan as root is tested against a real hub in ``test_local_spawner.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dcr_enclave.formats.contract import DATA_ROOT
from dcr_spawner import sandbox_mounts
from dcr_spawner.sandbox_mounts import (
    Cover,
    DataFile,
    Exposure,
    HostPath,
    MountPlan,
    PlanError,
    build_plan,
    closed_ancestor,
    host_path,
    make_mount_plan,
)

STORE = "/srv/dcr/store"
INSURANCE = f"{STORE}/acme/insurance/4f0c/synthetic/claims.csv"
VISITS = f"{STORE}/globex/visits/9a1b/synthetic/visits.csv"
PYTHON = "/root/.pyenv/versions/3.11.9"


def _alice(**overrides: Any) -> MountPlan:
    """Alice's server on a root hub: two datasets, the store, both keys and the records database hidden
    (the airlock key through a link), a Python installation under /root, a private /tmp."""
    kwargs: dict[str, Any] = {
        "mode": "root",
        "account": "dcr-alice",
        "uid": 2001,
        "gid": 2001,
        "groups": [2001, 2500],
        "home": "/home/dcr-alice",
        "home_base": "/home",
        "files": [
            DataFile("globex", "visits", "visits.csv", VISITS),
            DataFile("acme", "insurance", "claims.csv", INSURANCE),
        ],
        "hidden": [
            HostPath(STORE, STORE, "directory"),
            HostPath("/srv/hub/dcr-hub-key.pem", "/srv/hub/dcr-hub-key.pem", "file"),
            HostPath("/srv/hub/dcr-airlock.key", "/srv/keys/airlock.key", "file"),
            HostPath("/srv/hub/dcr-hub.sqlite", "/srv/hub/dcr-hub.sqlite", "absent"),
        ],
        "needed": [PYTHON, "/usr/lib/python3/dist-packages"],
        "closed_ancestors": ["/root"],
        "private_tmp_size": "1G",
    }
    kwargs.update(overrides)
    return make_mount_plan(**kwargs)


def test_root_plan_is_exactly_this() -> None:
    """The plan of a root hub's server: /data entries sorted by path; covers (shallowest first) on the home
    base, the closed /root, /tmp and /dev/shm (private, writable, sized) and the store (000, optional);
    the user's home (writable) and the Python installation under /root shown again; hidden files by the
    path their link leads to; an absent path left out."""
    assert _alice() == MountPlan(
        mode="root",
        account="dcr-alice",
        uid=2001,
        gid=2001,
        groups=(2001, 2500),
        home="/home/dcr-alice",
        data=(
            DataFile("acme", "insurance", "claims.csv", INSURANCE),
            DataFile("globex", "visits", "visits.csv", VISITS),
        ),
        covers=(
            Cover("/home", 0o755),
            Cover("/root", 0o755),
            Cover("/tmp", 0o1777, read_only=False, size="1G"),
            Cover("/dev/shm", 0o1777, read_only=False, size="1G"),
            Cover("/srv/dcr/store", 0o000, optional=True),
        ),
        exposures=(
            Exposure("/home/dcr-alice", writable=True),
            Exposure(PYTHON),
        ),
        hidden_files=("/srv/hub/dcr-hub-key.pem", "/srv/keys/airlock.key"),
    )


def test_plan_argument_is_exactly_this() -> None:
    """The one JSON argument the sandbox's first process receives, and the command line around it."""
    plan = _alice()
    assert json.loads(plan.to_json()) == {
        "v": 1,
        "mode": "root",
        "account": "dcr-alice",
        "uid": 2001,
        "gid": 2001,
        "groups": [2001, 2500],
        "home": "/home/dcr-alice",
        "data": [
            ["acme", "insurance", "claims.csv", INSURANCE],
            ["globex", "visits", "visits.csv", VISITS],
        ],
        "covers": [
            ["/home", 0o755, True, "64k", False],
            ["/root", 0o755, True, "64k", False],
            ["/tmp", 0o1777, False, "1G", False],
            ["/dev/shm", 0o1777, False, "1G", False],
            ["/srv/dcr/store", 0, True, "64k", True],
        ],
        "exposures": [["/home/dcr-alice", True], [PYTHON, False]],
        "hidden_files": ["/srv/hub/dcr-hub-key.pem", "/srv/keys/airlock.key"],
        "notes": [],
    }
    assert MountPlan.from_json(plan.to_json()) == plan
    assert sandbox_mounts.helper_argv(plan, ["jupyterhub-singleuser", "--debug"]) == [
        sys.executable,
        "-I",
        "-S",
        os.path.abspath(sandbox_mounts.__file__),
        plan.to_json(),
        "--",
        "jupyterhub-singleuser",
        "--debug",
    ]


def test_userns_plan_is_exactly_this() -> None:
    """Without root the server runs as the hub's account, which can walk wherever the hub can: closed
    ancestors get no cover, and the Python installation under /root is not shown again. Without a private
    /tmp size, /tmp and /dev/shm stay the host's."""
    plan = _alice(
        mode="userns",
        account="hub",
        uid=1000,
        gid=1000,
        groups=[1000],
        home="/var/lib/dcr/homes/dcr-alice",
        home_base="/var/lib/dcr/homes",
        hidden=[HostPath("/var/lib/hub", "/var/lib/hub", "directory")],
        needed=[PYTHON],
        private_tmp_size="",
    )
    assert plan == MountPlan(
        mode="userns",
        account="hub",
        uid=1000,
        gid=1000,
        groups=(1000,),
        home="/var/lib/dcr/homes/dcr-alice",
        data=(
            DataFile("acme", "insurance", "claims.csv", INSURANCE),
            DataFile("globex", "visits", "visits.csv", VISITS),
        ),
        covers=(
            Cover("/var/lib/hub", 0o000, optional=True),
            Cover("/var/lib/dcr/homes", 0o755),
        ),
        exposures=(Exposure("/var/lib/dcr/homes/dcr-alice", writable=True),),
    )


def test_a_closed_ancestor_that_is_already_covered_keeps_its_cover() -> None:
    """A closed directory that is also hidden, or is the home base, keeps that cover (000 stays 000)."""
    plan = _alice(
        hidden=[HostPath("/srv/private", "/srv/private", "directory")],
        needed=[],
        closed_ancestors=["/srv/private", "/home"],
        private_tmp_size="",
    )
    assert plan.covers == (Cover("/home", 0o755), Cover("/srv/private", 0o000, optional=True))


@pytest.mark.parametrize(
    ("hidden", "message"),
    [
        (HostPath("/", "/", "directory"), "cannot hide /: it contains /data"),
        (HostPath("/srv/link", "/", "directory"), "cannot hide /srv/link: it contains /data"),
        (HostPath("/data", "/data", "directory"), "cannot hide /data: it contains /data"),
        (HostPath("/root", "/root", "directory"), "cannot hide /root: the server needs what is below it"),
        (HostPath(PYTHON, PYTHON, "directory"), "the server needs what is below it"),
        (HostPath("/home/dcr-alice", "/home/dcr-alice", "directory"), "the server needs what is below it"),
    ],
)
def test_hiding_what_the_server_needs_is_refused(hidden: HostPath, message: str) -> None:
    """No plan covers /data, the Python installation, the packages the server imports or the home; the
    refusal names the path as configured."""
    with pytest.raises(PlanError, match=message):
        _alice(hidden=[hidden])


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([DataFile("acme", "insurance", "f.csv", "/x"), DataFile("acme", "insurance", "f.csv", "/y")],
         "two synthetic files would appear at /data/acme/insurance/f.csv"),
        ([DataFile("acme", "..", "f.csv", "/x")], "is not a plain /data/<provider>/<dataset>/<file> path"),
        ([DataFile("acme", "insurance", ".hidden", "/x")], "is not a plain"),
        ([DataFile("acme", "a/b", "f.csv", "/x")], "is not a plain"),
        ([DataFile("acme", "insurance", "f.csv", "relative/f.csv")], "is not an absolute path"),
    ],
)  # fmt: skip
def test_bad_data_files_are_refused(files: list[DataFile], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        _alice(files=files)


def test_builder_reads_nothing_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every way of looking at the file system broken, the builder still returns the same plan."""
    expected = _alice()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the builder looked at the machine: {args}")

    with monkeypatch.context() as m:
        for name in ("stat", "lstat", "listdir", "scandir", "access", "readlink", "open"):
            m.setattr(os, name, refuse)
        for name in ("realpath", "exists", "isdir", "isfile", "islink", "lexists"):
            m.setattr(os.path, name, refuse)
        assert _alice() == expected


def test_data_root_is_the_contracts() -> None:
    """The helper repeats the launch contract's /data (it imports nothing from the package)."""
    assert sandbox_mounts.DATA_ROOT == DATA_ROOT


# ---------------------------------------------------------------------------------------------------------
# The host facts build_plan looks up
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A world-traversable directory right under /tmp, so closed ancestors are only the ones a test makes
    (pytest's own temporary directories sit under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="dcr-mounts-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in sorted(path.rglob("*"), reverse=True):
            if sub.is_dir() and not sub.is_symlink():
                sub.chmod(0o700)
        shutil.rmtree(path)


def test_host_path_resolves_links_and_says_what_is_there(open_dir: Path) -> None:
    (open_dir / "store").mkdir()
    (open_dir / "key.pem").write_text("k")
    (open_dir / "link.pem").symlink_to(open_dir / "key.pem")
    (open_dir / "dangling").symlink_to(open_dir / "gone")
    d = str(open_dir)
    assert [host_path(f"{d}/{n}") for n in ("store", "key.pem", "link.pem", "dangling", "absent")] == [
        HostPath(f"{d}/store", f"{d}/store", "directory"),
        HostPath(f"{d}/key.pem", f"{d}/key.pem", "file"),
        HostPath(f"{d}/link.pem", f"{d}/key.pem", "file"),
        HostPath(f"{d}/dangling", f"{d}/gone", "absent"),
        HostPath(f"{d}/absent", f"{d}/absent", "absent"),
    ]


def test_build_plan_passes_the_host_facts_to_the_builder(open_dir: Path) -> None:
    """build_plan is make_mount_plan with what this machine shows: links resolved, kinds looked up, and
    (as root) the outermost directory on the way to the Python installation that others cannot enter."""
    d = str(open_dir)
    (open_dir / "store").mkdir()
    (open_dir / "key.pem").write_text("k")
    (open_dir / "keys").symlink_to(open_dir / "key.pem")
    (open_dir / "closed" / "inner" / "python").mkdir(parents=True)
    (open_dir / "closed").chmod(0o700)
    (open_dir / "closed" / "inner").chmod(0o700)
    (open_dir / "homes").mkdir()
    python = f"{d}/closed/inner/python"
    assert closed_ancestor(python) == f"{d}/closed"
    common: dict[str, Any] = {
        "account": "dcr-alice", "uid": 2001, "gid": 2001, "groups": [2001], "home": f"{d}/homes/dcr-alice",
        "home_base": f"{d}/homes", "files": [], "needed": [python], "private_tmp_size": "",
    }  # fmt: skip
    hidden = [f"{d}/store", f"{d}/keys", f"{d}/absent"]
    facts = [
        HostPath(f"{d}/store", f"{d}/store", "directory"),
        HostPath(f"{d}/keys", f"{d}/key.pem", "file"),
        HostPath(f"{d}/absent", f"{d}/absent", "absent"),
    ]
    for mode, closed in (("root", [f"{d}/closed"]), ("userns", [])):
        assert build_plan(mode=mode, hidden=hidden, **common) == make_mount_plan(
            mode=mode, hidden=facts, closed_ancestors=closed, **common
        )
