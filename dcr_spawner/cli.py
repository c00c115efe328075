"""``dcr hub-key``: the hub's grant signing key, made before the hub first starts.

Providers pin the hub's key in their key-release conditions (``dcr provider add --hub-key``) and the
enclave host accepts only grants it signed (``dcr enclave-host --hub-key``); the hub refuses to start with a
dataset not yet in the store. So the key comes first: this command creates it (owner-only, the same file
``c.DCRPolicy.hub_key_file`` names; an existing key is kept) and writes its public JWKS for the others.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dcr_enclave.formats.errors import DCRError

from .hubkey import load_or_create_hub_key


def register(sub: Any) -> None:
    p = sub.add_parser(
        "hub-key",
        help="create the hub's grant signing key (if absent) and write its public JWKS",
        description="Create the hub's grant signing key before the hub first starts (kept if it exists) "
        "and write its public JWKS, which providers (`dcr provider add --hub-key`) and the enclave host "
        "(`dcr enclave-host --hub-key`) pin. Give the same path as c.DCRPolicy.hub_key_file.",
    )
    p.add_argument("key_file", type=Path, help="the private key file (created 0600; its directory 0700)")
    p.add_argument(
        "--public",
        type=Path,
        metavar="FILE",
        help="write the public JWKS here (0644); default: print it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key = load_or_create_hub_key(args.key_file)
    text = json.dumps(key.jwks(), indent=2) + "\n"
    if args.public is None:
        print(text, end="")
    else:
        _write_public(args.public, text)
        print(f"hub key {key.path} (thumbprint {key.thumbprint}); public JWKS written to {args.public}")
    return 0


def _write_public(path: Path, text: str) -> None:
    """Write the public JWKS atomically: a reader never sees half a key."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise DCRError(f"cannot write the public JWKS to {path}: {e.strerror}") from None
