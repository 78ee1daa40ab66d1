"""Folder targets: the task's files copied into ``<folder>/<task_id>/`` (mercure ``folder``).

The copy is written under a hidden temporary name beside its final place, flushed, marked with
``.complete`` (mercure's marker, which consumers wait for) and renamed into place, so a reader
never sees half a task. A retry after a crash finds the finished folder and does nothing, or
removes the unfinished temporary one and copies again. ``file_filter`` lists comma-separated
glob patterns of files *not* to copy; hidden files (locks) are never copied, ``task.json`` is
(mercure copies it too).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from common.config import FolderTarget
from common.spool import fsync_dir
from dispatcher.targets.base import TargetJob, TargetResult

COMPLETE_MARKER = ".complete"


def _excluded(name: str, patterns: list[str]) -> bool:
    return name.startswith(".") or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


class FolderHandler:
    """Copies the task folder's files into a local (or mounted) folder."""

    def send(self, job: TargetJob) -> TargetResult:
        assert isinstance(job.target, FolderTarget)
        root = Path(job.target.folder)
        if not root.is_dir():
            return TargetResult(ok=False, message=f"target folder {root} does not exist")
        final = root / job.task.id
        if (final / COMPLETE_MARKER).exists():
            return TargetResult(ok=True)
        patterns = [p.strip() for p in (job.target.file_filter or "").split(",") if p.strip()]
        temp = root / f".{job.task.id}.partial"
        try:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir()
            sent = size = 0
            for path in sorted(job.folder.iterdir()):
                if path.is_file() and not _excluded(path.name, patterns):
                    shutil.copyfile(path, temp / path.name)
                    sent += 1
                    size += path.stat().st_size
            _flush_files(temp)
            (temp / COMPLETE_MARKER).touch()
            fsync_dir(temp)
            if final.exists():  # an earlier copy without its marker: replace it
                shutil.rmtree(final)
            temp.rename(final)
            fsync_dir(root)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            return TargetResult(ok=False, message=f"cannot copy into {root}: {exc}")
        return TargetResult(ok=True, sent=sent, bytes_sent=size)


def _flush_files(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
