"""The dispatcher's events, recorded in its outbox (``docs/events.md``, "Dispatcher events").

Every event goes through :class:`DispatchEvents`, so the kinds and payloads live in one place.
Beside its own kinds, the dispatcher records the kinds the bookkeeper projects into its tables:
``task_event`` with mercure's vocabulary (``DISPATCH_BEGIN``, ``DISPATCH_COMPLETE``, ``ERROR``,
``SUSPEND``, ``MOVE``, ``COMPLETE``) and ``task_update`` snapshots (status ``dispatching``,
``complete``, ``error``, with the whole ``task.json``), in the same transaction.
Recording never stops a dispatch: an :class:`OutboxError` is logged and the work goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.task import Task, format_time
from common.task_events import TaskEventRecorder

logger = logging.getLogger(__name__)

PRODUCER = "dispatcher"


class DispatchEvents(TaskEventRecorder):
    """Records dispatcher events; ``outbox`` None records nothing (used by library callers)."""

    PRODUCER = PRODUCER

    def dispatch_started(self, task: Task, targets: list[str], attempt: int) -> None:
        self._record(
            "dispatch_started",
            {**self.task_fields(task), "targets": targets, "attempt": attempt},
            self.task_update(task, "dispatching"),
            *(self.task_event(task, "DISPATCH_BEGIN", target=name) for name in targets),
        )

    def target_done(
        self,
        task: Task,
        target: str,
        *,
        ok: bool,
        attempt: int,
        sent: int,
        bytes_sent: int,
        duration_s: float,
        error: str | None,
    ) -> None:
        self._record(
            "dispatch_target_done",
            {
                **self.task_fields(task),
                "target": target,
                "ok": ok,
                "attempt": attempt,
                "sent": sent,
                "bytes": bytes_sent,
                "duration_s": round(duration_s, 3),
                "error": error,
            },
            self.task_event(task, "DISPATCH_COMPLETE", target=target, file_count=sent)
            if ok
            else self.task_event(
                task, "ERROR", target=target, severity="warning", info=(error or "")[:4000]
            ),
        )

    def retry_scheduled(self, task: Task, failed: list[str], attempt: int) -> None:
        dispatch = task.dispatch
        when = dispatch.next_retry_at if dispatch is not None else None
        self._record(
            "dispatch_retry_scheduled",
            {
                **self.task_fields(task),
                "failed_targets": failed,
                "attempt": attempt,
                "next_retry_at": format_time(when) if when is not None else None,
            },
        )

    def failed(self, task: Task, reason: str, attempts: int) -> None:
        self._record(
            "dispatch_failed",
            {**self.task_fields(task), "reason": reason, "attempts": attempts},
            self.task_event(
                task, "SUSPEND", info=f"Max retries reached or not retryable: {reason}"[:4000]
            ),
            self.task_event(task, "ERROR", severity="error", info=reason[:4000]),
        )

    def moved(self, task: Task, source: Path, destination: Path) -> None:
        where = f"{destination.parent.name}/{destination.name}"
        success = destination.parent.name == "success"
        self._record(
            "task_moved",
            {"task_id": task.id, "from": f"{source.parent.name}/{source.name}", "to": where},
            self.task_event(task, "MOVE", info=f"Moved to {where}"),
            *([self.task_event(task, "COMPLETE")] if success else []),
            self.task_update(task, "complete" if success else "error"),
        )
