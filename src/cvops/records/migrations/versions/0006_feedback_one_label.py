"""feedback: one label per prediction (the latest wins); existing duplicates are collapsed.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # keep the newest row of each prediction (ties broken by id, so the choice is stable)
    op.execute(
        sa.text(
            "DELETE FROM feedback WHERE EXISTS (SELECT 1 FROM feedback AS newer"
            " WHERE newer.prediction_id = feedback.prediction_id"
            " AND (newer.created_on > feedback.created_on"
            " OR (newer.created_on = feedback.created_on AND newer.id > feedback.id)))"
        )
    )
    op.drop_index("ix_feedback_prediction_id", table_name="feedback")
    op.create_index("ix_feedback_prediction_id", "feedback", ["prediction_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_feedback_prediction_id", table_name="feedback")
    op.create_index("ix_feedback_prediction_id", "feedback", ["prediction_id"])
