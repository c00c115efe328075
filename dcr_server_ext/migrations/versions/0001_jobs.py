"""The jobs table: one row per job, JSON columns for the list and dict fields of the Job record.

Revision ID: 0001_jobs
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_jobs"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Frozen copy of the table as of this revision: later changes go into new revisions, never here.
    json = sa.JSON(none_as_null=True)
    op.create_table(
        "dcr_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("notebook", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
        sa.Column("bundle_digest", sa.String(80), nullable=False),
        sa.Column("bundle_files", sa.Integer, nullable=False),
        sa.Column("bundle_bytes", sa.BigInteger, nullable=False),
        sa.Column("datasets", json, nullable=False),
        sa.Column("grant_id", sa.String(64), nullable=True),
        sa.Column("backend", sa.Text, nullable=False),
        sa.Column("backend_ref", json, nullable=False),
        sa.Column("cell", sa.Integer, nullable=True),
        sa.Column("cells", sa.Integer, nullable=True),
        sa.Column("failure", json, nullable=True),
        sa.Column("outputs_path", sa.Text, nullable=True),
        sa.Column("receipt", sa.Boolean, nullable=False),
        sa.Column("enclave", json, nullable=True),
    )
    op.create_index("ix_dcr_jobs_created", "dcr_jobs", ["created", "id"])
    op.create_index("ix_dcr_jobs_state", "dcr_jobs", ["state"])


def downgrade() -> None:
    op.drop_index("ix_dcr_jobs_state", table_name="dcr_jobs")
    op.drop_index("ix_dcr_jobs_created", table_name="dcr_jobs")
    op.drop_table("dcr_jobs")
