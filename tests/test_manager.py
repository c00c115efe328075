"""The job manager (dcr_server_ext.manager) in-process: submissions racing cancels, refused grants, the
reconciler, and the backends' idempotency.

The manager is built as the server builds it: the backend and the grant source are swapped in through
``c.DCRExtension.backend_class`` / ``grant_source_class`` (the classes below, checked by DCRExtension's
``Type`` traits) and made by ``make_backend()`` / ``make_grant_source()`` with the extension as their
parent, configured through their own traits. They stand in for an
enclave platform and the hub: :class:`FakePlatform` verifies real grants signed by :data:`HUB_KEY` and
hands back real receipts with outputs sealed to the job's key; :class:`HubStandIn` signs those grants,
refuses or cannot be reached as configured, and can hold a request until the test releases it (an
``asyncio.Event``), so a cancel lands exactly while the grant is requested or the job launched.

The last test drives the real :class:`~dcr_server_ext.backends.local.LocalBackend` against the real enclave
host (``host`` fixture).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
import sqlalchemy as sa
from receipt_factory import make_receipt, make_signer
from traitlets import Bool, Enum, TraitError
from traitlets.config import Config

from dcr_enclave.formats import contract
from dcr_enclave.formats.digests import sha256_bytes
from dcr_enclave.formats.grant import GrantedDataset, output_public_key_bytes, verify_grant
from dcr_enclave.formats.jwk import public_jwk, thumbprint
from dcr_enclave.formats.sealing import generate_keypair, seal_dir
from dcr_enclave.pack.bundle_builder import build_bundle
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import generate_key
from dcr_server_ext.app import DCRExtension
from dcr_server_ext.backends.base import Backend, BackendStatus
from dcr_server_ext.backends.local import LocalBackend
from dcr_server_ext.errors import Conflict, Unavailable
from dcr_server_ext.events import job_event
from dcr_server_ext.grant_sources import DevGrantSource, GrantRefused, GrantSource, HubGrantSource
from dcr_server_ext.jobstore import JobEnded, JobStore, StateBehind
from dcr_server_ext.manager import RECEIPT_FILES, JobManager
from dcr_server_ext.model import LIFECYCLE_STEP, Job

#: The stand-in hub's signing key; FakePlatform trusts it as an enclave trusts the hub key it pins.
HUB_KEY = generate_key()
HUB_JWKS = [public_jwk(HUB_KEY)]
HUB_THUMBPRINT = thumbprint(HUB_JWKS[0])
VERSION = sha256_bytes(b"acme/insurance, version 1")
NOTEBOOK = "work/analysis.ipynb"
REFUSAL = "no dataset acme/nope is available to you"
#: The executed notebook as an enclave hands it back (the submitted one is work/analysis.ipynb).
EXECUTED = nbformat.v4.new_notebook(
    cells=[
        nbformat.v4.new_markdown_cell("# Charges"),
        nbformat.v4.new_code_cell(
            "print(len(df))", outputs=[nbformat.v4.new_output("stream", name="stdout", text="1338\n")]
        ),
    ]
)
OUTPUTS = {
    "result.txt": b"rows=1338\n",
    "figures/note.txt": b"no figure\n",
    "analysis.ipynb": nbformat.writes(EXECUTED).encode(),
}


# ---------------------------------------------------------------------------------------------------------
# The parts swapped in
# ---------------------------------------------------------------------------------------------------------


class HubStandIn(GrantSource):
    """Grants as the hub's grant service would sign them for an entitled user; or a refusal (the hub's 403),
    or an unreachable hub, as configured. With ``gated``, each request waits until ``release`` is set."""

    outcome = Enum(["grant", "refuse", "unreachable"], default_value="grant").tag(config=True)
    gated = Bool(False).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.asked: list[str] = []

    async def request(
        self,
        *,
        job_id: str,
        bundle_digest: str,
        datasets: list[tuple[str, str]],
        output_public_key: bytes,
    ) -> str:
        self.asked.append(job_id)
        if self.gated:
            self.entered.set()
            await self.release.wait()
        if self.outcome == "refuse":
            raise GrantRefused(REFUSAL)
        if self.outcome == "unreachable":
            raise Unavailable("the grant from the hub cannot be reached (ConnectionRefusedError)")
        return issue_grant(
            HUB_KEY,
            user="alice",
            job_id=job_id,
            bundle_digest=bundle_digest,
            datasets=[GrantedDataset(p, d, VERSION, "auto") for p, d in datasets or [("acme", "insurance")]],
            output_public_key=output_public_key,
        )


class FakePlatform(Backend):
    """An enclave platform in memory. Launch verifies the grant against the hub key and is idempotent by
    grant id; jobs run until the test or a cancel ends them; a finished job's result is a real receipt
    with the outputs sealed to the key named in the grant. ``down`` makes every call unavailable; with
    ``gated_launch`` a launch waits until ``release`` is set."""

    gated_launch = Bool(False).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.down = False
        #: platform job id -> state; grant id -> platform job id; job id -> output public key.
        self.jobs: dict[str, str] = {}
        self.by_grant: dict[str, str] = {}
        self.seal_to: dict[str, bytes] = {}
        #: Every call, as (method, job id).
        self.calls: list[tuple[str, str]] = []
        #: job id -> the reports its progress stream yields, in order (see ``feed``).
        self.streams: dict[str, asyncio.Queue[BackendStatus | None]] = {}

    def _call(self, method: str, job: Job) -> None:
        self.calls.append((method, job.id))
        if self.down:
            raise Unavailable("the enclave platform cannot be reached")

    def called(self, method: str) -> list[str]:
        return [job_id for m, job_id in self.calls if m == method]

    async def launch(self, job: Job, grant: str, bundle: Path) -> dict[str, Any]:
        self._call("launch", job)
        if self.gated_launch:
            self.entered.set()
            await self.release.wait()
        g = verify_grant(grant, HUB_JWKS, hub_key_thumbprint=HUB_THUMBPRINT, job_id=job.id)
        assert bundle.is_file()
        if g.grant_id not in self.by_grant:
            self.by_grant[g.grant_id] = job.id
            self.jobs[job.id] = "running"
            self.seal_to[job.id] = output_public_key_bytes(g)
        return {"platform_job": self.by_grant[g.grant_id]}

    async def status(self, job: Job) -> BackendStatus | None:
        self._call("status", job)
        state = self.jobs.get(job.backend_ref.get("platform_job", ""))
        return BackendStatus(state=state, enclave={"kind": "local", "simulated": True}) if state else None

    def feed(self, job_id: str, *reports: BackendStatus | None) -> None:
        """Queue reports on the job's progress stream (``None`` ends the stream)."""
        for r in reports:
            self.streams.setdefault(job_id, asyncio.Queue()).put_nowait(r)

    async def progress(self, job: Job) -> AsyncIterator[BackendStatus]:
        self._call("progress", job)
        # Silent unless a test feeds it: most tests move jobs through cancel and the reconciler.
        queue = self.streams.setdefault(job.id, asyncio.Queue())
        while (report := await queue.get()) is not None:
            yield report

    async def cancel(self, job: Job) -> None:
        self._call("cancel", job)
        ref = job.backend_ref["platform_job"]
        if self.jobs[ref] not in contract.TERMINAL_STATES:  # a finished job is left as it is
            self.jobs[ref] = "cancelled"

    async def collect(self, job: Job, dest: Path) -> list[str]:
        self._call("collect", job)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            receipt = make_receipt(Path(scratch), make_signer(), outputs=OUTPUTS)
            for name in RECEIPT_FILES:
                shutil.copyfile(receipt.dir / name, dest / name)
            sealed = dest / contract.SEALED_OUTPUTS_FILE
            seal_dir(receipt.outputs_dir, sealed, self.seal_to[job.id], job.id)
        return sorted(p.name for p in dest.iterdir())

    async def cleanup(self, job: Job) -> None:
        self._call("cleanup", job)


@dataclass
class Rig:
    manager: JobManager
    backend: FakePlatform
    grants: HubStandIn
    store: JobStore
    root: Path
    data: Path
    events: list[dict[str, Any]]

    def states(self, job_id: str) -> list[str]:
        """The states of the job's events, in order."""
        return [e["state"] for e in self.events if e["job_id"] == job_id]

    def leftovers(self) -> tuple[list[str], list[str]]:
        """The job directories and key files in the extension's data directory."""
        return sorted(os.listdir(self.data / "jobs")), sorted(os.listdir(self.data / "keys"))


@pytest.fixture
def make_rig(tmp_path: Path, jp_asyncio_loop: asyncio.AbstractEventLoop) -> Iterator[Callable[..., Rig]]:
    """``make_rig(**config)``: a manager built as the server builds it, with FakePlatform and HubStandIn
    swapped in through the extension's config; ``config`` adds sections (``{"HubStandIn": {"gated": True}}``)."""
    made: list[Rig] = []

    def make(**sections: dict[str, Any]) -> Rig:
        config = Config(
            {
                "DCRExtension": {"backend_class": FakePlatform, "grant_source_class": HubStandIn},
                **sections,
            }
        )
        app = DCRExtension(config=config)
        backend, grants = app.make_backend(), app.make_grant_source()
        assert isinstance(backend, FakePlatform) and isinstance(grants, HubStandIn)
        root, data = tmp_path / "root", tmp_path / "dcr-data"
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            nbformat.v4.new_code_cell("import pandas as pd\npd.read_csv('/data/acme/insurance/real.csv')")
        ]
        (root / NOTEBOOK).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, root / NOTEBOOK)
        store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
        events: list[dict[str, Any]] = []
        manager = JobManager(
            root_dir=root,
            data_dir=data,
            store=store,
            backend=backend,
            grants=grants,
            emit=lambda job: events.append(job_event(job)),
            log=logging.getLogger("test_manager"),
        )
        rig = Rig(manager, backend, grants, store, root, data, events)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        jp_asyncio_loop.run_until_complete(rig.manager.stop())
        rig.store.close()


# ---------------------------------------------------------------------------------------------------------
# Swapping the backend and the grant source through configuration
# ---------------------------------------------------------------------------------------------------------


def test_defaults_are_the_local_backend_and_the_development_grant_source():
    """Without configuration the extension makes the local enclave host's backend and the development grant
    source, each a fresh instance with the extension as its parent."""
    app = DCRExtension()
    assert app.backend_class is LocalBackend and app.grant_source_class is DevGrantSource
    backend, grants = app.make_backend(), app.make_grant_source()
    assert type(backend) is LocalBackend and type(grants) is DevGrantSource
    assert backend.parent is app and grants.parent is app
    assert app.make_backend() is not backend


def test_a_server_started_by_a_hub_asks_the_hub_for_grants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under JupyterHub (``JUPYTERHUB_API_URL`` set) the default grant source is the hub's grant service,
    never the development key; an explicit setting still wins."""
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")
    assert DCRExtension().grant_source_class is HubGrantSource
    assert DCRExtension(grant_source_class=DevGrantSource).grant_source_class is DevGrantSource


@pytest.mark.parametrize(
    ("backend", "grant_source"),
    [
        pytest.param(FakePlatform, HubStandIn, id="classes"),
        pytest.param(f"{__name__}.FakePlatform", f"{__name__}.HubStandIn", id="dotted-paths"),
    ],
)
def test_classes_are_swapped_through_config_and_read_their_own_traits(backend: Any, grant_source: Any):
    """c.DCRExtension.backend_class / grant_source_class take a class or its dotted path (what users write
    in jupyter_server_config.py); the instances made read their own traits from the same configuration."""
    config = Config(
        {
            "DCRExtension": {"backend_class": backend, "grant_source_class": grant_source},
            "FakePlatform": {"gated_launch": True},
            "HubStandIn": {"outcome": "refuse"},
        }
    )
    app = DCRExtension(config=config)
    made_backend, made_grants = app.make_backend(), app.make_grant_source()
    assert isinstance(made_backend, FakePlatform) and made_backend.gated_launch is True
    assert isinstance(made_grants, HubStandIn) and made_grants.outcome == "refuse"


def test_grant_sources_configured_by_their_former_module_path_still_load(caplog):
    """Configuration written before dcr_server_ext.grants became dcr_server_ext.grant_sources keeps working
    (the hub's docs and existing deployments say "dcr_server_ext.grants.HubGrantSource"); the log says
    what to write now."""
    from dcr_server_ext.grant_sources import HubGrantSource

    app = DCRExtension(
        config=Config({"DCRExtension": {"grant_source_class": "dcr_server_ext.grants.HubGrantSource"}}),
        log=logging.getLogger("test_manager.extension"),
    )
    assert app.grant_source_class is HubGrantSource
    assert isinstance(app.make_grant_source(), HubGrantSource)
    assert "renamed; write 'dcr_server_ext.grant_sources.HubGrantSource'" in caplog.text


@pytest.mark.parametrize(
    ("trait", "value", "message"),
    [
        ("backend_class", "no_such_module.Backend", "cannot be imported (ModuleNotFoundError"),
        (
            "backend_class",
            "dcr_server_ext.model.Job",
            "is not a subclass of dcr_server_ext.backends.base.Backend",
        ),
        ("backend_class", Job, "is not a subclass of dcr_server_ext.backends.base.Backend"),
        ("backend_class", HubStandIn, "is not a subclass of dcr_server_ext.backends.base.Backend"),
        ("backend_class", "", "cannot be imported"),
        ("backend_class", 42, "is not a subclass"),
        ("grant_source_class", "dcr_server_ext.grant_sources.NoSuchSource", "cannot be imported"),
        ("grant_source_class", "dcr_server_ext.grants.NoSuchSource", "cannot be imported"),
        ("grant_source_class", FakePlatform, "is not a subclass of dcr_server_ext.grant_sources.GrantSource"),
    ],
)
def test_a_class_that_is_missing_or_of_the_wrong_kind_is_refused(trait: str, value: Any, message: str):
    """An unimportable path or a class of the wrong kind is refused when the configuration is loaded, with
    a message naming the trait, what is wrong and an example of what to write."""
    with pytest.raises(TraitError) as refused:
        DCRExtension(config=Config({"DCRExtension": {trait: value}}))
    text = str(refused.value)
    assert text.startswith(f"DCRExtension.{trait} = ") and message in text, text
    assert "like 'dcr_server_ext." in text


# ---------------------------------------------------------------------------------------------------------
# A cancel racing the submission
# ---------------------------------------------------------------------------------------------------------


async def test_the_executed_notebook_opens_under_its_own_name_with_a_banner(make_rig):
    """A finished job's folder holds, beside the receipt and outputs/ (exactly the enclave's bytes, so `dcr
    verify` is undisturbed), ``analysis.enclave-<8 hex of the job id>.ipynb``: a valid notebook whose first
    cell says it ran on the real data in the enclave, names the job and links the receipt, followed by the
    executed cells unchanged, with ``metadata.dcr`` naming the job."""
    rig = make_rig()
    job = await rig.manager.submit(NOTEBOOK)
    rig.backend.jobs[job.id] = "succeeded"
    await rig.manager.stop()  # nobody follows the job: the reconciler finds it finished and opens it
    await rig.manager.reconcile()
    done = rig.manager.get(job.id)
    assert done.state == "succeeded"
    folder = rig.root / done.outputs_path
    name = f"analysis.enclave-{job.id[4:12]}.ipynb"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*RECEIPT_FILES, contract.OUTPUTS_DIR, name])
    outputs = folder / contract.OUTPUTS_DIR
    assert {p.relative_to(outputs).as_posix(): p.read_bytes() for p in outputs.rglob("*") if p.is_file()} == (
        OUTPUTS
    )
    marked = nbformat.reads((folder / name).read_text(), as_version=4)
    nbformat.validate(marked)
    banner, *cells = marked.cells
    assert banner.cell_type == "markdown" and banner.metadata == {"dcr": {"banner": True}}
    assert "Executed in the enclave on the real data" in banner.source and job.id in banner.source
    assert "[receipt.json](receipt.json)" in banner.source
    assert f"dcr verify dcr-jobs/{job.id}" in banner.source
    assert cells == EXECUTED.cells
    assert marked.metadata["dcr"] == {
        "job_id": job.id,
        "executed_in_enclave": True,
        "original": "outputs/analysis.ipynb",
    }


def test_no_marked_copy_without_an_executed_notebook(tmp_path: Path):
    """Outputs without the notebook (the run deleted it) or with one that is not JSON get no marked copy,
    and nothing is written."""
    from dcr_server_ext.executed import write_marked_copy

    job_id = "job-" + "ab" * 12
    (tmp_path / "outputs").mkdir()
    assert write_marked_copy(tmp_path, "work/analysis.ipynb", job_id, "dcr-jobs/x") is None
    (tmp_path / "outputs" / "analysis.ipynb").write_text("not json")
    assert write_marked_copy(tmp_path, "work/analysis.ipynb", job_id, "dcr-jobs/x") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


async def test_cancel_while_the_grant_is_requested_never_launches(make_rig):
    """A job cancelled while its grant request is still out is stored cancelled at once; when the grant
    then arrives the submission answers with the cancelled job and launches nothing, then or later (a
    reconciler pass after it leaves it alone). The only event is the cancel: the job was never announced
    as submitted."""
    rig = make_rig(HubStandIn={"gated": True})
    submission = asyncio.ensure_future(rig.manager.submit(NOTEBOOK))
    await rig.grants.entered.wait()
    (job_id,) = rig.grants.asked
    assert rig.manager.get(job_id).state == "submitted"

    cancelled = await rig.manager.cancel(job_id)
    assert cancelled.state == "cancelled"
    rig.grants.release.set()
    answered = await submission

    assert answered.id == job_id and answered.state == "cancelled"
    await rig.manager.reconcile()
    assert rig.manager.get(job_id).state == "cancelled"
    assert rig.backend.calls == []  # no launch, no cancel: there was nothing to stop
    assert rig.states(job_id) == ["cancelled"]
    assert not (rig.data / "jobs" / job_id / "grant.jwt").exists()


async def test_cancel_while_the_grant_is_requested_keeps_the_job_even_if_then_refused(make_rig):
    """A job cancelled while its grant request is out and then refused stays as the user saw it end,
    cancelled (its record is not removed behind their back); nothing is launched."""
    rig = make_rig(HubStandIn={"gated": True, "outcome": "refuse"})
    submission = asyncio.ensure_future(rig.manager.submit(NOTEBOOK))
    await rig.grants.entered.wait()
    (job_id,) = rig.grants.asked
    await rig.manager.cancel(job_id)
    rig.grants.release.set()

    assert (await submission).state == "cancelled"
    assert rig.manager.get(job_id).state == "cancelled"
    assert rig.backend.calls == []
    assert rig.states(job_id) == ["cancelled"]


async def test_cancel_while_the_backend_launches_stops_what_was_launched(make_rig):
    """A job cancelled while the backend is launching it stays cancelled: once the launch returns, the
    manager records where it ran and cancels it on the platform, and never follows it."""
    rig = make_rig(FakePlatform={"gated_launch": True})
    submission = asyncio.ensure_future(rig.manager.submit(NOTEBOOK))
    await rig.backend.entered.wait()
    (job_id,) = rig.grants.asked
    assert rig.manager.get(job_id).state == "launching"

    assert (await rig.manager.cancel(job_id)).state == "cancelled"
    assert rig.backend.called("cancel") == []  # no launch record yet: nothing to ask the platform
    rig.backend.release.set()
    answered = await submission

    assert answered.state == "cancelled"
    job = rig.manager.get(job_id)
    assert job.state == "cancelled" and job.backend_ref == {"platform_job": job_id}
    assert rig.backend.called("launch") == [job_id]
    assert rig.backend.called("cancel") == [job_id]
    assert rig.backend.jobs[job_id] == "cancelled"
    assert rig.backend.called("progress") == []
    await rig.manager.reconcile()
    assert rig.manager.get(job_id).state == "cancelled"
    assert rig.states(job_id) == ["submitted", "granted", "launching", "cancelled"]


async def test_cancel_of_a_job_that_ended_first_keeps_its_result(make_rig):
    """When the platform reports that the job had already succeeded when the cancel reached it, the
    platform's truth wins: the result is collected and the outputs opened in the user's files, the job
    is succeeded, and the cancel is refused (409) saying so. A second cancel is a plain 409."""
    rig = make_rig()
    job = await rig.manager.submit(NOTEBOOK)
    assert job.state == "launching" and job.backend_ref == {"platform_job": job.id}
    rig.backend.jobs[job.id] = "succeeded"  # finished; the progress stream has not said so yet

    with pytest.raises(Conflict, match=r"had already ended \(succeeded\).*result is kept") as refused:
        await rig.manager.cancel(job.id)
    assert refused.value.status == 409

    done = rig.manager.get(job.id)
    assert done.state == "succeeded" and done.receipt is True
    assert done.outputs_path == f"dcr-jobs/{job.id}"
    outputs = rig.root / done.outputs_path / contract.OUTPUTS_DIR
    for name, data in OUTPUTS.items():
        assert (outputs / name).read_bytes() == data
    assert rig.backend.jobs[job.id] == "succeeded"
    assert rig.states(job.id)[-1] == "succeeded" and "cancelled" not in rig.states(job.id)
    with pytest.raises(Conflict, match=r"has already ended \(succeeded\)"):
        await rig.manager.cancel(job.id)


async def test_cancel_of_a_running_job_cancels_it_on_the_platform(make_rig):
    """The ordinary cancel: the platform stops the job, the job is stored cancelled and its event sent."""
    rig = make_rig()
    job = await rig.manager.submit(NOTEBOOK)
    assert (await rig.manager.cancel(job.id)).state == "cancelled"
    assert rig.backend.jobs[job.id] == "cancelled"
    assert rig.backend.called("cancel") == [job.id]
    assert rig.states(job.id)[-1] == "cancelled"


# ---------------------------------------------------------------------------------------------------------
# Grant refusals and an unreachable grant service
# ---------------------------------------------------------------------------------------------------------


async def test_refused_grant_leaves_nothing(make_rig):
    """A grant the hub refuses (403) is passed on with its message, and the submission leaves nothing: no
    job record, no job directory (bundle), no key, and no event."""
    rig = make_rig(HubStandIn={"outcome": "refuse"})
    with pytest.raises(GrantRefused, match=REFUSAL) as refused:
        await rig.manager.submit(NOTEBOOK, ["acme/nope"])
    assert refused.value.status == 403
    assert rig.grants.asked  # the hub was asked
    assert rig.store.count() == 0
    assert rig.leftovers() == ([], [])
    assert rig.events == []
    assert rig.backend.calls == []


async def test_unreachable_grant_service_keeps_the_job_failed(make_rig):
    """A grant service that cannot be reached answers 503, and the job stays, failed with the reason (the
    hub may have recorded it before the answer was lost); its one event is the failure."""
    rig = make_rig(HubStandIn={"outcome": "unreachable"})
    with pytest.raises(Unavailable, match="cannot be reached") as unavailable:
        await rig.manager.submit(NOTEBOOK)
    assert unavailable.value.status == 503
    (job_id,) = rig.grants.asked
    job = rig.manager.get(job_id)
    assert job.state == "failed" and "cannot be reached" in job.failure["reason"]
    assert rig.states(job_id) == ["failed"]
    assert rig.backend.calls == []


async def test_job_key_is_owner_only_whatever_the_umask(make_rig):
    """After a submit, the job's private key file is 0600 in a 0700 directory, and its job directory is
    0700, even under a umask that would leave new files open to everyone."""
    old = os.umask(0)
    try:
        rig = make_rig()
        job = await rig.manager.submit(NOTEBOOK)
    finally:
        os.umask(old)
    key = rig.data / "keys" / f"{job.id}.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((rig.data / "jobs" / job.id).stat().st_mode) == 0o700
    assert len(key.read_bytes()) == 32


# ---------------------------------------------------------------------------------------------------------
# The reconciler
# ---------------------------------------------------------------------------------------------------------


async def test_reconciler_fails_a_job_whose_enclave_vanished(make_rig):
    """A launched job its platform no longer knows (status is None) is failed by the reconciler with a
    reason saying the enclave vanished, and the failure is announced with that reason."""
    rig = make_rig()
    job = await rig.manager.submit(NOTEBOOK)
    await rig.manager.stop()  # as after a server restart: nobody follows the job
    del rig.backend.jobs[job.id]

    await rig.manager.reconcile()
    failed = rig.manager.get(job.id)
    assert failed.state == "failed"
    assert "vanished" in failed.failure["reason"]
    assert rig.events[-1] == job_event(failed) and "vanished" in rig.events[-1]["reason"]


@pytest.mark.parametrize("stored", ["granted", "launching"])
async def test_reconciler_launches_a_granted_job_once(make_rig, stored: str):
    """A granted job with no launch record (its launch could not reach the backend, or the server stopped
    between storing the grant and launching) keeps its grant file; the reconciler launches it from the
    stored grant once the backend answers, and later passes do not launch it again."""
    rig = make_rig()
    rig.backend.down = True
    job = await rig.manager.submit(NOTEBOOK)
    assert job.state == "launching" and job.backend_ref == {}
    if stored == "granted":  # as a server that stopped right after storing the grant leaves it
        # Written behind the store's back: its API never moves a job back (test_states_only_move_forward).
        with sa.create_engine(f"sqlite:///{rig.data.parent / 'jobs.sqlite'}").begin() as conn:
            conn.execute(sa.text("UPDATE dcr_jobs SET state = 'granted' WHERE id = :id"), {"id": job.id})
        job = rig.manager.get(job.id)
        assert job.state == "granted"
    assert (rig.data / "jobs" / job.id / "grant.jwt").is_file()
    assert rig.backend.jobs == {}

    await rig.manager.reconcile()  # still down: nothing changes
    assert rig.manager.get(job.id).backend_ref == {}
    rig.backend.down = False
    await rig.manager.reconcile()
    launched = rig.manager.get(job.id)
    assert launched.backend_ref == {"platform_job": job.id}
    assert rig.backend.jobs == {job.id: "running"}
    await rig.manager.stop()  # a later pass without a watcher asks the platform, it does not relaunch
    await rig.manager.reconcile()
    await rig.manager.reconcile()
    assert len(rig.backend.by_grant) == 1
    assert rig.backend.called("launch") == [job.id] * 3  # twice refused while down, once launched
    assert rig.manager.get(job.id).backend_ref == launched.backend_ref


# ---------------------------------------------------------------------------------------------------------
# States only move forward, whatever the platform reports
# ---------------------------------------------------------------------------------------------------------


def _report(state: str, cell: int | None = None, cells: int | None = None) -> BackendStatus:
    return BackendStatus(state=state, cell=cell, cells=cells, enclave={"kind": "local", "simulated": True})


async def _until(rig: Rig, job_id: str, done: Callable[[Job], bool]) -> Job:
    """Wait until the stored job satisfies ``done`` (the bound only guards against a hang)."""
    for _ in range(2000):
        job = rig.manager.get(job_id)
        if done(job):
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"the job never got there: {rig.manager.get(job_id)}")


async def _until_announced(rig: Rig, job_id: str, **fields: Any) -> None:
    """Wait until an event of the job with ``fields`` has been emitted (a change is stored, on the store's
    thread, before it is emitted)."""
    for _ in range(2000):
        if any(e["job_id"] == job_id and fields.items() <= e.items() for e in rig.events):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{fields} was never announced: {rig.events}")


def _steps(states: list[str]) -> list[int]:
    return [LIFECYCLE_STEP[s] for s in states]


def _dedup(items: list[Any]) -> list[Any]:
    return [x for i, x in enumerate(items) if i == 0 or items[i - 1] != x]


async def test_states_only_move_forward_whatever_the_platform_reports(make_rig):
    """The platform's progress stream opens with a stale snapshot (``granted`` while the job is stored
    ``launching``), then repeats, replays and reorders states and cells: the stored job and the emitted
    events only ever move forward, through each state once, and cells only count up."""
    rig = make_rig()
    job = await rig.manager.submit(NOTEBOOK)
    assert job.state == "launching"
    stored: list[tuple[str, int | None]] = []
    rig.manager.emit = lambda j: (rig.events.append(job_event(j)), stored.append((j.state, j.cell)))
    rig.backend.feed(
        job.id,
        _report("granted"),  # the snapshot the host's stream opens with, taken before its launch
        _report("launching"),
        _report("running"),
        _report("running", 0, 3),
        _report("launching"),  # replayed
        _report("running", 2, 3),
        _report("running", 1, 3),  # late
        _report("running", 0, 3),  # replayed
        _report("granted"),
        _report("checking", 2, 3),
        _report("running", 2, 3),  # reordered
        _report("checking", 2, 3),  # repeated
        _report("launching"),
    )
    after = await _until(rig, job.id, lambda j: j.state == "checking")
    rig.backend.jobs[job.id] = "succeeded"
    rig.backend.feed(job.id, _report("running", 1, 3), _report("succeeded", 2, 3), _report("running"), None)
    done = await _until(rig, job.id, lambda j: j.terminal)
    await _until_announced(rig, job.id, state="succeeded")
    assert (after.cell, after.cells) == (2, 3)
    assert done.state == "succeeded" and done.receipt
    states = rig.states(job.id)
    assert _steps(states) == sorted(_steps(states)), states
    assert _dedup(states) == ["submitted", "granted", "launching", "running", "checking", "succeeded"]
    cells = [c for s, c in stored if c is not None]
    assert cells == sorted(cells) and _dedup(cells) == [0, 2], stored


async def test_a_restarted_watch_replaying_the_history_moves_nothing_back(make_rig):
    """After a server restart the platform's stream replays the job's whole history (``launching``,
    ``running``, every cell) before anything new: the running job stays running at its cell, and no event
    is emitted until something newer arrives; the job then ends as the platform says."""
    rig = make_rig()
    job = await rig.manager.submit(NOTEBOOK)
    rig.backend.feed(job.id, _report("launching"), _report("running"), _report("running", 0, 2))
    await _until_announced(rig, job.id, cell=0)
    rig.backend.feed(job.id, _report("running", 1, 2))
    await _until_announced(rig, job.id, cell=1)
    await rig.manager.stop()  # the server stops; the job runs on
    rig.backend.streams.pop(job.id)
    seen = len(rig.events)

    # The restarted server: the reconciler asks the platform (running) and watches again.
    rig.backend.feed(
        job.id,
        _report("running", 1, 2),  # the snapshot
        _report("granted"),
        _report("launching"),
        _report("running"),
        _report("running", 0, 2),
        _report("running", 1, 2),
    )
    await rig.manager.reconcile()
    for _ in range(50):  # let the replay drain
        await asyncio.sleep(0.01)
    assert rig.backend.streams[job.id].empty()
    job = rig.manager.get(job.id)
    assert (job.state, job.cell, job.cells) == ("running", 1, 2)
    assert rig.events[seen:] == []
    rig.backend.jobs[job.id] = "succeeded"
    rig.backend.feed(job.id, _report("checking", 1, 2), _report("succeeded", 1, 2), None)
    await _until(rig, job.id, lambda j: j.terminal)
    await _until_announced(rig, job.id, state="succeeded")
    assert _dedup(rig.states(job.id)[seen:]) == ["checking", "succeeded"]


def test_the_store_refuses_to_move_a_job_back(tmp_path: Path):
    """The job store keeps the order itself (one statement, no window for a racing writer): an earlier
    state is refused with StateBehind and nothing changes; the same state, a later one and a terminal
    one from any unfinished state are taken; an ended job's state is final (JobEnded)."""
    with JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}") as store:
        store.create(Job(id="job-" + "1" * 24, notebook="a.ipynb"))
        job_id = "job-" + "1" * 24
        store.update(job_id, state="running", cell=1, cells=3)
        for earlier in ("submitted", "granted", "launching"):
            with pytest.raises(StateBehind, match=f"already running; it cannot go back to '{earlier}'"):
                store.update(job_id, state=earlier, cell=0)
        job = store.get(job_id)
        assert job is not None and (job.state, job.cell) == ("running", 1)
        assert store.update(job_id, state="running").state == "running"
        assert store.update(job_id, state="held").state == "held"
        with pytest.raises(StateBehind):
            store.update(job_id, state="checking")
        assert store.update(job_id, state="released").state == "released"
        with pytest.raises(JobEnded):
            store.update(job_id, state="failed")


# ---------------------------------------------------------------------------------------------------------
# The local backend against the real enclave host
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.slow
async def test_local_backend_calls_are_idempotent(host, store, make_notebook, tmp_path: Path):
    """LocalBackend against the enclave host: launching the same grant twice gives the same job (one
    enclave), cancelling twice and cleaning up twice do not fail, and a launch of that grant after the
    cancel starts nothing new."""
    notebook = make_notebook(["import time\ntime.sleep(600)"])
    bundle = tmp_path / "bundle.tar"
    manifest = build_bundle(notebook, bundle)
    job = Job(id=contract.new_job_id(), notebook=notebook.name, bundle_digest=manifest.digest)
    config = Config(
        {
            "LocalBackend": {"socket_path": str(host.socket)},
            "DevGrantSource": {"key_file": str(store.hub_key_path), "store": str(store.root)},
        }
    )
    backend = LocalBackend(config=config)
    _private, public = generate_keypair()
    grant = await DevGrantSource(config=config).request(
        job_id=job.id,
        bundle_digest=manifest.digest,
        datasets=[(store.provider, store.dataset)],
        output_public_key=public,
    )

    first = await backend.launch(job, grant, bundle)
    second = await backend.launch(job, grant, bundle)
    assert first == second == {"host_job": job.id, "socket": str(host.socket)}
    assert [j["job_id"] for j in host.client.jobs()] == [job.id]
    job.backend_ref = first
    # Cancel a running enclave (the host starts the supervisor in a thread after the launch answers).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120  # a guard against a hang only
    while (status := await backend.status(job)) is not None and status.state != "running":
        assert loop.time() < deadline and status.state not in contract.TERMINAL_STATES, status
        await asyncio.sleep(0.05)
    supervisor = host.host.jobs[job.id].proc
    assert supervisor is not None

    await backend.cancel(job)
    await backend.cancel(job)
    status = await backend.status(job)
    assert status is not None and status.state == "cancelled"
    assert supervisor.poll() is not None
    await backend.cleanup(job)
    await backend.cleanup(job)
    assert await backend.launch(job, grant, bundle) == first
    status = await backend.status(job)
    assert status is not None and status.state == "cancelled"
    assert [j["job_id"] for j in host.client.jobs()] == [job.id]
