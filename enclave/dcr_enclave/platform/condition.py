"""A provider's key-release condition: when a dataset's data key may leave the provider's key release.

The condition is stored as structured fields and compiled per backend elsewhere (a Workload Identity Pool
attribute condition in the cloud, the enclave host's broker locally); this module is only the model. It
pins:

- the platform: ``hwmodel``, ``swname``, ``dbgstat``, ``secboot`` and support attributes of the attestation
  token and, in the cloud, the project and service account the enclave VM runs as;
- the released enclave measurements (image digests);
- the thumbprints of the hub keys whose grants count (the hub key thumbprint is in the launch
  environment and hence in the token);
- the dataset versions the key may be released for;
- optionally the approved bundle digests (provider code approval); ``None`` means any bundle the hub grants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from dcr_enclave.formats.contract import HARDWARE_SWNAME, LOCAL_HWMODEL, LOCAL_SWNAME, check_name
from dcr_enclave.formats.dataset import parse_json_document, validate_schema
from dcr_enclave.formats.digests import check_digest, sha256_json
from dcr_enclave.formats.errors import DCRError

SCHEMA_ID: Final = "dcr/key-release-condition/v1"
SCHEMA_FILE: Final = "key-release-condition.schema.json"
PLATFORM_KINDS: Final = ("local", "confidential_space")

#: Confidential Space attestation claim values a production condition accepts.
CS_HWMODELS: Final = ("GCP_AMD_SEV", "GCP_INTEL_TDX")
CS_DBGSTAT: Final = "disabled-since-boot"
CS_SUPPORT: Final = "STABLE"
#: The local simulation always reports debug enabled: it has no memory encryption to speak of.
LOCAL_DBGSTAT: Final = "enabled"


def _strings(values: Iterable[str], what: str) -> tuple[str, ...]:
    out = tuple(values)
    if any(not isinstance(v, str) or not v for v in out) or len(set(out)) != len(out):
        raise DCRError(f"{what} must be distinct non-empty strings")
    return out


def _digests(values: Iterable[str], what: str) -> tuple[str, ...]:
    out = tuple(check_digest(v, what) for v in values)
    if not out:
        raise DCRError(f"a key-release condition needs at least one of {what}")
    if len(set(out)) != len(out):
        raise DCRError(f"{what} lists a digest twice")
    return out


@dataclass(frozen=True)
class PlatformCondition:
    """The attestation-token claims (and cloud identity) a key release requires."""

    kind: str
    hwmodel: tuple[str, ...]
    swname: tuple[str, ...]
    dbgstat: tuple[str, ...]
    secboot: bool | None = None
    support_attributes: tuple[str, ...] = ()
    project_id: str | None = None
    service_accounts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in PLATFORM_KINDS:
            raise DCRError(f"unknown platform {self.kind!r}", hint="use local or confidential_space")
        for what in ("hwmodel", "swname", "dbgstat", "support_attributes", "service_accounts"):
            object.__setattr__(self, what, _strings(getattr(self, what), what))
        for what in ("hwmodel", "swname", "dbgstat"):
            if not getattr(self, what):
                raise DCRError(f"a platform condition must pin at least one {what}")
        if self.kind == "local":
            if self.project_id is not None or self.service_accounts:
                raise DCRError("a local platform condition has no cloud project or service account")
        else:
            # A condition for real hardware that also accepted the simulation, or a debug image whose
            # memory the operator can read, would release real keys to something that protects nothing.
            if LOCAL_HWMODEL in self.hwmodel or LOCAL_SWNAME in self.swname:
                raise DCRError("a confidential_space condition cannot accept the local simulation")
            if LOCAL_DBGSTAT in self.dbgstat:
                raise DCRError(
                    "a confidential_space condition cannot accept debug images",
                    hint=f"pin dbgstat {CS_DBGSTAT!r}",
                )

    @classmethod
    def defaults(
        cls, kind: str, *, project_id: str | None = None, service_accounts: Iterable[str] = ()
    ) -> PlatformCondition:
        """The recommended pins for ``kind`` (``local`` or ``confidential_space``)."""
        if kind == "local":
            return cls("local", (LOCAL_HWMODEL,), (LOCAL_SWNAME,), (LOCAL_DBGSTAT,))
        if kind == "confidential_space":
            return cls(
                "confidential_space",
                CS_HWMODELS,
                (HARDWARE_SWNAME,),
                (CS_DBGSTAT,),
                secboot=True,
                support_attributes=(CS_SUPPORT,),
                project_id=project_id,
                service_accounts=tuple(service_accounts),
            )
        raise DCRError(f"unknown platform {kind!r}", hint="use local or confidential_space")

    def missing(self) -> list[str]:
        """What a cloud condition still lacks before it can be deployed (empty when complete)."""
        if self.kind == "local":
            return []
        return [
            what
            for what, present in (
                ("project_id", self.project_id),
                ("service_accounts", self.service_accounts),
            )
            if not present
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "hwmodel": list(self.hwmodel),
            "swname": list(self.swname),
            "dbgstat": list(self.dbgstat),
            "secboot": self.secboot,
            "support_attributes": list(self.support_attributes),
            "project_id": self.project_id,
            "service_accounts": list(self.service_accounts),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PlatformCondition:
        return cls(
            kind=doc["kind"],
            hwmodel=tuple(doc["hwmodel"]),
            swname=tuple(doc["swname"]),
            dbgstat=tuple(doc["dbgstat"]),
            secboot=doc["secboot"],
            support_attributes=tuple(doc["support_attributes"]),
            project_id=doc["project_id"],
            service_accounts=tuple(doc["service_accounts"]),
        )


@dataclass(frozen=True)
class KeyReleaseCondition:
    """When the data key of ``provider/dataset`` may be released, for the listed versions."""

    provider: str
    dataset: str
    versions: tuple[str, ...]
    platform: PlatformCondition
    enclave_digests: tuple[str, ...]
    hub_key_thumbprints: tuple[str, ...]
    bundle_digests: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_name(self.provider, "provider")
        check_name(self.dataset, "dataset")
        object.__setattr__(self, "versions", _digests(self.versions, "dataset versions"))
        object.__setattr__(self, "enclave_digests", _digests(self.enclave_digests, "enclave digests"))
        object.__setattr__(
            self, "hub_key_thumbprints", _digests(self.hub_key_thumbprints, "hub key thumbprints")
        )
        if self.bundle_digests is not None:
            object.__setattr__(self, "bundle_digests", _digests(self.bundle_digests, "bundle digests"))

    @property
    def ref(self) -> str:
        return f"{self.provider}/{self.dataset}"

    @property
    def digest(self) -> str:
        """sha256 of the condition's canonical JSON (what receipts and audit records cite)."""
        return sha256_json(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID,
            "provider": self.provider,
            "dataset": self.dataset,
            "versions": list(self.versions),
            "platform": self.platform.to_json(),
            "enclave_digests": list(self.enclave_digests),
            "hub_key_thumbprints": list(self.hub_key_thumbprints),
            "bundle_digests": None if self.bundle_digests is None else list(self.bundle_digests),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | str | bytes) -> KeyReleaseCondition:
        data = parse_json_document(doc, "key-release condition")
        validate_schema(
            data, SCHEMA_FILE, "key-release condition", package=__package__ or "dcr_enclave.platform"
        )
        bundles = data["bundle_digests"]
        return cls(
            provider=data["provider"],
            dataset=data["dataset"],
            versions=tuple(data["versions"]),
            platform=PlatformCondition.from_json(data["platform"]),
            enclave_digests=tuple(data["enclave_digests"]),
            hub_key_thumbprints=tuple(data["hub_key_thumbprints"]),
            bundle_digests=None if bundles is None else tuple(bundles),
        )
