"""Alembic environment: runs on the connection handed over by `cvops.records.schema`."""

from alembic import context

from cvops.records.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
