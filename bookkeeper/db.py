"""Database engines and the schema migrations (Alembic, applied programmatically at start)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Final

import pydantic_core
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

logger = logging.getLogger(__name__)

MIGRATIONS: Final = Path(__file__).with_name("migrations")
"""Alembic's script folder, inside the package so that it works installed too."""
CONNECT_TIMEOUT_S: Final = 10
STATEMENT_TIMEOUT_MS: Final = 120_000
"""PostgreSQL aborts a statement after this long; a big ingest batch stays far below it."""
SQLITE_BUSY_TIMEOUT_S: Final = 30.0
SQLITE_ANALYSIS_LIMIT: Final = 1000
"""Rows ANALYZE samples per index on SQLite."""
VERSION_TABLE: Final = "alembic_version"
MIGRATION_LOCK: Final = 0x0B00_C0DE
"""PostgreSQL advisory lock held while migrating, so that two bookkeepers never migrate at once."""


def create_db_engine(url: str | URL) -> Engine:
    """An engine for PostgreSQL (psycopg2) or SQLite with Caduceus' connection settings.

    SQLite: WAL, ``synchronous=FULL`` (an acknowledged event survives a power loss: the shipper
    deletes it from its outbox once we answer), foreign keys on, a busy timeout for the writer
    lock. PostgreSQL: connect and statement timeouts, connections checked before use.
    """
    url = normalise_url(url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            json_serializer=to_json,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_driver_name() == "psycopg2":
        connect_args = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c timezone=UTC",
            "application_name": "caduceus-bookkeeper",
        }
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=8,
        connect_args=connect_args,
        json_serializer=to_json,
    )


def to_json(value: Any) -> str:
    """``value`` as compact JSON text, non-ASCII characters as they are (not ``\\u`` escapes).

    Raises ValueError for a NaN or an infinite number, which JSON does not have. pydantic-core
    serialises (three times faster than :mod:`json`); only a text that may hold such a number
    is serialised again by :mod:`json`, which refuses it.
    """
    text = pydantic_core.to_json(value).decode()
    if "NaN" in text or "Infinity" in text:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text


def normalise_url(url: str | URL) -> URL:
    """``url`` with the driver Caduceus installs: ``postgresql://`` means psycopg2 (SQLAlchemy
    2.1 would pick psycopg 3), and libpq's ``postgres://`` spelling is accepted."""
    url = make_url(url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL is a property of the file: set once. Setting it again needs a lock that a busy
        # writer may hold, and would fail a new connection for no reason.
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def alembic_config(engine: Engine | None = None) -> AlembicConfig:
    """An Alembic configuration for the packaged migrations (no ``alembic.ini`` needed)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Module names must be identifiers (mypy checks the scripts): v0002_..., not 0002_...
    config.set_main_option("file_template", "v%%(rev)s_%%(slug)s")
    if engine is not None:
        config.set_main_option(
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
        )
    return config


def head_revision() -> str:
    """The newest revision the migrations know."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, None when it has no schema yet."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> str:
    """Bring the schema up to the newest revision (idempotent); return the revision.

    On PostgreSQL the whole upgrade is one transaction under an advisory lock: two processes
    starting at once migrate one after the other, and a failed migration leaves nothing behind.
    Raises :class:`alembic.util.CommandError` when the database is at a revision these
    migrations do not know (a newer Caduceus wrote it).
    """
    config = alembic_config(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = conn
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(config, "head")
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        logger.info("database schema migrated from %s to %s", before or "empty", after)
    if after is None:
        raise RuntimeError("the migrations left no revision")
    return after


def optimise(engine: Engine) -> None:
    """Refresh SQLite's query planner statistics (run at start).

    Without statistics SQLite may pick a poor index for a search with several filters.
    ``analysis_limit`` samples each index instead of reading it all, so this takes well under a
    second even on millions of rows. PostgreSQL's autovacuum keeps its own statistics.
    """
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql(f"PRAGMA analysis_limit = {SQLITE_ANALYSIS_LIMIT}")
            conn.exec_driver_sql("ANALYZE")
