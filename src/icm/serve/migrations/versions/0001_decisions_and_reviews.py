"""Decisions and reviews (what the numbered migration 1 of earlier releases made).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "icm_decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("image_name", sa.Text, nullable=True),
        sa.Column("image_format", sa.String(16), nullable=True),
        sa.Column("image_kept", sa.Boolean, nullable=False, default=False),
        sa.Column("source", sa.String(16), nullable=True),
        sa.Column("client", sa.String(200), nullable=True),
        sa.Column("policy", sa.String(200), nullable=False),
        sa.Column("rules", sa.String(200), nullable=False),
        sa.Column("backend", sa.String(100), nullable=False),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("p_violation", sa.Float, nullable=True),
        sa.Column("p_term", sa.Float, nullable=True),
        sa.Column("product", sa.String(200), nullable=True),
        sa.Column("product_probability", sa.Float, nullable=True),
        sa.Column("rule", sa.Text, nullable=True),
        sa.Column("label", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("explanation", sa.Text, nullable=True),
        sa.Column("record", sa.Text, nullable=False),
    )
    op.create_index("ix_icm_decisions_sha", "icm_decisions", ["image_sha256"])
    op.create_index("ix_icm_decisions_created", "icm_decisions", ["created_at"])
    op.create_table(
        "icm_reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.Integer, sa.ForeignKey("icm_decisions.id"), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("api_key_name", sa.String(200), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("product", sa.String(200), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index("ix_icm_reviews_decision", "icm_reviews", ["decision_id"])


def downgrade() -> None:
    op.drop_table("icm_reviews")
    op.drop_table("icm_decisions")
