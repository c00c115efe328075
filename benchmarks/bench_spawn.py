"""Benchmark: spawn time of DCRLocalSpawner against SimpleLocalProcessSpawner, on one real hub.

One JupyterHub (``tests/hub_harness.py``: real configurable-http-proxy, DummyAuthenticator, free loopback
ports) runs both spawners at once: its spawner class picks ``DCRLocalSpawner`` for one user and
JupyterHub's ``SimpleLocalProcessSpawner`` for the other, so both measurements share the hub, the proxy, the
machine state and the single-user command. The DCR user is entitled to 10 datasets of 100 MB each
(``--datasets``, ``--mib``), registered with ``dcr provider add`` in a root-only store in a temporary
directory that is deleted afterwards.

A spawn is timed from the ``POST /hub/api/users/<name>/server`` to the moment the hub reports the server
ready (the hub itself waits until the server answers HTTP). The two users alternate, ``--repeat`` times
each, after one untimed warm-up spawn each (the DCR warm-up also creates the user's system account; it is
reported separately). The script prints median, min and max per spawner and the ratio of the medians, for
two intervals: request -> the server answers HTTP (probed every 10 ms), and, from the hub's log, the
spawner starting the process -> the server logging that it runs (this one excludes the hub's request
handling and the probing, so it isolates what the sandbox adds to the server's start).

It also times the sandbox helper alone (namespace, /data with every entitled file bound read-only, covers,
dropping to the account, then ``exec`` of ``/bin/true``) against running ``/bin/true`` directly, and checks
that no data was copied: each file a DCR kernel sees under ``/data`` is the store's own inode.

Needs root (system accounts, mount namespaces). Run from the repository root::

    .venv/bin/python benchmarks/bench_spawn.py [--datasets 10] [--mib 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pwd
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from hub_harness import HarnessError, Hub  # noqa: E402

from dcr_enclave.pack.store import Store  # noqa: E402
from dcr_spawner import sandbox_mounts  # noqa: E402
from dcr_spawner.local import account_name  # noqa: E402

PICKER = """
from jupyterhub.spawner import SimpleLocalProcessSpawner
from dcr_spawner.local import DCRLocalSpawner

class BenchPicker(DCRLocalSpawner):
    # One hub, two spawners: the class JupyterHub instantiates hands back the one for this user.
    def __new__(cls, *args, **kwargs):
        user = kwargs.get("user")
        if user is not None and user.name.startswith("bench-simple"):
            return SimpleLocalProcessSpawner(*args, **kwargs)
        return DCRLocalSpawner(*args, **kwargs)

c.JupyterHub.spawner_class = BenchPicker
c.SimpleLocalProcessSpawner.args = ["--allow-root"]
# The spawn request returns at once; the script times readiness itself.
c.JupyterHub.slow_spawn_timeout = 0
"""


def make_datasets(base: Path, count: int, mib: int) -> tuple[Path, dict[str, str]]:
    """``count`` datasets of one ``mib`` MiB file each in a new root-only store; returns ref -> version."""
    store = base / "store"
    inputs = base / "inputs"
    inputs.mkdir()
    # One MiB of CSV text (provider add takes UTF-8 tables): 16,384 lines of 63 hex digits and a newline.
    block = b"".join(os.urandom(32).hex()[:63].encode() + b"\n" for _ in range(1 << 14))
    versions = {}
    for i in range(count):
        real, synthetic = inputs / f"table{i}.csv", inputs / f"table{i}-synthetic.csv"
        for path, first in ((real, b"0" * 63), (synthetic, b"f" * 63)):
            with open(path, "wb") as f:
                f.write(b"row_%d\n%s\n" % (i, first))  # one column; the two files differ
                for _ in range(mib):
                    f.write(block)
        ref = f"bench/set{i:02d}"
        r = subprocess.run(
            [sys.executable, "-m", "dcr_enclave", "provider", "add", "--store", str(store), "--provider", "bench",
             "--dataset", f"set{i:02d}", "--real", str(real), "--synthetic", str(synthetic)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"dcr provider add failed: {r.stderr}")
        versions[ref] = Store(store).versions("bench", f"set{i:02d}")[-1].version
        real.unlink()
        synthetic.unlink()
    store.chmod(0o700)
    return store, versions


def timed_spawn(hub: Hub, user: str, timeout: float = 120) -> tuple[float, float]:
    """Seconds from the spawn request until the server answers HTTP, and until the hub reports it ready.

    The hub's own readiness check backs off exponentially (up to 5 s between probes), which quantises the
    second figure; the first is measured by probing the server itself every 10 ms.
    """
    start = time.perf_counter()
    r = hub.api("POST", f"/users/{user}/server", json_body={})
    if r.status_code not in (201, 202):
        raise SystemExit(f"spawn of {user} refused: {r.status_code} {r.text}\n{hub.log()[-3000:]}")
    answered = None
    url = None
    while True:
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"{user}'s server was not ready in {timeout} s\n{hub.log()[-3000:]}")
        if answered is None:
            if url is None:
                with contextlib.suppress(HarnessError, KeyError, psutil.Error):
                    url = hub.server_env(user)["JUPYTERHUB_SERVICE_URL"].rstrip("/") + "/api"
            if url is not None:
                try:
                    if requests.get(url, timeout=1).status_code == 200:
                        answered = time.perf_counter() - start
                except requests.RequestException:
                    pass
        else:
            server = (hub.api("GET", f"/users/{user}").json().get("servers") or {}).get("")
            if server and server.get("ready"):
                return answered, time.perf_counter() - start
        time.sleep(0.01)


def check_no_copies(hub: Hub, user: str, token: str, store: Path) -> int:
    """Every file under the DCR user's /data is a store inode (same device and inode number)."""
    code = (
        "import json, os\n"
        "print(json.dumps([[os.path.join(r, f), os.stat(os.path.join(r, f)).st_dev, os.stat(os.path.join(r, f)).st_ino]"
        " for r, _d, fs in os.walk('/data') for f in fs]))"
    )
    result = hub.run_code(user, code, token=token)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    store_inodes = {(st.st_dev, st.st_ino) for p in store.rglob("synthetic/*") if (st := p.stat())}
    for path, dev, ino in seen:
        if (dev, ino) not in store_inodes:
            raise SystemExit(f"{path} in the sandbox is not a store file: data was copied")
    return len(seen)


def helper_cost(store: Path, homes: Path, repeat: int) -> tuple[float, float]:
    """Median seconds of the sandbox helper + /bin/true, and of /bin/true alone."""
    files = [
        sandbox_mounts.DataFile("bench", p.parents[2].name, p.name, str(p))
        for p in sorted(store.rglob("synthetic/*"))
    ]
    home = homes / "nobody-bench"
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, 65534, 65534)
    plan = sandbox_mounts.build_plan(
        mode="root", account="nobody", uid=65534, gid=65534, groups=[65534], home=str(home), home_base=str(homes),
        files=files, hidden=[str(store)], needed=sandbox_mounts.python_roots(), private_tmp_size="1G",
    )  # fmt: skip
    argv = sandbox_mounts.helper_argv(plan, ["/bin/true"])
    with_helper, bare = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        with_helper.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        bare.append(time.perf_counter() - t)
    return statistics.median(with_helper), statistics.median(bare)


def launch_times(log: str) -> dict[str, list[float]]:
    """Per spawner, seconds from the hub's "spawning" log line to the server's "is running" line."""
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+")
    out: dict[str, list[float]] = {"dcr": [], "simple": []}
    current: tuple[str, datetime.datetime] | None = None
    for line in log.splitlines():
        m = stamp.search(line)
        if not m:
            continue
        at = datetime.datetime.strptime(m.group(0), "%Y-%m-%d %H:%M:%S.%f")
        if "DCR: spawning" in line:
            current = ("dcr", at)
        elif "JupyterHub spawner:" in line and "Spawning " in line:
            current = ("simple", at)
        elif "Jupyter Server" in line and "is running" in line and current:
            out[current[0]].append((at - current[1]).total_seconds())
            current = None
    return out


def summary(name: str, xs: list[float]) -> str:
    return f"{name:<28} median {statistics.median(xs):6.3f} s   min {min(xs):6.3f} s   max {max(xs):6.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=int, default=10)
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep-log", type=Path, help="copy the hub's log here (servers' logs included)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: DCRLocalSpawner creates system accounts and mount namespaces")

    base = Path(tempfile.mkdtemp(prefix="dcr-bench-spawn-"))
    suffix = secrets.token_hex(3)
    dcr_user, simple_user = f"bench-dcr-{suffix}", f"bench-simple-{suffix}"
    account = account_name(dcr_user, "dcr-")
    hub = None
    try:
        t = time.perf_counter()
        store, versions = make_datasets(base, args.datasets, args.mib)
        print(f"{args.datasets} datasets of {args.mib} MiB registered in {time.perf_counter() - t:.1f} s")
        policy = {
            ref: {"version": v, "store": str(store), "entitled": {"users": [dcr_user]}}
            for ref, v in versions.items()
        }
        homes = base / "homes"
        config = (
            "import dcr_spawner\n"
            f"c.DCRPolicy.datasets = {policy!r}\n"
            f"c.DCRLocalSpawner.home_base = {str(homes)!r}\n"
            "dcr_spawner.enable(c)\n" + PICKER
        )
        hub = Hub(base / "hub", spawner_class="dcr-local", config=config)
        hub.start()
        token = hub.new_token(dcr_user)
        hub.create_user(simple_user)
        answer: dict[str, list[float]] = {dcr_user: [], simple_user: []}
        ready: dict[str, list[float]] = {dcr_user: [], simple_user: []}
        first = {}
        for user in (dcr_user, simple_user):
            first[user] = timed_spawn(hub, user)
            if user == dcr_user:
                files = check_no_copies(hub, user, token, store)
            hub.stop_server(user)
        for _ in range(args.repeat):
            for user in (dcr_user, simple_user):
                a, r = timed_spawn(hub, user)
                answer[user].append(a)
                ready[user].append(r)
                hub.stop_server(user)
        print(
            "first spawn (untimed warm-up; DCR creates the account): "
            f"DCR {first[dcr_user][0]:.3f} s, simple {first[simple_user][0]:.3f} s to answer"
        )
        print("spawn request -> server answers HTTP:")
        print(summary("  DCRLocalSpawner", answer[dcr_user]))
        print(summary("  SimpleLocalProcessSpawner", answer[simple_user]))
        ratio = statistics.median(answer[dcr_user]) / statistics.median(answer[simple_user])
        print(f"  ratio DCR / simple (medians): {ratio:.3f}")
        print("spawn request -> hub reports ready (quantised by the hub's backoff):")
        print(summary("  DCRLocalSpawner", ready[dcr_user]))
        print(summary("  SimpleLocalProcessSpawner", ready[simple_user]))
        ratio = statistics.median(ready[dcr_user]) / statistics.median(ready[simple_user])
        print(f"  ratio DCR / simple (medians): {ratio:.3f}")
        print(f"no copies: all {files} files under the DCR sandbox's /data are the store's own inodes")
        launch = launch_times(hub.log())
        print("process start -> server running (the servers' own log lines; includes the sandbox helper):")
        print(summary("  DCRLocalSpawner", launch["dcr"][1:]))
        print(summary("  SimpleLocalProcessSpawner", launch["simple"][1:]))
        ratio = statistics.median(launch["dcr"][1:]) / statistics.median(launch["simple"][1:])
        print(f"  ratio DCR / simple (medians): {ratio:.3f}")
        planned = [float(m) for m in re.findall(r"sandbox planned in (\d+) ms", hub.log())]
        if planned:
            print(
                f"hub side (policy, account, checks, mount plan): median {statistics.median(planned):.0f} ms "
                f"over {len(planned)} spawns, first {planned[0]:.0f} ms (includes useradd)"
            )
        if args.keep_log:
            shutil.copy(hub.log_file, args.keep_log)
        hub.stop()
        sandbox, bare = helper_cost(store, base / "helper-homes", max(args.repeat, 10))
        print(f"sandbox helper + /bin/true: {sandbox * 1000:.1f} ms   /bin/true alone: {bare * 1000:.1f} ms")
    finally:
        if hub is not None:
            hub.stop()
        try:
            pwd.getpwnam(account)
            subprocess.run(["userdel", account], check=False)
        except KeyError:
            pass
        shutil.rmtree(base, ignore_errors=True)
        requests.Session().close()


if __name__ == "__main__":
    main()
