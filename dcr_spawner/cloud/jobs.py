"""The hub's cloud jobs: launch one Confidential VM per grant, read its state, cancel, hand back results.

:class:`CloudJobs` is the hub side of the Confidential Space path, independent of the web layer (the
views call it on a worker thread; the tests call it directly). Every step stores before its side effect:

1. ``launch``: the grant must be this hub's and name this job, user and bundle; the launch is recorded
   (grant id unique) **before** the bundle upload and the insert, and the insert's ``requestId`` is derived
   from the grant id, so a grant sent twice, or a hub that restarts between the insert and recording its
   outcome, starts one VM;
2. ``status``: progress objects, then the completion object (``receipt.json`` / ``failure.json``, written
   last), then the instance; an ended job is recorded ended and its VM deleted at once (the concurrent-jobs
   quota frees then, not at the time limit);
3. ``cancel`` deletes the VM; ``result`` is a tar of the result objects as the enclave wrote them (sealed:
   the hub never sees plaintext); ``cleanup`` deletes the job's objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from dcr_enclave.formats import contract
from dcr_enclave.formats.bundle import MANIFEST_MEMBER
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import verify_grant

from ..hubdb import GrantedJob, HubDB
from ..hubkey import HubKey
from . import records
from .launcher import (
    LABEL_HUB,
    LABEL_JOB,
    LABEL_USER,
    Compute,
    InsertRefused,
    InstanceSettings,
    credentials_for,
    hub_label,
    instance_name,
    make_instance,
    request_id,
    user_label,
)
from .records import Launch, Launches

#: The bundle manifest is the first tar member; never read more of it than this.
MAX_MANIFEST_BYTES: Final = 16 * 2**20
#: Most result objects handed back, and most bytes in all (the grant's output limits are far below).
MAX_RESULT_OBJECTS: Final = 64
MAX_RESULT_BYTES: Final = 2**30
MAX_PROGRESS_OBJECTS: Final = 10000
#: A launch recorded but never seen as a VM after this long failed (its insert never reached Compute).
LAUNCH_GRACE_SECONDS: Final = 600
#: Instance states in which the VM is gone or going (the launcher powers off after the workload exits).
STOPPED: Final = frozenset({"STOPPING", "STOPPED", "SUSPENDING", "SUSPENDED", "TERMINATED"})


class CloudRefusal(Exception):
    """A request the hub turns down: HTTP status and a message for the researcher."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class JobPaths:
    """Where one job's objects are: ``gs://<bucket>/<prefix>jobs/<job_id>/...`` (the launch contract)."""

    bucket: str
    prefix: str  # "<prefix>jobs/<job_id>/"

    @classmethod
    def of(cls, jobs_uri: str, job_id: str) -> JobPaths:
        prefix = contract.parse_gs_uri(contract.cloud_job_prefix(jobs_uri, job_id))
        return cls(prefix.bucket, prefix.name)

    @property
    def bundle(self) -> str:
        return self.prefix + contract.CLOUD_BUNDLE_OBJECT

    @property
    def result(self) -> str:
        return self.prefix + contract.CLOUD_RESULT_PREFIX

    @property
    def progress(self) -> str:
        return self.prefix + contract.CLOUD_PROGRESS_PREFIX

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"


def bundle_digest(data: bytes) -> str:
    """The bundle's digest as the enclave checks it: sha256 of its manifest, the archive's first member."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            member = tf.next()
            if member is None or member.name != MANIFEST_MEMBER or not member.isreg():
                raise CloudRefusal(
                    400, f"the body is not a DCR bundle (its first member is not {MANIFEST_MEMBER})"
                )
            if member.size > MAX_MANIFEST_BYTES:
                raise CloudRefusal(413, "the bundle manifest is too large")
            f = tf.extractfile(member)
            raw = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError):
        raise CloudRefusal(400, "the body is not a tar archive (a DCR bundle)") from None
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class Storage:
    """The jobs bucket through ``google.cloud.storage`` at the configured endpoint, with the hub's own
    credentials (none for a loopback emulator)."""

    def __init__(self, endpoint: str, project: str) -> None:
        from google.cloud import storage  # type: ignore[attr-defined]

        self.client = storage.Client(
            project=project or None,
            credentials=credentials_for(endpoint),
            client_options={"api_endpoint": endpoint},
        )

    def put_once(self, bucket: str, name: str, data: bytes) -> None:
        """Write ``data`` unless the object exists (a retried launch finds its first upload)."""
        from google.api_core import exceptions as gexc

        with contextlib.suppress(gexc.PreconditionFailed):
            self.client.bucket(bucket).blob(name).upload_from_string(
                data, content_type="application/x-tar", if_generation_match=0
            )

    def names(self, bucket: str, prefix: str, limit: int) -> list[tuple[str, int]]:
        out = []
        for blob in self.client.list_blobs(bucket, prefix=prefix, max_results=limit + 1):
            out.append((blob.name, int(blob.size or 0)))
        if len(out) > limit:
            raise DCRError(f"more than {limit} objects under gs://{bucket}/{prefix}")
        return sorted(out)

    def read(self, bucket: str, name: str, limit: int) -> bytes | None:
        from google.api_core import exceptions as gexc

        try:
            data: bytes = self.client.bucket(bucket).blob(name).download_as_bytes(end=limit)
        except gexc.NotFound:
            return None
        return data

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        from google.api_core import exceptions as gexc

        for blob in self.client.list_blobs(bucket, prefix=prefix):
            with contextlib.suppress(gexc.NotFound):
                blob.delete()


@dataclass
class CloudConfig:
    """What :class:`CloudJobs` needs of the platform's settings."""

    instance: InstanceSettings
    jobs_bucket: str
    compute_endpoint: str
    storage_endpoint: str
    max_run_seconds_margin: int
    max_bundle_bytes: int
    image_digest: str
    #: ``provider/dataset`` -> its ``cloud`` entry (``store``, ``kms_key``, ``wip_provider``).
    dataset_clouds: Mapping[str, Mapping[str, str]]


class CloudJobs:
    def __init__(
        self,
        config: CloudConfig,
        db: HubDB,
        hub_key: HubKey,
        *,
        clock: Callable[[], float] = time.time,
        compute: Compute | None = None,
        storage: Storage | None = None,
        log: Any = None,
    ) -> None:
        import logging

        self.config, self.db, self.hub_key, self.clock = config, db, hub_key, clock
        records.setup(db)
        self.launches = Launches(db)
        self.hub = hub_label(hub_key.thumbprint)
        s = config.instance
        self.compute = compute or Compute(s.project, s.zone, config.compute_endpoint)
        self.storage = storage or Storage(config.storage_endpoint, s.project)
        self.log = log or logging.getLogger("dcr.cloud")
        #: Progress objects already read (they are create-only): each status read fetches only new ones.
        self._seen: dict[str, dict[str, Any] | None] = {}
        self._seen_lock = threading.Lock()

    # -- who may ask -----------------------------------------------------------------------------------

    def _owned(self, user: str, job_id: str) -> tuple[GrantedJob, Launch | None]:
        """The granted job and its launch, if ``user`` owns it; 404 otherwise (no hint that it exists)."""
        if not contract.JOB_ID_RE.match(job_id):
            raise CloudRefusal(404, f"no job {job_id[:40]!r}")
        job = self.db.job(job_id)
        if job is None or job.user != user:
            raise CloudRefusal(404, f"no job {job_id} of yours")
        return job, self.launches.by_job(job_id)

    # -- launch ----------------------------------------------------------------------------------------

    def launch(self, user: str, job_id: str, grant_id: str, grant: str, body: bytes) -> dict[str, Any]:
        """Launch the job's VM once per grant; the job's status after it."""
        job, existing = self._owned(user, job_id)
        if grant_id != job.grant_id:
            raise CloudRefusal(409, f"grant {grant_id[:64]!r} is not the grant of job {job_id}")
        if existing is not None and existing.ended:
            return self._ended_status(existing)
        # A launch sent again (a retry; the server or the hub restarted) repeats the same insert while the
        # record says "launching" (the insert's outcome unknown). Once the insert is known done it is never
        # sent again: Compute remembers request ids for a limited time only, and a VM that has since ended
        # and deleted itself must not come back.
        if len(body) > self.config.max_bundle_bytes:
            raise CloudRefusal(413, f"the bundle is larger than {self.config.max_bundle_bytes} bytes")
        try:
            g = verify_grant(
                grant,
                self.hub_key.jwks()["keys"],
                hub_key_thumbprint=self.hub_key.thumbprint,
                job_id=job_id,
                bundle_digest=job.bundle_digest,
                now=self.clock(),
            )
        except DCRError as e:
            raise CloudRefusal(400, e.message) from None
        if g.grant_id != job.grant_id or g.user != user:
            raise CloudRefusal(400, "the grant is not the one this hub issued for this job")
        if bundle_digest(body) != job.bundle_digest:
            raise CloudRefusal(400, "the bundle's digest is not the one the job was granted for")
        if existing is not None and existing.state == "running":
            return {**self.refresh(existing), "instance": existing.instance}
        now = int(self.clock())
        launch = Launch(
            grant_id=job.grant_id,
            job_id=job_id,
            user=user,
            instance=instance_name(job_id),
            zone=self.config.instance.zone,
            state="launching",
            deadline=now + g.time_limit + self.config.max_run_seconds_margin,
            created_at=now,
        )
        launch, new = self.launches.claim(launch)  # stored before any side effect
        if new:
            self.db.audit(
                "cloud.launch",
                status=201,
                user=user,
                job_id=job_id,
                grant_id=job.grant_id,
                detail={
                    "instance": launch.instance,
                    "zone": launch.zone,
                    "datasets": [d[0] for d in job.datasets],
                },
            )
        paths = JobPaths.of(self.config.jobs_bucket, job_id)
        try:
            self.storage.put_once(paths.bucket, paths.bundle, body)
            body_json = make_instance(
                self.config.instance,
                name=launch.instance,
                labels={LABEL_HUB: self.hub, LABEL_USER: user_label(user), LABEL_JOB: job_id},
                env=self._env(job, grant, paths),
                max_run_seconds=max(30, launch.deadline - launch.created_at),
            )
            self.compute.insert(body_json, request_id(launch.grant_id, "insert"))
        except InsertRefused as e:
            self.end_job(launch, "failed", e.message)
            return self._ended_status(self.launches.by_grant(launch.grant_id) or launch)
        except DCRError as e:
            # Not known to have failed (a timeout, a storage outage): the record stays "launching"; a
            # retry inserts with the same request id, and the reconciler ends it if no VM ever appears.
            raise CloudRefusal(503, f"the launch did not complete: {e.message}") from None
        except Exception as e:
            self.log.exception("DCR: launching %s failed", job_id)
            raise CloudRefusal(
                503, f"the launch did not complete ({type(e).__name__}); send it again"
            ) from None
        self.launches.mark_running(launch.grant_id)
        return {
            "job_id": job_id,
            "grant_id": launch.grant_id,
            "state": "launching",
            "instance": launch.instance,
        }

    def _env(self, job: GrantedJob, grant: str, paths: JobPaths) -> dict[str, str]:
        e = contract.ENV
        stores = [self.config.dataset_clouds.get(ref, {}).get("store", "") for ref, _, _ in job.datasets]
        default_store = next((s for s in stores if s), f"gs://{paths.bucket}/")
        return {
            e.JOB_ID: job.job_id,
            e.BUNDLE_DIGEST: job.bundle_digest,
            e.BUNDLE_URI: paths.uri(paths.bundle),
            e.GRANT: grant,
            e.HUB_KEY_THUMBPRINT: self.hub_key.thumbprint,
            e.HUB_JWKS: json.dumps({"keys": [self.hub_key.public_jwk]}, sort_keys=True),
            e.STORE_URI: default_store,
            e.OUTPUT_URI: paths.uri(paths.result),
            e.PROGRESS_URI: paths.uri(paths.progress),
            # Attested (every tee-env variable is in the token): providers' pool conditions pin their
            # dataset versions on it, and the supervisor refuses it unless it is exactly the grant's.
            e.DATASETS: contract.datasets_env_value(
                (*ref.split("/"), version) for ref, version, _ in job.datasets
            ),
        }

    # -- ends ------------------------------------------------------------------------------------------

    def end_job(self, launch: Launch, state: str, reason: str) -> None:
        """Record the end once (audited), then delete the VM (already gone is fine)."""
        now = int(self.clock())
        # The quota's own record of ends (dcr_hub_job_ends) is written by the grant service, from
        # ended(), on its one worker thread: writing it here too would race that insert.
        self._forget_progress(launch.job_id)
        if self.launches.end(launch.grant_id, state, reason, now):
            self.db.audit(
                "cloud.end",
                status=200,
                user=launch.user,
                job_id=launch.job_id,
                grant_id=launch.grant_id,
                reason=reason,
                detail={"state": state, "instance": launch.instance},
            )
        self._delete_vm(launch)

    def _delete_vm(self, launch: Launch) -> None:
        try:
            self.compute.delete(launch.instance, request_id(launch.grant_id, "delete"))
        except Exception as e:  # the reconciler deletes it later
            self.log.warning("DCR: deleting instance %s failed: %s", launch.instance, e)

    def _ended_status(self, launch: Launch) -> dict[str, Any]:
        failure = None
        if launch.end_state == "failed":
            failure = {"reason": launch.reason or "the enclave job failed", "cell": None, "ename": None}
        return {
            "job_id": launch.job_id,
            "grant_id": launch.grant_id,
            "state": launch.end_state or "failed",
            "cell": None,
            "cells": None,
            "failure": failure,
            "enclave": self.enclave_info(),
        }

    def enclave_info(self) -> dict[str, Any]:
        return {"kind": "confidential_space", "simulated": False, "image_digest": self.config.image_digest}

    # -- status ----------------------------------------------------------------------------------------

    def status(self, user: str, job_id: str) -> dict[str, Any]:
        _, launch = self._owned(user, job_id)
        if launch is None:
            raise CloudRefusal(404, f"job {job_id} was not launched on the cloud")
        return self.refresh(launch)

    def refresh(self, launch: Launch) -> dict[str, Any]:
        """Read the job's progress, completion and VM; record its end when it has ended."""
        paths = JobPaths.of(self.config.jobs_bucket, launch.job_id)
        # Completion first: every progress object was written before it, so the read below sees them all.
        done = None if launch.ended else self._completion(paths)
        doc = self._progress(paths)
        doc.update(job_id=launch.job_id, grant_id=launch.grant_id, enclave=self.enclave_info())
        prior = self._ended_prior(launch, doc)
        if prior is not None:
            return prior
        if done is None:
            vm = self.compute.get(launch.instance)
            if vm is None or vm.get("status") in STOPPED:
                done = self._completion(paths)  # written just before the VM powered off
                if done is None and launch.state == "running":
                    done = (
                        "failed",
                        {"reason": "the enclave VM stopped without a result", "cell": None, "ename": None},
                    )
                elif done is None and self.clock() > launch.created_at + LAUNCH_GRACE_SECONDS:
                    done = ("failed", {"reason": "the enclave VM never started", "cell": None, "ename": None})
            if done is None and self.clock() > launch.deadline:
                done = ("failed", {"reason": "the job reached its time limit", "cell": None, "ename": None})
        if done is None:
            return doc
        state, failure = done
        self.end_job(launch, state, (failure or {}).get("reason", ""))
        doc.update(state=state, failure=failure)
        return doc

    def _ended_prior(self, launch: Launch, doc: dict[str, Any]) -> dict[str, Any] | None:
        if not launch.ended:
            return None
        ended = self._ended_status(launch)
        ended.update(cell=doc.get("cell"), cells=doc.get("cells"), states=doc.get("states", []))
        return ended

    def _progress(self, paths: JobPaths) -> dict[str, Any]:
        state, cell, cells, failure = "launching", None, None, None
        # Every state the enclave reported, in order: a server polling now and then still shows each one.
        states: list[str] = []
        for name, size in self.storage.names(paths.bucket, paths.progress, MAX_PROGRESS_OBJECTS):
            msg = self._progress_message(paths.bucket, name, size)
            if msg is None:
                continue
            kind = msg.get("kind")
            if kind == contract.Progress.STATE and msg.get("state") in contract.JOB_STATES:
                if msg["state"] not in contract.TERMINAL_STATES and msg["state"] != "held":
                    state = msg["state"]  # the end is read from the completion object only
                    if state not in states:
                        states.append(state)
            elif (
                kind == contract.Progress.CELL
                and isinstance(msg.get("index"), int)
                and isinstance(msg.get("count"), int)
            ):
                cell, cells = msg["index"], msg["count"]
            elif kind == contract.Progress.FAILED:
                failure = _failure(msg)
        return {"state": state, "states": states, "cell": cell, "cells": cells, "failure": failure}

    def _progress_message(self, bucket: str, name: str, size: int) -> dict[str, Any] | None:
        with self._seen_lock:
            if name in self._seen:
                return self._seen[name]
        msg: Any = None
        if size <= contract.Progress.MAX_MESSAGE_BYTES:
            raw = self.storage.read(bucket, name, contract.Progress.MAX_MESSAGE_BYTES)
            try:
                msg = json.loads(raw or b"")
            except ValueError:
                msg = None
        msg = msg if isinstance(msg, dict) else None
        with self._seen_lock:
            self._seen[name] = msg
        return msg

    def _forget_progress(self, job_id: str) -> None:
        prefix = JobPaths.of(self.config.jobs_bucket, job_id).progress
        with self._seen_lock:
            for name in [n for n in self._seen if n.startswith(prefix)]:
                del self._seen[name]

    def _completion(self, paths: JobPaths) -> tuple[str, dict[str, Any] | None] | None:
        """The job's end from its completion object, or ``None`` while there is none."""
        raw = self.storage.read(paths.bucket, paths.result + contract.RECEIPT_FILE, 4 * 2**20)
        if raw is not None:
            try:
                decision = json.loads(raw)["release"]["decision"]
            except (ValueError, KeyError, TypeError):
                return "failed", {
                    "reason": "the enclave wrote an unreadable receipt",
                    "cell": None,
                    "ename": None,
                }
            if decision == "released":
                return "succeeded", None
            if decision == "held":
                return "held", None
            return "failed", {"reason": "outputs refused by the output check", "cell": None, "ename": None}
        raw = self.storage.read(paths.bucket, paths.result + contract.FAILURE_FILE, 65536)
        if raw is not None:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {}
            return "failed", _failure(doc if isinstance(doc, dict) else {})
        return None

    # -- cancel, result, cleanup -----------------------------------------------------------------------

    def cancel(self, user: str, job_id: str) -> dict[str, Any]:
        _, launch = self._owned(user, job_id)
        if launch is None:
            raise CloudRefusal(404, f"job {job_id} was not launched on the cloud")
        if not launch.ended:
            status = self.refresh(launch)  # a job that finished meanwhile keeps its own end
            if status["state"] in contract.TERMINAL_STATES or status["state"] == "held":
                return status
            self.end_job(launch, "cancelled", "cancelled by the researcher")
        return self._ended_status(self.launches.by_grant(launch.grant_id) or launch)

    def result(self, user: str, job_id: str) -> bytes:
        """A tar of the job's result objects (as the enclave wrote them; sealed), once the job ended."""
        _, launch = self._owned(user, job_id)
        if launch is None:
            raise CloudRefusal(404, f"job {job_id} was not launched on the cloud")
        if not launch.ended:
            self.refresh(launch)
            launch = self.launches.by_grant(launch.grant_id) or launch
            if not launch.ended:
                raise CloudRefusal(409, f"job {job_id} has not ended yet")
        paths = JobPaths.of(self.config.jobs_bucket, job_id)
        out = io.BytesIO()
        total = 0
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, size in self.storage.names(paths.bucket, paths.result, MAX_RESULT_OBJECTS):
                rel = name[len(paths.result) :]
                try:
                    contract.check_file_name(rel)  # flat, as the local layout: nothing else is handed on
                except DCRError:
                    continue
                total += size
                if total > MAX_RESULT_BYTES:
                    raise CloudRefusal(502, "the job's result is larger than the hub hands back")
                data = self.storage.read(paths.bucket, name, MAX_RESULT_BYTES) or b""
                info = tarfile.TarInfo(rel)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tf.addfile(info, io.BytesIO(data))
        return out.getvalue()

    def cleanup(self, user: str, job_id: str) -> None:
        """Delete what the cloud still holds of an ended job: its VM (if any) and its objects."""
        _, launch = self._owned(user, job_id)
        if launch is None:
            return
        if not launch.ended:
            raise CloudRefusal(409, f"job {job_id} has not ended; cancel it first")
        self._delete_vm(launch)
        paths = JobPaths.of(self.config.jobs_bucket, job_id)
        self.storage.delete_prefix(paths.bucket, paths.prefix)

    def ended(self, grant_ids: list[str]) -> set[str]:
        return self.launches.ended_among(grant_ids)


def _failure(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A failure report with its public fields only (a reason, the cell index, a built-in exception name)."""
    cell = msg.get("cell")
    ename = msg.get("ename")
    reason = msg.get("reason")
    return {
        "reason": str(reason)[:500] if isinstance(reason, str) else "the enclave job failed",
        "cell": cell if isinstance(cell, int) and not isinstance(cell, bool) else None,
        "ename": ename if isinstance(ename, str) and ename.isidentifier() and len(ename) <= 64 else None,
    }
