"""Deleting one folder so that no reader ever sees half of it, and no writer loses its folder.

The protocol, for a task folder ``<folder>/<task_id>``:

1. **claim** — create ``<task_id>/.lock`` exclusively, already holding its owner (this process):
   written to a temporary file, then hard-linked under the lock's name, which fails when the name
   exists as ``O_CREAT | O_EXCL`` does. If it exists, a writer holds the folder and it is
   skipped; writers that follow DESIGN §4 leave a locked folder alone, so nothing starts working
   in the folder from now on. A ``.processing`` marker found after the claim also skips the
   folder (the claim is withdrawn).
2. **note** — measure the folder and write ``.cleaner.json`` into it: the ``task_deleted``
   event with its id, so that a crash after step 3 still records the event, exactly once.
3. **hide** — rename the folder to ``.<task_id>.deleting`` (atomic; hidden names are ignored by
   every reader). From here on the task is gone for everyone.
4. **record** the event, then **remove** the files. A stop or a crash during the removal leaves
   the hidden folder, which :func:`finish` completes at the next pass.

A crash between 1 and 3 leaves a visible, complete folder with the dead cleaner's ``.lock``,
which the next pass recovers (``scan.recover_own_claim``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cleaner.events import CleanerEvents
from cleaner.scan import NOTE, SERVICE, Candidate, read_note
from common.spool import (
    LockOwner,
    Marker,
    atomic_write_json,
    fsync_dir,
    is_disk_full,
    temp_name,
)
from common.task import format_time

logger = logging.getLogger(__name__)

StopCheck = Callable[[], bool]
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
"""What ``link`` fails with on filesystems without hard links (some SMB and FUSE mounts)."""
_STOP_CHECK_EVERY = 256
"""Entries removed between two looks at the stop flag."""


@dataclass(frozen=True)
class Deletion:
    """One folder deleted: the ``task_deleted`` event's id and payload."""

    event_id: str
    payload: dict[str, Any]

    @property
    def bytes_freed(self) -> int:
        return int(self.payload["bytes_freed"])


@dataclass(frozen=True)
class TreeSize:
    files: int
    bytes: int
    """Sum of the files' sizes."""
    bytes_freed: int
    """Disk space their removal gives back: allocated blocks of files not linked elsewhere."""


def measure(path: Path) -> TreeSize:
    """Files below ``path`` and the space they hold (the folder's own ``.lock`` left out)."""
    files = size = freed = 0
    pending = [path]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except FileNotFoundError:
            continue
        for entry in entries:
            if folder == path and entry.name == Marker.LOCK:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
                freed += st.st_blocks * 512
            else:
                files += 1
                size += st.st_size
                if st.st_nlink == 1:
                    freed += st.st_blocks * 512
    return TreeSize(files, size, freed)


def delete(
    candidate: Candidate, reason: str, events: CleanerEvents, stop: StopCheck
) -> Deletion | None:
    """Delete ``candidate`` by the protocol above; None when it was locked or vanished.

    Raises OSError when the folder cannot be claimed or renamed (it is then left as it was).
    """
    claim = _claim(candidate.path / Marker.LOCK)
    if claim is None:
        return None
    if os.path.lexists(candidate.path / Marker.PROCESSING):
        _withdraw(candidate.path / Marker.LOCK, claim)
        return None
    try:
        deletion = _describe(candidate, reason)
        _write_note(candidate.path, deletion, candidate.arrived)
        target = candidate.deleting_path
        if os.path.lexists(target):
            finish(target, events, lambda: False)  # an interrupted deletion of this name
        os.rename(candidate.path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            (candidate.path / NOTE).unlink()
        _withdraw(candidate.path / Marker.LOCK, claim)
        raise
    os.close(claim)
    fsync_dir(target.parent)
    events.task_deleted(deletion.event_id, deletion.payload)
    logger.info(
        "deleting %s/%s (%s, %.0f s old, %d bytes)",
        candidate.folder.value,
        candidate.path.name,
        reason,
        deletion.payload["age_s"],
        deletion.payload["bytes"],
        extra={"task_id": candidate.task_id},
    )
    remove_tree(target, stop)
    return deletion


def _claim(lock: Path) -> int | None:
    """Create ``lock`` holding our owner; the open fd, or None when it exists.

    The owner is written into a temporary file first, which is then hard-linked as ``lock``
    (``link`` fails when the name exists, like ``O_EXCL``): the lock never exists without its
    owner, so a claim left by a killed cleaner is always recognisable as the cleaner's own.
    """
    try:
        return _claim_by_link(lock)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    return _claim_in_place(lock)


def _claim_by_link(lock: Path) -> int | None:
    temp = temp_name(lock)
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None  # the folder is gone
    try:
        _write_owner(fd, lock)
        os.link(temp, lock)
    except (FileExistsError, FileNotFoundError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return fd


def _claim_in_place(lock: Path) -> int | None:
    """For filesystems without hard links: ``O_EXCL``, then the owner. A kill between the two
    leaves an empty lock, which nobody can attribute: that folder then waits for an operator."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except (FileExistsError, FileNotFoundError, NotADirectoryError):
        return None
    try:
        _write_owner(fd, lock)
    except BaseException:
        _withdraw(lock, fd)
        raise
    return fd


def _write_owner(fd: int, lock: Path) -> None:
    try:
        os.write(fd, LockOwner.me(SERVICE).to_json())
    except OSError as exc:
        # On a full disk the lock stays empty but is still a lock: the deletion that frees
        # space goes on. (Only a crash right then leaves a lock nobody can attribute.)
        if not is_disk_full(exc):
            raise
        logger.warning("%s: disk full, the lock holds no owner", lock)


def _withdraw(lock: Path, fd: int) -> None:
    """Remove our claim (only if the lock file is still ours) and close it."""
    try:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                lock.unlink()
    finally:
        os.close(fd)


def _describe(candidate: Candidate, reason: str) -> Deletion:
    now = time.time()
    size = measure(candidate.path)
    payload = {
        "folder": candidate.folder.value,
        "task_id": candidate.task_id,
        "path": str(candidate.path),
        "reason": reason,
        "arrived_at": format_time(datetime.fromtimestamp(candidate.arrived, UTC)),
        "deleted_at": format_time(datetime.fromtimestamp(now, UTC)),
        "age_s": round(candidate.age(now), 3),
        "files": size.files,
        "bytes": size.bytes,
        "bytes_freed": size.bytes_freed,
    }
    return Deletion(uuid.uuid4().hex, payload)


def _write_note(folder: Path, deletion: Deletion, arrived: float) -> None:
    note = {"event_id": deletion.event_id, "payload": deletion.payload, "arrived": arrived}
    try:
        atomic_write_json(folder / NOTE, note)
    except OSError as exc:
        # Without the note a crash right after the rename loses the event, never the data.
        logger.warning("cannot write %s (%s); deleting without it", folder / NOTE, exc)


def finish(path: Path, events: CleanerEvents, stop: StopCheck) -> bool:
    """Complete an interrupted deletion: record its event (same id: stored once), remove it.

    False when ``stop`` interrupted the removal.
    """
    note = read_note(path)
    if note is not None:
        event_id, payload = note.get("event_id"), note.get("payload")
        if isinstance(event_id, str) and isinstance(payload, dict):
            events.task_deleted(event_id, payload)
    logger.info("finishing the interrupted deletion %s", path)
    return remove_tree(path, stop)


def remove_tree(path: Path, stop: StopCheck) -> bool:
    """Remove ``path`` and everything below it; False when ``stop`` interrupted it.

    Entries that vanish meanwhile (another cleaner finishing the same folder) are fine.
    """
    try:
        with os.scandir(path) as listing:
            entries = list(listing)
    except FileNotFoundError:
        return True
    for count, entry in enumerate(entries, 1):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                if not remove_tree(Path(entry.path), stop):
                    return False
            else:
                os.unlink(entry.path)
        if count % _STOP_CHECK_EVERY == 0 and stop():
            return False
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)
    return True
