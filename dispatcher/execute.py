"""One dispatch attempt of one task folder, from the claim to the move.

1. Claim the folder with ``.processing`` (:class:`~common.spool.SpoolLock`); a folder another
   live dispatcher holds is skipped, a dead one's claim is recovered (``lock_recovered``).
2. Re-read ``task.json`` under the claim (another instance may just have changed it).
3. Send to every target whose state is not ``complete``, one after the other; after each target
   its status (state, attempts, last_error, per-instance DIMSE statuses) is written back to
   ``task.json`` atomically, so a crash loses at most the target in progress.
4. All targets complete: rename the folder to ``success/<id>``. Otherwise count the attempt in
   ``dispatch.retries``; after ``retry_max`` attempts, or when a retry cannot help (unknown or
   unsupported target, unreadable file), set ``info.fail_stage = "DISPATCHING"`` and
   ``info.fail_reason`` and rename the folder to ``error/<id>``; else set
   ``dispatch.next_retry_at`` (exponential backoff) and release the claim.

The claim travels with the folder when it is renamed and is removed at its new place, so no
other dispatcher can pick the task between the decision and the move.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from common.config import Config
from common.spool import Marker, SpoolLock, SpoolPaths, atomic_write_bytes, move_claimed
from common.task import Task, TaskDispatch, TaskError, now_utc, read_task, write_task
from common.task_queue import claimed, move_broken
from dispatcher import status
from dispatcher.events import DispatchEvents
from dispatcher.settings import DispatcherSettings
from dispatcher.targets import TargetJob, TargetResult, handler_for

logger = logging.getLogger(__name__)

SERVICE = "dispatcher"


class Outcome(StrEnum):
    """How an attempt ended (for logs, tests and the service's bookkeeping)."""

    SUCCESS = "success"
    RETRY = "retry"
    ERROR = "error"
    BUSY = "busy"
    """Another live dispatcher holds the task, or it is gone."""
    NOT_DUE = "not_due"
    STOPPED = "stopped"
    """Interrupted by a forced stop; the attempt does not count."""


class TaskRunner:
    """Runs attempts; thread-safe (one runner serves every worker thread of a service)."""

    def __init__(
        self,
        paths: SpoolPaths,
        events: DispatchEvents,
        cancel: threading.Event | None = None,
    ) -> None:
        self.paths = paths
        self.events = events
        self.cancel = cancel if cancel is not None else threading.Event()

    def run(self, folder: Path, config: Config, settings: DispatcherSettings) -> Outcome:
        with claimed(folder, SERVICE, self.events) as lock:
            if lock is None:
                return Outcome.BUSY
            return self._attempt(folder, lock, config, settings)

    def fail_broken(self, folder: Path, reason: str) -> None:
        """Move a folder whose ``task.json`` cannot be read to ``error/``."""
        move_broken(folder, self.paths.error, service=SERVICE, stage="DISPATCHING", reason=reason)

    # ------------------------------------------------------------------ the attempt

    def _attempt(
        self, folder: Path, lock: SpoolLock, config: Config, settings: DispatcherSettings
    ) -> Outcome:
        task_path = folder / Marker.TASK
        try:
            task = read_task(task_path, report=False)
        except TaskError as exc:
            if not folder.exists():
                return Outcome.BUSY
            destination = move_claimed(folder, self.paths.error, lock)
            atomic_write_bytes(destination / Marker.ERROR, f"DISPATCHING: {exc}\n".encode())
            return Outcome.ERROR
        dispatch = task.dispatch if task.dispatch is not None else TaskDispatch()
        task.dispatch = dispatch
        if dispatch.next_retry_at is not None and dispatch.next_retry_at > now_utc():
            return Outcome.NOT_DUE
        pending = dispatch.pending_targets()
        if not dispatch.target_name:
            return self._give_up(folder, lock, task, "the task names no dispatch target", 1)
        attempt = (dispatch.retries or 0) + 1
        permanent: list[str] = []
        if pending:
            self.events.dispatch_started(task, pending, attempt)
        for name in pending:
            if self.cancel.is_set():
                break
            result = self._send(task, folder, name, config, settings)
            self._record(task, name, result)
            write_task(task_path, task)
            if result.permanent:
                permanent.append(name)
        return self._conclude(folder, lock, task, attempt, permanent, settings)

    def _send(
        self, task: Task, folder: Path, name: str, config: Config, settings: DispatcherSettings
    ) -> TargetResult:
        target = config.targets.get(name)
        if target is None:
            return TargetResult(
                ok=False, permanent=True, message=f"target {name!r} is not configured"
            )
        assert task.dispatch is not None
        previous = task.dispatch.status.get(name)
        delivered = frozenset(
            file
            for file, code in (previous.instances if previous else {}).items()
            if status.is_delivered(code)
        )
        job = TargetJob(task, folder, name, target, settings, delivered, self.cancel)
        started = time.monotonic()
        try:
            result = handler_for(target).send(job)
        except Exception as exc:  # a handler bug must not take the service down
            logger.exception(
                "task %s: target %s: handler failed", task.id, name, extra={"task_id": task.id}
            )
            result = TargetResult(ok=False, message=f"internal error: {type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - started
        attempts = (previous.attempts if previous else 0) + 1
        self.events.target_done(
            task,
            name,
            ok=result.ok,
            attempt=attempts,
            sent=result.sent,
            bytes_sent=result.bytes_sent,
            duration_s=elapsed,
            error=result.message or None,
        )
        log = logger.info if result.ok else logger.warning
        log(
            "task %s -> %s: %s (%d sent in %.2f s)",
            task.id,
            name,
            "delivered" if result.ok else result.message,
            result.sent,
            elapsed,
            extra={"task_id": task.id},
        )
        return result

    @staticmethod
    def _record(task: Task, name: str, result: TargetResult) -> None:
        assert task.dispatch is not None
        state = task.dispatch.target_status(name)
        state.attempts += 1
        state.instances.update(result.instances)
        state.state = "complete" if result.ok else "error"
        state.last_error = None if result.ok else result.message
        state.time = now_utc()

    def _conclude(
        self,
        folder: Path,
        lock: SpoolLock,
        task: Task,
        attempt: int,
        permanent: list[str],
        settings: DispatcherSettings,
    ) -> Outcome:
        dispatch = task.dispatch
        assert dispatch is not None
        failed = dispatch.pending_targets()
        if not failed:
            dispatch.next_retry_at = None
            write_task(folder / Marker.TASK, task)
            destination = move_claimed(folder, self.paths.success, lock)
            self.events.moved(task, folder, destination)
            return Outcome.SUCCESS
        if self.cancel.is_set():
            return Outcome.STOPPED
        reason = "; ".join(
            f"{name}: {dispatch.status[name].last_error or 'not delivered'}"
            for name in failed
            if name in dispatch.status
        )
        if permanent or attempt >= settings.attempts_allowed():
            return self._give_up(folder, lock, task, reason, attempt)
        dispatch.retries = attempt
        wait = settings.retry_wait(attempt)
        dispatch.next_retry_at = now_utc() + timedelta(seconds=wait)
        write_task(folder / Marker.TASK, task)
        self.events.retry_scheduled(task, failed, attempt)
        logger.info(
            "task %s: attempt %d failed, next in %.0f s",
            task.id,
            attempt,
            wait,
            extra={"task_id": task.id},
        )
        return Outcome.RETRY

    def _give_up(
        self, folder: Path, lock: SpoolLock, task: Task, reason: str, attempt: int
    ) -> Outcome:
        assert task.dispatch is not None
        task.dispatch.retries = attempt
        task.dispatch.next_retry_at = None
        task.info.fail_stage = "DISPATCHING"
        task.info.fail_reason = reason
        write_task(folder / Marker.TASK, task)
        logger.error("task %s failed: %s", task.id, reason, extra={"task_id": task.id})
        self.events.failed(task, reason, attempt)
        destination = move_claimed(folder, self.paths.error, lock)
        self.events.moved(task, folder, destination)
        return Outcome.ERROR


def restart_task(paths: SpoolPaths, task_id: str) -> Path:
    """Send a task of ``error/`` again: reset its dispatch retries and failure, move it back to
    ``outgoing/``. Targets already delivered stay delivered. For the GUI's "restart"."""
    folder = paths.error / task_id
    lock = SpoolLock(folder / Marker.PROCESSING, SERVICE)
    lock.acquire()
    try:
        task = read_task(folder / Marker.TASK)
        if task.dispatch is not None:
            task.dispatch.retries = None
            task.dispatch.next_retry_at = None
        task.info.fail_stage = None
        task.info.fail_reason = None
        write_task(folder / Marker.TASK, task)
        return move_claimed(folder, paths.outgoing, lock)
    finally:
        lock.release()
