"""From a series snapshot (:mod:`router.snapshot`) to a routing plan: which tasks, where, with
which ``task.json``.

Contract (``docs/router.md``):

* :meth:`Planner.plan` turns the rule selection (:mod:`router.selection`) into a
  :class:`~router.journal.Journal`: one merged ``outgoing/`` task for all route-only rules (the
  union of their targets, so a target is sent the series once), one ``processing/`` task per
  ``process``/``both`` rule, a ``success/`` task when only notification rules triggered, a
  ``discard/`` task when nothing (or a discard rule) triggered, an ``error/`` task when the
  series cannot be routed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from common.config import Action, Config, Rule
from common.spool import Folder
from common.task import (
    MISSING,
    FailStage,
    Task,
    TaskDispatch,
    TaskDispatchStatus,
    TaskInfo,
    TaskProcessing,
    format_time,
    now_utc,
)
from router.bookkeeping import projection_events
from router.journal import Journal, Placement, PlannedEvent, PlannedTask
from router.selection import RuleIssue, Selection, select_rules
from router.snapshot import MAX_REASONS, Inspection, Snapshot, summarise

STUDY_NOT_IMPLEMENTED: Final = "study-level rules not implemented yet"


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    journal: Journal
    selection: Selection | None
    issues: tuple[RuleIssue, ...]
    disposition: str
    """One line for the log: what happens to the series."""


@dataclass(frozen=True)
class _Draft:
    folder: Folder
    task: Task
    files: tuple[str, ...] | None = None
    """The files of this task; None: the snapshot's complete pairs."""


class Planner:
    """Builds the routing plan of a series under one configuration."""

    def __init__(self, config: Config, *, hostname: str, version: str) -> None:
        self.config = config
        self.hostname = hostname
        self.version = version

    def plan(self, snapshot: Snapshot, inspection: Inspection) -> Plan:
        series_uid = snapshot.series_uid
        journal_id = uuid.uuid4().hex
        tags = inspection.tags
        selection: Selection | None = None
        issues: tuple[RuleIssue, ...] = ()
        drafts: list[_Draft] = []
        disposition = "nothing"
        if inspection.problems:
            disposition = summarise(inspection.problems)
            drafts = [self._error(series_uid, tags, disposition)]
        elif snapshot.stems:
            selection = select_rules(self.config.rules, _as_text(tags))
            drafts, issues, disposition = self._decide(series_uid, tags, selection)
        if snapshot.orphans:
            reason = _orphan_reason(snapshot)
            orphan = self._error(series_uid, {}, reason)
            drafts.append(_Draft(orphan.folder, orphan.task, snapshot.orphans))
            disposition = f"{disposition}; {reason}"
        return self._finish(journal_id, snapshot, tags, selection, issues, drafts, disposition)

    # -- deciding

    def _decide(
        self, series_uid: str, tags: Mapping[str, Any], selection: Selection
    ) -> tuple[list[_Draft], tuple[RuleIssue, ...], str]:
        issues = list(selection.issues)
        triggered = list(selection.triggered)
        if selection.forced is not None and not triggered:
            reason = issues[-1].error
            return [self._error(series_uid, tags, reason)], tuple(issues), reason
        if selection.discard_rule is not None:
            rule = selection.discard_rule
            draft = self._discard(series_uid, tags, triggered, rule)
            return [draft], tuple(issues), f"discarded by rule {rule!r}"
        if not triggered:
            return [self._discard(series_uid, tags, [], None)], tuple(issues), "no rule triggered"
        rules = self.config.rules
        study = [name for name in triggered if rules[name].action_trigger == "study"]
        issues += [RuleIssue(name, "not_implemented", STUDY_NOT_IMPLEMENTED) for name in study]
        usable: list[str] = []
        for name in triggered:
            if name in study:
                continue
            problem = self._unusable(rules[name])
            if problem is None:
                usable.append(name)
            else:
                issues.append(RuleIssue(name, "unusable", problem))
        if not usable:
            reason = _no_usable_reason(study, issues)
            return [self._error(series_uid, tags, reason)], tuple(issues), reason
        drafts = self._tasks(series_uid, tags, triggered, usable)
        return drafts, tuple(issues), f"rules {', '.join(usable)}"

    def _unusable(self, rule: Rule) -> str | None:
        config = self.config
        if rule.action in ("route", "both"):
            if not rule.target:
                return f"action {rule.action!r} but no target"
            unknown = [name for name in rule.target if name not in config.targets]
            if unknown:
                return f"unknown target(s) {', '.join(unknown)}"
        if rule.action in ("process", "both"):
            if not rule.processing_module:
                return f"action {rule.action!r} but no processing module"
            unknown = [name for name in rule.processing_module if name not in config.modules]
            if unknown:
                return f"unknown module(s) {', '.join(unknown)}"
        return None

    def _tasks(
        self, series_uid: str, tags: Mapping[str, Any], triggered: list[str], usable: list[str]
    ) -> list[_Draft]:
        rules = self.config.rules
        drafts: list[_Draft] = []
        route = [name for name in usable if rules[name].action == "route"]
        if route:
            targets = list(dict.fromkeys(t for name in route for t in rules[name].target))
            info = self._info("route", series_uid, tags, route, "")
            task = Task(id=_task_id(), info=info, dispatch=_dispatch(targets))
            drafts.append(_Draft(Folder.OUTGOING, task))
        for name in usable:
            rule = rules[name]
            if rule.action not in ("process", "both"):
                continue
            info = self._info(rule.action, series_uid, tags, triggered, name)
            dispatch = _dispatch(rule.target) if rule.action == "both" else None
            task = Task(id=_task_id(), info=info, dispatch=dispatch, process=self._steps(rule))
            drafts.append(_Draft(Folder.PROCESSING, task))
        notify = [name for name in usable if rules[name].action == "notification"]
        if notify and len(notify) == len(usable):
            applied = notify[0] if len(notify) == 1 else ""
            info = self._info("notification", series_uid, tags, triggered, applied)
            drafts.append(_Draft(Folder.SUCCESS, Task(id=_task_id(), info=info)))
        return drafts

    def _steps(self, rule: Rule) -> TaskProcessing | list[TaskProcessing]:
        """mercure's merge: module settings overlaid by the rule's settings (a list applies
        one entry per step of a chain, an object applies to every step)."""
        steps: list[TaskProcessing] = []
        for index, name in enumerate(rule.processing_module):
            module = self.config.modules[name]
            settings = dict(module.settings)
            overrides = rule.processing_settings
            if isinstance(overrides, list):
                if index < len(overrides):
                    settings.update(overrides[index])
            else:
                settings.update(overrides)
            steps.append(
                TaskProcessing(
                    module_name=name,
                    module_config=module,
                    settings=settings,
                    retain_input_images=rule.processing_retain_images,
                )
            )
        return steps[0] if len(steps) == 1 else steps

    def _discard(
        self, series_uid: str, tags: Mapping[str, Any], triggered: list[str], rule: str | None
    ) -> _Draft:
        info = self._info("discard", series_uid, tags, triggered, rule)
        return _Draft(Folder.DISCARD, Task(id=_task_id(), info=info))

    def _error(self, series_uid: str, tags: Mapping[str, Any], reason: str) -> _Draft:
        info = self._info("route", series_uid, tags, [], None, fail=("ROUTING", reason))
        return _Draft(Folder.ERROR, Task(id=_task_id(), info=info))

    def _info(
        self,
        action: Action,
        series_uid: str,
        tags: Mapping[str, Any],
        triggered: list[str],
        applied_rule: str | None,
        *,
        fail: tuple[FailStage, str] | None = None,
    ) -> TaskInfo:
        return TaskInfo(
            action=action,
            uid=series_uid,
            uid_type="series",
            triggered_rules=dict.fromkeys(triggered, True),
            applied_rule=applied_rule,
            patient_name=_tag(tags, "PatientName"),
            mrn=_tag(tags, "PatientID"),
            acc=_tag(tags, "AccessionNumber"),
            sender_address=_tag(tags, "SenderAddress"),
            sender_aet=_tag(tags, "SenderAET"),
            receiver_aet=_tag(tags, "ReceiverAET"),
            device_serial_number=_tag(tags, "DeviceSerialNumber", None),
            mercure_version=self.version,
            mercure_appliance=self.config.appliance_name,
            mercure_server=self.hostname,
            fail_stage=fail[0] if fail else None,
            fail_reason=fail[1] if fail else None,
            created_at=now_utc(),
        )

    # -- the journal

    def _finish(
        self,
        journal_id: str,
        snapshot: Snapshot,
        tags: Mapping[str, Any],
        selection: Selection | None,
        issues: tuple[RuleIssue, ...],
        drafts: list[_Draft],
        disposition: str,
    ) -> Plan:
        placements = _placements(drafts)
        tasks = [
            PlannedTask(
                task_id=draft.task.id,
                folder=draft.folder,
                placement=placement,
                files=list(draft.files) if draft.files is not None else snapshot.files,
                task=draft.task.dump_for_file(),
            )
            for draft, placement in zip(drafts, placements, strict=True)
        ]
        events = self._events(journal_id, snapshot, tags, selection, issues, tasks)
        journal = Journal(
            journal_id=journal_id,
            series_uid=snapshot.series_uid,
            created_at=format_time(now_utc()),
            files=snapshot.all_files,
            tasks=tasks,
            events=events,
        )
        return Plan(journal, selection, issues, disposition)

    def _events(
        self,
        journal_id: str,
        snapshot: Snapshot,
        tags: Mapping[str, Any],
        selection: Selection | None,
        issues: tuple[RuleIssue, ...],
        tasks: list[PlannedTask],
    ) -> list[PlannedEvent]:
        series_uid = snapshot.series_uid
        events: list[PlannedEvent] = []
        if snapshot.stems:
            events.append(self._registered(journal_id, snapshot, tags, selection))
        for number, issue in enumerate(issues):
            if issue.kind == "invalid":
                continue  # reported once per configuration load, not per series
            payload = {
                "rule": issue.rule,
                "kind": issue.kind,
                "error": issue.error,
                "series_uid": series_uid,
            }
            events.append(
                PlannedEvent(
                    id=f"rule_error-{journal_id}-{number}", kind="rule_error", payload=payload
                )
            )
        for planned in tasks:
            events.append(self._task_event(planned, series_uid))
            events += projection_events(planned, series_uid, _tag(tags, "StudyInstanceUID", None))
            if planned.folder == Folder.ERROR:
                failure: dict[str, Any] = {
                    "series_uid": series_uid,
                    "task_id": planned.task_id,
                    "reason": planned.task["info"]["fail_reason"],
                    "instance_count": _instances(planned.files),
                    "files": planned.files,
                }
                events.append(
                    PlannedEvent(
                        id=f"series_error-{planned.task_id}", kind="series_error", payload=failure
                    )
                )
        events += self._notifications(journal_id, series_uid, selection, tasks)
        return events

    @staticmethod
    def _registered(
        journal_id: str,
        snapshot: Snapshot,
        tags: Mapping[str, Any],
        selection: Selection | None,
    ) -> PlannedEvent:
        payload: dict[str, Any] = {
            "series_uid": snapshot.series_uid,
            "study_uid": _tag(tags, "StudyInstanceUID", None),
            "instance_count": len(snapshot.stems),
            "tags": _storable(dict(tags)),
            "routing_id": journal_id,
        }
        if selection is not None:
            payload["triggered_rules"] = list(selection.triggered)
            payload["discard_rule"] = selection.discard_rule
            payload["forced_rule"] = selection.forced
            payload["fallback"] = selection.fallback
            payload["missing_tags"] = selection.missing_tags
        return PlannedEvent(
            id=f"series_registered-{journal_id}", kind="series_registered", payload=payload
        )

    @staticmethod
    def _task_event(planned: PlannedTask, series_uid: str) -> PlannedEvent:
        info = planned.task["info"]
        dispatch = planned.task.get("dispatch") or {}
        payload = {
            "task_id": planned.task_id,
            "series_uid": series_uid,
            "folder": planned.folder.value,
            "action": info["action"],
            "rule": info.get("applied_rule"),
            "triggered_rules": list(info.get("triggered_rules") or {}),
            "targets": list(dispatch.get("target_name") or []),
            "instance_count": _instances(planned.files),
            "placement": planned.placement,
            "task": planned.task,
        }
        return PlannedEvent(
            id=f"task_created-{planned.task_id}", kind="task_created", payload=payload
        )

    def _notifications(
        self,
        journal_id: str,
        series_uid: str,
        selection: Selection | None,
        tasks: list[PlannedTask],
    ) -> list[PlannedEvent]:
        """What the (later) notification sender needs: mercure fires RECEIVED for every
        series-level rule with a webhook or e-mail, and COMPLETED at once for notification
        rules."""
        if selection is None or selection.discard_rule is not None:
            return []
        events: list[PlannedEvent] = []
        task_ids = [planned.task_id for planned in tasks]
        for name in selection.triggered:
            rule = self.config.rules.get(name)
            if rule is None or rule.action_trigger != "series":
                continue
            if not (rule.notification_webhook or rule.notification_email):
                continue
            triggers = []
            if rule.notification_trigger_reception:
                triggers.append("reception")
            if rule.action == "notification" and rule.notification_trigger_completion:
                triggers.append("completion")
            if triggers:
                payload = {
                    "rule": name,
                    "series_uid": series_uid,
                    "triggers": triggers,
                    "task_ids": task_ids,
                }
                events.append(
                    PlannedEvent(
                        id=f"notification_requested-{journal_id}-{name}",
                        kind="notification_requested",
                        payload=payload,
                    )
                )
        return events


# ---------------------------------------------------------------------------- helpers


def _task_id() -> str:
    """A random task id in mercure's 36-character form (uuid4: no host or time in it)."""
    return str(uuid.uuid4())


def _dispatch(targets: list[str]) -> TaskDispatch:
    status = {target: TaskDispatchStatus() for target in targets}
    return TaskDispatch(target_name=list(targets), status=status)


def _placements(drafts: list[_Draft]) -> list[Placement]:
    """One task gets the pairs: link (then unlink = a move). Several: hard links for read-only
    consumers, real copies for processing tasks, whose modules may change their input. The
    orphans' error task has files of its own: linked."""
    sharing = sum(1 for draft in drafts if draft.files is None)
    return [
        "copy"
        if sharing > 1 and draft.files is None and draft.folder == Folder.PROCESSING
        else "link"
        for draft in drafts
    ]


def _instances(files: list[str]) -> int:
    return sum(1 for name in files if name.endswith(".dcm"))


def _orphan_reason(snapshot: Snapshot) -> str:
    names = ", ".join(snapshot.orphans[:MAX_REASONS])
    more = len(snapshot.orphans) - MAX_REASONS
    listed = f"{names} and {more} more" if more > 0 else names
    return (
        f"{len(snapshot.orphans)} file(s) waited more than {snapshot.orphan_after:.0f} s for "
        f"their .dcm/.tags partner (an instance whose storing was interrupted, so the sender "
        f"was not told it was stored): {listed}"
    )


def _no_usable_reason(study: list[str], issues: list[RuleIssue]) -> str:
    unusable = [issue for issue in issues if issue.kind == "unusable"]
    if study and not unusable:
        return f"{STUDY_NOT_IMPLEMENTED} (rules: {', '.join(study)})"
    parts = [
        f"{issue.rule}: {issue.error}"
        for issue in issues
        if issue.kind in ("unusable", "not_implemented")
    ]
    return "no triggered rule can be carried out: " + "; ".join(parts)


def _tag(tags: Mapping[str, Any], keyword: str, default: str | None = MISSING) -> Any:
    value = tags.get(keyword)
    if value is None:
        return default
    return _strip_nul(value if isinstance(value, str) else json.dumps(value))


def _as_text(tags: Mapping[str, Any]) -> dict[str, str]:
    return {
        str(key): value if isinstance(value, str) else json.dumps(value)
        for key, value in tags.items()
    }


def _strip_nul(text: str) -> str:
    return text.replace("\x00", "")


def _storable(value: Any) -> Any:
    """JSON for an event: no NUL characters anywhere (the bookkeeper's databases refuse them)."""
    if isinstance(value, str):
        return _strip_nul(value)
    if isinstance(value, dict):
        return {_strip_nul(str(key)): _storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value
