"""Build hook of jupyterhub-dcr: a wheel carries the prebuilt JupyterLab extension. Metadata is in setup.cfg.

The extension is installed as data files into ``<prefix>/share/jupyter/labextensions/@jupyterhub-dcr/
labextension/`` (where JupyterLab finds prebuilt extensions), with ``install.json`` naming this package.
npm builds it, not this script (``make jupyter``, docs/labextension.md), so a wheel or sdist of a checkout
where it is not built is refused with what to run, never built without it. Editable installs (``pip install
-e``, what the Makefile runs before the extension can be built) leave it out: the Makefile links the build
output into the virtualenv, so a rebuild shows up without reinstalling.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.sdist import sdist

NAME = "@jupyterhub-dcr/labextension"
SOURCE = PurePosixPath("dcr_labextension")
BUILT = SOURCE / "labextension"
TARGET = PurePosixPath("share/jupyter/labextensions") / NAME
HERE = Path(__file__).resolve().parent


def labextension_data_files() -> list[tuple[str, list[str]]]:
    """``data_files`` entries for the built extension; SystemExit saying what to run when it is not built."""
    built = HERE / BUILT
    build_hint = (
        "build it first: `make jupyter` in the checkout, or in dcr_labextension/: `npm ci && npm run build` "
        "with a JupyterLab 4 environment's bin/ on PATH (docs/labextension.md)"
    )
    if not (built / "package.json").is_file():
        raise SystemExit(
            f"jupyterhub-dcr: the JupyterLab extension is not built ({BUILT}/package.json is missing); "
            + build_hint
        )
    try:
        meta = json.loads((built / "package.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"jupyterhub-dcr: cannot read {BUILT}/package.json ({e}); {build_hint}") from None
    if not any((built / "static").glob("remoteEntry.*.js")):
        raise SystemExit(f"jupyterhub-dcr: {BUILT}/static/ holds no remoteEntry.*.js; {build_hint}")
    if meta.get("name") != NAME:
        raise SystemExit(f"jupyterhub-dcr: {BUILT}/package.json names {meta.get('name')!r}, not {NAME!r}")
    source = HERE / SOURCE / "package.json"
    if source.is_file() and json.loads(source.read_text()).get("version") != meta.get("version"):
        raise SystemExit(
            f"jupyterhub-dcr: {BUILT} was built from another version than {SOURCE}/; {build_hint}"
        )

    groups: dict[str, list[str]] = {str(TARGET): [str(SOURCE / "install.json")]}
    for path in sorted(built.rglob("*")):
        if path.is_file():
            rel = PurePosixPath(path.relative_to(built).as_posix())
            groups.setdefault(str(TARGET / rel.parent), []).append(str(BUILT / rel))
    return sorted(groups.items())


def _with_labextension(command: bdist_wheel | sdist) -> None:
    dist = command.distribution
    dist.data_files = [*(dist.data_files or []), *labextension_data_files()]


class BdistWheelWithLabextension(bdist_wheel):
    """``bdist_wheel`` that adds the built extension (at run time: editable installs finalize this command
    for its metadata but never run it)."""

    def run(self) -> None:
        _with_labextension(self)
        super().run()


class SdistWithLabextension(sdist):
    """``sdist`` that carries the built extension, so a wheel built from the sdist has it too."""

    def run(self) -> None:
        _with_labextension(self)
        super().run()


setup(cmdclass={"bdist_wheel": BdistWheelWithLabextension, "sdist": SdistWithLabextension})
