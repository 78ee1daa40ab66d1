"""What happens to a processed task: the module's ``__mercure_routing`` and
``__mercure_notification`` (mercure §4.2, ``apply_dynamic_routing``).

Dynamic routing applies only when the task's rule has ``dynamic_routing`` on, and only the
last module's ``result.json`` counts (as in mercure):

* ``{"discard": true}``: nothing is dispatched; the result goes to ``discard/``.
* ``{"use_alternate_target": true}``: the rule's ``conditional_alternate_target`` replaces the
  targets.
* ``{"target": "name"}`` or ``{"target": ["a", "b"]}``: these targets replace the rule's, each
  only if it is in the rule's ``dynamic_routing_allowed_targets`` **and** configured; an
  empty allow-list allows nothing. Names refused are reported and skipped; when none is left
  the rule's own targets stay.

Anything not applied is reported (``dynamic_routing_ignored``), never silently dropped.
A completion notification is requested when the task ends here (nothing to dispatch), its rule
notifies on completion (a webhook or e-mail is set) and — with
``notification_trigger_completion_on_request`` — a module's output asked for it with
``{"__mercure_notification": {"requested": true, "text": "..."}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from common.config import Config, Rule
from common.task import Task, TaskDispatch

ROUTING_KEY: Final = "__mercure_routing"
NOTIFICATION_KEY: Final = "__mercure_notification"
KNOWN_KEYS: Final = frozenset({"target", "discard", "use_alternate_target"})


@dataclass
class RoutingDecision:
    folder: str
    """``outgoing``, ``success`` or ``discard``."""
    ignored: list[str] = field(default_factory=list)
    """Why parts of the module's routing request were not applied."""
    notification: str | None = None
    """The text of a completion notification to request, if one is due."""


def decide_routing(task: Task, config: Config) -> RoutingDecision:
    """Apply the module's routing request to ``task`` (in place) and say where it goes."""
    steps = task.processing_steps
    last = steps[-1].output if steps else None
    rule = config.rules.get(task.info.applied_rule or "")
    decision = RoutingDecision(folder="success")
    request = last.get(ROUTING_KEY) if isinstance(last, dict) else None
    discard = False
    if request is not None:
        discard = _apply_request(task, rule, request, config, decision.ignored)
    targets = task.dispatch.target_name if task.dispatch is not None else []
    if discard:
        decision.folder = "discard"
    elif targets:
        decision.folder = "outgoing"
    else:
        decision.notification = _completion_notification(task, rule)
    return decision


def _apply_request(
    task: Task, rule: Rule | None, request: Any, config: Config, ignored: list[str]
) -> bool:
    """Apply ``__mercure_routing``; True when it discards the result."""
    name = task.info.applied_rule or ""
    if rule is None or not rule.dynamic_routing:
        ignored.append(f"{ROUTING_KEY} ignored: rule {name!r} does not allow dynamic routing")
        return False
    if not isinstance(request, dict):
        ignored.append(f"{ROUTING_KEY} ignored: must be an object, not {type(request).__name__}")
        return False
    unknown = sorted(set(request) - KNOWN_KEYS)
    if unknown:
        ignored.append(f"{ROUTING_KEY}: unknown keys ignored: {', '.join(map(repr, unknown))}")
    if request.get("discard") is True:
        return True
    if request.get("use_alternate_target") is True:
        alternate = rule.conditional_alternate_target
        if alternate and alternate in config.targets:
            _set_targets(task, [alternate])
        else:
            ignored.append(
                f"{ROUTING_KEY}: use_alternate_target ignored: rule {name!r} has no configured "
                "conditional_alternate_target"
            )
        return False
    if "target" in request:
        _apply_targets(task, rule, request["target"], config, ignored)
    return False


def _apply_targets(task: Task, rule: Rule, wanted: Any, config: Config, ignored: list[str]) -> None:
    """``{"target": ...}``: the allowed, configured names replace the rule's targets."""
    name = task.info.applied_rule or ""
    names = [wanted] if isinstance(wanted, str) else wanted
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        ignored.append(f"{ROUTING_KEY}: target must be a name or a list of names")
        return
    if not names:
        ignored.append(f"{ROUTING_KEY}: target is empty; the rule's targets stay")
        return
    allowed = set(rule.dynamic_routing_allowed_targets)
    accepted = [n for n in dict.fromkeys(names) if n in allowed and n in config.targets]
    refused = [n for n in dict.fromkeys(names) if n not in accepted]
    if refused:
        ignored.append(
            f"{ROUTING_KEY}: targets {', '.join(repr(n) for n in refused)} refused "
            f"(not in rule {name!r}'s dynamic_routing_allowed_targets or not configured)"
        )
    if accepted:
        _set_targets(task, accepted)


def _set_targets(task: Task, targets: list[str]) -> None:
    dispatch = task.dispatch if task.dispatch is not None else TaskDispatch()
    dispatch.target_name = targets
    dispatch.status = {k: v for k, v in dispatch.status.items() if k in targets}
    task.dispatch = dispatch


def _completion_notification(task: Task, rule: Rule | None) -> str | None:
    if rule is None or not rule.notification_trigger_completion:
        return None
    if not (rule.notification_webhook or rule.notification_email):
        return None
    requested = [
        step.output[NOTIFICATION_KEY]
        for step in task.processing_steps
        if isinstance(step.output, dict) and isinstance(step.output.get(NOTIFICATION_KEY), dict)
    ]
    if rule.notification_trigger_completion_on_request:
        requested = [item for item in requested if item.get("requested") is True]
        if not requested:
            return None
    texts = [str(item.get("text", "")) for item in requested if item.get("text")]
    return "\n".join(texts)
