"""Retention policies of organizations and keys (zero or store for some days), and stored
completions: their content encrypted, kept until they expire.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
# 0006 is being added on another branch; the chain is re-linked when both are merged.
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.add_column(sa.Column("retention", sa.String(8), nullable=False,
                                   server_default="zero"))
        batch.add_column(sa.Column("retention_days", sa.Integer(), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("retention", sa.String(8), nullable=True))
        batch.add_column(sa.Column("retention_days", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("retention_days")
        batch.drop_column("retention")
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("retention_days")
        batch.drop_column("retention")
