"""predictions and api_log, as in the reference (UUID string ids).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

FloatArray = sa.JSON().with_variant(postgresql.ARRAY(sa.Float), "postgresql")


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("model_name", sa.String(200), nullable=False, index=True),
        sa.Column("model_version", sa.String(64)),
        sa.Column("input_img", sa.Text),
        sa.Column("raw_hm_img", sa.Text),
        sa.Column("overlaid_img", sa.Text),
        sa.Column("prediction_json", sa.JSON, nullable=False),
        sa.Column("uae_feats", FloatArray, nullable=False),
        sa.Column("bbsd_feats", FloatArray, nullable=False),
        sa.Column("created_on", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_table(
        "api_log",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("message", sa.Text),
        sa.Column("timespan", sa.Float, nullable=False),
        sa.Column("created_on", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id")),
    )


def downgrade() -> None:
    op.drop_table("api_log")
    op.drop_table("predictions")
