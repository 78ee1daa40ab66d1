"""The router's events in the shapes the bookkeeper projects into its tables (``docs/events.md``,
"Kinds the bookkeeper projects"): one ``task_update`` per created task and one mercure
``task_event`` (``REGISTER``, ``DISCARD`` or ``ERROR``).

The bookkeeper refuses a batch whose projected payload breaks its limits, so every value is
kept inside them here: UIDs of 1-64 characters (else left out), names of 1-256 characters.
"""

from __future__ import annotations

from typing import Any, Final

from common.spool import Folder
from router.journal import PlannedEvent, PlannedTask

MAX_UID: Final = 64
MAX_LABEL: Final = 256

STATUS: Final = {
    Folder.OUTGOING: "routed",
    Folder.PROCESSING: "routed",
    Folder.SUCCESS: "complete",
    Folder.DISCARD: "discarded",
    Folder.ERROR: "error",
}
"""``task_update.status`` of a task the router has just created, by its folder."""


def projection_events(
    planned: PlannedTask, series_uid: str, study_uid: str | None
) -> list[PlannedEvent]:
    """``task_update`` and ``task_event`` for one delivered task (deterministic ids)."""
    info = planned.task["info"]
    dispatch = planned.task.get("dispatch") or {}
    targets = ", ".join(dispatch.get("target_name") or [])
    rule = info.get("applied_rule") or ", ".join(info.get("triggered_rules") or {})
    update: dict[str, Any] = {
        "task_id": planned.task_id,
        "status": STATUS[planned.folder],
        "data": planned.task,
    }
    _put_uid(update, "series_uid", series_uid)
    _put_uid(update, "study_uid", study_uid)
    _put_label(update, "rule", rule)
    _put_label(update, "target", targets)
    event: dict[str, Any] = {
        "task_id": planned.task_id,
        "file_count": len(planned.files),
        **_task_event(planned, info),
    }
    _put_label(event, "rule", rule)
    _put_label(event, "target", targets)
    return [
        PlannedEvent(
            id=f"task_update-{planned.task_id}-created", kind="task_update", payload=update
        ),
        PlannedEvent(id=f"task_event-{planned.task_id}-created", kind="task_event", payload=event),
    ]


def _task_event(planned: PlannedTask, info: dict[str, Any]) -> dict[str, str]:
    if planned.folder == Folder.ERROR:
        return {"event": "ERROR", "severity": "error", "info": str(info.get("fail_reason"))}
    if planned.folder == Folder.DISCARD:
        rule = info.get("applied_rule")
        text = f"Discard by rule {rule}" if rule else "Discard by default."
        return {"event": "DISCARD", "severity": "info", "info": text}
    return {
        "event": "REGISTER",
        "severity": "info",
        "info": f"routed to {planned.folder.value}/ ({planned.placement})",
    }


def _put_uid(payload: dict[str, Any], key: str, value: str | None) -> None:
    if value and len(value) <= MAX_UID:
        payload[key] = value


def _put_label(payload: dict[str, Any], key: str, value: str) -> None:
    if value:
        payload[key] = value if len(value) <= MAX_LABEL else value[: MAX_LABEL - 3] + "..."
