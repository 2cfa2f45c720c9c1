"""Reservation leases: the process that owns a running request renews its reservation, and the
sweeper only takes reservations nobody renewed within the timeout (their owner is gone).

Overage: usage above what a request held is charged in full (an upstream counted more prompt
tokens than estimated, a settlement arrived after the sweeper), so a balance may end below zero
by that much; the constraint that kept it at zero or above goes. Admission and adjustments still
never take a balance below what running requests hold.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("renewed_ms", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("organizations") as batch:
        batch.drop_constraint("ck_organizations_balance_not_negative", type_="check")


def downgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.create_check_constraint("ck_organizations_balance_not_negative",
                                      "balance_micros >= 0")
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("renewed_ms")
