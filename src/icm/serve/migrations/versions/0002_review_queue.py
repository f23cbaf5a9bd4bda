"""The review queue: why a decision awaits a person, and reviewers' claims.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("icm_decisions") as batch:
        # 'review' (the model's verdict) or 'audit' (sampled at --audit-rate); NULL: not queued
        batch.add_column(sa.Column("queue", sa.String(16), nullable=True))
        batch.create_index("ix_icm_decisions_queue", ["queue", "id"])
    # decisions stored before the queue existed: those the model sent to review await a person
    op.execute("UPDATE icm_decisions SET queue = 'review' WHERE verdict = 'review'")
    op.create_table(
        "icm_claims",
        sa.Column("decision_id", sa.Integer, sa.ForeignKey("icm_decisions.id"), primary_key=True, autoincrement=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("claimed_at", sa.String(40), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),  # unix seconds
    )


def downgrade() -> None:
    op.drop_table("icm_claims")
    with op.batch_alter_table("icm_decisions") as batch:
        batch.drop_index("ix_icm_decisions_queue")
        batch.drop_column("queue")
