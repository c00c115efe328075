"""``dcr provider add``, ``list`` and ``retire``: how a data provider registers datasets.

``add`` validates the real and synthetic files, computes the content-addressed version, encrypts the real
files into the store under a fresh data key (wrapped under the provider's KEK), copies the synthetic files
under the same names, writes the manifest and the provider's key-release condition, and prints the two
things people copy elsewhere: the hub-side snippet for ``jupyterhub_config.py`` (with an ``entitled``
placeholder the admin fills in, the ``description`` and the researcher-facing fidelity report just written)
and the condition. Each file has one name in both stages, ``/data/<provider>/<dataset>/<name>``: the real
file's, or the one ``--synthetic-name`` gives (the real file is then encrypted, and decrypted in the
enclave, under that name too, so the notebook opens the same path in the sandbox and in the enclave).
The manifest carries an HMAC over its file list under a key derived from the data key, which the enclave
checks before decrypting (see :mod:`dcr_enclave.formats.dataset`). Adding content that is already in the store
changes nothing, unless its manifest predates that MAC (schema v1): then the version is rebuilt with it.

The synthetic version is either the provider's own file (``--synthetic``; a CSV or Parquet file must have the
real file's column names and types) or made here (``--synthesize NAME``). Synthesizers are replaceable
parts found by name in the entry-point group :data:`SYNTHESIZER_GROUP`; the main distribution registers
``mst``, ``aim`` and ``random`` (``pip install 'jupyterhub-dcr[synthesis]'``), so this trusted distribution
never imports a synthesis library. A synthesizer is a class whose instances have ``kind`` (``dp`` or
``random``) and ``synthesize(real=, out_dir=, epsilon=, delta=, schema=, seed=, max_bytes=, report=,
report_epsilon=, progress=)`` returning an object with ``path``, ``kind``, ``mechanism``, ``epsilon``,
``delta`` and ``reports`` (see ``dcr_provider.synthesizers``); ``progress(stage, fraction, detail="")`` draws
its steps on a terminal.

``retire`` stops new grants for a version; its files, key and place in the condition stay, so grants that
already pin it still decrypt it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Final, TextIO

from dcr_enclave.formats.contract import check_file_name, check_name
from dcr_enclave.formats.dataset import PROTECTION_KINDS, DatasetVersion, Protection
from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import MAX_JWKS_BYTES, load_jwks_file, public_jwk, thumbprint
from dcr_enclave.formats.streamcrypt import DEFAULT_CHUNK_SIZE, check_chunk_size
from dcr_enclave.pack.gcp import (
    GsUri,
    KmsKeyWrapper,
    check_kms_key,
    gcp_policy,
    gcp_policy_text,
    parse_store,
    storage_client,
    upload_version,
    uploaded_manifest,
)
from dcr_enclave.pack.signing_keys import load_or_create_key, read_private_key
from dcr_enclave.pack.store import DEFAULT_MAX_BYTES, DEV_HUB_KEY_FILE, Store, inspect_input
from dcr_enclave.platform.condition import KeyReleaseCondition, PlatformCondition
from dcr_enclave.platform.key_store import KeyDirectory, ensure_private_dir
from dcr_enclave.platform.measure import current_measurement

_PLATFORMS = {"local": "local", "confidential-space": "confidential_space"}
_RULE = "# " + "-" * 100
#: Entry-point group of synthesizers (``name = module:Class``).
SYNTHESIZER_GROUP: Final = "dcr.synthesizers"
#: Entry-point group of the schema check for a provider's own synthetic file (``tables = module:function``).
SCHEMA_CHECK_GROUP: Final = "dcr.schema_checks"
_INSTALL_HINT = "install jupyterhub-dcr[synthesis] (see docs/synthesis.md)"
_TABULAR = (".csv", ".parquet", ".pq")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "provider",
        help="register datasets and key-release conditions (data providers)",
        description="Register datasets (encrypted real files plus their synthetic version) and list them.",
    )
    sub = parser.add_subparsers(dest="provider_command", metavar="SUBCOMMAND", required=True)

    add = sub.add_parser(
        "add",
        help="add a dataset version to a store",
        description="Encrypt real files into the store, beside their synthetic version, and print the hub "
        "configuration snippet and the provider's key-release condition. Pair every --real with a "
        "--synthetic, in order; each file keeps the real file's name in both stages (in the sandbox and in "
        "the enclave) unless --synthetic-name gives it another.",
    )
    add.add_argument(
        "--store",
        required=True,
        metavar="DIR|gs://BUCKET/PREFIX",
        help="the dataset store: a directory, or a Cloud Storage location (needs --kms-key and --keys) to "
        "which the encrypted version is uploaded",
    )
    add.add_argument("--provider", required=True, metavar="NAME", help="provider name, e.g. acme")
    add.add_argument("--dataset", required=True, metavar="NAME", help="dataset name, e.g. insurance")
    add.add_argument("--real", type=Path, action="append", required=True, metavar="FILE", help="a real file")
    add.add_argument(
        "--synthetic",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="its synthetic version, made by the provider (CSV/Parquet: same column names and types)",
    )
    add.add_argument(
        "--synthetic-name",
        action="append",
        default=[],
        metavar="NAME",
        help="the file name researchers see, /data/PROVIDER/DATASET/NAME, in the sandbox and in the enclave "
        "alike (default: the real file's name); one per --real, in order; a plain file name with the real "
        "file's suffix (e.g. claims.csv)",
    )
    add.add_argument(
        "--description",
        metavar="TEXT",
        help="what the dataset is, for the datasets view researchers see (printed into the hub snippet)",
    )
    add.add_argument(
        "--synthesize",
        metavar="NAME",
        help="make the synthetic versions with this synthesizer instead (mst, aim: differentially private, "
        "needs --epsilon; random: from --schema alone)",
    )
    add.add_argument(
        "--schema", type=Path, metavar="FILE", help="declared schema (YAML or JSON) of the real file(s)"
    )
    add.add_argument(
        "--seed", type=int, metavar="N", help="seed for the synthesizer's selection and sampling"
    )
    add.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write the fidelity report(s) into DIR (provider-only: computed from the real data)",
    )
    add.add_argument(
        "--report-epsilon",
        type=float,
        metavar="E",
        help="also write a researcher-facing fidelity report from DP statistics, spending E of --epsilon",
    )
    add.add_argument("--keys", type=Path, metavar="DIR", help="keys directory (default: STORE/.keys)")
    add.add_argument(
        "--hub-key",
        type=Path,
        metavar="FILE",
        help="the hub's key (PEM public or private key, or JWKS) whose grants the condition accepts "
        f"(default: a local development key, KEYS/{DEV_HUB_KEY_FILE})",
    )
    add.add_argument(
        "--enclave-digest",
        action="append",
        default=[],
        metavar="sha256:HEX",
        help="released enclave measurement (repeatable; default: the enclave this dcr would run)",
    )
    add.add_argument(
        "--platform", choices=sorted(_PLATFORMS), default="local", help="TEE platform (default local)"
    )
    add.add_argument("--project-id", help="confidential-space: the enclave's Google Cloud project")
    add.add_argument(
        "--kms-key",
        metavar="NAME",
        help="confidential-space: wrap the data key with this Cloud KMS key "
        "(projects/P/locations/L/keyRings/R/cryptoKeys/K) instead of a local key-encryption key",
    )
    add.add_argument(
        "--hub-copy",
        type=Path,
        metavar="DIR",
        help="with a gs:// store: also keep the version in this local store directory (the manifest and "
        "synthetic files are what the hub's 'store' must hold)",
    )
    add.add_argument("--kms-endpoint", metavar="URL", help=argparse.SUPPRESS)  # tests: a loopback fake
    add.add_argument("--storage-endpoint", metavar="URL", help=argparse.SUPPRESS)
    add.add_argument(
        "--service-account",
        action="append",
        default=[],
        metavar="EMAIL",
        help="confidential-space: the enclave VM's service account (repeatable)",
    )
    add.add_argument(
        "--protection",
        choices=PROTECTION_KINDS,
        default="provider-file",
        help="how the synthetic version was made (default provider-file)",
    )
    add.add_argument("--mechanism", help="e.g. the DP synthesiser (mst, aim, ...)")
    add.add_argument("--epsilon", type=float, help="ε of differentially private synthetic data")
    add.add_argument("--delta", type=float, help="δ of differentially private synthetic data")
    add.add_argument(
        "--release",
        choices=("review", "auto"),
        default="review",
        help="release mode written into the hub snippet (default review)",
    )
    add.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="encryption chunk size in bytes",
    )
    add.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="N", help="largest accepted input file"
    )

    lst = sub.add_parser("list", help="list the datasets in a store", description="List a store's datasets.")
    lst.add_argument("--store", type=Path, required=True, metavar="DIR", help="the dataset store directory")

    retire = sub.add_parser(
        "retire",
        help="stop new grants for a dataset version",
        description="Mark a dataset version retired: no new grant names it. Grants that already pin it still "
        "decrypt it (its files, key and condition stay).",
    )
    retire.add_argument(
        "--store", type=Path, required=True, metavar="DIR", help="the dataset store directory"
    )
    retire.add_argument("--provider", required=True, metavar="NAME", help="provider name")
    retire.add_argument("--dataset", required=True, metavar="NAME", help="dataset name")
    retire.add_argument("--version", required=True, metavar="sha256:HEX", help="the version to retire")

    policy = sub.add_parser(
        "policy",
        help="print what Google Cloud needs to release a dataset's key",
        description="Print a dataset's key-release condition compiled for Google Cloud: the Workload "
        "Identity Pool provider (issuer, audience, attribute mapping and condition) and the IAM bindings "
        "(KMS decrypt for the pool's principal set only; object read for the enclave's service account).",
    )
    policy.add_argument("--keys", type=Path, required=True, metavar="DIR", help="the keys directory")
    policy.add_argument("--provider", required=True, metavar="NAME", help="provider name")
    policy.add_argument("--dataset", required=True, metavar="NAME", help="dataset name")
    policy.add_argument("--gcp", action="store_true", required=True, help="compile for Google Cloud")
    policy.add_argument(
        "--wip-provider",
        required=True,
        metavar="NAME",
        help="projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>",
    )
    policy.add_argument("--kms-key", required=True, metavar="NAME", help="the dataset's Cloud KMS key")
    policy.add_argument("--store", required=True, metavar="gs://BUCKET/PREFIX", help="the dataset's store")
    policy.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.provider_command == "add":
        return run_add(args)
    if args.provider_command == "retire":
        return run_retire(args)
    if args.provider_command == "policy":
        return run_policy(args)
    return run_list(args)


# ---------------------------------------------------------------------------------------------------------
# progress on a terminal
# ---------------------------------------------------------------------------------------------------------


class TerminalProgress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (never in logs or pipes)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.width = width
        self._last = 0.0
        self._label = ""
        self._shown = False

    def show(self, label: str, fraction: float, detail: str = "", *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # Redraws of one stage are throttled; a new stage and the end of one are always drawn.
        if not force and label == self._label and fraction < 1.0 and now - self._last < 0.1:
            return
        self._last, self._label = now, label
        f = min(1.0, max(0.0, fraction))
        bar = "#" * int(f * self.width)
        self.stream.write(
            f"\r{label[:28]:<28} [{bar:<{self.width}}] {f * 100:5.1f}% {detail}".ljust(100)[:100]
        )
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False

    def stage(self, prefix: str) -> Callable[..., None]:
        """A ``progress(stage, fraction, detail="")`` callback for a synthesizer."""

        def cb(stage: str, fraction: float, detail: str = "") -> None:
            self.show(f"{prefix} {stage}", fraction, detail)

        return cb

    def bytes(self, label: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for the store's encryption."""
        start = time.monotonic()

        def cb(done: int, total: int) -> None:
            rate = done / max(1e-6, time.monotonic() - start) / 1e6
            self.show(
                label, done / total if total else 1.0, f"{done >> 20}/{total >> 20} MiB {rate:.0f} MB/s"
            )

        return cb


# ---------------------------------------------------------------------------------------------------------
# synthesizers and schema checks (entry points)
# ---------------------------------------------------------------------------------------------------------


def _entry_points(group: str) -> list[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda ep: ep.name)


def load_synthesizer(name: str) -> Any:
    """An instance of the synthesizer registered as ``name`` in :data:`SYNTHESIZER_GROUP`."""
    found = _entry_points(SYNTHESIZER_GROUP)
    if not found:
        raise DCRError(
            f"no synthesizer is installed, so --synthesize {name} is unavailable", hint=_INSTALL_HINT
        )
    match = [ep for ep in found if ep.name == name]
    if not match:
        names = ", ".join(ep.name for ep in found)
        raise DCRError(f"unknown synthesizer {name!r}", hint=f"installed synthesizers: {names}")
    try:
        return match[0].load()()
    except ImportError as e:
        raise DCRError(f"the synthesizer {name!r} cannot be loaded: {e}", hint=_INSTALL_HINT) from None


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DCRError(f"cannot read the header of {path}: {e}") from None


def check_synthetic_schema(real: Path, synthetic: Path, max_bytes: int) -> None:
    """Refuse a provider's synthetic CSV/Parquet file whose schema differs from the real file's.

    With ``jupyterhub-dcr[synthesis]`` installed the check (format, names, types) comes from
    :data:`SCHEMA_CHECK_GROUP`; without it only CSV column names are compared here, with the standard library.
    """
    if real.suffix.lower() not in _TABULAR and synthetic.suffix.lower() not in _TABULAR:
        return  # not a table: nothing to compare
    checks = [ep for ep in _entry_points(SCHEMA_CHECK_GROUP) if ep.name == "tables"]
    if checks:
        try:
            check = checks[0].load()
        except ImportError:
            check = None
        if check is not None:
            check(real, synthetic, max_bytes)
            return
    if real.suffix.lower() == synthetic.suffix.lower() == ".csv":
        r, s = _csv_header(real), _csv_header(synthetic)
        if r != s:
            raise DCRError(
                f"the synthetic file {synthetic} has columns {s}, the real file {real} has {r}",
                hint="the synthetic version must have the real data's column names, in order",
            )
        return
    raise DCRError(
        f"cannot compare the schemas of {real} and {synthetic} without the synthesis tools",
        hint=_INSTALL_HINT,
    )


# ---------------------------------------------------------------------------------------------------------
# add
# ---------------------------------------------------------------------------------------------------------


def hub_key_thumbprints(path: Path) -> list[str]:
    """Thumbprints of the hub key(s) in a PEM (public or private) or JWKS file; reads only public parts."""
    try:
        head = path.read_bytes()[: MAX_JWKS_BYTES + 1]
    except OSError as e:
        raise DCRError(f"cannot read the hub key {path}: {e.strerror}") from None
    if b"PRIVATE KEY-----" in head:
        return [thumbprint(public_jwk(read_private_key(path)))]
    return [thumbprint(k) for k in load_jwks_file(path, "hub key file")]


#: Suffixes naming the same format (a Parquet file may be called either).
_SAME_FORMAT = {".pq": ".parquet"}


def _format_suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return _SAME_FORMAT.get(suffix, suffix)


def check_synthetic_names(reals: list[Path], names: list[str]) -> list[str | None]:
    """The file name of each --real file (``None``: the real file's own), from ``--synthetic-name``.

    Refuses, before anything is read or written, a count that does not match the --real files, a name that
    is not a plain file name (a path, a hidden name, characters a dataset file name may not hold), a name
    whose suffix is not the real file's (the notebook reads the file by name with the format's reader in
    both stages), and two files of the dataset with the same name.
    """
    if not names:
        return [None] * len(reals)
    if len(names) != len(reals):
        raise DCRError(
            f"{len(names)} --synthetic-name for {len(reals)} --real files",
            hint="give one --synthetic-name per --real, in the same order, or none",
        )
    for real, name in zip(reals, names, strict=True):
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DCRError(
                f"--synthetic-name {name!r} is a path, not a file name",
                hint="give the name alone, e.g. claims.csv: the file appears at /data/PROVIDER/DATASET/NAME",
            )
        if name.startswith("."):
            raise DCRError(
                f"--synthetic-name {name!r} is a hidden name", hint="start it with a letter or a digit"
            )
        try:
            check_file_name(name)
        except DCRError as e:
            raise DCRError(f"--synthetic-name {name!r}: {e.message}", hint=e.hint) from None
        suffix = Path(real.name).suffix
        if _format_suffix(name) != _format_suffix(real.name):
            ending = f"end in {suffix}" if suffix else "end without a suffix"
            raise DCRError(
                f"--synthetic-name {name!r} does not {ending} like the real file {real.name}",
                hint="the file keeps its format; researchers' code opens it by this name in the sandbox and "
                "in the enclave alike",
            )
    final = [n or r.name for r, n in zip(reals, names, strict=True)]
    twice = sorted({n for n in final if final.count(n) > 1})
    if twice:
        raise DCRError(
            f"two files of the dataset would be named {', '.join(map(repr, twice))}",
            hint="give each --real its own --synthetic-name",
        )
    return list(names)


def _check_synthesis_args(args: argparse.Namespace) -> None:
    if args.synthesize is None:
        if len(args.real) != len(args.synthetic):
            raise DCRError(
                f"{len(args.real)} --real but {len(args.synthetic)} --synthetic files",
                hint="pass one --synthetic after each --real, or --synthesize NAME",
            )
        for option in ("schema", "seed", "report", "report_epsilon"):
            if getattr(args, option) is not None:
                raise DCRError(f"--{option.replace('_', '-')} applies to --synthesize only")
        return
    if args.synthetic:
        raise DCRError("pass either --synthetic files or --synthesize, not both")
    if args.protection != "provider-file" or args.mechanism is not None:
        raise DCRError("--protection and --mechanism are set by --synthesize; leave them out")
    if args.report_epsilon is not None and args.report is None:
        raise DCRError("--report-epsilon needs --report DIR (where the researcher-facing report goes)")
    if args.report is not None:
        _check_report_dir(args.report)


def _check_report_dir(report: Path) -> None:
    """Refuse a --report directory that could not be made or written: reports are delivered after the
    version is committed, so a failure then would leave the store changed and the command failed."""
    if report.exists() and not report.is_dir():
        raise DCRError(f"--report {report} exists and is not a directory", hint="choose another --report DIR")
    parent = report
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DCRError(f"--report {report}: {parent} is not a directory", hint="choose another --report DIR")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DCRError(f"--report {report}: {parent} is not writable", hint="choose another --report DIR")


def synthesize_files(
    args: argparse.Namespace, work: Path, progress: TerminalProgress, names: list[str | None] | None = None
) -> tuple[list[Path], Protection, list[Path]]:
    """Run the chosen synthesizer on every --real file into ``work``; the budget is split evenly over files.

    A file given another name (``names``) is shown to the synthesizer under that name (a link in ``work``),
    so its output and its reports name the file as researchers will see it, never the real file's name.
    Returns the synthetic files (in --real order), the protection for the manifest and the report files.
    """
    synthesizer = load_synthesizer(args.synthesize)
    k = len(args.real)
    outputs, reports, results = [], [], []
    for i, real in enumerate(args.real):
        out_dir = work / str(i)
        out_dir.mkdir()
        name = names[i] if names else None
        if name is not None:
            (work / f"as-{i}").mkdir()
            link = work / f"as-{i}" / name
            link.symlink_to(real.resolve())
            real = link
        try:
            result = _call_synthesizer(synthesizer, args, real, out_dir, k, progress)
        finally:
            progress.done()
        outputs.append(Path(result.path))
        reports += [Path(r) for r in result.reports]
        results.append(result)
    return _protection(results, outputs, reports)


def _call_synthesizer(
    synthesizer: Any, args: argparse.Namespace, real: Path, out_dir: Path, k: int, progress: TerminalProgress
) -> Any:
    try:
        return synthesizer.synthesize(
            real=real,
            out_dir=out_dir,
            epsilon=None if args.epsilon is None else args.epsilon / k,
            delta=None if args.delta is None else args.delta / k,
            schema=args.schema,
            seed=args.seed,
            max_bytes=args.max_bytes,
            report=args.report is not None,
            report_epsilon=None if args.report_epsilon is None else args.report_epsilon / k,
            progress=progress.stage(f"{real.name}:"),
        )
    except DCRError:
        raise
    except Exception as e:  # a library's own error: still a clear refusal, and nothing is written
        raise DCRError(
            f"the synthesizer {args.synthesize!r} failed on {real}: {type(e).__name__}: {e}",
            hint="check the file and --schema (declared domains need no DP estimate, which can fail at small ε)",
        ) from None


def _protection(
    results: list[Any], outputs: list[Path], reports: list[Path]
) -> tuple[list[Path], Protection, list[Path]]:
    kinds = {r.kind for r in results}
    if len(kinds) != 1:  # pragma: no cover - one synthesizer has one kind
        raise DCRError("the synthesizer returned mixed protection kinds")
    kind = kinds.pop()
    if kind == "dp":
        epsilon = sum(float(r.epsilon) for r in results)
        delta = sum(float(r.delta or 0.0) for r in results)
        protection = Protection("dp", results[0].mechanism, epsilon, delta)
    else:
        protection = Protection(kind, results[0].mechanism)
    return outputs, protection, reports


#: In the file name of a report computed from the real rows (``<file>.fidelity-provider-only.json``).
PROVIDER_ONLY_MARK: Final = ".fidelity-provider-only."
#: In the file name of a researcher-facing report (``<file>.fidelity-researchers.html``).
RESEARCHERS_MARK: Final = ".fidelity-researchers."


def _deliver_reports(reports: list[Path], dest: Path) -> list[Path]:
    """Move report files into ``dest`` (created if missing), each replacing any older file atomically.

    A provider-only report is computed from the real rows (closest-record distances among them), so it is
    written owner-only (0600) wherever ``dest`` lies; the researcher-facing ones are meant to be published
    (0644).
    """
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for r in reports:
        tmp = dest / f".{r.name}.tmp"
        tmp.unlink(missing_ok=True)
        mode = 0o600 if PROVIDER_ONLY_MARK in r.name else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f, open(r, "rb") as src:
            shutil.copyfileobj(src, f)
        os.chmod(tmp, mode)  # whatever the umask
        target = dest / r.name
        tmp.replace(target)
        out.append(target)
    return out


def run_add(args: argparse.Namespace) -> int:
    # Everything is validated before anything is written: a refusal leaves store and keys untouched.
    _check_synthesis_args(args)
    upload = _check_cloud_args(args)
    with tempfile.TemporaryDirectory(prefix="dcr-synthesis-") as work:
        if upload is not None and args.hub_copy is None:
            args.store = str(Path(work) / "store")  # built here, then uploaded
        return _run_add(args, Path(work), upload)


def _check_cloud_args(args: argparse.Namespace) -> GsUri | None:
    """The upload destination for a gs:// store (None for a directory), once the cloud options agree."""
    cloud = str(args.store).startswith("gs://")
    if args.kms_key is not None:
        check_kms_key(args.kms_key)
        if args.platform != "confidential-space":
            raise DCRError(
                "--kms-key is for --platform confidential-space", hint="add --platform confidential-space"
            )
    if not cloud:
        if "://" in str(args.store):
            raise DCRError(
                f"--store {args.store!r} is neither a directory nor a Cloud Storage location",
                hint="give a directory, or gs://BUCKET/PREFIX",
            )
        if args.hub_copy is not None:
            raise DCRError("--hub-copy is only for a gs:// --store")
        args.store = Path(args.store)
        return None
    if args.kms_key is None or args.keys is None:
        raise DCRError(
            "a gs:// store needs --kms-key (the enclave unwraps the data key with Cloud KMS) and --keys "
            "(where the key-release condition is kept)"
        )
    return parse_store(args.store)


def _run_add(args: argparse.Namespace, work: Path, upload: GsUri | None = None) -> int:
    if upload is not None and args.hub_copy is not None:
        args.store = args.hub_copy
    store = Store(args.store)
    keys = KeyDirectory(args.keys if args.keys else store.default_keys_dir)
    wrapper: Any = keys if args.kms_key is None else KmsKeyWrapper(args.kms_key, endpoint=args.kms_endpoint)
    # Google's clients first: without credentials the provider is told before any work or write.
    if isinstance(wrapper, KmsKeyWrapper):
        wrapper.connect()
    client = storage_client(args.storage_endpoint, project=args.project_id) if upload is not None else None
    if keys.path.exists():
        ensure_private_dir(keys.path)  # refuses a keys directory others can read, before any work
    check_chunk_size(args.chunk_size)
    if args.max_bytes <= 0:
        raise DCRError("--max-bytes must be positive")
    names = check_synthetic_names(list(args.real), list(args.synthetic_name))
    progress = TerminalProgress()
    reports: list[Path] = []
    if args.synthesize is None:
        protection = Protection(args.protection, args.mechanism, args.epsilon, args.delta)
        synthetic = list(args.synthetic)
    else:
        for real in args.real:
            inspect_input(real, "real file", args.max_bytes)  # links, emptiness, size: before any synthesis
    platform = PlatformCondition.defaults(
        _PLATFORMS[args.platform], project_id=args.project_id, service_accounts=args.service_account
    )
    enclave_digests = [check_digest(d, "--enclave-digest") for d in args.enclave_digest]
    dev_key = keys.path / DEV_HUB_KEY_FILE
    hub_key_file = args.hub_key or dev_key
    thumbprints = hub_key_thumbprints(args.hub_key) if args.hub_key else None
    if args.hub_key is None and dev_key.exists():
        thumbprints = hub_key_thumbprints(dev_key)

    if args.synthesize is not None:
        check_name(args.provider, "provider")
        check_name(args.dataset, "dataset")
        synthetic, protection, reports = synthesize_files(args, work, progress, names)
    prepared = store.prepare(
        args.provider,
        args.dataset,
        list(zip(args.real, synthetic, strict=True)),
        protection,
        args.max_bytes,
        names=names,
    )
    if args.synthesize is None:
        for real, syn in zip(args.real, synthetic, strict=True):
            check_synthetic_schema(real, syn, args.max_bytes)
    existing = (
        store.load(prepared.provider, prepared.dataset, prepared.version)
        if store.exists(prepared.provider, prepared.dataset, prepared.version)
        else None
    )
    if upload is not None:
        # Encrypting again would give other ciphertext (a new data key) for the same version.
        rel = store.version_dir(prepared.provider, prepared.dataset, prepared.version).relative_to(store.root)
        there = uploaded_manifest(rel.as_posix(), upload, client)
        if there is not None:
            print(
                f"{prepared.provider}/{prepared.dataset} version {prepared.version} is already in {upload}; nothing changed."
            )
            return 0
    if existing is not None and existing.files_mac is not None and upload is None:  # v1: rebuilt below
        print(
            f"{existing.ref} version {existing.version} is already in the store {store.root}; nothing changed."
        )
        print()
        print(hub_snippet(store, existing, args.release, description=args.description))
        return 0

    result = store.commit(prepared, wrapper, args.chunk_size, progress=progress.bytes("encrypting"))
    progress.done()
    manifest = result.manifest
    if upload is not None:
        objects = upload_version(result.path, rel.as_posix(), upload, client)
        print(
            f"Uploaded {manifest.ref} version {manifest.version} to {upload}{rel}/ ({len(objects)} objects)"
        )
    if not result.created and upload is None:  # a concurrent add of the same content got there first
        print(
            f"{manifest.ref} version {manifest.version} is already in the store {store.root}; nothing changed."
        )
        return 0
    if thumbprints is None:  # the local development hub key, created on first use (once the data is in)
        ensure_private_dir(keys.path)
        thumbprints = [thumbprint(public_jwk(load_or_create_key(dev_key)))]
    condition = KeyReleaseCondition(
        provider=manifest.provider,
        dataset=manifest.dataset,
        # Retired versions stay: retiring stops new grants, not the jobs whose grants already pin a version.
        versions=tuple(m.version for m in store.versions(manifest.provider, manifest.dataset)),
        platform=platform,
        enclave_digests=tuple(enclave_digests or [current_measurement()]),
        hub_key_thumbprints=tuple(thumbprints),
    )
    condition_path = keys.write_condition(condition)

    files = ", ".join(f"{f.name} ({f.size} bytes)" for f in manifest.files)
    if result.upgraded:
        print(
            f"Re-registered {manifest.ref} version {manifest.version}: {files}\n"
            "  its old manifest had no file-list MAC (the enclave refuses such manifests); the files were "
            "encrypted again under a new data key and the manifest now commits to them."
        )
    else:
        print(f"Added {manifest.ref} version {manifest.version}: {files}")
    print(f"  manifest: {result.path / 'manifest.json'}")
    p = manifest.protection
    if p.kind == "dp":
        delta = "" if p.delta is None else f", δ = {p.delta:g}"
        print(f"  synthetic: {p.mechanism or 'dp'}, ε = {p.epsilon:g}{delta} (differentially private)")
    elif args.synthesize is not None:
        print(f"  synthetic: {p.mechanism} (drawn from the declared schema alone)")
    for_researchers: list[Path] = []
    if reports:
        for r in _deliver_reports(reports, args.report):
            audience = "provider only" if "provider-only" in r.name else "for researchers (DP statistics)"
            print(f"  fidelity report ({audience}): {r}")
            if RESEARCHERS_MARK in r.name:
                for_researchers.append(r.resolve())
    print()
    cloud = None if upload is None else {"store": str(upload), "kms_key": args.kms_key}
    hub_store = store if upload is None or args.hub_copy is not None else None
    print(
        hub_snippet(
            hub_store,
            manifest,
            args.release,
            description=args.description,
            reports=for_researchers,
            cloud=cloud,
        )
    )
    print()
    print(condition_text(condition, condition_path, hub_key_file, dev=args.hub_key is None))
    return 0


def hub_snippet(
    store: Store | None,
    manifest: DatasetVersion,
    release: str,
    *,
    description: str | None = None,
    reports: list[Path] | None = None,
    cloud: dict[str, str] | None = None,
) -> str:
    """The ``jupyterhub_config.py`` lines that make the hub offer this dataset version.

    ``entitled`` is an empty placeholder the admin must fill in (the hub warns at start about a dataset
    nobody is entitled to). ``reports`` are the researcher-facing fidelity reports just written (never the
    provider-only ones): the first HTML one (else the first) is named as ``fidelity_report``.
    """
    p = manifest.protection
    protection = p.kind + (f", ε={p.epsilon:g}" if p.epsilon is not None else "")
    synthetic = "".join(f"            {f.name!r}: {f.synthetic_sha256!r},\n" for f in manifest.files)
    shown = [r for r in reports or [] if RESEARCHERS_MARK in r.name]
    shown.sort(key=lambda r: r.suffix.lower() != ".html")
    report = ""
    if shown:
        report = (
            "        # The researcher-facing fidelity report just written (DP statistics); the hub serves it to\n"
            "        # entitled users. Never name the provider-only report (computed from the real rows).\n"
            f"        'fidelity_report': {str(shown[0])!r},\n"
        )
    about = "what the dataset is, shown to researchers" + ("" if description else ": fill in")
    store_line = (
        f"        'store': {str(store.root)!r},\n"
        if store is not None
        else "        # The hub's copy of the manifest and synthetic files (copy them from the bucket): fill in.\n"
        "        'store': '/srv/dcr/store',\n"
    )
    cloud_lines = ""
    if cloud is not None:
        cloud_lines = (
            "        # Where the enclave reads the encrypted version, the KMS key that wraps its data key, and\n"
            "        # the pool provider whose condition releases it (`dcr provider policy --gcp`): fill in.\n"
            f"        'cloud': {{'store': {cloud['store']!r}, 'kms_key': {cloud['kms_key']!r},\n"
            "                  'wip_provider': 'projects/<number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>'},\n"
        )
    return (
        f"{_RULE}\n"
        f"# Hub side: add to jupyterhub_config.py (merge into c.DCRPolicy.datasets if it already lists\n"
        f"# other datasets; the key {manifest.ref!r} is how entitlements refer to this dataset).\n"
        f"{_RULE}\n"
        f"c.DCRPolicy.datasets = {{\n"
        f"    {manifest.ref!r}: {{\n"
        f"        # The content digest of the registered version; jobs run on exactly this data.\n"
        f"        'version': {manifest.version!r},\n"
        f"{store_line}"
        f"{cloud_lines}"
        f"        # Synthetic files (name: sha256) shown to entitled users at /data/{manifest.ref}/<name>;\n"
        f"        # protection: {protection}.\n"
        f"        'synthetic': {{\n"
        f"{synthetic}"
        f"        }},\n"
        f"        # 'review': every output waits for the provider's approval; 'auto': released at once.\n"
        f"        'release': {release!r},\n"
        f"        # Hub user names and JupyterHub groups (which must exist in the hub). Until you fill this in,\n"
        f"        # nobody may use the dataset (the hub logs a warning at start).\n"
        f"        'entitled': {{'users': [], 'groups': []}},  # who may use it: fill in\n"
        f"        'description': {description or ''!r},  # {about}\n"
        f"{report}"
        f"    }},\n"
        f"}}"
    )


def condition_text(condition: KeyReleaseCondition, path: Path, hub_key_file: Path, *, dev: bool) -> str:
    lines = [
        _RULE,
        f"# Provider side: key-release condition for {condition.ref}, written to",
        f"#   {path}",
        "# The data key is released only to an enclave matching all of it.",
    ]
    if dev:
        lines.append(
            f"# Hub key: the LOCAL DEVELOPMENT key {hub_key_file}\n"
            "# (for local development only; pass --hub-key with your hub's public key for anything else)."
        )
    else:
        lines.append(f"# Hub key: {hub_key_file}")
    missing = condition.platform.missing()
    if missing:
        lines.append(
            f"# INCOMPLETE: set {' and '.join(missing)} (--project-id, --service-account) before this condition"
            " is deployed."
        )
    lines.append(_RULE)
    lines.append(json.dumps(condition.to_json(), indent=2, ensure_ascii=False))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------------------


def run_policy(args: argparse.Namespace) -> int:
    keys = KeyDirectory(args.keys)
    condition = keys.read_condition(
        check_name(args.provider, "provider"), check_name(args.dataset, "dataset")
    )
    if condition is None:
        raise DCRError(
            f"{args.provider}/{args.dataset} has no key-release condition in {args.keys}",
            hint="`dcr provider add --platform confidential-space ... --keys DIR` writes it",
        )
    policy = gcp_policy(
        condition, wip_provider=args.wip_provider, kms_key=args.kms_key, store=parse_store(args.store)
    )
    print(json.dumps(policy, indent=2) if args.format == "json" else gcp_policy_text(policy))
    return 0


def run_retire(args: argparse.Namespace) -> int:
    store = Store(args.store)
    version = check_digest(args.version, "--version")
    manifest, changed = store.retire(args.provider, args.dataset, version)
    if changed:
        print(f"Retired {manifest.ref} version {manifest.version}: it gets no new grants.")
        print("  Grants issued before keep decrypting it; its files, key and condition are unchanged.")
    else:
        print(f"{manifest.ref} version {manifest.version} was already retired; nothing changed.")
    return 0


def run_list(args: argparse.Namespace) -> int:
    store = Store(args.store)
    if not store.root.is_dir():
        raise DCRError(f"the store {store.root} does not exist", hint="create it with `dcr provider add`")
    rows: list[list[Any]] = []
    for m in store.manifests():
        p = m.protection
        rows.append(
            [
                m.provider,
                m.dataset,
                m.version,
                p.kind + (f" ({p.mechanism})" if p.mechanism else ""),
                "-" if p.epsilon is None else f"{p.epsilon:g}",
                len(m.files),
                "yes" if m.retired else "no",
                m.created,
            ]
        )
    if not rows:
        print(f"no datasets in {store.root}")
        return 0
    header = ["PROVIDER", "DATASET", "VERSION", "PROTECTION", "EPSILON", "FILES", "RETIRED", "CREATED"]
    table = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
