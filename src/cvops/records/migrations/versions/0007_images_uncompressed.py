"""predictions' images stored without Postgres' TOAST compression.

They are base64 of JPEG/PNG bytes, already compressed: pglz gained nothing on them (the same
table size) and cost about 0.6 ms of the database's CPU per prediction, on the service's
cores (measured on 2 cores, benchmarks/serve.py). Only the storage mode changes; existing
rows are read as before. SQLite has no such setting.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

IMAGE_COLUMNS = ("input_img", "raw_hm_img", "overlaid_img")


def _set_storage(mode: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column in IMAGE_COLUMNS:
        op.execute(f"ALTER TABLE predictions ALTER COLUMN {column} SET STORAGE {mode}")


def upgrade() -> None:
    _set_storage("EXTERNAL")


def downgrade() -> None:
    _set_storage("EXTENDED")
