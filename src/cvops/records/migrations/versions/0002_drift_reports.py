"""drift_reports: one row per monitor run x embedding x method.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_reports",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("run_id", sa.String(36), nullable=False, index=True),
        sa.Column("created_on", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("model_name", sa.String(200), nullable=False, index=True),
        sa.Column("model_version", sa.String(64)),
        sa.Column("window_start", sa.DateTime(timezone=True)),
        sa.Column("window_end", sa.DateTime(timezone=True)),
        sa.Column("sample_size", sa.Integer, nullable=False),
        sa.Column("reference_size", sa.Integer, nullable=False),
        sa.Column("embedding", sa.String(20), nullable=False),
        sa.Column("method", sa.String(40), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float),
        sa.Column("p_value", sa.Float),
        sa.Column("drifted", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("drift_reports")
