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
import contextlib
import logging
import os
import select
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Final

from common import exitcodes
from common.config import Config, load_config
from common.errors import ConfigError
from common.spool import (
    DEFAULT_STALE_AFTER,
    Marker,
    SpoolPaths,
    is_halted,
    iter_dirs,
    recover_if_stale,
)
from common.task import now_utc
from common.wakeup import Change, FolderWatch
from dispatcher.events import DispatchEvents
from dispatcher.execute import Outcome, TaskRunner
from dispatcher.queue import Scheduler, TaskCache, scan
from dispatcher.settings import DispatcherSettings

logger = logging.getLogger(__name__)

FORCED_STOP_GRACE: Final = 5.0
MAX_WORKER_THREADS: Final = 64


class DispatcherService:
    """Dispatches the tasks of ``outgoing/``; :meth:`run` until stopped, or :meth:`once`."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        events: DispatchEvents | None = None,
    ) -> None:
        self.config = config
        self.settings = DispatcherSettings.from_config(config)
        self.config_path = config_path
        self.paths: SpoolPaths = config.spool_paths()
        self.events = events if events is not None else DispatchEvents(None)
        self.cancel = threading.Event()
        self.runner = TaskRunner(self.paths, self.events, self.cancel)
        self.scheduler = Scheduler()
        self.cache = TaskCache()
        self.outcomes: list[tuple[str, Outcome]] = []
        """Every finished attempt of this service, in order (for tests and logs)."""
        self._in_flight: dict[str, concurrent.futures.Future[Outcome]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=MAX_WORKER_THREADS, thread_name_prefix="dispatch"
        )
        self._config_mtime = _mtime(config_path)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._watch: FolderWatch | None = None

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
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"w")

    # ------------------------------------------------------------------ loops

    def run(self) -> int:
        """Dispatch until stopped: ``EX_OK`` after a clean stop, ``EX_INTERRUPTED`` if forced."""
        self.paths.create()
        self._watch = FolderWatch(self.paths.outgoing)
        logger.info(
            "dispatching %s (up to %d tasks at once)",
            self.paths.outgoing,
            self.settings.max_parallel,
        )
        try:
            next_sweep = 0.0
            while not self._stopping:
                self._reload_config()
                if time.monotonic() >= next_sweep:
                    recover_final_claims(self.paths)
                    next_sweep = time.monotonic() + CLAIM_SWEEP_INTERVAL
                self._schedule()
                self._sleep(self.settings.scan_interval)
            return self._drain()
        finally:
            self._close()

    def once(self) -> int:
        """Dispatch every task that is ready now (and retries that come due meanwhile) and
        return ``EX_OK`` when nothing is ready or in flight."""
        self.paths.create()
        try:
            while True:
                self._schedule()
                if not self._in_flight:
                    return exitcodes.EX_OK
                concurrent.futures.wait(
                    list(self._in_flight.values()),
                    return_when=concurrent.futures.FIRST_COMPLETED,
                )
                self._collect()
        finally:
            self._close()

    def _sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``; return early for :meth:`_wake` or a new task folder."""
        watched = self._watch.fileno() if self._watch is not None else None
        fds = [self._wake_r] if watched is None else [self._wake_r, watched]
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                readable, _, _ = select.select(fds, [], [], left)
            except InterruptedError:
                continue
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                return
            if not readable:
                return
            assert self._watch is not None
            if any(_worth_a_scan(change) for change in self._watch.changes()):
                return

    def _drain(self) -> int:
        if self._in_flight:
            logger.info("stopping: waiting for %d task(s) in flight", len(self._in_flight))
        while self._in_flight:
            if self.cancel.is_set():
                concurrent.futures.wait(list(self._in_flight.values()), timeout=FORCED_STOP_GRACE)
                self._collect()
                if self._in_flight:
                    logger.warning("forced stop: %d task(s) still sending", len(self._in_flight))
                return exitcodes.EX_INTERRUPTED
            self._sleep(1.0)
            self._collect()
        logger.info("dispatcher stopped")
        return exitcodes.EX_INTERRUPTED if self.cancel.is_set() else exitcodes.EX_OK

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._pool.shutdown(wait=not self.cancel.is_set(), cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ one step

    def _schedule(self) -> None:
        self._collect()
        free = self.settings.max_parallel - len(self._in_flight)
        if free <= 0 or self._stopping:
            return
        if is_halted(self.paths.outgoing):
            logger.debug("outgoing/HALT: not picking tasks")
            return
        config, settings = self.config, self.settings
        ready, broken = scan(
            self.paths.outgoing,
            config,
            now=now_utc(),
            offpeak=settings.is_offpeak(datetime.now()),
            cache=self.cache,
            skip=frozenset(self._in_flight),
        )
        for item in broken:
            self.runner.fail_broken(item.folder, item.reason)
        for candidate in self.scheduler.pick(ready, free):
            future = self._pool.submit(self.runner.run, candidate.folder, config, settings)
            self._in_flight[candidate.task_id] = future
            future.add_done_callback(lambda _f: self._wake())

    def _collect(self) -> None:
        for task_id, future in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[task_id]
            try:
                outcome = future.result()
            except Exception:
                logger.exception("task %s: the attempt failed unexpectedly", task_id)
                continue
            self.outcomes.append((task_id, outcome))

    def _reload_config(self) -> None:
        mtime = _mtime(self.config_path)
        if self.config_path is None or mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            config = load_config(self.config_path, report=False)
            settings = DispatcherSettings.from_config(config)
        except ConfigError as exc:
            logger.error("configuration change refused, keeping the last valid one: %s", exc)
            return
        if config.spool_paths() != self.paths:
            logger.warning("the new spool folders apply after a restart of the dispatcher")
        self.config, self.settings = config, settings
        logger.info("configuration reloaded")


def _worth_a_scan(change: Change) -> bool:
    """A task folder renamed into ``outgoing/`` (the router builds it under a hidden name), or
    ``HALT`` set or lifted; the dispatcher's own moves out of ``outgoing/`` are not."""
    if change.overflow:
        return True
    if change.name == Marker.HALT:
        return True
    return change.appeared and not change.name.startswith(".")


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


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0
