"""The enclave supervisor: the trusted process that runs one job on real data.

Order matters, and each step refuses before the next:

1. read the launch environment (:mod:`dcr_enclave.contract`); verify the grant against the hub key pinned by
   thumbprint, and that it names this job and this bundle digest;
2. unpack the bundle, refusing any other digest;
3. build the kernel sandbox once as a probe; if it cannot be built, stop before asking for a single key;
4. for each granted dataset: fresh challenge, attestation token with it as nonce, key release, then the
   manifest's file-list MAC under the released key and every encrypted file's size
   (:func:`check_dataset_files`); only once every dataset passed, decryption into private memory-backed
   storage, so a tampered manifest of any dataset refuses the job with nothing decrypted. The plaintext is
   not hashed again to recompute the dataset version: every chunk is authenticated under associated data
   naming provider, dataset, version, file and position, with a key only that version's wrapped data key
   gives, so each file is exactly what the provider encrypted under that name for that version, and the
   MAC says the manifest lists every file the provider registered (hashing would halve decryption speed);
5. run the notebook in the sandbox: its kernel starts while step 4 runs (it executes nothing until the data
   is in place), ``running`` is reported once both are done, then cell *i* of *n* (never data); kill the
   sandbox's whole process tree;
6. collect outputs (the executed notebook plus regular files created or changed in the working copy),
   apply the grant's output limits, build the receipt and have it attested (nonce = its sha256);
7. seal the outputs to the job's key (or the hub's airlock key under review) and write the receipt.

All plaintext lives on a tmpfs mounted inside the supervisor's own mount namespace, so it disappears with
the supervisor's last process, however it ends (``kill -9`` included). A failed job reports only the cell
index and exception type. Nothing the notebook names (a file, a class) reaches the receipt or a failure
report: output-limit violations are kinds and counts, and an error once the notebook has run is reported
by its type alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import contract
from .bundle import BundleManifest, extract_bundle
from .dataset import STORE_ALTERED_HINT, DatasetFile, DatasetVersion
from .digests import sha256_file, sha256_json
from .errors import DCRError, IntegrityError
from .grant import Grant, sealing_key, verify_grant
from .jwk import parse_jwks
from .receipt import ReceiptManifest, build_manifest, output_entries, write_receipt_dir
from .sandbox import NotebookRun, RunResult, SandboxSpec, check_sandbox
from .sealing import seal_dir
from .store import Store
from .streamcrypt import FileContext, decrypt_file
from .teelink import TeeLink

ENV = contract.ENV
#: What a path needs to be an output: UTF-8, and no control character or backslash (the receipt's schema
#: and the sealed tar refuse them), at most 4096 bytes with 255 per component.
_BAD_NAME_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_PATH_BYTES = 4096
_MAX_NAME_BYTES = 255


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

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Launch:
        missing = [n for n in contract.LAUNCH_ENV_NAMES if n not in env and n != ENV.PROGRESS_URI]
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
        )


class JobFailed(Exception):
    """The job ended without outputs; ``report`` is all that leaves the enclave about why."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__(report.get("reason", "failed"))
        self.report = report


class Supervisor:
    def __init__(self, launch: Launch, link: TeeLink, scratch: Path, sandbox_ids: tuple[int, int]) -> None:
        self.launch = launch
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
        return verify_grant(
            self.launch.grant_token,
            self.launch.hub_jwks,
            hub_key_thumbprint=self.launch.hub_key_thumbprint,
            job_id=self.launch.job_id,
            bundle_digest=self.launch.bundle_digest,
        )

    def unpack(self) -> BundleManifest:
        # The sandbox gives the working copy to its account when it starts the kernel.
        return extract_bundle(self.launch.bundle_path, self.work, expected_digest=self.launch.bundle_digest)

    def fetch_datasets(self, g: Grant) -> tuple[list[dict[str, Any]], dict[str, str]]:
        store = Store(self.launch.store)
        receipt_datasets = []
        conditions = {}
        # Every key is released and every manifest checked before the first file is decrypted.
        checked: list[tuple[DatasetVersion, bytes, list[tuple[DatasetFile, Path]]]] = []
        for d in g.datasets:
            try:
                manifest: DatasetVersion = store.load(d.provider, d.dataset, d.version)
            except DCRError as e:
                raise type(e)(f"dataset {d.key}: {e.message}", hint=e.hint) from None
            challenge = self.link.challenge()
            token = self.link.token(contract.KEY_RELEASE_AUDIENCE, [challenge])
            data_key, conditions[d.key] = self.link.release(
                provider=d.provider,
                dataset=d.dataset,
                version=d.version,
                wrapped_key=manifest.key.to_json(),
                token=token,
                grant=self.launch.grant_token,
                hub_jwks=self.launch.hub_jwks,
                challenge=challenge,
            )
            checked.append((manifest, data_key, check_dataset_files(store, manifest, data_key)))
        for manifest, data_key, files in checked:
            target = self.data / manifest.provider / manifest.dataset
            target.mkdir(parents=True, exist_ok=True)
            for f, src in files:
                # Each chunk authenticates under associated data naming this provider, dataset, version,
                # file and position, so the plaintext is exactly what the provider encrypted for this
                # version; hashing it again would halve decryption speed for no further assurance.
                ctx = FileContext(manifest.provider, manifest.dataset, manifest.version, f.name)
                decrypt_file(src, target / f.name, data_key, ctx, mode=0o444, digest=False)
            receipt_datasets.append(
                {
                    "provider": manifest.provider,
                    "dataset": manifest.dataset,
                    "version": manifest.version,
                    "files": [
                        {"name": f.name, "ciphertext_sha256": f.ciphertext_sha256} for f in manifest.files
                    ],
                }
            )
        for p in [self.data, *self.data.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o555)
        return receipt_datasets, conditions

    def collect(self, bundle: BundleManifest, g: Grant) -> list[str]:
        """Copy outputs out of the (dead) sandbox's working copy; return the output-limit violations.

        A violation is a kind of problem and a count, never a path: names are the notebook's to choose, the
        violations go into the public receipt and the failure reason, and a name can spell out data.
        """
        original = {f.path: f.sha256 for f in bundle.files}
        links = special = unusable = 0
        picked: list[tuple[str, Path, int]] = []
        for dirpath, dirnames, filenames in os.walk(self.work):
            for name in [*dirnames, *filenames]:
                p = Path(dirpath, name)
                st = p.lstat()
                if stat.S_ISDIR(st.st_mode):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    continue
                if not stat.S_ISREG(st.st_mode):
                    special += 1
                    continue
                rel = p.relative_to(self.work).as_posix()
                if rel in original and rel != bundle.notebook and sha256_file(p)[0] == original[rel]:
                    continue  # an input the run left unchanged
                if not _usable_output_path(rel):
                    unusable += 1
                    continue
                picked.append((rel, p, st.st_size))
        limits = g.output_limits
        violations = []
        if links:
            violations.append(_count(links, "symbolic link", "symbolic links"))
        if special:
            violations.append(_count(special, "special file", "special files"))
        if unusable:
            violations.append(
                _count(
                    unusable,
                    "file with a name that cannot be an output",
                    "files with names that cannot be outputs",
                )
            )
        if limits.allowed_suffixes:
            suffixes = tuple(limits.allowed_suffixes)
            refused = sum(1 for rel, _, _ in picked if not rel.lower().endswith(suffixes))
            if refused:
                violations.append(
                    _count(
                        refused,
                        "file of a type the grant does not allow",
                        "files of a type the grant does not allow",
                    )
                )
        if len(picked) > limits.max_files:
            violations.append(f"too many files: {len(picked)} > {limits.max_files}")
        total = sum(size for _, _, size in picked)
        if total > limits.max_bytes:
            violations.append(f"too many bytes: {total} > {limits.max_bytes}")
        if not violations:
            for rel, p, _ in picked:
                dest = self.outputs / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dest)
        return violations

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
            raise JobFailed({"reason": result.status, "cell": result.cell, "ename": result.ename})
        self.state("checking")
        try:
            self.outputs.mkdir()
            violations = self.collect(bundle, g)
            review = g.release_mode == "review"
            decision = "rejected" if violations else ("held" if review else "released")
            manifest = self.receipt_manifest(g, bundle, datasets, conditions, violations, decision)
            self.write_result(g, manifest, seal_to if not violations else None)
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

    def receipt_manifest(
        self,
        g: Grant,
        bundle: BundleManifest,
        datasets: list[dict[str, Any]],
        conditions: dict[str, str],
        violations: list[str],
        decision: str,
    ) -> ReceiptManifest:
        platform = self.link.call("info")
        return build_manifest(
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
            outputs=[] if violations else output_entries(self.outputs),
            violations=violations,
            release_mode=g.release_mode,
            decision=decision,
            started_at=self.started_at,
            finished_at=time.time(),
        )

    def write_result(self, g: Grant, manifest: ReceiptManifest, seal_to: bytes | None) -> None:
        out = self.launch.output
        token = self.link.token(contract.RECEIPT_AUDIENCE, [manifest.digest])
        jwks = self.link.call("info")["jwks"]
        if seal_to is not None:
            seal_dir(self.outputs, out / contract.SEALED_OUTPUTS_FILE, seal_to, g.job_id)
        write_receipt_dir(out, manifest, token, jwks)


def check_dataset_files(
    store: Store, manifest: DatasetVersion, data_key: bytes
) -> list[tuple[DatasetFile, Path]]:
    """The files to decrypt, once the manifest's file list authenticates under the released data key and
    every encrypted file is in the store at the size the manifest gives; refuses naming the dataset.

    Without the MAC a storage attacker could drop a file entry and the job would run on part of the data;
    the size check catches a missing, truncated or extended file before the first byte is decrypted (the
    decryption's own header and chunk checks stay the authority on content).
    """
    manifest.check_files_mac(data_key)
    files = []
    for f in manifest.files:
        src = store.ciphertext_path(manifest, f.name)
        try:
            st = src.stat()
        except FileNotFoundError:
            problem = "is missing from the store"
        except OSError as e:
            raise DCRError(
                f"dataset {manifest.ref}: cannot read the encrypted file of {f.name}: {e.strerror}"
            ) from None
        else:
            if not stat.S_ISREG(st.st_mode):
                problem = "is not a regular file"
            elif st.st_size != f.ciphertext_size:
                problem = f"is {st.st_size} bytes, not the {f.ciphertext_size} its manifest gives"
            else:
                files.append((f, src))
                continue
        raise IntegrityError(
            f"dataset {manifest.ref} version {manifest.version}: the encrypted file of {f.name} {problem}",
            hint=STORE_ALTERED_HINT,
        )
    return files


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _usable_output_path(rel: str) -> bool:
    """Whether the receipt and the sealed tar can carry ``rel`` (see :data:`_BAD_NAME_CHAR`)."""
    try:
        encoded = rel.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 (os.walk hands it over with surrogates)
        return False
    return (
        len(encoded) <= _MAX_PATH_BYTES
        and not _BAD_NAME_CHAR.search(rel)
        and all(len(part.encode("utf-8")) <= _MAX_NAME_BYTES for part in rel.split("/"))
    )


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
        sup = Supervisor(launch, link, scratch, (uid, gid))
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


def _fail(link: TeeLink, report: dict[str, Any]) -> None:
    msg = {"kind": contract.Progress.FAILED, **report}
    try:
        link.progress(msg)
    except (DCRError, OSError):
        print(json.dumps(msg), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
