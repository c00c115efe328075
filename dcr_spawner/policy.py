"""The DCR policy: what the hub admin declares in ``jupyterhub_config.py``, and what follows from it.

:class:`DCRPolicy` holds the datasets the hub offers (each a ``provider/dataset`` at one content-addressed
version in a dataset store), who is entitled to each (hub users and JupyterHub groups), the release mode,
the output limits, quotas, time and memory limits, where the hub's keys are and where its records go. The
trait help texts are the reference documentation (``docs/hub.md`` has a complete example).

The policy is validated twice: the shape of each trait when it is set (``@validate``), and everything that
needs the outside world -- the store, the dataset versions and their synthetic files, the hub's groups --
by :meth:`DCRPolicy.validate_against_hub`, which the start hook (:mod:`dcr_spawner.hub_start`) runs while
the hub starts, before it serves. Every refusal names the provider, the dataset and the trait.
"""

from __future__ import annotations

import html
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from jupyterhub.traitlets import ByteSpecification
from traitlets import Bool, Dict, Integer, TraitError, Type, Unicode, validate
from traitlets.config import LoggingConfigurable

from dcr_enclave.formats import contract
from dcr_enclave.formats.dataset import DatasetVersion, Protection
from dcr_enclave.formats.digests import DIGEST_RE
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import (
    CLOUD_KEYS,
    RELEASE_MODES,
    CloudDataset,
    DisclosureRules,
    OutputLimits,
)
from dcr_enclave.pack.store import Store

_DATASET_KEYS: Final = frozenset(
    {
        "version",
        "store",
        "release",
        "entitled",
        "synthetic",
        "description",
        "fidelity_report",
        "disclosure",
        "cloud",
    }
)
_ENTITLED_KEYS: Final = frozenset({"users", "groups"})
_PROVIDER_KEYS: Final = frozenset({"name", "reviewers"})
DEFAULT_QUOTAS: Final = {
    "concurrent_jobs_per_user": 2,
    "jobs_per_day_per_user": 20,
    "jobs_per_day_per_dataset": 200,
    "grant_requests_per_minute": 30,
}
_OUTPUT_LIMIT_KEYS: Final = frozenset({"max_files", "max_bytes", "allowed_suffixes"})
MIN_TIME_LIMIT: Final = 60
MAX_TIME_LIMIT: Final = 7 * 86400
MIN_MEMORY: Final = 64 * 2**20

# What `dcr provider add --report DIR [--report-epsilon E]` writes (dcr_provider.fidelity; not imported: the
# hub does not need the synthesis libraries). Every report file names its audience.
REPORT_SCHEMA: Final = "dcr/fidelity-report/v1"
REPORT_FOR_RESEARCHERS: Final = "researchers"
REPORT_PROVIDER_ONLY: Final = "provider-only"
MAX_REPORT_BYTES: Final = 32 * 2**20
_REPORT_TITLE = re.compile(rb"<title>DCR fidelity report: (?P<file>[^<]*) \((?P<audience>[^()<]*)\)</title>")
_REPORT_NOTICE = re.compile(rb"<p class='notice'>Audience: (?P<audience>[^.<]*)\.")
REPORT_MEDIA_TYPES: Final = {".html": "text/html; charset=utf-8", ".json": "application/json"}


class PolicyError(DCRError, TraitError):
    """A policy the hub must not run with; says which provider, dataset and trait."""

    def __init__(
        self,
        message: str,
        *,
        trait: str,
        ref: str | None = None,
        hint: str | None = None,
        provider: str | None = None,
    ) -> None:
        where = f"c.DCRPolicy.{trait}"
        if ref is not None:
            provider, _, dataset = ref.partition("/")
            where = f"provider {provider!r}, dataset {dataset!r}, {where}"
        elif provider is not None:
            where = f"provider {provider!r}, {where}"
        super().__init__(f"DCR policy: {message} [{where}]", hint=hint)
        self.trait = trait
        self.ref = ref


@dataclass(frozen=True)
class Entitlement:
    """One dataset a user may see (synthetic) and run on (real, in the enclave)."""

    provider: str
    dataset: str
    version: str
    release: str
    #: File name -> absolute path of the synthetic file, shown read-only at /data/<provider>/<dataset>/<name>.
    synthetic: Mapping[str, Path]
    protection: Protection = field(default_factory=lambda: Protection("provider-file"))
    store: Path = Path("/")

    @property
    def ref(self) -> str:
        return f"{self.provider}/{self.dataset}"

    def data_paths(self) -> dict[str, Path]:
        """Sandbox path (``/data/<provider>/<dataset>/<name>``) -> synthetic file on the hub machine."""
        return {
            contract.data_path(self.provider, self.dataset, name): path
            for name, path in self.synthetic.items()
        }


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of ``c.DCRPolicy.datasets``, shape-checked."""

    ref: str
    provider: str
    dataset: str
    version: str
    store: Path
    release: str
    users: frozenset[str]
    groups: frozenset[str]
    #: The provider snippet's ``{file name: sha256}``, checked against the manifest when given.
    synthetic: Mapping[str, str] | None = None
    #: The researcher-facing fidelity report (HTML or JSON) of the version, when the admin names one.
    fidelity_report: Path | None = None
    #: The dataset's own disclosure-check thresholds (over ``c.DCRPolicy.disclosure_checks``), if any.
    disclosure: Mapping[str, Any] | None = None
    #: ``{"store", "kms_key", "wip_provider"}`` for Confidential Space (copied into each grant), if given.
    cloud: Mapping[str, str] | None = None


@dataclass(frozen=True)
class ProviderSpec:
    """One provider: declared in ``c.DCRPolicy.providers``, or implicit in a dataset key."""

    provider: str
    #: Display name (the provider's key when none is declared).
    name: str
    #: Hub users and JupyterHub groups who may review held outputs of the provider's datasets.
    reviewer_users: frozenset[str] = frozenset()
    reviewer_groups: frozenset[str] = frozenset()
    declared: bool = False

    def may_review(self, user: str, groups: Iterable[str]) -> bool:
        return user in self.reviewer_users or bool(self.reviewer_groups & set(groups))


@dataclass(frozen=True)
class FidelityReport:
    """A researcher-facing fidelity report, read and checked (audience, dataset file)."""

    path: Path
    media_type: str
    data: bytes
    #: The dataset file the report describes.
    file: str


def _trait(ref: str, *keys: str) -> str:
    return f"datasets[{ref!r}]" + "".join(f"[{k!r}]" for k in keys)


def _name_list(value: Any, trait: str, ref: str | None = None, provider: str | None = None) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise PolicyError(
            f"must be a list of names, not {type(value).__name__}", trait=trait, ref=ref, provider=provider
        )
    names = set()
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise PolicyError(f"{v!r} is not a name", trait=trait, ref=ref, provider=provider)
        names.add(v)
    return frozenset(names)


def parse_dataset(ref: Any, spec: Any) -> DatasetSpec:
    """Check one ``datasets`` entry's shape (no file system access)."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        raise PolicyError(
            f"the key {ref!r} is not '<provider>/<dataset>'",
            trait=f"datasets[{ref!r}]",
            hint="e.g. 'acme/claims'",
        )
    provider, dataset = ref.split("/")
    for value, what in ((provider, "provider"), (dataset, "dataset")):
        try:
            contract.check_name(value, what)
        except DCRError as e:
            raise PolicyError(e.message, trait=f"datasets[{ref!r}]", ref=ref, hint=e.hint) from None
    if not isinstance(spec, Mapping):
        raise PolicyError("must be a dict with 'version' and 'store'", trait=_trait(ref), ref=ref)
    unknown = set(spec) - _DATASET_KEYS
    if unknown:
        raise PolicyError(
            f"unknown key(s) {sorted(unknown)}",
            trait=_trait(ref),
            ref=ref,
            hint=f"allowed keys: {', '.join(sorted(_DATASET_KEYS))}",
        )
    version = spec.get("version")
    if not isinstance(version, str) or not DIGEST_RE.match(version):
        raise PolicyError(
            f"{version!r} is not a dataset version (sha256:<64 hex>)",
            trait=_trait(ref, "version"),
            ref=ref,
            hint="copy it from the snippet `dcr provider add` printed, or from `dcr provider list`",
        )
    store = spec.get("store")
    if not isinstance(store, str | os.PathLike) or not Path(store).is_absolute():
        raise PolicyError(f"{store!r} is not an absolute path", trait=_trait(ref, "store"), ref=ref)
    release = spec.get("release", "review")
    if release not in RELEASE_MODES:
        raise PolicyError(
            f"{release!r} is not a release mode",
            trait=_trait(ref, "release"),
            ref=ref,
            hint="use 'review' or 'auto'",
        )
    entitled = spec.get("entitled", {})
    if not isinstance(entitled, Mapping) or set(entitled) - _ENTITLED_KEYS:
        raise PolicyError(
            "must be a dict with 'users' and/or 'groups' lists", trait=_trait(ref, "entitled"), ref=ref
        )
    synthetic = spec.get("synthetic")
    if synthetic is not None:
        if not isinstance(synthetic, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and DIGEST_RE.match(v) for k, v in synthetic.items()
        ):
            raise PolicyError(
                "must map each file name to its sha256 digest", trait=_trait(ref, "synthetic"), ref=ref
            )
        synthetic = dict(synthetic)
    report = spec.get("fidelity_report")
    if report is not None:
        suffix = Path(report).suffix.lower() if isinstance(report, str | os.PathLike) else ""
        if not isinstance(report, str | os.PathLike) or not Path(report).is_absolute():
            raise PolicyError(
                f"{report!r} is not an absolute path", trait=_trait(ref, "fidelity_report"), ref=ref
            )
        if suffix not in REPORT_MEDIA_TYPES:
            raise PolicyError(
                f"{str(report)!r} is not a fidelity report file (.html or .json)",
                trait=_trait(ref, "fidelity_report"),
                ref=ref,
                hint="name the <file>.fidelity-researchers.html that `dcr provider add --report-epsilon` wrote",
            )
    disclosure = spec.get("disclosure")
    if disclosure is not None:
        _disclosure_rules(disclosure, _trait(ref, "disclosure"), ref)
        disclosure = dict(disclosure)
    cloud = spec.get("cloud")
    if cloud is not None:
        cloud = _cloud_entry(cloud, ref)
    return DatasetSpec(
        ref=ref,
        provider=provider,
        dataset=dataset,
        version=version,
        store=Path(store),
        release=release,
        users=_name_list(entitled.get("users"), _trait(ref, "entitled", "users"), ref),
        groups=_name_list(entitled.get("groups"), _trait(ref, "entitled", "groups"), ref),
        synthetic=synthetic,
        fidelity_report=Path(report) if report is not None else None,
        disclosure=disclosure,
        cloud=cloud,
    )


def _cloud_entry(value: Any, ref: str) -> dict[str, str]:
    """Check a dataset's ``cloud`` entry (Confidential Space): where its encrypted version is, the Cloud KMS
    key its data key is wrapped with, and the Workload Identity pool provider whose condition releases it.
    The grant's own check (:class:`CloudDataset`), so the hub never grants what the enclave would refuse."""
    trait = _trait(ref, "cloud")
    if not isinstance(value, Mapping) or set(value) != set(CLOUD_KEYS):
        raise PolicyError(
            f"must be a dict with exactly the keys {sorted(CLOUD_KEYS)}",
            trait=trait,
            ref=ref,
            hint='e.g. {"store": "gs://acme-dcr/store/", "kms_key": "projects/acme/locations/europe-west4/'
            'keyRings/dcr/cryptoKeys/insurance", "wip_provider": "projects/123456789/locations/global/'
            'workloadIdentityPools/dcr/providers/acme"}',
        )
    for key in CLOUD_KEYS:
        if not isinstance(value[key], str):
            raise PolicyError(
                f"{value[key]!r} is not a valid {key}", trait=_trait(ref, "cloud", key), ref=ref
            )
    try:
        CloudDataset.from_json({k: value[k] for k in CLOUD_KEYS})
    except DCRError as e:
        raise PolicyError(e.message, trait=trait, ref=ref, hint=e.hint) from None
    return {k: str(value[k]) for k in sorted(CLOUD_KEYS)}


def _disclosure_rules(value: Any, trait: str, ref: str | None = None) -> DisclosureRules:
    """Check a ``disclosure`` dict (the keys of :class:`DisclosureRules`, each optional)."""
    try:
        return DisclosureRules.from_json(dict(value) if isinstance(value, Mapping) else value, "disclosure")
    except DCRError as e:
        raise PolicyError(e.message, trait=trait, ref=ref, hint=e.hint) from None


def parse_provider(provider: Any, spec: Any) -> ProviderSpec:
    """Check one ``providers`` entry's shape (no hub access)."""
    trait = f"providers[{provider!r}]"
    if not isinstance(provider, str):
        raise PolicyError(f"the key {provider!r} is not a provider name", trait=trait)
    try:
        contract.check_name(provider, "provider")
    except DCRError as e:
        raise PolicyError(e.message, trait=trait, provider=provider, hint=e.hint) from None
    if not isinstance(spec, Mapping):
        raise PolicyError("must be a dict with 'name' and/or 'reviewers'", trait=trait, provider=provider)
    unknown = set(spec) - _PROVIDER_KEYS
    if unknown:
        raise PolicyError(
            f"unknown key(s) {sorted(unknown)}",
            trait=trait,
            provider=provider,
            hint=f"allowed keys: {', '.join(sorted(_PROVIDER_KEYS))}",
        )
    name = spec.get("name", provider)
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{name!r} is not a display name", trait=f"{trait}['name']", provider=provider)
    reviewers = spec.get("reviewers", {})
    if not isinstance(reviewers, Mapping) or set(reviewers) - _ENTITLED_KEYS:
        raise PolicyError(
            "must be a dict with 'users' and/or 'groups' lists",
            trait=f"{trait}['reviewers']",
            provider=provider,
        )
    return ProviderSpec(
        provider=provider,
        name=name.strip(),
        reviewer_users=_name_list(
            reviewers.get("users"), f"{trait}['reviewers']['users']", provider=provider
        ),
        reviewer_groups=_name_list(
            reviewers.get("groups"), f"{trait}['reviewers']['groups']", provider=provider
        ),
        declared=True,
    )


def _report_marks(data: bytes, suffix: str) -> tuple[set[str], str | None]:
    """The audiences a report file declares and the dataset file it describes."""
    if suffix == ".json":
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return set(), None
        if not isinstance(doc, dict) or doc.get("schema") != REPORT_SCHEMA:
            return set(), None
        file = doc.get("file")
        return {str(doc.get("audience"))}, file if isinstance(file, str) else None
    head = data[: 64 * 1024]
    title, notice = _REPORT_TITLE.search(head), _REPORT_NOTICE.search(head)
    if title is None or notice is None:
        return set(), None
    audiences = {m.group("audience").decode(errors="replace") for m in (title, notice)}
    return audiences, html.unescape(title.group("file").decode(errors="replace"))


def read_fidelity_report(path: Path, files: Iterable[str], *, ref: str) -> FidelityReport:
    """Read and check a researcher-facing fidelity report of ``ref``; :class:`PolicyError` if unusable.

    The file must be a report ``dcr provider add`` wrote for the researchers (the provider-only one is
    computed from the real rows and must never reach them) about one of the version's ``files``.
    """
    trait = _trait(ref, "fidelity_report")
    suffix = path.suffix.lower()
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(f"the fidelity report {path} is not a regular file", trait=trait, ref=ref)
        if st.st_size > MAX_REPORT_BYTES:
            raise PolicyError(
                f"the fidelity report {path} is larger than {MAX_REPORT_BYTES} bytes", trait=trait, ref=ref
            )
        with open(path, "rb") as f:
            data = f.read(MAX_REPORT_BYTES + 1)
    except FileNotFoundError:
        raise PolicyError(f"the fidelity report {path} does not exist", trait=trait, ref=ref) from None
    except OSError as e:
        raise PolicyError(
            f"the fidelity report {path} cannot be read: {e.strerror}", trait=trait, ref=ref
        ) from None
    audiences, file = _report_marks(data, suffix)
    if REPORT_PROVIDER_ONLY in audiences:
        raise PolicyError(
            f"{path} is the provider-only fidelity report: it is computed from the real rows, is not "
            "differentially private and must never be shown to researchers",
            trait=trait,
            ref=ref,
            hint="name the researchers' report (<file>.fidelity-researchers.html, written by "
            "`dcr provider add --report DIR --report-epsilon E`), or remove the key",
        )
    if audiences != {REPORT_FOR_RESEARCHERS}:
        raise PolicyError(
            f"{path} is not a researcher-facing fidelity report of `dcr provider add` (no audience "
            f"'{REPORT_FOR_RESEARCHERS}' in it)",
            trait=trait,
            ref=ref,
            hint="name the <file>.fidelity-researchers.html or .json that --report-epsilon wrote",
        )
    names = sorted(files)
    if file not in names:
        raise PolicyError(
            f"{path} is the report of {file!r}, not of a file of this version ({', '.join(names)})",
            trait=trait,
            ref=ref,
        )
    return FidelityReport(path=path, media_type=REPORT_MEDIA_TYPES[suffix], data=data, file=file)


def _positive_int(value: Any, trait: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolicyError(f"must be a positive integer, not {value!r}", trait=trait)
    return value


class DCRPolicy(LoggingConfigurable):
    """The hub's DCR policy: datasets, entitlements, release modes, limits, quotas, keys and records."""

    datasets = Dict(
        help="""Datasets the hub offers, by ``"<provider>/<dataset>"``.

        Each entry pins one **version** (the content digest ``dcr provider add`` printed) in a dataset
        **store** (the directory given to ``dcr provider add --store``), the **release** mode of job
        outputs (``"review"``: every output waits for the provider's approval, the default; ``"auto"``:
        outputs go straight to the researcher), and who is **entitled**: hub user names and JupyterHub
        group names. An entitled user sees the version's synthetic files read-only at
        ``/data/<provider>/<dataset>/<file>`` and may run notebooks on the real files in the enclave.
        ``"synthetic"`` (``{file name: sha256}``, as printed by ``dcr provider add``) is optional; when
        given it must match the version's manifest. ``"description"`` is free text for the datasets view.
        ``"fidelity_report"`` (optional) is the absolute path of the **researcher-facing** fidelity report
        of the version's synthetic file (``<file>.fidelity-researchers.html``, or its ``.json``, written by
        ``dcr provider add --report DIR --report-epsilon E``); the hub serves it to entitled users at
        ``/hub/api/dcr/datasets/<provider>/<dataset>/fidelity-report`` and the JupyterLab datasets view
        links to it. ``"cloud"`` (optional; required by the Confidential Space platform) is
        ``{"store": "gs://...", "kms_key": "projects/.../cryptoKeys/...", "wip_provider":
        "projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>"}``: where the
        encrypted version is in Cloud Storage, the Cloud KMS key its data key is wrapped with, and the
        Workload Identity pool provider whose attribute condition (the provider's policy) releases it.
        Every grant copies it, so the enclave refuses any other key or pool whatever storage says.

        Example::

            c.DCRPolicy.datasets = {
                "acme/insurance": {
                    "version": "sha256:4f0c...e1",
                    "store": "/srv/dcr/store",
                    "release": "review",
                    "entitled": {"users": ["alice"], "groups": ["actuaries"]},
                    "fidelity_report": "/srv/dcr/reports/insurance.fidelity-researchers.html",
                },
            }

        The hub refuses to start when a version is not in its store, a synthetic file is missing or
        differs in size, a group does not exist in the hub (declare groups with
        ``c.JupyterHub.load_groups``), or a fidelity report is missing, unreadable, not about a file of the
        version, or not marked for researchers.

        Security: removing a user from a group removes the dataset from their next grant and next
        sandbox; grants already issued stay valid until they expire (the job's time limit plus ten
        minutes). Without review, the researcher's own notebook decides what leaves the enclave within
        the output limits: keep ``"review"`` for real personal data. Never name the provider-only fidelity
        report (``<file>.fidelity-provider-only.*``): it is computed from the real rows without
        differential privacy (refused at start, and again each time the report is served).
        """,
    ).tag(config=True)

    providers = Dict(
        help="""The data providers, by provider name (the part of a ``datasets`` key before the ``/``):
        a display **name** and the **reviewers** who may approve or reject held outputs of the provider's
        ``"review"`` datasets (hub user names and JupyterHub group names).

        Optional: when empty (the default) providers are implicit in the dataset keys, shown by their
        key, and name no reviewers. A display name is also what a researcher refused a dataset of the
        provider is told to ask besides the hub's administrator. Once set, every provider of a dataset must be declared here and every
        declared provider must have a dataset; the hub refuses to start otherwise, or when a reviewers'
        group does not exist in the hub (declare groups with ``c.JupyterHub.load_groups``).

        Example::

            c.DCRPolicy.providers = {
                "acme": {
                    "name": "ACME Insurance",
                    "reviewers": {"users": ["rita"], "groups": ["acme-reviewers"]},
                },
            }

        Security: reviewers decide what leaves the enclave for the provider's datasets under review, and
        whoever can change a reviewers' group in the hub (admins, ``admin:groups`` tokens) changes who
        decides. Name only people the provider chose, and keep them out of the groups entitled to run
        jobs on the same datasets where the provider wants the four-eyes principle. A display name is shown
        to any user who asks for a dataset under the provider's key (whether or not that dataset exists):
        it reveals that the provider is on this hub, never which datasets it offers.
        """,
    ).tag(config=True)

    output_limits = Dict(
        help="""What one job may bring out of the enclave: ``max_files`` (default 100), ``max_bytes``
        (total, default 50 MiB) and ``allowed_suffixes`` (lower-case file name endings with the dot;
        empty allows any). Written into every grant; the enclave releases nothing from a job that
        exceeds them.

        Example::

            c.DCRPolicy.output_limits = {
                "max_files": 20,
                "max_bytes": 10 * 2**20,
                "allowed_suffixes": [".ipynb", ".csv", ".png"],
            }

        Security: limits bound how much can leave, not what it says. Small limits and an allow-list of
        types make a reviewer's work possible; they do not replace review.
        """,
    ).tag(config=True)

    disclosure_checks = Dict(
        help="""Thresholds of the enclave's automated disclosure checks on the tables (CSV, TSV) a job
        brings out: ``min_cell_count`` (default 10: a count below it in a frequency table is a finding),
        ``dominance_min_contributors`` (default 3: a row of a magnitude table, mean or sum beside a
        count, with fewer contributors is a finding) and ``allow_extremes`` (default false: minimum and
        maximum statistics, single records' values, are a finding). A dataset's own ``"disclosure"``
        entry overrides these for it; a job's grant carries the strictest values over its datasets
        (highest thresholds, extremes only if every dataset allows them). Outputs with a finding are held
        for review even under ``"auto"``; reviewers see the details, the researcher only the kinds.

        Example::

            c.DCRPolicy.disclosure_checks = {
                "min_cell_count": 5,
                "dominance_min_contributors": 5,
                "allow_extremes": False,
            }

        Security: the checks catch tables that are plainly disclosive, written in the forms they know;
        a notebook that wants to can write a value in a form no rule recognises. They are a floor under
        ``"auto"``, not a substitute for review. Each kind of finding is one public bit of the receipt
        that the notebook chooses.
        """,
    ).tag(config=True)

    quotas = Dict(
        help="""Per-user and per-dataset limits on grants, enforced by the hub's grant service.

        Keys (defaults): ``concurrent_jobs_per_user`` (2), ``jobs_per_day_per_user`` (20),
        ``jobs_per_day_per_dataset`` (200; counted over all users) and ``grant_requests_per_minute``
        (30; every request of a user counts, granted or refused). Days are rolling 24-hour windows. A job
        counts as running until its time limit has passed: the hub does not take the user's server's word
        for when a job ended. Requests over a quota are refused with HTTP 429 and recorded in the audit
        log.

        Example::

            c.DCRPolicy.quotas = {
                "concurrent_jobs_per_user": 1,
                "jobs_per_day_per_user": 10,
                "jobs_per_day_per_dataset": 50,
                "grant_requests_per_minute": 10,
            }

        Security: quotas limit how often one researcher can query the real data; they are the only
        bound on repeated queries in ``"auto"`` release mode.
        """,
    ).tag(config=True)

    time_limit = Integer(
        3600,
        help=f"""Seconds a job may run in the enclave; the grant expires ten minutes after it.
        Between {MIN_TIME_LIMIT} and {MAX_TIME_LIMIT}.

        Example::

            c.DCRPolicy.time_limit = 1800

        Security: a grant is usable until it expires; short limits shorten the window in which a
        leaked grant could launch a job (it is still bound to one job id and bundle).
        """,
    ).tag(config=True)

    memory_limit = ByteSpecification(
        4 * 2**30,
        allow_none=False,
        help="""Memory for a job's kernel in the enclave, in bytes or with a K/M/G/T suffix.

        Example::

            c.DCRPolicy.memory_limit = "8G"

        Security: the limit is written into every grant, so the researcher's server cannot raise it; the
        enclave applies it to the kernel's address space. It bounds what one job can take from the
        enclave's machine, which for the local enclave is the hub's own.
        """,
    ).tag(config=True)

    hub_key_file = Unicode(
        "dcr-hub-key.pem",
        help="""The hub's grant signing key (PEM, ES256 by default), relative to the hub's working
        directory unless absolute. Generated, owner-only (0600), on the first start if absent; the hub
        refuses to start if it exists but is unreadable, not a key, a link or readable by others.
        Its public JWKS and thumbprint are served at ``/hub/api/dcr/jwks``; providers pin the
        thumbprint in their key-release conditions (``dcr provider add --hub-key``).

        Example::

            c.DCRPolicy.hub_key_file = "/srv/jupyterhub/dcr-hub-key.pem"

        Security: whoever reads this file can authorise jobs on every dataset whose provider trusts this
        hub. Keep it on the hub's own disk, readable by the hub's account only, and back it up:
        a new key means every provider must pin the new thumbprint.
        """,
    ).tag(config=True)

    airlock_key_file = Unicode(
        "dcr-airlock.key",
        help="""The airlock's X25519 private key (32 raw bytes), relative to the hub's working
        directory unless absolute; generated (0600) on the first start if absent. Outputs of jobs on
        ``"review"`` datasets are sealed to its public half (carried in the grant) and wait for review.

        Example::

            c.DCRPolicy.airlock_key_file = "/srv/jupyterhub/dcr-airlock.key"

        Security: whoever reads this file can open every held output; treat it like the hub key.
        """,
    ).tag(config=True)

    airlock_dir = Unicode(
        "dcr-airlock",
        help="""Where the airlock keeps held results until they are decided, relative to the hub's working
        directory unless absolute; created owner-only (0700). It holds only what the enclave sealed (to the
        airlock key) and the public receipts; outputs are opened in the hub's memory for reviewers and
        re-sealed to the job's key on release, never written in the clear.

        Example::

            c.DCRPolicy.airlock_dir = "/srv/jupyterhub/dcr-airlock"

        Security: together with ``airlock_key_file`` it opens every held output: keep both on the hub's own
        disk, readable by the hub's account only.
        """,
    ).tag(config=True)

    review_approvals = Integer(
        1,
        help="""How many distinct reviewers of each provider must approve a held job before its outputs are
        released (1 to 5); set 2 for the two-person rule. A rejection by any one reviewer ends the job. The
        job's author never counts, even when they are a reviewer.

        Example::

            c.DCRPolicy.review_approvals = 2

        Security: with 2 or more, no single reviewer can release outputs alone; make sure each provider
        names at least that many reviewers, or a group of at least that many people.
        """,
    ).tag(config=True)

    admins_review = Bool(
        False,
        help="""Whether hub administrators may review every provider's held jobs (besides the reviewers the
        providers name in ``providers``).

        Example::

            c.DCRPolicy.admins_review = True

        Security: off by default, so that who decides what leaves a provider's enclave is the provider's
        choice; turn it on only where the hub's operators are trusted to review for every provider.
        """,
    ).tag(config=True)

    db_url = Unicode(
        "sqlite:///dcr-hub.sqlite",
        help="""Database for the hub's DCR records (jobs granted, audit log), as a SQLAlchemy URL:
        SQLite (default, a file in the hub's working directory) or PostgreSQL.

        Example::

            c.DCRPolicy.db_url = "postgresql+psycopg://dcr@db.internal/dcr"

        Security: the audit log is evidence; give the hub's database account the only write access,
        and keep the password out of this file (use a ~/.pgpass or PGPASSWORD in the hub's environment).
        """,
    ).tag(config=True)

    platform_class = Type(
        default_value="dcr_spawner.platform.LocalEnclaveHost",
        klass="dcr_spawner.platform.EnclavePlatform",
        help="""Where the hub's granted jobs run: a subclass of
        :class:`dcr_spawner.platform.EnclavePlatform`, given as the class or its dotted import path; it
        reads its own settings from ``c.<ClassName>.*``. The DCR spawners hand every server they start
        what the platform says servers need (the hub's grant service, the backend and its address, the
        trust anchors and enclave digests receipts are verified against), and the grant service asks it
        which jobs have ended, so that a failed job stops counting against the concurrent-jobs quota.
        ``dcr_spawner.platform.LocalEnclaveHost`` (the default) is this machine's ``dcr enclave-host``.

        Example::

            c.DCRPolicy.platform_class = "dcr_spawner.platform.LocalEnclaveHost"
            c.LocalEnclaveHost.socket_path = "/run/dcr/enclave-host.sock"
            c.LocalEnclaveHost.trust_jwks = ["/var/lib/dcr/enclave-host/public/jwks.json"]
            c.LocalEnclaveHost.enclave_digests = ["sha256:4f0c...e1"]

        Security: the platform's settings decide where researchers' servers send bundles and which
        receipts they call verified; the class runs inside the hub: use only platforms you installed.
        """,
    ).tag(config=True)

    _platform: Any = None

    def platform(self) -> Any:
        """The configured :class:`~dcr_spawner.platform.EnclavePlatform` (made once, with this policy's
        configuration)."""
        if self._platform is None:
            self._platform = self.platform_class(parent=self)
        return self._platform

    @validate("datasets")
    def _check_datasets(self, proposal: Any) -> dict[str, Any]:
        value = proposal["value"]
        for ref, spec in value.items():
            parse_dataset(ref, spec)
        return dict(value)

    @validate("providers")
    def _check_providers(self, proposal: Any) -> dict[str, Any]:
        value = proposal["value"]
        for provider, spec in value.items():
            parse_provider(provider, spec)
        return dict(value)

    @validate("output_limits")
    def _check_output_limits(self, proposal: Any) -> dict[str, Any]:
        value = dict(proposal["value"])
        unknown = set(value) - _OUTPUT_LIMIT_KEYS
        if unknown:
            raise PolicyError(
                f"unknown key(s) {sorted(unknown)}",
                trait="output_limits",
                hint=f"allowed keys: {', '.join(sorted(_OUTPUT_LIMIT_KEYS))}",
            )
        for key in ("max_files", "max_bytes"):
            if key in value:
                _positive_int(value[key], f"output_limits[{key!r}]")
        suffixes = value.get("allowed_suffixes", [])
        if isinstance(suffixes, str) or not all(
            isinstance(s, str) and s.startswith(".") and len(s) > 1 for s in suffixes
        ):
            raise PolicyError(
                "must be a list of file name endings such as '.csv'",
                trait="output_limits['allowed_suffixes']",
            )
        return value

    @validate("disclosure_checks")
    def _check_disclosure_checks(self, proposal: Any) -> dict[str, Any]:
        value = dict(proposal["value"])
        _disclosure_rules(value, "disclosure_checks")
        return value

    @validate("quotas")
    def _check_quotas(self, proposal: Any) -> dict[str, Any]:
        value = dict(proposal["value"])
        unknown = set(value) - set(DEFAULT_QUOTAS)
        if unknown:
            raise PolicyError(
                f"unknown quota(s) {sorted(unknown)}",
                trait="quotas",
                hint=f"known quotas: {', '.join(DEFAULT_QUOTAS)}",
            )
        for key, v in value.items():
            _positive_int(v, f"quotas[{key!r}]")
        return value

    @validate("time_limit")
    def _check_time_limit(self, proposal: Any) -> int:
        v = proposal["value"]
        if not MIN_TIME_LIMIT <= v <= MAX_TIME_LIMIT:
            raise PolicyError(
                f"{v} seconds is outside {MIN_TIME_LIMIT}..{MAX_TIME_LIMIT}", trait="time_limit"
            )
        return int(v)

    @validate("memory_limit")
    def _check_memory_limit(self, proposal: Any) -> int:
        v = proposal["value"]
        if v is None or v < MIN_MEMORY:
            raise PolicyError(f"{v!r} bytes is below the minimum of {MIN_MEMORY}", trait="memory_limit")
        return int(v)

    @validate("review_approvals")
    def _check_review_approvals(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 1 <= value <= 5:
            raise PolicyError(f"must be between 1 and 5, not {value}", trait="review_approvals")
        return int(value)

    @validate("hub_key_file", "airlock_key_file", "airlock_dir", "db_url")
    def _check_non_empty(self, proposal: Any) -> str:
        if not str(proposal["value"]).strip():
            raise PolicyError("must not be empty", trait=proposal["trait"].name)
        return str(proposal["value"])

    # ------------------------------------------------------------------------------------------------
    # Derived values

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._manifests: dict[str, DatasetVersion] = {}

    def specs(self) -> list[DatasetSpec]:
        """Every dataset entry, sorted by ``provider/dataset``."""
        return [parse_dataset(ref, self.datasets[ref]) for ref in sorted(self.datasets)]

    def spec(self, ref: str) -> DatasetSpec | None:
        return parse_dataset(ref, self.datasets[ref]) if ref in self.datasets else None

    def provider_specs(self) -> dict[str, ProviderSpec]:
        """Every provider: the declared ones, and (when none are declared) those of the dataset keys."""
        out = {p: parse_provider(p, spec) for p, spec in sorted(self.providers.items())}
        for spec in self.specs():
            out.setdefault(spec.provider, ProviderSpec(spec.provider, spec.provider))
        return out

    def provider(self, name: str) -> ProviderSpec | None:
        """The provider ``name`` (with its reviewers), or ``None`` if the policy has no such provider."""
        return self.provider_specs().get(name)

    def limits(self) -> OutputLimits:
        d = OutputLimits()
        ol = self.output_limits
        return OutputLimits(
            max_files=ol.get("max_files", d.max_files),
            max_bytes=ol.get("max_bytes", d.max_bytes),
            allowed_suffixes=tuple(s.lower() for s in ol.get("allowed_suffixes", d.allowed_suffixes)),
        )

    def disclosure_rules(self, refs: Iterable[str]) -> DisclosureRules:
        """The disclosure thresholds for a job over ``refs``: for each dataset its own entry over
        ``disclosure_checks`` over the enclave's defaults, and the strictest of those across the datasets."""
        rules = []
        for ref in refs:
            spec = self.spec(ref)
            own = (spec.disclosure if spec is not None else None) or {}
            rules.append(DisclosureRules.from_json({**self.disclosure_checks, **own}))
        return DisclosureRules.strictest(rules)

    def quota(self, name: str) -> int:
        return int(self.quotas.get(name, DEFAULT_QUOTAS[name]))

    def resolve_path(self, value: str, base: Path | None = None) -> Path:
        """A key file path: relative ones are relative to ``base`` (default: the hub's working directory)."""
        p = Path(value)
        return p if p.is_absolute() else (base or Path.cwd()) / p

    # ------------------------------------------------------------------------------------------------
    # Validation against the world

    def validate_against_hub(self, hub_groups: Iterable[str]) -> None:
        """Check every dataset against its store and every entitlement group against the hub's groups.

        Raises :class:`PolicyError` naming provider, dataset and trait. Loads (and keeps) each version's
        manifest, so later :meth:`entitled` calls need no store access besides the synthetic paths.
        """
        groups = set(hub_groups)
        self._check_providers_against(groups)
        self._warn_unreviewable()
        manifests: dict[str, DatasetVersion] = {}
        for spec in self.specs():
            missing = sorted(spec.groups - groups)
            if missing:
                raise PolicyError(
                    f"group(s) {', '.join(map(repr, missing))} do not exist in the hub",
                    trait=_trait(spec.ref, "entitled", "groups"),
                    ref=spec.ref,
                    hint="declare them in c.JupyterHub.load_groups or create them in the hub first",
                )
            manifest = self._load_manifest(spec)
            self._check_synthetic(spec, manifest)
            if spec.fidelity_report is not None:
                read_fidelity_report(spec.fidelity_report, (f.name for f in manifest.files), ref=spec.ref)
            if not spec.users and not spec.groups:
                self.log.warning("DCR: nobody is entitled to %s (c.DCRPolicy.datasets)", spec.ref)
            manifests[spec.ref] = manifest
        self._manifests = manifests

    def _check_providers_against(self, hub_groups: set[str]) -> None:
        """Declared providers against the dataset keys and their reviewers' groups against the hub."""
        if not self.providers:
            return
        declared = {p: parse_provider(p, spec) for p, spec in sorted(self.providers.items())}
        specs = self.specs()
        for spec in specs:
            if spec.provider not in declared:
                raise PolicyError(
                    f"its provider {spec.provider!r} is not declared in c.DCRPolicy.providers",
                    trait=_trait(spec.ref),
                    ref=spec.ref,
                    hint=f"add {spec.provider!r} to c.DCRPolicy.providers, or fix the dataset key",
                )
        used = {spec.provider for spec in specs}
        for p in declared.values():
            trait = f"providers[{p.provider!r}]"
            if p.provider not in used:
                raise PolicyError(
                    "no dataset in c.DCRPolicy.datasets belongs to this provider",
                    trait=trait,
                    provider=p.provider,
                    hint=f"add its datasets as '{p.provider}/<dataset>', or remove the provider",
                )
            missing = sorted(p.reviewer_groups - hub_groups)
            if missing:
                raise PolicyError(
                    f"group(s) {', '.join(map(repr, missing))} do not exist in the hub",
                    trait=f"{trait}['reviewers']['groups']",
                    provider=p.provider,
                    hint="declare them in c.JupyterHub.load_groups or create them in the hub first",
                )

    def _warn_unreviewable(self) -> None:
        """Say which datasets' held outputs nobody could release: a provider without reviewers (declared
        or implicit) and no admins reviewing. Outputs of ``review`` datasets are always held; those of
        ``auto`` ones when the enclave's disclosure checks flag them."""
        if self.admins_review:
            return
        providers = self.provider_specs()
        for provider in sorted({s.provider for s in self.specs()}):
            p = providers.get(provider)
            if p is not None and (p.reviewer_users or p.reviewer_groups):
                continue
            specs = [s for s in self.specs() if s.provider == provider]
            refs = [s.ref for s in specs]
            always = [s.ref for s in specs if s.release == "review"]
            self.log.warning(
                "DCR: provider %s names no reviewers (c.DCRPolicy.providers) and admins do not review "
                "(c.DCRPolicy.admins_review), so nobody can release held outputs of %s%s",
                provider,
                ", ".join(refs),
                f" (always held: {', '.join(always)})"
                if always
                else " (held when the disclosure checks flag them)",
            )

    def fidelity_report(self, ref: str) -> FidelityReport | None:
        """The researcher-facing fidelity report of ``ref``, read and checked again now (the file may have
        changed since the hub started), or ``None`` when the policy names none."""
        spec = self.spec(ref)
        if spec is None or spec.fidelity_report is None:
            return None
        manifest = self.manifest(ref)
        return read_fidelity_report(spec.fidelity_report, (f.name for f in manifest.files), ref=ref)

    def _load_manifest(self, spec: DatasetSpec) -> DatasetVersion:
        store = Store(spec.store)
        if not store.root.is_dir():
            raise PolicyError(
                f"the store {store.root} does not exist or is not a directory",
                trait=_trait(spec.ref, "store"),
                ref=spec.ref,
            )
        if not store.exists(spec.provider, spec.dataset, spec.version):
            known = [m.version for m in _versions(store, spec)]
            if not known:
                raise PolicyError(
                    f"the store {store.root} has no dataset {spec.ref}",
                    trait=_trait(spec.ref),
                    ref=spec.ref,
                    hint="register it with `dcr provider add --store` or fix the name or the store",
                )
            raise PolicyError(
                f"version {spec.version} is not in the store {store.root}",
                trait=_trait(spec.ref, "version"),
                ref=spec.ref,
                hint=f"versions in the store: {', '.join(known)}",
            )
        try:
            manifest = store.load(spec.provider, spec.dataset, spec.version)
        except DCRError as e:
            raise PolicyError(
                f"the manifest of {spec.version} is unusable: {e.message}",
                trait=_trait(spec.ref, "version"),
                ref=spec.ref,
            ) from None
        if manifest.retired:
            raise PolicyError(
                f"version {spec.version} is retired by its provider",
                trait=_trait(spec.ref, "version"),
                ref=spec.ref,
                hint="pin a current version (dcr provider list)",
            )
        return manifest

    def _check_synthetic(self, spec: DatasetSpec, manifest: DatasetVersion) -> None:
        if spec.synthetic is not None:
            names = {f.name for f in manifest.files}
            if set(spec.synthetic) != names:
                raise PolicyError(
                    f"lists files {sorted(spec.synthetic)}, the version has {sorted(names)}",
                    trait=_trait(spec.ref, "synthetic"),
                    ref=spec.ref,
                )
            for f in manifest.files:
                if spec.synthetic[f.name] != f.synthetic_sha256:
                    raise PolicyError(
                        f"the digest of {f.name} differs from the version's manifest",
                        trait=_trait(spec.ref, "synthetic"),
                        ref=spec.ref,
                    )
        store = Store(spec.store)
        for f in manifest.files:
            try:
                path = store.synthetic_path(manifest, f.name)
                st = path.lstat()
            except FileNotFoundError:
                raise PolicyError(
                    f"the synthetic file {f.name} is missing from the store ({f.synthetic})",
                    trait=_trait(spec.ref, "version"),
                    ref=spec.ref,
                ) from None
            except (OSError, DCRError) as e:
                raise PolicyError(
                    f"the synthetic file {f.name} is unusable: {e}",
                    trait=_trait(spec.ref, "version"),
                    ref=spec.ref,
                ) from None
            if not stat.S_ISREG(st.st_mode) or st.st_size != f.synthetic_size:
                raise PolicyError(
                    f"the synthetic file {path} is not the regular file of {f.synthetic_size} bytes the manifest names",
                    trait=_trait(spec.ref, "version"),
                    ref=spec.ref,
                )

    def manifest(self, ref: str) -> DatasetVersion:
        """The manifest of the version ``ref`` is pinned to (loaded and checked once; versions are immutable)."""
        if ref not in self._manifests:
            spec = self.spec(ref)
            if spec is None:
                raise PolicyError(f"{ref!r} is not in the policy", trait="datasets")
            manifest = self._load_manifest(spec)
            self._check_synthetic(spec, manifest)
            self._manifests[ref] = manifest
        return self._manifests[ref]

    # ------------------------------------------------------------------------------------------------
    # Entitlements

    def entitled_refs(self, user_name: str, groups: Iterable[str]) -> list[str]:
        """``provider/dataset`` of every dataset ``user_name`` (member of ``groups``) is entitled to."""
        member_of = set(groups)
        return [s.ref for s in self.specs() if user_name in s.users or s.groups & member_of]

    def entitled(self, user_name: str, groups: set[str]) -> list[Entitlement]:
        """The datasets ``user_name`` (member of ``groups``) is entitled to, with their synthetic files."""
        out = []
        for ref in self.entitled_refs(user_name, groups):
            spec = self.spec(ref)
            assert spec is not None
            manifest = self.manifest(ref)
            store = Store(spec.store)
            out.append(
                Entitlement(
                    provider=spec.provider,
                    dataset=spec.dataset,
                    version=spec.version,
                    release=spec.release,
                    synthetic={f.name: store.synthetic_path(manifest, f.name) for f in manifest.files},
                    protection=manifest.protection,
                    store=store.root,
                )
            )
        return out


def _versions(store: Store, spec: DatasetSpec) -> list[DatasetVersion]:
    try:
        return store.versions(spec.provider, spec.dataset)
    except DCRError:
        return []
