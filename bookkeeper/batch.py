"""The projection of one ingest batch while it is built: shared by the ``project_*`` modules."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, Table, TableClause, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase

from bookkeeper import bulk
from bookkeeper.models import DailyStat, HourlyStat

IN_CHUNK: Final = 500
"""Values per ``IN (...)`` list when rows are read or locked by key."""
TASK_FIELDS: Final = ("parent_id", "series_uid", "study_uid", "rule", "target", "status", "data")
"""The task columns a ``task_update`` sets."""


def hour_of(time: datetime) -> datetime:
    """The start of the UTC hour ``time`` falls in (the key of ``hourly_stats``)."""
    return time.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def dialect_insert(conn: Connection, model: type[DeclarativeBase]) -> Any:
    """The dialect's INSERT (with ON CONFLICT support) for ``model``."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(model)


def table_of(model: type[DeclarativeBase]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def insert_staged(conn: Connection, model: type[DeclarativeBase], staged: TableClause) -> Any:
    """``INSERT INTO <model> SELECT <staged rows, in their order>``, to add ``ON CONFLICT`` to.

    (``WHERE true`` is what SQLite needs to parse an upsert whose rows come from a SELECT.)
    """
    columns = [c.name for c in staged.columns if c.name != bulk.ORDINAL]
    rows = (
        select(*(staged.c[name] for name in columns)).where(true()).order_by(staged.c[bulk.ORDINAL])
    )
    return dialect_insert(conn, model).from_select(columns, rows)


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class TaskState:
    """A task row while a batch is merged into it."""

    id: str
    created_at: datetime
    updated_at: datetime
    parent_id: str | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    rule: str | None = None
    target: str | None = None
    status: str | None = None
    data: dict[str, Any] | None = None
    dirty: bool = False
    status_changed: bool = False

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            **{name: getattr(self, name) for name in TASK_FIELDS},
        }


@dataclass
class Batch:
    """One batch being projected: its connection, counters and the tasks it touched."""

    conn: Connection
    stats: Counter[tuple[datetime, str, str]] = field(default_factory=Counter)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    series_created: set[str] = field(default_factory=set)

    def count(self, time: datetime, metric: str, key: str = "", value: int = 1) -> None:
        self.stats[hour_of(time), metric, key] += value

    def insert_rows(self, model: type[DeclarativeBase], rows: list[dict[str, Any]]) -> None:
        bulk.append(self.conn, table_of(model), rows)


def day_of(time: datetime) -> datetime:
    """The start of the UTC day ``time`` falls in (the key of ``daily_stats``)."""
    return time.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def write_stats(batch: Batch) -> None:
    """Add the batch's counts to ``hourly_stats`` and ``daily_stats``.

    Rows are written in sorted order, hours before days, so concurrent batches lock the rows
    they share in the same order and never deadlock on them. Each event is projected once
    (by its id), so both counters stay exact when batches are sent again.
    """
    if not batch.stats:
        return
    days: Counter[tuple[datetime, str, str]] = Counter()
    for (hour, metric, key), value in batch.stats.items():
        days[day_of(hour), metric, key] += value
    _add_counts(batch.conn, HourlyStat, "hour", batch.stats)
    _add_counts(batch.conn, DailyStat, "day", days)


def _add_counts(
    conn: Connection,
    model: type[HourlyStat] | type[DailyStat],
    period: str,
    counts: Counter[tuple[datetime, str, str]],
) -> None:
    rows = [
        {period: start, "metric": metric, "key": key, "value": value}
        for (start, metric, key), value in sorted(counts.items())
    ]
    statement = dialect_insert(conn, model)
    statement = statement.on_conflict_do_update(
        index_elements=[period, "metric", "key"],
        set_={"value": model.value + statement.excluded.value},
    )
    conn.execute(statement, rows)
