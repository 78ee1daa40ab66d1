"""Which task folders of a spool folder are ready, and in which order they run (shared by the
dispatcher for ``outgoing/`` and the processor for ``processing/``).

A folder is **ready** when it is a non-hidden folder without ``.lock`` (still being written) and
``.error``, whose ``task.json`` is valid, whose retry time (the caller says which field) has
passed, and which is not claimed: no ``.processing``, or one whose owner is dead or whose
heartbeat is stale (the claim then recovers it). A folder whose ``task.json`` is missing or
invalid, and that has not changed for :data:`BROKEN_GRACE` seconds, is **broken**: the service
moves it to ``error/``.

**Priority** (mercure): the priority of the task's ``applied_rule``, or, for a merged routing
task (``applied_rule`` empty), the best priority of its ``triggered_rules``; ``normal`` when the
rules are gone (mercure's processor skips such tasks forever). ``offpeak`` tasks are ready only
inside the off-peak window, and then queue behind ``normal`` ones. Within a priority the oldest
folder (mtime) goes first.

**Anti-starvation** (mercure's 2:1): :class:`Scheduler` hands out two urgent tasks, then one
normal when one waits, and keeps its count across scans, so a steady stream of urgent tasks
cannot starve the normal ones even when only one slot frees at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from common.config import Config, Priority
from common.errors import LockedError
from common.spool import (
    DEFAULT_STALE_AFTER,
    Marker,
    SpoolLock,
    atomic_write_bytes,
    iter_dirs,
    move_claimed,
    stale_reason,
)
from common.task import Task, TaskError, read_task
from common.task_events import TaskEventRecorder

logger = logging.getLogger(__name__)

BROKEN_GRACE: Final = 30.0
"""Seconds a folder with a missing or invalid ``task.json`` is left alone (being written by hand
or by a tool that does not use ``.lock``) before it counts as broken."""

URGENT_PER_NORMAL: Final = 2
_RANK: Final[dict[str, int]] = {"urgent": 0, "normal": 1, "offpeak": 2}


@dataclass(frozen=True)
class Candidate:
    """A ready task folder."""

    task_id: str
    folder: Path
    priority: Priority
    mtime: float


@dataclass(frozen=True)
class Broken:
    """A folder that cannot become ready: its ``task.json`` is missing or invalid."""

    folder: Path
    reason: str


@dataclass
class TaskCache:
    """Parsed ``task.json`` files keyed by path and (mtime, size): a scan re-reads only changed
    files (mercure parses every task of ``outgoing/`` at every tick)."""

    entries: dict[Path, tuple[tuple[int, int], Task | str]] = field(default_factory=dict)

    def read(self, path: Path) -> Task | str:
        """The task, or the reason it cannot be read."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"{path.name} is missing"
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self.entries.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            value: Task | str = read_task(path, report=cached is None)
        except TaskError as exc:
            value = str(exc)
        self.entries[path] = (stamp, value)
        return value

    def forget_except(self, keep: Iterable[Path]) -> None:
        wanted = set(keep)
        for path in list(self.entries):
            if path not in wanted:
                del self.entries[path]


def task_priority(task: Task, config: Config) -> Priority:
    """mercure: the applied rule's priority, else the best of the triggered rules'."""
    applied = task.info.applied_rule
    if applied and applied in config.rules:
        return config.rules[applied].priority
    triggered = task.info.triggered_rules
    names = [triggered] if isinstance(triggered, str) else list(triggered)
    found = [config.rules[name].priority for name in names if name in config.rules]
    return min(found, key=lambda p: _RANK[p]) if found else "normal"


RetryAt = Callable[[Task], datetime | None]
"""The field of a task that says when it may be tried again."""


def scan_tasks(
    root: Path,
    config: Config,
    *,
    retry_at: RetryAt,
    now: datetime,
    offpeak: bool,
    cache: TaskCache,
    skip: frozenset[str] = frozenset(),
    stale_after: float = DEFAULT_STALE_AFTER,
    always_ready: Callable[[Path], bool] | None = None,
) -> tuple[list[Candidate], list[Broken]]:
    """Ready and broken folders of ``root`` (``skip``: task ids already in flight here;
    ``always_ready``: folders to hand out as urgent whatever their ``task.json``)."""
    ready: list[Candidate] = []
    broken: list[Broken] = []
    seen: list[Path] = []
    for entry in iter_dirs(root):
        folder = Path(entry.path)
        if entry.name in skip or not _unmarked(folder, stale_after):
            continue
        try:
            mtime = entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if always_ready is not None and always_ready(folder):
            ready.append(Candidate(entry.name, folder, "urgent", mtime))
            continue
        task_path = folder / Marker.TASK
        seen.append(task_path)
        task = cache.read(task_path)
        if isinstance(task, str):
            if time.time() - max(mtime, _mtime(task_path)) > BROKEN_GRACE:
                broken.append(Broken(folder, task))
            continue
        due = retry_at(task)
        if due is not None and due > now:
            continue
        priority = task_priority(task, config)
        if priority == "offpeak" and not offpeak:
            continue
        ready.append(Candidate(entry.name, folder, priority, mtime))
    cache.forget_except(seen)
    return ready, broken


def _unmarked(folder: Path, stale_after: float) -> bool:
    """No ``.lock``/``.error``, and no live ``.processing`` claim."""
    if (folder / Marker.LOCK).exists() or (folder / Marker.ERROR).exists():
        return False
    claim = folder / Marker.PROCESSING
    if not claim.exists():
        return True
    return stale_reason(claim, stale_after) is not None


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


@dataclass
class Scheduler:
    """Picks the next tasks: urgent first, but one normal after every two urgent ones."""

    urgent_in_row: int = 0

    def pick(self, candidates: list[Candidate], count: int) -> list[Candidate]:
        """Up to ``count`` candidates in dispatch order (updates the 2:1 count)."""
        urgent = sorted((c for c in candidates if c.priority == "urgent"), key=_age)
        others = sorted(
            (c for c in candidates if c.priority != "urgent"),
            key=lambda c: (_RANK[c.priority], c.mtime, c.task_id),
        )
        picked: list[Candidate] = []
        while len(picked) < count and (urgent or others):
            if urgent and (self.urgent_in_row < URGENT_PER_NORMAL or not others):
                picked.append(urgent.pop(0))
                self.urgent_in_row += 1
            else:
                picked.append(others.pop(0))
                self.urgent_in_row = 0
        return picked


def _age(candidate: Candidate) -> tuple[float, str]:
    return candidate.mtime, candidate.task_id


def move_broken(folder: Path, error_root: Path, *, service: str, stage: str, reason: str) -> None:
    """Move a folder whose ``task.json`` cannot be read to ``error_root`` under the service's
    claim, with ``<stage>: <reason>`` in its ``.error`` file (there is no valid task to write it
    into); a folder another service holds, or that is gone, is left alone."""
    lock = SpoolLock(folder / Marker.PROCESSING, service)
    try:
        lock.acquire()
    except (LockedError, FileNotFoundError):
        return
    try:
        logger.error("task folder %s is broken, moving it to error/: %s", folder.name, reason)
        destination = move_claimed(folder, error_root, lock)
        atomic_write_bytes(destination / Marker.ERROR, f"{stage}: {reason}\n".encode())
    finally:
        lock.release()


@contextlib.contextmanager
def claimed(folder: Path, service: str, events: TaskEventRecorder) -> Iterator[SpoolLock | None]:
    """Hold the ``.processing`` claim of ``folder`` for the block: ``None`` when another live
    service holds it or the folder is gone; a dead owner's claim is taken over, logged and
    recorded (``lock_recovered``). The claim is released at the end, wherever it moved to."""
    lock = SpoolLock(folder / Marker.PROCESSING, service)
    try:
        lock.acquire()
    except (LockedError, FileNotFoundError):
        yield None
        return
    try:
        if lock.recovered is not None:
            logger.warning(
                "task %s: took over a stale claim (%s)", folder.name, lock.recovered.reason
            )
            events.lock_recovered(folder.name, lock.recovered)
        yield lock
    finally:
        lock.release()
