"""The job manager: submission, the reconciler, events, and opening results in the user's space.

Every state change is stored before its side effect (grant request, launch, cancel, collect), so a server
that stops at any point finds each job where it left it and the reconciler carries it on:

* a job with a grant but no launch record is launched again (the backend launch is idempotent by grant id);
* a job the backend reports finished is completed (results collected and opened);
* a job the backend no longer knows is failed with a reason;
* a running job is watched again.

A job that has ended keeps its state (the store refuses to change it, :class:`JobEnded`). A cancel can
land while a submission is still asking for the grant or launching: the submission reads the job again
after each wait and stops (or stops what it just launched) when it finds the job cancelled.

A submission whose grant the grant source refuses (:class:`APIError`, e.g. the hub's 403) leaves nothing:
its record, bundle and key are removed, and no event was emitted for it (the first event of a job is sent
once its grant is in hand). A grant service that cannot be reached leaves the job ``failed`` (503): the hub
may have recorded the job before the answer was lost.

Events (``EVENT_SCHEMA_ID``) carry the state and cell *i* of *n* only, never data.

The manager also answers the JupyterLab extension's questions that are not about one submission: what a
submission would bundle and whether its grant would be given (:meth:`JobManager.preview`, the grant source's
dry run), which datasets the user may use
(:meth:`JobManager.datasets`) and whether a job's receipt verifies against the deployment's trust anchors
(:meth:`JobManager.verify`, the checks of ``dcr verify``).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import io
import json
import mimetypes
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import jwt

from dcr_enclave.formats import contract
from dcr_enclave.formats.bundle import BundleLimits
from dcr_enclave.formats.errors import DCRError, LimitError
from dcr_enclave.formats.receipt import hash_regular_file, scan_outputs
from dcr_enclave.formats.unsealing import open_dir, open_file
from dcr_enclave.pack.bundle_builder import build_bundle, data_references, plan_bundle
from dcr_enclave.verify.receipt import check_receipt_dir, open_commitment
from dcr_enclave.verify.trust import TrustAnchors

from .backends.base import Backend, BackendStatus
from .errors import APIError, Conflict, NotFound, TooLarge, Unavailable
from .executed import write_marked_copy
from .grant_sources import GrantRefused, GrantSource, NotSupported
from .jobkeys import JobKeys
from .jobstore import JobEnded, JobStore, StateBehind
from .model import Job, moves_forward

MAX_DATASETS = 50
_T = TypeVar("_T")
#: Result files the backend hands over and what the user's job directory keeps in the clear.
RECEIPT_FILES = (contract.RECEIPT_FILE, contract.TOKEN_FILE, contract.SIGNER_JWKS_FILE)
#: Copied beside the outputs (and into a verification's scratch): the receipt, and for released held
#: outputs the reveal of the receipt's commitment.
RESULT_COPIES = (*RECEIPT_FILES, contract.REVEAL_FILE)
#: What a held result hands the hub's airlock: the receipt and what the enclave sealed to the airlock.
HELD_RESULT_FILES = (
    contract.RECEIPT_FILE,
    contract.TOKEN_FILE,
    contract.SIGNER_JWKS_FILE,
    contract.SEALED_OUTPUTS_FILE,
    contract.SEALED_REVEAL_FILE,
    contract.SEALED_CHECK_FILE,
)
#: Largest released result (two sealed files) taken from the hub.
MAX_RELEASE_BYTES = 2**31
#: Largest released failure detail, and how much of its message and traceback a job keeps.
MAX_FAILURE_DETAIL = 2 * 2**20


class NoTrustAnchors(Unavailable):
    """Receipts cannot be verified here: the deployment pinned no trust anchor."""


class JobManager:
    def __init__(
        self,
        *,
        root_dir: Path,
        data_dir: Path,
        store: JobStore,
        backend: Backend,
        grants: GrantSource,
        emit: Callable[[Job], None],
        log: Any,
        include: tuple[str, ...] = ("**",),
        exclude: tuple[str, ...] | None = None,
        limits: BundleLimits | None = None,
        outputs_dir: str = "dcr-jobs",
        reconcile_interval: float = 30.0,
        airlock_poll_interval: float = 5.0,
        trust: TrustAnchors | None = None,
        enclave_digests: tuple[str, ...] = (),
    ) -> None:
        self.root = Path(root_dir).resolve()
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys = JobKeys(self.data_dir / "keys")
        self.store = store
        self.backend = backend
        self.backend_name = f"{type(backend).__module__}.{type(backend).__qualname__}"
        self.grants = grants
        self.emit = emit
        self.log = log
        self.include = include
        self.exclude = exclude
        self.limits = limits or BundleLimits()
        self.outputs_dir = outputs_dir
        self.reconcile_interval = reconcile_interval
        self.airlock_poll_interval = airlock_poll_interval
        self._airlock_task: asyncio.Task[None] | None = None
        self.trust = trust or TrustAnchors()
        #: The enclave code a receipt must come from (c.DCRExtension.enclave_digests).
        self.enclave_digests = enclave_digests
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._finishing: set[str] = set()
        #: Jobs whose submission (grant request, launch) is still in progress in this process.
        self._submitting: set[str] = set()
        #: The one thread the event loop's store calls run on (see ``_db``).
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcr-store")

    # -- lifecycle of the manager ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.reconcile()
        self._loop_task = asyncio.create_task(self._reconcile_forever())
        self._airlock_task = asyncio.create_task(self._airlock_forever())

    async def stop(self) -> None:
        """Stop watching (jobs go on in their enclaves; the next start picks them up)."""
        tasks = [t for t in [self._loop_task, self._airlock_task, *self._watchers.values()] if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._watchers.clear()

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval)
            try:
                await self.reconcile()
            except Exception:  # keep reconciling; one bad pass must not stop the loop
                self.log.exception("DCR: reconcile pass failed")

    async def reconcile(self) -> None:
        """Bring every unfinished job to its backend's truth."""
        for job in await self._db(self.store.unfinished):
            if job.id in self._watchers or job.id in self._finishing or job.id in self._submitting:
                continue
            try:
                await self._reconcile_one(job)
            except Unavailable as e:
                self.log.warning("DCR: cannot reconcile %s now: %s", job.id, e)
            except JobEnded as e:  # cancelled while this pass waited on the backend
                self.log.info("DCR: %s", e)

    async def _reconcile_one(self, job: Job) -> None:
        if not job.backend_ref:
            grant = self._job_dir(job.id) / "grant.jwt"
            if job.state in ("granted", "launching") and grant.exists():
                await self._launch(job, grant.read_text())
            else:
                await self._aupdate(
                    job, state="failed", failure=_failure("the server stopped before the job was granted")
                )
            return
        st = await self.backend.status(job)
        if st is None:
            await self._aupdate(
                job, state="failed", failure=_failure("the enclave vanished (its platform has no such job)")
            )
            return
        await self._apply(job.id, st)

    # -- submission -----------------------------------------------------------------------------------------

    async def submit(self, path: Any, datasets: Any = None) -> Job:
        notebook, rel = self._notebook_path(path)
        wanted = _parse_datasets(datasets)
        job_id = contract.new_job_id()
        job_dir = self._job_dir(job_id)
        job_dir.mkdir(mode=0o700)
        try:
            bundle_path = job_dir / "bundle.tar"
            try:
                options: dict[str, Any] = {"include": self.include, "limits": self.limits}
                if self.exclude is not None:
                    options["exclude"] = self.exclude
                manifest = await asyncio.to_thread(partial(build_bundle, notebook, bundle_path, **options))
            except LimitError as e:
                raise TooLarge(e.message, hint=e.hint) from None
            except DCRError as e:
                raise APIError(e.message, hint=e.hint) from None
            if not wanted:
                wanted = await asyncio.to_thread(data_references, manifest, notebook.parent)
            public = await asyncio.to_thread(self.keys.create, job_id)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            self.keys.delete(job_id)
            raise
        job = Job(
            id=job_id,
            notebook=rel,
            bundle_digest=manifest.digest,
            bundle_files=len(manifest.files),
            bundle_bytes=manifest.total_bytes,
            datasets=[{"provider": p, "dataset": d, "version": None, "release": None} for p, d in wanted],
            backend=self.backend_name,
        )
        try:
            await self._db(self.store.create, job)
        except BaseException:
            self._forget(job_id)
            raise
        self._submitting.add(job_id)
        try:
            return await self._grant_and_launch(job, public)
        finally:
            self._submitting.discard(job_id)

    async def _grant_and_launch(self, job: Job, public: bytes) -> Job:
        """Ask for the stored job's grant and launch it. The job is stored (a cancel can reach it) but not
        announced until the grant is in hand: a refusal removes it as if it had never been."""
        job_id, job_dir = job.id, self._job_dir(job.id)
        wanted = [(d["provider"], d["dataset"]) for d in job.datasets]
        try:
            grant = await self.grants.request(
                job_id=job_id, bundle_digest=job.bundle_digest, datasets=wanted, output_public_key=public
            )
        except Unavailable as e:
            # The request may have reached the hub (which records the job) before the answer was lost:
            # the job stays, failed, so the user sees what happened.
            return await self._grant_failed(job_id, _failure(str(e)), e)
        except APIError:
            # Refused (not entitled, over quota, ...): nothing of the submission stays. The record goes only
            # if nothing moved it on: a job cancelled meanwhile keeps its record (the user saw it end).
            if not await self._db(self.store.delete, job_id, state="submitted"):
                return await self._ended_meanwhile(job_id, "while its grant was requested")
            self._forget(job_id)
            raise
        except Exception as e:
            self.log.exception("DCR: the grant source failed for %s", job_id)
            return await self._grant_failed(
                job_id,
                _failure(f"the grant service failed ({type(e).__name__})"),
                Unavailable("the grant service could not be reached; try again"),
            )
        job = await self.aget(job_id)
        if job.terminal:  # cancelled while the grant was requested: never launched
            return await self._ended_meanwhile(job_id, "while its grant was requested")
        self.emit(job)  # the job's first event: from here on it is a job the user will see through
        await asyncio.to_thread((job_dir / "grant.jwt").write_text, grant)
        granted = _granted_datasets(grant)
        try:
            job = await self._aupdate(job, state="granted", datasets=granted, grant_id=_grant_id(grant))
            await self._launch(job, grant)
        except Unavailable as e:
            # Stored as "granted": the reconciler launches it once the backend answers again.
            self.log.warning("DCR: job %s waits for the backend: %s", job_id, e)
        except JobEnded:
            return await self._ended_meanwhile(job_id, "while it was launched")
        return await self.aget(job_id)

    async def _grant_failed(self, job_id: str, failure: dict[str, Any], error: Unavailable) -> Job:
        """Store the job failed (unless a cancel ended it meanwhile) and raise ``error``."""
        try:
            await self._aupdate(await self.aget(job_id), state="failed", failure=failure)
        except JobEnded:
            return await self._ended_meanwhile(job_id, "while its grant was requested")
        raise error from None

    async def _ended_meanwhile(self, job_id: str, when: str) -> Job:
        """The answer to a submission whose job was cancelled before the submission was done with it."""
        job = await self.aget(job_id)
        self.log.info("DCR: job %s was %s %s; it is not launched", job_id, job.state, when)
        return job

    def _forget(self, job_id: str) -> None:
        """Remove what a submission that never became a job left: its bundle directory and its key."""
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)
        self.keys.delete(job_id)

    async def preview(self, path: Any, datasets: Any = None) -> dict[str, Any]:
        """What :meth:`submit` would bundle and ask the grant for, without storing or granting anything.

        The workspace is walked and hashed exactly as for a submission (same patterns, same limits, same
        refusals), so the digest shown is the one the job will carry if the files do not change. The grant
        source is then asked the same policy questions as a submission's grant request, as a dry run
        (nothing signed or recorded): a refusal is raised with the status and message :meth:`submit` would
        give (an unreachable grant service is 503, as for a submission), and ``grant`` lists the datasets
        that would be granted (``None`` when the source cannot answer dry runs).
        """
        notebook, rel = self._notebook_path(path)
        wanted = _parse_datasets(datasets)
        options: dict[str, Any] = {"include": self.include, "limits": self.limits}
        if self.exclude is not None:
            options["exclude"] = self.exclude
        try:
            manifest = await asyncio.to_thread(partial(plan_bundle, notebook, **options))
        except LimitError as e:
            raise TooLarge(e.message, hint=e.hint) from None
        except DCRError as e:
            raise APIError(e.message, hint=e.hint) from None
        source = "request"
        if not wanted:
            wanted = await asyncio.to_thread(data_references, manifest, notebook.parent)
            source = "references" if wanted else "entitled"
        try:
            granted: builtins.list[dict[str, Any]] | None = await self.grants.check(
                bundle_digest=manifest.digest, datasets=wanted
            )
        except NotSupported:
            granted = None
        except APIError:
            raise  # the refusal a submission would get (Unavailable included), in its words
        except Exception as e:
            self.log.exception("DCR: the grant source failed on a dry run")
            raise Unavailable(f"the grant service failed ({type(e).__name__}); try again") from None
        return {
            "notebook": rel,
            "bundle": {
                "digest": manifest.digest,
                "files": len(manifest.files),
                "bytes": manifest.total_bytes,
            },
            "files": [{"path": f.path, "size": f.size} for f in manifest.files],
            "datasets": [f"{p}/{d}" for p, d in wanted],
            "datasets_from": source,
            "grant": None if granted is None else {"datasets": [_granted_entry(d) for d in granted]},
        }

    def _notebook_path(self, path: Any) -> tuple[Path, str]:
        if not isinstance(path, str) or not path.strip():
            raise APIError('"path" must be the notebook\'s path relative to the server root')
        if "\x00" in path or len(path) > 4096 or not _encodable(path):
            raise APIError("the notebook path is malformed (a NUL, a lone surrogate or over 4096 characters)")
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts:
            raise APIError(f"notebook path {path!r} must be relative to the server root, without '..'")
        if pure.suffix != ".ipynb":
            raise APIError(f"{path!r} is not a notebook (.ipynb)")
        full = self.root.joinpath(*pure.parts)
        try:
            real = full.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no notebook at {path!r}") from None
        except (OSError, RuntimeError) as e:  # a name too long, a loop of links (RuntimeError before 3.13)
            raise APIError(f"notebook path {path!r} cannot be opened ({type(e).__name__})") from None
        if not real.is_relative_to(self.root):
            raise APIError(f"{path!r} leads outside the server root")
        if not real.is_file():
            raise APIError(f"{path!r} is not a file")
        return full, pure.as_posix()

    async def _launch(self, job: Job, grant: str) -> None:
        job = await self._aupdate(job, state="launching")
        ref = await self.backend.launch(job, grant, self._job_dir(job.id) / "bundle.tar")
        current = await self.aget(job.id)
        if current.terminal:
            # Cancelled while the backend launched it: stop what was just started; the job stays cancelled.
            await self._stop_late_launch(current, ref)
            return
        job = await self._aupdate(current, backend_ref=ref)
        self._watch(job)

    async def _stop_late_launch(self, job: Job, ref: dict[str, Any]) -> None:
        # Where it ran is recorded first (an ended job's state is final, its other fields are not).
        try:
            job = await self._db(self.store.update, job.id, backend_ref=ref)
        except DCRError as e:
            self.log.warning("DCR: could not record where the cancelled job %s ran: %s", job.id, e)
            job = replace(job, backend_ref=ref)
        try:
            await self.backend.cancel(job)
        except Exception as e:
            self.log.error(
                "DCR: job %s was %s while it launched, and its enclave could not be stopped (%s: %s); "
                "stop it on the enclave platform",
                job.id,
                job.state,
                type(e).__name__,
                e,
            )
            return
        self.log.info("DCR: job %s was %s while it launched; its enclave was stopped", job.id, job.state)

    # -- following a job ------------------------------------------------------------------------------------

    def _watch(self, job: Job) -> None:
        if job.id in self._watchers:
            return
        task = asyncio.create_task(self._follow(job.id))
        self._watchers[job.id] = task
        task.add_done_callback(lambda _t: self._watchers.pop(job.id, None))

    async def _follow(self, job_id: str) -> None:
        try:
            async for st in self.backend.progress(await self.aget(job_id)):
                await self._apply(job_id, st)
        except asyncio.CancelledError:
            raise
        except Unavailable as e:
            self.log.warning("DCR: lost the progress stream of %s: %s (the reconciler resumes it)", job_id, e)
        except Exception:
            self.log.exception("DCR: following %s failed; the reconciler resumes it", job_id)

    async def _apply(self, job_id: str, st: BackendStatus) -> None:
        """Take one report of the platform. Reports may come stale, replayed, repeated or out of order (a
        stream opening with a snapshot, a watch replaying the history after a restart): what would move
        the job back (an earlier state, an earlier cell) is dropped, so the store and the events only
        ever move forward."""
        job = await self.aget(job_id)
        if job.terminal or st.state not in contract.JOB_STATES:
            return
        if st.state != job.state and not moves_forward(job.state, st.state):
            # An earlier step's report: nothing of it is newer than what is stored (its cell neither).
            if not _ended(job.state):
                self._watch(job)
            return
        changes: dict[str, Any] = {}
        if st.enclave and job.enclave != st.enclave:
            changes["enclave"] = st.enclave
        if st.cells and _cell_moves_forward((job.cell, job.cells), (st.cell, st.cells)):
            changes.update(cell=st.cell, cells=st.cells)
        if _ended(st.state):
            if changes:
                job = await self._aupdate(job, **changes)
            await self._finish(job, st)
            return
        if st.state != job.state:
            changes["state"] = st.state
        if changes:
            try:
                job = await self._aupdate(job, **changes)
            except StateBehind:  # another report moved it on meanwhile: keep that one
                return
        self._watch(job)

    async def _finish(self, job: Job, st: BackendStatus) -> None:
        """Collect the result and open it in the user's space, then record the final state."""
        if job.id in self._finishing:
            return
        self._finishing.add(job.id)
        try:
            if st.state == "cancelled":
                await self._aupdate(job, state="cancelled")
                return
            result = self._job_dir(job.id) / "result"
            if not result.is_dir():
                staging = self._job_dir(job.id) / ".result.partial"
                shutil.rmtree(staging, ignore_errors=True)
                await self.backend.collect(job, staging)
                staging.rename(result)
            if st.state == "failed":
                failure = st.failure or _read_failure(result) or _failure("the enclave job failed")
                # The enclave sealed the run's full failure (its traceback) to the airlock: the provider's
                # reviewers may release it to the researcher.
                detail = (result / contract.SEALED_FAILURE_FILE).is_file()
                extra = {"review": unsent_review()} if detail else {}
                job = await self._aupdate(job, state="failed", failure=failure, **extra)
                if detail:
                    self._finishing.discard(job.id)
                    await self.airlock_step(job)
                return
            outputs_path = await asyncio.to_thread(self._open_result, job, result, st.state)
            enclave = dict(job.enclave or st.enclave or {})
            # The receipt names the measured enclave whatever the progress stream managed to report.
            enclave["image_digest"] = self._receipt_manifest(job)["enclave"]["image_digest"]
            extra: dict[str, Any] = {"review": unsent_review()} if st.state == "held" else {}
            job = await self._aupdate(
                job, state=st.state, outputs_path=outputs_path, receipt=True, enclave=enclave, **extra
            )
            with contextlib.suppress(DCRError):
                await self.backend.cleanup(job)
            if job.state == "held":
                self._finishing.discard(job.id)  # the airlock step takes the job over
                await self.airlock_step(job)
        except JobEnded as e:  # cancelled while the result was collected
            self.log.info("DCR: %s", e)
        except Unavailable as e:
            self.log.warning("DCR: cannot collect %s now: %s (the reconciler retries)", job.id, e)
        except DCRError as e:
            with contextlib.suppress(JobEnded):
                await self._aupdate(
                    job, state="failed", failure=_failure(f"the results could not be opened: {e}")
                )
        finally:
            self._finishing.discard(job.id)

    def _open_result(self, job: Job, result: Path, state: str) -> str:
        """Lay the result out in the server root as ``dcr verify`` expects it; returns its relative path."""
        rel = f"{self.outputs_dir}/{job.id}"
        dest = self.root / self.outputs_dir / job.id
        if dest.exists():
            shutil.rmtree(dest)
        staging = dest.with_name(f".{job.id}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in RESULT_COPIES:
            if (result / name).is_file():
                shutil.copyfile(result / name, staging / name)
        sealed = result / contract.SEALED_OUTPUTS_FILE
        if state != "held" and sealed.is_file():
            open_dir(sealed, staging / contract.OUTPUTS_DIR, self.keys.private(job.id), job.id)
            if state == "released":
                _check_released(result, staging / contract.OUTPUTS_DIR)
            # Beside outputs/: a copy named and marked as the run on the real data (see executed.py).
            write_marked_copy(staging, job.notebook, job.id, rel)
        staging.rename(dest)
        return rel

    # -- the hub's airlock ----------------------------------------------------------------------------------

    async def _airlock_forever(self) -> None:
        while True:
            await asyncio.sleep(self.airlock_poll_interval)
            try:
                for job in await self._db(self.store.in_review):
                    await self.airlock_step(job)
            except Exception:  # keep polling; one bad pass must not stop the loop
                self.log.exception("DCR: airlock pass failed")

    async def airlock_step(self, job: Job) -> None:
        """Move a held job along the review: deliver its result to the hub's airlock, or ask how the
        review stands, and take the outcome (released outputs, or the rejection) when there is one."""
        if job.id in self._finishing:
            return
        self._finishing.add(job.id)
        try:
            review = dict(job.review or unsent_review())
            try:
                if review.get("status", "unsent") == "unsent" and job.state == "failed":
                    sealed = self._job_dir(job.id) / "result" / contract.SEALED_FAILURE_FILE
                    data = await asyncio.to_thread(sealed.read_bytes)
                    doc = await self.grants.airlock_deliver_failure(job.id, data)
                    self.log.info("DCR: the failure detail of %s is in the hub's airlock", job.id)
                elif review.get("status", "unsent") == "unsent":
                    body = await asyncio.to_thread(self._held_result_tar, job)
                    doc = await self.grants.airlock_deliver(job.id, body)
                    self.log.info("DCR: the held result of %s is in the hub's airlock", job.id)
                else:
                    doc = await self.grants.airlock_status(job.id)
            except NotSupported as e:
                await self._note_review(job, unsent_review(e.message))
                return
            except GrantRefused as e:
                # 404 from a hub that lost the result: deliver again next time; otherwise say why.
                await self._note_review(job, unsent_review(e.message))
                return
            except Unavailable as e:
                self.log.warning("DCR: the airlock cannot be asked about %s now: %s", job.id, e)
                return
            new = _review(doc)
            if job.state == "failed":  # the failure's detail: the job stays failed whatever is decided
                if new["status"] == "released":
                    detail = await self._take_failure_detail(job)
                    await self._aupdate(job, review=new, failure={**(job.failure or {}), "detail": detail})
                elif new != job.review:
                    await self._aupdate(job, review=new)
            elif new["status"] == "released":
                await self._take_release(job, new)
            elif new["status"] == "rejected":
                reason = "the reviewers rejected the outputs" + (
                    f": {new['comment']}" if new["comment"] else ""
                )
                await self._aupdate(
                    job, state="rejected", review=new, failure={"reason": reason, "cell": None, "ename": None}
                )
            elif new != job.review:
                await self._aupdate(job, review=new)
        except JobEnded as e:
            self.log.info("DCR: %s", e)
        except DCRError as e:
            self.log.error("DCR: the released outputs of %s could not be taken: %s", job.id, e)
            with contextlib.suppress(JobEnded):
                await self._aupdate(
                    job,
                    state="failed",
                    failure=_failure(f"the released outputs could not be opened: {e.message}"),
                )
        finally:
            self._finishing.discard(job.id)

    async def _note_review(self, job: Job, review: dict[str, Any]) -> None:
        if job.review != review:
            await self._aupdate(job, review=review)

    def _held_result_tar(self, job: Job) -> bytes:
        result = self._job_dir(job.id) / "result"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in HELD_RESULT_FILES:
                p = result / name
                if p.is_file() and not p.is_symlink():
                    tf.add(p, arcname=name, recursive=False)
        return buf.getvalue()

    async def _take_failure_detail(self, job: Job) -> dict[str, str]:
        """The released failure detail, opened with the job's key: the exception message and traceback."""
        payload = await self.grants.airlock_release(job.id)

        def opened() -> dict[str, str]:
            with tempfile.TemporaryDirectory(dir=self._job_dir(job.id)) as scratch:
                d = Path(scratch)
                try:
                    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tf:
                        member = tf.getmember(contract.SEALED_FAILURE_FILE)
                        data = tf.extractfile(member)
                        assert data is not None
                        (d / "sealed").write_bytes(data.read(MAX_FAILURE_DETAIL))
                except (tarfile.TarError, KeyError):
                    raise DCRError("the released failure detail is not the expected archive") from None
                open_file(d / "sealed", d / "detail.json", self.keys.private(job.id), job_id=job.id)
                doc = json.loads((d / "detail.json").read_bytes())
            if not isinstance(doc, dict):
                raise DCRError("the released failure detail is not a JSON object")
            return {
                "evalue": str(doc.get("evalue", ""))[:MAX_FAILURE_DETAIL],
                "traceback": _traceback_text(doc.get("traceback"))[:MAX_FAILURE_DETAIL],
            }

        return await asyncio.to_thread(opened)

    async def _take_release(self, job: Job, review: dict[str, Any]) -> None:
        payload = await self.grants.airlock_release(job.id)
        result = self._job_dir(job.id) / "result"
        await asyncio.to_thread(self._store_release, job, result, payload)
        outputs_path = await asyncio.to_thread(self._open_result, job, result, "released")
        await self._aupdate(job, state="released", outputs_path=outputs_path, review=review)
        self.log.info("DCR: the outputs of %s were released by the reviewers", job.id)

    def _store_release(self, job: Job, result: Path, payload: bytes) -> None:
        """Put the released (re-sealed) outputs in place of the held ones, and open the reveal."""
        if len(payload) > MAX_RELEASE_BYTES:
            raise DCRError("the released result is too large")
        wanted = {contract.SEALED_OUTPUTS_FILE, contract.SEALED_REVEAL_FILE}
        staging = Path(tempfile.mkdtemp(dir=result.parent, prefix=".release-"))
        try:
            try:
                with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tf:
                    for m in tf:
                        if m.name not in wanted or not m.isreg():
                            raise DCRError(f"the released result holds an unexpected member {m.name[:80]!r}")
                        data = tf.extractfile(m)
                        assert data is not None
                        (staging / m.name).write_bytes(data.read())
            except tarfile.TarError:
                raise DCRError("the released result is not a tar archive") from None
            if {p.name for p in staging.iterdir()} != wanted:
                raise DCRError("the released result lacks its outputs or their reveal")
            open_file(
                staging / contract.SEALED_REVEAL_FILE,
                staging / contract.REVEAL_FILE,
                self.keys.private(job.id),
                job_id=job.id,
            )
            for name in (contract.SEALED_OUTPUTS_FILE, contract.SEALED_REVEAL_FILE, contract.REVEAL_FILE):
                os.replace(staging / name, result / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- queries and commands -------------------------------------------------------------------------------

    def get(self, job_id: Any) -> Job:
        if not isinstance(job_id, str) or not contract.JOB_ID_RE.match(job_id):
            raise NotFound(f"no such job: {job_id!r}")
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no such job: {job_id}")
        return job

    async def aget(self, job_id: Any) -> Job:
        """:meth:`get` on the store's thread."""
        if not isinstance(job_id, str) or not contract.JOB_ID_RE.match(job_id):
            raise NotFound(f"no such job: {job_id!r}")
        job = await self._db(self.store.get, job_id)
        if job is None:
            raise NotFound(f"no such job: {job_id}")
        return job

    def list(self, offset: int, limit: int) -> tuple[list[Job], int]:
        return self.store.list(offset, limit)

    async def alist(self, offset: int, limit: int) -> tuple[builtins.list[Job], int]:
        """:meth:`list` on the store's thread."""
        jobs, total = await self._db(self.store.list, offset, limit)
        return jobs, total

    async def cancel(self, job_id: str) -> Job:
        """Stop a job and store it ``cancelled``; answered once the backend has stopped it.

        A job not launched yet (its grant request or launch still in progress, or waiting for the backend)
        is stored ``cancelled`` at once: the submission finds it so and launches nothing, or stops what it
        had just launched. A job the backend reports ended on its own before the cancel reached it keeps
        its result: it is finished as the backend says (outputs collected and opened) and the cancel is
        refused with :class:`Conflict` naming the state it ended in.
        """
        job = await self.aget(job_id)
        if job.terminal:
            raise Conflict(f"job {job_id} has already ended ({job.state})")
        if job.backend_ref:
            await self.backend.cancel(job)
            # The platform's truth once the cancel is done: a job that had finished was left as it was.
            st = await self.backend.status(job)
            if st is not None and st.state != "cancelled" and _ended(st.state):
                if (await self.aget(job_id)).state != st.state:
                    await self._apply(job_id, st)
                raise Conflict(
                    f"job {job_id} had already ended ({st.state}) when the cancel reached it; "
                    "its result is kept"
                )
        task = self._watchers.pop(job_id, None)
        if task:
            task.cancel()
        job = await self.aget(job_id)
        if job.terminal:  # the progress stream stored the backend's own "cancelled" meanwhile
            if job.state == "cancelled":
                return job
            raise Conflict(f"job {job_id} has already ended ({job.state})")
        return await self._aupdate(job, state="cancelled")

    def _outputs_root(self, job: Job) -> Path:
        if not job.outputs_path:
            raise NotFound(f"job {job.id} has no outputs ({job.state})")
        return self.root / job.outputs_path / contract.OUTPUTS_DIR

    def outputs(self, job_id: str) -> builtins.list[dict[str, Any]]:
        job = self.get(job_id)
        root = self._outputs_root(job)
        listed = self._listed_outputs(job)
        files = []
        for path, entry in sorted(listed.items()):
            p = root / path
            if p.is_file() and not p.is_symlink():
                files.append(
                    {
                        "path": path,
                        "size": entry["size"],
                        "sha256": entry["sha256"],
                        "content_type": _content_type(path),
                    }
                )
        return files

    def _listed_outputs(self, job: Job) -> dict[str, dict[str, Any]]:
        """The outputs the receipt attests, by path: listed in it, or (released held outputs) in the reveal
        of its commitment, checked against it."""
        manifest = self._receipt_manifest(job)
        commitment = manifest.get("release", {}).get("outputs_commitment")
        reveal = self._job_dir(job.id) / "result" / contract.REVEAL_FILE
        if isinstance(commitment, str) and reveal.is_file():
            return {e.path: e.to_json() for e in open_commitment(reveal.read_bytes(), commitment)}
        return {o["path"]: o for o in manifest.get("outputs", [])}

    def output_file(self, job_id: str, rel: Any) -> tuple[Path, str]:
        """The output's path (checked to lie inside the job's outputs, no links) and its content type."""
        job = self.get(job_id)
        root = self._outputs_root(job)
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise APIError("output path is malformed")
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or "." in pure.parts:
            raise APIError(f"output path {rel!r} must be relative, without '..'")
        p = root.joinpath(*pure.parts)
        cur = root
        for part in pure.parts:  # no component may be a link, or the path could leave the outputs
            cur = cur / part
            try:
                st = cur.lstat()
            except FileNotFoundError:
                raise NotFound(f"job {job_id} has no output {rel!r}") from None
            if stat.S_ISLNK(st.st_mode):
                raise NotFound(f"job {job_id} has no output {rel!r}")
        if not p.is_file():
            raise NotFound(f"job {job_id} has no output {rel!r}")
        return p, _content_type(rel)

    def receipt(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        result = self._job_dir(job.id) / "result"
        if not job.receipt or not (result / contract.RECEIPT_FILE).is_file():
            raise NotFound(f"job {job_id} has no receipt ({job.state})")
        return {
            "manifest": json.loads((result / contract.RECEIPT_FILE).read_bytes()),
            "token": (result / contract.TOKEN_FILE).read_text().strip(),
            "signer_jwks": json.loads((result / contract.SIGNER_JWKS_FILE).read_bytes()),
        }

    def receipt_dir(self, job_id: str) -> Path:
        """The job's result as the enclave sent it (receipt files byte for byte)."""
        return self._job_dir(self.get(job_id).id) / "result"

    async def datasets(self) -> builtins.list[dict[str, Any]]:
        """The datasets this user may submit with, as the grant source knows them."""
        try:
            return await self.grants.datasets()
        except DCRError:
            raise
        except Exception as e:  # a broken grant source must not look like a bad request
            self.log.exception("DCR: the grant source could not list datasets")
            raise Unavailable(f"the dataset list is unavailable ({type(e).__name__}); try again") from None

    async def verify(self, job_id: str) -> dict[str, Any]:
        """The checks of ``dcr verify`` on the job's result, against the configured trust anchors.

        The result is verified as the enclave sent it: the receipt files byte for byte and the outputs
        freshly decrypted from the sealed file with the job's key, in a private scratch directory. The
        copy in the server root is the user's to open and edit (JupyterLab adds checkpoints beside an
        opened notebook), so it is not what is checked; ``dcr verify`` on that folder checks the copy.
        """
        job = await self.aget(job_id)
        result = self._job_dir(job.id) / "result"
        if not job.receipt or not (result / contract.RECEIPT_FILE).is_file():
            raise NotFound(f"job {job_id} has no receipt ({job.state})")
        if not self.trust:
            raise NoTrustAnchors(
                "this server has no trust anchors to verify receipts with",
                hint="the administrator sets c.DCRExtension.trust_jwks (the enclave signer's JWKS) or "
                "c.DCRExtension.trust_roots (the platform's root certificates); `dcr verify` checks a "
                "receipt offline",
            )
        manifest = self._receipt_manifest(job)
        held = job.state == "held"
        checks = await asyncio.to_thread(self._check_result, job, result, not held)
        kind = str(manifest.get("enclave", {}).get("kind", ""))
        simulated = kind == "local" or _token_is_simulated(result / contract.TOKEN_FILE)
        return {
            "job_id": job.id,
            "verified": all(c["passed"] for c in checks),
            "checks": checks,
            "simulated": simulated,
            "enclave": {"kind": kind, "image_digest": manifest.get("enclave", {}).get("image_digest")},
            "anchors": [dict(a) for a in self.trust.described],
            "enclave_digests": list(self.enclave_digests),
            "note": (
                "the outputs are held for the provider's review: the output checks pass once they are released"
                if held
                else None
            ),
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _check_result(self, job: Job, result: Path, with_outputs: bool) -> builtins.list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(dir=self._job_dir(job.id), prefix=".verify-") as scratch:
            d = Path(scratch) / "receipt"
            d.mkdir()
            for name in RESULT_COPIES:
                if (result / name).is_file():
                    shutil.copyfile(result / name, d / name)
            sealed = result / contract.SEALED_OUTPUTS_FILE
            if with_outputs and sealed.is_file():
                try:
                    open_dir(sealed, d / contract.OUTPUTS_DIR, self.keys.private(job.id), job.id)
                except DCRError as e:
                    # Reported through the output checks (nothing opened means every output is missing).
                    self.log.warning("DCR: the outputs of %s could not be opened to verify: %s", job.id, e)
            checks = check_receipt_dir(
                d,
                trusted_keys=self.trust.keys,
                trusted_thumbprints=self.trust.thumbprints,
                trust_root_pem=self.trust.roots_pem,
                expected_enclave_digests=self.enclave_digests,
                issuers={contract.GOOGLE_ISSUER, contract.LOCAL_ISSUER},
                audience=contract.RECEIPT_AUDIENCE,
            )
        return [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]

    def _receipt_manifest(self, job: Job) -> dict[str, Any]:
        path = self._job_dir(job.id) / "result" / contract.RECEIPT_FILE
        try:
            manifest: dict[str, Any] = json.loads(path.read_bytes())
        except (OSError, ValueError):
            raise NotFound(f"job {job.id} has no receipt") from None
        return manifest

    # -- helpers --------------------------------------------------------------------------------------------

    def _job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / contract.check_job_id(job_id)

    async def _db(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run a job store call on the store's one thread: the database and the disk never hold up the
        event loop (the API stays responsive while many jobs report progress), and one thread keeps the
        store's commits, and so the events emitted after them, in the order the loop asked for them."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_thread, partial(fn, *args, **kwargs))

    async def _aupdate(self, job: Job, **changes: Any) -> Job:
        """:meth:`_update` with the store's write on the store's thread; the event is emitted here."""
        new = await self._db(self.store.update, job.id, **changes)
        self._announce(new, changes)
        return new

    def _announce(self, new: Job, changes: dict[str, Any]) -> None:
        if "state" in changes or "cell" in changes or "cells" in changes or "review" in changes:
            self.emit(new)
        if "state" in changes:
            self.log.info("DCR: job %s is %s", new.id, new.state)

    def _update(self, job: Job, **changes: Any) -> Job:
        """Store the change, then tell subscribers. The state of a job that has ended is final: the store
        refuses to change it with :class:`JobEnded`, and nothing is emitted."""
        new = self.store.update(job.id, **changes)
        self._announce(new, changes)
        return new


def unsent_review(note: str | None = None) -> dict[str, Any]:
    """A held job's review before the hub's airlock has its result (``note``: why not yet)."""
    return {
        "status": "unsent",
        "reviewers": [],
        "required_approvals": 1,
        "approvals": 0,
        "comment": None,
        "decided_at": None,
        "note": note,
    }


def _review(doc: dict[str, Any]) -> dict[str, Any]:
    """The hub's review status as the job keeps it (only the fields the API documents)."""

    def text(v: Any) -> str | None:
        return str(v)[:4000] if isinstance(v, str) and v else None

    status = doc.get("status")
    return {
        "status": status if status in ("waiting", "released", "rejected") else "waiting",
        "reviewers": [str(r)[:200] for r in doc.get("reviewers", []) if isinstance(r, str)][:50],
        "required_approvals": int(doc.get("required_approvals") or 1),
        "approvals": int(doc.get("approvals") or 0),
        "comment": text(doc.get("comment")),
        "decided_at": text(doc.get("decided_at")),
        "note": None,
    }


def _traceback_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value or "")


def _check_released(result: Path, outputs: Path) -> None:
    """Released outputs must be exactly what the held receipt committed to (through the reveal)."""
    manifest = json.loads((result / contract.RECEIPT_FILE).read_bytes())
    commitment = manifest.get("release", {}).get("outputs_commitment")
    if not isinstance(commitment, str):
        raise DCRError("the receipt of released outputs commits to none")
    entries = open_commitment((result / contract.REVEAL_FILE).read_bytes(), commitment)
    files, problems = scan_outputs(outputs)
    if problems:
        raise DCRError("the released outputs hold something other than regular files")
    got = {rel: tuple(reversed(hash_regular_file(p))) for rel, p in files.items()}
    if got != {e.path: (e.size, e.sha256) for e in entries}:
        raise DCRError("the released outputs are not the ones the receipt committed to")


def _ended(state: str) -> bool:
    """The enclave is done with the job: a terminal state, or outputs held for the provider's review."""
    return state in contract.TERMINAL_STATES or state == "held"


def _encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form (a lone surrogate has none: ``Path.resolve`` would raise)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cell_moves_forward(old: tuple[int | None, int | None], new: tuple[int | None, int | None]) -> bool:
    """Whether cell progress ``new`` is later than ``old`` (a replayed or late cell event is not)."""
    if new == old:
        return False
    if old[0] is None or new[0] is None or old[1] != new[1]:
        return new[0] is not None  # the first cell, or another count (not seen for one job)
    return new[0] > old[0]


def _parse_datasets(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_DATASETS:
        raise APIError(f'"datasets" must be a list of at most {MAX_DATASETS} "provider/dataset" names')
    out = []
    for item in value:
        if not isinstance(item, str) or item.count("/") != 1:
            raise APIError(f'each dataset must be "provider/dataset", not {item!r}')
        provider, dataset = item.split("/")
        out.append((contract.check_name(provider, "provider"), contract.check_name(dataset, "dataset")))
    return sorted(set(out))


def _granted_entry(d: dict[str, Any]) -> dict[str, Any]:
    """One dataset a dry run says would be granted, in the shape of the job's ``datasets``."""
    return {k: d.get(k) for k in ("provider", "dataset", "version", "release")}


def _grant_claims(grant: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(grant, options={"verify_signature": False})
    return claims


def _granted_datasets(grant: str) -> list[dict[str, Any]]:
    # The grant's signature is the enclave's business; here it only tells the user what was granted.
    return list(_grant_claims(grant).get("datasets", []))


def _grant_id(grant: str) -> str | None:
    value = _grant_claims(grant).get("jti")
    return str(value) if value else None


def _failure(reason: str) -> dict[str, Any]:
    return {"reason": reason[:500], "cell": None, "ename": None}


def _read_failure(result: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((result / contract.FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {
        "reason": str(data.get("reason", "failed"))[:500],
        "cell": data["cell"] if isinstance(data.get("cell"), int) else None,
        "ename": data["ename"] if isinstance(data.get("ename"), str) else None,
    }


def _token_is_simulated(path: Path) -> bool:
    """Whether the token claims to come from the local simulation (read unverified: this only ever
    *adds* the simulation banner; the signature and platform checks are what vouch for a token)."""
    try:
        payload = path.read_text().strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, IndexError, ValueError):
        return False
    if not isinstance(claims, dict):
        return False
    return claims.get("iss") == contract.LOCAL_ISSUER or claims.get("hwmodel") == contract.LOCAL_HWMODEL


def _content_type(path: str) -> str:
    if path.endswith(".ipynb"):
        return "application/x-ipynb+json"
    guess, _ = mimetypes.guess_type(path)
    return guess or "application/octet-stream"
