"""Which task folders of ``processing/`` are ready, and in which order they run.

The rules are the dispatcher's (:mod:`common.task_queue`); the processor's retry time is
``info.process_next_retry_at``, and a folder with ``.finished`` (a crashed processor's move to
complete) is always ready.
"""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path

from common.task import Task
from common.task_queue import scan_tasks
from processor.workspace import FINISHED


def next_retry_at(task: Task) -> datetime | None:
    return task.info.process_next_retry_at


def has_finished(folder: Path) -> bool:
    return (folder / FINISHED).exists()


scan = functools.partial(scan_tasks, retry_at=next_retry_at, always_ready=has_finished)
"""Ready and broken folders of ``processing/``: :func:`common.task_queue.scan_tasks` with the
processor's retry time, a ``.finished`` folder always ready."""
