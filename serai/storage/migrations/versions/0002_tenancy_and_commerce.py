"""Organizations, plans, price books, balances and reservations; keys and usage rows gain an
organization, a role, limits and a cost.

Existing model keys move into an organization named "default" (no plan, no price book: free and
unlimited, as before); existing admin keys become platform operators.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Money = sa.BigInteger()


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                     nullable=False)


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("windows", sa.JSON(), nullable=False),
        sa.Column("model_multipliers", sa.JSON(), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        sa.Column("draws_balance", sa.Boolean(), nullable=False),
        sa.Column("price_ratio_milli", sa.Integer(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        _created_at(),
    )
    op.create_table(
        "price_books",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("peak_hours", sa.JSON(), nullable=False),
        _created_at(),
    )
    op.create_table(
        "prices",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("price_book_id", sa.Integer(), sa.ForeignKey("price_books.id"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("input_micros", Money, nullable=False),
        sa.Column("cached_input_micros", Money, nullable=False),
        sa.Column("output_micros", Money, nullable=False),
        sa.UniqueConstraint("price_book_id", "model"),
    )
    op.create_table(
        "organizations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("plan_id", sa.Integer(), sa.ForeignKey("plans.id"), nullable=True),
        sa.Column("price_book_id", sa.Integer(), sa.ForeignKey("price_books.id"), nullable=True),
        sa.Column("balance_micros", Money, nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        _created_at(),
        sa.CheckConstraint("balance_micros >= 0", name="ck_organizations_balance_not_negative"),
    )
    op.create_table(
        "balance_entries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("org_id", sa.Integer(), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("amount_micros", Money, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        _created_at(),
    )
    op.create_index("ix_balance_entries_org_id", "balance_entries", ["org_id"])
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("org_id", sa.Integer(), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("amount_micros", Money, nullable=False),
        sa.Column("requests_milli", sa.BigInteger(), nullable=False),
        sa.Column("tokens_milli", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_reservations_org_id", "reservations", ["org_id"])
    op.create_index("ix_reservations_key_id", "reservations", ["key_id"])

    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("org_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("role", sa.String(16), nullable=True))
        batch.add_column(sa.Column("allowed_models", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("allowed_cidrs", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rpm", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tpm", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_api_keys_org_id", "organizations", ["org_id"], ["id"])
        batch.create_index("ix_api_keys_org_id", ["org_id"])
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("org_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("cached_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cost_micros", Money, nullable=False, server_default="0"))
        batch.add_column(sa.Column("charged", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("requests_milli", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("tokens_milli", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("created_ms", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.create_foreign_key("fk_usage_org_id", "organizations", ["org_id"], ["id"])
        batch.create_index("ix_usage_org_window", ["org_id", "created_ms"])
        batch.create_index("ix_usage_key_window", ["key_id", "created_ms"])

    keys = sa.table("api_keys", sa.column("id"), sa.column("is_admin"), sa.column("org_id"),
                    sa.column("role"))
    op.execute(keys.update().where(keys.c.is_admin == sa.true()).values(role="operator"))
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM api_keys WHERE is_admin = :f"),
                    {"f": False}).scalar():
        orgs = sa.table("organizations", sa.column("id"), sa.column("name"), sa.column("disabled"),
                        sa.column("balance_micros"))
        op.execute(orgs.insert().values(name="default", disabled=False, balance_micros=0))
        default_id = bind.execute(sa.text("SELECT id FROM organizations WHERE name = 'default'")).scalar()
        op.execute(keys.update().where(keys.c.is_admin == sa.false()).values(org_id=default_id))
        usage = sa.table("usage", sa.column("org_id"))
        op.execute(usage.update().values(org_id=default_id))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_index("ix_usage_key_window")
        batch.drop_index("ix_usage_org_window")
        batch.drop_constraint("fk_usage_org_id", type_="foreignkey")
        for column in ("created_ms", "tokens_milli", "requests_milli", "charged", "cost_micros",
                       "cached_tokens", "org_id"):
            batch.drop_column(column)
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_index("ix_api_keys_org_id")
        batch.drop_constraint("fk_api_keys_org_id", type_="foreignkey")
        for column in ("tpm", "rpm", "expires_at", "allowed_cidrs", "allowed_models", "role",
                       "org_id"):
            batch.drop_column(column)
    for table in ("reservations", "balance_entries", "organizations", "prices", "price_books",
                  "plans"):
        op.drop_table(table)
