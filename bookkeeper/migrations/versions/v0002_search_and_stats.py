"""Faster dashboard queries: daily statistics, a code-point ordered name index, better
estimates for name searches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

- ``daily_stats``: ``hourly_stats`` summed by UTC day, filled from it here and kept up to date
  by the ingest from now on. A 30-day window of the dashboard sums 30 rows per rule or target
  instead of 720.
- ``ix_hourly_stats_metric_hour``: the hourly chart reads its three metrics without going
  through the rule and target counters of the same hours.
- ``series.patient_name_search`` is ``COLLATE "C"`` on PostgreSQL (SQLite compares by code
  point already), and one index on ``(patient_name_search, id)`` replaces the
  ``text_pattern_ops`` one: it serves prefix searches (as a range), ``ORDER BY`` name, and
  cursors, where the pattern index served only ``LIKE``. Sorting by name is now in code point
  order on both databases. A second one, ``(patient_name_search, last_received_at)``, lets
  SQLite answer "name prefix, newest first" from the index instead of sorting every match.
- PostgreSQL samples ``patient_name_search`` ten times more (statistics target 1000), so that
  the planner estimates how many names *contain* a text and picks the trigram index or the
  newest-first scan accordingly (with the default it guessed 100 rows for 5,000 and read them
  all).
- The trigram index of 0001 is created if it is missing and pg_trgm has become available.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

logger = logging.getLogger(__name__)

NAME_STATISTICS = 1000
TRIGRAM_INDEX = "ix_series_patient_name_trgm"


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "daily_stats",
        sa.Column("day", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "metric", "key", name="pk_daily_stats"),
    )
    if postgresql:
        day = "date_trunc('day', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    else:  # naive UTC text, 'YYYY-MM-DD HH:MM:SS.ffffff'
        day = "substr(hour, 1, 10) || ' 00:00:00.000000'"
    totals = f"SELECT {day}, metric, key, sum(value) FROM hourly_stats GROUP BY 1, 2, 3"  # noqa: S608
    op.execute(f"INSERT INTO daily_stats (day, metric, key, value) {totals}")
    op.create_index("ix_hourly_stats_metric_hour", "hourly_stats", ["metric", "hour"])

    if postgresql:
        op.alter_column(
            "series",
            "patient_name_search",
            type_=sa.Text(collation="C"),
            existing_type=sa.Text(),
            existing_nullable=True,
        )
        op.execute(
            f"ALTER TABLE series ALTER COLUMN patient_name_search SET STATISTICS {NAME_STATISTICS}"
        )
    op.drop_index("ix_series_patient_name_search", "series")
    op.create_index("ix_series_patient_name_search_id", "series", ["patient_name_search", "id"])
    op.create_index(
        "ix_series_patient_name_search_last_received_at",
        "series",
        ["patient_name_search", "last_received_at"],
    )
    if postgresql:
        _create_trigram_index()


def _create_trigram_index() -> None:
    bind = op.get_bind()
    exists = bind.execute(sa.text("SELECT to_regclass(:name)"), {"name": TRIGRAM_INDEX}).scalar()
    if exists is not None:
        return
    try:
        with bind.begin_nested():
            op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            op.execute(
                f"CREATE INDEX {TRIGRAM_INDEX} ON series "
                "USING gin (patient_name_search gin_trgm_ops)"
            )
    except sa.exc.DBAPIError as exc:
        logger.warning("cannot use pg_trgm (%s): name 'contains' searches will scan", exc.orig)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.drop_index("ix_series_patient_name_search_last_received_at", "series")
    op.drop_index("ix_series_patient_name_search_id", "series")
    op.create_index(
        "ix_series_patient_name_search",
        "series",
        ["patient_name_search"],
        postgresql_ops={"patient_name_search": "text_pattern_ops"},
    )
    if postgresql:
        op.execute("ALTER TABLE series ALTER COLUMN patient_name_search SET STATISTICS -1")
        op.alter_column(
            "series",
            "patient_name_search",
            type_=sa.Text(),
            existing_type=sa.Text(collation="C"),
            existing_nullable=True,
        )
    op.drop_index("ix_hourly_stats_metric_hour", "hourly_stats")
    op.drop_table("daily_stats")
