"""The cleaner's settings, taken from the configuration once per pass."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import time
from pathlib import Path

from common.config import Config
from common.spool import Folder, SpoolPaths

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanerSettings:
    """What one cleaning pass needs, from a validated :class:`Config`."""

    paths: SpoolPaths
    retention: float
    """Seconds a task stays in ``success/`` and ``discard/`` (0: until the next off-peak pass)."""
    error_retention: float
    """Seconds a task stays in ``error/``; 0 keeps it forever (the default)."""
    emergency_percentage: int
    """Disk usage (%) beyond which emergency cleaning starts."""
    emergency_clean_error: bool
    """Emergency cleaning may also delete ``error/`` tasks (after every success/discard task)."""
    scan_interval: float
    is_offpeak: Callable[[time], bool]
    cleaned: tuple[Folder, ...]
    """The folders the cleaner may delete from (see :func:`safe_folders`)."""

    @classmethod
    def from_config(cls, config: Config) -> CleanerSettings:
        paths = config.spool_paths()
        return cls(
            paths=paths,
            retention=float(config.retention),
            error_retention=float(config.error_retention),
            emergency_percentage=config.emergency_clean_percentage,
            emergency_clean_error=config.emergency_clean_error,
            scan_interval=float(config.cleaner_scan_interval),
            is_offpeak=config.is_offpeak,
            cleaned=safe_folders(paths, config.persistence_path()),
        )

    def retention_of(self, folder: Folder) -> float | None:
        """Retention of a folder's tasks in seconds; None when they are kept forever."""
        if folder not in self.cleaned:
            return None
        if folder is Folder.ERROR:
            return self.error_retention or None
        return self.retention

    def emergency_folders(self) -> list[Folder]:
        """The folders emergency cleaning may delete from, in the order it empties them."""
        folders = [Folder.SUCCESS, Folder.DISCARD]
        if self.emergency_clean_error:
            folders.append(Folder.ERROR)
        return [folder for folder in folders if folder in self.cleaned]

    def folder_path(self, folder: Folder) -> Path:
        path: Path = getattr(self.paths, folder.name.lower())
        return path


CLEANED_FOLDERS = (Folder.SUCCESS, Folder.DISCARD, Folder.ERROR)
"""The only folders the cleaner ever deletes from."""


def safe_folders(paths: SpoolPaths, persistence: Path) -> tuple[Folder, ...]:
    """The cleaned folders that hold no other spool folder.

    A misconfigured ``success_folder`` equal to the data root (or to a folder above
    ``incoming/``, say) would make every other spool folder look like a task folder to delete;
    such a folder is left alone and reported.
    """
    others = [path.resolve() for path in (*paths.all(), persistence)]
    safe: list[Folder] = []
    for folder in CLEANED_FOLDERS:
        path = Path(getattr(paths, folder.name.lower())).resolve()
        holds = any(path in other.parents for other in others)
        if holds or others.count(path) > 1:
            logger.error(
                "%s_folder %s holds or is another spool folder; it is not cleaned",
                folder.value,
                path,
            )
        else:
            safe.append(folder)
    return tuple(safe)
