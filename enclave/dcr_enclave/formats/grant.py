"""The per-job grant: the hub's signed authorisation for exactly one enclave run.

A grant is a JWT signed by the hub key (``typ: dcr-grant+jwt``, fixed issuer and audience from the launch
contract). It binds the user, the job id, the bundle digest, the datasets with their versions and release
modes, the output limits, the job's output public key (X25519), a unique id and an expiry near the job's
time limit. The supervisor and each provider's key release verify it against the hub key they pin by
thumbprint; nothing the user's server says can widen it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import jwt

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import key_alg, public_key_from_jwk, thumbprint

#: Grants are small; a bigger token is refused before it is parsed.
MAX_GRANT_BYTES = 16 * 1024
#: Clock skew tolerated between the hub and the enclave.
LEEWAY_SECONDS = 60
RELEASE_MODES = ("auto", "review")
#: The keys of the grant's ``disclosure`` claim (see :class:`DisclosureRules`).
DISCLOSURE_KEYS = ("min_cell_count", "dominance_min_contributors", "allow_extremes")


@dataclass(frozen=True)
class OutputLimits:
    """What a job may bring out: at most ``max_files`` files and ``max_bytes`` bytes in all."""

    max_files: int = 100
    max_bytes: int = 50 * 2**20
    #: Allowed file name suffixes (lower case, with the dot); empty means any.
    allowed_suffixes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "max_files": self.max_files,
            "max_bytes": self.max_bytes,
            "allowed_suffixes": list(self.allowed_suffixes),
        }

    @classmethod
    def from_json(cls, d: Any) -> OutputLimits:
        if not isinstance(d, dict):
            raise DCRError("grant output_limits must be an object")
        suffixes = d.get("allowed_suffixes", [])
        # A string would otherwise be taken letter by letter as suffixes.
        if not isinstance(suffixes, list) or not all(isinstance(s, str) for s in suffixes):
            raise DCRError("grant output_limits.allowed_suffixes must be a list of strings")
        try:
            lim = cls(
                max_files=_pos_int(d["max_files"], "output_limits.max_files"),
                max_bytes=_pos_int(d["max_bytes"], "output_limits.max_bytes"),
                allowed_suffixes=tuple(s.lower() for s in suffixes),
            )
        except KeyError as e:
            raise DCRError(f"grant output_limits lacks {e.args[0]!r}") from None
        return lim


@dataclass(frozen=True)
class DisclosureRules:
    """Thresholds of the enclave's statistical disclosure checks on tables
    (:mod:`dcr_enclave.runtime.disclosure`). The defaults here are the enclave's when a grant carries no
    ``disclosure`` claim; the hub writes the strictest of its policy's and the job's datasets' values."""

    #: A count ``0 < n < min_cell_count`` in a frequency table is a finding.
    min_cell_count: int = 10
    #: A row of a magnitude table with fewer contributors than this is a finding.
    dominance_min_contributors: int = 3
    #: Whether minimum and maximum statistics (single records' values) may leave without review.
    allow_extremes: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "min_cell_count": self.min_cell_count,
            "dominance_min_contributors": self.dominance_min_contributors,
            "allow_extremes": self.allow_extremes,
        }

    @classmethod
    def from_json(cls, d: Any, what: str = "grant disclosure") -> DisclosureRules:
        """Parse (and check) a ``disclosure`` object; absent keys take the defaults."""
        if not isinstance(d, dict):
            raise DCRError(f"{what} must be an object")
        unknown = set(d) - set(DISCLOSURE_KEYS)
        if unknown:
            raise DCRError(
                f"{what} has unknown key(s) {sorted(unknown)}", hint=f"known: {', '.join(DISCLOSURE_KEYS)}"
            )
        base = cls()
        allow = d.get("allow_extremes", base.allow_extremes)
        if not isinstance(allow, bool):
            raise DCRError(f"{what}.allow_extremes must be true or false")
        return cls(
            min_cell_count=_pos_int(d.get("min_cell_count", base.min_cell_count), f"{what}.min_cell_count"),
            dominance_min_contributors=_pos_int(
                d.get("dominance_min_contributors", base.dominance_min_contributors),
                f"{what}.dominance_min_contributors",
            ),
            allow_extremes=allow,
        )

    @classmethod
    def strictest(cls, rules: Any) -> DisclosureRules:
        """The strictest combination of ``rules`` (an iterable of :class:`DisclosureRules`): the highest
        thresholds, extremes allowed only if every one allows them. No rules: the defaults."""
        rules = list(rules)
        if not rules:
            return cls()
        return cls(
            min_cell_count=max(r.min_cell_count for r in rules),
            dominance_min_contributors=max(r.dominance_min_contributors for r in rules),
            allow_extremes=all(r.allow_extremes for r in rules),
        )


#: A Cloud KMS crypto key's resource name (Google's documented id characters, bounded lengths).
KMS_KEY_RE = re.compile(
    r"^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/locations/[a-z0-9-]{1,63}"
    r"/keyRings/[A-Za-z0-9_-]{1,63}/cryptoKeys/[A-Za-z0-9_-]{1,63}$"
)
#: A Workload Identity pool provider's resource name (project *number*, global location).
WIP_PROVIDER_RE = re.compile(
    r"^projects/[0-9]{1,20}/locations/global/workloadIdentityPools/[a-z0-9-]{4,32}"
    r"/providers/[a-z0-9-]{4,32}$"
)
CLOUD_KEYS = ("store", "kms_key", "wip_provider")


@dataclass(frozen=True)
class CloudDataset:
    """Where a granted dataset lives in Google Cloud and what releases its key, as the hub's policy pins it.

    The supervisor refuses a manifest whose key is not the Cloud KMS key ``kms_key``, and exchanges its
    attestation token at STS for the audience ``//iam.googleapis.com/<wip_provider>``: both come from the
    grant, never from storage.
    """

    store: str
    kms_key: str
    wip_provider: str

    def __post_init__(self) -> None:
        contract.parse_gs_uri(self.store, "granted dataset cloud.store")
        if not isinstance(self.kms_key, str) or not KMS_KEY_RE.match(self.kms_key):
            raise DCRError(
                f"granted dataset cloud.kms_key {self.kms_key!r} is not a Cloud KMS key name",
                hint="projects/P/locations/L/keyRings/R/cryptoKeys/K",
            )
        if not isinstance(self.wip_provider, str) or not WIP_PROVIDER_RE.match(self.wip_provider):
            raise DCRError(
                f"granted dataset cloud.wip_provider {self.wip_provider!r} is not a Workload Identity "
                "pool provider name",
                hint="projects/<NUMBER>/locations/global/workloadIdentityPools/<POOL>/providers/<PROVIDER>",
            )

    @property
    def sts_audience(self) -> str:
        return "//iam.googleapis.com/" + self.wip_provider

    def to_json(self) -> dict[str, str]:
        return {"store": self.store, "kms_key": self.kms_key, "wip_provider": self.wip_provider}

    @classmethod
    def from_json(cls, d: Any) -> CloudDataset:
        if not isinstance(d, dict):
            raise DCRError("granted dataset cloud entry must be an object")
        if set(d) != set(CLOUD_KEYS):
            raise DCRError(f"granted dataset cloud entry must have exactly the keys {', '.join(CLOUD_KEYS)}")
        return cls(store=d["store"], kms_key=d["kms_key"], wip_provider=d["wip_provider"])


@dataclass(frozen=True)
class GrantedDataset:
    provider: str
    dataset: str
    version: str
    release: str = "review"
    #: Google Cloud coordinates (the confidential_space platform); ``None`` locally, and then absent from JSON.
    cloud: CloudDataset | None = None

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.dataset}"

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "dataset": self.dataset,
            "version": self.version,
            "release": self.release,
            **({"cloud": self.cloud.to_json()} if self.cloud is not None else {}),
        }

    @classmethod
    def from_json(cls, d: Any) -> GrantedDataset:
        if not isinstance(d, dict):
            raise DCRError("each granted dataset must be an object")
        release = d.get("release", "review")
        if release not in RELEASE_MODES:
            raise DCRError(f"granted dataset release mode {release!r} is not one of {RELEASE_MODES}")
        return cls(
            provider=contract.check_name(d.get("provider"), "provider"),  # type: ignore[arg-type]
            dataset=contract.check_name(d.get("dataset"), "dataset"),  # type: ignore[arg-type]
            version=check_digest(d.get("version"), "granted dataset version"),
            release=release,
            cloud=CloudDataset.from_json(d["cloud"]) if "cloud" in d else None,
        )


@dataclass(frozen=True)
class Grant:
    """The verified content of a grant."""

    grant_id: str
    user: str
    job_id: str
    bundle_digest: str
    datasets: tuple[GrantedDataset, ...]
    output_public_key: str  # X25519, base64url without padding
    output_limits: OutputLimits = field(default_factory=OutputLimits)
    time_limit: int = 3600
    memory_bytes: int = 4 * 2**30
    #: X25519 key of the hub's airlock (base64url): where held outputs (under review, or with disclosure
    #: findings) and reviewers' details are sealed.
    airlock_public_key: str | None = None
    #: The disclosure checks' thresholds as the hub granted them; ``None``: the claim is absent.
    disclosure: DisclosureRules | None = None
    issued_at: int = 0
    expires_at: int = 0
    token: str = ""

    @property
    def disclosure_rules(self) -> DisclosureRules:
        """The thresholds the enclave applies: the grant's, else the defaults."""
        return self.disclosure or DisclosureRules()

    @property
    def release_mode(self) -> str:
        """``review`` if any dataset is under review, else ``auto``."""
        return "review" if any(d.release == "review" for d in self.datasets) else "auto"

    def claims(self) -> dict[str, Any]:
        return {
            "iss": contract.GRANT_ISSUER,
            "aud": contract.GRANT_AUDIENCE,
            "jti": self.grant_id,
            "sub": self.user,
            "job_id": self.job_id,
            "bundle_digest": self.bundle_digest,
            "datasets": [d.to_json() for d in self.datasets],
            "output_key": self.output_public_key,
            "output_limits": self.output_limits.to_json(),
            "time_limit": self.time_limit,
            "memory_bytes": self.memory_bytes,
            **({"airlock_key": self.airlock_public_key} if self.airlock_public_key else {}),
            **({"disclosure": self.disclosure.to_json()} if self.disclosure is not None else {}),
            "iat": self.issued_at,
            "nbf": self.issued_at,
            "exp": self.expires_at,
        }


def verify_grant(
    token: str,
    hub_jwks: list[dict[str, Any]],
    *,
    hub_key_thumbprint: str,
    job_id: str | None = None,
    bundle_digest: str | None = None,
    now: float | None = None,
) -> Grant:
    """Verify a grant against the hub key pinned by ``hub_key_thumbprint``; refuse with the failed check.

    Only the key in ``hub_jwks`` whose thumbprint is pinned is used; algorithm, type, issuer, audience,
    expiry, and (when given) the job id and bundle digest are all checked.
    """
    if not isinstance(token, str) or len(token) > MAX_GRANT_BYTES:
        raise DCRError("the grant is missing or larger than allowed")
    check_digest(hub_key_thumbprint, "hub key thumbprint")
    pinned = [k for k in hub_jwks if thumbprint(k) == hub_key_thumbprint]
    if not pinned:
        raise DCRError("grant refused: no hub key with the pinned thumbprint", hint="check the hub's JWKS")
    key = public_key_from_jwk(pinned[0])
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise DCRError(f"grant refused: malformed token ({e})") from None
    alg = key_alg(key)
    if header.get("alg") != alg:
        raise DCRError(f"grant refused: algorithm {header.get('alg')!r} is not the hub key's {alg}")
    if header.get("typ") != contract.GRANT_TYP:
        raise DCRError(f"grant refused: type {header.get('typ')!r} is not {contract.GRANT_TYP}")
    try:
        c = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=contract.GRANT_AUDIENCE,
            issuer=contract.GRANT_ISSUER,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "nbf", "jti", "sub", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise DCRError("grant refused: expired") from None
    except jwt.InvalidSignatureError:
        raise DCRError("grant refused: signature does not verify against the pinned hub key") from None
    except jwt.InvalidAudienceError:
        raise DCRError("grant refused: wrong audience") from None
    except jwt.InvalidIssuerError:
        raise DCRError("grant refused: wrong issuer") from None
    except jwt.PyJWTError as e:
        raise DCRError(f"grant refused: {e}") from None
    if now is not None and c["exp"] < now - LEEWAY_SECONDS:
        raise DCRError("grant refused: expired")
    try:
        g = _from_claims(c, token)
    except KeyError as e:
        raise DCRError(f"grant refused: claim {e.args[0]!r} is missing") from None
    except DCRError as e:
        raise DCRError(f"grant refused: {e.message}", hint=e.hint) from None
    if job_id is not None and g.job_id != job_id:
        raise DCRError(f"grant refused: it is for job {g.job_id}, not {job_id}")
    if bundle_digest is not None and g.bundle_digest != bundle_digest:
        raise DCRError("grant refused: it names another bundle digest than the one launched")
    return g


def _from_claims(c: dict[str, Any], token: str) -> Grant:
    g = Grant(
        grant_id=str(c["jti"]),
        user=str(c["sub"]),
        job_id=contract.check_job_id(c["job_id"]),
        bundle_digest=check_digest(c["bundle_digest"], "grant bundle digest"),
        datasets=_datasets(c["datasets"]),
        output_public_key=str(c["output_key"]),
        output_limits=OutputLimits.from_json(c["output_limits"]),
        time_limit=_pos_int(c["time_limit"], "time_limit"),
        memory_bytes=_pos_int(c["memory_bytes"], "memory_bytes"),
        airlock_public_key=str(c["airlock_key"]) if "airlock_key" in c else None,
        disclosure=DisclosureRules.from_json(c["disclosure"]) if "disclosure" in c else None,
        issued_at=int(c["iat"]),
        expires_at=int(c["exp"]),
        token=token,
    )
    if not contract.GRANT_ID_RE.match(g.grant_id):
        raise DCRError("malformed grant id")
    if len(_unb64(g.output_public_key)) != 32:
        raise DCRError("output key is not a 32-byte X25519 key")
    if g.airlock_public_key is not None and len(_unb64(g.airlock_public_key)) != 32:
        raise DCRError("airlock key is not a 32-byte X25519 key")
    return g


def _datasets(v: Any) -> tuple[GrantedDataset, ...]:
    if not isinstance(v, list):
        raise DCRError("the datasets claim must be a list")
    if not v:
        raise DCRError("the grant names no dataset")
    ds = tuple(GrantedDataset.from_json(d) for d in v)
    keys = [d.key for d in ds]
    # Two versions of one dataset would be decrypted into the same /data directory.
    for k in keys:
        if keys.count(k) > 1:
            raise DCRError(f"dataset {k} is named more than once")
    return ds


def output_public_key_bytes(g: Grant) -> bytes:
    return _unb64(g.output_public_key)


def sealing_key(g: Grant, held: bool = False) -> bytes:
    """Where this job's outputs are sealed: the airlock when they are held (under review, or because the
    disclosure checks found something), else the job's own key.

    Held outputs without an airlock key are refused: sealing them to the researcher's own key would release
    them without review.
    """
    if held and g.release_mode != "review":
        if not g.airlock_public_key:
            raise DCRError("these outputs are held but the grant names no airlock key")
        return _unb64(g.airlock_public_key)
    if g.release_mode == "review":
        if not g.airlock_public_key:
            raise DCRError(
                "this grant puts outputs under review but names no airlock key",
                hint="the hub's grant service adds it; development grants use release mode 'auto'",
            )
        return _unb64(g.airlock_public_key)
    return output_public_key_bytes(g)


def _unb64(s: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (ValueError, TypeError):
        raise DCRError("malformed base64url value in grant") from None


def _pos_int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise DCRError(f"grant {what} must be a positive integer")
    return v
