"""Which task folders of ``processing/`` are ready, and in which order they run.

A folder is **ready** when it is a non-hidden folder without ``.lock`` and ``.error``, with a
valid ``task.json`` whose ``info.process_next_retry_at`` has passed, and not claimed by a live
processor (no ``.processing``, or a stale one). A folder with ``.finished`` is always ready (a
crashed processor's move is completed). A folder whose ``task.json`` stays missing or invalid
for :data:`~dispatcher.queue.BROKEN_GRACE` seconds is **broken** and moved to ``error/``.

Priorities, the off-peak window and mercure's 2:1 anti-starvation are the dispatcher's
(:mod:`dispatcher.queue`): the same rules, the same :class:`~dispatcher.queue.Scheduler`.
Unlike mercure, a task whose rule was deleted is not skipped forever: it runs at ``normal``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from common.config import Config
from common.spool import DEFAULT_STALE_AFTER, Marker, iter_dirs, stale_reason
from dispatcher.queue import BROKEN_GRACE, Broken, Candidate, TaskCache, task_priority
from processor.workspace import FINISHED


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
    ready: list[Candidate] = []
    broken: list[Broken] = []
    seen: list[Path] = []
    for entry in iter_dirs(processing):
        folder = Path(entry.path)
        if entry.name in skip or not _unclaimed(folder, stale_after):
            continue
        try:
            mtime = entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if (folder / FINISHED).exists():
            ready.append(Candidate(entry.name, folder, "urgent", mtime))
            continue
        task_path = folder / Marker.TASK
        seen.append(task_path)
        task = cache.read(task_path)
        if isinstance(task, str):
            if time.time() - max(mtime, _mtime(task_path)) > BROKEN_GRACE:
                broken.append(Broken(folder, task))
            continue
        retry_at = task.info.process_next_retry_at
        if retry_at is not None and retry_at > now:
            continue
        priority = task_priority(task, config)
        if priority == "offpeak" and not offpeak:
            continue
        ready.append(Candidate(entry.name, folder, priority, mtime))
    cache.forget_except(seen)
    return ready, broken


def _unclaimed(folder: Path, stale_after: float) -> bool:
    if (folder / Marker.LOCK).exists() or (folder / Marker.ERROR).exists():
        return False
    claim = folder / Marker.PROCESSING
    return not claim.exists() or stale_reason(claim, stale_after) is not None


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0
