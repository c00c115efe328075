"""``DCRKubeSpawner``: KubeSpawner with DCR's policy, for JupyterHub on Kubernetes (GKE).

Every user pod gets, on top of what KubeSpawner builds:

- the user's entitled synthetic files, read-only, at ``/data/<provider>/<dataset>/<file>``: one volume per
  dataset version from a ``ReadOnlyMany`` PersistentVolumeClaim (on GKE a Persistent Disk cloned from a
  snapshot of that version's synthetic files), each file mounted with its own read-only ``subPath``, so the
  pod sees exactly the files of the version's manifest and nothing else that may be on the disk;
- no volume of real data, ever: the spawner adds none, and refuses a pod with a ``hostPath`` volume, with
  any other volume it did not add itself and the admin did not list in ``allowed_volumes``, or with
  anything else mounted at or below ``/data``;
- the labels the chart's network policy selects on (egress only to the hub, DNS and Google APIs);
- the Kubernetes service account the ``confidential_space`` backend acts as (through GKE Workload
  Identity; the Kubernetes API token is not mounted);
- a non-root, no-privilege-escalation, all-capabilities-dropped, RuntimeDefault-seccomp security context
  on the pod and on every container, init containers included, and CPU/memory limits, which the traits
  below refuse to weaken.

Enable it with ``c.JupyterHub.spawner_class = "dcr-kube"``: loading it arms the policy check at hub start
(and serves the grant service) even without ``dcr_spawner.enable(c)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Final

from kubernetes_asyncio.client.models import (
    V1PersistentVolumeClaimVolumeSource,
    V1Pod,
    V1Volume,
    V1VolumeMount,
)
from kubespawner import KubeSpawner
from traitlets import Dict, List, TraitError, Unicode, default, validate

from dcr_enclave.formats.contract import DATA_ROOT
from dcr_enclave.formats.errors import DCRError

from .hub_start import PolicySpawnerMixin, arm_start_hook
from .policy import DCRPolicy, Entitlement

#: The label the DCR chart's NetworkPolicy selects user sandboxes by.
SANDBOX_LABEL: Final = "dcr.jupyter.org/sandbox"
#: Annotation listing the datasets (with versions) mounted in the pod: for audit and debugging.
DATASETS_ANNOTATION: Final = "dcr.jupyter.org/datasets"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
#: The prefix of DCR's own synthetic-data volumes (see :func:`volume_name`).
VOLUME_PREFIX: Final = "dcr-syn-"
#: The secret volume KubeSpawner itself adds for JupyterHub's internal SSL.
INTERNAL_SSL_VOLUME: Final = "jupyterhub-internal-certs"


def claim_name_from(template: str, provider: str, dataset: str, version_hex: str) -> str:
    """A synthetic claim name from the template's fields (``_`` is not allowed in Kubernetes names)."""
    return template.format(
        provider=provider.replace("_", "-"),
        dataset=dataset.replace("_", "-"),
        version=version_hex,
        version_short=version_hex[:12],
    )


def check_claim_template(v: Any) -> str:
    try:
        sample = claim_name_from(str(v), "acme", "claims", "0" * 64)
    except (KeyError, IndexError, ValueError) as e:
        raise TraitError(f"DCRKubeSpawner.synthetic_claim_template {v!r}: unknown field {e}") from None
    if not _DNS_SUBDOMAIN.match(sample):
        raise TraitError(
            f"DCRKubeSpawner.synthetic_claim_template {v!r} does not give a valid claim name ({sample!r})"
        )
    return str(v)


def check_sub_path(v: Any) -> str:
    if not isinstance(v, str) or "{file}" not in v or v.startswith("/") or ".." in v.split("/"):
        raise TraitError(
            f"DCRKubeSpawner.synthetic_sub_path {v!r} must be a relative path containing {{file}}"
        )
    return v


def check_sandbox_labels(v: Any) -> dict[str, str]:
    labels = dict(v)
    if labels.get(SANDBOX_LABEL) != "true":
        raise TraitError(
            f'DCRKubeSpawner.sandbox_labels must keep {SANDBOX_LABEL}: "true" (the network policy selects on it)'
        )
    for key, value in labels.items():
        if not (isinstance(key, str) and _LABEL_KEY.match(key)) or not (
            isinstance(value, str) and _LABEL_VALUE.match(value)
        ):
            raise TraitError(f"DCRKubeSpawner.sandbox_labels: {key!r}: {value!r} is not a valid label")
    return labels


def check_uid(v: Any) -> Any:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v <= 0):
        raise TraitError(f"DCRKubeSpawner.uid must be a non-root user id (e.g. 1000), not {v!r}")
    return v


def check_privileged(v: Any) -> bool:
    if v:
        raise TraitError("DCRKubeSpawner.privileged cannot be enabled: a privileged pod can reach the node")
    return False


def check_escalation(v: Any) -> bool:
    if v is not False:
        raise TraitError("DCRKubeSpawner.allow_privilege_escalation must stay False (no setuid, no sudo)")
    return False


def check_limit(name: str, v: Any) -> Any:
    if v is None or (isinstance(v, int | float) and v <= 0):
        raise TraitError(f"DCRKubeSpawner.{name} must be set: a sandbox without limits can starve the node")
    return v


def check_allowed_volumes(v: Any) -> list[str]:
    if isinstance(v, str) or not isinstance(v, list | tuple):
        raise TraitError(f"DCRKubeSpawner.allowed_volumes must be a list of volume names, not {v!r}")
    for name in v:
        if not isinstance(name, str) or not name.strip():
            raise TraitError(f"DCRKubeSpawner.allowed_volumes: {name!r} is not a volume name")
        if name.startswith(VOLUME_PREFIX):
            raise TraitError(
                f"DCRKubeSpawner.allowed_volumes: {name!r} starts with {VOLUME_PREFIX!r}, which is reserved "
                "for DCR's synthetic data"
            )
    return list(v)


def check_volume(volume: Any, allowed: Iterable[str], where: str) -> None:
    """Refuse a ``hostPath`` volume, and any volume whose name is not in ``allowed``."""
    name = _get(volume, "name", "name")
    if _get(volume, "host_path", "hostPath") is not None:
        raise DCRError(
            f"volume {name!r} ({where}) is a hostPath volume: it exposes the node's files (the store and "
            "real data may be there) to the user's code; DCR refuses hostPath volumes",
            hint="use a PersistentVolumeClaim for what users need, and list it in c.DCRKubeSpawner.allowed_volumes",
        )
    if name not in allowed:
        raise DCRError(
            f"volume {name!r} ({where}) is neither one DCR adds nor listed in c.DCRKubeSpawner.allowed_volumes; "
            "only volumes the admin vouches for may reach a sandbox",
            hint=f"if it holds nothing users must not read, add {name!r} to c.DCRKubeSpawner.allowed_volumes",
        )


#: Trait -> check, for the validators and for the check at hub start (which has config, not a spawner).
_CHECKS: Final = {
    "synthetic_claim_template": check_claim_template,
    "synthetic_sub_path": check_sub_path,
    "sandbox_labels": check_sandbox_labels,
    "uid": check_uid,
    "privileged": check_privileged,
    "allow_privilege_escalation": check_escalation,
    "cpu_limit": lambda v: check_limit("cpu_limit", v),
    "mem_limit": lambda v: check_limit("mem_limit", v),
    "allowed_volumes": check_allowed_volumes,
}


def _within(path: str, root: str) -> bool:
    path = path.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


def volume_name(entitlement: Entitlement) -> str:
    """The pod volume of one dataset version (a DNS label: the version digest keeps it unique)."""
    return VOLUME_PREFIX + entitlement.version.removeprefix("sha256:")[:20]


class DCRKubeSpawner(PolicySpawnerMixin, KubeSpawner):
    """KubeSpawner whose pods hold only the user's entitled synthetic data, read-only, and run unprivileged."""

    synthetic_claim_template = Unicode(
        "dcr-synthetic-{provider}-{dataset}-{version_short}",
        help="""Name of the PersistentVolumeClaim holding one dataset version's synthetic files, in the
        user pods' namespace. Fields: ``{provider}``, ``{dataset}`` ('_' becomes '-'), ``{version}`` (64
        hex digits), ``{version_short}`` (its first 12).

        The claim must be ``ReadOnlyMany`` and bound to a volume whose root (or ``synthetic_sub_path``)
        holds exactly the version's synthetic files, e.g. a GKE Persistent Disk created from a snapshot
        of the store's ``<version>/synthetic/`` directory (``docs/spawners.md`` shows the commands).
        Versions are immutable, so the disk never changes once created.

        Example::

            c.DCRKubeSpawner.synthetic_claim_template = "syn-{provider}-{dataset}-{version_short}"

        Security: only synthetic data may ever be on these volumes. Real data stays encrypted in Cloud
        Storage and is only decrypted inside the enclave.
        """,
    ).tag(config=True)

    synthetic_sub_path = Unicode(
        "{file}",
        help="""Path of each synthetic file inside its volume; ``{file}`` is the file's name in the
        dataset (the name the notebook uses under ``/data``).

        Example (the disk holds the whole version directory)::

            c.DCRKubeSpawner.synthetic_sub_path = "synthetic/{file}"

        Security: each file is its own read-only ``subPath`` mount, so anything else on the disk stays
        invisible to the pod.
        """,
    ).tag(config=True)

    sandbox_labels = Dict(
        {SANDBOX_LABEL: "true", "hub.jupyter.org/network-access-hub": "true"},
        help=f"""Labels on every user pod, for the network policy of the DCR chart (which allows egress
        only to the hub, DNS and Google APIs for pods labelled ``{SANDBOX_LABEL}: "true"``) and of the
        JupyterHub chart (``hub.jupyter.org/network-access-hub``). Merged over ``extra_labels``.

        Example::

            c.DCRKubeSpawner.sandbox_labels = {{"{SANDBOX_LABEL}": "true", "team": "research"}}

        Security: the ``{SANDBOX_LABEL}`` label must stay; without it the pod escapes the egress policy
        (refused).
        """,
    ).tag(config=True)

    allowed_volumes = List(
        Unicode(),
        help="""Names of the volumes of ``c.KubeSpawner.volumes`` (or ``extra_pod_config``) that user pods
        may have besides DCR's synthetic-data claims, e.g. the claim of the user's home directory. Names
        are written as configured: templates such as ``{username}`` are expanded the way KubeSpawner
        expands the volume's own name.

        Every other volume is refused, at hub start (for ``c.KubeSpawner.volumes``) and when the pod is
        built; ``hostPath`` volumes are refused even when listed. The only volume KubeSpawner adds on its
        own, the internal-SSL certificates secret (``c.JupyterHub.internal_ssl``), is allowed.

        Example::

            c.KubeSpawner.volumes = [
                {"name": "home", "persistentVolumeClaim": {"claimName": "claim-{username}"}},
            ]
            c.KubeSpawner.volume_mounts = [{"name": "home", "mountPath": "/home/jovyan"}]
            c.DCRKubeSpawner.allowed_volumes = ["home"]

        Security: whatever a listed volume holds, the user's code can read (and write, unless it is mounted
        read-only). Never list a volume that holds real data, a dataset store, keys, the hub's files or
        other users' files; nothing may be mounted at or below ``/data`` in any case (refused).
        """,
    ).tag(config=True)

    @default("service_account")
    def _default_service_account(self) -> str:
        # The backend's identity: bound to a Google service account by GKE Workload Identity.
        return "dcr-sandbox"

    @default("automount_service_account_token")
    def _default_automount(self) -> bool:
        # Workload Identity needs no Kubernetes token; the Kubernetes API stays out of users' reach.
        return False

    @default("uid")
    def _default_uid(self) -> int:
        return 1000

    @default("gid")
    def _default_gid(self) -> int:
        return 100

    @default("fs_gid")
    def _default_fs_gid(self) -> int:
        return 100

    @default("cpu_limit")
    def _default_cpu_limit(self) -> float:
        return 2.0

    @default("cpu_guarantee")
    def _default_cpu_guarantee(self) -> float:
        return 0.5

    @default("mem_limit")
    def _default_mem_limit(self) -> int:
        return 4 * 2**30

    @default("mem_guarantee")
    def _default_mem_guarantee(self) -> int:
        return 1 * 2**30

    @validate(*_CHECKS)
    def _check_trait(self, proposal: Any) -> Any:
        return _CHECKS[proposal["trait"].name](proposal["value"])

    # ----------------------------------------------------------------------------------------------------

    def claim_name(self, entitlement: Entitlement) -> str:
        return claim_name_from(
            self.synthetic_claim_template,
            entitlement.provider,
            entitlement.dataset,
            entitlement.version.removeprefix("sha256:"),
        )

    @classmethod
    def dcr_check_at_start(cls, app: Any, policy: DCRPolicy) -> None:
        """Called by the start hook while the hub starts: the configured values of the traits DCR guards,
        and the configured volumes, are checked now, not at the first spawn (a KubeSpawner cannot be built
        without a user)."""
        for trait, check in _CHECKS.items():
            for section in (cls.__name__, "KubeSpawner", "Spawner"):
                if section in app.config and trait in app.config[section]:
                    check(app.config[section][trait])
                    break
        allowed = app.config[cls.__name__].get("allowed_volumes", [])
        for section in (cls.__name__, "KubeSpawner"):
            if section in app.config and "volumes" in app.config[section]:
                volumes = app.config[section]["volumes"]
                for v in volumes.values() if isinstance(volumes, dict) else volumes:
                    check_volume(v, allowed, f"c.{section}.volumes")
                break
        template = app.config[cls.__name__].get(
            "synthetic_claim_template", cls.synthetic_claim_template.default_value
        )
        for spec in policy.specs():
            claim = claim_name_from(
                template, spec.provider, spec.dataset, spec.version.removeprefix("sha256:")
            )
            if not _DNS_SUBDOMAIN.match(claim):
                raise DCRError(f"the claim name {claim!r} for {spec.ref} is not a valid Kubernetes name")

    def data_mounts(self, entitlements: Iterable[Entitlement]) -> tuple[list[V1Volume], list[V1VolumeMount]]:
        """One read-only claim volume per dataset version and one read-only mount per synthetic file."""
        volumes, mounts = [], []
        for e in entitlements:
            claim = self.claim_name(e)
            if not _DNS_SUBDOMAIN.match(claim):
                raise DCRError(f"the claim name {claim!r} for {e.ref} is not a valid Kubernetes name")
            name = volume_name(e)
            volumes.append(
                V1Volume(
                    name=name,
                    persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(
                        claim_name=claim, read_only=True
                    ),
                )
            )
            for file_name in sorted(e.synthetic):
                mounts.append(
                    V1VolumeMount(
                        name=name,
                        mount_path=f"{DATA_ROOT}/{e.provider}/{e.dataset}/{file_name}",
                        sub_path=self.synthetic_sub_path.format(file=file_name),
                        read_only=True,
                    )
                )
        return volumes, mounts

    def get_env(self) -> dict[str, Any]:
        env = super().get_env()
        env["DCR_SANDBOX"] = "kube"
        env["DCR_ISOLATION"] = "pod"
        return env

    async def get_pod_manifest(self) -> V1Pod:
        """KubeSpawner's pod, with the user's synthetic data, DCR's labels and the enforced security context."""
        # Validators do not run for None (allow_none traits), so check the final values once more here.
        for trait, check in _CHECKS.items():
            check(getattr(self, trait))
        entitlements = self.entitlements()
        pod: V1Pod = await super().get_pod_manifest()
        volumes, mounts = self.data_mounts(entitlements)
        ours = {v.name for v in volumes}
        for container in [*(pod.spec.containers or []), *(pod.spec.init_containers or [])]:
            for m in container.volume_mounts or []:
                if _within(_get(m, "mount_path", "mountPath"), DATA_ROOT):
                    raise DCRError(
                        f"container {container.name!r} mounts {_get(m, 'mount_path', 'mountPath')} under "
                        f"{DATA_ROOT}; only DCR's synthetic volumes may appear there",
                        hint="remove it from c.KubeSpawner.volume_mounts / extra_containers / init_containers",
                    )
        allowed = {self._expand_user_properties(n) for n in self.allowed_volumes}
        if self.internal_ssl:
            allowed.add(INTERNAL_SSL_VOLUME)
        for v in pod.spec.volumes or []:
            if _get(v, "name", "name") in ours:
                raise DCRError(
                    f"volume name {_get(v, 'name', 'name')!r} is reserved for DCR's synthetic data"
                )
            check_volume(v, allowed, f"in the pod of {self.user.name}")
        pod.spec.volumes = [*(pod.spec.volumes or []), *volumes]
        notebook = pod.spec.containers[0]
        notebook.volume_mounts = [*(notebook.volume_mounts or []), *mounts]

        pod.metadata.labels = {**(pod.metadata.labels or {}), **self.sandbox_labels}
        pod.metadata.annotations = {
            **(pod.metadata.annotations or {}),
            DATASETS_ANNOTATION: json.dumps(sorted(f"{e.ref}@{e.version}" for e in entitlements)),
        }
        # KubeSpawner passes security contexts through as camelCase dicts; extra containers may bring
        # models. Either way the result is a dict, as KubeSpawner sends it.
        psc = self._as_dict(pod.spec.security_context)
        psc.update({"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}})
        pod.spec.security_context = psc  # type: ignore[assignment]  # a dict, as make_pod stores it
        # Init containers run in the same pod with the same volumes and network: the same rules apply.
        for container in [*pod.spec.containers, *(pod.spec.init_containers or [])]:
            csc = self._as_dict(container.security_context)
            if csc.get("runAsUser") == 0 or csc.get("privileged"):
                raise DCRError(f"container {container.name!r} is configured to run as root or privileged")
            csc.update(
                {
                    "runAsNonRoot": True,
                    "allowPrivilegeEscalation": False,
                    "privileged": False,
                    "capabilities": {"drop": ["ALL"]},
                }
            )
            container.security_context = csc  # type: ignore[assignment]
        return pod

    def _as_dict(self, obj: Any) -> dict[str, Any]:
        if obj is None:
            return {}
        if isinstance(obj, dict):
            return dict(obj)
        return dict(self.api.api_client.sanitize_for_serialization(obj))


def _get(obj: Any, attr: str, key: str) -> Any:
    """A field of a Kubernetes model object or of the plain dict KubeSpawner passes through."""
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, attr)


# JupyterHub imports this module while it builds its application (every installed spawner is loaded to
# list its options) or reads its config: from then on a bad policy stops the hub at start.
arm_start_hook()
