"""Initial schema: raw events, series, receptions, tasks, task/system/audit events, module
logs and outputs, configuration versions, hourly statistics.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Written out by hand (not imported from ``bookkeeper.models``) so that it keeps creating exactly
this schema whatever the models become; ``tests/test_bookkeeper_service.py`` checks that the
migrations and the models agree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

logger = logging.getLogger(__name__)

TRIGRAM_INDEX = "ix_series_patient_name_trgm"
"""PostgreSQL only, when the pg_trgm extension can be created: speeds up name *contains*
searches. Not in the models (SQLite has no equivalent); the comparison test ignores it."""


def _pk(name: str = "id") -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False)


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str, nullable: bool = True) -> sa.Column[object]:
    kind = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(), "postgresql")
    return sa.Column(name, kind, nullable=nullable)


def _str(name: str, length: int | None = None, nullable: bool = False) -> sa.Column[str]:
    kind = sa.String(length) if length else sa.Text()
    return sa.Column(name, kind, nullable=nullable)


def _int(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


ERRORS_ONLY = sa.text("severity IN ('error', 'critical')")


def upgrade() -> None:
    op.create_table(
        "events",
        _pk("pk"),
        _str("event_id", 128),
        _str("producer", 128),
        _int("seq"),
        _str("kind", 64),
        _time("time"),
        _time("stored_at"),
        _json("payload", nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_events"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
    )

    _create_series()
    _create_tasks()
    _create_system_tables()

    op.create_table(
        "hourly_stats",
        _time("hour"),
        _str("metric", 32),
        _str("key", 256),
        _int("value"),
        sa.PrimaryKeyConstraint("hour", "metric", "key", name="pk_hourly_stats"),
    )
    _create_trigram_index()


def _create_series() -> None:
    tag_columns = [
        _str(name, nullable=True)
        for name in (
            "patient_name",
            "patient_name_search",
            "patient_id",
            "patient_birth_date",
            "patient_sex",
            "accession_number",
            "study_id",
            "study_date",
            "study_time",
            "study_description",
            "series_description",
            "series_number",
            "modality",
            "body_part_examined",
            "protocol_name",
            "manufacturer",
            "manufacturer_model_name",
            "station_name",
            "referring_physician_name",
            "sender_aet",
            "sender_address",
            "receiver_aet",
        )
    ]
    op.create_table(
        "series",
        _pk(),
        _str("series_uid", 64),
        _str("study_uid", 64),
        *tag_columns,
        _time("first_received_at"),
        _time("last_received_at"),
        _int("instance_count"),
        _str("status", 64),
        _time("status_at"),
        _json("tags"),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("series_uid", name="uq_series_series_uid"),
    )
    op.create_index("ix_series_study_uid", "series", ["study_uid"])
    op.create_index("ix_series_last_received_at", "series", ["last_received_at"])
    op.create_index("ix_series_first_received_at", "series", ["first_received_at"])
    for column in ("patient_id", "accession_number", "modality", "sender_aet", "status"):
        op.create_index(
            f"ix_series_{column}_last_received_at", "series", [column, "last_received_at"]
        )
    op.create_index(
        "ix_series_patient_name_search",
        "series",
        ["patient_name_search"],
        postgresql_ops={"patient_name_search": "text_pattern_ops"},
    )

    op.create_table(
        "series_receptions",
        _pk(),
        _str("event_id", 128),
        _str("series_uid", 64),
        _str("association_id", 128, nullable=True),
        _time("received_at"),
        _int("instance_count"),
        _int("bytes", nullable=True),
        _str("sender_aet", nullable=True),
        _str("sender_address", nullable=True),
        _str("receiver_aet", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_series_receptions"),
    )
    op.create_index(
        "ix_series_receptions_series_uid_received_at",
        "series_receptions",
        ["series_uid", "received_at"],
    )


def _create_tasks() -> None:
    op.create_table(
        "tasks",
        _str("id", 128),
        _str("parent_id", 128, nullable=True),
        _str("series_uid", 64, nullable=True),
        _str("study_uid", 64, nullable=True),
        _str("rule", 256, nullable=True),
        _str("target", nullable=True),
        _str("status", 64, nullable=True),
        _json("data"),
        _time("created_at"),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
    )
    for column in ("parent_id", "series_uid", "study_uid"):
        op.create_index(f"ix_tasks_{column}", "tasks", [column])
    op.create_index("ix_tasks_rule_created_at", "tasks", ["rule", "created_at"])

    op.create_table(
        "task_events",
        _pk(),
        _str("event_id", 128),
        _str("task_id", 128),
        _time("time"),
        _str("producer", 128),
        _str("event", 64),
        _str("severity", 16),
        _str("info"),
        _int("file_count", nullable=True),
        _str("target", nullable=True),
        _str("rule", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_task_events"),
    )
    op.create_index("ix_task_events_task_id_time", "task_events", ["task_id", "time"])
    op.create_index(
        "ix_task_events_errors",
        "task_events",
        ["time"],
        postgresql_where=ERRORS_ONLY,
        sqlite_where=ERRORS_ONLY,
    )

    op.create_table(
        "module_logs",
        _pk(),
        _str("event_id", 128),
        _str("task_id", 128),
        _str("module", 256),
        _time("time"),
        _str("logs"),
        sa.PrimaryKeyConstraint("id", name="pk_module_logs"),
    )
    op.create_index("ix_module_logs_task_id", "module_logs", ["task_id"])

    op.create_table(
        "module_outputs",
        _pk(),
        _str("event_id", 128),
        _str("task_id", 128),
        _str("module", 256),
        _int("index"),
        _time("time"),
        _json("settings"),
        _json("output"),
        sa.PrimaryKeyConstraint("id", name="pk_module_outputs"),
    )
    op.create_index("ix_module_outputs_task_id", "module_outputs", ["task_id"])


def _create_system_tables() -> None:
    op.create_table(
        "system_events",
        _pk(),
        _str("event_id", 128),
        _time("time"),
        _str("producer", 128),
        _str("event", 64),
        _str("severity", 16),
        _str("description"),
        sa.PrimaryKeyConstraint("id", name="pk_system_events"),
    )
    op.create_index("ix_system_events_time", "system_events", ["time"])
    op.create_index(
        "ix_system_events_errors",
        "system_events",
        ["time"],
        postgresql_where=ERRORS_ONLY,
        sqlite_where=ERRORS_ONLY,
    )

    op.create_table(
        "audit_events",
        _pk(),
        _str("event_id", 128),
        _time("time"),
        _str("producer", 128),
        _str("event", 64),
        _str("user", 256),
        _str("description"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_time", "audit_events", ["time"])
    op.create_index("ix_audit_events_user_time", "audit_events", ["user", "time"])

    op.create_table(
        "config_versions",
        _pk(),
        _str("event_id", 128),
        _time("time"),
        _str("producer", 128),
        _str("user", 256),
        _str("comment"),
        _str("sha256", 64),
        _json("content", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_config_versions"),
    )
    op.create_index("ix_config_versions_time", "config_versions", ["time"])
    op.create_index("ix_config_versions_sha256", "config_versions", ["sha256"])


def _create_trigram_index() -> None:
    """A trigram index for name *contains* searches, when this PostgreSQL allows pg_trgm.

    pg_trgm is a trusted extension (PostgreSQL 13+): a database owner may create it. Where it
    is missing or refused, the search still works, by scanning.
    """
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    available = bind.execute(
        sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
    ).first()
    if available is None:
        logger.warning("pg_trgm is not available: patient name 'contains' searches will scan")
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
    op.execute(f"DROP INDEX IF EXISTS {TRIGRAM_INDEX}")
    for table in (
        "hourly_stats",
        "config_versions",
        "audit_events",
        "system_events",
        "module_outputs",
        "module_logs",
        "task_events",
        "tasks",
        "series_receptions",
        "series",
        "events",
    ):
        op.drop_table(table)
