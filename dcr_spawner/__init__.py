"""DCR on the hub: the policy, the per-job grant service and the spawners (``dcr-local``, ``dcr-kube``).

In ``jupyterhub_config.py``::

    import dcr_spawner

    c.JupyterHub.spawner_class = "dcr-local"
    c.DCRPolicy.datasets = {...}
    dcr_spawner.enable(c)

See ``docs/hub.md`` for the complete reference.
"""

from __future__ import annotations

from .grant_service import GrantService
from .hub_start import active_policy, enable, grant_handlers
from .policy import DCRPolicy, Entitlement, PolicyError

__all__ = [
    "DCRPolicy",
    "Entitlement",
    "GrantService",
    "PolicyError",
    "active_policy",
    "enable",
    "grant_handlers",
]
