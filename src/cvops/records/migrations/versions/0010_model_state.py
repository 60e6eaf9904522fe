"""Model state: which model the replicas of a deployment serve, and every live replica.

model_state: one row per deployment (a group of replicas that serve one model together): the
desired metadata file and its generation, raised by one atomic upsert per `PUT /update_model`.
replicas: one row per `cvops serve` worker process on any host, keyed `<host>:<pid>`: the
generation it settled on (ok, or the reason it could not load it), the model it serves and a
heartbeat; rows whose heartbeat lapsed stop counting and are pruned (cvops.service.replicas).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_state",
        sa.Column("deployment", sa.String(100), primary_key=True),
        sa.Column("metadata_file", sa.String(255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("updated_on", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
    )
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("deployment", sa.String(100), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text()),
        sa.Column("metadata_file", sa.String(255)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_on", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_replicas_deployment_heartbeat", "replicas", ["deployment", "heartbeat"])


def downgrade() -> None:
    op.drop_index("ix_replicas_deployment_heartbeat", "replicas")
    op.drop_table("replicas")
    op.drop_table("model_state")
