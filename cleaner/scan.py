"""What the cleaner may delete, and how full a filesystem is.

The age of a task folder is counted from when it **arrived** in its folder: the later of the
folder's ``ctime`` and ``mtime``. A task arrives by a rename of the whole folder (DESIGN §4,
atomic delivery), and Linux sets the ctime of a renamed inode (ext4, xfs, btrfs, tmpfs), so the
ctime is the arrival time; no service can set it back, unlike the mtime (``cp -p``, ``utime``).
Anything done inside the folder later (a file added or removed, a lock taken) moves the time
forward, so a task may be kept longer than ``retention``, never deleted earlier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from common.spool import Folder, Marker, StaleLock, iter_dirs, read_owner, recover_if_stale

logger = logging.getLogger(__name__)

SERVICE = "cleaner"
"""The cleaner's name in lock files and the producer of its events."""
DELETING_SUFFIX = ".deleting"
"""A folder being deleted is renamed to ``.<name>.deleting`` first."""
NOTE = ".cleaner.json"
"""Written into a folder just before its rename: the ``task_deleted`` event to record."""
OnRecovered = Callable[[str, StaleLock], None]
"""Told the task id and the lock when a dead cleaner's claim is recovered."""
_TEMP_NAME = re.compile(r"\.(?P<final>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
"""A writer's temporary name, as :func:`common.spool.temp_name` makes it."""


@dataclass(frozen=True)
class Candidate:
    """A folder the cleaner may delete."""

    path: Path
    folder: Folder
    task_id: str
    arrived: float
    """Epoch seconds when it reached its folder (see the module docstring)."""
    abandoned: bool = False
    """A temporary folder whose writer process is gone, not a task."""

    @property
    def deleting_path(self) -> Path:
        """The hidden name the folder is renamed to before its files are removed."""
        name = self.path.name if self.abandoned else f".{self.path.name}"
        return self.path.with_name(name + DELETING_SUFFIX)

    def age(self, now: float) -> float:
        return now - self.arrived


@dataclass(frozen=True)
class Scan:
    """The folders of one spool folder: deletable candidates, and how many were locked."""

    candidates: list[Candidate]
    locked: int


def arrival_time(st: os.stat_result) -> float:
    return max(st.st_ctime, st.st_mtime)


def is_locked(path: Path) -> bool:
    """``.lock`` or ``.processing`` present (stale or not: their owner recovers them)."""
    return any(os.path.lexists(path / marker) for marker in (Marker.LOCK, Marker.PROCESSING))


def scan_tasks(path: Path, folder: Folder, recovered: OnRecovered) -> Scan:
    """Every visible, unlocked task folder of ``path``.

    A ``.lock`` left by a cleaner process that died before renaming the folder is the cleaner's
    own to recover: it is removed (``recovered`` is told) and the folder counts as unlocked, aged
    from the arrival time the dead cleaner noted.
    """
    candidates: list[Candidate] = []
    locked = 0
    for entry in iter_dirs(path):
        task = Path(entry.path)
        noted: float | None = None
        if is_locked(task):
            noted = recover_own_claim(task, recovered)
            if noted is None or is_locked(task):
                locked += 1
                continue
        try:
            arrived = arrival_time(entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue
        if noted is not None and noted > 0:
            arrived = min(arrived, noted)
        candidates.append(Candidate(task, folder, entry.name, arrived))
    return Scan(candidates, locked)


def recover_own_claim(task: Path, recovered: OnRecovered) -> float | None:
    """Remove a dead cleaner's ``.lock`` from ``task``; the arrival time it noted (0.0 when it
    noted none), or None when the lock is not a dead cleaner's and stays."""
    if os.path.lexists(task / Marker.PROCESSING):
        return None
    lock = task / Marker.LOCK
    owner = read_owner(lock)
    if owner is None or owner.service != SERVICE or owner.is_alive():
        return None
    noted = read_note(task)
    stale = recover_if_stale(lock, math.inf)
    if stale is None:
        return None
    with contextlib.suppress(FileNotFoundError):
        (task / NOTE).unlink()
    logger.warning("recovered the claim of dead cleaner pid %d on %s", owner.pid, task)
    recovered(task.name, stale)
    arrived = noted.get("arrived") if noted else None
    return float(arrived) if isinstance(arrived, int | float) else 0.0


def scan_abandoned(path: Path, folder: Folder) -> list[Candidate]:
    """Hidden temporary folders (``common.spool.temp_name`` names) whose writer pid is gone.

    Any other hidden name is left alone, and so is a temporary folder whose pid runs (a pid
    reused by another process counts as running: the safe side).
    """
    found: list[Candidate] = []
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return found
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if psutil.pid_exists(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            arrived = arrival_time(entry.stat(follow_symlinks=False))
            found.append(Candidate(Path(entry.path), folder, match["final"], arrived, True))
    return found


def leftovers(path: Path) -> list[Path]:
    """Hidden ``*.deleting`` folders: deletions that a stop or a crash interrupted."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return [
        Path(entry.path)
        for entry in entries
        if entry.name.startswith(".")
        and entry.name.endswith(DELETING_SUFFIX)
        and entry.is_dir(follow_symlinks=False)
    ]


def read_note(folder: Path) -> dict[str, object] | None:
    """The note a cleaner wrote into ``folder`` before renaming it, or None."""
    try:
        note = json.loads((folder / NOTE).read_bytes())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


# ---------------------------------------------------------------------------- disk usage


@dataclass(frozen=True)
class DiskUsage:
    """Usage of one filesystem as ``df`` and mercure count it (``shutil.disk_usage``)."""

    total: int
    used: int

    @classmethod
    def of(cls, path: Path) -> DiskUsage:
        st = os.statvfs(path)
        return cls(total=st.f_blocks * st.f_frsize, used=(st.f_blocks - st.f_bfree) * st.f_frsize)

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0

    def over(self, percentage: int) -> bool:
        """mercure's test: ``used > total * percentage / 100`` (integers, no rounding)."""
        return self.used * 100 > self.total * percentage


def device_of(path: Path) -> int | None:
    """The filesystem (``st_dev``) holding ``path``; None when the folder does not exist."""
    try:
        return os.stat(path).st_dev
    except FileNotFoundError:
        return None
