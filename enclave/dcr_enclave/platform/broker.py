"""The local key broker: the providers' key release, as the enclave host plays it.

A data key leaves the broker only when all of these hold, checked in this order:

1. the request answers a challenge this broker issued to this job, unused and fresh (no replay);
2. the attestation token verifies against the host's own signer, with the key-release audience and the
   challenge as its nonce;
3. the grant verifies against the hub key whose thumbprint the token's launch environment carries, and
   names this job, this bundle and this dataset version;
4. the provider's condition (compiled to CEL, :mod:`dcr_enclave.platform.condition_cel`) holds for the token's
   claims and the grant's values.

Every release and every refusal is appended to the audit log, and logged (see :class:`AuditLog`). In Google
Cloud the same decision is made by STS (token), a Workload Identity Pool condition (the compiled CEL) and
Cloud KMS (the unwrap).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import verify_grant
from dcr_enclave.platform.condition import KeyReleaseCondition
from dcr_enclave.platform.condition_cel import evaluate
from dcr_enclave.platform.grant_ledger import GrantLedger
from dcr_enclave.platform.journal import HostJournal
from dcr_enclave.platform.key_store import KeyDirectory, check_private_dir
from dcr_enclave.verify.token import verify_token

CHALLENGE_TTL = 120.0
#: The kinds of key-release refusal, as ``key_refused`` records carry them (``reason_code``): which check
#: failed, never the refusal's text.
REFUSAL_CODES = (
    "request",  # malformed: names, no wrapped key, no hub JWKS
    "challenge",  # unknown, expired or used challenge (replay)
    "attestation",  # the token does not verify or is not this job's
    "grant",  # the grant does not verify, was not launched for this job, or does not name the version
    "condition",  # the provider's condition does not hold, or cannot be read
    "unwrap",  # the data key could not be unwrapped
)


class _Refused(DCRError):
    """A key-release refusal with the :data:`REFUSAL_CODES` kind of the check that failed."""

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


@dataclass
class _Challenge:
    job_id: str
    expires: float


#: The enclave host's log (stderr under ``dcr enclave-host``): one line per audit record.
log = logging.getLogger("dcr_enclave.host")

#: The audit fields a log line carries, as ``key=value`` in this order: identifiers, the hub user, dataset
#: references, states and fixed reason codes. Everything else (free-text refusal reasons, digests) stays
#: in the owner-only audit file: nothing a notebook chooses may reach the log.
LOGGED_FIELDS: tuple[tuple[str, str], ...] = (
    ("user", "user"),
    ("owner_uid", "uid"),
    ("grant_id", "grant"),
    ("dataset", "dataset"),
    ("version", "version"),
    ("state", "state"),
    ("reason_code", "reason"),
)
#: Values logged as they are; any other value is logged JSON-quoted, so a line stays one line of pairs.
_PLAIN = re.compile(r"[A-Za-z0-9._:@+/-]{1,200}")


def log_line(event: str, fields: dict[str, Any]) -> str:
    """``job=<id> event=<event> user=... grant=... dataset=<provider>/<dataset> version=... state=...
    reason=...``: the pairs present in ``fields``, in :data:`LOGGED_FIELDS` order."""
    fields = dict(fields)
    if "provider" in fields and "dataset" in fields:
        fields["dataset"] = f"{fields['provider']}/{fields['dataset']}"
    pairs = [("job", fields.get("job_id")), ("event", event)]
    pairs += [(key, fields[name]) for name, key in LOGGED_FIELDS if fields.get(name) is not None]
    return " ".join(f"{k}={_log_value(v)}" for k, v in pairs)


def _log_value(value: Any) -> str:
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text[:200])


class AuditLog:
    """Append-only JSON-lines log, owner-only; one line per decision or job event, each also logged
    (:func:`log_line`) to the host's log, and the job events with their structured fields only (no free
    text) to the host's event journal when there is one (:class:`~dcr_enclave.platform.journal.HostJournal`,
    which the hub reads into its audit trail)."""

    def __init__(self, path: Path, journal: HostJournal | None = None) -> None:
        self.path = path
        self.journal = journal
        self._lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"time": time.time(), "event": event, **fields}, sort_keys=True) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            if self.journal is not None:
                self.journal.append(event, **fields)
        log.log(logging.WARNING if event == "key_refused" else logging.INFO, "%s", log_line(event, fields))


class KeyBroker:
    def __init__(
        self,
        keys_dir: Path,
        signer_jwks: list[dict[str, Any]],
        audit: AuditLog,
        ledger: GrantLedger | None = None,
    ) -> None:
        # Key material must be this process's own (root's, in the enclave host) and closed to everyone else.
        self.owner = os.geteuid()
        self.keys = KeyDirectory(keys_dir, owner=self.owner)
        self.keys_dir = keys_dir
        self.signer_jwks = signer_jwks
        self.audit = audit
        #: The host's record of launched grants; the broker releases keys only to the job a grant launched.
        self.ledger = ledger
        self._challenges: dict[str, _Challenge] = {}
        self._lock = threading.Lock()

    def new_challenge(self, job_id: str) -> str:
        value = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            # Forget expired challenges so the table stays small.
            for k in [k for k, c in self._challenges.items() if c.expires < now]:
                del self._challenges[k]
            self._challenges[value] = _Challenge(job_id, now + CHALLENGE_TTL)
        return value

    def _consume_challenge(self, value: Any, job_id: str) -> str:
        with self._lock:
            c = self._challenges.pop(value, None) if isinstance(value, str) else None
        if c is None or c.job_id != job_id or c.expires < time.monotonic():
            raise DCRError("key release refused: the challenge is unknown, expired or already used (replay)")
        return value

    def condition(self, provider: str, dataset: str) -> KeyReleaseCondition:
        """The provider's stored condition, read like its KEKs: no links, owner-only, owned by this process's
        account, inside a keys directory that is too."""
        try:
            check_private_dir(self.keys_dir, self.owner)
            cond = self.keys.read_condition(provider, dataset)
        except DCRError as e:
            raise DCRError(f"key release refused: {e.message}", hint=e.hint) from None
        if cond is None:
            raise DCRError(f"key release refused: provider {provider} has no condition for {dataset}")
        return cond

    def release(self, req: dict[str, Any], *, job_id: str) -> tuple[bytes, str]:
        """The data key for one dataset version and the digest of the condition that released it.

        Refusals raise :class:`DCRError` naming the failed check.
        """
        who = {
            "job_id": job_id,
            "provider": req.get("provider"),
            "dataset": req.get("dataset"),
            "version": req.get("version"),
        }
        try:
            key, detail = self._decide(req, job_id)
        except DCRError as e:
            code = e.code if isinstance(e, _Refused) else "request"
            self.audit.write("key_refused", reason=str(e), reason_code=code, **who)
            raise
        self.audit.write("key_released", **who, **detail)
        return key, detail["condition_digest"]

    def _decide(self, req: dict[str, Any], job_id: str) -> tuple[bytes, dict[str, Any]]:
        try:
            challenge = self._consume_challenge(req.get("challenge"), job_id)
        except DCRError as e:
            raise _Refused("challenge", e.message) from None
        provider = contract.check_name(req.get("provider"), "provider")  # type: ignore[arg-type]
        dataset = contract.check_name(req.get("dataset"), "dataset")  # type: ignore[arg-type]
        version = req.get("version")
        try:
            claims = verify_token(
                str(req.get("token")),
                trusted_keys=self.signer_jwks,
                trust_root_pem=None,
                issuers={contract.LOCAL_ISSUER},
                audience=contract.KEY_RELEASE_AUDIENCE,
                nonce=challenge,
                require_hardware=False,
                verify_exp=True,
            )
        except DCRError as e:
            raise _Refused("attestation", f"key release refused: attestation token: {e}") from None
        env = claims.env
        if env.get(contract.ENV.JOB_ID) != job_id:
            raise _Refused("attestation", "key release refused: the token is not for this job")
        hub_tp = env.get(contract.ENV.HUB_KEY_THUMBPRINT, "")
        hub_jwks = req.get("hub_jwks")
        if not isinstance(hub_jwks, list):
            raise DCRError("key release refused: the request carries no hub JWKS")
        try:
            g = verify_grant(
                str(req.get("grant")),
                hub_jwks,
                hub_key_thumbprint=hub_tp,
                job_id=job_id,
                bundle_digest=env.get(contract.ENV.BUNDLE_DIGEST),
            )
        except DCRError as e:
            raise _Refused("grant", f"key release refused: {e}") from None
        if self.ledger is not None and self.ledger.job_for(g.grant_id) != job_id:
            raise _Refused(
                "grant", "key release refused: this grant was not launched for this job on this host"
            )
        granted = {(d.provider, d.dataset): d.version for d in g.datasets}
        if granted.get((provider, dataset)) != version:
            raise _Refused(
                "grant", f"key release refused: the grant does not name {provider}/{dataset} at {version}"
            )
        try:
            cond = self.condition(provider, dataset)
        except DCRError as e:
            raise _Refused("condition", e.message, hint=e.hint) from None
        request = {
            "provider": provider,
            "dataset": dataset,
            "version": version,
            "bundle_digest": g.bundle_digest,
            "hub_key_thumbprint": hub_tp,
        }
        decision = evaluate(cond.to_json(), claims.payload, request)
        if not decision.allowed:
            raise _Refused(
                "condition",
                "key release refused: the provider's condition does not hold: " + "; ".join(decision.failed),
            )
        wrapped = req.get("wrapped_key")
        if not isinstance(wrapped, dict):
            raise DCRError("key release refused: no wrapped data key in the request")
        try:
            key = self.keys.unwrap(wrapped, provider, dataset, str(version))
        except DCRError as e:
            raise _Refused("unwrap", e.message, hint=e.hint) from None
        detail = {"grant_id": g.grant_id, "user": g.user, "image_digest": claims.image_digest}
        return key, {**detail, "condition_digest": cond.digest}
