"""Which task folders of ``outgoing/`` are ready, and in which order they are sent.

The rules — readiness, broken folders, priorities, the off-peak window, mercure's 2:1
anti-starvation — are shared with the processor and live in :mod:`common.task_queue`; the
dispatcher's retry time is ``dispatch.next_retry_at``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from common.config import Config
from common.spool import DEFAULT_STALE_AFTER
from common.task import Task
from common.task_queue import (
    BROKEN_GRACE,
    Broken,
    Candidate,
    Scheduler,
    TaskCache,
    scan_tasks,
    task_priority,
)

__all__ = [
    "BROKEN_GRACE",
    "Broken",
    "Candidate",
    "Scheduler",
    "TaskCache",
    "scan",
    "task_priority",
]


def next_retry_at(task: Task) -> datetime | None:
    return task.dispatch.next_retry_at if task.dispatch is not None else None


def scan(
    outgoing: Path,
    config: Config,
    *,
    now: datetime,
    offpeak: bool,
    cache: TaskCache,
    skip: frozenset[str] = frozenset(),
    stale_after: float = DEFAULT_STALE_AFTER,
) -> tuple[list[Candidate], list[Broken]]:
    """Ready and broken folders of ``outgoing`` (``skip``: task ids already in flight here)."""
    return scan_tasks(
        outgoing,
        config,
        retry_at=next_retry_at,
        now=now,
        offpeak=offpeak,
        cache=cache,
        skip=skip,
        stale_after=stale_after,
    )
