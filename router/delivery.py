"""Atomic delivery of task folders, and carrying out a routing journal (DESIGN §4).

A task folder is built under a hidden temporary name in its destination folder
(``.<task_id>.router.tmp``, holding an ``.owner`` file while it is filled), its files are linked or
copied in, ``task.json`` is written and flushed, and only then is it renamed to ``<task_id>``:
a consumer never sees half a task. The files stay in ``incoming/<series>/`` until every task of
the journal is delivered; only then are they unlinked. Temporary folders of dead owners are
removed by :func:`clean_temp_tasks` (at start and periodically).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from common.spool import Folder, LockOwner, Marker, SpoolPaths, atomic_write_json, fsync_dir
from router.hooks import Checkpoint, Step
from router.journal import Journal, Placement, PlannedTask, remove_journal

logger = logging.getLogger(__name__)

TEMP_SUFFIX: Final = ".router.tmp"
OWNER_NAME: Final = ".owner"
TEMP_STALE_AFTER: Final = 120.0
"""A temporary task folder without an owner file is removed once this many seconds old."""

_LINK_FALLBACK_ERRNOS: Final = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
)
"""A hard link refused for these reasons (another filesystem, protected links, too many links,
no link support) is replaced by a copy."""

TASK_FOLDERS: Final = (
    Folder.OUTGOING,
    Folder.PROCESSING,
    Folder.SUCCESS,
    Folder.DISCARD,
    Folder.ERROR,
)
"""The folders the router creates tasks in."""


def folder_path(paths: SpoolPaths, folder: Folder) -> Path:
    path: Path = getattr(paths, folder.name.lower())
    return path


def temp_task_dir(dest: Path, task_id: str) -> Path:
    return dest / f".{task_id}{TEMP_SUFFIX}"


@dataclass
class Outcome:
    """What carrying out one journal did."""

    delivered: list[str] = field(default_factory=list)
    """Task ids renamed into place by this call (tasks already in place are not listed)."""
    missing: list[str] = field(default_factory=list)
    """Planned files that were not in ``incoming/`` any more (only after outside interference)."""


def place_file(src: Path, dst: Path, placement: Placement) -> None:
    """Hard-link (or, if refused, copy) ``src`` to ``dst``; ``copy`` always copies, flushed."""
    if placement == "link":
        try:
            os.link(src, dst)
            return
        except OSError as exc:
            if exc.errno not in _LINK_FALLBACK_ERRNOS:
                raise
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver_task(
    planned: PlannedTask,
    series_dir: Path,
    dest: Path,
    owner: LockOwner,
    checkpoint: Checkpoint,
    series_uid: str,
    task_roots: tuple[Path, ...] = (),
) -> list[str] | None:
    """Build ``dest/<task_id>`` atomically; the names of missing source files, or None when
    the task folder already existed (delivered before a crash)."""
    final = dest / planned.task_id
    marker = delivered_marker(series_dir, planned.task_id)
    if marker.exists() or any((other / planned.task_id).exists() for other in task_roots):
        # Delivered before a crash; a consumer may already have moved it on to success/ or
        # error/, so it is looked for there too and never built twice.
        return None
    tmp = temp_task_dir(dest, planned.task_id)
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)  # a crashed attempt of this very task; the journal redoes it
    tmp.mkdir()
    missing: list[str] = []
    try:
        (tmp / OWNER_NAME).write_bytes(owner.to_json())
        for name in planned.files:
            try:
                place_file(series_dir / name, tmp / name, planned.placement)
            except FileNotFoundError:
                missing.append(name)
        checkpoint(Step.FILES_PLACED, series_uid)
        (tmp / OWNER_NAME).unlink()
        atomic_write_json(tmp / Marker.TASK, planned.task)  # flushes task.json and the folder
        checkpoint(Step.TASK_WRITTEN, series_uid)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest)
    marker.touch()
    fsync_dir(series_dir)
    checkpoint(Step.TASK_DELIVERED, series_uid)
    return missing


DELIVERED_PREFIX = ".delivered-"


def delivered_marker(series_dir: Path, task_id: str) -> Path:
    """The file recording, in the locked series folder, that a planned task was delivered."""
    return series_dir / f"{DELIVERED_PREFIX}{task_id}"


def remove_delivered_markers(series_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        for path in series_dir.iterdir():
            if path.name.startswith(DELIVERED_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def deliver_all(
    journal: Journal,
    series_dir: Path,
    paths: SpoolPaths,
    owner: LockOwner,
    checkpoint: Checkpoint,
) -> Outcome:
    """Deliver every task of ``journal`` that is not in place yet."""
    outcome = Outcome()
    for planned in journal.tasks:
        dest = folder_path(paths, planned.folder)
        roots = (dest, *(folder_path(paths, folder) for folder in TASK_FOLDERS))
        missing = deliver_task(
            planned, series_dir, dest, owner, checkpoint, journal.series_uid, roots
        )
        if missing is None:
            continue
        outcome.delivered.append(planned.task_id)
        outcome.missing.extend(name for name in missing if name not in outcome.missing)
    return outcome


def remove_sources(journal: Journal, series_dir: Path, checkpoint: Checkpoint) -> None:
    """Unlink the routed files from ``incoming/<series>/``, then the journal."""
    for name in journal.files:
        with contextlib.suppress(FileNotFoundError):
            (series_dir / name).unlink()
    fsync_dir(series_dir)
    checkpoint(Step.SOURCES_REMOVED, journal.series_uid)
    remove_journal(series_dir)
    # Only once the journal is gone: without it nothing is replayed, so the markers are moot.
    remove_delivered_markers(series_dir)
    checkpoint(Step.JOURNAL_REMOVED, journal.series_uid)


def clean_temp_tasks(paths: SpoolPaths, *, stale_after: float = TEMP_STALE_AFTER) -> list[Path]:
    """Remove the router's temporary task folders whose owner is dead (or that have no owner
    file and are older than ``stale_after``). They never hold the only copy of an instance: the
    files stay in ``incoming/`` until the task is renamed into place."""
    removed: list[Path] = []
    now = time.time()
    for folder in TASK_FOLDERS:
        dest = folder_path(paths, folder)
        try:
            entries = list(os.scandir(dest))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
                continue
            if _temp_is_live(Path(entry.path), now, stale_after):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            logger.warning("removed the temporary task folder %s of a dead router", entry.path)
            removed.append(Path(entry.path))
    return removed


def _temp_is_live(path: Path, now: float, stale_after: float) -> bool:
    try:
        owner = LockOwner.from_json((path / OWNER_NAME).read_bytes())
    except FileNotFoundError:
        owner = None
    except OSError:
        return True
    if owner is not None:
        return owner.is_alive()
    try:
        return now - path.stat().st_mtime < stale_after
    except FileNotFoundError:
        return True
