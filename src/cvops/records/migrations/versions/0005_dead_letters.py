"""dead_letters: records the database refused, kept with the reason; api_log.method widened.

`api_log.method` was VARCHAR(10): a request with a longer method (UNSUBSCRIBE, 11) was a row
Postgres refused. SQLite does not enforce VARCHAR lengths, so only Postgres is altered.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("record_id", sa.String(36), nullable=True, index=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_on", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("api_log", "method", type_=sa.String(32), existing_type=sa.String(10))


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("api_log", "method", type_=sa.String(10), existing_type=sa.String(32))
    op.drop_table("dead_letters")
