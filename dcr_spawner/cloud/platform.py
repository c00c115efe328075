"""Google Confidential Space as the hub's enclave platform: the hub launches each job on a Confidential VM.

``c.DCRPolicy.platform_class = "dcr_spawner.cloud.ConfidentialSpacePlatform"``. The hub, not the
researcher's server, holds the Google credentials (its own service account, by Application Default
Credentials): servers get :class:`dcr_server_ext.backends.hub.HubBackend`, which sends the bundle with the
job's grant id to the hub's cloud API (:mod:`dcr_spawner.cloud.views`). The hub checks the bundle against
the grant, uploads it, inserts one VM per grant (:mod:`.jobs`, :mod:`.launcher`), reads its progress and
result objects, learns when it ends (so the concurrent-jobs quota frees at once), and deletes every VM
labelled as its own that has no live job or is past its deadline (:mod:`.reconciler`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from traitlets import Bool, Enum, Float, Integer, TraitError, Unicode, validate

from dcr_enclave.formats.errors import DCRError

from ..platform import EnclavePlatform
from .launcher import (
    CONFIDENTIAL_TYPES,
    GOOGLE_COMPUTE,
    GOOGLE_STORAGE,
    IMAGE_REF_RE,
    InstanceSettings,
)

HUB_BACKEND: Final = "dcr_server_ext.backends.hub.HubBackend"
_PROJECT_RE: Final = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_ZONE_RE: Final = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_SA_RE: Final = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z0-9-]+\.iam\.gserviceaccount\.com$")
_BUCKET_RE: Final = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/([A-Za-z0-9._~-]+/)*$")
_MACHINE_RE: Final = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")


class ConfidentialSpacePlatform(EnclavePlatform):
    """Each granted job runs on its own Confidential VM, launched by the hub."""

    project = Unicode(
        "",
        help="""The Google Cloud project the enclave VMs run in (its ID, not its number). Required.

        Example::

            c.ConfidentialSpacePlatform.project = "acme-dcr-enclaves"

        Security: only the hub's service account may create instances here (and act as the workload's
        service account): keep researchers' identities out of this project entirely.
        """,
    ).tag(config=True)

    zone = Unicode(
        "",
        help="""The Compute Engine zone the VMs are created in; it must offer the machine type with the
        Confidential VM technology chosen. Required.

        Example::

            c.ConfidentialSpacePlatform.zone = "europe-west4-a"

        Security: no security decision depends on it (data residency may: pick a zone your providers
        accept).
        """,
    ).tag(config=True)

    machine_type = Unicode(
        "n2d-standard-4",
        help="""The machine type of each enclave VM. SEV and SEV_SNP need AMD types (``n2d-*``, ``c2d-*``,
        ``c3d-*``), TDX Intel ``c3-*`` types.

        Example::

            c.ConfidentialSpacePlatform.machine_type = "n2d-highmem-8"

        Security: none; the memory it has bounds what a job can hold in its private ``/data`` (RAM).
        """,
    ).tag(config=True)

    confidential_instance_type = Enum(
        list(CONFIDENTIAL_TYPES),
        default_value="SEV",
        help="""The Confidential VM technology: ``"SEV"``, ``"SEV_SNP"`` or ``"TDX"``. It appears in the
        attestation token as ``hwmodel`` (``GCP_AMD_SEV``, ``GCP_AMD_SEV_SNP``, ``GCP_INTEL_TDX``).

        Example::

            c.ConfidentialSpacePlatform.confidential_instance_type = "SEV_SNP"

        Security: the providers' key-release conditions pin the hardware model: choose one they accept,
        or every job fails at key release.
        """,
    ).tag(config=True)

    image_reference = Unicode(
        "",
        help="""The enclave image, pinned by digest (``registry/path@sha256:<64 hex>``); refused
        otherwise (a tag can be moved to other code). Required. Passed as ``tee-image-reference``.

        Example::

            c.ConfidentialSpacePlatform.image_reference = (
                "europe-docker.pkg.dev/acme-dcr/enclave/dcr-enclave@sha256:4f0c...e1"
            )

        Security: the digest is what Confidential Space attests and what providers' conditions pin; it
        must be a release you reviewed. Also list it in ``enclave_digests`` for receipt checks.
        """,
    ).tag(config=True)

    debug_image = Bool(
        False,
        help="""Boot the ``confidential-space-debug`` image family instead of the production one. The
        debug image allows SSH and log redirection, and its tokens say ``dbgstat: enabled``: a production
        key-release condition refuses it (``dcr provider policy --gcp`` requires disabled-since-boot).
        The hub warns at start when it is on.

        Example::

            c.ConfidentialSpacePlatform.debug_image = False

        Security: never with real data; for trying the deployment with test datasets only.
        """,
    ).tag(config=True)

    image_project = Unicode(
        "confidential-space-images",
        help="""The project publishing the Confidential Space boot image families.

        Example::

            c.ConfidentialSpacePlatform.image_project = "confidential-space-images"

        Security: the boot image is measured and attested (``swname: CONFIDENTIAL_SPACE``); change it only
        for Google's own project.
        """,
    ).tag(config=True)

    service_account = Unicode(
        "",
        help="""The workload service account email attached to each VM (with the ``cloud-platform``
        scope). Required. It reads the job's bundle and the datasets and writes only results; it is not
        granted KMS decrypt (only the Workload Identity principal set is).

        Example::

            c.ConfidentialSpacePlatform.service_account = "dcr-workload@acme-dcr-enclaves.iam.gserviceaccount.com"

        Security: providers' conditions pin it; give it no other role, and let only the hub's service
        account act as it (``roles/iam.serviceAccountUser`` on it).
        """,
    ).tag(config=True)

    network = Unicode(
        "",
        help="""The VPC network of the VMs' interface (``global/networks/<name>`` or a full URL); empty for
        the project's ``default`` network.

        Example::

            c.ConfidentialSpacePlatform.network = "global/networks/dcr-enclaves"

        Security: the kernel has no network inside the enclave; this network carries the supervisor's
        calls to Google APIs. Use Private Google Access with no route to the internet.
        """,
    ).tag(config=True)

    subnetwork = Unicode(
        "",
        help="""The subnetwork (``regions/<region>/subnetworks/<name>``); empty for the network's default.

        Example::

            c.ConfidentialSpacePlatform.subnetwork = "regions/europe-west4/subnetworks/dcr"

        Security: as ``network``.
        """,
    ).tag(config=True)

    external_ip = Bool(
        False,
        help="""Give each VM an external IP address (an access config). Off by default: the enclave
        needs only Google APIs (Private Google Access).

        Example::

            c.ConfidentialSpacePlatform.external_ip = False

        Security: an external address is reachable from the internet; the image exposes nothing, but
        keep it off unless your network offers no other way to Google APIs.
        """,
    ).tag(config=True)

    jobs_bucket = Unicode(
        "",
        help="""Where jobs live in Cloud Storage, ``gs://<bucket>/<prefix>/``: each job's bundle, progress
        and result objects under ``<prefix>jobs/<job id>/``. Required.

        Example::

            c.ConfidentialSpacePlatform.jobs_bucket = "gs://acme-dcr-jobs/hub1/"

        Security: results are sealed to the job's key (or the airlock's): the bucket sees no plaintext.
        Only the hub writes bundles; the workload account may write only result and progress objects.
        """,
    ).tag(config=True)

    max_run_seconds_margin = Integer(
        300,
        help="""Seconds a VM may live beyond the grant's time limit (boot, key release, the receipt)
        before it is deleted: by Compute itself (``scheduling.maxRunDuration`` with ``DELETE``) and by the
        hub's reconciler. At least 0.

        Example::

            c.ConfidentialSpacePlatform.max_run_seconds_margin = 300

        Security: bounds cost and the lifetime of a VM nobody watches; a job that overruns fails.
        """,
    ).tag(config=True)

    compute_endpoint = Unicode(
        GOOGLE_COMPUTE,
        help="""The Compute Engine API endpoint (tests point it at a loopback fake; a loopback endpoint
        gets no credentials).

        Example::

            c.ConfidentialSpacePlatform.compute_endpoint = "https://compute.googleapis.com"

        Security: the hub's credentials go to this endpoint: leave Google's.
        """,
    ).tag(config=True)

    storage_endpoint = Unicode(
        GOOGLE_STORAGE,
        help="""The Cloud Storage API endpoint (tests point it at a loopback emulator).

        Example::

            c.ConfidentialSpacePlatform.storage_endpoint = "https://storage.googleapis.com"

        Security: as ``compute_endpoint``.
        """,
    ).tag(config=True)

    reconcile_interval = Float(
        30.0,
        help="""Seconds between the hub's sweeps: it reads every live job's state (recording ends, so
        quotas free), and deletes every VM labelled as this hub's that has no live job or is past its
        deadline. 0 turns the sweep off (not for production).

        Example::

            c.ConfidentialSpacePlatform.reconcile_interval = 30

        Security: with ``maxRunDuration`` this is what leaves no VM behind across hub restarts.
        """,
    ).tag(config=True)

    max_bundle_bytes = Integer(
        64 * 2**20,
        help="""The largest bundle (bytes) a researcher's server may send to launch a job; larger is
        refused with 413 before anything is stored.

        Example::

            c.ConfidentialSpacePlatform.max_bundle_bytes = 67108864

        Security: bounds the hub's memory per launch and the bucket's growth. (The hub's web server
        also refuses bodies over 100 MB whatever this says.)
        """,
    ).tag(config=True)

    @validate("image_reference")
    def _valid_image(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if value and not IMAGE_REF_RE.match(value):
            raise TraitError(
                f"ConfidentialSpacePlatform.image_reference: {value!r} is not pinned by digest "
                "(registry/path@sha256:<64 hex>)"
            )
        return value

    @validate("jobs_bucket")
    def _valid_bucket(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if value and not value.endswith("/"):
            value += "/"
        if value and not _BUCKET_RE.match(value):
            raise TraitError(
                f"ConfidentialSpacePlatform.jobs_bucket: {value!r} is not gs://<bucket>/<prefix>/"
            )
        return value

    @validate("max_run_seconds_margin", "max_bundle_bytes")
    def _valid_nonnegative(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if value < 0 or (proposal["trait"].name == "max_bundle_bytes" and value == 0):
            raise TraitError(f"ConfidentialSpacePlatform.{proposal['trait'].name}: {value} is out of range")
        return value

    @validate("compute_endpoint", "storage_endpoint")
    def _valid_endpoint(self, proposal: Any) -> str:
        value = str(proposal["value"]).rstrip("/")
        if not re.match(r"^https?://[^/\s]+$", value):
            raise TraitError(
                f"ConfidentialSpacePlatform.{proposal['trait'].name}: {value!r} is not an http(s) origin"
            )
        return value

    _jobs: Any = None

    def server_config(self) -> dict[str, dict[str, Any]]:
        config = super().server_config()
        # Servers hold no Google credential: their backend is a client of this hub's cloud API.
        config["DCRExtension"]["backend_class"] = HUB_BACKEND
        return config

    def settings(self) -> InstanceSettings:
        return InstanceSettings(
            project=self.project,
            zone=self.zone,
            machine_type=self.machine_type,
            confidential_instance_type=self.confidential_instance_type,
            image_reference=self.image_reference,
            service_account=self.service_account,
            debug_image=self.debug_image,
            image_project=self.image_project,
            network=self.network,
            subnetwork=self.subnetwork,
            external_ip=self.external_ip,
        )

    def check_at_start(self) -> None:
        super().check_at_start()
        name = type(self).__name__
        for trait, pattern in (
            ("project", _PROJECT_RE),
            ("zone", _ZONE_RE),
            ("service_account", _SA_RE),
            ("image_reference", IMAGE_REF_RE),
            ("jobs_bucket", _BUCKET_RE),
            ("machine_type", _MACHINE_RE),
        ):
            value = getattr(self, trait)
            if not pattern.match(value):
                raise DCRError(f"c.{name}.{trait}: {value!r} is {'not set' if not value else 'not valid'}")
        if self.confidential_instance_type == "TDX" and not self.machine_type.startswith("c3-"):
            raise DCRError(f"c.{name}.machine_type: TDX needs a c3-* machine type, not {self.machine_type!r}")
        if self.confidential_instance_type != "TDX" and not re.match(r"^(n2d|c2d|c3d)-", self.machine_type):
            raise DCRError(
                f"c.{name}.machine_type: {self.confidential_instance_type} needs an AMD machine type "
                f"(n2d-*, c2d-*, c3d-*), not {self.machine_type!r}"
            )
        if self.debug_image:
            self.log.warning(
                "DCR: c.%s.debug_image is on: VMs boot the confidential-space-debug image (SSH, log "
                "redirection, dbgstat enabled). Production key-release conditions refuse it; never use "
                "it with real data",
                name,
            )
        digest = self.image_reference.rsplit("@", 1)[-1]
        if self.enclave_digests and digest not in self.enclave_digests:
            self.log.warning(
                "DCR: c.%s.image_reference's digest %s is not in enclave_digests: servers will refuse its "
                "receipts",
                name,
                digest,
            )

    def check_datasets(self, policy: Any, hub_thumbprint: str) -> None:
        """Every dataset needs a ``cloud`` entry, and its version's data key must be the Cloud KMS key it
        names (the enclave refuses any other; the hub says so at start instead)."""
        for spec in policy.specs():
            if spec.cloud is None:
                raise DCRError(
                    f'c.DCRPolicy.datasets[{spec.ref!r}] has no "cloud" entry: Confidential Space needs its '
                    "store, KMS key and Workload Identity pool provider",
                    hint='add "cloud": {"store": "gs://...", "kms_key": "projects/...", "wip_provider": '
                    '"projects/<number>/locations/global/workloadIdentityPools/.../providers/..."}',
                )
            key = policy.manifest(spec.ref).key
            if getattr(key, "kind", None) != "gcp-kms" or getattr(key, "name", None) != spec.cloud["kms_key"]:
                raise DCRError(
                    f"c.DCRPolicy.datasets[{spec.ref!r}]: the version's data key is "
                    f"{getattr(key, 'kind', '?')} {getattr(key, 'name', '')!r}, not the Cloud KMS key "
                    f"{spec.cloud['kms_key']!r} the policy names",
                    hint="register the version with `dcr provider add --kms-key <the key>`",
                )

    # -- the hub's runtime ----------------------------------------------------------------------------

    def attach(self, service: Any) -> Any:
        """Start the cloud jobs service on the grant service's database and hub key (at hub start)."""
        from .jobs import CloudConfig, CloudJobs

        policy = service.policy
        clouds = {spec.ref: dict(spec.cloud) for spec in policy.specs() if spec.cloud is not None}
        config = CloudConfig(
            instance=self.settings(),
            jobs_bucket=self.jobs_bucket,
            compute_endpoint=self.compute_endpoint,
            storage_endpoint=self.storage_endpoint,
            max_run_seconds_margin=self.max_run_seconds_margin,
            max_bundle_bytes=self.max_bundle_bytes,
            image_digest=self.image_reference.rsplit("@", 1)[-1],
            dataset_clouds=clouds,
        )
        try:
            self._jobs = CloudJobs(config, service.db, service.hub_key, clock=service.clock, log=self.log)
        except DCRError:
            raise
        except Exception as e:  # no Application Default Credentials, a bad endpoint, ...
            raise DCRError(
                f"the Confidential Space launcher cannot start: {type(e).__name__}: {e}",
                hint="give the hub a Google service account (Application Default Credentials)",
            ) from None
        return self._jobs

    @property
    def jobs(self) -> Any:
        return self._jobs

    def ended(self, grant_ids: Sequence[str]) -> set[str]:
        if self._jobs is None:
            return set()
        ended: set[str] = self._jobs.ended(list(grant_ids))
        return ended
