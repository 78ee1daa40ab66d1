"""The loop the dispatcher and the processor share: scan a spool folder, run ready tasks in
worker threads, wake early when something changes.

Each turn re-reads a changed configuration (an invalid change is refused and the last valid
one kept), honours ``<folder>/HALT``, scans for ready and broken folders
(:mod:`common.task_queue`), moves broken ones to ``error/`` and hands the next ready ones, in
priority order, to worker threads until ``max_parallel`` tasks are in flight. The wait between
two turns ends early when a task finishes (:meth:`TaskLoop.wake`) or when a task folder is
renamed into the watched folder (inotify, :mod:`common.wakeup`). Several services may share one
spool: the ``.processing`` claim decides who runs a task.

The services differ in how they stop, so ``run`` and the drain are theirs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from common import exitcodes
from common.config import Config, load_config, resolve_config_path
from common.entry import service_parser
from common.errors import ConfigError, OutboxError
from common.logs import setup_logging
from common.spool import Marker, SpoolPaths, is_halted
from common.task import now_utc
from common.task_events import TaskEventRecorder
from common.task_queue import Broken, Candidate, Scheduler, TaskCache
from common.wakeup import Change, FolderWatch

logger = logging.getLogger(__name__)


class LoopSettings(Protocol):
    @property
    def scan_interval(self) -> float: ...

    @property
    def max_parallel(self) -> int: ...

    def is_offpeak(self, now: datetime) -> bool: ...


SettingsT = TypeVar("SettingsT", bound=LoopSettings)
OutcomeT = TypeVar("OutcomeT")
_Settings_contra = TypeVar("_Settings_contra", bound=LoopSettings, contravariant=True)
_Outcome_co = TypeVar("_Outcome_co", covariant=True)


class Runner(Protocol[_Settings_contra, _Outcome_co]):
    """What runs one attempt at a task folder (the dispatcher's and the processor's runner)."""

    def run(self, folder: Path, config: Config, settings: _Settings_contra) -> _Outcome_co: ...

    def fail_broken(self, folder: Path, reason: str) -> None: ...


Scan = Callable[..., tuple[list[Candidate], list[Broken]]]


class TaskLoop(Generic[SettingsT, OutcomeT]):
    """Scans ``folder`` and runs its tasks with ``runner`` in up to ``max_parallel`` threads."""

    service = "service"

    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        folder: Path,
        runner: Runner[SettingsT, OutcomeT],
        scan: Scan,
        cancel: threading.Event,
        *,
        max_workers: int,
    ) -> None:
        self.config = config
        self.settings: SettingsT = self.load_settings(config)
        self.config_path = config_path
        self.paths: SpoolPaths = config.spool_paths()
        self.folder = folder
        self.runner = runner
        self.scan = scan
        self.cancel = cancel
        self.scheduler = Scheduler()
        self.cache = TaskCache()
        self.outcomes: list[tuple[str, OutcomeT]] = []
        """Every finished attempt of this service, in order (for tests and logs)."""
        self._in_flight: dict[str, concurrent.futures.Future[OutcomeT]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=self.service
        )
        self._config_mtime = _mtime(config_path)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._watch: FolderWatch | None = None

    def load_settings(self, config: Config) -> SettingsT:
        """The service's settings from ``config``; raises :class:`ConfigError`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ control

    def wake(self) -> None:
        """End the current wait; safe from a signal handler and from any thread."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"w")

    def watch(self) -> None:
        """Wake when a task folder appears in the folder (call before the loop)."""
        self._watch = FolderWatch(self.folder)

    def once(self) -> int:
        """Run every task that is ready now (and retries that come due meanwhile); ``EX_OK``
        when nothing is ready or in flight."""
        self.paths.create()
        try:
            while True:
                self.schedule()
                if not self._in_flight:
                    return exitcodes.EX_OK
                concurrent.futures.wait(
                    list(self._in_flight.values()),
                    return_when=concurrent.futures.FIRST_COMPLETED,
                )
                self.collect()
        finally:
            self.close()

    def sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``; return early for :meth:`wake` or a new task folder."""
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
            if any(worth_a_scan(change) for change in self._watch.changes()):
                return

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._pool.shutdown(wait=not self.cancel.is_set(), cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ one turn

    def schedule(self) -> None:
        self.collect()
        free = self.settings.max_parallel - len(self._in_flight)
        if free <= 0 or self._stopping:
            return
        if is_halted(self.folder):
            logger.debug("%s/HALT: not picking tasks", self.folder.name)
            return
        config, settings = self.config, self.settings
        ready, broken = self.scan(
            self.folder,
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
            future.add_done_callback(lambda _f: self.wake())

    def collect(self) -> None:
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

    def reload_config(self) -> None:
        mtime = _mtime(self.config_path)
        if self.config_path is None or mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            config = load_config(self.config_path, report=False)
            settings = self.load_settings(config)
        except ConfigError as exc:
            logger.error("configuration change refused, keeping the last valid one: %s", exc)
            return
        if config.spool_paths() != self.paths:
            logger.warning("the new spool folders apply after a restart of the %s", self.service)
        self.config, self.settings = config, settings
        logger.info("configuration reloaded")


def worth_a_scan(change: Change) -> bool:
    """A task folder renamed into the folder (tasks are built under a hidden name), or
    ``HALT`` set or lifted; the service's own moves out of the folder are not."""
    if change.overflow:
        return True
    if change.name == Marker.HALT:
        return True
    return change.appeared and not change.name.startswith(".")


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0


class _Service(Protocol):
    def once(self) -> int: ...

    def run(self) -> int: ...

    def install_signal_handlers(self) -> None: ...


EventsT = TypeVar("EventsT", bound=TaskEventRecorder)


def task_service_main(
    argv: list[str] | None,
    *,
    service: str,
    description: str,
    once_help: str,
    events_class: type[EventsT],
    build: Callable[[Config, Path, EventsT], _Service],
) -> int:
    """``main()`` of a task service: ``caduceus <service> [--config PATH] [--once]``.

    Exit codes: ``EX_CONFIG`` for an invalid configuration, ``EX_CANTCREAT`` when the outbox
    cannot be opened, else the service's. After a forced stop (``EX_INTERRUPTED``) the process
    leaves without joining worker threads that may still be inside a send or a Docker call.
    """
    args = service_parser(service, description, once_help).parse_args(argv)
    setup_logging(service)
    config_path = resolve_config_path(args.config).absolute()
    try:
        config = load_config(config_path)
        events = events_class.open(config.spool_paths().state)
        runner = build(config, config_path, events)
    except ConfigError as exc:
        logger.error("invalid configuration %s: %s", config_path, exc)
        return exitcodes.EX_CONFIG
    except OutboxError as exc:
        logger.error("cannot open the event outbox: %s", exc)
        return exitcodes.EX_CANTCREAT
    try:
        if args.once:
            return runner.once()
        runner.install_signal_handlers()
        code = runner.run()
    finally:
        events.close()
    if code == exitcodes.EX_INTERRUPTED:
        logging.shutdown()
        os._exit(code)
    return code
