"""The processor service: scans ``processing/`` and runs tasks in worker threads.

The loop is the dispatcher's (:mod:`common.task_loop`): every ``dispatcher_scan_interval``
seconds (mercure's processor polls at the dispatcher's pace), whenever a task folder is renamed
into ``processing/`` (inotify: the router's rename wakes it at once) and whenever a task
finishes, it re-reads a changed configuration, checks ``processing/HALT``, scans for ready
folders (:mod:`processor.queue`) and starts the next ones in priority order until
``processing_max_parallel`` tasks run. Several processors may share a spool: the
``.processing`` claim decides who runs a task.

Stopping: SIGTERM/SIGINT stops picking tasks and kills the containers in flight; their tasks
are released without counting the attempt and run again at the next start (a module may run
for an hour; a stop must not wait for it). :meth:`run` returns ``EX_OK``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Final

from common import exitcodes
from common.config import Config
from common.task_loop import TaskLoop
from processor.events import ProcessEvents
from processor.execute import Outcome, ProcessRunner
from processor.queue import scan
from processor.runtime import EngineFailure, connect, remove_orphans
from processor.settings import ProcessorSettings

logger = logging.getLogger(__name__)

STOP_GRACE: Final = 30.0
"""Seconds a stop waits for the workers once their containers were told to die."""


class ProcessorService(TaskLoop[ProcessorSettings, Outcome]):
    """Processes the tasks of ``processing/``; :meth:`run` until stopped, or :meth:`once`."""

    service = "processor"

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        events: ProcessEvents | None = None,
    ) -> None:
        paths = config.spool_paths()
        self.events = events if events is not None else ProcessEvents(None)
        cancel = threading.Event()
        super().__init__(
            config,
            config_path,
            paths.processing,
            ProcessRunner(paths, self.events, cancel),
            scan,
            cancel,
            max_workers=32,
        )

    def load_settings(self, config: Config) -> ProcessorSettings:
        return ProcessorSettings.from_config(config)

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
        self.wake()

    def run(self) -> int:
        self.paths.create()
        self.watch()
        logger.info(
            "processing %s (up to %d tasks at once)",
            self.paths.processing,
            self.settings.max_parallel,
        )
        self._check_engine()
        try:
            while not self._stopping:
                self.reload_config()
                self.schedule()
                self.sleep(self.settings.scan_interval)
            return self._drain()
        finally:
            self.close()

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

    def _drain(self) -> int:
        if self._in_flight:
            logger.info("stopping: ending %d task(s) in flight", len(self._in_flight))
            concurrent.futures.wait(list(self._in_flight.values()), timeout=STOP_GRACE)
            self.collect()
        if self._in_flight:
            logger.warning("stopped with %d task(s) still ending", len(self._in_flight))
            return exitcodes.EX_INTERRUPTED
        logger.info("processor stopped")
        return exitcodes.EX_OK
