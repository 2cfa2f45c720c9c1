"""Data residency and deployments: organizations' allowed regions, and the region and
deployment that served each usage row.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.add_column(sa.Column("allowed_regions", sa.JSON(), nullable=True))
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("region", sa.String(64), nullable=True))
        batch.add_column(sa.Column("deployment", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("deployment")
        batch.drop_column("region")
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("allowed_regions")
