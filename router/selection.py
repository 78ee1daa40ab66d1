"""Which rules a series triggers (mercure §3.4 semantics), as pure functions of config and tags.

Contracts (``docs/router.md``, "Rule semantics"):

* Every enabled, non-fallback rule is evaluated in the configuration's order on the tags of the
  series' first instance; every true rule triggers (rules are not exclusive).
* A triggered ``discard`` rule stops the evaluation: later rules are not evaluated and the series
  is discarded even when other rules triggered before it.
* The fallback rule (the last enabled rule marked ``fallback``) is evaluated only when nothing
  else triggered, and triggers only when it is itself true.
* ``disabled`` rules are skipped.
* The tag ``mercureForceRule`` names a rule that triggers unconditionally; no other rule is
  evaluated. A name that is not a rule is an issue (the series cannot be routed).
* A missing tag makes a rule false. An invalid rule, or one that fails on these tags, is false
  and reported as a :class:`RuleIssue`; the other rules are evaluated as usual.

Rules are evaluated by :mod:`common.rules` (a checked interpreter over ``ast``), never ``eval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from common.config import Rule
from common.rules import RuleError, compile_rule

FORCE_RULE_TAG: Final = "mercureForceRule"
"""Tag set by mercure's query and upload tools to force one rule (mercure §3.4)."""

IssueKind = Literal["invalid", "failed", "unknown_forced", "unusable", "not_implemented"]


@dataclass(frozen=True)
class RuleIssue:
    """A rule that could not be evaluated or acted on, with a reason for the GUI."""

    rule: str
    kind: IssueKind
    """``invalid``: the rule text is refused; ``failed``: it raised on these tags;
    ``unknown_forced``: ``mercureForceRule`` names no rule; ``unusable``: it triggered but names
    no (or an unknown) target or module; ``not_implemented``: a study-level rule triggered."""
    error: str


@dataclass(frozen=True)
class Selection:
    """The outcome of evaluating every rule for one series."""

    triggered: tuple[str, ...] = ()
    """Every rule that triggered, in evaluation order (a forced or fallback rule alone)."""
    discard_rule: str | None = None
    """The triggered ``discard`` rule that decided the series' fate, if any."""
    forced: str | None = None
    """The rule named by ``mercureForceRule``, if the tag was set."""
    fallback: bool = False
    """True when the fallback rule is what triggered."""
    issues: tuple[RuleIssue, ...] = ()
    missing_tags: dict[str, str] = field(default_factory=dict)
    """Rule -> the tag whose absence made it false (for the series event)."""


def select_rules(rules: Mapping[str, Rule], tags: Mapping[str, str]) -> Selection:
    """Evaluate ``rules`` (in order) against ``tags`` with mercure's semantics (module doc)."""
    forced = tags.get(FORCE_RULE_TAG)
    if isinstance(forced, str) and forced.strip():
        return _forced(rules, forced.strip())
    triggered: list[str] = []
    issues: list[RuleIssue] = []
    missing: dict[str, str] = {}
    fallback: str | None = None
    for name, rule in rules.items():
        if rule.disabled:
            continue
        if rule.fallback:
            fallback = name  # the last one marked wins (mercure)
            continue
        if _evaluate(name, rule, tags, issues, missing):
            triggered.append(name)
            if rule.action == "discard":
                return Selection(tuple(triggered), name, issues=tuple(issues), missing_tags=missing)
    if not triggered and fallback is not None:
        rule = rules[fallback]
        if _evaluate(fallback, rule, tags, issues, missing):
            discard = fallback if rule.action == "discard" else None
            return Selection((fallback,), discard, None, True, tuple(issues), missing)
    return Selection(tuple(triggered), issues=tuple(issues), missing_tags=missing)


def _forced(rules: Mapping[str, Rule], name: str) -> Selection:
    rule = rules.get(name)
    if rule is None:
        issue = RuleIssue(
            name, "unknown_forced", f"{FORCE_RULE_TAG} names rule {name!r}, which does not exist"
        )
        return Selection(forced=name, issues=(issue,))
    discard = name if rule.action == "discard" else None
    return Selection((name,), discard, forced=name)


def _evaluate(
    name: str,
    rule: Rule,
    tags: Mapping[str, str],
    issues: list[RuleIssue],
    missing: dict[str, str],
) -> bool:
    try:
        compiled = compile_rule(rule.rule)
    except RuleError as exc:
        issues.append(RuleIssue(name, "invalid", f"invalid rule: {exc}"))
        return False
    result = compiled.evaluate(tags)
    if result.error is not None:
        issues.append(RuleIssue(name, "failed", result.error))
        return False
    if result.missing_tag is not None:
        missing[name] = result.missing_tag
    return result.triggered


def invalid_rules(rules: Mapping[str, Rule]) -> list[RuleIssue]:
    """Enabled rules whose text is refused, without evaluating anything (checked at each
    configuration load, so the GUI shows them before any series arrives)."""
    issues: list[RuleIssue] = []
    for name, rule in rules.items():
        if rule.disabled:
            continue
        try:
            compile_rule(rule.rule)
        except RuleError as exc:
            issues.append(RuleIssue(name, "invalid", f"invalid rule: {exc}"))
    return issues
