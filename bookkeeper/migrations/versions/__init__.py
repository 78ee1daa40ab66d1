"""Alembic revisions, oldest first; each works on PostgreSQL and SQLite."""
