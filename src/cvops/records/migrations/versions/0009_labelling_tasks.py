"""Labelling: the predictions sent to Label Studio and the answers that came back.

labelling_tasks: one row per prediction sent by `cvops label push` (the arm that picked it: a
strategy or the random control), filled in by `cvops label pull` with the counted annotation,
its label and the dataset version that holds the image (cvops.labelling).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "labelling_tasks",
        sa.Column("prediction_id", sa.String(36), primary_key=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64)),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("arm", sa.String(40), nullable=False),
        sa.Column("priority", sa.Float()),
        sa.Column("predicted", sa.String(200)),
        sa.Column("confidence", sa.Float()),
        sa.Column("sent_on", sa.DateTime(timezone=True), nullable=False),
        sa.Column("task_id", sa.Integer()),
        sa.Column("annotation_id", sa.Integer()),
        sa.Column("annotation_updated", sa.String(40)),
        sa.Column("label", sa.String(200)),
        sa.Column("labelled_on", sa.DateTime(timezone=True)),
        sa.Column("dataset_tag", sa.String(64)),
        sa.Column("dataset_path", sa.Text()),
    )
    op.create_index("ix_labelling_tasks_model_name", "labelling_tasks", ["model_name"])
    op.create_index("ix_labelling_tasks_sent_on", "labelling_tasks", ["sent_on"])


def downgrade() -> None:
    op.drop_index("ix_labelling_tasks_sent_on", "labelling_tasks")
    op.drop_index("ix_labelling_tasks_model_name", "labelling_tasks")
    op.drop_table("labelling_tasks")
