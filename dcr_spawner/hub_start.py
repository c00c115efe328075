"""The hub start hook: DCR's checks run while JupyterHub starts, after it has loaded its groups and before
it serves.

JupyterHub has no start callback for configuration or spawners, so DCR watches the one moment that fits:
the hub application's ``handlers`` trait is assigned once, in ``init_handlers()``, after the database,
users, groups, roles and tokens are loaded and before the tornado application is built. The hook
(:func:`arm_start_hook`) observes that assignment; then it validates the policy against the stores and the
hub's groups, starts the grant service (keys, records database), runs the configured spawner's
``dcr_check_at_start``, adds DCR's routes (grants, airlock, audit) if ``enable(c)`` did not and DCR's page
templates to the hub's template loader; it starts the periodic copy of the platform's job
events into the audit trail (``c.<Platform>.audit_interval``). Any refusal stops the hub (``app.exit(1)``)
before it listens, with a line naming provider, dataset and trait.

Finding the application takes two ways, because the hook is armed from two places:

- :func:`enable` runs in ``jupyterhub_config.py``, which the hub reads in ``initialize()``, when its
  application is already the registered ``JupyterHub.instance()``;
- a DCR spawner's module arms the hook when it is imported, and JupyterHub imports every installed spawner
  while its application object is being constructed (``JupyterHub.classes`` loads the entry points, to
  list their configuration), before ``instance()`` has registered that object. It is found on the call
  stack instead (:func:`_hub_being_built`). That is what makes ``spawner_class = "dcr-local"`` alone
  enough to stop a hub with a bad policy.

The policy the hook validated is kept here (:func:`active_policy`) for the spawners of the same process:
:class:`PolicySpawnerMixin` refuses to start a server while there is none, so an unchecked policy is never
used. Outside a hub (tests, tools) arming does nothing.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Final

from jinja2 import ChoiceLoader, FileSystemLoader
from jupyterhub import orm
from jupyterhub.apihandlers.base import API404
from tornado.ioloop import IOLoop, PeriodicCallback
from traitlets import TraitError
from traitlets.config import Config

from dcr_enclave.formats.errors import DCRError

from . import airlock_views, audit_views
from .airlock import Airlock
from .audit import ingest_platform_events
from .cloud import views as cloud_views
from .grant_service import SETTINGS_KEY, GrantService, GrantsHandler
from .grant_service import routes as grant_routes
from .platform import make_server_args
from .policy import DCRPolicy, Entitlement

_active: DCRPolicy | None = None


def set_active_policy(policy: DCRPolicy | None) -> None:
    """Record the policy the hub validated at start (called by the start hook; tests set it too)."""
    global _active
    _active = policy


def active_policy() -> DCRPolicy | None:
    """The policy validated when this hub process started, or ``None`` if it was not validated."""
    return _active


#: Environment variable prefixes of cloud SDK credentials and settings (Google's, and others' for good measure).
CLOUD_CREDENTIAL_PREFIXES: Final = ("GOOGLE_", "CLOUDSDK_", "GCE_", "GCLOUD_", "AWS_", "AZURE_")


def is_cloud_credential_name(name: str) -> bool:
    return name.upper().startswith(CLOUD_CREDENTIAL_PREFIXES)


class PolicySpawnerMixin:
    """What every DCR spawner asks of the policy: the user's entitled datasets at spawn time."""

    log: Any
    user: Any

    def _policy(self) -> DCRPolicy:
        policy = active_policy()
        if policy is None:
            # Loading a DCR spawner arms the start hook, so this means the hook never ran (the spawner's
            # module was imported before the hub application existed): an unchecked policy is not used.
            raise DCRError(
                "DCR: the hub did not validate its DCR policy when it started, so no server is started",
                hint="add `dcr_spawner.enable(c)` to jupyterhub_config.py and restart the hub",
            )
        return policy

    def entitlements(self) -> list[Entitlement]:
        """The user's entitled datasets now (group membership as it is in the hub's database)."""
        groups = {g.name for g in self.user.groups}
        return self._policy().entitled(self.user.name, groups)

    def dcr_server_config(self) -> dict[str, dict[str, Any]]:
        """What the server needs to talk to this hub and its enclave platform (the hub's grant service,
        never the development one; the backend; the trust anchors). A spawner may add settings of its own."""
        return self._policy().platform().server_config()

    def get_env(self) -> dict[str, Any]:
        """The server's environment without any cloud credential the hub's own environment or configuration
        would pass on (``env_keep``, ``environment``): researchers' servers hold none, only the hub
        launches enclaves."""
        env: dict[str, Any] = super().get_env()  # type: ignore[misc]
        dropped = sorted(k for k in env if is_cloud_credential_name(k))
        if dropped:
            self.log.warning(
                "DCR: not passing %s to %s's server: servers hold no cloud credential",
                dropped,
                self.user.name,
            )
        return {k: v for k, v in env.items() if k not in dropped}

    def get_args(self) -> list[str]:
        # Last, so they outrank c.Spawner.args and every configuration file the server reads.
        return [*super().get_args(), *make_server_args(self.dcr_server_config())]  # type: ignore[misc]


def routes() -> list[tuple[str, type, dict[str, Any]]]:
    """Every DCR route in the hub, relative to its prefix: the grant service's and the airlock's."""
    return [*grant_routes(), *airlock_views.routes(), *audit_views.routes(), *cloud_views.routes()]


def grant_handlers() -> list[tuple[str, type, dict[str, Any]]]:
    """DCR's routes for ``c.JupyterHub.extra_handlers``; also arms the start hook."""
    arm_start_hook()
    return routes()


def enable(c: Config) -> None:
    """The one line in ``jupyterhub_config.py``: ``dcr_spawner.enable(c)``.

    Adds the grant service's routes to ``c.JupyterHub.extra_handlers`` (keeping any already there) and
    arranges for the policy to be validated while the hub starts, before it serves.
    """
    existing = list(c.JupyterHub.extra_handlers) if "extra_handlers" in c.JupyterHub else []
    ours = grant_handlers()
    paths = {h[0] for h in ours}
    c.JupyterHub.extra_handlers = [h for h in existing if h[0] not in paths] + ours


def arm_start_hook() -> None:
    """Validate the policy while the hub starts. Called by :func:`enable` and when a DCR spawner's module
    is loaded, so ``spawner_class = "dcr-local"`` alone is enough to stop a hub with a bad policy."""
    from jupyterhub.app import JupyterHub

    app = JupyterHub.instance() if JupyterHub.initialized() else _hub_being_built(JupyterHub)
    if app is None:
        return  # not inside a hub (tests, tools): spawners refuse to run without a validated policy
    if getattr(app, "_dcr_start_hook_armed", False):
        return
    app._dcr_start_hook_armed = True
    app.observe(_on_hub_handlers, names="handlers")


def _hub_being_built(hub_class: type) -> Any:
    """The hub application whose construction is importing this module, if any.

    JupyterHub imports every installed spawner while its application object is constructed (to list their
    configuration), before that object becomes the registered instance; it is then on the call stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, hub_class):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _on_hub_handlers(change: Any) -> None:
    app = change["owner"]
    if SETTINGS_KEY in app.tornado_settings:
        return
    handlers: list[Any] = change["new"]  # the list the hub goes on to extend and serve
    enabled = any(h[1] is GrantsHandler for h in handlers)
    spawner = app.spawner_class
    dcr_spawner = isinstance(spawner, type) and issubclass(spawner, PolicySpawnerMixin)
    if not enabled and not dcr_spawner:
        return  # a DCR module was imported, but this hub uses neither DCR's spawners nor enable(c)
    try:
        policy = DCRPolicy(parent=app)
        groups = {g.name for g in app.db.query(orm.Group)}
        service = GrantService.start(policy, groups)
        platform = policy.platform()
        platform.check_at_start()
        airlock = Airlock.start(policy, service, platform)
        platform.check_datasets(policy, service.hub_key.thumbprint)
        attach = getattr(platform, "attach", None)
        cloud_jobs = attach(service) if callable(attach) else None
        check = getattr(app.spawner_class, "dcr_check_at_start", None)
        if callable(check):
            check(app, policy)  # the spawner's own config, checked now rather than at the first spawn
    except (DCRError, TraitError) as e:
        # Printed as well as logged: this is the line an admin looks for when the hub will not start.
        app.log.critical("%s", e)
        print(f"DCR: the hub cannot start: {e}", file=sys.stderr, flush=True)
        app.exit(1)
    if not enabled:
        # A DCR spawner's servers need the grant service: serve its routes as enable(c) would have.
        ours = app.add_url_prefix(app.hub_prefix, routes())
        at = next((i for i, h in enumerate(handlers) if h[1] is API404), 0)
        handlers[at:at] = ours
        app.log.info(
            "DCR: grant service routes added for %s (dcr_spawner.enable(c) not called)", spawner.__name__
        )
    app.tornado_settings[SETTINGS_KEY] = service
    app.tornado_settings[airlock_views.SETTINGS_KEY] = airlock
    add_templates(app.tornado_settings)
    app.tornado_settings["dcr_policy"] = policy
    set_active_policy(policy)
    if cloud_jobs is not None:
        _start_cloud(app, platform, cloud_jobs)
    interval = float(getattr(platform, "audit_interval", 0) or 0)
    if interval > 0:
        ingest = PeriodicCallback(lambda: _ingest(app, service), interval * 1000)
        ingest.start()
        app.tornado_settings["dcr_audit_ingest"] = ingest


def _start_cloud(app: Any, platform: Any, jobs: Any) -> None:
    """Serve the cloud API and start the reconciler: once now (VMs a previous hub process left), then
    every ``reconcile_interval`` seconds."""
    from .cloud.reconciler import run_logged

    app.tornado_settings[cloud_views.SETTINGS_KEY] = jobs
    interval = float(getattr(platform, "reconcile_interval", 0) or 0)
    if interval <= 0:
        app.log.warning("DCR: the cloud reconciler is off (reconcile_interval = 0): VMs are not swept")
        return

    async def sweep() -> None:
        await asyncio.to_thread(run_logged, jobs, app.log)

    PeriodicCallback(sweep, interval * 1000).start()
    IOLoop.current().add_callback(sweep)


async def _ingest(app: Any, service: GrantService) -> None:
    """One periodic copy of the platform's job events into the audit trail, off the event loop."""
    try:
        await asyncio.to_thread(ingest_platform_events, service.db, service.policy.platform())
    except Exception:  # a database outage: logged, retried at the next interval
        app.log.exception("DCR: copying the enclave platform's events into the audit trail failed")


#: DCR's pages (review, provider, receipt, audit), which extend the hub's ``page.html``.
TEMPLATES = Path(__file__).resolve().parent / "templates"


def add_templates(settings: dict[str, Any]) -> None:
    """Let the hub's template environments find DCR's pages (after the hub's own, which they extend)."""
    for key in ("jinja2_env", "jinja2_env_sync"):
        env = settings.get(key)
        if env is None or getattr(env, "_dcr_templates", False):
            continue
        env.loader = ChoiceLoader([env.loader, FileSystemLoader(str(TEMPLATES))])
        env._dcr_templates = True
