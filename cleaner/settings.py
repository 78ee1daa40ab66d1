"""The cleaner's settings, taken from the configuration once per pass.

``error_retention`` and ``emergency_clean_error`` are Caduceus settings that the shared
configuration model may not declare yet. The model keeps fields it does not know, so they are
read here with :func:`getattr` and checked by hand: an unusable value keeps ``error/`` forever
(the safe side) and is reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from typing import Any

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
            error_retention=_seconds(getattr(config, "error_retention", 0), "error_retention"),
            emergency_percentage=config.emergency_clean_percentage,
            emergency_clean_error=_flag(
                getattr(config, "emergency_clean_error", False), "emergency_clean_error"
            ),
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


def _seconds(value: Any, name: str) -> float:
    if value is None:
        return 0.0
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and math.isfinite(value) and value >= 0:
        return float(value)
    logger.error("%s: %r is not a number of seconds >= 0; error/ is kept forever", name, value)
    return 0.0


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    logger.error("%s: %r is not true or false; taken as false", name, value)
    return False
