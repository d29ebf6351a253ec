"""Schema migrations match the models on SQLite and PostgreSQL; the service never imports torch."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from quiver.registry.db import Database


def test_migrations_create_the_model_schema(tmp_path, database_url):
    db = Database(database_url or f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()
    db.migrate()                                    # idempotent
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
        tables = set(inspect(conn).get_table_names())
        indexes = {i["name"] for i in inspect(conn).get_indexes("version")}
    assert {"repo", "version", "version_file", "alias", "blob", "base_model", "token", "upload",
            "alembic_version"} <= tables
    assert {"ix_version_repo_status_number", "ix_version_base_status_id"} <= indexes
    db.dispose()


def test_registry_does_not_import_torch():
    code = ("import sys, quiver.registry.app, quiver.registry.server; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
