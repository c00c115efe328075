"""The pod a DCR Kubernetes spawner builds for a user, without a cluster: KubeSpawner's API client is
never contacted; ``get_pod_manifest()`` is what ``start`` would send to the API server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from jupyterhub import orm
from jupyterhub.objects import Hub
from jupyterhub.user import User
from traitlets.config import Config


def build_pod(config: Config, user_name: str, groups: Iterable[str], spawner_class: type) -> dict[str, Any]:
    """The pod ``spawner_class`` makes for ``user_name`` (member of ``groups``), as sent to the API."""
    db = orm.new_session_factory("sqlite://")()
    orm_user = orm.User(name=user_name)
    db.add(orm_user)
    for g in groups:
        db.add(orm.Group(name=g, users=[orm_user]))
    db.commit()
    settings = {
        "spawner_class": spawner_class,
        "config": config,
        "hub": Hub(ip="127.0.0.1", port=8081),
        "domain": "",
    }
    user = User(orm_user, settings)

    async def build() -> dict[str, Any]:
        spawner = user.spawners[""]  # KubeSpawner needs a running loop for its shared API client
        pod = await spawner.get_pod_manifest()
        return dict(spawner.api.api_client.sanitize_for_serialization(pod))

    return asyncio.run(build())
