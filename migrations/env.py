"""Alembic environment: smifdb always hands alembic an open connection (see smifdb.migrate)."""

from alembic import context

from smifdb.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
