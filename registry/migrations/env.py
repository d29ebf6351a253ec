"""Alembic environment: runs on the connection :func:`quiver.registry.db.migrate` hands over."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from quiver.registry import models  # noqa: F401  (registers the tables on SQLModel.metadata)

target_metadata = SQLModel.metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    from sqlalchemy import create_engine

    with create_engine(context.config.get_main_option("sqlalchemy.url")).connect() as conn:
        _run(conn)
else:
    _run(connection)
