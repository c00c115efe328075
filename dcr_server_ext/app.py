"""The ``dcr_server_ext`` extension application: configuration, wiring, start and stop.

``DCRExtension`` reads its traits (``c.DCRExtension.*``), builds the job store, the enclave backend, the
grant source and the :class:`~dcr_server_ext.manager.JobManager`, registers the job event schema on the
server's event bus and adds the REST handlers. The manager's reconciler starts once the server's event
loop runs and stops with the server; jobs go on in their enclaves meanwhile and are picked up again on the
next start.

Security-relevant limits (datasets, output limits, time limits) are not configured here: they arrive
inside the hub's grant, which this server cannot widen. Bad configuration fails when the server starts,
with a message naming the trait.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from traitlets import Float, Int, List, TraitError, Type, Unicode, default, validate

from dcr_enclave.formats.bundle import DEFAULT_EXCLUDE, BundleLimits
from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.pack.bundle_builder import check_patterns
from dcr_enclave.verify.trust import TrustAnchors, load_trust_anchors

from .backends.base import Backend
from .events import EVENT_SCHEMA_ID, EVENT_SCHEMA_PATH, job_event
from .grant_sources import GrantSource
from .handlers import default_handlers
from .jobstore import JobStore
from .manager import JobManager
from .model import Job

DB_FILE = "jobs.sqlite"
#: How refusals of the trust anchor traits name them (``dcr verify`` says --trust/--trust-root).
SIGNERS_OPTION = "DCRExtension.trust_jwks"
ROOTS_OPTION = "DCRExtension.trust_roots"


#: Modules DCR has renamed: a dotted path written for the old name still resolves (with a warning).
MOVED_MODULES = {"dcr_server_ext.grants": "dcr_server_ext.grant_sources"}


class PluginClass(Type):
    """A :class:`traitlets.Type` (a class, or its dotted path) whose refusals name the trait and say what to
    write. A dotted path into a module listed in :data:`MOVED_MODULES` resolves to the class's new home,
    so configuration written before a rename keeps working."""

    def validate(self, obj: Any, value: Any) -> Any:
        where = f"{type(obj).__name__}.{self.name}"
        base = self.klass if isinstance(self.klass, type) else self._resolve_string(self.klass)
        expected = _dotted(base)
        given, example = value, _dotted(self.default_value)
        if isinstance(value, str):
            path = _current_path(value, obj, where)
            try:
                value = self._resolve_string(path)
            except Exception as e:  # ImportError, and whatever the module raises while it is imported
                raise TraitError(
                    f"{where} = {given!r} cannot be imported ({type(e).__name__}: {e}); give the dotted path "
                    f"of an installed class, like {example!r}"
                ) from None
        if not (isinstance(value, type) and issubclass(value, base)):
            raise TraitError(
                f"{where} = {given!r} is not a subclass of {expected}; give one, like {example!r}"
            )
        return value


def _current_path(value: str, obj: Any, where: str) -> str:
    """``value`` with a renamed module replaced by its new name (and a warning saying what to write)."""
    module, _, name = value.strip().rpartition(".")
    if module in MOVED_MODULES:
        new = f"{MOVED_MODULES[module]}.{name}"
        log = getattr(obj, "log", None)
        if log is not None:
            log.warning("%s = %r: the module was renamed; write %r", where, value, new)
        return new
    return value.strip()


def _dotted(value: Any) -> str:
    return f"{value.__module__}.{value.__qualname__}" if isinstance(value, type) else str(value)


def _check_patterns(value: Any, trait: str) -> list[str]:
    if not isinstance(value, list | tuple):
        raise TraitError(f"DCRExtension.{trait} must be a list of patterns, not {value!r}")
    try:
        return check_patterns(value, f"DCRExtension.{trait}:")
    except DCRError as e:
        raise TraitError(str(e)) from None


class DCRExtension(ExtensionApp):
    """Submit notebooks from this server to the enclave, follow them, fetch outputs and receipts."""

    name = "dcr_server_ext"

    backend_class = PluginClass(
        default_value="dcr_server_ext.backends.local.LocalBackend",
        klass=Backend,
        help="""The enclave backend: where granted jobs run. A subclass of
        :class:`dcr_server_ext.backends.base.Backend`, given as the class or its dotted import path;
        :meth:`DCRExtension.make_backend` makes it with the extension as its parent, and it takes its own
        settings from its own traits (``c.<ClassName>.*``).

        ``dcr_server_ext.backends.local.LocalBackend`` (the default) talks to the machine's enclave host
        (``dcr enclave-host``), a simulated TEE.

        Example::

            c.DCRExtension.backend_class = "dcr_server_ext.backends.local.LocalBackend"
            c.LocalBackend.socket_path = "/run/dcr/enclave-host.sock"

        Security: the backend decides which enclave receives the job's bundle and grant. The grant is bound
        to one job and the enclave verifies it, so a wrong backend cannot obtain data keys; it can however
        see your notebook and workspace files. The class is imported and run inside your server: use only
        backend classes you installed and trust.
        """,
    ).tag(config=True)

    grant_source_class = PluginClass(
        default_value="dcr_server_ext.grant_sources.DevGrantSource",  # outside a hub; see the @default
        klass=GrantSource,
        help="""Where each job's grant (a JWT signed by the hub) comes from. A subclass of
        :class:`dcr_server_ext.grant_sources.GrantSource`, given as the class or its dotted import path;
        :meth:`DCRExtension.make_grant_source` makes it with the extension as its parent, and it takes its
        own settings from its own traits (``c.<ClassName>.*``).

        ``dcr_server_ext.grant_sources.HubGrantSource`` asks the hub's grant service (in production: it
        alone holds the hub key and the policy); it is the default of a server JupyterHub started (one with
        ``JUPYTERHUB_API_URL`` in its environment), and the DCR spawners set it on every server they start.
        ``dcr_server_ext.grant_sources.DevGrantSource`` (the default outside a hub) signs grants with a
        local development key, for tests and single-machine trials.
        Paths into ``dcr_server_ext.grants``, the module's former name, are still accepted.

        Example::

            c.DCRExtension.grant_source_class = "dcr_server_ext.grant_sources.HubGrantSource"
            c.HubGrantSource.request_timeout = 10

        Security: the enclave and the key release accept only grants from a hub key they trust. Never
        configure a development key that a production enclave host or provider condition trusts. The
        class is imported and run inside your server: use only grant sources you installed and trust.
        """,
    ).tag(config=True)

    data_dir = Unicode(
        help="""Absolute path of this extension's private state: the job store (SQLite by default), each
        job's X25519 output key, bundles and enclave results as they arrived.

        Default: ``<jupyter data dir>/dcr`` (on the home volume, so it survives pod replacement).

        Example::

            c.DCRExtension.data_dir = "/home/jovyan/.local/share/jupyter/dcr"

        Security: the directory holds the private keys that open your jobs' outputs. It is created with
        mode 0700; keep it on storage only you can read, never on a shared or world-readable volume.
        """,
    ).tag(config=True)

    db_url = Unicode(
        help="""SQLAlchemy URL of the job store.

        Default: a SQLite file ``jobs.sqlite`` in ``data_dir``. Any SQLAlchemy URL works (PostgreSQL
        included); the schema is migrated to the current version on start.

        Example::

            c.DCRExtension.db_url = "postgresql+psycopg://dcr@db.internal/dcr_alice"

        Security: the store is a convenience (nothing security-relevant depends on it), but it lists your
        jobs and notebook names. A password in this URL ends up in config files and process listings:
        prefer a passwordless local socket or the driver's password file.
        """,
    ).tag(config=True)

    outputs_dir = Unicode(
        "dcr-jobs",
        help="""Folder, relative to the server's root directory, where each job's result is opened:
        ``<root>/<outputs_dir>/<job id>/`` holds ``receipt.json``, ``attestation.jwt``,
        ``signer-jwks.json`` and ``outputs/`` (the decrypted output files), as ``dcr verify`` expects.

        Example::

            c.DCRExtension.outputs_dir = "enclave-results"

        Security: outputs are decrypted here, in the clear; whoever can read your server's root directory
        can read them. It must be a relative path without '..' or hidden components.
        """,
    ).tag(config=True)

    bundle_include = List(
        Unicode(),
        default_value=["**"],
        help="""Glob patterns (relative to the notebook's directory) of the workspace files that travel with
        the notebook into the enclave. ``*`` matches within one path component, ``**`` any number of them; a
        pattern without '/' matches at any depth.

        Example::

            c.DCRExtension.bundle_include = ["*.ipynb", "**/*.py", "lookup/*.csv"]

        Security: everything bundled is visible to your code in the enclave and is named (by digest) in the
        receipt. Bundle only what the notebook needs.
        """,
    ).tag(config=True)

    bundle_exclude = List(
        Unicode(),
        default_value=list(DEFAULT_EXCLUDE),
        help="""Glob patterns of workspace files never bundled (same syntax as ``bundle_include``; an
        excluded directory is not entered).

        Default: hidden files and directories, ``.ipynb_checkpoints``, ``__pycache__`` and ``*.pyc``.

        Example::

            c.DCRExtension.bundle_exclude = [".*", "__pycache__", "*.pyc", "scratch"]

        Security: keep hidden files (``.env``, ``.ssh``, credentials) excluded: anything bundled reaches the
        enclave, where your notebook could write it into an output.
        """,
    ).tag(config=True)

    max_bundle_files = Int(
        2000,
        help="""Most files a bundle may hold (notebook included); a bigger workspace is refused at submit
        time with 413 before any file is read.

        Example::

            c.DCRExtension.max_bundle_files = 500

        Security: a guard against bundling a whole home directory by mistake. The enclave applies its own
        limits regardless of this value.
        """,
    ).tag(config=True)

    max_bundle_bytes = Int(
        256 * 2**20,
        help="""Most bytes (all files together) a bundle may hold; a bigger workspace is refused at submit
        time with 413.

        Example::

            c.DCRExtension.max_bundle_bytes = 64 * 2**20

        Security: a guard against shipping large files by mistake. The enclave applies its own limits
        regardless of this value.
        """,
    ).tag(config=True)

    reconcile_interval = Float(
        30.0,
        help="""Seconds between reconciler passes, which bring every unfinished job to its backend's truth
        (resuming lost progress streams, completing jobs that finished unobserved, failing vanished ones).
        A pass always runs when the server starts; progress is otherwise pushed, not polled.

        Example::

            c.DCRExtension.reconcile_interval = 10.0

        Security: no security decision depends on it; a short interval only costs backend requests.
        """,
    ).tag(config=True)

    airlock_poll_interval = Float(
        5.0,
        help="""Seconds between asking the hub's airlock how the review of each held job stands (and
        delivering held results the hub could not be reached for). A held job's released outputs arrive
        within one interval of the last approval.

        Example::

            c.DCRExtension.airlock_poll_interval = 2.0

        Security: no security decision depends on it; each pass costs one hub request per held job.
        """,
    ).tag(config=True)

    trust_jwks = List(
        Unicode(),
        default_value=[],
        help="""Signer keys that job receipts are verified against (``GET /dcr/api/jobs/<id>/verify``, the
        receipt viewer in JupyterLab), as ``dcr verify --trust`` takes them: absolute paths of JWKS, JWK or
        PEM public key files of the enclave's attestation signer, or ``sha256:<thumbprint>`` RFC 7638 key
        thumbprints (the key is then read from the receipt's ``signer-jwks.json``, and only a key with a
        pinned thumbprint is used). Certificates belong in ``trust_roots``; a file holding a certificate,
        a private key, a key for encryption or for another algorithm is refused. Read once when the server
        starts; a refused entry stops the server. With neither this nor ``trust_roots`` (the default),
        receipts are not verified by the server (the endpoint answers 503); ``dcr verify`` still checks
        them offline.

        Example::

            c.DCRExtension.trust_jwks = ["/srv/dcr/enclave-host/public/jwks.json"]

        Security: these keys decide which signatures make a receipt "verified" in the user's browser.
        Point them at keys the deployment's administrator pinned (the local enclave host's published JWKS),
        on storage users cannot write; never at a key taken from a receipt. The local enclave host's key
        signs *simulated* attestations: the viewer says so.
        """,
    ).tag(config=True)

    trust_roots = List(
        Unicode(),
        default_value=[],
        help="""Root certificates for certificate-chained attestation tokens (an ``x5c`` chain, as Google's
        PKI tokens carry), as ``dcr verify --trust-root`` takes them: absolute paths of PEM files holding
        one or more CA certificates (basicConstraints CA:TRUE). A token verifies when its chain ends at one
        of them. A file holding anything else (a public or private key, a certificate that is not a CA) is
        refused; pin signer keys in ``trust_jwks``. Read once when the server starts; a refused entry stops
        the server.

        Example::

            c.DCRExtension.trust_roots = ["/srv/dcr/trust/confidential_space_root.pem"]

        Security: every token whose chain ends at one of these roots counts as genuine, whatever key
        signed it: pin only the attestation roots of your platform, from storage users cannot write.
        """,
    ).tag(config=True)

    enclave_digests = List(
        Unicode(),
        default_value=[],
        help="""The enclave image digests (``sha256:...``) a receipt must come from to verify, as
        ``dcr verify --enclave-digest`` takes them: the local enclave host prints its own at start, and a
        provider's key-release condition lists the digests it releases keys to. With none (the default) the
        receipt viewer's check "pinned enclave digest" fails: a valid signature alone says only that some
        workload of the platform produced the receipt, not which code.

        Example::

            c.DCRExtension.enclave_digests = ["sha256:4f0c...e1"]

        Security: pin exactly the enclave releases you have reviewed, from configuration users cannot write;
        the verification reply lists the digests it checked against.
        """,
    ).tag(config=True)

    @validate("enclave_digests")
    def _valid_enclave_digests(self, proposal: Any) -> list[str]:
        for value in proposal["value"]:
            try:
                check_digest(value, "an enclave digest")
            except DCRError as e:
                raise TraitError(
                    f"c.DCRExtension.enclave_digests: {e.message}",
                ) from None
        return list(proposal["value"])

    # -- defaults and validation ----------------------------------------------------------------------------

    @default("grant_source_class")
    def _default_grant_source(self) -> str:
        # A server started by a hub asks that hub: the development key would sign grants no real
        # provider's condition accepts, and every Submit would fail at key release.
        if os.environ.get("JUPYTERHUB_API_URL"):
            return "dcr_server_ext.grant_sources.HubGrantSource"
        return "dcr_server_ext.grant_sources.DevGrantSource"

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return os.path.join(jupyter_data_dir(), "dcr")

    @default("db_url")
    def _default_db_url(self) -> str:
        return f"sqlite:///{os.path.join(self.data_dir, DB_FILE)}"

    @validate("data_dir")
    def _valid_data_dir(self, proposal: Any) -> str:
        value = proposal["value"]
        if not value or not os.path.isabs(value):
            raise TraitError(f"DCRExtension.data_dir must be an absolute path, not {value!r}")
        return os.path.normpath(value)

    @validate("db_url")
    def _valid_db_url(self, proposal: Any) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        value = proposal["value"]
        try:
            make_url(value)
        except (ArgumentError, ValueError, TypeError) as e:
            # The message of make_url may repeat the URL; leave it out in case it carries a password.
            raise TraitError(
                f"DCRExtension.db_url is not an SQLAlchemy URL ({type(e).__name__}); "
                "write it like 'sqlite:////abs/path/jobs.sqlite' or 'postgresql+psycopg://user@host/db'"
            ) from None
        return str(value)

    @validate("outputs_dir")
    def _valid_outputs_dir(self, proposal: Any) -> str:
        value = proposal["value"]
        pure = PurePosixPath(value) if isinstance(value, str) else None
        if (
            pure is None
            or not value
            or pure.is_absolute()
            or "\\" in value
            or any(p in ("..", ".") or p.startswith(".") for p in value.split("/"))
        ):
            raise TraitError(
                f"DCRExtension.outputs_dir must be a relative folder inside the server root, without '..' "
                f"or hidden components (like 'dcr-jobs'), not {value!r}"
            )
        return pure.as_posix()

    @validate("bundle_include", "bundle_exclude")
    def _valid_patterns(self, proposal: Any) -> list[str]:
        return _check_patterns(proposal["value"], proposal["trait"].name)

    @validate("max_bundle_files", "max_bundle_bytes")
    def _valid_limit(self, proposal: Any) -> int:
        value = proposal["value"]
        if value < 1:
            raise TraitError(f"DCRExtension.{proposal['trait'].name} must be a positive integer, not {value}")
        return int(value)

    @validate("trust_jwks", "trust_roots")
    def _valid_trust(self, proposal: Any) -> list[str]:
        value = proposal["value"]
        signers, roots = (value, ()) if proposal["trait"].name == "trust_jwks" else ((), value)
        try:  # parsed again at start (load_trust): keys are files, and files may change
            load_trust_anchors(signers, roots, signer_option=SIGNERS_OPTION, root_option=ROOTS_OPTION)
        except DCRError as e:
            raise TraitError(str(e)) from None
        return list(value)

    @validate("reconcile_interval", "airlock_poll_interval")
    def _valid_interval(self, proposal: Any) -> float:
        value = proposal["value"]
        if not value > 0:
            raise TraitError(
                f"DCRExtension.{proposal['trait'].name} must be a positive number of seconds, not {value}"
            )
        return float(value)

    # -- wiring ---------------------------------------------------------------------------------------------

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        # Config is applied (and validated) here. jupyter_server would log a refused value and carry on
        # with the default (unless reraise_server_extension_failures): a DCR setting silently ignored.
        # Stop the server instead, as it does for bad configuration of its own.
        try:
            super()._link_jupyter_server_extension(serverapp)
        except TraitError as e:
            self.log.critical("Bad DCR configuration, the server stops: %s", e)
            raise SystemExit(1) from None

    def make_backend(self) -> Backend:
        """A new instance of ``backend_class``, with this extension as its parent (so it reads its own
        traits from this server's configuration). Raises TraitError/ValueError for bad settings of its own."""
        backend: Backend = self.backend_class(parent=self)
        return backend

    def make_grant_source(self) -> GrantSource:
        """A new instance of ``grant_source_class``, with this extension as its parent."""
        grants: GrantSource = self.grant_source_class(parent=self)
        return grants

    def load_trust(self) -> TrustAnchors:
        """The receipts' trust anchors from ``trust_jwks`` and ``trust_roots``, read now (the files may
        have changed since the configuration was checked); raises DCRError naming the refused entry."""
        return load_trust_anchors(
            self.trust_jwks, self.trust_roots, signer_option=SIGNERS_OPTION, root_option=ROOTS_OPTION
        )

    def initialize_settings(self) -> None:
        data_dir = Path(self.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data_dir, 0o700)  # mkdir leaves an existing directory's mode alone
        try:
            backend = self.make_backend()
            grants = self.make_grant_source()
        except (TraitError, ValueError) as e:  # their own traits (c.LocalBackend.socket_path, ...)
            self.log.critical("Bad DCR configuration, the server stops: %s", e)
            raise SystemExit(1) from None
        try:
            trust = self.load_trust()
        except DCRError as e:  # a file removed or replaced since the configuration was read
            self.log.critical("Bad DCR configuration, the server stops: %s", e)
            raise SystemExit(1) from None
        # A store that cannot be opened (database unreachable, or written by a newer version) is not a
        # configuration error: the extension is not loaded, the log says why, the server itself goes on.
        self.job_store = JobStore(self.db_url)
        serverapp = self._server()
        event_logger = serverapp.event_logger
        assert event_logger is not None  # jupyter_server always makes one
        if EVENT_SCHEMA_ID not in event_logger.schemas.schema_ids:
            event_logger.register_event_schema(EVENT_SCHEMA_PATH)
        self.manager = JobManager(
            root_dir=Path(serverapp.root_dir),
            data_dir=data_dir,
            store=self.job_store,
            backend=backend,
            grants=grants,
            emit=self._emit,
            log=self.log,
            include=tuple(self.bundle_include),
            exclude=tuple(self.bundle_exclude),
            limits=BundleLimits(max_files=self.max_bundle_files, max_bytes=self.max_bundle_bytes),
            outputs_dir=self.outputs_dir,
            reconcile_interval=self.reconcile_interval,
            airlock_poll_interval=self.airlock_poll_interval,
            trust=trust,
            enclave_digests=tuple(self.enclave_digests),
        )
        self.settings["dcr_manager"] = self.manager
        self.log.info(
            "DCR: backend %s, grant source %s, job store in %s",
            _dotted(self.backend_class),
            _dotted(self.grant_source_class),
            "the data directory" if self.db_url == self._default_db_url() else "the configured database",
        )

    def _server(self) -> ServerApp:
        if self.serverapp is None:
            raise RuntimeError("the DCR extension runs inside a Jupyter server")
        return self.serverapp

    def initialize_handlers(self) -> None:
        self.handlers.extend(default_handlers)

    def _emit(self, job: Job) -> None:
        """Put a job's state and progress on the event bus: never data, and never fatal."""
        try:
            event_logger = self._server().event_logger
            if event_logger is not None:
                event_logger.emit(schema_id=EVENT_SCHEMA_ID, data=job_event(job))
        except Exception:  # the store has the change already; a subscriber can reload the job
            self.log.exception("DCR: could not emit the event of job %s", job.id)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        # Runs once the server's event loop is running: the reconciler's tasks live on it.
        try:
            await self.manager.start()
        except DCRError as e:
            self.log.error("DCR: the job manager could not start: %s", e)
            raise

    async def stop_extension(self) -> None:
        manager: JobManager | None = getattr(self, "manager", None)
        if manager is not None:
            await manager.stop()
        store: JobStore | None = getattr(self, "job_store", None)
        if store is not None:
            store.close()
