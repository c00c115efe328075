"""The launch contract: every name shared by the hub, the user's server, the backends and the enclave.

This module is the single place that defines job identifiers, the launch environment, the progress
channel and the layout of a job's outputs and receipt. The backends, the image's launch-policy labels and
the supervisor all import it; nothing else invents these names. Changing a value here is a protocol
change: bump :data:`CONTRACT_VERSION`.

Nothing secret ever travels through the launch environment: it carries identifiers, digests, public keys
and the grant (a signed, non-secret authorisation bound to one job).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

from dcr_enclave.formats.errors import DCRError

CONTRACT_VERSION: Final = 1

# ---------------------------------------------------------------------------------------------------------
# Identifiers
# ---------------------------------------------------------------------------------------------------------

JOB_ID_RE: Final = re.compile(r"^job-[0-9a-f]{24}$")
GRANT_ID_RE: Final = re.compile(r"^grant-[0-9a-f]{32}$")
#: Provider and dataset names: they become path components under ``/data`` and in stores.
NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: A dataset file name: one path component, no leading dot, nothing that needs quoting in a shell.
FILE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_job_id() -> str:
    return "job-" + secrets.token_hex(12)


def new_grant_id() -> str:
    return "grant-" + secrets.token_hex(16)


def check_job_id(value: str) -> str:
    if not isinstance(value, str) or not JOB_ID_RE.match(value):
        raise DCRError(f"not a job id: {value!r}", hint="job ids look like job-<24 hex digits>")
    return value


def check_name(value: str, what: str) -> str:
    """Validate a provider or dataset name (lowercase letters, digits, '-' and '_', at most 63)."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise DCRError(
            f"invalid {what} name {value!r}",
            hint="use 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    return value


def check_file_name(value: str) -> str:
    if not isinstance(value, str) or not FILE_NAME_RE.match(value) or value in (".", ".."):
        raise DCRError(
            f"invalid dataset file name {value!r}",
            hint="use letters, digits, '.', '-' or '_' (one path component, not starting with '.')",
        )
    return value


# ---------------------------------------------------------------------------------------------------------
# Where data appears, in both stages
# ---------------------------------------------------------------------------------------------------------

#: Mount point of the datasets in the sandbox (synthetic) and in the enclave kernel (real).
DATA_ROOT: Final = "/data"


def data_path(provider: str, dataset: str, file_name: str) -> str:
    """``/data/<provider>/<dataset>/<file>``: the one path a notebook uses in both stages."""
    return f"{DATA_ROOT}/{check_name(provider, 'provider')}/{check_name(dataset, 'dataset')}/{check_file_name(file_name)}"


# ---------------------------------------------------------------------------------------------------------
# Tokens: issuers, audiences and JWT types
# ---------------------------------------------------------------------------------------------------------

#: Issuer of Google Confidential Space attestation tokens.
GOOGLE_ISSUER: Final = "https://confidentialcomputing.googleapis.com"
#: Issuer of the local enclave host's simulated attestation tokens.
LOCAL_ISSUER: Final = "urn:dcr:local-enclave-host"
#: ``hwmodel`` of the local simulation; never a hardware TEE.
LOCAL_HWMODEL: Final = "LOCAL_SIMULATED"
#: ``swname`` of the local simulation (Confidential Space says ``CONFIDENTIAL_SPACE``).
LOCAL_SWNAME: Final = "DCR_LOCAL_SIMULATION"
HARDWARE_SWNAME: Final = "CONFIDENTIAL_SPACE"

#: Audience of the custom attestation token that signs a receipt.
RECEIPT_AUDIENCE: Final = "dcr:receipt"
#: Audience of the attestation token presented to a provider's key release.
KEY_RELEASE_AUDIENCE: Final = "dcr:key-release"

#: The grant: a JWT from the hub authorising exactly one job.
GRANT_ISSUER: Final = "dcr-hub"
GRANT_AUDIENCE: Final = "dcr-enclave"
GRANT_TYP: Final = "dcr-grant+jwt"
#: The only signature algorithms DCR accepts anywhere (``none`` and HMAC never).
ACCEPTED_ALGORITHMS: Final = ("ES256", "RS256")

# ---------------------------------------------------------------------------------------------------------
# The launch environment (``tee-env-<NAME>`` metadata in Confidential Space; the process environment locally)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnv:
    """Names of the environment variables the supervisor is launched with."""

    JOB_ID: str = "DCR_JOB_ID"
    #: ``sha256:...`` of the bundle; the supervisor refuses a bundle with another digest.
    BUNDLE_DIGEST: str = "DCR_BUNDLE_DIGEST"
    #: Where the bundle is: a path (local) or ``gs://bucket/object`` (cloud).
    BUNDLE_URI: str = "DCR_BUNDLE_URI"
    #: The grant JWT (not secret: it is bound to this job and useless without the enclave).
    GRANT: str = "DCR_GRANT"
    #: RFC 7638 thumbprint of the hub key the grant must verify against; pinned by providers' conditions.
    HUB_KEY_THUMBPRINT: str = "DCR_HUB_KEY_THUMBPRINT"
    #: The hub's public JWKS (JSON); only the key whose thumbprint matches the above is used.
    HUB_JWKS: str = "DCR_HUB_JWKS"
    #: Where encrypted datasets are read from: a store directory (local) or ``gs://`` prefix (cloud).
    STORE_URI: str = "DCR_STORE_URI"
    #: Where sealed outputs and the receipt are written.
    OUTPUT_URI: str = "DCR_OUTPUT_URI"
    #: Where progress messages go (see :class:`Progress`).
    PROGRESS_URI: str = "DCR_PROGRESS_URI"


ENV: Final = LaunchEnv()

#: Every launch variable, in a fixed order (the image's ``tee.launch_policy.allow_env_override`` label).
LAUNCH_ENV_NAMES: Final = tuple(getattr(ENV, f) for f in LaunchEnv.__dataclass_fields__)
#: The subset carried into attestation claims (``submods.container.env``) and pinned by conditions.
ATTESTED_ENV_NAMES: Final = (ENV.JOB_ID, ENV.BUNDLE_DIGEST, ENV.HUB_KEY_THUMBPRINT)

# ---------------------------------------------------------------------------------------------------------
# The progress channel: one JSON object per line (local) or per object (cloud). Never data.
# ---------------------------------------------------------------------------------------------------------


class Progress:
    """Message kinds on the progress channel and their fields.

    ``{"kind": "state", "state": <a job state>}``
    ``{"kind": "cell", "index": i, "count": n}``  (cell *i* of *n* started, 0-based)
    ``{"kind": "failed", "reason": "...", "cell": i | null, "ename": "ValueError" | null}``
    """

    STATE: Final = "state"
    CELL: Final = "cell"
    FAILED: Final = "failed"
    KINDS: Final = (STATE, CELL, FAILED)
    #: A progress message is small; anything bigger is refused by readers.
    MAX_MESSAGE_BYTES: Final = 4096


#: Job states, in lifecycle order (docs/architecture); the last group are terminal.
JOB_STATES: Final = (
    "submitted",
    "granted",
    "launching",
    "running",
    "checking",
    "succeeded",
    "held",
    "released",
    "rejected",
    "failed",
    "cancelled",
)
TERMINAL_STATES: Final = frozenset({"succeeded", "released", "rejected", "failed", "cancelled"})

# ---------------------------------------------------------------------------------------------------------
# Output and receipt layout (a directory locally, a prefix in Cloud Storage)
# ---------------------------------------------------------------------------------------------------------

#: The receipt manifest (canonical JSON); its sha256 is the attestation token's nonce.
RECEIPT_FILE: Final = "receipt.json"
#: The attestation token over the receipt.
TOKEN_FILE: Final = "attestation.jwt"
#: The signer's JWKS as the enclave saw it: a convenience; verifiers must pin their own anchors.
SIGNER_JWKS_FILE: Final = "signer-jwks.json"
#: Output files in the clear, once decrypted for their recipient.
OUTPUTS_DIR: Final = "outputs"
#: Outputs sealed to the job's X25519 key (or the hub's airlock key) by the enclave.
SEALED_OUTPUTS_FILE: Final = "outputs.sealed"
#: Written instead of outputs when a job fails: the cell index and exception type only.
FAILURE_FILE: Final = "failure.json"
#: Held jobs: the reveal of the receipt's output commitment, sealed with the outputs (opened after release
#: as :data:`REVEAL_FILE` beside the receipt).
SEALED_REVEAL_FILE: Final = "outputs-reveal.sealed"
REVEAL_FILE: Final = "outputs-reveal.json"
#: Refused or held outputs whose grant names an airlock key: the output check's exact figures and the
#: disclosure findings (file, row, column, value, rule, threshold) as
#: ``{"violations": [...], "disclosure": [...]}``, sealed to the reviewers only.
SEALED_CHECK_FILE: Final = "output-check.sealed"
#: A failed job with an airlock key in its grant: the full failure (cell, exception type and value, the
#: traceback without terminal codes, size-bounded), sealed to the reviewers only; the public report
#: (:data:`FAILURE_FILE`, the progress channel) stays the cell index and a built-in exception type.
SEALED_FAILURE_FILE: Final = "failure-detail.sealed"
#: Under review, job end times are rounded up to this many seconds unless the platform says otherwise.
DEFAULT_TIME_QUANTUM: Final = 60.0

# ---------------------------------------------------------------------------------------------------------
# The local platform (the enclave host): what it gives the supervisor besides the launch environment.
# In Confidential Space the launcher provides the equivalent (the teeserver socket, a fixed image user).
# ---------------------------------------------------------------------------------------------------------

#: File descriptor of the supervisor's private link to the enclave host (attestation, key release, progress).
LOCAL_LINK_FD: Final = "DCR_LOCAL_LINK_FD"
#: Private scratch directory the supervisor mounts its memory-backed storage on.
LOCAL_SCRATCH: Final = "DCR_LOCAL_SCRATCH"
#: Size in bytes of that memory-backed storage (decrypted data, working copy, outputs).
LOCAL_SCRATCH_BYTES: Final = "DCR_LOCAL_SCRATCH_BYTES"
#: The unprivileged account the kernel sandbox runs as, ``uid:gid``.
LOCAL_SANDBOX_IDS: Final = "DCR_LOCAL_SANDBOX_IDS"
#: Seconds to which the end of a job under review is rounded up (receipt and reported state).
LOCAL_TIME_QUANTUM: Final = "DCR_LOCAL_TIME_QUANTUM"

# ---------------------------------------------------------------------------------------------------------
# Google Confidential Space: Cloud Storage layout and the process environment only tests set.
# The real launcher passes the allowed ``tee-env-*`` names and the image's own ENV, and the image sets none
# of the ``DCR_CLOUD_*`` names below, so in production each takes its default.
# ---------------------------------------------------------------------------------------------------------

#: The launcher's socket for custom attestation tokens (``POST /v1/token``).
CLOUD_TEESERVER_SOCKET: Final = "DCR_CLOUD_TEESERVER_SOCKET"
DEFAULT_TEESERVER_SOCKET: Final = "/run/container_launcher/teeserver.sock"
#: Security Token Service (token exchange under a Workload Identity pool provider).
CLOUD_STS_ENDPOINT: Final = "DCR_CLOUD_STS_ENDPOINT"
DEFAULT_STS_ENDPOINT: Final = "https://sts.googleapis.com"
#: Cloud KMS (decrypt of the wrapped data keys).
CLOUD_KMS_ENDPOINT: Final = "DCR_CLOUD_KMS_ENDPOINT"
DEFAULT_KMS_ENDPOINT: Final = "https://cloudkms.googleapis.com"
#: Cloud Storage; when set, anonymous credentials are used (the tests' emulator).
CLOUD_STORAGE_ENDPOINT: Final = "DCR_CLOUD_STORAGE_ENDPOINT"
DEFAULT_STORAGE_ENDPOINT: Final = "https://storage.googleapis.com"
#: Mount point of the supervisor's private tmpfs.
CLOUD_SCRATCH: Final = "DCR_CLOUD_SCRATCH"
DEFAULT_CLOUD_SCRATCH: Final = "/run/dcr-scratch"
#: ``uid:gid`` of the kernel sandbox account; default the image's fixed account.
CLOUD_SANDBOX_IDS: Final = "DCR_CLOUD_SANDBOX_IDS"
#: The image's kernel account (``enclave/Dockerfile`` creates it with exactly these ids).
CLOUD_KERNEL_UID: Final = 10001
CLOUD_KERNEL_GID: Final = 10001
#: Size in bytes of the scratch tmpfs (the image may set it; a test sets a small one).
CLOUD_SCRATCH_BYTES: Final = "DCR_CLOUD_SCRATCH_BYTES"
#: Seconds to which the end of a job under review is rounded up (default :data:`DEFAULT_TIME_QUANTUM`).
CLOUD_TIME_QUANTUM: Final = "DCR_CLOUD_TIME_QUANTUM"
#: The image's launch-policy labels, derived from this contract (checked against enclave/Dockerfile).
LAUNCH_POLICY_LABELS: Final = {
    "tee.launch_policy.allow_env_override": ",".join(LAUNCH_ENV_NAMES),
    "tee.launch_policy.log_redirect": "debugonly",
    # The supervisor mounts its private tmpfs and bubblewrap builds the kernel's namespaces: both need
    # CAP_SYS_ADMIN, which the launcher adds only when the image allows it (tee-added-capabilities).
    "tee.launch_policy.allow_capabilities": "true",
}
#: What the hub's launcher asks for in ``tee-added-capabilities``.
CLOUD_ADDED_CAPABILITIES: Final = ("CAP_SYS_ADMIN",)

#: Names of the objects of a job under the jobs prefix.
CLOUD_BUNDLE_OBJECT: Final = "bundle"
CLOUD_RESULT_PREFIX: Final = "result/"
CLOUD_PROGRESS_PREFIX: Final = "progress/"
#: The completion objects: exactly one of them is written, and last.
CLOUD_COMPLETION_FILES: Final = (RECEIPT_FILE, FAILURE_FILE)

_GS_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


@dataclass(frozen=True)
class GsUri:
    """A ``gs://bucket/name`` URI, parsed; ``name`` may be a prefix ending in ``/`` (or empty)."""

    bucket: str
    name: str

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    def child(self, rel: str) -> GsUri:
        """The object ``rel`` under this prefix."""
        base = self.name if not self.name or self.name.endswith("/") else self.name + "/"
        return GsUri(self.bucket, base + rel)


def parse_gs_uri(value: str, what: str = "Cloud Storage URI") -> GsUri:
    """Parse ``gs://bucket[/name]``; refuses anything else (other schemes, odd bucket names, ``..``)."""
    if not isinstance(value, str) or not value.startswith("gs://"):
        raise DCRError(f"{what} {value!r} is not a gs:// URI")
    bucket, _, name = value[len("gs://") :].partition("/")
    if not _GS_BUCKET_RE.match(bucket) or ".." in bucket:
        raise DCRError(f"{what} {value!r}: {bucket!r} is not a Cloud Storage bucket name")
    if any(p in (".", "..") for p in name.split("/")) or "//" in name or any(ord(c) < 32 for c in name):
        raise DCRError(f"{what} {value!r} has an empty, '.' or '..' component or control characters")
    if len(name.encode()) > 1024:
        raise DCRError(f"{what} {value!r}: object names are at most 1024 bytes")
    return GsUri(bucket, name)


def cloud_job_prefix(jobs_uri: str, job_id: str) -> str:
    """``gs://<bucket>/<prefix>jobs/<job_id>/`` for a jobs URI ``gs://<bucket>/<prefix>``."""
    base = parse_gs_uri(jobs_uri, "jobs bucket URI")
    return str(base.child(f"jobs/{check_job_id(job_id)}/"))


def cloud_bundle_uri(jobs_uri: str, job_id: str) -> str:
    """The launch's BUNDLE_URI: one object, the bundle file."""
    return cloud_job_prefix(jobs_uri, job_id) + CLOUD_BUNDLE_OBJECT


def cloud_output_uri(jobs_uri: str, job_id: str) -> str:
    """The launch's OUTPUT_URI: a prefix; the result files are named as in the local layout."""
    return cloud_job_prefix(jobs_uri, job_id) + CLOUD_RESULT_PREFIX


def cloud_progress_uri(jobs_uri: str, job_id: str) -> str:
    """The launch's PROGRESS_URI: a prefix of ``<seq:08d>.json`` objects, one Progress message each."""
    return cloud_job_prefix(jobs_uri, job_id) + CLOUD_PROGRESS_PREFIX


def progress_object_name(seq: int) -> str:
    """The name of progress message ``seq`` (from 0) under PROGRESS_URI; names sort in order."""
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 10**8:
        raise DCRError(f"progress sequence number {seq!r} out of range")
    return f"{seq:08d}.json"
