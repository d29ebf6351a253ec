"""Alembic migrations of the registry's schema; :func:`quiver.registry.db.migrate` runs them."""
