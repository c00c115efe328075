"""Run the whole suite as ``make test`` does: in two lanes side by side, one per core.

The **CPU lane** holds the modules that mostly compute (synthesis, dataset registration, file formats, the
policy and grant service) and those that look at nothing machine-wide and leave nothing a machine-wide look
of the other lane could take for its own: hubs and databases of their own on free ports, the cloud tests
(loopback Google; their VMs' kernel accounts from an id range no local host uses; one of them drives
Chromium), read-only checks of the installed extension. Its numerical libraries use one thread each, so it
keeps to about one core. Before its tests it makes the session's demo seed (``tests/demo_seed.py``: the
first run of ``dcr demo``, which synthesizes the demo's data, then stops; no job, no account), which the
main lane's demo and browser modules, run last, copy. The **main lane** runs everything else (every local
enclave host, the demos, the local spawner's accounts, the tests that scan processes, mounts or accounts),
its output streamed as usual; the CPU lane's output follows when both are done. The exit status is the first
failing lane's (a lane that selected no test does not fail the run).

Arguments are passed to pytest in both lanes (``make test PYTEST_ARGS="-x"``). Arguments that name test
files or directories run one ordinary pytest over exactly those instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import demo_seed

HERE = Path(__file__).resolve().parent
#: Modules that mostly compute and look at nothing machine-wide: about 40 % of the suite's time.
CPU_LANE = (
    "test_synthesis.py",
    "test_provider_options.py",
    "test_provider.py",
    "test_provider_versions.py",
    "test_provider_gcp.py",
    "test_helm.py",
    "test_enclave_image.py",
    "test_dataset_files_mac.py",
    "test_streamcrypt.py",
    "test_attestation.py",
    "test_sealing.py",
    "test_verify.py",
    "test_disclosure.py",
    "test_kube_spawner.py",
    # Hubs and databases of their own on free ports, nothing the other lane looks at.
    "test_policy.py",
    "test_grant_service.py",
    "test_audit.py",
    "test_layers.py",
    "test_manager.py",
    "test_airlock.py",
    "test_airlock_hub.py",
    "test_review_render.py",
    "test_bundle.py",
    "test_grant.py",
    "test_jobstore.py",
    # Google's services are loopback fakes and an emulator of their own; the "VM" is a process in its own
    # namespaces, its kernel's account id from a range no local host uses (gcp_fakes.google.vm_sandbox_ids).
    # Its tmpfs may reuse a device number the other lane's scan remembers: that scan marks what it watches.
    "test_cloud_launcher.py",
    "test_cloud_enclave.py",
    "test_cloud_hub.py",
    "test_cloud_browser.py",
    # Read-only checks of the installed extension and of settings; a refusal in a /proc of its own.
    "test_labextension.py",
    "test_platform.py",
    "test_release_policy.py",
    "test_process_visibility.py",
)
#: The main lane's modules that start ``dcr demo`` from the session's demo seed: run last, by when the seed
#: the CPU lane made first is there.
SEED_USERS = ("test_checkout_paths.py", "test_demo.py", "test_browser.py")
NO_TESTS = 5  # pytest's exit status when a selection holds no test


def names_tests(arg: str) -> bool:
    return not arg.startswith("-") and Path(arg.split("::", 1)[0]).exists()


def main_lane_files() -> list[str]:
    """Every test module outside the CPU lane, those that need the demo seed last."""
    names = sorted(p.name for p in HERE.glob("test_*.py") if p.name not in CPU_LANE)
    ordered = [n for n in names if n not in SEED_USERS] + [n for n in SEED_USERS if n in names]
    return [str(HERE / n) for n in ordered]


class CpuLane:
    """The CPU lane in a thread: the demo's first run (when asked for), then its tests, both into ``log``."""

    def __init__(self, command: list[str], env: dict[str, str], log: IO[bytes], seed: Path | None) -> None:
        seeding = [[sys.executable, str(HERE / "demo_seed.py"), str(seed)]] if seed is not None else []
        self.steps, self.env, self.log = [*seeding, command], env, log
        self._lock = threading.Lock()
        self._stopped = False
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        status = NO_TESTS
        for step in self.steps:
            with self._lock:
                if self._stopped:
                    break
                self._proc = subprocess.Popen(step, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
            # Only the tests' status counts: a failed seed is reported by the main lane's tests that need it.
            status = self._proc.wait()
        return status

    def stop(self) -> None:
        """Interrupted: leave nothing of this lane running."""
        with self._lock:
            self._stopped = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    if any(names_tests(a) for a in argv):
        return subprocess.call([*pytest, "--durations=25", *argv])
    cpu_files = [str(HERE / name) for name in CPU_LANE]
    basetemp = tempfile.mkdtemp(prefix="dcr-cpu-lane-")
    # The whole suite: the demo's data is synthesized in the CPU lane, before its tests (an explicit
    # selection makes it only if a selected test asks).
    seed = Path(tempfile.mkdtemp(prefix="dcr-demo-seed-")) if not argv else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    main_env = {**os.environ, **({demo_seed.SEED_ENV: str(seed)} if seed else {})}
    cpu_command = [
        *pytest,
        "-p",
        "no:cacheprovider",
        f"--basetemp={basetemp}",
        "--durations=10",
        *cpu_files,
        *argv,
    ]
    with tempfile.TemporaryFile() as log, ThreadPoolExecutor(1) as pool:
        lane = CpuLane(cpu_command, env, log, seed)
        cpu = pool.submit(lane.run)
        try:
            main_status = subprocess.call(
                [*pytest, "--durations=25", *main_lane_files(), *argv], env=main_env
            )
            cpu_status = cpu.result()
        finally:
            lane.stop()
        log.seek(0)
        sys.stdout.flush()
        print(f"\n{'=' * 30} the CPU lane ({', '.join(CPU_LANE)}) {'=' * 30}", flush=True)
        shutil.copyfileobj(log, sys.stdout.buffer)
        sys.stdout.flush()
    shutil.rmtree(basetemp, ignore_errors=True)
    if seed is not None:
        shutil.rmtree(seed, ignore_errors=True)
    statuses = [s for s in (main_status, cpu_status) if s != NO_TESTS]
    if not statuses:
        return NO_TESTS
    return next((s for s in statuses if s != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
