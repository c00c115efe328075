"""The hub's Confidential Space launcher without a hub: the instance body (against literal dicts), the
Compute fake's validation, and the cloud jobs service with the real Google clients on loopback (the
Compute fake, the Cloud Storage emulator): one VM per grant, ends recorded, no VM left."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gcp_fakes.compute import ComputeFake, FakeVM
from gcp_fakes.storage import StorageEmulator

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.pack.bundle_builder import build_bundle
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_spawner.cloud.jobs import CloudConfig, CloudJobs, CloudRefusal, JobPaths
from dcr_spawner.cloud.launcher import (
    Compute,
    InsertRefused,
    InstanceSettings,
    instance_name,
    make_instance,
    request_id,
    user_label,
)
from dcr_spawner.cloud.reconciler import reconcile
from dcr_spawner.hubdb import GrantedJob, HubDB
from dcr_spawner.hubkey import HubKey, load_or_create_hub_key

IMAGE = "europe-docker.pkg.dev/acme-dcr/enclave/dcr-enclave@sha256:" + "4f" * 32
SETTINGS = InstanceSettings(
    project="acme-dcr-enclaves",
    zone="europe-west4-a",
    machine_type="n2d-standard-4",
    confidential_instance_type="SEV",
    image_reference=IMAGE,
    service_account="dcr-workload@acme-dcr-enclaves.iam.gserviceaccount.com",
)
JOB = "job-" + "0a" * 12
ENV = {n: f"v-{n}" for n in contract.LAUNCH_ENV_NAMES}
KMS = "projects/acme-data/locations/europe-west4/keyRings/dcr/cryptoKeys/visits"
WIP = "projects/555000111222/locations/global/workloadIdentityPools/acme-pool/providers/cs-acme"
LABELS = {"dcr-hub": "h1", "dcr-user": "alice-2bd806c97f0e", "dcr-job": JOB}


def test_the_instance_body_is_exactly_this() -> None:
    body = make_instance(SETTINGS, name=instance_name(JOB), labels=LABELS, env=ENV, max_run_seconds=3900)
    assert body == {
        "name": "dcr-job-0a0a0a0a0a0a0a0a0a0a0a0a",
        "machineType": "zones/europe-west4-a/machineTypes/n2d-standard-4",
        "confidentialInstanceConfig": {"confidentialInstanceType": "SEV"},
        "shieldedInstanceConfig": {
            "enableSecureBoot": True,
            "enableVtpm": True,
            "enableIntegrityMonitoring": True,
        },
        "scheduling": {
            "onHostMaintenance": "TERMINATE",
            "automaticRestart": False,
            "provisioningModel": "STANDARD",
            "maxRunDuration": {"seconds": "3900"},
            "instanceTerminationAction": "DELETE",
        },
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "initializeParams": {
                    "sourceImage": "projects/confidential-space-images/global/images/family/confidential-space"
                },
            }
        ],
        "networkInterfaces": [{}],
        "serviceAccounts": [
            {
                "email": "dcr-workload@acme-dcr-enclaves.iam.gserviceaccount.com",
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            }
        ],
        "labels": LABELS,
        "metadata": {
            "items": [
                {"key": "tee-image-reference", "value": IMAGE},
                {"key": "tee-restart-policy", "value": "Never"},
                {"key": "tee-added-capabilities", "value": '["CAP_SYS_ADMIN"]'},
                {"key": "tee-env-DCR_JOB_ID", "value": "v-DCR_JOB_ID"},
                {"key": "tee-env-DCR_BUNDLE_DIGEST", "value": "v-DCR_BUNDLE_DIGEST"},
                {"key": "tee-env-DCR_BUNDLE_URI", "value": "v-DCR_BUNDLE_URI"},
                {"key": "tee-env-DCR_GRANT", "value": "v-DCR_GRANT"},
                {"key": "tee-env-DCR_HUB_KEY_THUMBPRINT", "value": "v-DCR_HUB_KEY_THUMBPRINT"},
                {"key": "tee-env-DCR_HUB_JWKS", "value": "v-DCR_HUB_JWKS"},
                {"key": "tee-env-DCR_STORE_URI", "value": "v-DCR_STORE_URI"},
                {"key": "tee-env-DCR_OUTPUT_URI", "value": "v-DCR_OUTPUT_URI"},
                {"key": "tee-env-DCR_PROGRESS_URI", "value": "v-DCR_PROGRESS_URI"},
                {"key": "tee-env-DCR_DATASETS", "value": "v-DCR_DATASETS"},
            ]
        },
    }


def test_options_debug_family_network_and_external_ip() -> None:
    s = InstanceSettings(
        **{
            **SETTINGS.__dict__,
            "debug_image": True,
            "confidential_instance_type": "TDX",
            "machine_type": "c3-standard-4",
            "network": "global/networks/dcr",
            "subnetwork": "regions/europe-west4/subnetworks/dcr",
            "external_ip": True,
        }
    )
    body = make_instance(s, name="dcr-x", labels={}, env=ENV, max_run_seconds=60)
    assert body["disks"][0]["initializeParams"]["sourceImage"].endswith("/family/confidential-space-debug")
    assert body["confidentialInstanceConfig"] == {"confidentialInstanceType": "TDX"}
    assert body["networkInterfaces"] == [
        {
            "network": "global/networks/dcr",
            "subnetwork": "regions/europe-west4/subnetworks/dcr",
            "accessConfigs": [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}],
        }
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_reference": "europe-docker.pkg.dev/acme/enclave/dcr:latest"}, "pinned by digest"),
        ({"confidential_instance_type": "NONE"}, "confidential instance type"),
    ],
)
def test_refused_settings(change: dict[str, Any], message: str) -> None:
    s = InstanceSettings(**{**SETTINGS.__dict__, **change})
    with pytest.raises(DCRError, match=message):
        make_instance(s, name="dcr-x", labels={}, env=ENV, max_run_seconds=60)


def test_only_the_contracts_environment_names() -> None:
    with pytest.raises(DCRError, match="launch environment"):
        make_instance(SETTINGS, name="dcr-x", labels={}, env={**ENV, "LD_PRELOAD": "x"}, max_run_seconds=60)
    missing = dict(ENV)
    del missing["DCR_GRANT"]
    with pytest.raises(DCRError, match="launch environment"):
        make_instance(SETTINGS, name="dcr-x", labels={}, env=missing, max_run_seconds=60)


@pytest.mark.parametrize("user", ["alice", "Ålice Ünïcode", "a" * 300, "x@y.org", "---", "日本語", ""])
def test_labels_and_names_are_valid_whatever_the_user(user: str) -> None:
    from dcr_spawner.cloud.launcher import LABEL_VALUE_RE, NAME_RE

    label = user_label(user)
    assert LABEL_VALUE_RE.match(label) and len(label) <= 63
    assert NAME_RE.match(instance_name(contract.new_job_id()))
    assert user_label(user) != user_label(user + "x")


def test_request_ids_are_uuids_derived_from_the_grant() -> None:
    import uuid

    a = request_id("grant-" + "1" * 32, "insert")
    assert a == request_id("grant-" + "1" * 32, "insert")
    assert uuid.UUID(a).version == 5
    assert a != request_id("grant-" + "2" * 32, "insert")
    assert a != request_id("grant-" + "1" * 32, "delete")


# -- the Compute fake, through the real compute_v1 client ------------------------------------------------


@pytest.fixture
def compute() -> Iterator[ComputeFake]:
    with ComputeFake() as fake:
        yield fake


def _client(fake: ComputeFake) -> Compute:
    return Compute(SETTINGS.project, SETTINGS.zone, fake.endpoint, timeout=10)


def _body(name: str = "dcr-job-0a0a0a0a0a0a0a0a0a0a0a0a", **change: Any) -> dict[str, Any]:
    body = make_instance(SETTINGS, name="dcr-x", labels=LABELS, env=ENV, max_run_seconds=600)
    body.update(name=name, **change)  # past make_instance's own checks: what the fake must refuse
    return body


def test_the_same_request_id_creates_one_instance(compute: ComputeFake) -> None:
    c = _client(compute)
    rid = request_id("grant-" + "1" * 32, "insert")
    c.insert(_body(), rid)
    c.insert(_body(), rid)
    assert compute.inserts_created == 1 and len(compute.inserts()) == 2
    assert [i["name"] for i in c.list_labelled("h1")] == ["dcr-job-0a0a0a0a0a0a0a0a0a0a0a0a"]
    assert c.list_labelled("h2") == []
    assert (
        c.delete("dcr-job-0a0a0a0a0a0a0a0a0a0a0a0a", wait=10)
        and c.get("dcr-job-0a0a0a0a0a0a0a0a0a0a0a0a") is None
    )
    assert c.delete("dcr-job-0a0a0a0a0a0a0a0a0a0a0a0a") is False  # already gone is fine


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_body(name="Dcr_Bad"), "resource.name"),
        (_body(name="dcr-" + "a" * 60), "resource.name"),
        (_body(scheduling={"onHostMaintenance": "MIGRATE"}), "live migration"),
        (_body(networkInterfaces=[]), "networkInterfaces"),
        (
            _body(metadata={"items": [{"key": "tee-env-LD_PRELOAD", "value": "x"}]}),
            "env override 'LD_PRELOAD' is not allowed",
        ),
        (
            _body(metadata={"items": [{"key": "tee-container-log-redirect", "value": "true"}]}),
            "debugonly",
        ),
        (_body(labels={"dcr-user": "Alice"}), "labels"),
    ],
)
def test_the_fake_refuses_what_compute_refuses(
    compute: ComputeFake, body: dict[str, Any], message: str
) -> None:
    with pytest.raises(InsertRefused, match=message):
        _client(compute).insert(body, request_id("grant-" + "3" * 32, "insert"))
    assert compute.live() == []


def test_a_request_id_must_be_a_uuid(compute: ComputeFake) -> None:
    with pytest.raises(InsertRefused, match="requestId"):
        _client(compute).insert(_body(), "not-a-uuid")


def test_quota_and_operation_errors(compute: ComputeFake) -> None:
    c = _client(compute)
    compute.refuse_next_insert()
    with pytest.raises(InsertRefused, match=r"HTTP 403.*quotaExceeded"):
        c.insert(_body(), request_id("grant-" + "4" * 32, "insert"))
    compute.fail_next_operation()
    with pytest.raises(InsertRefused, match="ZONE_RESOURCE_POOL_EXHAUSTED"):
        c.insert(_body(), request_id("grant-" + "5" * 32, "insert"))
    assert compute.live() == []


# -- the cloud jobs service -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_endpoint() -> Iterator[str]:
    emulator = StorageEmulator().start()
    try:
        emulator.create_bucket("dcr-jobs")
        yield emulator.endpoint
    finally:
        emulator.stop()


def _gcs(endpoint: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="acme-dcr-enclaves",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )


class StandIn:
    """A stand-in for the enclave: writes progress and a completion object as the contract says, then
    powers off; per job: ``"ok"``, ``"fail"`` (failure.json), ``"hang"`` (never stops by itself)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.modes: dict[str, str] = {}
        self.booted: list[str] = []
        self.release = threading.Event()

    def __call__(self, vm: FakeVM) -> None:
        env = vm.env
        job = env[contract.ENV.JOB_ID]
        if not env[contract.ENV.PROGRESS_URI].startswith("gs://"):
            vm.stopping.wait(60)  # a VM the test inserted by hand: it runs until deleted
            return
        self.booted.append(job)
        mode = self.modes.get(job, "ok")
        gcs = _gcs(self.endpoint)

        def put(uri: str, doc: Any) -> None:
            bucket, _, name = uri[5:].partition("/")
            data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            gcs.bucket(bucket).blob(name).upload_from_string(data, if_generation_match=0)

        progress = env[contract.ENV.PROGRESS_URI]
        put(progress + "00000000.json", {"kind": "state", "state": "running"})
        put(progress + "00000001.json", {"kind": "cell", "index": 0, "count": 2})
        if mode == "hang":
            vm.stopping.wait(60)
            return
        if mode == "wait":
            self.release.wait(30)
            if vm.stopping.is_set():
                return
        put(progress + "00000002.json", {"kind": "cell", "index": 1, "count": 2})
        out = env[contract.ENV.OUTPUT_URI]
        if mode == "fail":
            put(out + contract.FAILURE_FILE, {"reason": "cell 2 raised", "cell": 1, "ename": "ValueError"})
            return
        put(out + contract.SEALED_OUTPUTS_FILE, b"sealed-bytes")
        put(out + contract.TOKEN_FILE, b"token")
        put(out + contract.RECEIPT_FILE, {"release": {"decision": "released"}})


@dataclass
class Cloud:
    fake: ComputeFake
    standin: StandIn
    db: HubDB
    key: HubKey
    storage_endpoint: str
    now: list[float]
    tmp: Path

    def jobs(self, **change: Any) -> CloudJobs:
        config = CloudConfig(
            instance=SETTINGS,
            jobs_bucket="gs://dcr-jobs/hub1/",
            compute_endpoint=self.fake.endpoint,
            storage_endpoint=self.storage_endpoint,
            max_run_seconds_margin=60,
            max_bundle_bytes=change.pop("max_bundle_bytes", 2**20),
            image_digest="sha256:" + "4f" * 32,
            dataset_clouds={},
        )
        return CloudJobs(config, self.db, self.key, clock=lambda: self.now[0])

    def grant(self, user: str = "alice", *, time_limit: int = 600) -> tuple[str, str, str, bytes]:
        """A granted job as the grant service records it: ``(job id, grant id, grant, bundle)``."""
        job_id, grant_id = contract.new_job_id(), contract.new_grant_id()
        nb = self.tmp / job_id / "analysis.ipynb"
        nb.parent.mkdir()
        nb.write_text(
            json.dumps({"cells": [], "metadata": {"job": job_id}, "nbformat": 4, "nbformat_minor": 5})
        )
        manifest = build_bundle(nb, self.tmp / job_id / "bundle.tar")
        datasets = [GrantedDataset("acme", "visits", "sha256:" + "cd" * 32, "auto")]
        now = int(self.now[0])
        token = issue_grant(
            self.key.private,
            user=user,
            job_id=job_id,
            bundle_digest=manifest.digest,
            datasets=datasets,
            output_public_key=bytes(32),
            time_limit=time_limit,
            grant_id=grant_id,
            now=now,
        )
        self.db.record_grant(
            GrantedJob(
                grant_id,
                job_id,
                user,
                manifest.digest,
                "A" * 43,
                now,
                now + time_limit,
                now + time_limit + 600,
                (("acme/visits", datasets[0].version, "auto"),),
            )
        )
        return job_id, grant_id, token, (self.tmp / job_id / "bundle.tar").read_bytes()


@pytest.fixture
def cloud(tmp_path: Path, storage_endpoint: str) -> Iterator[Cloud]:
    standin = StandIn(storage_endpoint)
    db = HubDB(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    db.setup()
    with ComputeFake(standin) as fake:
        yield Cloud(
            fake,
            standin,
            db,
            load_or_create_hub_key(tmp_path / "hub.key"),
            storage_endpoint,
            [time.time()],
            tmp_path,
        )
    standin.release.set()


def _until(fn: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_a_job_runs_to_success_and_leaves_no_vm(cloud: Cloud) -> None:
    jobs = cloud.jobs()
    job_id, grant_id, token, bundle = cloud.grant()
    doc = jobs.launch("alice", job_id, grant_id, token, bundle)
    assert doc["state"] == "launching" and doc["instance"] == instance_name(job_id)
    vm = cloud.fake.live()[0]
    meta = {i["key"]: i["value"] for i in vm["metadata"]["items"]}
    paths = JobPaths.of("gs://dcr-jobs/hub1/", job_id)
    assert meta["tee-env-DCR_BUNDLE_URI"] == f"gs://dcr-jobs/hub1/jobs/{job_id}/bundle"
    assert meta["tee-env-DCR_GRANT"] == token and meta["tee-restart-policy"] == "Never"
    assert vm["labels"]["dcr-user"] == user_label("alice") and vm["labels"]["dcr-job"] == job_id
    assert _gcs(cloud.storage_endpoint).bucket("dcr-jobs").blob(paths.bundle).download_as_bytes() == bundle
    status = _until(lambda: (s := jobs.status("alice", job_id))["state"] == "succeeded" and s)
    assert status["cells"] == 2 and status["cell"] == 1 and status["failure"] is None
    assert status["enclave"] == {
        "kind": "confidential_space",
        "simulated": False,
        "image_digest": "sha256:" + "4f" * 32,
    }
    assert cloud.fake.live() == []
    assert jobs.ended([grant_id]) == {grant_id}
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(jobs.result("alice", job_id))) as tf:
        assert sorted(tf.getnames()) == sorted(
            [contract.RECEIPT_FILE, contract.TOKEN_FILE, contract.SEALED_OUTPUTS_FILE]
        )
    jobs.cleanup("alice", job_id)
    assert list(_gcs(cloud.storage_endpoint).list_blobs("dcr-jobs", prefix=paths.prefix)) == []
    events = [e.event for e in cloud.db.events(user="alice")]
    assert events[-2:] == ["cloud.launch", "cloud.end"]


def test_the_same_grant_twice_and_a_hub_restart_launch_one_vm(cloud: Cloud) -> None:
    job_id, grant_id, token, bundle = cloud.grant()
    cloud.standin.modes[job_id] = "hang"
    cloud.jobs().launch("alice", job_id, grant_id, token, bundle)
    cloud.jobs().launch("alice", job_id, grant_id, token, bundle)  # a second hub process, same grant
    assert cloud.fake.inserts_created == 1 and len(cloud.fake.inserts()) == 1
    assert len(cloud.fake.live()) == 1 and cloud.standin.booted == [job_id]


def test_a_hub_that_died_between_insert_and_record_launches_no_second_vm(cloud: Cloud) -> None:
    """The record says "launching" (written before the insert); the insert reached Compute; the hub died
    before it noted the result. The retried launch repeats the insert with the same request id."""
    from dcr_spawner.cloud.records import Launch, Launches

    job_id, grant_id, token, bundle = cloud.grant()
    cloud.standin.modes[job_id] = "hang"
    jobs = cloud.jobs()
    Launches(cloud.db).claim(
        Launch(
            grant_id,
            job_id,
            "alice",
            instance_name(job_id),
            SETTINGS.zone,
            "launching",
            int(cloud.now[0]) + 660,
            int(cloud.now[0]),
        )
    )
    body = make_instance(
        SETTINGS,
        name=instance_name(job_id),
        labels={"dcr-hub": jobs.hub, "dcr-user": "a", "dcr-job": job_id},
        env=ENV,
        max_run_seconds=660,
    )
    jobs.compute.insert(body, request_id(grant_id, "insert"))
    cloud.jobs().launch("alice", job_id, grant_id, token, bundle)  # the restarted hub
    assert cloud.fake.inserts_created == 1 and len(cloud.fake.live()) == 1


def test_bad_launches_are_refused_and_leave_nothing(cloud: Cloud) -> None:
    jobs = cloud.jobs(max_bundle_bytes=20000)
    job_id, grant_id, token, bundle = cloud.grant()
    _, other_grant, other_token, other_bundle = cloud.grant()
    cases = [
        (("mallory", job_id, grant_id, token, bundle), 404),  # another user's job
        (("alice", "job-" + "f" * 24, grant_id, token, bundle), 404),
        (("alice", job_id, other_grant, token, bundle), 409),  # not this job's grant
        (("alice", job_id, grant_id, other_token, bundle), 400),  # the grant of another job
        (("alice", job_id, grant_id, token, other_bundle), 400),  # another bundle
        (("alice", job_id, grant_id, token, b"not a tar"), 400),
        (("alice", job_id, grant_id, token, bundle + b"\0" * 30000), 413),
        (("alice", job_id, grant_id, token[:-4] + "AAAA", bundle), 400),  # forged signature
    ]
    for args, status in cases:
        with pytest.raises(CloudRefusal) as e:
            jobs.launch(*args)
        assert e.value.status == status, (args[0], e.value.message)
    assert cloud.fake.requests == []
    assert jobs.launches.by_job(job_id) is None
    assert list(_gcs(cloud.storage_endpoint).list_blobs("dcr-jobs", prefix=f"hub1/jobs/{job_id}/")) == []
    for call in (jobs.status, jobs.cancel, jobs.result, jobs.cleanup):
        with pytest.raises(CloudRefusal) as e:
            call("mallory", job_id)
        assert e.value.status == 404


def test_insert_refused_and_operation_errors_end_the_job_failed(cloud: Cloud) -> None:
    jobs = cloud.jobs()
    for inject, reason in (
        (cloud.fake.refuse_next_insert, "quotaExceeded"),
        (cloud.fake.fail_next_operation, "ZONE_RESOURCE_POOL_EXHAUSTED"),
    ):
        job_id, grant_id, token, bundle = cloud.grant()
        inject()
        doc = jobs.launch("alice", job_id, grant_id, token, bundle)
        assert doc["state"] == "failed" and reason in doc["failure"]["reason"]
        assert jobs.status("alice", job_id)["state"] == "failed"
        assert jobs.ended([grant_id]) == {grant_id}
    assert cloud.fake.live() == []


def test_a_failing_notebook_reports_its_cell(cloud: Cloud) -> None:
    jobs = cloud.jobs()
    job_id, grant_id, token, bundle = cloud.grant()
    cloud.standin.modes[job_id] = "fail"
    jobs.launch("alice", job_id, grant_id, token, bundle)
    status = _until(lambda: (s := jobs.status("alice", job_id))["state"] == "failed" and s)
    assert status["failure"] == {"reason": "cell 2 raised", "cell": 1, "ename": "ValueError"}
    assert cloud.fake.live() == []


def test_cancel_while_running_deletes_the_vm(cloud: Cloud) -> None:
    jobs = cloud.jobs()
    job_id, grant_id, token, bundle = cloud.grant()
    cloud.standin.modes[job_id] = "hang"
    jobs.launch("alice", job_id, grant_id, token, bundle)
    _until(lambda: jobs.status("alice", job_id)["cells"] == 2)
    assert jobs.cancel("alice", job_id)["state"] == "cancelled"
    assert cloud.fake.live() == [] and jobs.ended([grant_id]) == {grant_id}
    assert jobs.status("alice", job_id)["state"] == "cancelled"


def test_a_vm_that_never_stops_is_deleted_at_its_deadline(cloud: Cloud) -> None:
    jobs = cloud.jobs()
    job_id, grant_id, token, bundle = cloud.grant(time_limit=60)
    cloud.standin.modes[job_id] = "hang"
    jobs.launch("alice", job_id, grant_id, token, bundle)
    assert reconcile(jobs)["expired"] == 0 and len(cloud.fake.live()) == 1
    cloud.now[0] += 60 + 60 + 1  # time limit + margin
    assert reconcile(jobs)["expired"] == 1
    assert cloud.fake.live() == []
    assert jobs.status("alice", job_id)["failure"]["reason"].startswith("the job reached its time limit")


def test_the_reconciler_deletes_orphans_and_finishes_vanished_vms(cloud: Cloud) -> None:
    jobs = cloud.jobs()
    hub = jobs.hub
    c = jobs.compute
    # A VM of this hub no record knows (e.g. left by a database restored from a backup), one of another hub.
    c.insert(_body(name="dcr-orphan", labels={"dcr-hub": hub}), request_id("grant-" + "7" * 32, "insert"))
    c.insert(_body(name="dcr-other", labels={"dcr-hub": "hother"}), request_id("grant-" + "8" * 32, "insert"))
    job_id, grant_id, token, bundle = cloud.grant()
    cloud.standin.modes[job_id] = "hang"
    jobs.launch("alice", job_id, grant_id, token, bundle)
    c.delete(instance_name(job_id), wait=10)  # vanished (preempted, deleted by hand)
    counts = reconcile(jobs)
    assert counts["deleted"] == 1
    assert sorted(i["name"] for i in cloud.fake.live()) == ["dcr-other"]
    assert jobs.ended([grant_id]) == {grant_id}
    assert jobs.status("alice", job_id)["failure"]["reason"] == "the enclave VM stopped without a result"


def test_a_launch_sent_after_its_insert_completed_inserts_nothing(cloud: Cloud) -> None:
    jobs = cloud.jobs()
    job_id, grant_id, token, bundle = cloud.grant()
    cloud.standin.modes[job_id] = "hang"
    jobs.launch("alice", job_id, grant_id, token, bundle)
    requests_before = len(cloud.fake.inserts())
    doc = jobs.launch("alice", job_id, grant_id, token, bundle)
    assert doc["instance"] == instance_name(job_id) and doc["state"] in ("launching", "running")
    assert len(cloud.fake.inserts()) == requests_before


# -- the platform's configuration and the policy's cloud entries -----------------------------------------


def test_the_platform_gives_servers_the_hub_backend_and_refuses_unpinned_images() -> None:
    from traitlets import TraitError

    from dcr_spawner.cloud import ConfidentialSpacePlatform

    p = ConfidentialSpacePlatform(image_reference=IMAGE, jobs_bucket="gs://dcr-jobs/hub1")
    assert p.jobs_bucket == "gs://dcr-jobs/hub1/"
    assert p.server_config()["DCRExtension"]["backend_class"] == "dcr_server_ext.backends.hub.HubBackend"
    assert (
        p.server_config()["DCRExtension"]["grant_source_class"]
        == "dcr_server_ext.grant_sources.HubGrantSource"
    )
    for trait, value in (
        ("image_reference", "europe-docker.pkg.dev/acme/enclave/dcr:latest"),
        ("jobs_bucket", "s3://bucket/"),
        ("compute_endpoint", "compute.googleapis.com"),
        ("confidential_instance_type", "NONE"),
        ("max_bundle_bytes", 0),
    ):
        with pytest.raises(TraitError):
            ConfidentialSpacePlatform(**{trait: value})


def test_the_platform_checks_its_settings_at_start() -> None:
    from dcr_spawner.cloud import ConfidentialSpacePlatform

    good = {
        "project": "acme-dcr-enclaves",
        "zone": "europe-west4-a",
        "image_reference": IMAGE,
        "service_account": SETTINGS.service_account,
        "jobs_bucket": "gs://dcr-jobs/hub1/",
        "enclave_digests": ["sha256:" + "4f" * 32],
    }
    ConfidentialSpacePlatform(**good).check_at_start()
    for change, message in (
        ({"project": ""}, "project: '' is not set"),
        ({"service_account": "someone@gmail.com"}, "service_account"),
        ({"confidential_instance_type": "TDX"}, "TDX needs a c3-"),
        ({"machine_type": "c3-standard-4"}, "AMD machine type"),
    ):
        with pytest.raises(DCRError, match=message):
            ConfidentialSpacePlatform(**{**good, **change}).check_at_start()


@pytest.mark.parametrize(
    ("cloud", "message"),
    [
        (
            {"store": "gs://b/s/", "kms_key": "projects/acme-data/locations/eu/keyRings/r/cryptoKeys/k"},
            "exactly the keys",
        ),
        ({"store": "/srv/store", "kms_key": KMS, "wip_provider": WIP}, "store"),
        ({"store": "gs://dcr-data/s/", "kms_key": "projects/x/keys/k", "wip_provider": WIP}, "kms_key"),
        (
            {"store": "gs://dcr-data/s/", "kms_key": KMS, "wip_provider": "projects/acme/locations/global/x"},
            "wip_provider",
        ),
    ],
)
def test_the_policy_refuses_malformed_cloud_entries(cloud: dict[str, str], message: str) -> None:
    from dcr_spawner.policy import PolicyError, parse_dataset

    entry = {"version": "sha256:" + "cd" * 32, "store": "/srv/store", "cloud": cloud}
    with pytest.raises(PolicyError, match=message):
        parse_dataset("acme/visits", entry)


def test_the_grant_carries_the_policys_cloud_entry() -> None:
    from dcr_spawner.grant_service import granted_dataset
    from dcr_spawner.policy import parse_dataset

    cloud = {"store": "gs://dcr-data/stores/acme/", "kms_key": KMS, "wip_provider": WIP}
    spec = parse_dataset(
        "acme/visits", {"version": "sha256:" + "cd" * 32, "store": "/srv/store", "cloud": cloud}
    )
    assert granted_dataset(spec).to_json()["cloud"] == cloud
    local = parse_dataset("acme/visits", {"version": "sha256:" + "cd" * 32, "store": "/srv/store"})
    assert "cloud" not in granted_dataset(local).to_json()


def test_launch_records_on_postgresql(tmp_path: Path) -> None:
    from hub_harness import PostgresServer

    from dcr_spawner.cloud.records import Launch, Launches, setup

    with PostgresServer() as pg:
        db = HubDB(pg.create_database("dcr_cloud"))
        db.setup()
        setup(db)
        setup(db)  # idempotent: an existing table is kept
        launches = Launches(db)
        launch = Launch(
            "grant-" + "1" * 32, JOB, "alice", instance_name(JOB), "europe-west4-a", "launching", 100, 10
        )
        assert launches.claim(launch) == (launch, True)
        again, new = launches.claim(launch)
        assert not new and again.grant_id == launch.grant_id
        launches.mark_running(launch.grant_id)
        assert launches.end(launch.grant_id, "succeeded", "", 20) is True
        assert launches.end(launch.grant_id, "failed", "late", 30) is False  # the first end stays
        assert launches.by_job(JOB).end_state == "succeeded"
        assert launches.ended_among([launch.grant_id, "grant-" + "2" * 32]) == {launch.grant_id}
        assert launches.live() == []
        db.dispose()


# -- the researcher's server side: the hub's result as HubBackend unpacks it --------------------------------


def _tar(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for name, link, data in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link.decode()
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if link is None else None)
    return out.getvalue()


def test_hub_backend_unpacks_flat_regular_files_only(tmp_path: Path) -> None:
    from dcr_server_ext.backends.hub import _extract

    names = _extract(_tar([("receipt.json", None, b"{}"), ("outputs.sealed", None, b"x")]), tmp_path / "ok")
    assert names == ["outputs.sealed", "receipt.json"]
    assert (tmp_path / "ok" / "outputs.sealed").read_bytes() == b"x"
    for i, members in enumerate(
        [
            [("../escape", None, b"x")],
            [("sub/receipt.json", None, b"x")],
            [("receipt.json", b"/etc/passwd", b"")],
            [("receipt.json", None, b"1"), ("receipt.json", None, b"2")],
        ]
    ):
        with pytest.raises(DCRError):
            _extract(_tar(members), tmp_path / f"bad{i}")
    assert not (tmp_path / "escape").exists()


def test_a_compute_outage_leaves_the_launch_to_be_retried(cloud: Cloud) -> None:
    """A 503 from Compute is not a refusal: the hub answers 503, the record stays "launching", and the
    retried launch (same request id) starts the one VM."""
    jobs = cloud.jobs()
    job_id, grant_id, token, bundle = cloud.grant()
    cloud.standin.modes[job_id] = "hang"
    cloud.fake.refuse_next_insert(503, "backendError", "Internal error. Please try again.")
    with pytest.raises(CloudRefusal) as e:
        jobs.launch("alice", job_id, grant_id, token, bundle)
    assert e.value.status == 503
    assert jobs.launches.by_job(job_id).state == "launching"
    assert jobs.launch("alice", job_id, grant_id, token, bundle)["state"] == "launching"
    assert [i["name"] for i in cloud.fake.live()] == [instance_name(job_id)]
