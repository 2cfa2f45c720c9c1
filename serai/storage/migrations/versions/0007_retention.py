"""Retention policies of organizations and keys (zero or store for some days), stored
completions (their content encrypted, kept until they expire), and the content key that seals
an Idempotency-Key response.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
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
    with op.batch_alter_table("idempotency_records") as batch:
        batch.add_column(sa.Column("cipher_key", sa.String(32), nullable=True))
    # Responses kept before this revision were in clear: forget them rather than keep them so.
    op.execute("DELETE FROM idempotency_records WHERE state = 'done'")
    op.create_table(
        "stored_completions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("completion_id", sa.String(64), nullable=False, unique=True),
        sa.Column("org_id", sa.Integer(), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("cipher_key", sa.String(32), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_stored_completions_org", "stored_completions", ["org_id", "id"])
    op.create_index("ix_stored_completions_expires_ms", "stored_completions", ["expires_ms"])


def downgrade() -> None:
    op.drop_table("stored_completions")
    with op.batch_alter_table("idempotency_records") as batch:
        batch.drop_column("cipher_key")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("retention_days")
        batch.drop_column("retention")
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("retention_days")
        batch.drop_column("retention")
