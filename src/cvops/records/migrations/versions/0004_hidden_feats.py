"""predictions.hidden_feats: the classifier's pooled conv features, the monitor's third embedding.

Nullable: rows of models without the layer (and rows written before this revision) have none.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FloatArray = sa.JSON().with_variant(postgresql.ARRAY(sa.Float), "postgresql")


def upgrade() -> None:
    op.add_column("predictions", sa.Column("hidden_feats", FloatArray, nullable=True))


def downgrade() -> None:
    op.drop_column("predictions", "hidden_feats")
