"""Which task folders of ``processing/`` are ready, and in which order they run.

The rules are the dispatcher's (:mod:`common.task_queue`); the processor's retry time is
``info.process_next_retry_at``, and a folder with ``.finished`` (a crashed processor's move to
complete) is always ready.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from common.config import Config
from common.spool import DEFAULT_STALE_AFTER
from common.task import Task
from common.task_queue import Broken, Candidate, TaskCache, scan_tasks
from processor.workspace import FINISHED


def next_retry_at(task: Task) -> datetime | None:
    return task.info.process_next_retry_at


def has_finished(folder: Path) -> bool:
    return (folder / FINISHED).exists()


def scan(
    processing: Path,
    config: Config,
    *,
    now: datetime,
    offpeak: bool,
    cache: TaskCache,
    skip: frozenset[str] = frozenset(),
    stale_after: float = DEFAULT_STALE_AFTER,
) -> tuple[list[Candidate], list[Broken]]:
    """Ready and broken folders of ``processing`` (``skip``: task ids in flight here)."""
    return scan_tasks(
        processing,
        config,
        retry_at=next_retry_at,
        now=now,
        offpeak=offpeak,
        cache=cache,
        skip=skip,
        stale_after=stale_after,
        always_ready=has_finished,
    )
