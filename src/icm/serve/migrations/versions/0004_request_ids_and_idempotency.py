"""Request ids on decisions, and the idempotency keys of the moderation routes (issue 21).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("icm_decisions") as batch:
        # the X-Request-ID of the request that made the decision; NULL for decisions stored before
        batch.add_column(sa.Column("request_id", sa.String(128), nullable=True))
        batch.create_index("ix_icm_decisions_request_id", ["request_id"])
    op.create_table(
        "icm_idempotency",
        # the API key's name ('' without keys) and the client's Idempotency-Key
        sa.Column("client", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("route", sa.String(100), nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),  # unix seconds
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("status", sa.Integer, nullable=True),  # NULL: the first request is still running
        sa.Column("response", sa.Text, nullable=True),  # its JSON body
    )
    op.create_index("ix_icm_idempotency_created", "icm_idempotency", ["created_at"])


def downgrade() -> None:
    op.drop_table("icm_idempotency")
    with op.batch_alter_table("icm_decisions") as batch:
        batch.drop_index("ix_icm_decisions_request_id")
        batch.drop_column("request_id")
