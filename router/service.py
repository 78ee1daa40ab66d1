"""The router service: find complete series, evaluate the rules, deliver tasks, crash-safely.

Each tick (every ``router_scan_interval`` seconds) the router re-reads the configuration if the
file changed (keeping the last valid one), asks the :class:`~router.scanner.IncomingScanner`
which series are complete and routes each of them under its lock:

1. lock ``incoming/<series>/.lock`` (a dead router's lock is recovered, with an event);
2. carry out a journal left by a crashed router, if there is one; otherwise snapshot the complete
   pairs, inspect them, evaluate the rules, and write the plan as the series' journal;
3. deliver every task folder atomically, record the events, unlink the routed files, remove the
   journal, release the lock and ``rmdir`` the folder (which fails harmlessly when something new
   arrived meanwhile: it is routed in a later pass).

:meth:`Router.once` runs one tick; :meth:`Router.run` loops until :meth:`Router.stop` (the
first SIGTERM/SIGINT finishes the series in progress, a second one exits at once).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final

from common import exitcodes
from common.config import Config, load_config
from common.errors import ConfigError, LockedError
from common.spool import Folder, LockOwner, Marker, SpoolLock
from router.delivery import clean_temp_tasks, deliver_all, remove_delivered_markers, remove_sources
from router.hooks import Checkpoint, Step, no_checkpoint
from router.journal import (
    Journal,
    JournalError,
    read_journal,
    remove_journal,
    remove_stray_temp_files,
    write_journal,
)
from router.planning import Planner
from router.reporting import Reporter
from router.scanner import IncomingScanner, Outcome
from router.selection import invalid_rules
from router.snapshot import inspect_series, take_snapshot

logger = logging.getLogger(__name__)

SERVICE: Final = "router"
ORPHAN_AFTER: Final = 600.0
"""Seconds a ``.dcm`` waits for its ``.tags`` (or the reverse) before it goes to ``error/``. The
receiver renames the two within microseconds; a lone file is an instance whose storing was
interrupted (and never acknowledged)."""
CLEAN_INTERVAL: Final = 60.0
DUE_MARGIN: Final = 0.002
"""Seconds added to the moment a series becomes complete, so that the wake-up does not fall a
hair before it (the scanner compares whole nanoseconds of epoch time)."""
TICK_BUDGET: Final = 10.0
"""Seconds of routing after which a tick ends early (the rest is found again by the next tick),
so that configuration changes and housekeeping are not held up by a large backlog."""
"""Seconds between two sweeps for temporary task folders of dead routers."""


@dataclass(frozen=True)
class TickStats:
    """What one tick did (logged at DEBUG, used by tests and the benchmark)."""

    ready: int
    routed: int
    busy: int
    failed: int
    duration_s: float
    cut_short: bool = False
    """The tick budget ran out before every ready series was routed."""


def _version() -> str:
    try:
        return importlib.metadata.version("caduceus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Router:
    """One router instance (any number may run against one spool)."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        checkpoint: Checkpoint = no_checkpoint,
        orphan_after: float = ORPHAN_AFTER,
        tick_budget: float = TICK_BUDGET,
    ) -> None:
        self.tick_budget = tick_budget
        self.config = config
        self.orphan_after = orphan_after
        self.config_path = config_path
        self.checkpoint = checkpoint
        self.paths = config.spool_paths()
        self.paths.create()
        self.scanner = IncomingScanner(self.paths.incoming)
        self.owner = LockOwner.me(SERVICE)
        self.reporter = Reporter(self.paths.state)
        self.hostname = socket.gethostname()
        self.version = _version()
        self.planner = Planner(config, hostname=self.hostname, version=self.version)
        self.reporter.config_loaded(config_path, invalid_rules(config.rules))
        self._config_stamp = _stamp(config_path)
        self._last_clean = 0.0
        self._stopping = False  # plain flags: set from signal handlers
        self._forced = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ running

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the series in progress, then exit 0; a second one: at once."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if self._stopping:
                logger.warning("%s again: exiting at once", signal.Signals(signum).name)
                self._forced = True
                raise SystemExit(exitcodes.EX_INTERRUPTED)
            logger.info(
                "%s received: stopping after the current series", signal.Signals(signum).name
            )
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the series in progress (signal-safe)."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"s")

    def run(self) -> int:
        """Route until stopped; ``EX_OK`` after a clean stop.

        Between ticks the router sleeps until the moment the scan expects the next series to
        become complete, or for one scan interval (at most ``series_complete_trigger``, so that
        a new series is seen before it can be complete), whichever comes first."""
        logger.info("routing %s every %s s", self.paths.incoming, self.config.router_scan_interval)
        while not self._stopping:
            started = time.monotonic()
            stats = self.tick()
            if stats.ready:
                logger.debug("tick: %s", stats)
            interval = float(self.config.router_scan_interval)
            trigger = float(self.config.series_complete_trigger)
            if 0 < trigger < interval:
                interval = trigger
            wait = interval - (time.monotonic() - started)
            due = self.scanner.next_due
            if due is not None and not stats.cut_short:
                wait = min(wait, max(due - time.time(), 0.0) + DUE_MARGIN)
            self._sleep(wait)
        logger.info("router stopped")
        return exitcodes.EX_OK

    def once(self) -> int:
        """Route every series that is complete now, then return (``EX_SOFTWARE`` when the
        routing of a series failed unexpectedly)."""
        failed = 0
        while True:
            stats = self.tick()
            failed += stats.failed
            if not stats.cut_short or self._stopping:
                break
        return exitcodes.EX_SOFTWARE if failed else exitcodes.EX_OK

    def close(self) -> None:
        self.reporter.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _sleep(self, seconds: float) -> None:
        if seconds <= 0 or self._stopping:
            return
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], seconds)
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake_r, 512)

    # ------------------------------------------------------------------ one tick

    def tick(self) -> TickStats:
        """Reload the configuration if it changed, then route every complete series."""
        started = time.monotonic()
        self._reload_config()
        now = time.time()
        if now - self._last_clean >= CLEAN_INTERVAL:
            self._last_clean = now
            clean_temp_tasks(self.paths)
        ready = self.scanner.ready(now, self.config.series_complete_trigger, self._orphan_after())
        counts = {outcome: 0 for outcome in Outcome}
        cut_short = False
        for number, series_uid in enumerate(ready):
            if self._stopping:
                break
            if number and time.monotonic() - started > self.tick_budget:
                cut_short = True  # at least one series per tick, whatever the budget
                break
            outcome = self._route_guarded(series_uid)
            counts[outcome] += 1
            self.scanner.note(series_uid, outcome, time.time())
        self.reporter.flush()
        return TickStats(
            ready=len(ready),
            routed=counts[Outcome.ROUTED],
            busy=counts[Outcome.BUSY],
            failed=counts[Outcome.FAILED],
            duration_s=time.monotonic() - started,
            cut_short=cut_short,
        )

    def _orphan_after(self) -> float:
        return max(self.orphan_after, float(self.config.series_complete_trigger))

    def _reload_config(self) -> None:
        if self.config_path is None:
            return
        stamp = _stamp(self.config_path)
        if stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            logger.error("configuration change refused, keeping the last valid one: %s", exc)
            self.reporter.config_refused(str(exc))
            return
        if config.spool_paths() != self.paths:
            logger.warning("new spool folders apply after a restart of the router")
        self.config = config
        self.planner = Planner(config, hostname=self.hostname, version=self.version)
        self.reporter.config_loaded(self.config_path, invalid_rules(config.rules))
        logger.info("configuration reloaded")

    # ------------------------------------------------------------------ one series

    def _route_guarded(self, series_uid: str) -> Outcome:
        try:
            return self.route_series(series_uid)
        except Exception:
            logger.exception("routing series %s failed; it is tried again later", series_uid)
            return Outcome.FAILED

    def route_series(self, series_uid: str) -> Outcome:
        """Route the complete pairs of one series (steps in the module doc)."""
        series_dir = self.paths.incoming / series_uid
        lock = SpoolLock(series_dir / Marker.LOCK, SERVICE)
        try:
            lock.acquire()
        except LockedError:
            return Outcome.BUSY
        except (FileNotFoundError, NotADirectoryError):
            return Outcome.GONE
        try:
            if lock.recovered is not None:
                self.reporter.lock_recovered(series_uid, lock.recovered)
            self.checkpoint(Step.LOCKED, series_uid)
            remove_stray_temp_files(series_dir)
            journal = self._journal(series_dir)
            if journal is None:
                return Outcome.NOTHING
            self._carry_out(journal, series_dir)
            return Outcome.ROUTED
        finally:
            lock.release()
            with contextlib.suppress(OSError):
                series_dir.rmdir()  # fails when something new arrived: routed later

    def _journal(self, series_dir: Path) -> Journal | None:
        """The journal a crashed router left, or a new plan (written as the journal)."""
        series_uid = series_dir.name
        try:
            journal = read_journal(series_dir)
        except JournalError as exc:
            logger.error("series %s: %s; removing it and routing the series anew", series_uid, exc)
            remove_journal(series_dir)
            journal = None
        if journal is not None:
            logger.warning(
                "series %s: finishing the routing an interrupted router left (journal %s)",
                series_uid,
                journal.journal_id,
            )
            return journal
        remove_delivered_markers(series_dir)  # of a finished pass that was killed at its very end
        snapshot = take_snapshot(series_dir, now=time.time(), orphan_after=self._orphan_after())
        self.checkpoint(Step.SNAPSHOT_TAKEN, series_uid)
        if not snapshot.stems and not snapshot.orphans:
            return None
        plan = self.planner.plan(snapshot, inspect_series(series_dir, snapshot))
        self.reporter.rule_issues(plan.issues, series_uid)
        if any(task.folder == Folder.ERROR for task in plan.journal.tasks):
            logger.error(
                "series %s (%d instances) goes to error/: %s",
                series_uid,
                len(snapshot.stems),
                plan.disposition,
            )
        else:
            logger.info(
                "series %s (%d instances): %s", series_uid, len(snapshot.stems), plan.disposition
            )
        write_journal(series_dir, plan.journal)
        self.checkpoint(Step.JOURNAL_WRITTEN, series_uid)
        return plan.journal

    def _carry_out(self, journal: Journal, series_dir: Path) -> None:
        outcome = deliver_all(journal, series_dir, self.paths, self.owner, self.checkpoint)
        if outcome.missing:
            logger.error(
                "series %s: %d planned files had vanished from incoming/ and are not "
                "in its tasks: %s",
                journal.series_uid,
                len(outcome.missing),
                ", ".join(outcome.missing[:10]),
            )
        self.reporter.record(journal.events)
        self.checkpoint(Step.EVENTS_RECORDED, journal.series_uid)
        remove_sources(journal, series_dir, self.checkpoint)
        for planned in journal.tasks:
            logger.info(
                "series %s: task delivered to %s/",
                journal.series_uid,
                planned.folder.value,
                extra={"task_id": planned.task_id},
            )


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)
