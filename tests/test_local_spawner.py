"""DCRLocalSpawner against a real JupyterHub: per-user accounts, private ``/data``, nothing else readable.

The module starts one real hub (``tests/hub_harness.py``: real configurable-http-proxy, DummyAuthenticator,
``c.JupyterHub.spawner_class = "dcr-local"``, ``dcr_spawner.enable(c)``) with three datasets in a root-only
store and users with different entitlements, spawns their real single-user servers and checks every promise
through the servers' own APIs: a kernel started over the server's REST API and driven over its websocket,
and the contents API (the test hub serves ``/`` as root directory so the contents API can reach ``/data``).
Accounts the spawner created are removed with ``userdel`` afterwards.

Further tests pin the pieces without a hub: account names, trait validation, the helper failing closed,
and the sandbox helper's unprivileged (user namespace) mode, run as a real unprivileged account. The mount
plan itself is compared with literal plans, without root, in ``test_sandbox_mounts.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hub_harness import HarnessError, Hub, delete_account
from jupyterhub import orm
from jupyterhub.objects import Hub as HubObject
from jupyterhub.user import User
from test_local_run import _grant_and_bundle
from test_secure_stage import titled
from traitlets import TraitError
from traitlets.config import Config

from dcr_enclave.formats import contract
from dcr_enclave.formats.contract import DATA_ROOT
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.pack.store import Store
from dcr_spawner import sandbox_mounts
from dcr_spawner.local import (
    MARKER_PREFIX,
    NOT_ISOLATED,
    SERVER_PACKAGES,
    DCRLocalSpawner,
    account_marker,
    account_name,
)

pytestmark = pytest.mark.root  # needs root: system accounts and namespaces (run, never skipped)

# ---------------------------------------------------------------------------------------------------------
# Fixtures: a root-only store with three datasets, a hub, two (three) users
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    ref: str
    version: str
    #: file name -> (store path of the synthetic file, sha256 of its bytes)
    synthetic: dict[str, tuple[Path, str]]
    #: file name -> store path of the encrypted real file
    ciphertext: dict[str, Path]


@dataclass
class Env:
    hub: Hub
    store: Path
    homes: Path
    datasets: dict[str, Dataset]
    alice: str
    bob: str
    carol: str
    tokens: dict[str, str]

    def account(self, user: str) -> pwd.struct_passwd:
        return pwd.getpwnam(account_name(user, "dcr-"))

    def run(self, user: str, code: str) -> Any:
        """Run ``code`` in a kernel of ``user``'s server; the code prints one JSON document."""
        result = self.hub.run_code(user, textwrap.dedent(code), token=self.tokens[user])
        assert result.error is None, f"{result.error}\n{result.stderr}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def expected_data(self, refs: list[str]) -> dict[str, str]:
        """``/data`` path -> sha256 for the given datasets."""
        return {
            f"{DATA_ROOT}/{ref}/{name}": digest
            for ref in refs
            for name, (_path, digest) in self.datasets[ref].synthetic.items()
        }


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _add(run_cli: Callable[..., Any], store: Path, ref: str, pairs: list[tuple[Path, Path]]) -> Dataset:
    provider, dataset = ref.split("/")
    args: list[Any] = ["provider", "add", "--store", store, "--provider", provider, "--dataset", dataset]
    for real, synthetic in pairs:
        args += ["--real", real, "--synthetic", synthetic]
    code, _out, err = run_cli(*args)
    assert code == 0, err
    s = Store(store)
    manifest = s.versions(provider, dataset)[-1]
    files = {}
    for f in manifest.files:
        path = s.synthetic_path(manifest, f.name)
        files[f.name] = (path, _sha256(path))
        assert files[f.name][1] == f.synthetic_sha256
    return Dataset(
        ref, manifest.version, files, {f.name: s.ciphertext_path(manifest, f.name) for f in manifest.files}
    )


def _cli(*args: Any) -> tuple[int, str, str]:
    r = subprocess.run(
        [sys.executable, "-m", "dcr_enclave", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    return r.returncode, r.stdout, r.stderr


def _userdel(names: list[str]) -> None:
    for name in names:
        # Whatever of this test's account outlived the hub (normally nothing) is killed first.
        r = delete_account(name)
        assert r is None or r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, insurance_real: Path, insurance_synthetic: Path
) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("dcr-local")
    inputs = base / "inputs"
    inputs.mkdir()
    store = base / "store"
    # beta/claims: two files; gamma/public: one small file everyone gets.
    (inputs / "claims.csv").write_text("id,amount\n1,100\n2,250\n3,75\n")
    (inputs / "claims-synthetic.csv").write_text("id,amount\n1,90\n2,260\n3,80\n")
    (inputs / "notes.txt").write_text("real notes\n")
    (inputs / "notes-synthetic.txt").write_text("synthetic notes\n")
    (inputs / "rates.csv").write_text("year,rate\n2020,0.1\n")
    (inputs / "rates-synthetic.csv").write_text("year,rate\n2020,0.2\n")
    datasets = {
        d.ref: d
        for d in (
            _add(_cli, store, "acme/insurance", [(insurance_real, insurance_synthetic)]),
            _add(
                _cli,
                store,
                "beta/claims",
                [
                    (inputs / "claims.csv", inputs / "claims-synthetic.csv"),
                    (inputs / "notes.txt", inputs / "notes-synthetic.txt"),
                ],
            ),
            _add(_cli, store, "gamma/public", [(inputs / "rates.csv", inputs / "rates-synthetic.csv")]),
        )
    }
    store.chmod(0o700)  # root-only, as the spawner requires
    suffix = secrets.token_hex(3)
    alice, bob, carol = (f"dcrtest-{n}-{suffix}" for n in ("alice", "bob", "carol"))
    policy = {
        "acme/insurance": {
            "version": datasets["acme/insurance"].version,
            "store": str(store),
            "entitled": {"users": [alice]},
        },
        "beta/claims": {
            "version": datasets["beta/claims"].version,
            "store": str(store),
            "entitled": {"groups": ["analysts"]},
        },
        "gamma/public": {
            "version": datasets["gamma/public"].version,
            "store": str(store),
            "entitled": {"users": [alice, bob]},
        },
    }
    homes = base / "homes"
    config = f"""
        import dcr_spawner
        c.DCRPolicy.datasets = {policy!r}
        c.DCRLocalSpawner.home_base = {str(homes)!r}
        # Serve / so that the contents API can list /data (the default root is the home).
        c.Spawner.notebook_dir = "/"
        c.Spawner.args = ["--ContentsManager.allow_hidden=True"]
        dcr_spawner.enable(c)
    """
    hub = Hub(base / "hub", spawner_class="dcr-local", config=config, groups={"analysts": [bob, carol]})
    accounts = [account_name(u, "dcr-") for u in (alice, bob, carol)]
    try:
        hub.start()
        for u in (alice, bob, carol):
            hub.create_user(u)
        tokens = {u: hub.new_token(u) for u in (alice, bob, carol)}
        for u in (alice, bob):
            # Each logs in through the hub's login form and starts their own server.
            hub.spawn(u, session=hub.login(u))
        yield Env(hub, store, homes, datasets, alice, bob, carol, tokens)
    finally:
        hub.stop()
        _userdel(accounts)
        shutil.rmtree(homes, ignore_errors=True)


LIST_DATA = """
    import hashlib, json, os
    found = {}
    for root, dirs, files in os.walk("/data"):
        for f in files:
            p = os.path.join(root, f)
            found[p] = "sha256:" + hashlib.sha256(open(p, "rb").read()).hexdigest()
    print(json.dumps(found))
"""


# ---------------------------------------------------------------------------------------------------------
# Through the servers' own APIs
# ---------------------------------------------------------------------------------------------------------


def test_data_holds_exactly_the_entitled_synthetic_files(env: Env) -> None:
    """Each server's /data (seen by a kernel) holds exactly its user's entitled synthetic files, byte for
    byte the store's synthetic files: alice by user name, bob through a group, both share one dataset."""
    assert env.run(env.alice, LIST_DATA) == env.expected_data(["acme/insurance", "gamma/public"])
    assert env.run(env.bob, LIST_DATA) == env.expected_data(["beta/claims", "gamma/public"])


def test_contents_api_lists_only_entitled_datasets(env: Env) -> None:
    """The server's contents API shows /data with only the entitled providers and datasets, and returns
    a synthetic file's content; the data store's path does not exist for it."""
    token = env.tokens[env.bob]
    r = env.hub.server_api(env.bob, "GET", "api/contents/data", token=token)
    assert r.status_code == 200, r.text
    assert sorted(e["name"] for e in r.json()["content"]) == ["beta", "gamma"]
    r = env.hub.server_api(env.bob, "GET", "api/contents/data/beta/claims", token=token)
    assert sorted(e["name"] for e in r.json()["content"]) == ["claims.csv", "notes.txt"]
    r = env.hub.server_api(
        env.bob, "GET", "api/contents/data/beta/claims/claims.csv?type=file&format=text", token=token
    )
    assert r.status_code == 200
    path, _digest = env.datasets["beta/claims"].synthetic["claims.csv"]
    assert r.json()["content"] == path.read_text()
    r = env.hub.server_api(env.bob, "GET", "api/contents" + str(env.store), token=token)
    assert r.status_code == 404
    r = env.hub.server_api(env.bob, "GET", "api/contents/data/acme", token=token)
    assert r.status_code == 404


def test_servers_ask_the_hub_for_grants_and_find_dcr_in_terminals(env: Env) -> None:
    """A server started by the DCR spawner uses the hub's grant service, never the development one: its
    dataset list is the hub's answer for its user. In a JupyterLab terminal (a real terminal through the
    proxy) `dcr` is on PATH, from the hub's own installation."""
    token = env.tokens[env.bob]
    r = env.hub.server_api(env.bob, "GET", "dcr/api/datasets", token=token)
    assert r.status_code == 200, r.text
    assert [f"{d['provider']}/{d['dataset']}" for d in r.json()["datasets"]] == [
        "beta/claims",
        "gamma/public",
    ]

    r = env.hub.server_api(env.bob, "POST", "api/terminals", token=token)
    assert r.status_code == 200, r.text
    name = r.json()["name"]
    ws_url = env.hub.server_url(env.bob).replace("http", "ws", 1) + f"terminals/websocket/{name}"

    async def ask() -> str:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        conn = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}))
        conn.write_message(json.dumps(["stdin", "echo DCR-AT=$(command -v dcr)\r"]))
        seen = ""
        deadline = time.monotonic() + 30
        while "DCR-AT=/" not in seen and time.monotonic() < deadline:
            msg = await asyncio.wait_for(conn.read_message(), timeout=30)
            if msg is None:
                break
            kind, *rest = json.loads(msg)
            if kind == "stdout":
                seen += rest[0]
        conn.close()
        return seen

    seen = asyncio.run(ask())
    env.hub.server_api(env.bob, "DELETE", f"api/terminals/{name}", token=token)
    expected = os.path.join(os.path.dirname(sys.executable), "dcr")
    assert f"DCR-AT={expected}" in seen, seen


def test_server_runs_as_its_own_unprivileged_account(env: Env) -> None:
    """Each server (and its kernels) runs as the user's own account created by the spawner: its uid and
    private group, no capabilities, no_new_privs, HOME its own 0700 directory under the home base."""
    code = """
        import json, os
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
        print(json.dumps({"res": os.getresuid(), "gres": os.getresgid(), "groups": os.getgroups(),
                          "home": os.environ["HOME"], "user": os.environ["USER"], "cwd": os.getcwd(),
                          "iso": os.environ.get("DCR_ISOLATION"), "caps": [status[k].strip() for k in
                          ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")], "nnp": status["NoNewPrivs"].strip()}))
    """
    seen = set()
    for user in (env.alice, env.bob):
        pw = env.account(user)
        assert pw.pw_gecos == account_marker(user)
        got = env.run(user, code)
        assert got["res"] == [pw.pw_uid] * 3 and pw.pw_uid >= 1000
        assert got["gres"] == [pw.pw_gid] * 3 and got["groups"] == [pw.pw_gid]
        assert got["user"] == pw.pw_name and got["home"] == pw.pw_dir == str(env.homes / pw.pw_name)
        assert got["iso"] == "account"
        assert got["caps"] == ["0000000000000000"] * 5 and got["nnp"] == "1"
        st = os.stat(pw.pw_dir)
        assert (st.st_uid, st.st_mode & 0o777) == (pw.pw_uid, 0o700)
        seen.add(pw.pw_uid)
    assert len(seen) == 2


#: From a kernel: every process its server's /proc lists (pid, uid, name, command line) and what ps prints.
LIST_PROCESSES = """
    import json, os, subprocess
    procs = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\\0", b" ").decode(errors="replace")
                comm = open(f"/proc/{d}/comm").read().strip()
                uid = os.stat(f"/proc/{d}").st_uid
            except OSError:
                continue
            procs.append([int(d), uid, comm, cmd])
    ps = subprocess.run(["ps", "-eo", "pid,uid,args"], capture_output=True, text=True).stdout
    print(json.dumps({"me": os.getpid(), "procs": procs, "ps": ps}))
"""


def test_each_server_sees_only_its_own_processes(
    env: Env, host: Any, store: Any, make_notebook: Any, insurance_real: Path
) -> None:
    """alice and bob logged in through the form: from a kernel in each server, /proc and ps list only
    that server's own processes (the server, its kernels, a terminal opened through its API), all of its
    account; nothing of the other server, of the hub, of its proxy, or of an enclave job that runs at the
    same time and writes a value of the real data into its process titles -- which root, on the host, sees."""
    real = pd.read_csv(insurance_real)
    marker = f"T{round(float(real['charges'].sum()))}X"
    cells = [
        "import ctypes, subprocess, time\n"
        "import pandas as pd\n"
        "df = pd.read_csv('/data/acme/insurance/real.csv')\n"
        "title = 'T%dX' % round(float(df['charges'].sum()))\n"
        "ctypes.CDLL(None).prctl(15, title.encode(), 0, 0, 0)\n"
        "child = subprocess.Popen(['sleep', '60', title])\n"
        "time.sleep(60)\n"
    ]
    nb = make_notebook(cells)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, nb.parent, time_limit=120)
    host.client.launch(grant, bundle)
    alice = env.tokens[env.alice]
    terminal = env.hub.server_api(env.alice, "POST", "api/terminals", token=alice)
    assert terminal.status_code == 200, terminal.text
    try:
        deadline = time.monotonic() + 120
        while not titled(marker):  # root on the host sees the title: the job really set it
            assert time.monotonic() < deadline, "the enclave job never set its process title"
            assert host.client.status(job_id)["state"] not in contract.TERMINAL_STATES
            time.sleep(0.2)
        accounts = {u: env.account(u) for u in (env.alice, env.bob)}
        for user, pw in accounts.items():
            got = env.run(user, LIST_PROCESSES)
            assert got["ps"].count("\n") == len(got["procs"]) + 2  # header, ps itself and the listing
            assert {uid for _pid, uid, _comm, _cmd in got["procs"]} == {pw.pw_uid}, got["procs"]
            cmds = [cmd for _pid, _uid, _comm, cmd in got["procs"]]
            assert got["me"] in [pid for pid, *_ in got["procs"]]
            assert any("jupyterhub-singleuser" in c for c in cmds) and any("ipykernel" in c for c in cmds)
            if user == env.alice:
                assert any(comm == "bash" for _p, _u, comm, _c in got["procs"]), "the terminal is missing"
            seen = json.dumps(got)
            assert marker not in seen and "dcr_enclave" not in seen and "sleep 60" not in seen
            assert "configurable-http-proxy" not in seen and "jupyterhub_config" not in seen
            other = next(u for u in accounts if u != user)
            assert other not in seen and accounts[other].pw_name not in seen
        assert host.client.status(job_id)["state"] not in contract.TERMINAL_STATES  # it ran all along
    finally:
        host.client.cancel(job_id)
        env.hub.server_api(env.alice, "DELETE", f"api/terminals/{terminal.json()['name']}", token=alice)


def test_sandbox_cannot_read_store_keys_hub_files_or_other_homes(env: Env) -> None:
    """From alice's kernel: the store (real ciphertext, manifests, providers' keys), the hub's grant key,
    airlock key, DCR records database and JupyterHub database, bob's home (by path and through /proc/<bob's server>/root) and the hub's view through
    /proc/<hub>/root are all unreadable; bob's data is not reachable either."""
    bob_home = env.account(env.bob).pw_dir
    Path(bob_home, "secret.txt").write_text("bob's")  # root writes it; bob's home is 0700
    insurance = env.datasets["acme/insurance"]
    beta_synthetic = env.datasets["beta/claims"].synthetic["claims.csv"][0]
    keys = sorted(p for p in (env.store / ".keys").rglob("*") if p.is_file())
    assert keys, "the store should hold provider keys"
    ciphertext = next(iter(insurance.ciphertext.values()))
    assert ciphertext.is_file()
    for name in ("dcr-hub-key.pem", "dcr-airlock.key", "dcr-hub.sqlite"):
        assert (env.hub.workdir / name).is_file(), f"the hub should have created {name}"
    bob_pid = env.hub.server_process(env.bob).pid
    assert env.hub.proc is not None
    targets = [
        str(env.store),
        str(env.store / ".keys"),
        *map(str, keys),
        str(ciphertext),
        str(beta_synthetic),
        str(env.hub.workdir / "dcr-hub-key.pem"),
        str(env.hub.workdir / "dcr-airlock.key"),
        str(env.hub.workdir / "dcr-hub.sqlite"),
        str(env.hub.workdir / "jupyterhub.sqlite"),
        str(env.hub.workdir / "jupyterhub_cookie_secret"),
        bob_home,
        f"{bob_home}/secret.txt",
        f"/proc/{bob_pid}/root/data/beta/claims/claims.csv",
        f"/proc/{bob_pid}/root{bob_home}/secret.txt",
        f"/proc/{env.hub.proc.pid}/root{env.store}",
        f"/proc/{env.hub.proc.pid}/root{ciphertext}",
        "/root",
    ]
    code = f"""
        import json, os
        out = {{}}
        for t in {targets!r}:
            try:
                if os.path.isdir(t):
                    out[t] = "listed: " + ",".join(sorted(os.listdir(t)))
                else:
                    out[t] = "read: %d bytes" % len(open(t, "rb").read())
            except OSError as e:
                out[t] = type(e).__name__
        print(json.dumps(out))
    """
    got = env.run(env.alice, code)
    leaked = {
        t: v
        for t, v in got.items()
        if v not in ("FileNotFoundError", "PermissionError") and not (v == "listed: " or v == "read: 0 bytes")
    }
    # /root shows only the way to what the server runs from (the Python installation, a checkout holding
    # the packages it imports), nothing else of root's home.
    needed = sandbox_mounts.python_roots() + sandbox_mounts.package_roots(SERVER_PACKAGES)
    ways = sorted(
        {Path(n).relative_to("/root").parts[0] for n in needed if sandbox_mounts.within(n, "/root")}
    )
    if ways:
        assert leaked.pop("/root") == "listed: " + ",".join(ways)
    assert leaked == {}, leaked
    assert os.path.exists(env.store / ".keys")  # the host still has them: only the sandbox is blind


def test_data_is_read_only(env: Env) -> None:
    """Nothing under /data can be written, created, renamed or deleted from inside the sandbox."""
    code = """
        import json, os
        f = "/data/gamma/public/rates.csv"
        out = {}
        for name, op in [("write", lambda: open(f, "ab").write(b"x")), ("create", lambda: open("/data/gamma/x", "w")),
                         ("mkdir", lambda: os.mkdir("/data/new")), ("unlink", lambda: os.unlink(f)),
                         ("rename", lambda: os.rename(f, "/data/gamma/public/r.csv")), ("chmod", lambda: os.chmod(f, 0o777))]:
            try:
                op()
                out[name] = "done"
            except OSError as e:
                out[name] = type(e).__name__
        print(json.dumps(out))
    """
    got = env.run(env.bob, code)
    assert set(got.values()) <= {"OSError", "PermissionError"}, got
    path, digest = env.datasets["gamma/public"].synthetic["rates.csv"]
    assert _sha256(path) == digest


def test_private_tmp_and_nothing_propagates_to_the_host(env: Env) -> None:
    """Each server has its own /tmp (a file alice writes there is invisible to bob and to the host), and
    none of the sandboxes' mounts appear in the host's mount table."""
    marker = f"dcr-{secrets.token_hex(4)}"
    assert (
        env.run(env.alice, f"import json; open('/tmp/{marker}', 'w').write('a'); print(json.dumps(1))") == 1
    )
    assert env.run(env.bob, f"import json, os; print(json.dumps(os.path.exists('/tmp/{marker}')))") is False
    assert not Path("/tmp", marker).exists()
    assert "dcr-sandbox" not in Path("/proc/self/mountinfo").read_text()
    assert os.listdir(DATA_ROOT) == []


def test_group_change_applies_at_next_spawn(env: Env) -> None:
    """carol is entitled to beta/claims through the group; removed from it, her next server's /data no
    longer holds it (and has no dataset at all). Her account is the same across spawns."""
    env.hub.spawn(env.carol)
    assert env.run(env.carol, LIST_DATA) == env.expected_data(["beta/claims"])
    uid = env.account(env.carol).pw_uid
    env.hub.stop_server(env.carol)
    env.hub.remove_from_group("analysts", [env.carol])
    try:
        env.hub.spawn(env.carol)
        assert env.run(env.carol, LIST_DATA) == {}
        assert env.account(env.carol).pw_uid == uid
        env.hub.stop_server(env.carol)
    finally:
        env.hub.add_to_group("analysts", [env.carol])


def test_refuses_an_account_it_did_not_create(env: Env) -> None:
    """A system account already named like the user's sandbox account, but not made by DCR, is never used:
    the spawn fails and the hub log says why."""
    user = f"dcrtest-mallory-{secrets.token_hex(3)}"
    name = account_name(user, "dcr-")
    subprocess.run(["useradd", "--no-create-home", "--", name], check=True)
    try:
        with pytest.raises(HarnessError, match="was not created by DCR"):
            env.hub.spawn(user, timeout=60)
    finally:
        _userdel([name])


def test_hub_refuses_to_start_with_a_store_other_accounts_can_read(
    tmp_path: Path, insurance_real: Path, insurance_synthetic: Path
) -> None:
    """With dcr-local, a data store readable by other accounts (mode 0755) stops the hub at start, before
    it serves, with a message naming the store, the dataset's trait and the fix."""
    store = tmp_path / "store"
    dataset = _add(_cli, store, "acme/insurance", [(insurance_real, insurance_synthetic)])
    store.chmod(0o755)
    policy = {
        "acme/insurance": {"version": dataset.version, "store": str(store), "entitled": {"users": ["x"]}}
    }
    config = f"""
        import dcr_spawner
        c.DCRPolicy.datasets = {policy!r}
        c.DCRLocalSpawner.home_base = {str(tmp_path / "homes")!r}
        dcr_spawner.enable(c)
    """
    result = Hub(tmp_path / "hub", spawner_class="dcr-local", config=config).run_to_exit()
    assert result.returncode != 0 and not result.served
    assert f"the data store of acme/insurance {store} is mode 0755" in result.log
    assert "c.DCRPolicy.datasets['acme/insurance']['store']" in result.log and "chmod go-rwx" in result.log


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (
            "hidden_paths = [{python!r}]",
            "the Python installation, the packages it imports or the user's home",
        ),
        (
            "hidden_paths = [{homes_parent!r}]",
            "the Python installation, the packages it imports or the user's home",
        ),
    ],
    ids=["python-under-a-hidden-path", "home-base-under-a-hidden-path"],
)
def test_hub_refuses_to_start_with_a_layout_no_sandbox_can_be_built_from(
    tmp_path: Path, setting: str, named: str
) -> None:
    """A layout no sandbox could be built from stops the hub at start, naming the paths and the traits to
    change, instead of failing every user's spawn."""
    homes = tmp_path / "srv" / "homes"
    python = os.path.realpath(sys.prefix)
    line = setting.format(python=python, homes_parent=str(homes.parent))
    config = f"""
        import dcr_spawner
        c.DCRPolicy.datasets = {{}}
        c.DCRLocalSpawner.home_base = {str(homes)!r}
        c.DCRLocalSpawner.{line}
        dcr_spawner.enable(c)
    """
    result = Hub(tmp_path / "hub", spawner_class="dcr-local", config=config).run_to_exit()
    assert result.returncode != 0 and not result.served
    assert "no sandbox can be built on this machine: cannot hide" in result.log and named in result.log
    assert "c.DCRLocalSpawner.hidden_paths or home_base" in result.log


# ---------------------------------------------------------------------------------------------------------
# Without a hub
# ---------------------------------------------------------------------------------------------------------


def test_account_names() -> None:
    """Hub names map to valid, prefixed account names; unusable characters or lengths get a digest suffix
    so two hub users never share an account; a hub user named root does not become root."""
    assert account_name("alice", "dcr-") == "dcr-alice"
    assert account_name("root", "dcr-") == "dcr-root"
    a, b = account_name("Alice.Smith@example.org", "dcr-"), account_name("alice-smith@example.org", "dcr-")
    assert a != b
    for name in (a, b, account_name("x" * 80, "dcr-"), account_name("9lives", "")):
        assert len(name) <= 32 and name[0].isalpha() and all(c.isalnum() or c in "-_" for c in name)
    assert account_marker("alice").startswith(MARKER_PREFIX) and account_marker("alice") != account_marker(
        "bob"
    )


@pytest.mark.parametrize(
    ("trait", "value"),
    [
        ("account_prefix", "Bad Prefix"),
        ("home_base", "relative/homes"),
        ("home_base", "/"),
        ("home_base", "/data"),
        ("account_shell", "bash"),
        ("hidden_paths", ["relative"]),
        ("readable_paths", ["/"]),
        ("private_tmp_size", "lots"),
    ],
)
def test_bad_settings_are_refused_naming_the_trait(trait: str, value: Any) -> None:
    """Every configurable setting is validated when set; the error names DCRLocalSpawner.<trait>."""
    with pytest.raises(TraitError, match=f"DCRLocalSpawner.{trait}"):
        DCRLocalSpawner(**{trait: value})


def test_helper_fails_closed_as_root(tmp_path: Path) -> None:
    """As root, a sandbox that cannot be built (a synthetic file that is missing) never starts the
    command: the helper exits non-zero and says why."""
    home = tmp_path / "homes" / "nobody"
    home.mkdir(parents=True)
    plan = sandbox_mounts.build_plan(
        mode="root", account="nobody", uid=65534, gid=65534, groups=[65534], home=str(home),
        home_base=str(home.parent), files=[sandbox_mounts.DataFile("a", "b", "f.csv", str(tmp_path / "missing"))],
        hidden=[], needed=[], private_tmp_size="",
    )  # fmt: skip
    ran = tmp_path / "ran"
    r = subprocess.run(sandbox_mounts.helper_argv(plan, ["touch", str(ran)]), capture_output=True, text=True)
    assert r.returncode == 1 and "not starting the server" in r.stderr
    assert not ran.exists()


NON_ROOT_HUB = r"""
import asyncio, json, logging, os, sys
from jupyterhub import orm
from jupyterhub.objects import Hub
from jupyterhub.user import User
from traitlets.config import Config
from dcr_spawner import sandbox_mounts
from dcr_spawner.local import DCRLocalSpawner
from dcr_spawner.hub_start import set_active_policy
from dcr_spawner.policy import DCRPolicy

policy, home_base = json.loads(sys.argv[1]), sys.argv[2]
c = Config()
c.DCRPolicy.datasets = policy
c.DCRLocalSpawner.home_base = home_base
# What the hub's start hook does before any spawn.
validated = DCRPolicy(config=c)
validated.validate_against_hub(set())
set_active_policy(validated)
db = orm.new_session_factory("sqlite://")()
db.add(orm.User(name="dev"))
db.commit()
settings = {"spawner_class": DCRLocalSpawner, "config": c, "hub": Hub(ip="127.0.0.1", port=8081), "domain": ""}
user = User(db.query(orm.User).one(), settings)
spawner = user.spawners[""]
records = []
handler = logging.Handler()
handler.emit = lambda r: records.append(r.getMessage())
spawner.log.addHandler(handler)
plan = asyncio.run(spawner.build_sandbox())
env = spawner.get_env()
notice = open(os.path.join(plan.home, "DCR-NOT-ISOLATED.txt")).read()
print(json.dumps({"mode": plan.mode, "uid": plan.uid, "home": plan.home, "notes": list(plan.notes),
                  "iso": env["DCR_ISOLATION"], "warning": env.get("DCR_ISOLATION_WARNING"), "notice": notice,
                  "logged": [m for m in records if "NOT isolated" in m]}), flush=True)
code = "import json, os; print(json.dumps({'uid': os.getuid(), 'data': sorted(os.listdir('/data/acme/insurance'))}))"
os.execve(sys.executable, sandbox_mounts.helper_argv(plan, [sys.executable, "-c", code]), env)
"""


def test_without_root_users_share_one_account_and_are_told_so(
    tmp_path: Path, insurance_real: Path, insurance_synthetic: Path
) -> None:
    """A hub that is not root (here: run as `nobody`) spawns servers as its own account, says loudly in its
    log, in the server's environment, in the server log and in a notice file in the home that users are not
    isolated, and still gives the server a private read-only /data built in a user namespace."""
    outer_home = tmp_path / "outer"
    outer_home.mkdir()
    store = outer_home / "store"
    dataset = _add(_cli, store, "acme/insurance", [(insurance_real, insurance_synthetic)])
    (outer_home / "hub").mkdir()
    (outer_home / "hub" / "dcr-hub-key.pem").write_text("not a real key")  # a hidden file of the policy
    (outer_home / "hub.py").write_text(NON_ROOT_HUB)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(outer_home)], check=True)
    # Run the hub code as `nobody` inside a root-built sandbox that only makes the Python installation
    # reachable (it may live under /root): the same helper, in its root mode.
    outer = sandbox_mounts.build_plan(
        mode="root", account="nobody", uid=65534, gid=65534, groups=[65534], home=str(outer_home),
        home_base=str(tmp_path), files=[], hidden=[],
        needed=sandbox_mounts.python_roots() + sandbox_mounts.package_roots(["dcr_spawner", "dcr_enclave", "jupyterhub"]),
        private_tmp_size="",
    )  # fmt: skip
    policy = {
        "acme/insurance": {"version": dataset.version, "store": str(store), "entitled": {"users": ["dev"]}}
    }
    homes = outer_home / "homes"
    cmd = ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(outer_home / "hub"),
           sys.executable, str(outer_home / "hub.py"), json.dumps(policy), str(homes)]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(
        sandbox_mounts.helper_argv(outer, cmd), capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    first, second = (json.loads(line) for line in r.stdout.strip().splitlines()[-2:])
    assert first["mode"] == "userns" and first["uid"] == 65534
    assert first["home"] == str(homes / account_name("dev", "dcr-"))
    assert first["iso"] == "none" and first["warning"] == NOT_ISOLATED
    assert first["notice"] == NOT_ISOLATED + "\n" and first["notes"] == [NOT_ISOLATED]
    assert first["logged"], "the hub log must warn that users are not isolated"
    assert NOT_ISOLATED in r.stderr  # the server's own log (the sandbox helper prints the notes)
    assert "cannot build" not in r.stderr  # the whole view was built, without root
    assert second == {"uid": 65534, "data": sorted(dataset.synthetic)}


def _spawner_for(user_name: str, config: Config) -> DCRLocalSpawner:
    """A DCRLocalSpawner built as JupyterHub builds it: a real User on an in-memory hub database."""
    db = orm.new_session_factory("sqlite://")()
    db.add(orm.User(name=user_name))
    db.commit()
    settings = {
        "spawner_class": DCRLocalSpawner,
        "config": config,
        "hub": HubObject(ip="127.0.0.1", port=8081),
        "domain": "",
    }
    spawner = User(db.query(orm.User).one(), settings).spawners[""]
    assert isinstance(spawner, DCRLocalSpawner)
    return spawner


def test_no_sandbox_without_a_policy_validated_at_start(tmp_path: Path) -> None:
    """A DCRLocalSpawner in a process whose hub did not validate the DCR policy at start (here: none ran)
    builds no sandbox and creates no account: the spawn fails, saying what to add to jupyterhub_config.py."""
    from dcr_spawner.hub_start import active_policy

    assert active_policy() is None
    c = Config()
    c.DCRPolicy.datasets = {}
    c.DCRLocalSpawner.home_base = str(tmp_path / "homes")
    spawner = _spawner_for(f"dcrtest-nopolicy-{secrets.token_hex(3)}", c)
    with pytest.raises(DCRError, match="did not validate its DCR policy") as info:
        asyncio.run(spawner.build_sandbox())
    assert "dcr_spawner.enable(c)" in str(info.value)
    assert spawner.account is None and not (tmp_path / "homes").exists()


def test_internal_ssl_certificates_are_written_as_the_account(tmp_path: Path) -> None:
    """move_certs copies the server's key and certificates into the account's home as the account (0600,
    owned by it, the key and certificate moved, the CA kept); a link the user planted in the home to
    redirect the write into a root-only place makes the copy fail instead of writing there as root."""
    # The home must be reachable by the account on the host (pytest's own temporary root is 0700).
    base = Path(tempfile.mkdtemp(prefix="dcrtest-ssl-"))
    base.chmod(0o755)
    c = Config()
    c.DCRPolicy.datasets = {}
    c.DCRLocalSpawner.home_base = str(base / "homes")
    user = f"dcrtest-ssl-{secrets.token_hex(3)}"
    name = account_name(user, "dcr-")
    try:
        spawner = _spawner_for(user, c)
        certs = tmp_path / "internal-ssl"
        certs.mkdir(mode=0o700)
        paths = {}
        for key in ("keyfile", "certfile", "cafile"):
            (certs / f"{key}.pem").write_text(f"{key} bytes")
            paths[key] = str(certs / f"{key}.pem")
        moved = asyncio.run(spawner.move_certs(paths))
        pw = pwd.getpwnam(name)
        for key, path in moved.items():
            st = os.lstat(path)
            assert (st.st_uid, st.st_mode & 0o777) == (pw.pw_uid, 0o600)
            assert Path(path).read_text() == f"{key} bytes" and path.startswith(pw.pw_dir + "/")
        assert sorted(p.name for p in certs.iterdir()) == ["cafile.pem"]

        # Hostile: the user replaces ~/.jupyterhub by a link into a root-only directory.
        target = base / "root-only"
        target.mkdir(mode=0o700)
        shutil.rmtree(Path(pw.pw_dir) / ".jupyterhub")
        os.symlink(target, Path(pw.pw_dir) / ".jupyterhub")
        for key in ("keyfile", "certfile"):
            (certs / f"{key}.pem").write_text(f"{key} bytes")
        with pytest.raises(DCRError, match="cannot copy the internal SSL certificates"):
            asyncio.run(spawner.move_certs(paths))
        assert list(target.iterdir()) == []
    finally:
        _userdel([name])
        shutil.rmtree(base)
