"""Which task folders of ``outgoing/`` are ready, and in which order they are sent.

The rules — readiness, broken folders, priorities, the off-peak window, mercure's 2:1
anti-starvation — are shared with the processor and live in :mod:`common.task_queue`; the
dispatcher's retry time is ``dispatch.next_retry_at``.
"""

from __future__ import annotations

import functools
from datetime import datetime

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


scan = functools.partial(scan_tasks, retry_at=next_retry_at)
"""Ready and broken folders of ``outgoing/``: :func:`common.task_queue.scan_tasks` with the
dispatcher's retry time."""
