"""The cleaner's events, recorded in its outbox (``docs/events.md``, "Cleaner events").

Every event goes through :class:`CleanerEvents`, so the kinds and payloads live in one place.
Recording never stops a deletion: on a full disk the outbox may be unwritable exactly when
cleaning matters most, so an :class:`OutboxError` is logged and the cleaning goes on. The outbox
is opened on first use and again after a failed open.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cleaner.scan import SERVICE, DiskUsage
from common.errors import OutboxError
from common.outbox import NewEvent, Outbox, outbox_path
from common.spool import StaleLock

logger = logging.getLogger(__name__)


class CleanerEvents:
    """Records cleaner events into ``<state>/outbox/cleaner.sqlite3``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = outbox_path(state_dir, SERVICE)
        self._outbox: Outbox | None = None

    def close(self) -> None:
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()

    def _record(self, *events: NewEvent) -> None:
        """Record ``events`` in one transaction (all or none)."""
        try:
            if self._outbox is None:
                self._outbox = Outbox(self.path, SERVICE)
            self._outbox.record_many(events)
        except OutboxError as exc:
            logger.error("cannot record %s: %s", ", ".join(e.kind for e in events), exc)

    def task_deleted(self, event_id: str, payload: Mapping[str, Any]) -> None:
        """One folder deleted; ``event_id`` is chosen before the deletion (see ``removal``).

        A deleted task also gets mercure's ``CLEAN`` task event, which the bookkeeper shows in
        the task's history; its id is derived from ``event_id``, so a resend is stored once.
        """
        events = [NewEvent("task_deleted", payload, event_id)]
        if payload.get("reason") != "abandoned":
            events.append(NewEvent("task_event", _clean_event(payload), f"{event_id}-clean"))
        self._record(*events)

    def emergency_started(self, folders: list[Path], usage: DiskUsage, threshold: int) -> None:
        payload = {"folders": [str(path) for path in folders], **_usage(usage)}
        self._record(NewEvent("emergency_clean_started", {**payload, "threshold": threshold}))

    def emergency_finished(
        self,
        folders: list[Path],
        before: DiskUsage,
        after: DiskUsage,
        threshold: int,
        *,
        deleted: int,
        locked: int,
        duration_s: float,
    ) -> None:
        under = not after.over(threshold)
        finished = {
            "folders": [str(path) for path in folders],
            **_usage(after),
            "threshold": threshold,
            "under_threshold": under,
            "deleted": deleted,
            "locked": locked,
            "bytes_freed": max(before.used - after.used, 0),
            "duration_s": round(duration_s, 3),
        }
        description = (
            f"emergency cleaning of {', '.join(map(str, folders))}: usage "
            f"{before.percent:.1f}% -> {after.percent:.1f}% (threshold {threshold}%), "
            f"{deleted} tasks deleted, {locked} locked kept"
        )
        system = {
            "event": "EMERGENCY_CLEAN",
            "severity": "warning" if under else "error",
            "description": description,
        }
        self._record(
            NewEvent("emergency_clean_finished", finished), NewEvent("system_event", system)
        )

    def lock_recovered(self, task_id: str, stale: StaleLock) -> None:
        """Same shape as the dispatcher's ``lock_recovered``."""
        owner = stale.owner
        lock = stale.path
        self._record(
            NewEvent(
                "lock_recovered",
                {
                    "task_id": task_id,
                    "lock": f"{lock.parent.parent.name}/{lock.parent.name}/{lock.name}",
                    "reason": stale.reason,
                    "owner": None
                    if owner is None
                    else {"service": owner.service, "host": owner.host, "pid": owner.pid},
                },
            )
        )


def _clean_event(deleted: Mapping[str, Any]) -> dict[str, Any]:
    """mercure's ``CLEAN`` task event for a ``task_deleted`` payload."""
    age_h = float(deleted.get("age_s", 0)) / 3600
    return {
        "task_id": deleted.get("task_id"),
        "event": "CLEAN",
        "severity": "info",
        "info": f"deleted from {deleted.get('folder')}/ ({deleted.get('reason')}, "
        f"{age_h:.1f} h after it arrived)",
        "file_count": deleted.get("files"),
    }


def _usage(usage: DiskUsage) -> dict[str, Any]:
    return {
        "total_bytes": usage.total,
        "used_bytes": usage.used,
        "usage_percent": round(usage.percent, 2),
    }
