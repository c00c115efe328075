"""The airlock: held outputs in the hub, checked against their attested receipt, reviewed, released.

A job whose outputs need review (a ``review`` dataset, or outputs the enclave's disclosure checks flagged)
ends ``held``: the enclave sealed its outputs, and the reveal of the receipt's output commitment, to the
airlock's key. The researcher's server cannot open them; it hands them here.

1. **Receive** (:meth:`Airlock.receive`): the job's owner sends the result as a tar of the receipt files
   and the sealed files. Sealing proves nothing about origin (anyone holding the airlock's public key can
   seal), so the hub checks the attested receipt first: the token verifies against the platform's pinned
   anchors with the manifest's digest as nonce, the receipt is this job's (job id, grant id, user, bundle,
   output key as the hub granted them, the hub's own key and airlock key), its decision is ``held``; then
   the sealed reveal must open to the receipt's commitment and the sealed outputs must be exactly the files
   it lists, byte for byte (sha256 and size). Anything else is refused and audited; nothing is kept.
2. **Review** (:meth:`Airlock.decide`): the reviewers of every provider whose datasets the job used decide.
   The hub opens the sealed files in memory for display only: no plaintext is ever written to its disk.
   A rejection ends the job; approvals count per provider until each has ``review_approvals`` distinct
   reviewers, never the job's author.
3. **Release**: the outputs' tar and the reveal are re-sealed to the job's own key (the one the grant
   names), still never in the clear on disk; the researcher's server fetches them
   (:meth:`Airlock.released_files`) and checks them against the receipt again.

Every step is an audit event (``airlock.received``, ``airlock.refused``, ``airlock.approved``,
``airlock.rejected``, ``airlock.released``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import sha256_bytes
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.receipt import ReceiptManifest
from dcr_enclave.formats.sealing import seal_bytes, seal_tar_payload
from dcr_enclave.formats.unsealing import open_to_memory, tar_members
from dcr_enclave.verify.receipt import check_receipt_dir, open_commitment
from dcr_enclave.verify.trust import TrustAnchors, load_trust_anchors

from .airlock_records import HeldJob, HeldRecord, Review, ReviewRecord, held_job
from .audit import ingest_platform_events
from .hubdb import GrantedJob, HubDB
from .hubkey import AirlockKey, HubKey
from .policy import DCRPolicy, PolicyError

#: Files a held result may hold, and the ones it must.
RECEIPT_NAMES: Final = (contract.RECEIPT_FILE, contract.TOKEN_FILE, contract.SIGNER_JWKS_FILE)
REQUIRED_NAMES: Final = (*RECEIPT_NAMES, contract.SEALED_OUTPUTS_FILE, contract.SEALED_REVEAL_FILE)
#: A failed run's full detail (cell, exception, traceback), sealed to the airlock by the enclave.
FAILURE_NAME: Final = contract.SEALED_FAILURE_FILE
OPTIONAL_NAMES: Final = (contract.SEALED_CHECK_FILE, FAILURE_NAME)
ALLOWED_NAMES: Final = frozenset((*REQUIRED_NAMES, *OPTIONAL_NAMES))
#: Re-sealed to the job's key on release (the researcher's server fetches these two).
RELEASED_OUTPUTS: Final = "released-" + contract.SEALED_OUTPUTS_FILE
RELEASED_REVEAL: Final = "released-" + contract.SEALED_REVEAL_FILE
RELEASED_FAILURE: Final = "released-" + FAILURE_NAME
#: Largest failure detail the airlock takes (the enclave bounds the traceback it seals).
MAX_FAILURE_BYTES: Final = 2 * 2**20
KINDS: Final = ("outputs", "failure")
#: Room for sealing and tar overhead above the grant's output byte limit.
OVERHEAD_BYTES: Final = 8 * 2**20
MAX_COMMENT: Final = 4000
STATUSES: Final = ("waiting", "released", "rejected")


class AirlockRefusal(DCRError):
    """A request the airlock turns down: an HTTP status and a message for whoever asked."""

    def __init__(self, status: int, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class OpenedResult:
    """A held job's outputs opened in memory for a reviewer: never written anywhere."""

    files: dict[str, bytes]
    #: The exact output-check figures the enclave sealed for reviewers (``None`` when it sealed none).
    check: dict[str, Any] | None
    #: The failure detail the enclave sealed (a failed run), when any.
    failure: dict[str, Any] | None


class Airlock:
    """Held results: received, checked, opened for reviewers in memory, re-sealed on release."""

    def __init__(
        self,
        policy: DCRPolicy,
        db: HubDB,
        hub_key: HubKey,
        airlock_key: AirlockKey,
        root: Path,
        trust: TrustAnchors,
        enclave_digests: Iterable[str] = (),
        clock: Any = time.time,
        platform: Any = None,
    ) -> None:
        self.policy = policy
        self.db = db
        self.hub_key = hub_key
        self.key = airlock_key
        self.root = Path(root)
        self.trust = trust
        self.enclave_digests = tuple(enclave_digests)
        self.clock = clock
        #: The enclave platform, whose job events (launch, key release, end) are copied into the audit trail
        #: before the airlock records its own, so that the trail holds a job's events in the order they
        #: happened.
        self.platform = platform
        self._lock = threading.Lock()  # one decision at a time: approvals are counted, then acted on
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @classmethod
    def start(cls, policy: DCRPolicy, service: Any, platform: Any, base_dir: Path | None = None) -> Airlock:
        """The hub's airlock: the grant service's records and keys, the platform's trust anchors."""
        try:
            trust = load_trust_anchors(
                platform.trust_jwks,
                platform.trust_roots,
                signer_option=f"c.{type(platform).__name__}.trust_jwks",
                root_option=f"c.{type(platform).__name__}.trust_roots",
            )
        except DCRError as e:
            raise PolicyError(e.message, trait="platform_class", hint=e.hint) from None
        if not trust:
            policy.log.warning(
                "DCR: the airlock cannot check held results: c.%s.trust_jwks and trust_roots are empty",
                type(platform).__name__,
            )
        root = policy.resolve_path(policy.airlock_dir, base_dir)
        try:
            return cls(
                policy,
                service.db,
                service.hub_key,
                service.airlock_key,
                root,
                trust,
                platform.enclave_digests,
                platform=platform,
            )
        except OSError as e:
            raise PolicyError(
                f"cannot use the airlock directory {root}: {e.strerror}", trait="airlock_dir"
            ) from None

    # -- receiving --------------------------------------------------------------------------------------

    @property
    def max_body_bytes(self) -> int:
        return self.policy.limits().max_bytes + OVERHEAD_BYTES

    def receive(self, user: str, job_id: str, body: bytes) -> HeldJob:
        """Check a held result against its attested receipt and keep it for review.

        :class:`AirlockRefusal` says why one is refused (already audited when it was a check that failed).
        A second delivery of the same receipt answers as the first; another receipt is refused (409).
        """
        job = self._own_job(user, job_id)
        if len(body) > self.max_body_bytes:
            raise AirlockRefusal(413, f"the held result is larger than {self.max_body_bytes} bytes")
        files = _read_result_tar(body)
        receipt_digest = sha256_bytes(files[contract.RECEIPT_FILE])
        if (existing := self._delivered(job_id, receipt_digest)) is not None:
            return existing
        try:
            manifest = self._check(job, files)
        except AirlockRefusal as r:
            self.db.audit(
                "airlock.refused",
                status=r.status,
                user=user,
                job_id=job_id,
                grant_id=job.grant_id,
                reason=r.message,
                datasets=[ref for ref, _, _ in job.datasets],
            )
            raise
        self._keep(job_id, files)
        findings = {
            "violations": list(manifest.output_check.get("violations", [])),
            "disclosure": list(manifest.output_check.get("disclosure", [])),
        }
        return self._record(
            job,
            receipt_digest,
            kind="outputs",
            findings=findings,
            notebook=manifest.notebook,
            event="airlock.received",
            detail={"receipt": receipt_digest},
        )

    def receive_failure(self, user: str, job_id: str, body: bytes) -> HeldJob:
        """Keep a failed run's sealed detail (its traceback) for reviewers, who may release it to the
        researcher. No receipt attests it; it must open with the airlock key for this job id."""
        job = self._own_job(user, job_id)
        if len(body) > MAX_FAILURE_BYTES:
            raise AirlockRefusal(413, f"the failure detail is larger than {MAX_FAILURE_BYTES} bytes")
        digest = sha256_bytes(body)
        if (existing := self._delivered(job_id, digest)) is not None:
            return existing
        try:
            doc = json.loads(self._open({FAILURE_NAME: body}, FAILURE_NAME, job_id, tar=False))
            if not isinstance(doc, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise AirlockRefusal(400, "the failure detail is not a JSON document") from None
        self._keep(job_id, {FAILURE_NAME: body})
        return self._record(
            job, digest, kind="failure", findings={}, notebook="", event="airlock.failure_received"
        )

    def _record(
        self,
        job: GrantedJob,
        digest: str,
        *,
        kind: str,
        findings: dict[str, list[str]],
        notebook: str,
        event: str,
        detail: dict[str, Any] | None = None,
    ) -> HeldJob:
        """Record a kept delivery as waiting for review and audit it (after the platform's own events of
        the job, so the trail keeps their order)."""
        refs = [ref for ref, _, _ in job.datasets]
        try:
            with self.db.session() as s:
                s.add(
                    HeldRecord(
                        job_id=job.job_id,
                        grant_id=job.grant_id,
                        user=job.user,
                        received_at=int(self.clock()),
                        status="waiting",
                        receipt_digest=digest,
                        datasets=json.dumps([list(d) for d in job.datasets]),
                        providers=json.dumps(sorted({r.split("/", 1)[0] for r in refs})),
                        findings=json.dumps(findings),
                        notebook=notebook,
                        comment="",
                        kind=kind,
                    )
                )
        except DBIntegrityError:  # delivered twice at once: the other delivery's record stands
            held = self.held(job.job_id)
            if held is None:
                raise
            return held
        self._platform_events()
        self.db.audit(
            event,
            status=201,
            user=job.user,
            job_id=job.job_id,
            grant_id=job.grant_id,
            detail={"datasets": refs, **(detail or {})},
        )
        held = self.held(job.job_id)
        assert held is not None
        return held

    def _delivered(self, job_id: str, digest: str) -> HeldJob | None:
        """The job's record if this very result (by digest) was delivered before; ``None`` if nothing was.
        Another result of a job the airlock holds is refused (409)."""
        with self.db.session() as s:
            row = s.get(HeldRecord, job_id)
            if row is None:
                return None
            same = row.receipt_digest == digest
        if not same:
            raise AirlockRefusal(409, f"the airlock already holds another result of job {job_id}")
        return self.held(job_id)

    def _platform_events(self) -> None:
        if self.platform is not None:
            ingest_platform_events(self.db, self.platform)

    def _own_job(self, user: str, job_id: str) -> GrantedJob:
        try:
            contract.check_job_id(job_id)
        except DCRError:
            raise AirlockRefusal(404, f"no job {job_id!r} of yours is known to the hub") from None
        job = self.db.job(job_id)
        if job is None or job.user != user:  # another user's job looks exactly like no job at all
            raise AirlockRefusal(404, f"no job {job_id} of yours is known to the hub")
        return job

    def _check(self, job: GrantedJob, files: dict[str, bytes]) -> ReceiptManifest:
        """Everything that makes a held result this job's, attested: the receipt, then the sealed files."""
        if not self.trust:
            raise AirlockRefusal(
                503,
                "the hub pins no enclave trust anchor, so it cannot check held results",
                hint="the administrator sets the platform's trust_jwks or trust_roots "
                "(e.g. c.LocalEnclaveHost.trust_jwks)",
            )
        try:
            manifest = ReceiptManifest.from_bytes(files[contract.RECEIPT_FILE])
        except DCRError as e:
            raise AirlockRefusal(400, f"the receipt is malformed: {e.message}") from None
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".check-") as scratch:
            d = Path(scratch)
            for name in RECEIPT_NAMES:
                (d / name).write_bytes(files[name])
            checks = check_receipt_dir(
                d,
                trusted_keys=self.trust.keys,
                trusted_thumbprints=self.trust.thumbprints,
                trust_root_pem=self.trust.roots_pem,
                expected_enclave_digests=self.enclave_digests,
                expected_hub_keys=[self.hub_key.thumbprint],
            )
        failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
        if failed:
            raise AirlockRefusal(409, "the receipt does not verify: " + "; ".join(failed[:5]))
        claims = manifest.grant.get("claims", {})
        airlock_public = _b64url(self.key.public)
        expected = {
            "job id": (manifest.job_id, job.job_id),
            "grant id": (claims.get("jti"), job.grant_id),
            "user": (claims.get("sub"), job.user),
            "bundle digest": (manifest.bundle_digest, job.bundle_digest),
            "output key": (claims.get("output_key"), job.output_public_key),
            "airlock key": (claims.get("airlock_key"), airlock_public),
            "hub key": (manifest.hub_key_thumbprint, self.hub_key.thumbprint),
            "decision": (manifest.decision, "held"),
        }
        wrong = [what for what, (got, want) in expected.items() if got != want]
        if wrong:
            raise AirlockRefusal(
                409, f"the receipt is not this job's held result (its {', '.join(wrong)} differ)"
            )
        reveal_raw = self._open(files, contract.SEALED_REVEAL_FILE, job.job_id, tar=False)
        try:
            entries = open_commitment(reveal_raw, manifest.release["outputs_commitment"])
        except DCRError as e:
            raise AirlockRefusal(
                409, f"the sealed outputs are not the ones the receipt attests: {e.message}"
            ) from None
        members = tar_members(
            self._open(files, contract.SEALED_OUTPUTS_FILE, job.job_id, tar=True), "outputs"
        )
        listed = {e.path: (e.size, e.sha256) for e in entries}
        got = {path: (len(data), sha256_bytes(data)) for path, data in members.items()}
        if got != listed:
            raise AirlockRefusal(
                409,
                "the sealed outputs are not the ones the receipt attests (their files or digests differ)",
            )
        return manifest

    def _open(self, files: dict[str, bytes], name: str, job_id: str, *, tar: bool) -> bytes:
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".sealed-") as f:
            f.write(files[name])  # sealed bytes only: the clear text stays in memory
            f.flush()
            try:
                return open_to_memory(
                    Path(f.name), self.key.private, job_id=job_id, tar=tar, max_bytes=self.max_body_bytes
                )
            except DCRError as e:
                raise AirlockRefusal(409, f"{name} does not open with the airlock key: {e.message}") from None

    def _keep(self, job_id: str, files: dict[str, bytes]) -> None:
        dest = self.root / job_id
        if dest.exists():
            shutil.rmtree(dest)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{job_id}."))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # -- reading ----------------------------------------------------------------------------------------

    def held(self, job_id: str) -> HeldJob | None:
        with self.db.session() as s:
            row = s.get(HeldRecord, job_id)
            if row is None:
                return None
            reviews = s.scalars(
                select(ReviewRecord).where(ReviewRecord.job_id == job_id).order_by(ReviewRecord.id)
            )
            return held_job(
                row,
                [
                    Review(r.reviewer, r.decision, r.comment, r.at, tuple(json.loads(r.providers or "[]")))
                    for r in reviews
                ],
            )

    def queue(
        self,
        reviewer: str,
        groups: set[str],
        *,
        admin: bool = False,
        limit: int = 200,
        offset: int = 0,
        status: str | None = "waiting",
    ) -> tuple[list[HeldJob], int]:
        """The held jobs ``reviewer`` may review, oldest waiting first, and how many there are."""
        mine = self.reviewable_providers(reviewer, groups, admin=admin)
        if not mine:
            return [], 0
        with self.db.session() as s:
            q = select(HeldRecord).order_by(HeldRecord.received_at, HeldRecord.job_id)
            if status is not None:
                q = q.where(HeldRecord.status == status)
            rows = [r for r in s.scalars(q) if set(json.loads(r.providers)) & mine]
            page = rows[offset : offset + limit]
            ids = [r.job_id for r in page]
            reviews: dict[str, list[Review]] = {i: [] for i in ids}
            if ids:
                for r in s.scalars(
                    select(ReviewRecord).where(ReviewRecord.job_id.in_(ids)).order_by(ReviewRecord.id)
                ):
                    reviews[r.job_id].append(
                        Review(
                            r.reviewer, r.decision, r.comment, r.at, tuple(json.loads(r.providers or "[]"))
                        )
                    )
            return [held_job(r, reviews[r.job_id]) for r in page], len(rows)

    def reviewable_providers(self, user: str, groups: set[str], *, admin: bool = False) -> set[str]:
        specs = self.policy.provider_specs()
        if admin and self.policy.admins_review:
            return set(specs)
        return {p for p, spec in specs.items() if spec.may_review(user, groups)}

    def may_view(self, user: str, groups: set[str], held: HeldJob, *, admin: bool = False) -> bool:
        return bool(set(held.providers) & self.reviewable_providers(user, groups, admin=admin))

    def open_for_review(self, held: HeldJob) -> OpenedResult:
        """The held outputs (and sealed figures) opened in memory, for one reviewer's page."""
        d = self.root / held.job_id
        files: dict[str, bytes] = {}
        sealed = d / contract.SEALED_OUTPUTS_FILE
        if sealed.is_file():
            payload = open_to_memory(
                sealed, self.key.private, job_id=held.job_id, tar=True, max_bytes=self.max_body_bytes
            )
            files = tar_members(payload, "outputs")
        return OpenedResult(
            files,
            self._sealed_json(d, contract.SEALED_CHECK_FILE, held.job_id),
            self._sealed_json(d, FAILURE_NAME, held.job_id),
        )

    def _sealed_json(self, d: Path, name: str, job_id: str) -> dict[str, Any] | None:
        p = d / name
        if not p.is_file():
            return None
        try:
            doc = json.loads(
                open_to_memory(p, self.key.private, job_id=job_id, tar=False, max_bytes=self.max_body_bytes)
            )
        except (DCRError, ValueError):
            return {"error": f"{name} does not open with the airlock key"}
        return doc if isinstance(doc, dict) else {"value": doc}

    def receipt_files(self, job_id: str) -> dict[str, bytes]:
        d = self.root / contract.check_job_id(job_id)
        return {n: (d / n).read_bytes() for n in RECEIPT_NAMES if (d / n).is_file()}

    def provider_names(self, providers: Iterable[str]) -> list[str]:
        specs = self.policy.provider_specs()
        return [specs[p].name if p in specs else p for p in providers]

    def status_for_owner(self, user: str, job_id: str) -> dict[str, Any]:
        """What the job's owner may know: the status, who decides, how far they are. Never the outputs."""
        self._own_job(user, job_id)
        held = self.held(job_id)
        if held is None:
            raise AirlockRefusal(404, f"the airlock has not received job {job_id}")
        return self.describe(held)

    def describe(self, held: HeldJob) -> dict[str, Any]:
        approvals = len(held.approvers)
        return {
            "job_id": held.job_id,
            "status": held.status,
            "reviewers": self.provider_names(held.providers),
            "required_approvals": self.required_approvals(held),
            "approvals": approvals,
            "comment": held.comment or None,
            "decided_at": _iso(held.decided_at) if held.decided_at else None,
            "received_at": _iso(held.received_at),
            "kind": held.kind,
        }

    def required_approvals(self, held: HeldJob) -> int:
        return self.policy.review_approvals

    # -- deciding ---------------------------------------------------------------------------------------

    def decide(
        self,
        reviewer: str,
        groups: set[str],
        job_id: str,
        decision: str,
        comment: str,
        *,
        admin: bool = False,
    ) -> HeldJob:
        """Record one reviewer's approval or rejection; release once every provider has its approvals."""
        if decision not in ("approve", "reject"):
            raise AirlockRefusal(400, "the decision must be 'approve' or 'reject'")
        comment = (comment or "").strip()
        if len(comment) > MAX_COMMENT:
            raise AirlockRefusal(400, f"the comment is longer than {MAX_COMMENT} characters")
        if decision == "reject" and not comment:
            raise AirlockRefusal(400, "say why in the comment: the researcher sees it with the rejection")
        with self._lock:
            held = self.held(job_id)
            if held is None or not self.may_view(reviewer, groups, held, admin=admin):
                raise AirlockRefusal(404, f"no held job {job_id} is yours to review")
            if held.user == reviewer:
                raise AirlockRefusal(403, "you cannot review your own job")
            if held.status != "waiting":
                raise AirlockRefusal(409, f"job {job_id} was already {held.status}")
            if reviewer in {r.reviewer for r in held.reviews}:
                raise AirlockRefusal(
                    409, f"you already decided on job {job_id}; another reviewer must decide"
                )
            now = int(self.clock())
            self._platform_events()
            mine = self.reviewable_providers(reviewer, groups, admin=admin) & set(held.providers)
            detail = {"datasets": [ref for ref, _, _ in held.datasets], "providers": sorted(mine)}
            with self.db.session() as s:
                s.add(
                    ReviewRecord(
                        job_id=job_id,
                        reviewer=reviewer,
                        decision=decision,
                        comment=comment,
                        at=now,
                        providers=json.dumps(sorted(mine)),
                    )
                )
            self.db.audit(
                f"airlock.{'approved' if decision == 'approve' else 'rejected'}",
                status=200,
                user=reviewer,
                job_id=job_id,
                grant_id=held.grant_id,
                reason=comment,
                detail=detail,
            )
            if decision == "reject":
                self._set_status(job_id, "rejected", now, comment)
            elif self._approved(job_id):
                self._release(job_id)
                comments = "; ".join(r.comment for r in (self.held(job_id) or held).reviews if r.comment)
                self._set_status(job_id, "released", now, comments)
                self.db.audit(
                    "airlock.released",
                    status=200,
                    user=held.user,
                    job_id=job_id,
                    grant_id=held.grant_id,
                    detail={
                        "datasets": [ref for ref, _, _ in held.datasets],
                        "approvers": [*held.approvers, reviewer],
                        "kind": held.kind,
                    },
                )
            new = self.held(job_id)
            assert new is not None
            return new

    def _approved(self, job_id: str) -> bool:
        """Every provider of the job has ``review_approvals`` distinct approvers who could review it for
        that provider when they decided (never the job's author)."""
        held = self.held(job_id)
        assert held is not None
        need = self.required_approvals(held)
        for provider in held.providers:
            approvers = {
                r.reviewer
                for r in held.reviews
                if r.decision == "approve" and r.reviewer != held.user and provider in r.providers
            }
            if len(approvers) < need:
                return False
        return True

    def _set_status(self, job_id: str, status: str, at: int, comment: str) -> None:
        with self.db.session() as s:
            row = s.get(HeldRecord, job_id)
            assert row is not None
            row.status = status
            row.decided_at = at
            row.comment = comment[:MAX_COMMENT]

    def _release(self, job_id: str) -> None:
        """Re-seal the outputs' tar and the reveal (or a failure's detail) to the job's own key; the clear
        text stays in memory."""
        job = self.db.job(job_id)
        assert job is not None
        recipient = _unb64url(job.output_public_key)
        d = self.root / job_id
        if not (d / contract.SEALED_OUTPUTS_FILE).exists():
            self._reseal(
                d, job_id, FAILURE_NAME, RELEASED_FAILURE, recipient, tar=False, limit=MAX_FAILURE_BYTES
            )
            return
        limit = self.max_body_bytes
        self._reseal(
            d, job_id, contract.SEALED_OUTPUTS_FILE, RELEASED_OUTPUTS, recipient, tar=True, limit=limit
        )
        self._reseal(
            d, job_id, contract.SEALED_REVEAL_FILE, RELEASED_REVEAL, recipient, tar=False, limit=limit
        )

    def _reseal(
        self, d: Path, job_id: str, src: str, dest: str, recipient: bytes, *, tar: bool, limit: int
    ) -> None:
        """Open ``src`` with the airlock key in memory and seal the same bytes to ``recipient`` as ``dest``."""
        clear = open_to_memory(d / src, self.key.private, job_id=job_id, tar=tar, max_bytes=limit)
        if tar:
            seal_tar_payload(clear, d / dest, recipient, job_id=job_id)
        else:
            seal_bytes(clear, d / dest, recipient, job_id=job_id)

    def released_files(self, user: str, job_id: str) -> bytes:
        """The released result for its owner: a tar of the outputs and the reveal, sealed to the job's key."""
        self._own_job(user, job_id)
        held = self.held(job_id)
        if held is None:
            raise AirlockRefusal(404, f"the airlock has not received job {job_id}")
        if held.status != "released":
            raise AirlockRefusal(409, f"job {job_id} is {held.status}: nothing is released")
        d = self.root / job_id
        pairs = (
            [(RELEASED_FAILURE, FAILURE_NAME)]
            if held.kind == "failure"
            else [
                (RELEASED_OUTPUTS, contract.SEALED_OUTPUTS_FILE),
                (RELEASED_REVEAL, contract.SEALED_REVEAL_FILE),
            ]
        )
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for src, name in pairs:
                data = (d / src).read_bytes()
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                ti.mode = 0o600
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()


def _read_result_tar(body: bytes) -> dict[str, bytes]:
    """The files of a held result as the researcher's server sends them: a plain tar of regular files."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tf:
            for m in tf:
                if m.name not in ALLOWED_NAMES:
                    raise AirlockRefusal(400, f"the held result holds an unexpected member {m.name[:80]!r}")
                if not m.isreg():
                    raise AirlockRefusal(400, f"the held result's member {m.name} is not a regular file")
                if m.name in files:
                    raise AirlockRefusal(400, f"the held result holds {m.name} twice")
                data = tf.extractfile(m)
                assert data is not None
                files[m.name] = data.read()
    except tarfile.TarError:
        raise AirlockRefusal(400, "the held result is not a tar archive") from None
    missing = [n for n in REQUIRED_NAMES if n not in files]
    if missing:
        raise AirlockRefusal(400, f"the held result lacks {', '.join(missing)}")
    return files


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
