"""Console sessions: a browser signed in with an admin key (the token's hash, its CSRF token
and when it expires).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_console_sessions_expires_ms", "console_sessions", ["expires_ms"])


def downgrade() -> None:
    op.drop_index("ix_console_sessions_expires_ms", "console_sessions")
    op.drop_table("console_sessions")
