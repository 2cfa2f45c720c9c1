"""Running totals on usage rows, so a rolling window's use is two indexed lookups instead of a
sum over every row in it.

Each row carries its organization's and its key's totals up to and including itself, in
(created_ms, id) order; existing rows are numbered the same way.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ORG_TOTALS = {"org_count_total": "1", "org_raw_tokens_total": "prompt_tokens + completion_tokens",
              "org_requests_milli_total": "requests_milli",
              "org_tokens_milli_total": "tokens_milli", "org_cost_total": "cost_micros"}
KEY_TOTALS = {"key_count_total": "1", "key_raw_tokens_total": "prompt_tokens + completion_tokens"}


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        for name in (*ORG_TOTALS, *KEY_TOTALS):
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False,
                                       server_default="0"))
    for owner, totals in (("org_id", ORG_TOTALS), ("key_id", KEY_TOTALS)):
        sums = ", ".join(f"SUM({expr}) OVER (PARTITION BY {owner} ORDER BY created_ms, id) "
                         f"AS {name}" for name, expr in totals.items())
        sets = ", ".join(f"{name} = running.{name}" for name in totals)
        op.execute(f"UPDATE usage SET {sets} FROM (SELECT id, {sums} FROM usage "
                   f"WHERE {owner} IS NOT NULL) AS running WHERE usage.id = running.id")


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        for name in (*KEY_TOTALS, *ORG_TOTALS):
            batch.drop_column(name)
