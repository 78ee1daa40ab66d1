"""Temporary files of the receiver, in ``incoming/.tmp/``.

Each instance is written into a pair of temporary files (data and side-car) named after the
writing process: ``<pid>.<start time>-<n>.dcm`` and ``.tags``. The pairs are created one ahead
on a helper thread: on ext4, creating a file waits while a journal commit (another instance's
flush) is running, and that wait would otherwise sit between two C-STOREs of the association.

A process that dies leaves its temporary files behind; :func:`clean_stale_temp_files` removes
those whose owner is gone (a zombie or a process that reused the pid does not count as alive).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import psutil

from common.spool import TEMP_DIR

logger = logging.getLogger(__name__)


@dataclass
class TempPair:
    """An open data file and an open side-car file, both empty."""

    dcm_path: Path
    dcm_fd: int
    tags_path: Path
    tags_fd: int

    def close(self) -> None:
        for fd in (self.dcm_fd, self.tags_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.dcm_fd = self.tags_fd = -1

    def remove(self) -> None:
        """Close and delete both files (idempotent)."""
        self.close()
        for path in (self.dcm_path, self.tags_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class TempFiles:
    """Hands out :class:`TempPair` objects, creating the next one ahead on ``executor``."""

    def __init__(self, incoming: Path, executor: Executor) -> None:
        self._dir = incoming / TEMP_DIR
        self._executor = executor
        self._owner = temp_owner()
        self._counter = itertools.count()
        self._next: Future[TempPair] | None = None

    def take(self) -> TempPair:
        """A fresh pair; raises OSError when it cannot be created (disk full, ...)."""
        upcoming, self._next = self._next, None
        pair = upcoming.result() if upcoming is not None else self._create()
        self._next = self._executor.submit(self._create)
        return pair

    def close(self) -> None:
        """Remove the pair created ahead, if any."""
        upcoming, self._next = self._next, None
        if upcoming is None:
            return
        with contextlib.suppress(OSError):
            upcoming.result().remove()

    def _create(self) -> TempPair:
        stem = f"{self._owner}-{next(self._counter)}"
        dcm_path = self._dir / f"{stem}.dcm"
        tags_path = self._dir / f"{stem}.tags"
        dcm_fd = os.open(dcm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            tags_fd = os.open(tags_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            os.close(dcm_fd)
            dcm_path.unlink()
            raise
        return TempPair(dcm_path, dcm_fd, tags_path, tags_fd)


def temp_owner() -> str:
    """This process as temporary files name it: ``<pid>.<start time in 1/100 s>``."""
    return f"{os.getpid()}.{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> int | None:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(process.create_time() * 100)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _owner_alive(owner: str) -> bool:
    pid, _, ticks = owner.partition(".")
    if not (pid.isdigit() and ticks.isdigit()):
        return False
    return _start_ticks(int(pid)) == int(ticks)


def clean_stale_temp_files(incoming: Path) -> int:
    """Remove temporary files in ``incoming/.tmp`` whose writer process is gone."""
    removed = 0
    tmp_dir = incoming / TEMP_DIR
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for path in tmp_dir.iterdir():
        if _owner_alive(path.name.split("-", 1)[0]):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    if removed:
        logger.warning("removed %d temporary files of dead receiver processes", removed)
    return removed
