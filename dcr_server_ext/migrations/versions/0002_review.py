"""The airlock's review of a held job (who decides, how far they are, the outcome): one JSON column.

Revision ID: 0002_review
Revises: 0001_jobs
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_review"
down_revision = "0001_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dcr_jobs") as batch:
        batch.add_column(sa.Column("review", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dcr_jobs") as batch:
        batch.drop_column("review")
