"""The cleaner's loop: one pass every ``cleaner_scan_interval`` seconds until stopped.

A pass, in this order:

1. finish the deletions a stop or a crash interrupted (hidden ``*.deleting`` folders);
2. emergency cleaning, at any time of day, for each filesystem holding ``success/`` or
   ``discard/`` (and ``error/`` when ``emergency_clean_error`` is set) whose usage is over
   ``emergency_clean_percentage``: the oldest unlocked task first, one at a time, until the usage
   is no longer over the threshold; ``error/`` tasks only after every success/discard task of
   that filesystem;
3. during the off-peak window only, retention: every unlocked task folder older than
   ``retention`` in ``success/`` and ``discard/``, older than ``error_retention`` in ``error/``
   (when set), oldest first; and abandoned temporary folders of dead writers as old as that.

Stopping (SIGTERM, SIGINT): the pass ends after the folder being removed, or within a few hundred
files of it (the rest is a hidden leftover, finished at the next start); the process exits 0. A
second signal exits at once (``EX_INTERRUPTED``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from datetime import datetime
from pathlib import Path
from types import FrameType

from cleaner.events import CleanerEvents
from cleaner.removal import Deletion, delete, finish
from cleaner.scan import Candidate, DiskUsage, device_of, leftovers, scan_abandoned, scan_tasks
from cleaner.settings import CleanerSettings
from common import exitcodes
from common.config import Config, load_config
from common.errors import ConfigError
from common.spool import Folder

logger = logging.getLogger(__name__)


class CleanerService:
    """Deletes finished tasks by retention and in emergencies; see the module docstring.

    :meth:`run` loops until :meth:`stop`; :meth:`once` makes one pass and returns (tests, cron).
    Signal handlers are installed only by :meth:`install_signal_handlers` (from ``main``).
    """

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config_path = config_path
        self.settings = CleanerSettings.from_config(config)
        self.events = CleanerEvents(self.settings.paths.state)
        self._config_stamp = _mtime(config_path)
        self._stuck: set[int] = set()
        """Filesystems over the threshold with nothing left to delete (reported once)."""
        self._stopping = False  # a plain flag: set from signal handlers
        self._wake: tuple[int, int] | None = None
        """A pipe that :meth:`stop` writes to, to end :meth:`run`'s wait at once."""

    # ------------------------------------------------------------------ control

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop after the current deletion; a second one exits at once."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if self._stopping:
                raise SystemExit(exitcodes.EX_INTERRUPTED)
            logger.info("%s received: stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self) -> None:
        """Ask :meth:`run` to return; safe from a signal handler and from any thread."""
        self._stopping = True
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"s")

    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> int:
        """Clean until stopped; ``EX_OK``."""
        paths = self.settings.paths
        logger.info(
            "cleaning %s, %s and %s every %s s",
            paths.success,
            paths.discard,
            paths.error,
            self.settings.scan_interval,
        )
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake = (wake_r, wake_w)
        try:
            while not self._stopping:
                self._reload_config()
                self._guarded_pass()
                self._sleep(wake_r, self.settings.scan_interval)
        finally:
            self._wake = None
            os.close(wake_r)
            os.close(wake_w)
            self.events.close()
        logger.info("cleaner stopped")
        return exitcodes.EX_OK

    def once(self) -> int:
        """One pass: ``EX_OK``, or ``EX_SOFTWARE`` when it failed."""
        try:
            return exitcodes.EX_OK if self._guarded_pass() else exitcodes.EX_SOFTWARE
        finally:
            self.events.close()

    def clean(self) -> list[Deletion]:
        """One pass (see the module docstring); the folders deleted."""
        settings = self.settings
        self._finish_leftovers(settings)
        deleted = self._emergency(settings)
        if not self._stopping and settings.is_offpeak(datetime.now().time()):
            deleted += self._retention(settings)
        return deleted

    # ------------------------------------------------------------------ the passes

    def _finish_leftovers(self, settings: CleanerSettings) -> None:
        for folder in settings.cleaned:
            for path in leftovers(settings.folder_path(folder)):
                if self._stopping:
                    return
                try:
                    finish(path, self.events, self.stopping)
                except OSError:
                    logger.exception("cannot finish deleting %s", path)

    def _emergency(self, settings: CleanerSettings) -> list[Deletion]:
        by_device: dict[int, list[Folder]] = {}
        for folder in settings.emergency_folders():
            device = device_of(settings.folder_path(folder))
            if device is not None:
                by_device.setdefault(device, []).append(folder)
        deleted: list[Deletion] = []
        for device, folders in by_device.items():
            if self._stopping:
                break
            deleted += self._emergency_on(device, folders, settings)
        return deleted

    def _emergency_on(
        self, device: int, folders: list[Folder], settings: CleanerSettings
    ) -> list[Deletion]:
        """Emergency cleaning of one filesystem; ``folders`` are those on it."""
        threshold = settings.emergency_percentage
        paths = [settings.folder_path(folder) for folder in folders]
        before = DiskUsage.of(paths[0])
        if not before.over(threshold):
            self._stuck.discard(device)
            return []
        scans = [
            scan_tasks(path, folder, self.events.lock_recovered)
            for folder, path in zip(folders, paths, strict=True)
        ]
        locked = sum(scan.locked for scan in scans)
        candidates = sorted(
            (c for scan in scans for c in scan.candidates),
            key=lambda c: (c.folder is Folder.ERROR, c.arrived, c.path.name),
        )
        if not candidates and device in self._stuck:
            return []  # reported when it started; nothing changed
        logger.warning(
            "emergency cleaning: %s is %.1f%% full (threshold %d%%)",
            ", ".join(map(str, paths)),
            before.percent,
            threshold,
        )
        self.events.emergency_started(paths, before, threshold)
        started = time.monotonic()
        usage, deleted = before, []
        for candidate in candidates:
            if self._stopping or not usage.over(threshold):
                break
            deletion = self._delete(candidate, "emergency")
            if deletion is not None:
                deleted.append(deletion)
                usage = DiskUsage.of(paths[0])
        duration = time.monotonic() - started
        self.events.emergency_finished(
            paths,
            before,
            usage,
            threshold,
            deleted=len(deleted),
            locked=locked,
            duration_s=duration,
        )
        self._report_emergency(device, usage, threshold, len(deleted), locked)
        return deleted

    def _report_emergency(
        self, device: int, usage: DiskUsage, threshold: int, deleted: int, locked: int
    ) -> None:
        if not usage.over(threshold):
            self._stuck.discard(device)
            logger.warning(
                "emergency cleaning deleted %d tasks; usage now %.1f%%", deleted, usage.percent
            )
        elif not self._stopping:
            self._stuck.add(device)
            logger.error(
                "emergency cleaning deleted %d tasks but usage is still %.1f%% (threshold %d%%): "
                "nothing more it may delete (%d locked folders kept)",
                deleted,
                usage.percent,
                threshold,
                locked,
            )

    def _retention(self, settings: CleanerSettings) -> list[Deletion]:
        due: list[Candidate] = []
        for folder in settings.cleaned:
            keep = settings.retention_of(folder)
            if keep is None:
                continue
            path = settings.folder_path(folder)
            found = scan_tasks(path, folder, self.events.lock_recovered).candidates
            found += scan_abandoned(path, folder)
            now = time.time()  # after the scan, which may have recovered a claim just now
            due += [candidate for candidate in found if candidate.age(now) > keep]
        deleted: list[Deletion] = []
        for candidate in sorted(due, key=lambda c: (c.arrived, c.path.name)):
            if self._stopping:
                break
            reason = "abandoned" if candidate.abandoned else "retention"
            deletion = self._delete(candidate, reason)
            if deletion is not None:
                deleted.append(deletion)
        if deleted:
            freed = sum(deletion.bytes_freed for deletion in deleted)
            logger.info("retention deleted %d folders, %d bytes", len(deleted), freed)
        return deleted

    def _delete(self, candidate: Candidate, reason: str) -> Deletion | None:
        try:
            return delete(candidate, reason, self.events, self.stopping)
        except OSError:
            logger.exception(
                "cannot delete %s", candidate.path, extra={"task_id": candidate.task_id}
            )
            return None

    # ------------------------------------------------------------------ plumbing

    def _guarded_pass(self) -> bool:
        try:
            self.clean()
        except Exception:
            logger.exception("cleaning pass failed")
            return False
        return True

    def _sleep(self, wake_r: int, seconds: float) -> None:
        if self._stopping:
            return
        select.select([wake_r], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 512)

    def _reload_config(self) -> None:
        stamp = _mtime(self.config_path)
        if self.config_path is None or stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            settings = CleanerSettings.from_config(load_config(self.config_path))
        except ConfigError as exc:
            logger.error("configuration change refused, keeping the last valid one: %s", exc)
            return
        if settings.paths.state != self.settings.paths.state:
            self.events.close()
            self.events = CleanerEvents(settings.paths.state)
        self.settings = settings
        logger.info("configuration reloaded")


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0
