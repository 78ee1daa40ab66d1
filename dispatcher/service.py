"""The dispatcher service: scans ``outgoing/`` and runs several tasks at once in worker threads.

Every ``dispatcher_scan_interval`` seconds, whenever a task folder appears in ``outgoing/``
(inotify, :mod:`common.wakeup`: the router's rename wakes the service at once) and whenever a
task finishes, the service re-reads a changed configuration, checks ``outgoing/HALT``, scans for
ready folders (:mod:`dispatcher.queue`) and hands the next ones, in priority order, to worker
threads until ``dispatcher_max_parallel`` tasks are in flight. Several dispatcher processes may
share one spool: all are woken, and the ``.processing`` claim decides who sends a task.

Stopping: the first SIGTERM/SIGINT stops picking tasks and lets the ones in flight finish (every
wait of a send is bounded), then :meth:`run` returns ``EX_OK``. A second one sets the cancel
flag — senders stop between two instances and abort their association — and :meth:`run`
returns ``EX_INTERRUPTED`` after at most :data:`FORCED_STOP_GRACE` seconds.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Final

from common import exitcodes
from common.config import Config
from common.spool import (
    DEFAULT_STALE_AFTER,
    Marker,
    SpoolPaths,
    iter_dirs,
    recover_if_stale,
)
from common.task_loop import TaskLoop
from dispatcher.events import DispatchEvents
from dispatcher.execute import Outcome, TaskRunner
from dispatcher.queue import scan
from dispatcher.settings import DispatcherSettings

logger = logging.getLogger(__name__)

FORCED_STOP_GRACE: Final = 5.0
MAX_WORKER_THREADS: Final = 64


class DispatcherService(TaskLoop[DispatcherSettings, Outcome]):
    """Dispatches the tasks of ``outgoing/``; :meth:`run` until stopped, or :meth:`once`."""

    service = "dispatcher"

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        events: DispatchEvents | None = None,
    ) -> None:
        paths = config.spool_paths()
        self.events = events if events is not None else DispatchEvents(None)
        cancel = threading.Event()
        super().__init__(
            config,
            config_path,
            paths.outgoing,
            TaskRunner(paths, self.events, cancel),
            scan,
            cancel,
            max_workers=MAX_WORKER_THREADS,
        )

    def load_settings(self, config: Config) -> DispatcherSettings:
        return DispatcherSettings.from_config(config)

    # ------------------------------------------------------------------ control

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the tasks in flight, then stop; a second one: stop now."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("%s received", signal.Signals(signum).name)
            self.stop(force=self._stopping)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self, *, force: bool = False) -> None:
        """Ask :meth:`run` to return; safe from a signal handler and from any thread."""
        self._stopping = True
        if force:
            self.cancel.set()
        self.wake()

    def run(self) -> int:
        """Dispatch until stopped: ``EX_OK`` after a clean stop, ``EX_INTERRUPTED`` if forced."""
        self.paths.create()
        self.watch()
        logger.info(
            "dispatching %s (up to %d tasks at once)",
            self.paths.outgoing,
            self.settings.max_parallel,
        )
        try:
            next_sweep = 0.0
            while not self._stopping:
                self.reload_config()
                if time.monotonic() >= next_sweep:
                    recover_final_claims(self.paths)
                    next_sweep = time.monotonic() + CLAIM_SWEEP_INTERVAL
                self.schedule()
                self.sleep(self.settings.scan_interval)
            return self._drain()
        finally:
            self.close()

    def _drain(self) -> int:
        if self._in_flight:
            logger.info("stopping: waiting for %d task(s) in flight", len(self._in_flight))
        while self._in_flight:
            if self.cancel.is_set():
                concurrent.futures.wait(list(self._in_flight.values()), timeout=FORCED_STOP_GRACE)
                self.collect()
                if self._in_flight:
                    logger.warning("forced stop: %d task(s) still sending", len(self._in_flight))
                return exitcodes.EX_INTERRUPTED
            self.sleep(1.0)
            self.collect()
        logger.info("dispatcher stopped")
        return exitcodes.EX_INTERRUPTED if self.cancel.is_set() else exitcodes.EX_OK


CLAIM_SWEEP_INTERVAL: Final = 60.0
"""Seconds between two sweeps of success/ and error/ for claims of dead dispatchers."""


def recover_final_claims(paths: SpoolPaths) -> int:
    """Remove abandoned ``.processing`` claims from tasks in ``success/`` and ``error/``.

    A dispatcher moves a task with its claim and releases it right after; killed in between,
    it leaves the claim behind, and the cleaner would keep the task forever. A claim there whose
    owner is gone (or whose heartbeat is stale) is recovered, with a log line.
    """
    recovered = 0
    for root in (paths.success, paths.error):
        for entry in iter_dirs(root):
            claim = Path(entry.path) / Marker.PROCESSING
            if claim.exists() and recover_if_stale(claim, DEFAULT_STALE_AFTER) is not None:
                recovered += 1
    if recovered:
        logger.warning("removed %d abandoned claim(s) from finished tasks", recovered)
    return recovered
