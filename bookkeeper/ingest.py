"""Storing a batch of events: the raw envelopes, and their projections, in one transaction.

:func:`ingest` inserts every envelope with ``ON CONFLICT (event_id) DO NOTHING ... RETURNING``,
and projects only the events that this call inserted. A resent event (or one sent twice in one
batch) is therefore stored once and counted once, also when two batches race (PostgreSQL makes
the second insert of an id wait for the first transaction, then skip it).

Projections, in this order: ``task_update`` and every task id that an event names (tasks),
``series_received`` (series, created with the status their tasks give them; receptions),
``task_event``, ``module_log``, ``module_output``, ``system_event`` and ``outbox_overflow``
(system events), ``audit_event``, ``config_version``, the status of series stored before, and
the hourly and daily statistics counters. Rows are written in bulk (:mod:`bookkeeper.bulk`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from bookkeeper import bulk
from bookkeeper.batch import Batch, insert_staged, table_of, write_stats
from bookkeeper.models import (
    ERROR_SEVERITIES,
    AuditEvent,
    ConfigVersion,
    EventRecord,
    ModuleLog,
    ModuleOutput,
    SystemEvent,
)
from bookkeeper.payloads import (
    AuditEventPayload,
    ConfigVersionPayload,
    Envelope,
    IngestResult,
    ModuleLogPayload,
    ModuleOutputPayload,
    OutboxOverflowPayload,
    SeriesReceived,
    SystemEventPayload,
    TaskEventPayload,
    TaskUpdate,
    _Payload,
)
from bookkeeper.project_series import project_series_received, project_series_status
from bookkeeper.project_tasks import project_task_events, project_tasks


def ingest(
    conn: Connection, events: Sequence[Envelope], payloads: dict[int, _Payload]
) -> IngestResult:
    """Store ``events`` (``payloads``: the checked payload of each known kind, by index).

    Runs in the caller's transaction: commit after it returns, roll back if it raises.
    """
    first: dict[str, int] = {}
    for number, event in enumerate(events):
        first.setdefault(event.id, number)
    stored_at = datetime.now(UTC)
    rows = [
        {
            "event_id": events[number].id,
            "producer": events[number].producer,
            "seq": events[number].seq,
            "kind": events[number].kind,
            "time": events[number].time,
            "stored_at": stored_at,
            "payload": events[number].payload,  # a CheckedPayload: stored as checked
        }
        for number in first.values()
    ]
    new_ids: set[str] = set()
    if rows:
        staged = bulk.stage(conn, table_of(EventRecord), rows)
        statement = (
            insert_staged(conn, EventRecord, staged)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(EventRecord.event_id)
        )
        new_ids = set(conn.execute(statement).scalars())
    new = [
        (events[number], payloads[number])
        for number in sorted(first.values())
        if events[number].id in new_ids and number in payloads
    ]
    _project(Batch(conn), new)
    return IngestResult(stored=len(new_ids), duplicates=len(events) - len(new_ids))


def _project(batch: Batch, new: list[tuple[Envelope, _Payload]]) -> None:
    by_kind: dict[type[_Payload], list[tuple[Envelope, Any]]] = {}
    for event, payload in new:
        by_kind.setdefault(type(payload), []).append((event, payload))

    def of(kind: type[_Payload]) -> list[tuple[Envelope, Any]]:
        return by_kind.get(kind, [])

    task_events = of(TaskEventPayload)
    logs = of(ModuleLogPayload)
    outputs = of(ModuleOutputPayload)
    project_tasks(
        batch, of(TaskUpdate), [(e, p.task_id) for e, p in [*task_events, *logs, *outputs]]
    )
    # After the tasks: a new series is created with the status they give it.
    project_series_received(batch, of(SeriesReceived))
    project_task_events(batch, task_events)
    batch.insert_rows(
        ModuleLog,
        [
            {
                "event_id": e.id,
                "task_id": p.task_id,
                "module": p.module,
                "time": e.time,
                "logs": p.logs,
            }
            for e, p in logs
        ],
    )
    batch.insert_rows(
        ModuleOutput,
        [
            {
                "event_id": e.id,
                "task_id": p.task_id,
                "module": p.module,
                "index": p.index,
                "time": e.time,
                "settings": p.settings,
                "output": p.output,
            }
            for e, p in outputs
        ],
    )
    _system_events(batch, of(SystemEventPayload), of(OutboxOverflowPayload))
    batch.insert_rows(
        AuditEvent,
        [
            {
                "event_id": e.id,
                "time": e.time,
                "producer": e.producer,
                "event": p.event,
                "user": p.user,
                "description": p.description,
            }
            for e, p in of(AuditEventPayload)
        ],
    )
    batch.insert_rows(
        ConfigVersion,
        [
            {
                "event_id": e.id,
                "time": e.time,
                "producer": e.producer,
                "user": p.user,
                "comment": p.comment,
                "sha256": content_hash(p.content),
                "content": p.content,
            }
            for e, p in of(ConfigVersionPayload)
        ],
    )
    project_series_status(batch)
    write_stats(batch)


def content_hash(content: dict[str, Any]) -> str:
    """SHA-256 of a configuration's canonical JSON (sorted keys): equal content, equal hash."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _system_events(
    batch: Batch,
    system: list[tuple[Envelope, SystemEventPayload]],
    overflows: list[tuple[Envelope, OutboxOverflowPayload]],
) -> None:
    rows: list[dict[str, Any]] = [
        {
            "event_id": e.id,
            "time": e.time,
            "producer": e.producer,
            "event": p.event,
            "severity": p.severity,
            "description": p.description,
        }
        for e, p in system
    ]
    # Events a full outbox refused are lost history: an error for the dashboard to show.
    rows += [
        {
            "event_id": e.id,
            "time": e.time,
            "producer": e.producer,
            "event": "OUTBOX_OVERFLOW",
            "severity": "error",
            "description": _overflow_text(p),
        }
        for e, p in overflows
    ]
    for row in rows:
        if row["severity"] in ERROR_SEVERITIES:
            batch.count(row["time"], "failures")
    batch.insert_rows(SystemEvent, rows)


def _overflow_text(p: OutboxOverflowPayload) -> str:
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(p.kinds.items()))
    return (
        f"the outbox was full and refused {p.dropped} events between {p.first_dropped_at} "
        f"and {p.last_dropped_at} ({kinds or 'kinds unknown'})"
    )
