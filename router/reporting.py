"""The router's events and its status file: every report goes through one :class:`Reporter`.

Events go into the router's durable outbox (``docs/events.md``, "Router events"). The status
file ``<state>/router/status.json`` holds what the GUI shows without the bookkeeper: the
configuration in use (or why a new one was refused) and, per rule, the last problem found
(invalid text, failure on a series' tags, unusable, study level). It is rewritten atomically at
the end of a tick when something changed; with several routers on one host the last writer wins.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.errors import OutboxError
from common.outbox import NewEvent, Outbox, outbox_path, utc_now
from common.spool import StaleLock, atomic_write_json
from router.journal import PlannedEvent
from router.selection import RuleIssue

logger = logging.getLogger(__name__)

PRODUCER = "router"


def status_path(state_dir: Path) -> Path:
    return state_dir / "router" / "status.json"


class Reporter:
    """Records the router's events and keeps its status file."""

    def __init__(self, state_dir: Path) -> None:
        self.outbox = Outbox(outbox_path(state_dir, PRODUCER), PRODUCER)
        self.path = status_path(state_dir)
        self.status: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": utc_now(),
            "updated_at": utc_now(),
            "config": {"path": None, "loaded_at": None, "error": None},
            "rule_errors": {},
        }
        self._dirty = True
        self._logged: set[tuple[str, str]] = set()

    # -- events

    def record(self, events: Iterable[PlannedEvent]) -> None:
        """Record planned events (deterministic ids: recording again stores them once)."""
        batch = [NewEvent(event.kind, event.payload, event.id) for event in events]
        self._record(batch)

    def _record(self, batch: list[NewEvent]) -> None:
        try:
            self.outbox.record_many(batch)
        except OutboxError as exc:
            # Events must never stop images; the spool itself still shows what happened.
            logger.error("cannot record %d router events: %s", len(batch), exc)

    def lock_recovered(self, series_uid: str, stale: StaleLock) -> None:
        owner = stale.owner
        payload = {
            "path": str(stale.path),
            "series_uid": series_uid,
            "reason": stale.reason,
            "owner": None
            if owner is None
            else {"service": owner.service, "host": owner.host, "pid": owner.pid},
        }
        logger.warning("series %s: recovered a stale lock (%s)", series_uid, stale.reason)
        self._record([NewEvent("lock_recovered", payload)])

    # -- rules and configuration

    def rule_issues(self, issues: Iterable[RuleIssue], series_uid: str | None) -> None:
        """Note rule problems in the status file; log each (rule, problem) once at ERROR."""
        for issue in issues:
            entry = self.status["rule_errors"].get(issue.rule)
            if entry is None or entry["error"] != issue.error:
                entry = {
                    "kind": issue.kind,
                    "error": issue.error,
                    "count": 0,
                    "first_at": utc_now(),
                }
                self.status["rule_errors"][issue.rule] = entry
            entry["count"] += 1
            entry["last_at"] = utc_now()
            entry["series_uid"] = series_uid
            self._dirty = True
            key = (issue.rule, issue.error)
            if key not in self._logged:
                self._logged.add(key)
                where = f" (series {series_uid})" if series_uid else ""
                logger.error("rule %r: %s%s", issue.rule, issue.error, where)

    def config_loaded(self, path: Path | None, invalid: list[RuleIssue]) -> None:
        """A configuration is in use: reset the rule problems, report its invalid rules."""
        self.status["config"] = {
            "path": str(path) if path else None,
            "loaded_at": utc_now(),
            "error": None,
        }
        self.status["rule_errors"] = {}
        self._logged.clear()
        self._dirty = True
        self.rule_issues(invalid, None)
        if invalid:
            load_id = uuid.uuid4().hex
            self._record(
                [
                    NewEvent(
                        "rule_error",
                        {
                            "rule": issue.rule,
                            "kind": issue.kind,
                            "error": issue.error,
                            "series_uid": None,
                        },
                        f"rule_error-{load_id}-{number}",
                    )
                    for number, issue in enumerate(invalid)
                ]
            )

    def config_refused(self, error: str) -> None:
        self.status["config"]["error"] = error
        self._dirty = True

    # -- the status file

    def flush(self) -> None:
        """Write the status file if something changed (best effort)."""
        if not self._dirty:
            return
        self.status["updated_at"] = utc_now()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.status, durable=False)
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.path, exc)
            return
        self._dirty = False

    def close(self) -> None:
        self.flush()
        self.outbox.close()
