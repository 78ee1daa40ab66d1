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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import OutboxError
from common.outbox import NewEvent, Outbox, outbox_path
from common.spool import StaleLock
from common.task import Task, format_time

logger = logging.getLogger(__name__)

PRODUCER = "dispatcher"


class DispatchEvents:
    """Records dispatcher events; ``outbox`` None records nothing (used by library callers)."""

    def __init__(self, outbox: Outbox | None) -> None:
        self.outbox = outbox

    @classmethod
    def open(cls, state_dir: Path) -> DispatchEvents:
        return cls(Outbox(outbox_path(state_dir, PRODUCER), PRODUCER))

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()

    def _record(self, kind: str, payload: Mapping[str, Any], *extra: NewEvent) -> None:
        if self.outbox is None:
            return
        try:
            self.outbox.record_many([NewEvent(kind, payload), *extra])
        except OutboxError as exc:
            logger.error("cannot record %s event: %s", kind, exc)

    @staticmethod
    def _task_event(task: Task, event: str, **fields: Any) -> NewEvent:
        """mercure's task event, as the bookkeeper projects it (``task_event``)."""
        payload = {"task_id": task.id, "event": event}
        payload.update({key: value for key, value in fields.items() if value is not None})
        return NewEvent("task_event", payload)

    @staticmethod
    def _task_update(task: Task, status: str) -> NewEvent:
        """A snapshot of the task for the bookkeeper (``task_update``)."""
        targets = task.dispatch.target_name if task.dispatch is not None else []
        payload: dict[str, Any] = {
            "task_id": task.id,
            "status": status,
            "target": ",".join(targets)[:256],
            "data": task.dump_for_file(),
        }
        if task.info.uid_type == "series" and len(task.info.uid) <= 64:
            payload["series_uid"] = task.info.uid
        if task.info.applied_rule:
            payload["rule"] = task.info.applied_rule[:256]
        return NewEvent("task_update", payload)

    @staticmethod
    def _task(task: Task) -> dict[str, Any]:
        return {"task_id": task.id, "uid": task.info.uid, "uid_type": task.info.uid_type}

    def dispatch_started(self, task: Task, targets: list[str], attempt: int) -> None:
        self._record(
            "dispatch_started",
            {**self._task(task), "targets": targets, "attempt": attempt},
            self._task_update(task, "dispatching"),
            *(self._task_event(task, "DISPATCH_BEGIN", target=name) for name in targets),
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
                **self._task(task),
                "target": target,
                "ok": ok,
                "attempt": attempt,
                "sent": sent,
                "bytes": bytes_sent,
                "duration_s": round(duration_s, 3),
                "error": error,
            },
            self._task_event(task, "DISPATCH_COMPLETE", target=target, file_count=sent)
            if ok
            else self._task_event(
                task, "ERROR", target=target, severity="warning", info=(error or "")[:4000]
            ),
        )

    def retry_scheduled(self, task: Task, failed: list[str], attempt: int) -> None:
        dispatch = task.dispatch
        when = dispatch.next_retry_at if dispatch is not None else None
        self._record(
            "dispatch_retry_scheduled",
            {
                **self._task(task),
                "failed_targets": failed,
                "attempt": attempt,
                "next_retry_at": format_time(when) if when is not None else None,
            },
        )

    def failed(self, task: Task, reason: str, attempts: int) -> None:
        self._record(
            "dispatch_failed",
            {**self._task(task), "reason": reason, "attempts": attempts},
            self._task_event(
                task, "SUSPEND", info=f"Max retries reached or not retryable: {reason}"[:4000]
            ),
            self._task_event(task, "ERROR", severity="error", info=reason[:4000]),
        )

    def moved(self, task: Task, source: Path, destination: Path) -> None:
        where = f"{destination.parent.name}/{destination.name}"
        success = destination.parent.name == "success"
        self._record(
            "task_moved",
            {"task_id": task.id, "from": f"{source.parent.name}/{source.name}", "to": where},
            self._task_event(task, "MOVE", info=f"Moved to {where}"),
            *([self._task_event(task, "COMPLETE")] if success else []),
            self._task_update(task, "complete" if success else "error"),
        )

    def lock_recovered(self, task_id: str, stale: StaleLock) -> None:
        owner = stale.owner
        self._record(
            "lock_recovered",
            {
                "task_id": task_id,
                "lock": str(stale.path),
                "reason": stale.reason,
                "owner": None
                if owner is None
                else {"service": owner.service, "host": owner.host, "pid": owner.pid},
            },
        )
