"""Compute Engine for the hub's cloud launcher: the instance a job runs on, and the calls that manage it.

:func:`make_instance` is pure: it builds the ``instances.insert`` body (Compute REST JSON) from the
platform's settings and one job, and refuses anything the design forbids (an image not pinned by digest, a
metadata key outside the launch contract). :class:`Compute` wraps the real ``google.cloud.compute_v1``
clients at a configurable endpoint (tests point it at a loopback fake).

Operations are waited on with ``ZoneOperationsClient.wait`` at the same endpoint: the extended-operation
helper (``operation.result()``) polls Google's default endpoint whatever the client was given, and an
operation that is ``DONE`` may still carry ``error.errors`` (the insert failed after it was accepted).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError

GOOGLE_COMPUTE: Final = "https://compute.googleapis.com"
GOOGLE_STORAGE: Final = "https://storage.googleapis.com"
CONFIDENTIAL_TYPES: Final = ("SEV", "SEV_SNP", "TDX")
IMAGE_FAMILY: Final = "confidential-space"
DEBUG_IMAGE_FAMILY: Final = "confidential-space-debug"
CLOUD_PLATFORM_SCOPE: Final = "https://www.googleapis.com/auth/cloud-platform"
#: Compute resource names (RFC 1035 labels, at most 63 characters).
NAME_RE: Final = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
#: A container image pinned by digest (Confidential Space attests the digest it pulled).
IMAGE_REF_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.:-]*(/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}$")
#: GCE label keys and values (lowercase letters, digits, ``_`` and ``-``; keys start with a letter).
LABEL_KEY_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE: Final = re.compile(r"^[a-z0-9_-]{0,63}$")
LABEL_HUB: Final = "dcr-hub"
LABEL_USER: Final = "dcr-user"
LABEL_JOB: Final = "dcr-job"
#: requestId namespace: the same grant always gives the same insert (and delete) request id.
_REQUEST_NS: Final = uuid.UUID("5b1c3a52-8f0e-4c36-9d0b-6f7d3c1e2a90")


def instance_name(job_id: str) -> str:
    """The job's instance name: ``dcr-`` + the job id (``job-<24 hex>``), valid whatever the user's name."""
    name = "dcr-" + contract.check_job_id(job_id)
    assert NAME_RE.match(name)
    return name


def user_label(user: str) -> str:
    """A GCE label value for a hub user name of any characters: a readable prefix and a hash (so two names
    that sanitise alike still differ)."""
    readable = re.sub(r"[^a-z0-9_-]+", "-", user.lower()).strip("-")[:40]
    digest = hashlib.sha256(user.encode()).hexdigest()[:12]
    return f"{readable}-{digest}" if readable else f"u-{digest}"


def hub_label(hub_key_thumbprint: str) -> str:
    """This hub's label value, from its key's thumbprint (``sha256:<hex>``)."""
    return "h" + hub_key_thumbprint.split(":", 1)[-1][:20].lower()


def request_id(grant_id: str, action: str) -> str:
    """Compute ``requestId`` for ``action`` on the grant's instance: a UUID derived from the grant id, so
    the same grant sent twice, or a hub restarting between the insert and its record, inserts once."""
    return str(uuid.uuid5(_REQUEST_NS, f"{action}:{grant_id}"))


def check_image_reference(value: str) -> str:
    if not IMAGE_REF_RE.match(value):
        raise DCRError(
            f"{value!r} is not a container image pinned by digest",
            hint="give registry/path@sha256:<64 hex> (a tag can be moved to other code)",
        )
    return value


@dataclass(frozen=True)
class InstanceSettings:
    """The platform's settings that shape every instance (the hub admin's, never the researcher's)."""

    project: str
    zone: str
    machine_type: str
    confidential_instance_type: str
    image_reference: str
    service_account: str
    debug_image: bool = False
    image_project: str = "confidential-space-images"
    network: str = ""
    subnetwork: str = ""
    external_ip: bool = False


def make_instance(
    s: InstanceSettings,
    *,
    name: str,
    labels: Mapping[str, str],
    env: Mapping[str, str],
    max_run_seconds: int,
) -> dict[str, Any]:
    """The ``instances.insert`` body (Compute REST JSON) of one job's Confidential VM."""
    if not NAME_RE.match(name):
        raise DCRError(f"{name!r} is not a valid Compute instance name")
    if s.confidential_instance_type not in CONFIDENTIAL_TYPES:
        raise DCRError(
            f"confidential instance type {s.confidential_instance_type!r} is not one of {CONFIDENTIAL_TYPES}"
        )
    check_image_reference(s.image_reference)
    if set(env) != set(contract.LAUNCH_ENV_NAMES):
        # Exactly the contract's names: the image's launch policy allows no other, and a missing one
        # would make the supervisor refuse the job after the VM had booted.
        raise DCRError(
            f"launch environment names {sorted(env)} are not the contract's {contract.LAUNCH_ENV_NAMES}"
        )
    for k, v in labels.items():
        if not LABEL_KEY_RE.match(k) or not LABEL_VALUE_RE.match(v):
            raise DCRError(f"label {k}={v!r} is not a valid GCE label")
    if max_run_seconds < 30:
        raise DCRError("maxRunDuration must be at least 30 seconds")
    family = DEBUG_IMAGE_FAMILY if s.debug_image else IMAGE_FAMILY
    interface: dict[str, Any] = {}
    if s.network:
        interface["network"] = s.network
    if s.subnetwork:
        interface["subnetwork"] = s.subnetwork
    if s.external_ip:
        interface["accessConfigs"] = [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
    metadata = [
        {"key": "tee-image-reference", "value": s.image_reference},
        {"key": "tee-restart-policy", "value": "Never"},
        # The supervisor's private tmpfs and the kernel sandbox's namespaces need CAP_SYS_ADMIN; the
        # image's launch policy allows exactly this (contract.LAUNCH_POLICY_LABELS).
        {"key": "tee-added-capabilities", "value": json.dumps(list(contract.CLOUD_ADDED_CAPABILITIES))},
        *({"key": f"tee-env-{n}", "value": env[n]} for n in contract.LAUNCH_ENV_NAMES),
    ]
    return {
        "name": name,
        "machineType": f"zones/{s.zone}/machineTypes/{s.machine_type}",
        "confidentialInstanceConfig": {"confidentialInstanceType": s.confidential_instance_type},
        "shieldedInstanceConfig": {
            "enableSecureBoot": True,
            "enableVtpm": True,
            "enableIntegrityMonitoring": True,
        },
        "scheduling": {
            # Confidential VMs cannot live-migrate; a VM that dies is deleted, never restarted.
            "onHostMaintenance": "TERMINATE",
            "automaticRestart": False,
            "provisioningModel": "STANDARD",
            # The VM dies at the job's deadline even when no hub is watching.
            "maxRunDuration": {"seconds": str(int(max_run_seconds))},
            "instanceTerminationAction": "DELETE",
        },
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "initializeParams": {
                    "sourceImage": f"projects/{s.image_project}/global/images/family/{family}",
                },
            }
        ],
        "networkInterfaces": [interface],
        "serviceAccounts": [{"email": s.service_account, "scopes": [CLOUD_PLATFORM_SCOPE]}],
        "labels": dict(labels),
        "metadata": {"items": metadata},
    }


def is_loopback(endpoint: str) -> bool:
    host = urllib.parse.urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credentials_for(endpoint: str) -> Any:
    """The hub's own Google credentials (Application Default Credentials: its service account), or none
    for a loopback endpoint (the tests' fakes and emulator, which accept no real credential)."""
    if is_loopback(endpoint):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    return None  # the clients find the hub's Application Default Credentials


class InsertRefused(DCRError):
    """Compute refused the insert, or its operation finished with errors: the job cannot start."""


class Compute:
    """The few Compute Engine calls the launcher makes, through the real client library."""

    def __init__(
        self, project: str, zone: str, endpoint: str = GOOGLE_COMPUTE, *, timeout: float = 60.0
    ) -> None:
        from google.cloud import compute_v1

        self.project, self.zone, self.endpoint, self.timeout = project, zone, endpoint, timeout
        opts = {"api_endpoint": endpoint}
        creds = credentials_for(endpoint)
        self._v1 = compute_v1
        self.instances = compute_v1.InstancesClient(transport="rest", client_options=opts, credentials=creds)
        self.operations = compute_v1.ZoneOperationsClient(
            transport="rest", client_options=opts, credentials=creds
        )

    def insert(self, body: Mapping[str, Any], request_id: str, *, wait: float = 300.0) -> None:
        """Insert the instance and wait for the operation; :class:`InsertRefused` with Compute's reason."""
        from google.api_core import exceptions as gexc

        resource = self._v1.Instance.from_json(json.dumps(body), ignore_unknown_fields=False)
        try:
            op = self.instances.insert(
                request=self._v1.InsertInstanceRequest(
                    project=self.project, zone=self.zone, instance_resource=resource, request_id=request_id
                ),
                timeout=self.timeout,
            )
        except gexc.GoogleAPICallError as e:
            if e.code is not None and int(e.code) >= 500:
                # Compute's own failure: the insert may or may not have happened; the caller retries it
                # with the same request id (and the reconciler ends a launch whose VM never appears).
                raise DCRError(f"Compute failed (HTTP {e.code}): {_reason(e)}") from None
            raise InsertRefused(f"Compute refused the instance (HTTP {e.code}): {_reason(e)}") from None
        self._wait(op.name, wait)

    def _wait(self, operation: str, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            op = self.operations.wait(
                project=self.project, zone=self.zone, operation=operation, timeout=self.timeout
            )
            # compute_v1 keeps enum fields as their names (strings).
            if str(op.status) in ("DONE", str(int(self._v1.Operation.Status.DONE))):
                errors = list(op.error.errors) if op.error else []
                if errors:
                    text = "; ".join(f"{e.code}: {e.message}" for e in errors[:3])
                    raise InsertRefused(f"the instance operation failed: {text}")
                return
            if time.monotonic() > deadline:
                raise DCRError(f"the instance operation {operation} did not finish in {deadline_s:.0f} s")

    def get(self, name: str) -> dict[str, Any] | None:
        """The instance as Compute JSON, or ``None`` when there is none."""
        from google.api_core import exceptions as gexc

        try:
            inst = self.instances.get(
                project=self.project, zone=self.zone, instance=name, timeout=self.timeout
            )
        except gexc.NotFound:
            return None
        return dict(json.loads(type(inst).to_json(inst)))

    def delete(self, name: str, request_id: str | None = None, *, wait: float = 0.0) -> bool:
        """Delete the instance (already gone is fine); ``True`` if a delete was sent."""
        from google.api_core import exceptions as gexc

        try:
            req = self._v1.DeleteInstanceRequest(project=self.project, zone=self.zone, instance=name)
            if request_id is not None:
                req.request_id = request_id
            op = self.instances.delete(request=req, timeout=self.timeout)
        except gexc.NotFound:
            return False
        if wait > 0:
            try:
                self._wait(op.name, wait)
            except InsertRefused as e:
                raise DCRError(f"deleting {name} failed: {e.message}") from None
        return True

    def list_labelled(self, hub: str) -> list[dict[str, Any]]:
        """Every instance in the zone labelled as this hub's (``name``, ``status``, ``labels``)."""
        out = []
        request = self._v1.ListInstancesRequest(
            project=self.project, zone=self.zone, filter=f"labels.{LABEL_HUB} = {hub}"
        )
        for inst in self.instances.list(request=request, timeout=self.timeout):
            labels = dict(inst.labels)
            if labels.get(LABEL_HUB) == hub:  # the filter narrows; this decides
                out.append({"name": inst.name, "status": inst.status, "labels": labels})
        return out


def _reason(e: Any) -> str:
    """Compute's error reason and message, short (quota names included: they say what to raise)."""
    parts = []
    for err in getattr(e, "errors", None) or []:
        if isinstance(err, dict):
            parts.append(
                str(err.get("reason") or "")
                + (": " if err.get("reason") else "")
                + str(err.get("message") or "")
            )
    return ("; ".join(parts) or getattr(e, "message", "") or str(e))[:500]
