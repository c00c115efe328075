"""The enclave on Confidential Space, end to end with real processes and the real Google clients on loopback.

Each test registers datasets whose data keys are wrapped by the Cloud KMS fake (through the real KMS client),
uploads them with a bundle to the Cloud Storage emulator, signs a grant with a test hub key, and runs
``python -m dcr_enclave.cloud`` as a subprocess (as root: its private mount namespace and the kernel
sandbox) with a teeserver fake whose tokens carry the VM's claims. The key release goes through STS (the
provider's compiled Workload Identity condition, evaluated with CEL) and KMS; results are read back from
storage and the receipt checked with ``dcr verify --require-hardware`` against the fake root.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from gcp_fakes.google import COUNT_ROWS, Google, register_version, vm_sandbox_ids
from gcp_fakes.issuer import FakeAttestationIssuer, vm_claims
from gcp_fakes.sts import pool_principal_set
from gcp_fakes.teeserver import TeeServerFake

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import sha256_bytes
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import CloudDataset, GrantedDataset
from dcr_enclave.formats.jwk import jwks, thumbprint
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.formats.unsealing import open_dir
from dcr_enclave.pack.bundle_builder import build_bundle
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import generate_key
from dcr_enclave.pack.store import Store

pytestmark = [pytest.mark.root, pytest.mark.slow]

IMAGE_DIGEST = sha256_bytes(b"the released enclave image")
OTHER_IMAGE_DIGEST = sha256_bytes(b"an image no provider approved")
PROJECT = "dcr-enclaves"
WORKLOAD_SA = f"dcr-workload@{PROJECT}.iam.gserviceaccount.com"
DATASETS_BUCKET = "dcr-datasets"
JOBS_URI = "gs://dcr-jobs/hub-a/"
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def google() -> Iterator[Google]:
    g = Google.start(buckets=(DATASETS_BUCKET, "dcr-jobs"))
    try:
        yield g
    finally:
        g.stop()


@dataclass
class Provider:
    name: str
    dataset: str
    version: str
    kms_key: str
    wip_provider: str
    store: str

    def granted(self, release: str = "auto", **cloud: str) -> GrantedDataset:
        entry = {"store": self.store, "kms_key": self.kms_key, "wip_provider": self.wip_provider, **cloud}
        return GrantedDataset(self.name, self.dataset, self.version, release, CloudDataset(**entry))


@dataclass
class World:
    google: Google
    tmp: Path
    hub_key: Any = field(default_factory=generate_key)

    @property
    def hub_thumbprint(self) -> str:
        return thumbprint(jwks(self.hub_key)["keys"][0])

    def register(
        self,
        provider: str,
        dataset: str,
        real: Path,
        synthetic: Path,
        *,
        enclave_digests: tuple[str, ...] = (IMAGE_DIGEST,),
    ) -> Provider:
        """Register a version (its own KMS key and pool provider), upload it, deploy its condition."""
        tag = secrets.token_hex(4)
        kms_key = f"projects/{provider}-data/locations/europe-west4/keyRings/dcr/cryptoKeys/{dataset}-{tag}"
        prefix = f"stores/{tag}/"
        wip = f"projects/555000111222/locations/global/workloadIdentityPools/{provider}-{tag}/providers/cs-{tag}"
        m, _cond = register_version(
            self.google, Store(self.tmp / f"store-{provider}-{tag}"), provider, dataset, [(real, synthetic)],
            kms_key=kms_key, wip_provider=wip, upload_to=contract.GsUri(DATASETS_BUCKET, prefix),
            enclave_digests=enclave_digests, hub_key_thumbprints=(self.hub_thumbprint,), project=PROJECT,
            service_accounts=(WORKLOAD_SA,),
        )  # fmt: skip
        return Provider(provider, dataset, m.version, kms_key, wip, f"gs://{DATASETS_BUCKET}/{prefix}")


@dataclass
class Run:
    job_id: str
    rc: int
    stderr: str
    objects: dict[str, bytes]
    progress: list[dict[str, Any]]
    tee: TeeServerFake
    output_private: bytes
    elapsed: float

    @property
    def states(self) -> list[str]:
        return [m["state"] for m in self.progress if m["kind"] == "state"]

    @property
    def cells(self) -> list[int]:
        return [m["index"] for m in self.progress if m["kind"] == "cell"]

    def failure(self) -> dict[str, Any]:
        return json.loads(self.objects[contract.FAILURE_FILE])


def run_job(
    world: World,
    make_notebook: Any,
    datasets: list[GrantedDataset],
    cells: list[str],
    *,
    claims: dict[str, Any] | None = None,
    hub_key: Any = None,
    airlock_public: bytes | None = None,
    drop: tuple[str, ...] = (),
    override: dict[str, str] | None = None,
    quantum: float = 1.0,
) -> Run:
    """Upload a bundle, sign a grant and run ``python -m dcr_enclave.cloud`` as the VM would."""
    g = world.google
    tmp = world.tmp / secrets.token_hex(4)
    tmp.mkdir()
    job_id = contract.new_job_id()
    nb = make_notebook(cells, workspace=f"ws-{job_id}")
    bundle = tmp / "bundle.tar"
    digest = build_bundle(nb, bundle).digest
    jobs = g.storage.client().bucket("dcr-jobs")
    bundle_uri = contract.parse_gs_uri(contract.cloud_bundle_uri(JOBS_URI, job_id))
    jobs.blob(bundle_uri.name).upload_from_filename(str(bundle))
    key = hub_key or world.hub_key
    out_private, out_public = generate_keypair()
    grant = issue_grant(
        key,
        user="alice",
        job_id=job_id,
        bundle_digest=digest,
        datasets=datasets,
        output_public_key=out_public,
        time_limit=300,
        memory_bytes=2 * 2**30,
        airlock_public_key=airlock_public,
    )
    launch = {
        contract.ENV.JOB_ID: job_id,
        contract.ENV.BUNDLE_DIGEST: digest,
        contract.ENV.BUNDLE_URI: str(bundle_uri),
        contract.ENV.GRANT: grant,
        contract.ENV.HUB_KEY_THUMBPRINT: thumbprint(jwks(key)["keys"][0]),
        contract.ENV.HUB_JWKS: json.dumps(jwks(key)),
        contract.ENV.STORE_URI: f"gs://{DATASETS_BUCKET}/stores/",
        contract.ENV.OUTPUT_URI: contract.cloud_output_uri(JOBS_URI, job_id),
        contract.ENV.PROGRESS_URI: contract.cloud_progress_uri(JOBS_URI, job_id),
        contract.ENV.DATASETS: contract.datasets_env_value(
            (d.provider, d.dataset, d.version) for d in datasets
        ),
    }
    assert tuple(launch) == contract.LAUNCH_ENV_NAMES
    for name in drop:
        del launch[name]
    launch.update(override or {})
    vm = claims if claims is not None else vm_claims(image_digest=IMAGE_DIGEST, env={})
    vm["submods"]["container"]["env"] = dict(launch)  # the launcher attests the tee-env-* it passed
    sock = tmp / "launcher" / "teeserver.sock"
    tee = TeeServerFake(sock, g.issuer, vm).start()
    uid, gid = vm_sandbox_ids(tmp / "sandbox-ids")
    # Short: the kernel's unix sockets live under it (sockaddr_un's 108 bytes).
    scratch = Path(tempfile.mkdtemp(prefix="dcr-cs-", dir="/tmp"))
    env = {
        **launch,
        contract.CLOUD_TEESERVER_SOCKET: str(sock),
        contract.CLOUD_STS_ENDPOINT: g.sts.endpoint,
        contract.CLOUD_KMS_ENDPOINT: g.kms.endpoint,
        contract.CLOUD_STORAGE_ENDPOINT: g.storage.endpoint,
        contract.CLOUD_SCRATCH: str(scratch),
        contract.CLOUD_SCRATCH_BYTES: str(2**30),
        contract.CLOUD_SANDBOX_IDS: f"{uid}:{gid}",
        contract.CLOUD_TIME_QUANTUM: str(quantum),
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dcr_enclave.cloud"],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    finally:
        elapsed = time.monotonic() - started
        tee.stop()
        # The tmpfs lived in the enclave's own mount namespace: here the mount point is empty.
        scratch.rmdir()
    result_prefix = contract.parse_gs_uri(launch[contract.ENV.OUTPUT_URI]).name
    objects = {
        b.name.removeprefix(result_prefix): b.download_as_bytes()
        for b in g.storage.client().list_blobs("dcr-jobs", prefix=result_prefix)
    }
    progress_prefix = contract.parse_gs_uri(launch[contract.ENV.PROGRESS_URI]).name
    names = sorted(b.name for b in g.storage.client().list_blobs("dcr-jobs", prefix=progress_prefix))
    assert names == [progress_prefix + contract.progress_object_name(i) for i in range(len(names))]
    progress = [json.loads(jobs.blob(n).download_as_bytes()) for n in names]
    return Run(job_id, proc.returncode, proc.stderr, objects, progress, tee, out_private, elapsed)


@pytest.fixture
def world(google: Google, tmp_path: Path) -> World:
    return World(google, tmp_path)


@pytest.fixture
def acme(world: World, insurance_real: Path, insurance_synthetic: Path) -> Provider:
    return world.register("acme", "insurance", insurance_real, insurance_synthetic)


def _small_dataset(tmp: Path, name: str) -> tuple[Path, Path]:
    real, synthetic = tmp / name / "real", tmp / name / "synthetic"
    real.mkdir(parents=True)
    synthetic.mkdir(parents=True)
    (real / "visits.csv").write_text("region,visits\nnorth,120\nsouth,87\n")
    (synthetic / "visits.csv").write_text("region,visits\nnorth,100\nsouth,100\n")
    return real / "visits.csv", synthetic / "visits.csv"


def _receipt_dir(run: Run, tmp: Path) -> Path:
    d = tmp / f"receipt-{run.job_id}"
    d.mkdir()
    for name in (contract.RECEIPT_FILE, contract.TOKEN_FILE, contract.SIGNER_JWKS_FILE):
        (d / name).write_bytes(run.objects[name])
    (d / "sealed").write_bytes(run.objects[contract.SEALED_OUTPUTS_FILE])
    open_dir(d / "sealed", d / contract.OUTPUTS_DIR, run.output_private, run.job_id)
    (d / "sealed").unlink()
    return d


def test_a_job_runs_and_its_receipt_verifies_as_hardware(
    world: World, acme: Provider, make_notebook: Any, run_cli: Any, insurance_real: Path, tmp_path: Path
) -> None:
    run = run_job(world, make_notebook, [acme.granted()], COUNT_ROWS)
    assert run.rc == 0, (run.objects.get(contract.FAILURE_FILE), run.stderr[-3000:])
    assert set(run.objects) == {
        contract.RECEIPT_FILE,
        contract.TOKEN_FILE,
        contract.SIGNER_JWKS_FILE,
        contract.SEALED_OUTPUTS_FILE,
    }
    # Progress in order: launching, running, each cell, checking; never a failure.
    assert run.states == ["launching", "running", "checking"]
    assert run.cells == [0, 1]
    kinds = [m["kind"] for m in run.progress]
    assert kinds.index("cell") > run.progress.index({"kind": "state", "state": "running"})
    # The sealed outputs open with the job's key and hold what the notebook computed on the real rows.
    d = _receipt_dir(run, tmp_path)
    real_rows = len(insurance_real.read_text().splitlines()) - 1
    assert (d / "outputs" / "results" / "summary.csv").read_text() == f"rows\n{real_rows}\n"
    receipt = json.loads(run.objects[contract.RECEIPT_FILE])
    assert receipt["enclave"] == {"kind": "confidential_space", "image_digest": IMAGE_DIGEST}
    assert receipt["release"]["decision"] == "released"
    # The receipt's token is a PKI token with the manifest's sha256 (71 bytes: within Google's 10..74).
    nonce = sha256_bytes(run.objects[contract.RECEIPT_FILE])
    receipt_requests = [r for r in run.tee.requests if r["audience"] == contract.RECEIPT_AUDIENCE]
    assert receipt_requests[-1] == {
        "audience": contract.RECEIPT_AUDIENCE,
        "nonces": [nonce],
        "token_type": "PKI",
    }
    # The key came from KMS, to this provider's pool only.
    assert (acme.kms_key, pool_principal_set(acme.wip_provider)) in world.google.kms.decrypts
    root = tmp_path / "google-root.pem"
    root.write_bytes(world.google.issuer.root_pem)
    code, out, err = run_cli(
        "verify",
        d,
        "--trust-root",
        root,
        "--enclave-digest",
        IMAGE_DIGEST,
        "--hub-key",
        world.hub_thumbprint,
        "--require-hardware",
    )
    assert code == 0, out + err
    assert "FAIL" not in out and "PASS hardware" in out and "PASS pinned hub key" in out
    # Pinned to another image, the same receipt fails.
    code, out, _ = run_cli(
        "verify", d, "--trust-root", root, "--enclave-digest", OTHER_IMAGE_DIGEST, "--require-hardware"
    )
    assert code != 0 and "FAIL pinned enclave digest" in out


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _assert_refused_before_any_cell(run: Run, reason: str) -> None:
    assert run.rc == 1, run.stderr[-3000:]
    assert contract.RECEIPT_FILE not in run.objects
    assert set(run.objects) == {contract.FAILURE_FILE}
    failure = run.failure()
    assert reason in failure["reason"], failure
    assert failure["cell"] is None and failure["ename"] is None
    assert "running" not in run.states and run.cells == []
    assert run.progress[-1]["kind"] == "failed"
    assert run.progress[-1]["reason"] == failure["reason"]


CONDITION_REFUSED = "the provider's attestation condition refused this enclave"


@pytest.mark.parametrize(
    "platform",
    [
        {"image_digest": OTHER_IMAGE_DIGEST},
        # A debug image (dbgstat enabled) under the production condition.
        {"image_digest": IMAGE_DIGEST, "dbgstat": "enabled"},
    ],
    ids=["another-image", "debug-image"],
)
def test_the_providers_condition_refuses_another_image_or_a_debug_one(
    world: World, acme: Provider, make_notebook: Any, platform: dict[str, Any]
) -> None:
    before = len(world.google.kms.decrypts)
    run = run_job(world, make_notebook, [acme.granted()], COUNT_ROWS, claims=vm_claims(env={}, **platform))
    _assert_refused_before_any_cell(run, CONDITION_REFUSED)
    assert "acme/insurance" in run.failure()["reason"]
    assert world.google.sts.exchanges[-1].outcome.startswith("unauthorized_client")
    assert len(world.google.kms.decrypts) == before


def test_a_grant_from_another_hub_key_is_refused_by_the_condition(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    """The enclave verifies the grant against the hub key the launch names; the provider pins its own hub's
    key thumbprint, which the token attests, so STS refuses."""
    run = run_job(world, make_notebook, [acme.granted()], COUNT_ROWS, hub_key=generate_key())
    _assert_refused_before_any_cell(run, CONDITION_REFUSED)


def test_two_providers_each_release_under_their_own_pool(
    world: World, acme: Provider, make_notebook: Any, tmp_path: Path
) -> None:
    beta = world.register("beta", "visits", *_small_dataset(tmp_path, "beta"))
    cells = [
        COUNT_ROWS[0],
        "v = open('/data/beta/visits/visits.csv').read().splitlines()\n"
        "open('results/visits.txt', 'w').write(str(len(v)))",
    ]
    run = run_job(world, make_notebook, [acme.granted(), beta.granted()], cells)
    assert run.rc == 0, (run.objects.get(contract.FAILURE_FILE), run.stderr[-3000:])
    principals = [pool_principal_set(p.wip_provider) for p in (acme, beta)]
    assert principals[0] != principals[1]
    for p, principal in zip((acme, beta), principals, strict=True):
        assert (p.kms_key, principal) in world.google.kms.decrypts
    receipt = json.loads(run.objects[contract.RECEIPT_FILE])
    assert sorted(receipt["policies"]["conditions"]) == ["acme/insurance", "beta/visits"]
    d = _receipt_dir(run, tmp_path)
    assert (d / "outputs" / "results" / "visits.txt").read_text() == "3"


def test_when_one_providers_condition_fails_the_job_fails_before_any_cell(
    world: World, acme: Provider, make_notebook: Any, tmp_path: Path
) -> None:
    beta = world.register(
        "beta", "visits", *_small_dataset(tmp_path, "beta"), enclave_digests=(OTHER_IMAGE_DIGEST,)
    )
    run = run_job(world, make_notebook, [acme.granted(), beta.granted()], COUNT_ROWS)
    _assert_refused_before_any_cell(run, CONDITION_REFUSED)
    assert "beta/visits" in run.failure()["reason"]
    assert [e.outcome.split(":")[0] for e in world.google.sts.exchanges[-2:]] == ["ok", "unauthorized_client"]


def test_a_grant_pinning_another_kms_key_is_refused_before_sts(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    other = acme.kms_key.rsplit("/", 1)[0] + "/someone-elses-key"
    world.google.kms.create_key(other)
    exchanges = len(world.google.sts.exchanges)
    run = run_job(world, make_notebook, [acme.granted(kms_key=other)], COUNT_ROWS)
    _assert_refused_before_any_cell(run, "not wrapped by the Cloud KMS key the grant pins")
    assert len(world.google.sts.exchanges) == exchanges
    assert not [r for r in run.tee.requests if r["audience"] == contract.KEY_RELEASE_AUDIENCE]


def test_a_launch_attesting_other_dataset_versions_than_its_grant_is_refused(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    """Providers' pool conditions pin their versions on the attested DCR_DATASETS: a launcher that sets it
    to what a condition wants while the grant names something else gets nothing: the supervisor refuses
    before any token is asked for a key."""
    g = acme.granted()
    claimed = contract.datasets_env_value([(g.provider, g.dataset, "sha256:" + "7" * 64)])
    run = run_job(world, make_notebook, [g], COUNT_ROWS, override={contract.ENV.DATASETS: claimed})
    _assert_refused_before_any_cell(run, "DCR_DATASETS")
    assert not [r for r in run.tee.requests if r["audience"] == contract.KEY_RELEASE_AUDIENCE]


def test_under_review_the_outputs_are_sealed_to_the_airlock_and_no_cell_is_reported(
    world: World, acme: Provider, make_notebook: Any, tmp_path: Path
) -> None:
    airlock_private, airlock_public = generate_keypair()
    quantum = 12.0  # longer than the job itself takes here
    run = run_job(
        world,
        make_notebook,
        [acme.granted("review")],
        COUNT_ROWS,
        airlock_public=airlock_public,
        quantum=quantum,
    )
    assert run.rc == 0, (run.objects.get(contract.FAILURE_FILE), run.stderr[-3000:])
    # Its end (the objects' appearance, the process's exit) waited for the quantum, and the receipt's end
    # time is rounded to it.
    assert run.elapsed >= quantum
    times = json.loads(run.objects[contract.RECEIPT_FILE])
    span = _seconds(times["finished_at"]) - _seconds(times["started_at"])
    assert span in (quantum, quantum + 1)  # whole seconds, each truncated
    assert set(run.objects) == {
        contract.RECEIPT_FILE,
        contract.TOKEN_FILE,
        contract.SIGNER_JWKS_FILE,
        contract.SEALED_OUTPUTS_FILE,
        contract.SEALED_REVEAL_FILE,
    }
    receipt = json.loads(run.objects[contract.RECEIPT_FILE])
    assert receipt["release"]["decision"] == "held" and receipt["outputs"] == []
    # The researcher learns the states only: no cell, no "checking" (their times would time the notebook).
    assert run.states == ["launching", "running"] and run.cells == []
    sealed = tmp_path / "held.sealed"
    sealed.write_bytes(run.objects[contract.SEALED_OUTPUTS_FILE])
    with pytest.raises(DCRError):  # not to the job's own key
        open_dir(sealed, tmp_path / "mine", run.output_private, run.job_id)
    open_dir(sealed, tmp_path / "airlock", airlock_private, run.job_id)
    assert (tmp_path / "airlock" / "results" / "summary.csv").is_file()


def test_a_failing_cell_reports_its_index_and_type_and_seals_the_detail(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    _, airlock_public = generate_keypair()
    cells = ["x = 1", "raise ValueError('row 17 of the real data says ' + str(x))"]
    run = run_job(world, make_notebook, [acme.granted()], cells, airlock_public=airlock_public)
    assert run.rc == 1
    assert set(run.objects) == {contract.FAILURE_FILE, contract.SEALED_FAILURE_FILE}
    failure = run.failure()
    assert (failure["cell"], failure["ename"]) == (1, "ValueError")
    assert b"row 17" not in run.objects[contract.FAILURE_FILE]
    assert run.states == ["launching", "running"] and run.cells == [0, 1]
    assert run.progress[-1] == {"kind": "failed", **failure}


def test_without_the_kms_binding_the_key_is_refused_with_a_clear_reason(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    world.google.kms.revoke_decrypt(acme.kms_key)
    run = run_job(world, make_notebook, [acme.granted()], COUNT_ROWS)
    _assert_refused_before_any_cell(run, "Cloud KMS denied decrypt")
    assert world.google.sts.exchanges[-1].outcome == "ok"


def test_a_data_key_that_fails_its_crc32c_is_refused(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    world.google.kms.corrupt_plaintext_crc = True
    try:
        run = run_job(world, make_notebook, [acme.granted()], COUNT_ROWS)
    finally:
        world.google.kms.corrupt_plaintext_crc = False
    _assert_refused_before_any_cell(run, "the data key from Cloud KMS failed its CRC32C check")


def test_a_truncated_file_in_the_bucket_is_refused_before_any_cell(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    """Storage is untrusted: the copy onto the tmpfs is checked against the manifest (whose file list the
    released key authenticates) before anything is decrypted."""
    store = contract.parse_gs_uri(acme.store)
    bucket = world.google.storage.client().bucket(store.bucket)
    prefix = f"{store.name}acme/insurance/{acme.version.removeprefix('sha256:')}/real/"
    (blob,) = list(bucket.list_blobs(prefix=prefix))
    data = blob.download_as_bytes()
    bucket.blob(blob.name).upload_from_string(data[: len(data) // 2])
    run = run_job(world, make_notebook, [acme.granted()], COUNT_ROWS)
    _assert_refused_before_any_cell(run, "dataset acme/insurance")
    assert "real.csv" in run.failure()["reason"]


def test_a_launch_missing_a_variable_writes_nothing(world: World, acme: Provider, make_notebook: Any) -> None:
    run = run_job(world, make_notebook, [acme.granted()], COUNT_ROWS, drop=(contract.ENV.GRANT,))
    assert run.rc == 1
    assert f"launch environment lacks {contract.ENV.GRANT}" in run.stderr
    assert run.objects == {} and run.progress == []


def test_a_launch_without_a_cloud_entry_in_the_grant_is_refused(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    plain = GrantedDataset(acme.name, acme.dataset, acme.version, "auto")
    run = run_job(world, make_notebook, [plain], COUNT_ROWS)
    _assert_refused_before_any_cell(run, "the grant names no Cloud KMS key")


def test_the_scratch_tmpfs_is_only_in_the_supervisors_mount_namespace(
    world: World, acme: Provider, make_notebook: Any
) -> None:
    run = run_job(world, make_notebook, [acme.granted()], ["print(1)"])
    assert run.rc == 0, (run.objects.get(contract.FAILURE_FILE), run.stderr[-3000:])
    # run_job removed the (empty) mount point: nothing was mounted on it in this namespace.
    assert not any("dcr-scratch" in line for line in Path("/proc/self/mounts").read_text().splitlines())


def test_grant_cloud_entries_are_validated_and_absent_when_unset() -> None:
    plain = GrantedDataset("acme", "insurance", "sha256:" + "a" * 64, "auto")
    assert "cloud" not in plain.to_json()
    assert GrantedDataset.from_json(plain.to_json()) == plain
    good = {
        "store": "gs://bucket/prefix/",
        "kms_key": "projects/acme-data/locations/europe-west4/keyRings/dcr/cryptoKeys/insurance",
        "wip_provider": "projects/123/locations/global/workloadIdentityPools/acme-pool/providers/cs-prov",
    }
    cloudy = GrantedDataset.from_json({**plain.to_json(), "cloud": good})
    assert cloudy.cloud is not None and cloudy.to_json()["cloud"] == good
    for bad in (
        {**good, "store": "s3://bucket/x"},
        {**good, "store": "gs://bucket/../x"},
        {**good, "kms_key": "projects/p/keyRings/r/cryptoKeys/k"},
        {**good, "wip_provider": "projects/acme/locations/global/workloadIdentityPools/p/providers/q"},
        {**good, "extra": "x"},
        {k: v for k, v in good.items() if k != "store"},
    ):
        with pytest.raises(DCRError):
            GrantedDataset.from_json({**plain.to_json(), "cloud": bad})


def test_the_contracts_cloud_uris() -> None:
    job = "job-" + "0" * 24
    assert contract.cloud_bundle_uri("gs://jobs/hub/", job) == f"gs://jobs/hub/jobs/{job}/bundle"
    assert contract.cloud_output_uri("gs://jobs/hub", job) == f"gs://jobs/hub/jobs/{job}/result/"
    assert contract.cloud_progress_uri("gs://jobs/", job) == f"gs://jobs/jobs/{job}/progress/"
    assert contract.progress_object_name(7) == "00000007.json"
    assert len(sha256_bytes(b"x")) == 71  # a receipt nonce fits Google's 10..74 bytes


def test_tokens_keep_to_googles_nonce_limits(google: Google, tmp_path: Path) -> None:
    from dcr_enclave.cloud.gcs import Bucketed
    from dcr_enclave.cloud.link import CloudLink

    sock = tmp_path / "t.sock"
    tee = TeeServerFake(sock, google.issuer, vm_claims(image_digest=IMAGE_DIGEST, env={})).start()
    try:
        link = CloudLink(
            {contract.CLOUD_TEESERVER_SOCKET: str(sock)},
            Bucketed(google.storage.client()),
            contract.parse_gs_uri("gs://dcr-jobs/unused/"),
        )
        receipt_nonce = sha256_bytes(b"a manifest")
        token = link.token(contract.RECEIPT_AUDIENCE, [receipt_nonce])
        assert tee.requests == [
            {"audience": contract.RECEIPT_AUDIENCE, "nonces": [receipt_nonce], "token_type": "PKI"}
        ]
        assert token.count(".") == 2
        for bad in (["short"], ["x" * 75], [link.challenge()] * 7, []):
            with pytest.raises(DCRError, match="nonce"):
                link.token(contract.KEY_RELEASE_AUDIENCE, bad)
        assert len(tee.requests) == 1  # refused before the launcher was asked
        info = link.info()
        assert info["kind"] == "confidential_space" and info["image_digest"] == IMAGE_DIGEST
        assert len(info["jwks"]["keys"]) == 1  # the x5c leaf's public key
    finally:
        tee.stop()


def test_sts_verifies_the_subject_token_and_evaluates_the_condition(google: Google) -> None:
    """The STS fake through google-auth's own token exchange: PKI and OIDC tokens of the pool's issuer pass
    the condition; a token from another issuer, another audience or a failing claim does not."""
    from google.auth import exceptions as auth_exceptions
    from google.auth import identity_pool
    from google.auth.transport.requests import Request

    wip = f"projects/555000111222/locations/global/workloadIdentityPools/sts-{secrets.token_hex(3)}/providers/cs-one"
    google.sts.add_provider(
        wip, "assertion.swname == 'CONFIDENTIAL_SPACE' && assertion.secboot", google.issuer
    )
    claims = vm_claims(image_digest=IMAGE_DIGEST, env={})
    nonce = ["n" * 32]

    def exchange(token: str) -> str:
        creds = identity_pool.Credentials(
            audience="//iam.googleapis.com/" + wip,
            subject_token_type="urn:ietf:params:oauth:token-type:jwt",
            token_url=f"{google.sts.endpoint}/v1/token",
            subject_token_supplier=type("S", (), {"get_subject_token": lambda self, c, r: token})(),
            scopes=["https://www.googleapis.com/auth/cloud-platform"],
        )
        try:
            creds.refresh(Request())
        except (auth_exceptions.OAuthError, auth_exceptions.RefreshError) as e:
            return str(e)
        assert google.sts.principal_of(creds.token) == pool_principal_set(wip)
        return "ok"

    key_release = contract.KEY_RELEASE_AUDIENCE
    assert exchange(google.issuer.issue(claims, key_release, nonce, "PKI")) == "ok"
    assert exchange(google.issuer.issue(claims, key_release, nonce, "OIDC")) == "ok"
    forged = FakeAttestationIssuer("Someone else").issue(claims, key_release, nonce, "PKI")
    assert "invalid_grant" in exchange(forged)
    assert "invalid_grant" in exchange(google.issuer.issue(claims, contract.RECEIPT_AUDIENCE, nonce, "PKI"))
    insecure = {**claims, "secboot": False}
    assert "attribute condition" in exchange(google.issuer.issue(insecure, key_release, nonce, "PKI"))
