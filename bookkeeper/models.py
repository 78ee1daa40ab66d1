"""The bookkeeper's database schema: SQLAlchemy 2 typed models (``docs/bookkeeper.md``).

The same models (and the Alembic migrations in ``bookkeeper/migrations`` that create them) serve
PostgreSQL and SQLite. Three portable column types hide the differences:

- :data:`JSONType`: ``JSONB`` on PostgreSQL, JSON text on SQLite;
- :class:`UTCDateTime`: ``timestamptz`` on PostgreSQL, ISO text on SQLite; always an aware UTC
  ``datetime`` in Python, so comparisons and sorting agree on both;
- :data:`BigIntPK`: ``BIGINT`` identity on PostgreSQL, SQLite's ``INTEGER PRIMARY KEY`` (rowid).

``events`` keeps every envelope exactly as received (unique ``event_id``); the other tables are
projections of known kinds, written in the same transaction as the envelope, once per event id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator, TypeEngine

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType: Final[TypeEngine[Any]] = JSON(none_as_null=True).with_variant(JSONB(), "postgresql")
"""JSONB on PostgreSQL (indexable, compact), JSON text on SQLite. Python ``None`` is SQL NULL."""

BigIntPK: Final[TypeEngine[int]] = BigInteger().with_variant(Integer(), "sqlite")
"""A 64-bit key; on SQLite ``INTEGER PRIMARY KEY`` so that it is the (auto-assigned) rowid."""

NAME_SEARCH_TYPE: Final[TypeEngine[str]] = Text().with_variant(Text(collation="C"), "postgresql")
"""Text compared by code point: ``COLLATE "C"`` on PostgreSQL, as SQLite compares anyway. One
plain index then serves prefix ranges, ``ORDER BY`` and row comparisons alike."""

SEVERITIES: Final = ("info", "warning", "error", "critical")
"""Severity vocabulary of task and system events (mercure's 0-3, by name)."""
ERROR_SEVERITIES: Final = ("error", "critical")


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, stored as UTC, always returned as an aware UTC ``datetime``.

    PostgreSQL stores ``timestamptz``; SQLite stores naive UTC text
    (``YYYY-MM-DD HH:MM:SS.ffffff``), which sorts and compares like the times it stands for.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        int: BigInteger(),
        str: Text(),
    }


def _error_only(column: str) -> dict[str, Any]:
    """Dialect options of a partial index over error and critical rows only."""
    where = text(f"{column} IN ('error', 'critical')")
    return {"postgresql_where": where, "sqlite_where": where}


# ---------------------------------------------------------------------------- raw events


class EventRecord(Base):
    """Every envelope ever received, once per ``event_id`` (the ingest's idempotency key).

    ``pk`` numbers the events in the order they were stored, so the arrival order of each
    producer's events can be checked. Beyond the keys nothing is indexed: no query reads this
    table by anything else (the projections answer them), and every index would cost each
    ingested event an update. A later migration adds one when a query needs it.
    """

    __tablename__ = "events"

    pk: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    producer: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime]
    """When the producer recorded the event (the envelope's ``time``)."""
    stored_at: Mapped[datetime]
    """When the bookkeeper committed it."""
    payload: Mapped[dict[str, Any]]


# ---------------------------------------------------------------------------- series and files


class Series(Base):
    """One DICOM series, registered by its first ``series_received`` event.

    Tag columns come from the first reception's side-car and are not changed by later ones;
    counts and times accumulate over every reception.
    """

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None]
    patient_name_search: Mapped[str | None] = mapped_column(NAME_SEARCH_TYPE)
    """``patient_name`` case-folded with ``^`` as a space: what name searches compare against,
    and what sorting by name orders by (in code point order on both databases)."""
    patient_id: Mapped[str | None]
    patient_birth_date: Mapped[str | None]
    patient_sex: Mapped[str | None]
    accession_number: Mapped[str | None]
    study_id: Mapped[str | None]
    study_date: Mapped[str | None]
    study_time: Mapped[str | None]
    study_description: Mapped[str | None]
    series_description: Mapped[str | None]
    series_number: Mapped[str | None]
    modality: Mapped[str | None]
    body_part_examined: Mapped[str | None]
    protocol_name: Mapped[str | None]
    manufacturer: Mapped[str | None]
    manufacturer_model_name: Mapped[str | None]
    station_name: Mapped[str | None]
    referring_physician_name: Mapped[str | None]
    sender_aet: Mapped[str | None]
    sender_address: Mapped[str | None]
    receiver_aet: Mapped[str | None]
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    instance_count: Mapped[int]
    """Instances received (every reception counts, a re-sent instance too)."""
    status: Mapped[str] = mapped_column(String(64))
    status_at: Mapped[datetime]
    tags: Mapped[dict[str, Any] | None]
    """The whole side-car of the first instance received."""

    __table_args__ = (
        # The name in the entry lets SQLite test a name 'contains' newest first off the index.
        Index(None, "last_received_at", "patient_name_search"),
        Index(None, "first_received_at"),
        Index(None, "patient_id", "last_received_at"),
        Index(None, "accession_number", "last_received_at"),
        Index(None, "modality", "last_received_at"),
        Index(None, "sender_aet", "last_received_at"),
        Index(None, "status", "last_received_at"),
        # Serves name prefix searches (as a range), sorting by name, and name cursors.
        Index(None, "patient_name_search", "id"),
        # Serves a name prefix, newest first: SQLite reads the page off it, not every match.
        Index(None, "patient_name_search", "last_received_at"),
    )


class SeriesReception(Base):
    """One ``series_received`` event: part of a series delivered over one association.

    The instances received (SOP Instance UIDs and file names, in arrival order) are not copied
    into a table of their own: they are in the reception's raw event (``event_id``), which the
    series detail reads. A 2,000-slice CT is then one row here, not 2,000.
    """

    __tablename__ = "series_receptions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128))
    """The ``series_received`` event in ``events``, whose payload lists the files."""
    series_uid: Mapped[str] = mapped_column(String(64))
    association_id: Mapped[str | None] = mapped_column(String(128))
    received_at: Mapped[datetime]
    instance_count: Mapped[int]
    bytes: Mapped[int | None]
    sender_aet: Mapped[str | None]
    sender_address: Mapped[str | None]
    receiver_aet: Mapped[str | None]

    __table_args__ = (Index(None, "series_uid", "received_at"),)


# ---------------------------------------------------------------------------- tasks


class Task(Base):
    """A task (mercure: the router's per-series task, and its sub-tasks per rule/job).

    Created by its first ``task_update`` (or as a stub by the first event that names it) and
    merged field by field with every later snapshot.
    """

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    parent_id: Mapped[str | None] = mapped_column(String(128), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    rule: Mapped[str | None] = mapped_column(String(256))
    target: Mapped[str | None]
    status: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any] | None]
    """The latest ``task.json`` snapshot."""
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    """Time of the newest event merged into the row."""

    __table_args__ = (Index(None, "rule", "created_at"),)


class TaskEvent(Base):
    """What happened to a task (mercure's ``task_events``: REGISTER, DISPATCH_COMPLETE, ...)."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str] = mapped_column(String(128))
    time: Mapped[datetime]
    producer: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    info: Mapped[str]
    file_count: Mapped[int | None]
    target: Mapped[str | None]
    rule: Mapped[str | None]

    __table_args__ = (
        Index(None, "task_id", "time"),
        Index("ix_task_events_errors", "time", **_error_only("severity")),
    )


class ModuleLog(Base):
    """Output a processing module wrote while it ran for a task."""

    __tablename__ = "module_logs"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str] = mapped_column(String(128), index=True)
    module: Mapped[str] = mapped_column(String(256))
    time: Mapped[datetime]
    logs: Mapped[str]


class ModuleOutput(Base):
    """A processing module's ``result.json`` for a task."""

    __tablename__ = "module_outputs"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str] = mapped_column(String(128), index=True)
    module: Mapped[str] = mapped_column(String(256))
    index: Mapped[int]
    """Position of the module in the task's processing chain."""
    time: Mapped[datetime]
    settings: Mapped[dict[str, Any] | None]
    output: Mapped[Any] = mapped_column(JSONType, nullable=True)
    """Any JSON value the module wrote (None when it wrote nothing)."""


# ---------------------------------------------------------------------------- system, audit


class SystemEvent(Base):
    """A service-level event: BOOT, SHUTDOWN, CONFIG_UPDATE, an outbox overflow, an error..."""

    __tablename__ = "system_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128))
    time: Mapped[datetime]
    producer: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    description: Mapped[str]

    __table_args__ = (
        Index(None, "time"),
        Index("ix_system_events_errors", "time", **_error_only("severity")),
    )


class AuditEvent(Base):
    """A user action in the web GUI (mercure's ``webgui_events``): logins, edits, controls."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128))
    time: Mapped[datetime]
    producer: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(256))
    description: Mapped[str]

    __table_args__ = (Index(None, "time"), Index(None, "user", "time"))


class ConfigVersion(Base):
    """One saved version of the configuration: who saved it, when, and what it was."""

    __tablename__ = "config_versions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128))
    time: Mapped[datetime] = mapped_column(index=True)
    producer: Mapped[str] = mapped_column(String(128))
    user: Mapped[str] = mapped_column(String(256))
    comment: Mapped[str]
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    content: Mapped[dict[str, Any]]


# ---------------------------------------------------------------------------- statistics


class HourlyStat(Base):
    """A counter per hour, kept up to date by the ingest, so the dashboard never scans history.

    ``metric`` is one of ``series``, ``instances``, ``failures`` (``key`` empty), or
    ``rule_tasks``, ``rule_failures`` (``key`` = rule), ``target_dispatches``,
    ``target_failures`` (``key`` = target).
    """

    __tablename__ = "hourly_stats"

    hour: Mapped[datetime] = mapped_column(primary_key=True)
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    value: Mapped[int]

    __table_args__ = (Index(None, "metric", "hour"),)


class DailyStat(Base):
    """``hourly_stats`` summed by UTC day (``day`` is its midnight), kept up to date with it.

    A window of days then sums one row per day and key instead of 24: the dashboard reads the
    hours at the window's ends from ``hourly_stats`` and the whole days in between from here.
    """

    __tablename__ = "daily_stats"

    day: Mapped[datetime] = mapped_column(primary_key=True)
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    value: Mapped[int]
