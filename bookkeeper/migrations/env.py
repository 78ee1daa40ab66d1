"""Alembic environment: migrate the connection :func:`bookkeeper.db.migrate` hands over.

Run through ``alembic`` directly (``sqlalchemy.url`` set), it opens its own connection.
Offline (SQL script) mode is not supported: the migrations inspect the database they run on.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from bookkeeper.db import create_db_engine
from bookkeeper.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: later revisions use batch operations (copy and move).
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    if context.is_offline_mode():
        raise RuntimeError("the bookkeeper's migrations run online only")
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url to migrate")
    engine = create_db_engine(url)
    try:
        with engine.begin() as own:
            _run(own)
    finally:
        engine.dispose()


run_migrations()
