"""The processor's events, recorded in its outbox (``docs/events.md``, "Processor events").

Beside its own kinds (``processing_started``, ``processing_step_done``,
``processing_retry_scheduled``, ``processing_failed``, ``processing_restarted``, ``task_moved``,
``dynamic_routing_ignored``, ``notification_requested``, ``lock_recovered``; an unreachable
engine is a ``system_event``), the processor records what the bookkeeper projects:
``task_event`` with mercure's vocabulary, ``task_update`` snapshots, ``module_log`` (the
container's output) and ``module_output`` (the module's ``result.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from common.outbox import NewEvent
from common.task import Task, format_time
from common.task_events import TaskEventRecorder

MAX_LOG_EVENT: Final = 4 * 1024 * 1024
"""Characters of container output per ``module_log`` event (the bookkeeper takes 16 MiB)."""


class ProcessEvents(TaskEventRecorder):
    """Records processor events."""

    PRODUCER = "processor"

    def started(self, task: Task, attempt: int) -> None:
        modules = [step.module_name for step in task.processing_steps]
        self._record(
            "processing_started",
            {**self.task_fields(task), "modules": modules, "attempt": attempt},
            self.task_update(task, "processing"),
            self.task_event(task, "PROCESS_BEGIN", info=" -> ".join(modules)),
        )

    def step_done(
        self,
        task: Task,
        index: int,
        module: str,
        *,
        exit_code: int | None,
        duration_s: float,
        error: str | None,
        logs: str | None,
        output: Any,
        settings: dict[str, Any],
    ) -> None:
        extra: list[NewEvent] = [
            self.task_event(
                task,
                "PROCESS_MODULE_COMPLETE" if error is None else "ERROR",
                info=(error or module)[:4000],
                severity=None if error is None else "warning",
            )
        ]
        if logs:
            for start in range(0, len(logs), MAX_LOG_EVENT):
                chunk = logs[start : start + MAX_LOG_EVENT]
                extra.append(
                    NewEvent("module_log", {"task_id": task.id, "module": module, "logs": chunk})
                )
        if error is None:
            extra.append(
                NewEvent(
                    "module_output",
                    {
                        "task_id": task.id,
                        "module": module,
                        "index": index,
                        "settings": settings,
                        "output": output,
                    },
                )
            )
        self._record(
            "processing_step_done",
            {
                **self.task_fields(task),
                "index": index,
                "module": module,
                "exit_code": exit_code,
                "duration_s": round(duration_s, 3),
                "error": error,
            },
            *extra,
        )

    def retry_scheduled(self, task: Task, reason: str) -> None:
        when = task.info.process_next_retry_at
        self._record(
            "processing_retry_scheduled",
            {
                **self.task_fields(task),
                "reason": reason,
                "failures": task.info.process_failures,
                "engine_failures": task.info.process_engine_failures,
                "next_retry_at": format_time(when) if when is not None else None,
            },
            self.task_update(task, "processing"),
        )

    def failed(self, task: Task, reason: str) -> None:
        self._record(
            "processing_failed",
            {**self.task_fields(task), "reason": reason},
            self.task_event(task, "ERROR", severity="error", info=reason[:4000]),
        )

    def moved(self, task: Task, source: Path, destination: Path, status: str) -> None:
        where = f"{destination.parent.name}/{destination.name}"
        events = [self.task_event(task, "MOVE", info=f"Moved to {where}")]
        if status != "error":
            events.insert(0, self.task_event(task, "PROCESS_COMPLETE"))
        if status == "complete":
            events.append(self.task_event(task, "COMPLETE"))
        elif status == "discarded":
            events.append(self.task_event(task, "DISCARD", info="discarded by the module"))
        self._record(
            "task_moved",
            {"task_id": task.id, "from": f"{source.parent.name}/{source.name}", "to": where},
            *events,
            self.task_update(task, status),
        )

    def notification_requested(self, task: Task, text: str, *, trigger: str = "completion") -> None:
        """A notification is due: completion (a module may have asked for it with
        ``__mercure_notification``) or error."""
        self._record(
            "notification_requested",
            {
                "rule": task.info.applied_rule or "",
                "series_uid": task.info.uid if task.info.uid_type == "series" else None,
                "triggers": [trigger],
                "task_ids": [task.id],
                "text": text[:4000],
            },
            self.task_event(task, "NOTIFICATION", info=text[:4000]),
        )

    def restarted(self, task: Task) -> None:
        self._record(
            "processing_restarted",
            self.task_fields(task),
            self.task_event(task, "PROCESS_RESTART"),
            self.task_update(task, "processing"),
        )

    def routing_ignored(self, task: Task, reason: str) -> None:
        """A module's ``__mercure_routing`` was not applied."""
        self._record(
            "dynamic_routing_ignored",
            {**self.task_fields(task), "reason": reason},
            self.task_event(task, "ERROR", severity="warning", info=reason[:4000]),
        )

    def engine_unreachable(self, reason: str) -> None:
        self._record(
            "system_event",
            {"event": "PROCESSING", "severity": "error", "description": reason[:4000]},
        )
