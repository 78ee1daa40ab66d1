"""The processor service: scans ``processing/`` and runs tasks in worker threads.

Every ``dispatcher_scan_interval`` seconds (mercure's processor polls at the dispatcher's pace),
and whenever a task finishes, the service re-reads a changed configuration, checks
``processing/HALT``, scans for ready folders (:mod:`processor.queue`) and starts the next ones
in priority order until ``processing_max_parallel`` tasks run. Several processors may share a
spool: the ``.processing`` claim decides who runs a task.

Stopping: SIGTERM/SIGINT stops picking tasks and kills the containers in flight; their tasks
are released without counting the attempt and run again at the next start (a module may run
for an hour; a stop must not wait for it). :meth:`run` returns ``EX_OK``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import select
import signal
import threading
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Final

from common import exitcodes
from common.config import Config, load_config
from common.errors import ConfigError
from common.spool import SpoolPaths, is_halted
from common.task import now_utc
from common.task_queue import Scheduler, TaskCache
from processor.events import ProcessEvents
from processor.execute import Outcome, ProcessRunner
from processor.queue import scan
from processor.runtime import EngineFailure, connect, remove_orphans
from processor.settings import ProcessorSettings

logger = logging.getLogger(__name__)

STOP_GRACE: Final = 30.0
"""Seconds a stop waits for the workers once their containers were told to die."""


class ProcessorService:
    """Processes the tasks of ``processing/``; :meth:`run` until stopped, or :meth:`once`."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        events: ProcessEvents | None = None,
    ) -> None:
        self.config = config
        self.settings = ProcessorSettings.from_config(config)
        self.config_path = config_path
        self.paths: SpoolPaths = config.spool_paths()
        self.events = events if events is not None else ProcessEvents(None)
        self.cancel = threading.Event()
        self.runner = ProcessRunner(self.paths, self.events, self.cancel)
        self.scheduler = Scheduler()
        self.cache = TaskCache()
        self.outcomes: list[tuple[str, Outcome]] = []
        """Every finished attempt of this service, in order (for tests and logs)."""
        self._in_flight: dict[str, concurrent.futures.Future[Outcome]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="process"
        )
        self._config_mtime = _mtime(config_path)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("%s received", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self) -> None:
        """Ask :meth:`run` to return, killing the containers in flight; signal-safe."""
        self._stopping = True
        self.cancel.set()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"w")

    def run(self) -> int:
        self.paths.create()
        logger.info(
            "processing %s (up to %d tasks at once)",
            self.paths.processing,
            self.settings.max_parallel,
        )
        self._check_engine()
        try:
            while not self._stopping:
                self._reload_config()
                self._schedule()
                self._sleep(self.settings.scan_interval)
            return self._drain()
        finally:
            self._close()

    def _check_engine(self) -> None:
        """Say at start when the Docker engine cannot be reached (tasks then wait for it);
        remove the containers of processors that were killed while a module ran."""
        try:
            client = connect(self.settings)
        except EngineFailure as exc:
            logger.warning("%s; processing tasks will be retried until it is back", exc)
            self.events.engine_unreachable(str(exc))
            return
        try:
            remove_orphans(client)
        except EngineFailure as exc:
            logger.warning("%s", exc)
        finally:
            client.close()

    def once(self) -> int:
        """Process every task that is ready now; ``EX_OK`` when nothing is ready or running."""
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
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 512)

    def _drain(self) -> int:
        if self._in_flight:
            logger.info("stopping: ending %d task(s) in flight", len(self._in_flight))
            concurrent.futures.wait(list(self._in_flight.values()), timeout=STOP_GRACE)
            self._collect()
        if self._in_flight:
            logger.warning("stopped with %d task(s) still ending", len(self._in_flight))
            return exitcodes.EX_INTERRUPTED
        logger.info("processor stopped")
        return exitcodes.EX_OK

    def _close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _schedule(self) -> None:
        self._collect()
        free = self.settings.max_parallel - len(self._in_flight)
        if free <= 0 or self._stopping:
            return
        if is_halted(self.paths.processing):
            logger.debug("processing/HALT: not picking tasks")
            return
        config, settings = self.config, self.settings
        ready, broken = scan(
            self.paths.processing,
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
            settings = ProcessorSettings.from_config(config)
        except ConfigError as exc:
            logger.error("configuration change refused, keeping the last valid one: %s", exc)
            return
        if config.spool_paths() != self.paths:
            logger.warning("the new spool folders apply after a restart of the processor")
        self.config, self.settings = config, settings
        logger.info("configuration reloaded")


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0
