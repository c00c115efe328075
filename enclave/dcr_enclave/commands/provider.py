"""``dcr provider add`` and ``dcr provider list``: how a data provider registers datasets.

``add`` validates the real and synthetic files, computes the content-addressed version, encrypts the real
files into the store under a fresh data key (wrapped under the provider's KEK), copies the synthetic files
under the real files' names, writes the manifest and the provider's key-release condition, and prints the
two things people copy elsewhere: the hub-side snippet for ``jupyterhub_config.py`` and the condition.
Adding content that is already in the store changes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import jwk
from ..condition import KeyReleaseCondition, PlatformCondition
from ..dataset import PROTECTION_KINDS, DatasetVersion, Protection
from ..digests import check_digest
from ..errors import DCRError
from ..keys import KeyDirectory, ensure_private_dir
from ..measure import current_measurement
from ..store import DEFAULT_MAX_BYTES, DEV_HUB_KEY_FILE, Store
from ..streamcrypt import DEFAULT_CHUNK_SIZE, check_chunk_size

_PLATFORMS = {"local": "local", "confidential-space": "confidential_space"}
_RULE = "# " + "-" * 100


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
        "--synthetic, in order; each file keeps the real file's name in both stages.",
    )
    add.add_argument("--store", type=Path, required=True, metavar="DIR", help="the dataset store directory")
    add.add_argument("--provider", required=True, metavar="NAME", help="provider name, e.g. acme")
    add.add_argument("--dataset", required=True, metavar="NAME", help="dataset name, e.g. insurance")
    add.add_argument("--real", type=Path, action="append", required=True, metavar="FILE", help="a real file")
    add.add_argument(
        "--synthetic", type=Path, action="append", required=True, metavar="FILE", help="its synthetic version"
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.provider_command == "add":
        return run_add(args)
    return run_list(args)


# ---------------------------------------------------------------------------------------------------------
# add
# ---------------------------------------------------------------------------------------------------------


def hub_key_thumbprints(path: Path) -> list[str]:
    """Thumbprints of the hub key(s) in a PEM (public or private) or JWKS file; reads only public parts."""
    try:
        head = path.read_bytes()[: jwk.MAX_JWKS_BYTES + 1]
    except OSError as e:
        raise DCRError(f"cannot read the hub key {path}: {e.strerror}") from None
    if b"PRIVATE KEY-----" in head:
        return [jwk.thumbprint(jwk.public_jwk(jwk.read_private_key(path)))]
    return [jwk.thumbprint(k) for k in jwk.load_jwks_file(path, "hub key file")]


def run_add(args: argparse.Namespace) -> int:
    # Everything is validated before anything is written: a refusal leaves store and keys untouched.
    store = Store(args.store)
    keys = KeyDirectory(args.keys if args.keys else store.default_keys_dir)
    if len(args.real) != len(args.synthetic):
        raise DCRError(
            f"{len(args.real)} --real but {len(args.synthetic)} --synthetic files",
            hint="pass one --synthetic after each --real",
        )
    if keys.path.exists():
        ensure_private_dir(keys.path)  # refuses a keys directory others can read, before any work
    check_chunk_size(args.chunk_size)
    if args.max_bytes <= 0:
        raise DCRError("--max-bytes must be positive")
    protection = Protection(args.protection, args.mechanism, args.epsilon, args.delta)
    platform = PlatformCondition.defaults(
        _PLATFORMS[args.platform], project_id=args.project_id, service_accounts=args.service_account
    )
    enclave_digests = [check_digest(d, "--enclave-digest") for d in args.enclave_digest]
    dev_key = keys.path / DEV_HUB_KEY_FILE
    hub_key_file = args.hub_key or dev_key
    thumbprints = hub_key_thumbprints(args.hub_key) if args.hub_key else None
    if args.hub_key is None and dev_key.exists():
        thumbprints = hub_key_thumbprints(dev_key)

    prepared = store.prepare(
        args.provider,
        args.dataset,
        list(zip(args.real, args.synthetic, strict=True)),
        protection,
        args.max_bytes,
    )
    if store.exists(prepared.provider, prepared.dataset, prepared.version):
        existing = store.load(prepared.provider, prepared.dataset, prepared.version)
        print(
            f"{existing.ref} version {existing.version} is already in the store {store.root}; nothing changed."
        )
        print()
        print(hub_snippet(store, existing, args.release))
        return 0

    if thumbprints is None:  # the local development hub key, created on first use
        ensure_private_dir(keys.path)
        thumbprints = [jwk.thumbprint(jwk.public_jwk(jwk.load_or_create_key(dev_key)))]
    result = store.commit(prepared, keys, args.chunk_size)
    manifest = result.manifest
    if not result.created:  # a concurrent add of the same content got there first
        print(
            f"{manifest.ref} version {manifest.version} is already in the store {store.root}; nothing changed."
        )
        return 0
    condition = KeyReleaseCondition(
        provider=manifest.provider,
        dataset=manifest.dataset,
        versions=tuple(
            m.version for m in store.versions(manifest.provider, manifest.dataset) if not m.retired
        ),
        platform=platform,
        enclave_digests=tuple(enclave_digests or [current_measurement()]),
        hub_key_thumbprints=tuple(thumbprints),
    )
    condition_path = keys.write_condition(condition)

    files = ", ".join(f"{f.name} ({f.size} bytes)" for f in manifest.files)
    print(f"Added {manifest.ref} version {manifest.version}: {files}")
    print(f"  manifest: {result.path / 'manifest.json'}")
    print()
    print(hub_snippet(store, manifest, args.release))
    print()
    print(condition_text(condition, condition_path, hub_key_file, dev=args.hub_key is None))
    return 0


def hub_snippet(store: Store, manifest: DatasetVersion, release: str) -> str:
    """The ``jupyterhub_config.py`` lines that make the hub offer this dataset version."""
    p = manifest.protection
    protection = p.kind + (f", ε={p.epsilon:g}" if p.epsilon is not None else "")
    synthetic = "".join(f"            {f.name!r}: {f.synthetic_sha256!r},\n" for f in manifest.files)
    return (
        f"{_RULE}\n"
        f"# Hub side: add to jupyterhub_config.py (merge into c.DCRPolicy.datasets if it already lists\n"
        f"# other datasets; the key {manifest.ref!r} is how entitlements refer to this dataset).\n"
        f"{_RULE}\n"
        f"c.DCRPolicy.datasets = {{\n"
        f"    {manifest.ref!r}: {{\n"
        f"        # The content digest of the registered version; jobs run on exactly this data.\n"
        f"        'version': {manifest.version!r},\n"
        f"        'store': {str(store.root)!r},\n"
        f"        # Synthetic files (name: sha256) shown to entitled users at /data/{manifest.ref}/<name>;\n"
        f"        # protection: {protection}.\n"
        f"        'synthetic': {{\n"
        f"{synthetic}"
        f"        }},\n"
        f"        # 'review': every output waits for the provider's approval; 'auto': released at once.\n"
        f"        'release': {release!r},\n"
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
