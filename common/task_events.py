"""What every service that moves tasks records the same way: the outbox plumbing and the two
kinds the bookkeeper projects into its task tables (``docs/events.md``).

``task_event`` carries mercure's vocabulary (``PROCESS_BEGIN``, ``DISPATCH_COMPLETE``,
``ERROR``, ``MOVE``, ...); ``task_update`` is a snapshot of the task with its status and the whole
``task.json``. A service's own event kinds are recorded in the same transaction as these.
Recording never stops the work: an :class:`OutboxError` is logged and the service goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from common.errors import OutboxError
from common.outbox import NewEvent, Outbox, outbox_path
from common.spool import StaleLock
from common.task import Task

logger = logging.getLogger(__name__)


class TaskEventRecorder:
    """Records a service's events; ``outbox`` None records nothing (library callers, tests)."""

    PRODUCER = "service"

    def __init__(self, outbox: Outbox | None) -> None:
        self.outbox = outbox

    @classmethod
    def open(cls, state_dir: Path) -> Self:
        return cls(Outbox(outbox_path(state_dir, cls.PRODUCER), cls.PRODUCER))

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
    def task_event(task: Task, event: str, **fields: Any) -> NewEvent:
        """mercure's task event, as the bookkeeper projects it (``task_event``)."""
        payload = {"task_id": task.id, "event": event}
        payload.update({key: value for key, value in fields.items() if value is not None})
        return NewEvent("task_event", payload)

    @staticmethod
    def task_update(task: Task, status: str) -> NewEvent:
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
    def task_fields(task: Task) -> dict[str, Any]:
        return {"task_id": task.id, "uid": task.info.uid, "uid_type": task.info.uid_type}

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
