"""Projection of tasks: ``task_update`` snapshots merged into ``tasks``, and task events."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from sqlalchemy import Connection, TableClause, case, func, select

from bookkeeper import bulk
from bookkeeper.batch import (
    IN_CHUNK,
    TASK_FIELDS,
    Batch,
    TaskState,
    chunks,
    insert_staged,
    table_of,
)
from bookkeeper.models import ERROR_SEVERITIES, Task, TaskEvent
from bookkeeper.payloads import Envelope, TaskEventPayload, TaskUpdate

DISPATCH_COMPLETE: Final = "DISPATCH_COMPLETE"


def project_tasks(
    batch: Batch, updates: list[tuple[Envelope, TaskUpdate]], named: list[tuple[Envelope, str]]
) -> None:
    """Merge task snapshots into the stored rows; create a stub for every other task named."""
    wanted = {p.task_id for _, p in updates} | {p.parent_id for _, p in updates if p.parent_id}
    wanted |= {task_id for _, task_id in named}
    _load_tasks(batch, wanted)
    for event, update_ in sorted(updates, key=lambda item: item[0].time):
        _merge(batch, event, update_)
    stubs: dict[str, dict[str, Any]] = {}
    for event, task_id in named:
        if task_id not in batch.tasks and task_id not in stubs:
            stubs[task_id] = TaskState(task_id, event.time, event.time).as_row()
    merged = sorted(
        (task.as_row() for task in batch.tasks.values() if task.dirty), key=lambda r: r["id"]
    )
    if merged:
        staged = bulk.stage(batch.conn, table_of(Task), merged)
        batch.conn.execute(_task_upsert(batch.conn, staged))
    if stubs:
        # A stub never overwrites a task that a concurrent batch created meanwhile.
        rows = [stubs[task_id] for task_id in sorted(stubs)]
        staged = bulk.stage(batch.conn, table_of(Task), rows, "task_stubs")
        statement = insert_staged(batch.conn, Task, staged)
        batch.conn.execute(statement.on_conflict_do_nothing(index_elements=["id"]))


def _task_upsert(conn: Connection, staged: TableClause) -> Any:
    """Insert merged task rows; on a row that exists, keep what this batch leaves empty.

    The stored row was read (and locked) before the merge, so normally every field here
    already accounts for it; the ``coalesce`` only matters when a concurrent batch created the
    task after that read, and then keeps its fields rather than blanking them.
    """
    statement = insert_staged(conn, Task, staged)
    new = statement.excluded
    table = Task.__table__.c
    return statement.on_conflict_do_update(
        index_elements=["id"],
        set_={
            **{name: func.coalesce(new[name], table[name]) for name in TASK_FIELDS},
            "created_at": case(
                (new.created_at < table.created_at, new.created_at), else_=table.created_at
            ),
            "updated_at": case(
                (new.updated_at > table.updated_at, new.updated_at), else_=table.updated_at
            ),
        },
    )


def _load_tasks(batch: Batch, ids: Iterable[str]) -> None:
    """Read the stored rows of ``ids`` (locked until commit on PostgreSQL)."""
    for chunk in chunks(sorted(ids), IN_CHUNK):
        query = select(Task).where(Task.id.in_(chunk)).order_by(Task.id)
        if batch.conn.dialect.name == "postgresql":
            query = query.with_for_update()
        for row in batch.conn.execute(query).mappings():
            batch.tasks[row["id"]] = TaskState(
                row["id"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                **{name: row[name] for name in TASK_FIELDS},
            )


def _merge(batch: Batch, event: Envelope, snapshot: TaskUpdate) -> None:
    """Field by field: a newer snapshot replaces what it sets; an older one only fills gaps."""
    task = batch.tasks.get(snapshot.task_id)
    if task is None:
        task = batch.tasks[snapshot.task_id] = TaskState(
            snapshot.task_id, created_at=event.time, updated_at=event.time
        )
    newer = event.time >= task.updated_at
    had_rule = task.rule is not None
    for name in TASK_FIELDS:
        value = getattr(snapshot, name)
        if value is not None and (newer or getattr(task, name) is None):
            if name == "status" and value != task.status:
                task.status_changed = True
            setattr(task, name, value)
    parent = batch.tasks.get(task.parent_id) if task.parent_id else None
    if parent is not None:
        task.series_uid = task.series_uid or parent.series_uid
        task.study_uid = task.study_uid or parent.study_uid
    task.created_at = min(task.created_at, event.time)
    task.updated_at = max(task.updated_at, event.time)
    task.dirty = True
    if not had_rule and task.rule is not None:
        batch.count(event.time, "rule_tasks", task.rule)


def project_task_events(batch: Batch, events: list[tuple[Envelope, TaskEventPayload]]) -> None:
    rows = []
    for event, p in events:
        task = batch.tasks.get(p.task_id)
        rule = p.rule or (task.rule if task else None)
        target = p.target or (task.target if task else None)
        severity = p.effective_severity()
        rows.append(
            {
                "event_id": event.id,
                "task_id": p.task_id,
                "time": event.time,
                "producer": event.producer,
                "event": p.event,
                "severity": severity,
                "info": p.info,
                "file_count": p.file_count,
                "target": target,
                "rule": rule,
            }
        )
        if severity in ERROR_SEVERITIES:
            batch.count(event.time, "failures")
            if rule:
                batch.count(event.time, "rule_failures", rule)
            if target:
                batch.count(event.time, "target_failures", target)
        elif p.event.upper() == DISPATCH_COMPLETE and target:
            batch.count(event.time, "target_dispatches", target)
    batch.insert_rows(TaskEvent, rows)
