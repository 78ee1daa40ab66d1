"""Bulk writes of an ingest batch: a few statements per table, whatever the batch size.

On PostgreSQL rows are streamed with ``COPY ... FROM STDIN`` (text format). That is about three
times cheaper than a multi-row ``INSERT ... VALUES`` for the server, which parses no SQL per
row, and for us, because SQLAlchemy's per-row parameter processing is skipped. On SQLite the
rows go through one ``executemany`` of plain tuples.

- :func:`append` adds rows to a table that has no unique key to conflict on.
- :func:`stage` loads rows into a temporary table of this connection (emptied at commit), so
  that a single ``INSERT ... SELECT ... ON CONFLICT`` or ``UPDATE ... FROM`` merges them all.

Values are encoded here exactly as the models' column types would bind them: times as UTC
(``timestamptz`` on PostgreSQL, SQLAlchemy's naive UTC text on SQLite), JSON columns as compact
JSON text (a :class:`bookkeeper.payloads.CheckedPayload` as the text it was checked as), ``None``
as NULL.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Integer,
    String,
    Table,
    TableClause,
    column,
    table,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

from bookkeeper.db import to_json
from bookkeeper.payloads import CheckedPayload

STAGE_PREFIX: Final = "bk_stage_"
ORDINAL: Final = "bk_n"
"""Column of a staging table that keeps the rows in the order they were given."""
_NULL: Final = "\\N"
"""NULL in COPY's text format."""


def _kind(table_: Table, name: str) -> type[TypeEngine[Any]]:
    kind = table_.c[name].type
    if isinstance(kind, TypeDecorator):
        kind = kind.impl_instance
    for family in (JSON, DateTime, Integer):
        if isinstance(kind, family):
            return family
    return String


def _escape(text: str) -> str:
    """``text`` as a field of COPY's text format (where a backslash starts an escape)."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def _json(value: Any) -> str:
    return value.json_text if type(value) is CheckedPayload else to_json(value)


def _sqlite_time(value: datetime) -> str:
    """SQLAlchemy's SQLite storage format of :class:`bookkeeper.models.UTCDateTime`."""
    t = value.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d} "
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{t.microsecond:06d}"
    )


def _copy_encoder(kind: type[TypeEngine[Any]]) -> Callable[[Any], str]:
    """Python value -> COPY text field, for a column of ``kind``."""
    if kind is JSON:
        return lambda value: _NULL if value is None else _escape(_json(value))
    if kind is DateTime:
        # Many rows share a time object (an event's, in its projections; stored_at). Keyed
        # by identity: the rows hold every object, so no id is reused during the call.
        texts: dict[int, str] = {}

        def time_text(value: datetime | None) -> str:
            if value is None:
                return _NULL
            text = texts.get(id(value))
            if text is None:
                text = texts[id(value)] = value.isoformat()
            return text

        return time_text
    if kind is Integer:
        return lambda value: _NULL if value is None else str(value)
    return lambda value: _NULL if value is None else _escape(value)


def _sqlite_encoder(kind: type[TypeEngine[Any]]) -> Callable[[Any], Any]:
    """Python value -> what sqlite3 binds, as SQLAlchemy would for a column of ``kind``."""
    if kind is JSON:
        return lambda value: None if value is None else _json(value)
    if kind is DateTime:
        return lambda value: None if value is None else _sqlite_time(value)
    return lambda value: value


def _names(conn: Connection, names: Sequence[str]) -> str:
    """Quoted identifiers, comma separated. Every name in SQL built here comes from the models
    (tables and columns) or from this module, never from a request."""
    quote = conn.dialect.identifier_preparer.quote
    return ", ".join(quote(name) for name in names)


def _copy(
    conn: Connection, name: str, columns: Sequence[str], lines: Iterable[Sequence[str]]
) -> None:
    buffer = io.StringIO()
    buffer.writelines("\t".join(fields) + "\n" for fields in lines)
    buffer.seek(0)
    statement = f"COPY {_names(conn, [name])} ({_names(conn, columns)}) FROM STDIN"
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(statement, buffer)
    finally:
        cursor.close()


def _insert_many(
    conn: Connection, name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    marks = ", ".join("?" * len(columns))
    target = f"{_names(conn, [name])} ({_names(conn, columns)})"
    conn.exec_driver_sql(f"INSERT INTO {target} VALUES ({marks})", list(rows))  # noqa: S608


def _write(
    conn: Connection,
    name: str,
    table_: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    numbered: bool = False,
) -> None:
    """Write ``rows`` into the table ``name``, whose columns are typed as in ``table_``.
    ``numbered``: prefix each row with its position (the staging tables' ordinal)."""
    columns = list(rows[0])
    prefix = [ORDINAL] if numbered else []
    if conn.dialect.name == "postgresql":
        copy_fields = [(c, _copy_encoder(_kind(table_, c))) for c in columns]
        lines = (
            [*((str(n),) if numbered else ()), *(encode(row[c]) for c, encode in copy_fields)]
            for n, row in enumerate(rows)
        )
        _copy(conn, name, [*prefix, *columns], lines)
    else:
        bind_fields = [(c, _sqlite_encoder(_kind(table_, c))) for c in columns]
        values = (
            (*((n,) if numbered else ()), *(encode(row[c]) for c, encode in bind_fields))
            for n, row in enumerate(rows)
        )
        _insert_many(conn, name, [*prefix, *columns], values)


def append(conn: Connection, table_: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (all with the same keys) into ``table_``."""
    if rows:
        _write(conn, table_.name, table_, rows)


def stage(
    conn: Connection, table_: Table, rows: Sequence[Mapping[str, Any]], label: str | None = None
) -> TableClause:
    """Load ``rows`` (at least one) into this connection's staging table for ``table_``.

    Returns the staging table: the columns of the rows (typed as in ``table_``) plus
    :data:`ORDINAL`, the row's position in ``rows``. It is created once per connection, and
    emptied before it is filled, so it holds the rows of this call only (PostgreSQL also
    empties it at commit: ``ON COMMIT DELETE ROWS``). ``label`` tells apart two stagings of
    one table with different columns.
    """
    if not rows:
        raise ValueError("nothing to stage")
    columns = list(rows[0])
    name = f"{STAGE_PREFIX}{label or table_.name}"
    stage_name, source = _names(conn, [name]), _names(conn, [table_.name])
    # The ordinal column takes its type from "0", the others theirs from the table.
    select_list = ", ".join([f"0 AS {_names(conn, [ORDINAL])}", _names(conn, columns)])
    if conn.dialect.name == "postgresql":
        query = f"SELECT {select_list} FROM {source} WITH NO DATA"  # noqa: S608
        create = f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage_name} ON COMMIT DELETE ROWS AS"
        empty = f"DELETE FROM {stage_name}"  # noqa: S608
        # One round trip for both statements (no parameters: psycopg2 sends them as one).
        conn.exec_driver_sql(f"{create} {query}; {empty}")
    else:
        query = f"SELECT {select_list} FROM main.{source} WHERE 0"  # noqa: S608
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage_name} AS {query}")
        conn.exec_driver_sql(f"DELETE FROM temp.{stage_name}")  # noqa: S608
    _write(conn, name, table_, rows, numbered=True)
    return table(name, column(ORDINAL), *(column(c) for c in columns))
