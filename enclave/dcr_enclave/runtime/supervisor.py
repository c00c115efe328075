"""The enclave supervisor: the trusted process that runs one job on real data.

Order matters, and each step refuses before the next:

1. read the launch environment (:mod:`dcr_enclave.formats.contract`); verify the grant against the hub key pinned by
   thumbprint, and that it names this job and this bundle digest;
2. unpack the bundle, refusing any other digest;
3. build the kernel sandbox once as a probe; if it cannot be built, stop before asking for a single key;
4. for each granted dataset: fresh challenge, attestation token with it as nonce, key release, then the
   manifest's file-list MAC under the released key and every encrypted file's size
   (:func:`~dcr_enclave.runtime.dataset_reader.check_dataset_files`); only once every dataset passed, decryption into private memory-backed
   storage, so a tampered manifest of any dataset refuses the job with nothing decrypted. The plaintext is
   not hashed again to recompute the dataset version: every chunk is authenticated under associated data
   naming provider, dataset, version, file and position, with a key only that version's wrapped data key
   gives, so each file is exactly what the provider encrypted under that name for that version, and the
   MAC says the manifest lists every file the provider registered (hashing would halve decryption speed);
5. run the notebook in the sandbox: its kernel starts while step 4 runs (it executes nothing until the data
   is in place), ``running`` is reported once both are done, then cell *i* of *n* (never data; under
   review no cell and no ``checking``: their times would time the notebook); kill the sandbox's whole
   process tree;
6. collect outputs (the executed notebook plus regular files created or changed in the working copy),
   apply the grant's output limits, then the statistical disclosure checks on the tables among them
   (:mod:`~dcr_enclave.runtime.disclosure`); limit violations refuse the outputs, disclosure findings hold
   them for review even under ``auto`` (refuse them if the grant names no airlock key); build the receipt
   and have it attested (nonce = its sha256); a held receipt commits to the outputs without naming them,
   and under review its end time is rounded up;
7. seal the outputs to the job's key (or the hub's airlock key when held) and write the receipt; the
   findings' details go to the airlock only.

All plaintext lives on a tmpfs mounted inside the supervisor's own mount namespace, so it disappears with
the supervisor's last process, however it ends (``kill -9`` included). A failed job reports only the cell
index and exception type; its full detail (exception value, traceback) is sealed to the airlock key when
the grant names one (:data:`~dcr_enclave.formats.contract.SEALED_FAILURE_FILE`). Nothing the notebook
names (a file, a class) reaches the receipt or a failure
report: output-limit violations are kinds only (the counts and sizes, which the notebook chooses, are sealed
for reviewers), and an error once the notebook has run is reported by its type alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.bundle import BundleManifest
from dcr_enclave.formats.digests import canonical_json, sha256_json
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import Grant, sealing_key, verify_grant
from dcr_enclave.formats.jwk import parse_jwks
from dcr_enclave.formats.receipt import build_manifest, make_reveal, output_commitment
from dcr_enclave.formats.sealing import pad_json, seal_bytes, seal_dir
from dcr_enclave.runtime.bundle_extractor import extract_bundle
from dcr_enclave.runtime.dataset_reader import fetch_datasets
from dcr_enclave.runtime.disclosure import DisclosureCheck, check_outputs
from dcr_enclave.runtime.kernel_layout import SandboxSpec
from dcr_enclave.runtime.kernel_process import check_sandbox
from dcr_enclave.runtime.notebook_run import NotebookRun, RunResult
from dcr_enclave.runtime.outputs import OutputCheck, collect_outputs
from dcr_enclave.runtime.platform_link import PlatformLink, TeeLink
from dcr_enclave.runtime.receipt_writer import output_entries, write_receipt_dir

ENV = contract.ENV
DEFAULT_TIME_QUANTUM = contract.DEFAULT_TIME_QUANTUM
#: Padding caps (see write_result): above the output byte limit, room for the tar's headers (at most a
#: few KiB per file); a failure's detail is bounded well below this.
TAR_PAD_ROOM = 4 * 2**20
FAILURE_PAD_CAP = 2**20


@dataclass
class Launch:
    """The launch environment, read once."""

    job_id: str
    bundle_digest: str
    bundle_path: Path
    grant_token: str
    hub_key_thumbprint: str
    hub_jwks: list[dict[str, Any]]
    store: Path
    output: Path
    #: ``DCR_DATASETS`` when the platform attests it (Confidential Space); checked against the grant.
    datasets: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Launch:
        missing = [
            n
            for n in contract.LAUNCH_ENV_NAMES
            if n not in env and n not in contract.OPTIONAL_LOCAL_ENV_NAMES
        ]
        if missing:
            raise DCRError(f"launch environment lacks {', '.join(missing)}")
        return cls(
            job_id=contract.check_job_id(env[ENV.JOB_ID]),
            bundle_digest=env[ENV.BUNDLE_DIGEST],
            bundle_path=Path(env[ENV.BUNDLE_URI]),
            grant_token=env[ENV.GRANT],
            hub_key_thumbprint=env[ENV.HUB_KEY_THUMBPRINT],
            hub_jwks=parse_jwks(env[ENV.HUB_JWKS], "hub JWKS"),
            store=Path(env[ENV.STORE_URI]),
            output=Path(env[ENV.OUTPUT_URI]),
            datasets=env.get(ENV.DATASETS),
        )


class JobFailed(Exception):
    """The job ended without outputs; ``report`` is all that leaves the enclave about why."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__(report.get("reason", "failed"))
        self.report = report


class Supervisor:
    def __init__(
        self,
        launch: Launch,
        link: PlatformLink,
        scratch: Path,
        sandbox_ids: tuple[int, int],
        time_quantum: float = DEFAULT_TIME_QUANTUM,
    ) -> None:
        self.launch = launch
        self.time_quantum = time_quantum
        self.link = link
        self.scratch = scratch
        self.uid, self.gid = sandbox_ids
        self.work = scratch / "work"
        self.data = scratch / "data"
        self.outputs = scratch / "outputs"
        self.started_at = time.time()

    def state(self, state: str) -> None:
        self.link.progress({"kind": contract.Progress.STATE, "state": state})

    # -- steps ------------------------------------------------------------------------------------------

    def verify_grant(self) -> Grant:
        g = verify_grant(
            self.launch.grant_token,
            self.launch.hub_jwks,
            hub_key_thumbprint=self.launch.hub_key_thumbprint,
            job_id=self.launch.job_id,
            bundle_digest=self.launch.bundle_digest,
        )
        if self.launch.datasets is not None:
            # Providers' cloud conditions pin dataset versions on this attested variable: it must say
            # exactly what the grant lets the job read, or a condition could be met by a label alone.
            granted = contract.datasets_env_value([(d.provider, d.dataset, d.version) for d in g.datasets])
            if self.launch.datasets != granted:
                raise DCRError(
                    f"the launch variable {ENV.DATASETS} does not list exactly the granted datasets"
                )
        return g

    def unpack(self) -> BundleManifest:
        # The sandbox gives the working copy to its account when it starts the kernel.
        return extract_bundle(self.launch.bundle_path, self.work, expected_digest=self.launch.bundle_digest)

    def fetch_datasets(self, g: Grant) -> tuple[list[dict[str, Any]], dict[str, str]]:
        return fetch_datasets(
            self.link, g, self.launch.grant_token, self.launch.hub_jwks, self.launch.store, self.data
        )

    def collect(self, bundle: BundleManifest, g: Grant) -> OutputCheck:
        return collect_outputs(self.work, self.outputs, bundle, g.output_limits)

    def check_disclosure(self, g: Grant) -> DisclosureCheck:
        """The disclosure checks over the supervisor's own copy of the outputs (the sandbox is dead)."""
        return check_outputs(self.outputs, g.disclosure_rules)

    def seal_failure_detail(self, g: Grant, result: RunResult) -> None:
        """Seal a failed run's full detail (cell, exception type and value, traceback) to the airlock, for
        reviewers; without an airlock key in the grant it never leaves the enclave."""
        if not g.airlock_public_key or result.detail is None:
            return
        doc = {"cell": result.cell, "status": result.status, **result.detail.to_json()}
        # The public report goes out regardless; the detail is a help to reviewers. Padded: the sealed
        # file's size is seen before any reviewer has looked, and the notebook chooses its exception.
        with contextlib.suppress(DCRError, OSError):
            seal_bytes(
                pad_json(canonical_json(doc), FAILURE_PAD_CAP),
                self.launch.output / contract.SEALED_FAILURE_FILE,
                sealing_key(g, held=True),
                job_id=g.job_id,
            )

    def finished_at(self, g: Grant) -> float:
        """The receipt's end time: under review rounded up to the time quantum, so that how long the
        notebook ran (which its code chooses) shows only to that resolution."""
        now = time.time()
        if g.release_mode != "review":
            return now
        q = self.time_quantum
        return self.started_at + math.ceil((now - self.started_at) / q) * q

    def run(self) -> int:
        g = self.verify_grant()
        seal_to = sealing_key(g)  # refuses review without an airlock before anything else happens
        self.state("launching")
        bundle = self.unpack()
        run_root = self.scratch / "run"
        run_root.mkdir(mode=0o711)
        spec = SandboxSpec(
            workdir=self.work,
            data_dir=self.data,
            uid=self.uid,
            gid=self.gid,
            wall_time=float(g.time_limit),
            memory_bytes=g.memory_bytes,
            # Kernel sockets and per-run files live on the private tmpfs too, so nothing outlives a kill.
            run_root=run_root,
        )
        self.data.mkdir(mode=0o755)
        check_sandbox(spec)  # refuse before any key is asked for
        result, datasets, conditions = self.run_on_data(g, bundle, spec)
        # The run returns only once the sandbox's whole process tree is dead.
        if result.status != "ok":
            self.seal_failure_detail(g, result)
            raise JobFailed({"reason": failure_reason(result, g), "cell": result.cell, "ename": result.ename})
        review = g.release_mode == "review"
        if not review:  # under review the researcher learns no time but the (rounded) end
            self.state("checking")
        try:
            self.outputs.mkdir()
            check = self.collect(bundle, g)
            # Tables are checked only in outputs that passed the limits (only those were copied out).
            disclosure = DisclosureCheck() if check.kinds else self.check_disclosure(g)
            decision = decide(g, check, disclosure)
            if decision == "held":
                seal_to = sealing_key(g, held=True)
            self.write_result(g, bundle, datasets, conditions, check, disclosure, decision, seal_to)
        except DCRError as e:
            # The notebook has run: a message could now name a file it created, so only the kind leaves.
            raise JobFailed(
                {
                    "reason": f"the outputs could not be collected ({type(e).__name__})",
                    "cell": None,
                    "ename": None,
                }
            ) from None
        return 0

    def run_on_data(
        self, g: Grant, bundle: BundleManifest, spec: SandboxSpec
    ) -> tuple[RunResult, list[dict[str, Any]], dict[str, str]]:
        """Start the kernel while the keys are released and the data decrypted; run the cells once both are done.

        The kernel executes nothing of the notebook's until its first cell (no start-up file of the working
        copy is read: see :mod:`dcr_enclave.sandbox`), and ``on_ready`` holds it until the data is in place,
        so starting it early only takes its start-up time off the critical path. Only then is the job
        ``running``: its kernel has started on the decrypted data. If a key or a file fails, the kernel is
        killed before any cell runs.
        """
        data_ready, aborted = threading.Event(), threading.Event()

        def on_ready() -> None:
            data_ready.wait()
            if not aborted.is_set():
                self.state("running")

        def on_cell(index: int, count: int) -> None:
            # Under review a cell's start time would time the cell before it: the researcher sees no cells.
            if g.release_mode != "review":
                self.link.progress({"kind": contract.Progress.CELL, "index": index, "count": count})

        run = NotebookRun(bundle.notebook, spec, on_cell=on_cell, on_ready=on_ready)
        outcome: list[RunResult | BaseException] = []

        def target() -> None:
            try:
                outcome.append(run.run())
            except BaseException as e:  # handed to the supervisor's thread below
                outcome.append(e)

        thread = threading.Thread(target=target, name="notebook-run", daemon=True)
        thread.start()
        try:
            datasets, conditions = self.fetch_datasets(g)
        except BaseException:
            aborted.set()
            run.cancel()
            data_ready.set()
            thread.join()
            raise
        # From here the run's thread alone uses the link (on_ready, on_cell) until it ends.
        data_ready.set()
        thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0], datasets, conditions

    def write_result(
        self,
        g: Grant,
        bundle: BundleManifest,
        datasets: list[dict[str, Any]],
        conditions: dict[str, str],
        check: OutputCheck,
        disclosure: DisclosureCheck,
        decision: str,
        seal_to: bytes,
    ) -> None:
        """Build, attest and write the receipt; seal what may leave to whom it may go.

        * released: the outputs, sealed to the job's key; the receipt lists them;
        * held: the outputs and the reveal of their commitment, sealed to the airlock; the public receipt
          only commits to them (a salted digest), so that no name, size or digest the notebook chose is
          public before a reviewer releases them;
        * rejected: no output; the receipt names the kinds of problem.

        Whenever there is a finding (an output-limit violation or a disclosure finding) and the grant names
        an airlock key, the exact figures and the disclosure details are sealed to the airlock
        (:data:`~dcr_enclave.formats.contract.SEALED_CHECK_FILE`).
        """
        out = self.launch.output
        entries = [] if decision == "rejected" else output_entries(self.outputs)
        commitment = None
        # What is sealed for reviewers is padded (sealing.padded_size): its size is seen outside the
        # enclave before anyone has looked, and the notebook chooses what it wrote.
        pad_cap = g.output_limits.max_bytes + TAR_PAD_ROOM
        if decision == "held":
            reveal = make_reveal(entries, secrets.token_bytes(32))
            commitment = output_commitment(reveal)
            sealed_reveal = pad_json(canonical_json(reveal), pad_cap)
            seal_bytes(sealed_reveal, out / contract.SEALED_REVEAL_FILE, seal_to, job_id=g.job_id)
            entries = []
        platform = self.link.info()
        manifest = build_manifest(
            job_id=g.job_id,
            notebook=bundle.notebook,
            bundle_digest=g.bundle_digest,
            enclave_kind=platform["kind"],
            image_digest=platform["image_digest"],
            hub_key_thumbprint=self.launch.hub_key_thumbprint,
            grant_token=g.token,
            grant_claims=g.claims(),
            datasets=datasets,
            output_policy=sha256_json(g.output_limits.to_json()),
            conditions=conditions,
            outputs=entries,
            violations=check.kinds,
            disclosure=disclosure.kinds,
            release_mode=g.release_mode,
            decision=decision,
            started_at=self.started_at,
            finished_at=self.finished_at(g),
            outputs_commitment=commitment,
        )
        token = self.link.token(contract.RECEIPT_AUDIENCE, [manifest.digest])
        if decision != "rejected":
            padding = pad_cap if decision == "held" else None
            seal_dir(self.outputs, out / contract.SEALED_OUTPUTS_FILE, seal_to, g.job_id, pad_cap=padding)
        if (check.kinds or disclosure.kinds) and g.airlock_public_key:
            details = canonical_json({"violations": check.details, "disclosure": disclosure.details})
            details = pad_json(details, pad_cap)
            airlock = sealing_key(g, held=True)
            seal_bytes(details, out / contract.SEALED_CHECK_FILE, airlock, job_id=g.job_id)
        write_receipt_dir(out, manifest, token, platform["jwks"])


def decide(g: Grant, check: OutputCheck, disclosure: DisclosureCheck) -> str:
    """The release decision: output-limit violations refuse the outputs; disclosure findings hold them for
    review whatever the release mode (refuse them when the grant names no airlock that could hold them);
    otherwise review holds and ``auto`` releases."""
    if check.kinds:
        return "rejected"
    if disclosure.kinds:
        return "held" if g.airlock_public_key else "rejected"
    return "held" if g.release_mode == "review" else "released"


def failure_reason(result: RunResult, g: Grant) -> str:
    """The reason a failed run reports. Built only from what the grant sets (the time limit) and the cell
    index the report carries anyway: nothing else the notebook chooses may reach it."""
    if result.status == "timeout":
        where = f"in cell {result.cell + 1}" if result.cell is not None else "before the first cell"
        return f"time limit of {g.time_limit} s reached {where}"
    return result.status


def mount_scratch(path: Path, size_bytes: int) -> None:
    """Mount a private tmpfs on ``path`` (this process must be in its own mount namespace)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size_bytes},mode=0700,nosuid,nodev,huge=within_size",
            "dcr-scratch",
            str(path),
        ],
        check=True,
        capture_output=True,
    )


def main() -> int:
    env = dict(os.environ)
    link_fd = int(env[contract.LOCAL_LINK_FD])
    os.set_inheritable(link_fd, False)  # nothing the supervisor starts may hold the link
    link = TeeLink.from_fd(link_fd)
    try:
        launch = Launch.from_env(env)
        uid, gid = (int(x) for x in env[contract.LOCAL_SANDBOX_IDS].split(":"))
        scratch = Path(env[contract.LOCAL_SCRATCH])
        mount_scratch(scratch, int(env.get(contract.LOCAL_SCRATCH_BYTES, str(2 * 2**30))))
        quantum = float(env.get(contract.LOCAL_TIME_QUANTUM, str(DEFAULT_TIME_QUANTUM)))
        sup = Supervisor(launch, link, scratch, (uid, gid), quantum)
        return sup.run()
    except JobFailed as e:
        _fail(link, e.report)
        return 1
    except DCRError as e:
        _fail(link, {"reason": str(e), "cell": None, "ename": None})
        return 1
    except Exception as e:  # a bug: say which kind, never the message (it could carry data)
        _fail(link, {"reason": f"supervisor error ({type(e).__name__})", "cell": None, "ename": None})
        return 1
    finally:
        link.close()


def _fail(link: PlatformLink, report: dict[str, Any]) -> None:
    msg = {"kind": contract.Progress.FAILED, **report}
    try:
        link.progress(msg)
    except (DCRError, OSError):
        print(json.dumps(msg), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
