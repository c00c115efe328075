"""Alembic environment of the job store's migrations.

At run time :class:`dcr_server_ext.jobstore.JobStore` runs the migrations programmatically: it passes its
own connection (already inside a transaction that holds the migration lock) in
``config.attributes["connection"]``, and no ``alembic.ini`` is involved.

To write a new revision, upgrade a scratch database to the current head and let Alembic compare it with
``jobstore.METADATA`` (after changing that)::

    from alembic import command
    from alembic.config import Config
    from dcr_server_ext.jobstore import MIGRATIONS_DIR, JobStore

    url = "sqlite:////tmp/scratch.sqlite"
    JobStore(url).close()
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url)
    command.revision(cfg, message="what changes", autogenerate=True, rev_id="0002_what_changes")

New revisions must work on SQLite (batch mode is on, so
``op.batch_alter_table`` rebuilds tables where SQLite cannot alter them) and on PostgreSQL.

Logging is deliberately left alone (no ``fileConfig``): this runs inside the user's Jupyter server.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from dcr_server_ext.jobstore import METADATA, VERSION_TABLE

config = context.config


def _ours(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate looks at the store's own tables only: the database may be shared with others."""
    return type_ != "table" or (name or "").startswith("dcr_")


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=METADATA,
        version_table=VERSION_TABLE,
        include_name=_ours,
        render_as_batch=True,
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: pass -x url=<SQLAlchemy URL> or set sqlalchemy.url")
    return url


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    else:
        engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
        engine.dispose()
