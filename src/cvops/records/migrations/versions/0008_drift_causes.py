"""Drift causes: image properties per prediction and one cause row per monitor run.

predictions.image_props: {property: value} of the upload (cvops.data.properties), nullable:
rows written before this revision (or whose properties were not computed) have none, and the
monitor then explains drift without them. drift_causes: the ranked causes of each monitor run
(cvops.monitor.causes), keyed by the run id its drift_reports rows share.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("image_props", sa.JSON(), nullable=True))
    op.create_table(
        "drift_causes",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("created_on", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64)),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("sentence", sa.Text(), nullable=False),
        sa.Column("top_cause", sa.String(40)),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_drift_causes_created_on", "drift_causes", ["created_on"])
    op.create_index("ix_drift_causes_model_name", "drift_causes", ["model_name"])


def downgrade() -> None:
    op.drop_index("ix_drift_causes_model_name", "drift_causes")
    op.drop_index("ix_drift_causes_created_on", "drift_causes")
    op.drop_table("drift_causes")
    op.drop_column("predictions", "image_props")
