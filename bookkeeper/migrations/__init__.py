"""Alembic migrations of the bookkeeper's schema (run by :func:`bookkeeper.db.migrate`)."""
