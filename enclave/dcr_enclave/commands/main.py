"""The ``dcr`` command line.

Subcommands live one per module in :mod:`dcr_enclave.commands`; other distributions (the hub side, the
server extension) add theirs through the ``dcr.commands`` entry-point group, each entry point naming a
``register(subparsers)`` function. Every refusal is a :class:`~dcr_enclave.formats.errors.DCRError`, printed as
``dcr: error: <what is wrong> (<what to do>)`` with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from dcr_enclave import __version__
from dcr_enclave.formats.errors import DCRError

#: Subcommands this distribution provides (module names under dcr_enclave.commands).
BUILTIN_COMMANDS = ("provider", "local_run", "enclave_host", "verify")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcr",
        description="DCR, the JupyterHub Data Clean Room: run notebooks on data you may not see.",
    )
    parser.add_argument("--version", action="version", version=f"dcr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in BUILTIN_COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    for ep in entry_points(group="dcr.commands"):
        try:
            register = ep.load()
        except ImportError as e:  # a half-installed plug-in must not take the whole command down
            print(f"dcr: warning: commands from {ep.value} are unavailable: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DCRError as e:
        print(f"dcr: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dcr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
