"""The webhook outbox: events written with the decision or review that makes them,
delivered (and retried) by the server until the receiver accepts them.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "icm_webhook_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("decision_id", sa.Integer, sa.ForeignKey("icm_decisions.id"), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("next_attempt_at", sa.Float, nullable=False),  # unix seconds
        sa.Column("delivered_at", sa.String(40), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_icm_webhook_outbox_due", "icm_webhook_outbox", ["delivered_at", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("icm_webhook_outbox")
