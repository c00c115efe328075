"""The server extension's REST API, end to end: a real Jupyter server (pytest-jupyter) with
``dcr_server_ext`` enabled, a real enclave host, real kernels on the real insurance data.

Every response is checked against ``dcr_server_ext/openapi.yaml``; every refusal must be a 4xx with a JSON
``{"error": ...}`` that says what is wrong and must leave the job store (and the extension's data
directory) exactly as it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import psutil
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jupyter_server.auth import Authorizer
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from tornado.httputil import HTTPHeaders
from traitlets import TraitError
from traitlets.config import Config

import dcr_server_ext
from dcr_enclave.formats.contract import TERMINAL_STATES
from dcr_enclave.formats.digests import canonical_json, sha256_bytes
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import read_private_key
from dcr_enclave.pack.store import Store
from dcr_server_ext import _jupyter_server_extension_points
from dcr_server_ext.app import DCRExtension
from dcr_server_ext.events import EVENT_SCHEMA_ID
from dcr_server_ext.grant_sources import DevGrantSource
from dcr_server_ext.handlers import CHUNK_BYTES, MAX_BODY_BYTES

pytestmark = [pytest.mark.root]

PACKAGE = Path(dcr_server_ext.__file__).resolve().parent
SPEC = OpenAPI.from_file_path(str(PACKAGE / "openapi.yaml"))
#: A row of the real file that the synthetic file does not contain: seeing it anywhere means a leak.
REAL_ROW = "28,male,33,3,no,southeast,4449.462"
#: The shared config keeps bundles small so "oversized workspace" needs only a handful of files.
MAX_BUNDLE_FILES = 4
EVENT_FIELDS = {"job_id", "state", "cell", "cells", "reason"}

SUCCESS_CELLS = [
    "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
    "import os\nos.makedirs('sub', exist_ok=True)\n"
    "with open('sub/x.txt', 'w') as f:\n    f.write(f'rows={len(df)}\\n')\n"
    "df.groupby('smoker')['charges'].mean().to_csv('summary.csv')\n"
    "with open('blob.bin', 'wb') as f:\n    f.write(os.urandom(700_000))",
    "len(df)",
]
SLOW_CELLS = [
    "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
    "import time\ntime.sleep(600)",
]


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def extra_config() -> dict[str, Any]:
    """Per-test additions to the server config (tests parametrize this name directly)."""
    return {}


@pytest.fixture
def dcr_data(tmp_path: Path) -> Path:
    return tmp_path / "dcr-data"


@pytest.fixture
def jp_server_config(store, host, tmp_path: Path, dcr_data: Path, extra_config: dict[str, Any]) -> Config:
    config = Config(
        {
            "ServerApp": {
                "jpserver_extensions": {"dcr_server_ext": True},
                "allow_root": True,
                "reraise_server_extension_failures": True,
            },
            "DCRExtension": {
                "data_dir": str(dcr_data),
                "db_url": f"sqlite:///{tmp_path / 'db' / 'jobs.sqlite'}",
                "max_bundle_files": MAX_BUNDLE_FILES,
            },
            "LocalBackend": {"socket_path": str(host.socket)},
            "DevGrantSource": {"key_file": str(store.hub_key_path), "store": str(store.root)},
        }
    )
    config.merge(Config(extra_config))
    return config


@pytest.fixture
def dcr_server(jp_serverapp, jp_asyncio_loop):
    """The server with the extension started (pytest-jupyter does not run the post-start hooks)."""
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())
    return jp_serverapp


@dataclass
class Reply:
    code: int
    headers: HTTPHeaders
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        doc = self.json
        assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], doc
        return str(doc["error"])


Api = Callable[..., Awaitable[Reply]]


def _check_openapi(method: str, path: str, params: dict[str, str] | None, reply: Reply) -> None:
    content_type = reply.headers.get("Content-Type", "").split(";")[0]
    request = MockRequest("http://localhost", method, path, args=params or {})
    response = MockResponse(
        reply.body, status_code=reply.code, headers=dict(reply.headers), content_type=content_type
    )
    SPEC.validate_response(request, response)


@pytest.fixture
def api(dcr_server, jp_fetch) -> Api:
    """Call ``/dcr/api/...``; every answer is checked against openapi.yaml unless ``validate=False``."""

    async def call(
        method: str,
        *parts: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        validate: bool = True,
    ) -> Reply:
        kwargs: dict[str, Any] = {"method": method, "raise_error": False}
        if isinstance(body, bytes | str):
            kwargs["body"] = body
        elif body is not None:
            kwargs["body"] = json.dumps(body)
        elif method == "POST":
            kwargs["body"] = b""
        r = await jp_fetch("dcr", "api", *parts, params=params, headers=dict(headers or {}), **kwargs)
        reply = Reply(r.code, r.headers, r.body or b"")
        if validate:
            # Each part is one path parameter for the spec: a nested output path is one {path} value.
            spec_path = "/dcr/api/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)
            _check_openapi(method, spec_path, params, reply)
        return reply

    return call


async def _snapshot(api: Api, dcr_data: Path, root: Path) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was: the store (through the API), the extension's
    job directories and keys, and the outputs folder in the server root."""
    listing = (await api("GET", "jobs", params={"limit": "500"})).json
    jobs = sorted(p.name for p in (dcr_data / "jobs").iterdir())
    keys = sorted(p.name for p in (dcr_data / "keys").iterdir())
    outputs = (
        sorted(str(p.relative_to(root)) for p in (root / "dcr-jobs").rglob("*"))
        if (root / "dcr-jobs").exists()
        else []
    )
    return listing, jobs, keys, outputs


def _notebook(root: Path, rel: str, cells: list[str]) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


async def _wait_job(
    api: Api, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 180
) -> dict:
    """Poll the job until ``done(job)``; the timeout only guards against a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        job = (await api("GET", "jobs", job_id)).json
        if done(job):
            return job
        if loop.time() > deadline:
            raise AssertionError(f"job never got there: {job}")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def test_extension_point_and_auto_enable_config():
    """The package names DCRExtension as its server extension point, and the config file installed into
    jupyter_server_config.d enables it."""
    assert _jupyter_server_extension_points() == [{"module": "dcr_server_ext", "app": DCRExtension}]
    doc = json.loads(
        (PACKAGE.parent / "jupyter-config/jupyter_server_config.d/dcr_server_ext.json").read_text()
    )
    assert doc == {"ServerApp": {"jpserver_extensions": {"dcr_server_ext": True}}}


def test_every_trait_has_help_an_example_and_a_security_note():
    """Each configurable trait of DCRExtension, LocalBackend, DevGrantSource and HubGrantSource explains
    itself, shows a c.<Class>.<name> example and says what it means for security."""
    from dcr_server_ext.backends.local import LocalBackend
    from dcr_server_ext.grant_sources import DevGrantSource, HubGrantSource

    expected = {
        DCRExtension: {
            "backend_class", "grant_source_class", "db_url", "data_dir", "outputs_dir", "bundle_include",
            "bundle_exclude", "max_bundle_files", "max_bundle_bytes", "reconcile_interval", "airlock_poll_interval", "trust_jwks",
            "trust_roots", "enclave_digests",
        },
        LocalBackend: {"socket_path", "timeout"},
        DevGrantSource: {"key_file", "store", "release", "time_limit"},
        HubGrantSource: {"api_url", "request_timeout"},
    }  # fmt: skip
    for cls, names in expected.items():
        assert names == set(cls.class_own_traits(config=True)), cls
        for name in names:
            text = cls.class_traits()[name].help
            assert f"c.{cls.__name__}.{name} = " in text, (cls, name)
            assert "Example" in text and "Security" in text, (cls, name)


@pytest.mark.parametrize(
    ("trait", "value"),
    [
        ("backend_class", "no_such_module.Backend"),
        ("backend_class", "dcr_server_ext.model.Job"),
        ("grant_source_class", "dcr_server_ext.grant_sources.NoSuchSource"),
        ("grant_source_class", "dcr_server_ext.backends.local.LocalBackend"),
        ("data_dir", "relative/dcr"),
        ("db_url", "not a database url"),
        ("outputs_dir", "../outside"),
        ("outputs_dir", "/abs/outputs"),
        ("outputs_dir", ".hidden"),
        ("bundle_include", ["../up"]),
        ("bundle_exclude", ["/etc"]),
        ("enclave_digests", ["sha256:short"]),
        ("enclave_digests", ["4f0c" * 16]),
        ("max_bundle_files", -1),
        ("max_bundle_files", 0),
        ("max_bundle_bytes", -5),
        ("reconcile_interval", 0),
    ],
)
def test_bad_config_is_refused_naming_the_trait(trait: str, value: Any):
    """A bad value for a trait (unimportable or wrong class, relative data_dir, a URL that is no URL,
    outputs outside the root, escaping patterns, non-positive limits) is refused with its name."""
    with pytest.raises(TraitError, match=rf"DCRExtension\.{trait}"):
        DCRExtension(config=Config({"DCRExtension": {trait: value}}))


@pytest.mark.parametrize(
    ("trait", "value", "message"),
    [
        ("LocalBackend.timeout", -1.0, "LocalBackend.timeout must be a positive number of seconds"),
        ("LocalBackend.timeout", 0, "LocalBackend.timeout must be a positive number of seconds"),
        ("LocalBackend.timeout", float("nan"), "LocalBackend.timeout must be a positive number of seconds"),
        ("LocalBackend.timeout", float("inf"), "LocalBackend.timeout must be a positive number of seconds"),
        ("LocalBackend.socket_path", "relative.sock", "LocalBackend.socket_path must be an absolute path"),
        ("HubGrantSource.api_url", "ftp://hub/api", "HubGrantSource.api_url must be an http:// or https://"),
        ("HubGrantSource.api_url", "file:///etc/passwd", "HubGrantSource.api_url must be an http://"),
        ("HubGrantSource.api_url", "hub.internal:8081/hub/api", "HubGrantSource.api_url must be an http://"),
        ("HubGrantSource.api_url", "http:///hub/api", "HubGrantSource.api_url must be an http://"),
        ("HubGrantSource.request_timeout", -5, "HubGrantSource.request_timeout must be a positive number"),
        ("HubGrantSource.request_timeout", 0, "HubGrantSource.request_timeout must be a positive number"),
        ("DevGrantSource.time_limit", 0, "DevGrantSource.time_limit must be a positive number"),
        ("DevGrantSource.store", "relative/store", "DevGrantSource.store must be an absolute path"),
    ],
)
def test_bad_backend_and_grant_source_config_is_refused_naming_the_trait(
    trait: str, value: Any, message: str
):
    """A bad value for a trait of the local backend or a grant source (a timeout that is not a positive
    number, a hub URL that is not http(s), a relative path) is refused with a message naming the trait."""
    from dcr_server_ext.backends.local import LocalBackend
    from dcr_server_ext.grant_sources import DevGrantSource, HubGrantSource

    section, name = trait.split(".")
    cls = {"LocalBackend": LocalBackend, "DevGrantSource": DevGrantSource, "HubGrantSource": HubGrantSource}
    with pytest.raises((TraitError, ValueError)) as refused:
        cls[section](config=Config({section: {name: value}}))
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("trait", "value"),
    [
        ("LocalBackend.timeout", 2.5),
        ("HubGrantSource.api_url", "https://hub.example.org/hub/api"),
        ("HubGrantSource.api_url", "http://127.0.0.1:8081/hub/api"),
        ("HubGrantSource.api_url", ""),
        ("HubGrantSource.request_timeout", 5),
    ],
)
def test_good_backend_and_grant_source_config_is_kept(trait: str, value: Any):
    """Valid values (a positive timeout, an http(s) hub URL, or none to use $JUPYTERHUB_API_URL) are kept."""
    from dcr_server_ext.backends.local import LocalBackend
    from dcr_server_ext.grant_sources import HubGrantSource

    section, name = trait.split(".")
    cls = {"LocalBackend": LocalBackend, "HubGrantSource": HubGrantSource}[section]
    assert getattr(cls(config=Config({section: {name: value}})), name) == value


@pytest.mark.parametrize(
    ("section", "trait", "value", "message"),
    [
        ("DCRExtension", "max_bundle_bytes", -1, "DCRExtension.max_bundle_bytes must be a positive integer"),
        ("LocalBackend", "socket_path", "relative.sock", "LocalBackend.socket_path must be an absolute path"),
        ("LocalBackend", "timeout", -1.0, "LocalBackend.timeout must be a positive number of seconds"),
    ],
)
def test_bad_config_fails_when_the_server_starts(
    jp_configurable_serverapp, jp_server_config, caplog, capfd, section, trait, value, message
):
    """Starting a server with a bad extension or backend setting stops the server (even where
    jupyter_server would only log a failing extension and go on), and the logged error names the trait."""
    jp_server_config.ServerApp.reraise_server_extension_failures = False
    jp_server_config[section][trait] = value
    with pytest.raises(SystemExit):
        jp_configurable_serverapp(config=jp_server_config)
    logged = caplog.text + capfd.readouterr().err  # the extension's logger writes to stderr
    assert message in logged


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------


async def test_submit_refusals_are_json_4xx_and_change_nothing(
    api, jp_root_dir: Path, dcr_data: Path, tmp_path
):
    """Malformed JSON, wrong types, unknown or duplicate fields, an oversized body, bad, absolute, hidden,
    escaping and missing notebook paths, files that are not notebooks, an oversized workspace and a link
    escaping the workspace are each refused with a 4xx and a JSON message, and leave the store as it was."""
    root = jp_root_dir
    _notebook(root, "work/ok.ipynb", ["1"])
    # One directory per case: a notebook's workspace is its directory.
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("not a notebook")
    (root / "broken").mkdir()
    (root / "broken" / "broken.ipynb").write_text("{ this is not json")
    (root / "folder" / "folder.ipynb").mkdir(parents=True)
    _notebook(root, ".hidden/a.ipynb", ["1"])
    outside = tmp_path / "outside"
    _notebook(outside, "secret.ipynb", ["1"])
    (outside / "secret.txt").write_text("outside the workspace")
    (root / "escape").mkdir()
    (root / "escape" / "escape.ipynb").symlink_to(outside / "secret.ipynb")
    (root / "via").mkdir()
    (root / "via" / "linkdir").symlink_to(outside)
    _notebook(root, "linked/analysis.ipynb", ["1"])
    (root / "linked" / "secret.txt").symlink_to(outside / "secret.txt")
    _notebook(root, "big/analysis.ipynb", ["1"])
    for i in range(MAX_BUNDLE_FILES + 2):
        (root / "big" / f"f{i}.csv").write_text(f"{i}\n")

    before = await _snapshot(api, dcr_data, root)
    assert before[0]["total"] == 0
    cases: list[tuple[Any, int, str]] = [
        (b'{"path": "work/ok.ipynb"', 400, "malformed JSON"),
        (b"", 400, "JSON object"),
        (b"\xff\xfe", 400, "UTF-8"),
        (b'["work/ok.ipynb"]', 400, "JSON object"),
        (b'{"path": NaN}', 400, "NaN"),
        ({"path": "work/ok.ipynb", "priority": 1}, 400, "priority"),
        (b'{"path": "work/ok.ipynb", "path": "x.ipynb"}', 400, "twice"),
        ({"datasets": ["acme/insurance"]}, 400, '"path"'),
        ({"path": 123}, 400, "string"),
        ({"path": ""}, 400, "empty"),
        ({"path": "work/ok.ipynb", "datasets": "acme/insurance"}, 400, "list"),
        ({"path": "work/ok.ipynb", "datasets": ["ACME/Insurance"]}, 400, "provider/dataset"),
        ({"path": "work/ok.ipynb", "datasets": [7]}, 400, "provider/dataset"),
        ({"path": "x" * (MAX_BODY_BYTES + 1)}, 413, str(MAX_BODY_BYTES)),
        ({"path": "../x.ipynb"}, 400, ".."),
        ({"path": "work/../../x.ipynb"}, 400, ".."),
        ({"path": "/etc/passwd"}, 400, "absolute"),
        ({"path": ".hidden/a.ipynb"}, 400, "hidden"),
        ({"path": "work/.ipynb_checkpoints/ok.ipynb"}, 400, "hidden"),
        ({"path": "work//ok.ipynb"}, 400, "empty"),
        ({"path": "missing.ipynb"}, 404, "missing.ipynb"),
        ({"path": "notes/notes.txt"}, 400, "not a notebook"),
        ({"path": "broken/broken.ipynb"}, 400, "broken.ipynb"),
        ({"path": "folder/folder.ipynb"}, 400, "folder.ipynb"),
        ({"path": "escape/escape.ipynb"}, 400, "outside the server root"),
        ({"path": "via/linkdir/secret.ipynb"}, 400, "outside the server root"),
        ({"path": "linked/analysis.ipynb"}, 400, "secret.txt"),
        ({"path": "big/analysis.ipynb"}, 413, str(MAX_BUNDLE_FILES)),
    ]
    for body, code, words in cases:
        reply = await api("POST", "jobs", body=body)
        assert reply.code == code, (body, reply.code, reply.body)
        assert words in reply.error, (body, reply.error)
        assert await _snapshot(api, dcr_data, root) == before, body


async def test_refused_grant_changes_nothing(api, dcr_server, jp_root_dir: Path, dcr_data: Path):
    """A submission whose grant is refused (a dataset the user may not use: the grant source's 403) is a
    403 with the grant source's message, and leaves the store, the job directories (bundles), the keys
    directory and the outputs folder as they were (test_manager.py checks that no event is emitted)."""
    _notebook(jp_root_dir, "work/analysis.ipynb", ["1 + 1"])
    manager = dcr_server.web_app.settings["dcr_manager"]
    before = await _snapshot(api, dcr_data, jp_root_dir)
    for datasets in (["acme/nope"], ["acme/insurance", "globex/nope"]):
        reply = await api("POST", "jobs", body={"path": "work/analysis.ipynb", "datasets": datasets})
        assert reply.code == 403, reply.body
        assert f"no dataset {datasets[-1]} is available to you" in reply.error
        assert await _snapshot(api, dcr_data, jp_root_dir) == before
    assert manager.store.count() == 0


async def test_job_id_and_query_refusals(api, jp_root_dir: Path, dcr_data: Path):
    """Unknown and malformed job ids are 404 on every job endpoint, bad paging parameters and a cancel body
    with fields are 400, an unknown endpoint is a JSON 404; nothing changes."""
    before = await _snapshot(api, dcr_data, jp_root_dir)
    unknown = "job-" + "0" * 24
    for job_id in (unknown, "job-XYZ", "nope"):
        for method, parts in (
            ("GET", ("jobs", job_id)),
            ("POST", ("jobs", job_id, "cancel")),
            ("GET", ("jobs", job_id, "outputs")),
            ("GET", ("jobs", job_id, "outputs", "summary.csv")),
            ("GET", ("jobs", job_id, "receipt")),
        ):
            reply = await api(method, *parts)
            assert reply.code == 404, (method, parts, reply.body)
            assert "no such job" in reply.error
    for params in ({"offset": "-1"}, {"limit": "0"}, {"limit": "501"}, {"limit": "ten"}, {"offset": "1e3"}):
        reply = await api("GET", "jobs", params=params)
        assert reply.code == 400, params
        assert next(iter(params)) in reply.error
    reply = await api("POST", "jobs", unknown, "cancel", body={"force": True})
    assert reply.code == 400 and "force" in reply.error
    reply = await api("GET", "nothing-here", validate=False)
    assert reply.code == 404 and "no such DCR API endpoint" in reply.error
    reply = await api("DELETE", "jobs", validate=False)
    assert reply.code == 405 and reply.error
    assert await _snapshot(api, dcr_data, jp_root_dir) == before


async def test_lone_surrogates_and_deep_nesting_are_400(api, jp_root_dir: Path, dcr_data: Path):
    """A notebook path holding a lone surrogate (JSON ``"\\ud800"``), on submit and dry run, and a body
    nested 30,000 levels deep, on submit, dry run and cancel, are each a 400 with a JSON message; nothing
    changes."""
    _notebook(jp_root_dir, "work/ok.ipynb", ["1"])
    before = await _snapshot(api, dcr_data, jp_root_dir)
    deep = b"[" * 30_000 + b"]" * 30_000
    deep_object = b'{"path": ' + deep + b"}"
    unknown = "job-" + "0" * 24
    for params in (None, {"dry_run": "1"}):
        for body, words in (
            (b'{"path": "\\ud800.ipynb"}', "surrogate"),
            (b'{"path": "work/\\udfff/ok.ipynb"}', "surrogate"),
            (deep, "nested too deeply"),
            (deep_object, "nested too deeply"),
        ):
            reply = await api("POST", "jobs", body=body, params=params)
            assert reply.code == 400, (body[:40], params, reply.code, reply.body[:300])
            assert words in reply.error
    for body in (deep, b'{"\\ud800": 1}'):
        reply = await api("POST", "jobs", unknown, "cancel", body=body)
        assert reply.code == 400, (body[:40], reply.code, reply.body[:300])
        assert reply.error
    assert await _snapshot(api, dcr_data, jp_root_dir) == before


# ---------------------------------------------------------------------------------------------------------
# Property-based: whatever arrives, a 2xx or a JSON 4xx, and the store unchanged
# ---------------------------------------------------------------------------------------------------------

#: Examples per property; with the server in-process one example takes a few milliseconds.
FUZZ_EXAMPLES = 120
#: All of Unicode, lone surrogates included (Hypothesis leaves them out unless asked, and rarely draws them).
UNICODE = st.characters(exclude_categories=()) | st.characters(categories=("Cs",))
TEXT = st.text(UNICODE, max_size=40)
#: Any JSON value: scalars nested in lists and objects.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(UNICODE, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Notebook paths: any text, path-like text, and the one real notebook with a twist.
PATHS = st.one_of(
    TEXT,
    st.lists(st.text(UNICODE, min_size=1, max_size=300), min_size=1, max_size=4).map(
        lambda ps: "/".join(ps) + ".ipynb"
    ),
    st.sampled_from(["work/ok.ipynb", "work/ok.ipynb/", "./work/ok.ipynb", "work/ok.IPYNB"]),
)
#: JSON text nested up to 40,000 levels (json.loads recurses once per level), bare or as the path.
DEEP = st.builds(
    lambda n, wrap: wrap.replace("X", "[" * n + "]" * n),
    st.integers(1, 40_000),
    st.sampled_from(["X", '{"path": X}', '{"path": "a.ipynb", "datasets": X}']),
)
SUBMIT_BODIES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"path": PATHS}, optional={"datasets": JSON_VALUES}),
    st.fixed_dictionaries({"path": JSON_VALUES}),
)
#: URL path segments: any text without surrogates (a URL carries UTF-8 only).
SEGMENTS = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    # No deadline: the machine is shared and the server may pause (garbage collection, other tests);
    # speed is the benchmarks' business, not this test's.
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _json_4xx_or_2xx(reply: Reply, what: Any) -> None:
    assert 200 <= reply.code < 300 or 400 <= reply.code < 500, (what, reply.code, reply.body[:300])
    if reply.code >= 400:
        assert reply.error, what  # JSON {"error": "..."}


def test_any_json_and_any_path_is_2xx_or_json_4xx_and_changes_nothing(
    api, jp_root_dir: Path, dcr_data: Path, jp_asyncio_loop
):
    """Arbitrary JSON bodies and arbitrary Unicode notebook paths on submit, dry run and cancel, and arbitrary
    path segments and query values on every GET endpoint: each answer is a 2xx or a 4xx with a JSON error,
    and the store, job directories, keys and outputs folder stay as they were (the only notebook is
    ``work/ok.ipynb``, which a submit never names exactly)."""
    _notebook(jp_root_dir, "work/ok.ipynb", ["1"])
    run = jp_asyncio_loop.run_until_complete
    before = run(_snapshot(api, dcr_data, jp_root_dir))
    unknown = "job-" + "0" * 24

    @FUZZ_SETTINGS
    @given(body=SUBMIT_BODIES | DEEP, dry_run=st.booleans(), raw=st.booleans())
    def submit(body: Any, dry_run: bool, raw: bool) -> None:
        assume(not (isinstance(body, dict) and body.get("path") == "work/ok.ipynb" and not dry_run))
        if isinstance(body, str):  # already JSON text
            data = body.encode()
        elif raw:  # UTF-8 as sent, a lone surrogate as the (invalid) bytes it would take
            data = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
        else:
            data = json.dumps(body).encode()
        params = {"dry_run": "1"} if dry_run else None
        _json_4xx_or_2xx(run(api("POST", "jobs", body=data, params=params, validate=False)), body)
        if not dry_run:
            assert run(_snapshot(api, dcr_data, jp_root_dir)) == before, body

    @FUZZ_SETTINGS
    @given(body=JSON_VALUES | st.binary(max_size=64) | DEEP, job=st.sampled_from([unknown]) | SEGMENTS)
    def cancel(body: Any, job: str) -> None:
        data = (
            body
            if isinstance(body, bytes)
            else (body if isinstance(body, str) else json.dumps(body)).encode()
        )
        assume(job not in ("", ".", ".."))
        _json_4xx_or_2xx(run(api("POST", "jobs", job, "cancel", body=data, validate=False)), (job, body))

    @FUZZ_SETTINGS
    @given(
        job=st.sampled_from([unknown]) | SEGMENTS,
        tail=st.sampled_from(["", "outputs", "receipt", "verify", "outputs/x"]) | SEGMENTS,
        query=st.dictionaries(st.sampled_from(["offset", "limit", "dry_run", "x"]), SEGMENTS, max_size=3),
    )
    def get(job: str, tail: str, query: dict[str, str]) -> None:
        for parts in (("jobs",), ("datasets",), ("jobs", job), ("jobs", job, tail)):
            if any(p in ("", ".", "..") for p in parts):
                continue
            reply = run(api("GET", *parts, params=query, validate=False))
            _json_4xx_or_2xx(reply, (parts, query))

    submit()
    cancel()
    get()
    assert run(_snapshot(api, dcr_data, jp_root_dir)) == before


async def test_requests_need_authentication_and_xsrf(api, dcr_server, http_server_client, jp_base_url):
    """Without a token the API answers 403 JSON; a browser session (login cookie) may GET, but its POSTs
    are refused without the X-XSRFToken header and accepted past the XSRF check with it."""
    reply = await api("GET", "jobs", headers={"Authorization": ""})
    assert reply.code == 403 and reply.error
    reply = await api("POST", "jobs", body={"path": "x.ipynb"}, headers={"Authorization": ""})
    assert reply.code == 403 and reply.error

    # Log in as a browser does: the login form with the server's token as password.
    login_url = jp_base_url + "login"
    page = await http_server_client.fetch(login_url, raise_error=False)
    xsrf = _cookies(page.headers)["_xsrf"]
    form = urllib.parse.urlencode({"_xsrf": xsrf, "password": dcr_server.identity_provider.token})
    done = await http_server_client.fetch(
        login_url,
        method="POST",
        body=form,
        headers={"Cookie": f"_xsrf={xsrf}"},
        follow_redirects=False,
        raise_error=False,
    )
    assert done.code == 302, done.code
    cookies = {**_cookies(done.headers), "_xsrf": xsrf}
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    browser = {"Authorization": "", "Cookie": cookie}
    assert (await api("GET", "jobs", headers=browser)).code == 200
    reply = await api("POST", "jobs", body={"path": "x.ipynb"}, headers=browser)
    assert reply.code == 403 and "_xsrf" in reply.error
    reply = await api("POST", "jobs", body={"path": "x.ipynb"}, headers={**browser, "X-XSRFToken": xsrf})
    assert reply.code == 404 and "x.ipynb" in reply.error  # past the XSRF check: the notebook is missing


def _cookies(headers: HTTPHeaders) -> dict[str, str]:
    out = {}
    for line in headers.get_list("Set-Cookie"):
        name, _, rest = line.partition("=")
        out[name.strip()] = rest.split(";", 1)[0].strip('"')
    return out


class DenyDCR(Authorizer):
    """Allows everything except the DCR API."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        return resource != "dcr"


@pytest.mark.parametrize("extra_config", [{"ServerApp": {"authorizer_class": DenyDCR}}], ids=["deny-dcr"])
async def test_server_authorizer_decides_on_the_dcr_resource(api, jp_root_dir: Path):
    """The server's authorizer is asked about the "dcr" resource: denying it refuses reads and writes
    with 403 JSON."""
    _notebook(jp_root_dir, "ok.ipynb", ["1"])
    for method, parts, body in (
        ("GET", ("jobs",), None),
        ("POST", ("jobs",), {"path": "ok.ipynb"}),
        ("GET", ("jobs", "job-" + "0" * 24, "receipt"), None),
    ):
        reply = await api(method, *parts, body=body)
        assert reply.code == 403 and "dcr" in reply.error


# ---------------------------------------------------------------------------------------------------------
# Jobs that run
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_notebook_runs_to_success_with_outputs_receipt_and_events(
    api,
    dcr_server,
    jp_ws_fetch,
    http_server_client,
    jp_base_url,
    jp_auth_header,
    jp_root_dir: Path,
    dcr_data: Path,
    host,
    tmp_path,
    run_cli,
    insurance_real,
):
    """A notebook reading /data/acme/insurance/real.csv, submitted through the API, reaches succeeded; the
    event subscriber sees its states and cells and never data; the job lists; outputs list and download
    with their content types (nested paths included); the receipt downloads and `dcr verify` passes on
    it with the host's JWKS pinned; refusals on the finished job (cancel, '..' output paths) change
    nothing."""
    root = jp_root_dir
    _notebook(root, "work/analysis.ipynb", SUCCESS_CELLS)
    ws = await jp_ws_fetch("api", "events", "subscribe")

    reply = await api("POST", "jobs", body={"path": "work/analysis.ipynb"})
    assert reply.code == 201, reply.body
    job = reply.json
    job_id = job["id"]
    assert reply.headers["Location"].endswith(f"/dcr/api/jobs/{job_id}")
    assert job["notebook"] == "work/analysis.ipynb"
    assert [(d["provider"], d["dataset"]) for d in job["datasets"]] == [("acme", "insurance")]

    job = await _wait_job(api, job_id, lambda j: j["state"] in TERMINAL_STATES)
    assert job["state"] == "succeeded", job
    assert job["receipt"] is True and job["outputs_path"] == f"dcr-jobs/{job_id}"
    assert job["progress"] == {"cell": len(SUCCESS_CELLS) - 1, "cells": len(SUCCESS_CELLS)}
    assert job["enclave"]["kind"] == "local" and job["enclave"]["simulated"] is True
    assert job["datasets"][0]["version"].startswith("sha256:")

    # Events: the job's states in lifecycle order and every cell, nothing else.
    events = []
    while not events or events[-1]["state"] != "succeeded":
        raw = await asyncio.wait_for(ws.read_message(), timeout=30)
        assert raw is not None, "the event socket closed"
        assert REAL_ROW not in raw
        msg = json.loads(raw)
        if msg.get("schema_id") == EVENT_SCHEMA_ID and msg.get("job_id") == job_id:
            assert set(msg) == EVENT_FIELDS | {"schema_id"}, msg
            events.append(msg)
    ws.close()
    states = [e["state"] for e in events]
    for state in ("submitted", "granted", "launching", "running", "succeeded"):
        assert state in states, states
    assert states.index("running") < states.index("succeeded")
    cells = sorted({e["cell"] for e in events if e["cells"] is not None and e["cell"] is not None})
    assert cells == list(range(len(SUCCESS_CELLS)))
    assert all(e["reason"] is None for e in events)

    listing = (await api("GET", "jobs")).json
    assert listing["total"] == 1 and [j["id"] for j in listing["jobs"]] == [job_id]
    assert listing["offset"] == 0 and listing["limit"] == 50
    assert (await api("GET", "jobs", params={"offset": "1", "limit": "5"})).json["jobs"] == []

    # Outputs: listed with digests and types, downloaded byte for byte.
    files = {f["path"]: f for f in (await api("GET", "jobs", job_id, "outputs")).json["files"]}
    assert set(files) == {"analysis.ipynb", "summary.csv", "sub/x.txt", "blob.bin"}
    expected_types = {
        "analysis.ipynb": "application/x-ipynb+json",
        "summary.csv": "text/csv",
        "sub/x.txt": "text/plain",
        "blob.bin": "application/octet-stream",  # several chunks: streamed, not buffered
    }
    assert files["blob.bin"]["size"] > 2 * CHUNK_BYTES
    verify_dir = tmp_path / "verify"
    for path, entry in files.items():
        assert entry["content_type"] == expected_types[path]
        got = await api("GET", "jobs", job_id, "outputs", path)
        assert got.code == 200
        assert got.headers["Content-Type"].split(";")[0] == expected_types[path]
        assert got.headers["Content-Disposition"].startswith("attachment; ")
        assert path.rsplit("/", 1)[-1] in got.headers["Content-Disposition"]
        assert sha256_bytes(got.body) == entry["sha256"] and len(got.body) == entry["size"]
        (verify_dir / "outputs" / path).parent.mkdir(parents=True, exist_ok=True)
        (verify_dir / "outputs" / path).write_bytes(got.body)
    # A client that follows the OpenAPI path template sends the nested path's '/' as %2F.
    encoded = await http_server_client.fetch(
        f"{jp_base_url}dcr/api/jobs/{job_id}/outputs/sub%2Fx.txt", headers=jp_auth_header
    )
    assert encoded.body == (verify_dir / "outputs" / "sub" / "x.txt").read_bytes()
    real_rows = len(pd.read_csv(insurance_real))
    assert (verify_dir / "outputs" / "sub" / "x.txt").read_text() == f"rows={real_rows}\n"
    executed = nbformat.reads((verify_dir / "outputs" / "analysis.ipynb").read_text(), as_version=4)
    assert executed.cells[2].outputs[0]["data"]["text/plain"] == str(real_rows)

    # The receipt: the API's manifest is the enclave's receipt.json once written canonically.
    receipt = (await api("GET", "jobs", job_id, "receipt")).json
    manager = dcr_server.web_app.settings["dcr_manager"]
    on_disk = manager.receipt_dir(job_id) / "receipt.json"
    assert canonical_json(receipt["manifest"]) == on_disk.read_bytes()
    assert receipt["manifest"]["job_id"] == job_id
    # The job's image digest is the attested one (the manager takes it from the receipt).
    assert job["enclave"]["image_digest"] == receipt["manifest"]["enclave"]["image_digest"]
    (verify_dir / "receipt.json").write_bytes(canonical_json(receipt["manifest"]))
    (verify_dir / "attestation.jwt").write_text(receipt["token"] + "\n")
    (verify_dir / "signer-jwks.json").write_text(json.dumps(receipt["signer_jwks"]))
    code, text, err = run_cli(
        "verify", verify_dir, "--trust", host.jwks_path, "--enclave-digest", host.host.measurement()
    )
    assert code == 0, text + err
    assert "SIMULATED" in text

    # Refusals on the finished job change nothing.
    before = await _snapshot(api, dcr_data, root)
    reply = await api("POST", "jobs", job_id, "cancel")
    assert reply.code == 409 and "succeeded" in reply.error
    for bad, code in (
        ("../receipt.json", 400),
        ("sub/../summary.csv", 400),
        ("./summary.csv", 400),
        ("../../../../etc/passwd", 400),
        ("nope.txt", 404),
        ("sub", 404),
    ):
        reply = await api("GET", "jobs", job_id, "outputs", bad)
        assert reply.code == code, (bad, reply.body)
        assert reply.error
    assert await _snapshot(api, dcr_data, root) == before
    assert _files_containing([root, dcr_data], REAL_ROW) == []


def _files_containing(roots: list[Path], marker: str) -> list[Path]:
    """Regular files under ``roots`` holding ``marker`` (files that vanish while searched are skipped)."""
    needle = marker.encode()
    hits = []
    for top in roots:
        for dirpath, _dirs, names in os.walk(top):
            for name in names:
                p = Path(dirpath, name)
                try:
                    if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                        hits.append(p)
                except FileNotFoundError:
                    continue
    return hits


def _alive(procs: list[tuple[int, float]]) -> list[int]:
    """Pids (identified with their start times) that still run (zombies hold nothing and count as gone)."""
    alive = []
    for pid, started in procs:
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
async def test_cancel_stops_the_enclave_process_tree(api, jp_root_dir: Path, dcr_data: Path, host):
    """A long-running job cancelled through the API is `cancelled`, and its enclave's whole process tree
    (supervisor, sandbox, kernel) is gone by the time the cancel is answered; a second cancel is a 409."""
    _notebook(jp_root_dir, "slow/analysis.ipynb", SLOW_CELLS)
    reply = await api("POST", "jobs", body={"path": "slow/analysis.ipynb", "datasets": ["acme/insurance"]})
    assert reply.code == 201, reply.body
    job_id = reply.json["id"]
    job = await _wait_job(
        api, job_id, lambda j: j["state"] in TERMINAL_STATES or (j["progress"] or {}).get("cell") == 1
    )
    assert job["state"] == "running", job

    supervisor = psutil.Process(host.host.jobs[job_id].proc.pid)
    tree = [supervisor, *supervisor.children(recursive=True)]
    procs = [(p.pid, p.create_time()) for p in tree]
    assert len(procs) > 2  # supervisor, sandbox and kernel at least

    reply = await api("POST", "jobs", job_id, "cancel")
    assert reply.code == 200, reply.body
    assert reply.json["state"] == "cancelled"
    # The answer comes only once the tree is gone (benchmarks/bench_server.py measures how long that takes).
    assert _alive(procs) == []
    assert (await api("GET", "jobs", job_id)).json["state"] == "cancelled"
    reply = await api("POST", "jobs", job_id, "cancel")
    assert reply.code == 409 and "cancelled" in reply.error
    # Nothing of the real data is left anywhere: the user's files, the extension's and the host's state,
    # shared memory, and the root of the enclaves' private tmpfs mounts.
    searched = [jp_root_dir, dcr_data, host.state, Path("/dev/shm"), host.host.cfg.scratch_root]
    assert _files_containing(searched, REAL_ROW) == []


# ---------------------------------------------------------------------------------------------------------
# What the JupyterLab extension needs: submit preview (dry run), datasets, receipt verification
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def trusted_host(jp_server_config: Config, host) -> Any:
    """Pins the test enclave host's published JWKS as the server's trust anchor (c.DCRExtension.trust_jwks).

    Request it before ``api``/``dcr_server`` so the server starts with it."""
    jp_server_config["DCRExtension"]["trust_jwks"] = [str(host.jwks_path)]
    jp_server_config["DCRExtension"]["enclave_digests"] = [host.host.measurement()]
    return host


def test_trust_traits_explain_themselves_and_refuse_bad_anchors(tmp_path: Path, host):
    """c.DCRExtension.trust_jwks (signer keys) and trust_roots (CA certificates) have help text with an
    example and a security note; they take what `dcr verify --trust` / `--trust-root` take (the parser
    is shared: tests/test_verify.py checks both accept and refuse the same inputs), and refusals name
    the trait: relative paths, missing files, files that hold no public key, malformed thumbprints, a
    certificate given as a signer key and a key given as a root."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from dcr_enclave.formats.jwk import load_jwks_file, thumbprint

    for trait_name in ("trust_jwks", "trust_roots"):
        text = DCRExtension.class_traits()[trait_name].help
        assert f"c.DCRExtension.{trait_name} = " in text and "Example" in text and "Security" in text

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DCR test root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    root = tmp_path / "root.pem"
    root.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    host_key = load_jwks_file(host.jwks_path)[0]
    pin = thumbprint(host_key)

    app = DCRExtension(
        config=Config(
            {"DCRExtension": {"trust_jwks": [str(host.jwks_path), pin], "trust_roots": [str(root)]}}
        )
    )
    anchors = app.load_trust()
    assert [a["kind"] for a in anchors.described] == ["key", "thumbprint", "root"]
    assert anchors.described[0]["id"] == pin and "DCR test root" in anchors.described[2]["id"]
    assert anchors.keys == (host_key,) and anchors.thumbprints == (pin,) and anchors.roots_pem

    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("hello")
    for trait, value, message in [
        ("trust_jwks", ["relative/jwks.json"], "must be an absolute path"),
        ("trust_jwks", [str(tmp_path / "missing.json")], "cannot read the file"),
        ("trust_jwks", [str(not_a_key)], "neither JSON nor PEM"),
        ("trust_jwks", ["sha256:1234"], "is not a key thumbprint"),
        ("trust_jwks", [""], "is no trust anchor"),
        ("trust_jwks", [str(root)], "holds a certificate, not a signer key"),
        ("trust_roots", [str(host.jwks_path)], "holds no PEM certificate"),
        ("trust_roots", ["relative/root.pem"], "must be an absolute path"),
    ]:
        with pytest.raises(TraitError) as refused:
            DCRExtension(config=Config({"DCRExtension": {trait: value}}))
        assert str(refused.value).startswith(f"DCRExtension.{trait} ") and message in str(refused.value)
    # The hint names the trait that takes what was given.
    with pytest.raises(TraitError, match=r"pin a root certificate with DCRExtension\.trust_roots"):
        DCRExtension(config=Config({"DCRExtension": {"trust_jwks": [str(root)]}}))


async def test_grant_source_without_a_dataset_list_is_501():
    """A grant source that does not implement datasets() refuses with 501 and says which class it is."""
    from dcr_server_ext.grant_sources import GrantSource, NotSupported

    with pytest.raises(NotSupported) as info:
        await GrantSource().datasets()
    assert info.value.status == 501 and "GrantSource" in str(info.value)


async def test_datasets_lists_the_dev_store(api, store):
    """GET /dcr/api/datasets with the development grant source lists the store's newest version of each
    dataset with its protection, release mode and files as they appear under /data."""
    from dcr_enclave.pack.store import Store

    manifest = Store(store.root).versions(store.provider, store.dataset)[-1]
    reply = await api("GET", "datasets")
    assert reply.code == 200, reply.body
    (entry,) = reply.json["datasets"]
    assert (entry["provider"], entry["dataset"], entry["version"]) == (
        store.provider,
        store.dataset,
        manifest.version,
    )
    assert entry["release"] == "auto"  # DevGrantSource.release's default
    assert entry["protection"] == manifest.protection.kind
    assert entry["epsilon"] == manifest.protection.epsilon
    assert entry["files"] == [
        {
            "name": f.name,
            "path": f"/data/{store.provider}/{store.dataset}/{f.name}",
            "synthetic_size": f.synthetic_size,
        }
        for f in manifest.files
    ]
    assert entry["fidelity_report"] is None


@pytest.mark.slow
def test_datasets_come_from_the_real_hub(store, tmp_path: Path, monkeypatch):
    """HubGrantSource.datasets() asks the real hub (GET {JUPYTERHUB_API_URL}/dcr/datasets with the
    server's token) and lists exactly the caller's entitled datasets, with the hub's versions, release
    modes, protection and ε; a token the hub rejects is a 403 refusal, an unreachable hub a 503."""
    from hub_harness import Hub, dataset_entry, make_csv, policy_config, register_dataset

    from dcr_enclave.pack.store import Store
    from dcr_server_ext.errors import Unavailable
    from dcr_server_ext.grant_sources import GrantRefused, HubGrantSource

    insurance = Store(store.root).versions(store.provider, store.dataset)[-1]
    real = make_csv(tmp_path / "src" / "real" / "visits.csv", 200, seed=3)
    synthetic = make_csv(tmp_path / "src" / "synthetic" / "visits.csv", 200, seed=4)
    visits = register_dataset(
        store.root, "globex", "visits", [(real, synthetic)], "--protection", "dp", "--epsilon", "2.5"
    )
    config = policy_config(
        {
            "acme/insurance": dataset_entry(insurance, store.root, users=["alice"]),
            "globex/visits": dataset_entry(visits, store.root, users=["alice", "bob"], release="auto"),
        }
    )
    with Hub(tmp_path / "hub", config=config) as hub:
        monkeypatch.setenv("JUPYTERHUB_API_URL", hub.api_url)
        for user, expected in (("alice", [insurance, visits]), ("bob", [visits])):
            monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.new_token(user))
            listed = asyncio.run(HubGrantSource().datasets())
            assert [(d["provider"], d["dataset"], d["version"]) for d in listed] == [
                (m.provider, m.dataset, m.version) for m in expected
            ]
            by_name = {d["dataset"]: d for d in listed}
            assert by_name["visits"]["release"] == "auto" and by_name["visits"]["protection"] == "dp"
            assert by_name["visits"]["epsilon"] == visits.protection.epsilon
            assert by_name["visits"]["files"][0]["path"] == "/data/globex/visits/visits.csv"
            if "insurance" in by_name:
                assert by_name["insurance"]["release"] == "review"
        monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "not-a-token")
        with pytest.raises(GrantRefused) as refused:
            asyncio.run(HubGrantSource().datasets())
        assert refused.value.status == 403
    with pytest.raises(Unavailable):  # the hub has stopped
        asyncio.run(HubGrantSource().datasets())


async def test_dry_run_shows_what_would_be_submitted_and_changes_nothing(
    api, store, jp_root_dir: Path, dcr_data: Path
):
    """POST /dcr/api/jobs?dry_run=1 walks and hashes the workspace as a submission would (same digest as
    the bundle planner, same files and sizes, the /data datasets the notebook mentions), asks the grant
    source what it would grant (a refusal answered with the submission's status and message) and stores,
    grants and launches nothing; a bad flag, an oversized workspace and named datasets are handled as for
    a submission."""
    from dcr_enclave.pack.bundle_builder import plan_bundle

    root = jp_root_dir
    nb = _notebook(
        root, "work/analysis.ipynb", ["import pandas as pd\npd.read_csv('/data/acme/insurance/real.csv')"]
    )
    (root / "work" / "helper.py").write_text("X = 1\n")
    (root / "work" / ".env").write_text("SECRET=1\n")  # hidden: never bundled
    before = await _snapshot(api, dcr_data, root)

    reply = await api("POST", "jobs", params={"dry_run": "1"}, body={"path": "work/analysis.ipynb"})
    assert reply.code == 200, reply.body
    preview = reply.json
    planned = plan_bundle(nb)
    assert preview["notebook"] == "work/analysis.ipynb"
    assert preview["bundle"] == {
        "digest": planned.digest,
        "files": len(planned.files),
        "bytes": planned.total_bytes,
    }
    assert {f["path"]: f["size"] for f in preview["files"]} == {
        "analysis.ipynb": nb.stat().st_size,
        "helper.py": (root / "work" / "helper.py").stat().st_size,
    }
    assert preview["datasets"] == ["acme/insurance"] and preview["datasets_from"] == "references"
    version = Store(store.root).versions("acme", "insurance")[-1].version
    granted = {"provider": "acme", "dataset": "insurance", "version": version, "release": "auto"}
    assert preview["grant"] == {"datasets": [granted]}

    # The grant source's refusal, exactly as the submission gets it (status and message).
    body = {"path": "work/analysis.ipynb", "datasets": ["acme/other"]}
    named = await api("POST", "jobs", params={"dry_run": "true"}, body=body)
    assert named.code == 403 and named.error == "no dataset acme/other is available to you"
    real = await api("POST", "jobs", body=body)
    assert (real.code, real.error) == (named.code, named.error)
    named = await api("POST", "jobs", params={"dry_run": "1"}, body={**body, "datasets": ["acme/insurance"]})
    assert named.code == 200 and named.json["datasets_from"] == "request"

    _notebook(root, "plain/plain.ipynb", ["1 + 1"])
    plain = await api("POST", "jobs", params={"dry_run": "1"}, body={"path": "plain/plain.ipynb"})
    assert plain.json["datasets"] == [] and plain.json["datasets_from"] == "entitled"
    assert granted in plain.json["grant"]["datasets"]  # every dataset of the development store

    _notebook(root, "big/analysis.ipynb", ["1"])
    for i in range(MAX_BUNDLE_FILES + 2):
        (root / "big" / f"f{i}.csv").write_text(f"{i}\n")
    too_big = await api("POST", "jobs", params={"dry_run": "1"}, body={"path": "big/analysis.ipynb"})
    assert too_big.code == 413 and str(MAX_BUNDLE_FILES) in too_big.error
    bad_flag = await api("POST", "jobs", params={"dry_run": "yes"}, body={"path": "work/analysis.ipynb"})
    assert bad_flag.code == 400 and "dry_run" in bad_flag.error
    missing = await api("POST", "jobs", params={"dry_run": "1"}, body={"path": "nope.ipynb"})
    assert missing.code == 404 and "nope.ipynb" in missing.error
    after = await _snapshot(api, dcr_data, root)
    assert after == before


async def test_output_download_refuses_links_planted_in_the_outputs(
    api, dcr_server, jp_root_dir: Path, dcr_data: Path, tmp_path: Path
):
    """Links planted in a job's opened outputs are never followed: a link to a file outside, a link to
    another output, a linked directory and a link inside a real subdirectory are each a JSON 404, while
    the regular output next to them downloads; nothing changes, outside files included."""
    from dcr_server_ext.model import Job

    manager = dcr_server.web_app.settings["dcr_manager"]
    job_id = "job-" + "b" * 24
    job = Job(
        id=job_id,
        notebook="x.ipynb",
        state="succeeded",
        bundle_digest=sha256_bytes(b"a bundle"),
        bundle_files=1,
        bundle_bytes=8,
        backend="dcr_server_ext.backends.local.LocalBackend",
        outputs_path=f"dcr-jobs/{job_id}",
    )
    manager.store.create(job)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not an output\n")
    outputs = jp_root_dir / job.outputs_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "real.txt").write_text("an output\n")
    (outputs / "link.txt").symlink_to(outside / "secret.txt")
    (outputs / "inner.txt").symlink_to(outputs / "real.txt")
    (outputs / "linked").symlink_to(outside, target_is_directory=True)
    (outputs / "sub" / "deep.txt").symlink_to(outside / "secret.txt")

    ok = await api("GET", "jobs", job.id, "outputs", "real.txt")
    assert ok.code == 200 and ok.body == b"an output\n"
    before = (await _snapshot(api, dcr_data, jp_root_dir), sorted(os.listdir(outside)))
    for rel in ("link.txt", "inner.txt", "linked/secret.txt", "linked", "sub/deep.txt"):
        reply = await api("GET", "jobs", job.id, "outputs", rel)
        assert reply.code == 404, (rel, reply.code)
        assert f"has no output {rel!r}" in reply.error
    assert (await _snapshot(api, dcr_data, jp_root_dir), sorted(os.listdir(outside))) == before
    assert (outside / "secret.txt").read_text() == "not an output\n"


async def test_verify_refuses_unknown_and_unfinished_jobs(api, dcr_server, jp_root_dir: Path, dcr_data: Path):
    """GET /dcr/api/jobs/<id>/verify is a JSON 404 for unknown or malformed ids and for a job that has no
    receipt yet; nothing changes."""
    before = await _snapshot(api, dcr_data, jp_root_dir)
    for job_id in ("job-" + "0" * 24, "job-XYZ"):
        reply = await api("GET", "jobs", job_id, "verify")
        assert reply.code == 404 and "no such job" in reply.error
    assert await _snapshot(api, dcr_data, jp_root_dir) == before
    manager = dcr_server.web_app.settings["dcr_manager"]
    from dcr_server_ext.model import Job

    job = Job(id="job-" + "a" * 24, notebook="x.ipynb", state="running")
    manager.store.create(job)
    reply = await api("GET", "jobs", job.id, "verify")
    assert reply.code == 404 and "no receipt" in reply.error and "running" in reply.error


@pytest.mark.slow
async def test_verify_reports_every_check_against_the_pinned_host_key(
    trusted_host, api, dcr_server, jp_root_dir: Path, dcr_data: Path, tmp_path: Path, run_cli
):
    """A finished job's receipt verifies through GET /dcr/api/jobs/<id>/verify against the host's pinned
    JWKS: the same checks `dcr verify` runs, all passing, the simulation flagged, the anchor named. The
    server checks the result as the enclave sent it, so a checkpoint JupyterLab writes beside the opened
    notebook and an edited output in the user's copy do not change the answer (while `dcr verify` on the
    copy notices). A key that did not sign the receipt fails the signature check (200, verified false), a
    tampered manifest fails the nonce check, and a server without anchors answers 503."""
    from dcr_enclave.formats.jwk import jwks, load_jwks_file, thumbprint
    from dcr_enclave.pack.signing_keys import generate_key
    from dcr_enclave.verify.trust import TrustAnchors, load_trust_anchors

    _notebook(
        jp_root_dir, "work/analysis.ipynb", [*SUCCESS_CELLS[:1], "open('out.txt', 'w').write(str(len(df)))"]
    )
    reply = await api("POST", "jobs", body={"path": "work/analysis.ipynb"})
    assert reply.code == 201, reply.body
    job_id = reply.json["id"]
    job = await _wait_job(api, job_id, lambda j: j["state"] in TERMINAL_STATES)
    assert job["state"] == "succeeded", job

    reply = await api("GET", "jobs", job_id, "verify")
    assert reply.code == 200, reply.body
    result = reply.json
    user_copy = jp_root_dir / job["outputs_path"]
    pins = ("--trust", trusted_host.jwks_path, "--enclave-digest", trusted_host.host.measurement())
    verify_user_copy = ("verify", user_copy, *pins)
    code, text, err = run_cli(*verify_user_copy)
    assert code == 0, text + err
    cli_checks = [
        line.split(":", 1)[0].split(" ", 1)[1] for line in text.splitlines() if line.startswith("PASS")
    ]
    assert [c["name"] for c in result["checks"]] == cli_checks
    assert all(c["passed"] for c in result["checks"]) and result["verified"] is True
    assert result["simulated"] is True and result["enclave"]["kind"] == "local"
    assert result["enclave"]["image_digest"] == job["enclave"]["image_digest"]
    pin = thumbprint(load_jwks_file(trusted_host.jwks_path)[0])
    assert result["anchors"] == [{"kind": "key", "source": str(trusted_host.jwks_path), "id": pin}]
    assert result["enclave_digests"] == [trusted_host.host.measurement()]
    assert result["note"] is None and result["job_id"] == job_id

    # The user's copy changes (JupyterLab's checkpoint, an edited output): the server's answer does not.
    checkpoints = user_copy / "outputs" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    (checkpoints / "analysis-checkpoint.ipynb").write_text("{}")
    (user_copy / "outputs" / "out.txt").write_text("edited")
    again = (await api("GET", "jobs", job_id, "verify")).json
    assert again["verified"] is True
    code, text, _ = run_cli(*verify_user_copy)
    assert code == 1 and "FAIL no output added" in text and "FAIL output digests" in text

    manager = dcr_server.web_app.settings["dcr_manager"]
    other = tmp_path / "other-jwks.json"
    other.write_text(json.dumps(jwks(generate_key())))
    manager.trust = load_trust_anchors([str(other)])
    wrong = (await api("GET", "jobs", job_id, "verify")).json
    assert wrong["verified"] is False
    assert {c["name"]: c["passed"] for c in wrong["checks"]}["signature"] is False

    manager.trust = load_trust_anchors([str(trusted_host.jwks_path)])
    receipt_file = manager.receipt_dir(job_id) / "receipt.json"
    original = receipt_file.read_bytes()
    doc = json.loads(original)
    doc["notebook"] = "someone-else.ipynb"
    receipt_file.write_bytes(canonical_json(doc))
    tampered = (await api("GET", "jobs", job_id, "verify")).json
    checks = {c["name"]: c for c in tampered["checks"]}
    assert tampered["verified"] is False and checks["nonce"]["passed"] is False
    assert checks["signature"]["passed"] is True
    receipt_file.write_bytes(original)

    # Without a pinned enclave digest nothing verifies: any code could have produced the receipt.
    manager.enclave_digests = ()
    unpinned = (await api("GET", "jobs", job_id, "verify")).json
    assert unpinned["verified"] is False and unpinned["enclave_digests"] == []
    assert (
        "no enclave digest is pinned"
        in {c["name"]: c for c in unpinned["checks"]}["pinned enclave digest"]["detail"]
    )

    manager.trust = TrustAnchors()
    reply = await api("GET", "jobs", job_id, "verify")
    assert reply.code == 503 and "trust_jwks" in reply.error
    # Scratch directories are gone after every check.
    assert not list((dcr_data / "jobs" / job_id).glob(".verify-*"))


# ---------------------------------------------------------------------------------------------------------
# Held outputs
# ---------------------------------------------------------------------------------------------------------

AIRLOCK_PRIVATE, AIRLOCK_PUBLIC = generate_keypair()


class ReviewGrantSource(DevGrantSource):
    """Development grants under ``review``, naming an airlock key the test holds (as the hub's grants do)."""

    def _issue(self, job_id: str, bundle_digest: str, wanted: list[tuple[str, str]], public: bytes) -> str:
        store = Store(Path(self.store))
        versions = [
            (p, d, store.versions(p, d)[-1].version) for p in store.providers() for d in store.datasets(p)
        ]
        return issue_grant(
            read_private_key(self.key_file), user="tester", job_id=job_id, bundle_digest=bundle_digest,
            datasets=[GrantedDataset(p, d, v, "review") for p, d, v in versions],
            output_public_key=public, airlock_public_key=AIRLOCK_PUBLIC, time_limit=600,
        )  # fmt: skip


@pytest.mark.parametrize(
    "extra_config", [{"DCRExtension": {"grant_source_class": ReviewGrantSource}}], ids=["review"]
)
async def test_a_held_job_stays_held_and_gives_the_researcher_nothing_of_its_outputs(
    trusted_host, api, dcr_server, jp_root_dir: Path, insurance_real: Path
):
    """Under review the job ends ``held`` and stays there (the airlock decides, not the server); the
    researcher's server opens nothing, lists no output, and its receipt names none: it commits to them."""
    secret = insurance_real.read_text().splitlines()[8].replace(",", "_")
    _notebook(
        jp_root_dir, "work/analysis.ipynb",
        ["row = open('/data/acme/insurance/real.csv').read().splitlines()[8]\n"
         "open(row.replace(',', '_') + '.txt', 'w').write('x')"],
    )  # fmt: skip
    reply = await api("POST", "jobs", body={"path": "work/analysis.ipynb"})
    assert reply.code == 201, reply.body
    job_id = reply.json["id"]
    job = await _wait_job(api, job_id, lambda j: j["state"] in TERMINAL_STATES | {"held"})
    assert job["state"] == "held", job
    await asyncio.sleep(2)  # the reconciler and the progress stream leave it alone
    job = (await api("GET", "jobs", job_id)).json
    assert job["state"] == "held" and job["failure"] is None
    receipt = (await api("GET", "jobs", job_id, "receipt")).json["manifest"]
    assert receipt["outputs"] == [] and receipt["release"]["decision"] == "held"
    assert receipt["release"]["outputs_commitment"].startswith("sha256:")
    outputs = await api("GET", "jobs", job_id, "outputs")
    assert outputs.code == 200 and outputs.json == {"files": []}
    everything = json.dumps([job, receipt]) + outputs.body.decode()
    assert secret not in everything
    assert not list(jp_root_dir.rglob(f"{secret}*"))
    verification = (await api("GET", "jobs", job_id, "verify")).json
    checks = {c["name"]: c for c in verification["checks"]}
    assert checks["output commitment"]["passed"] and "not revealed" in checks["output commitment"]["detail"]
