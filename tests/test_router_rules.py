"""Rule semantics, table-driven against mercure's documented behaviour (mercure §3.4, §2.2).

The first table checks which rules trigger (``router.selection.select_rules``). The second runs
the router on a real spool and checks the tasks each situation creates (folders, task.json,
targets, files, moves versus copies).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.config import Rule
from common.task import read_task
from router.selection import FORCE_RULE_TAG, select_rules
from tests.test_router_support import Spool, base_tags, make_spool, route_rule

CT = base_tags("1.2.3", "1.2.3.1")
MR = base_tags("1.2.3", "1.2.3.1", Modality="MR")


@dataclass(frozen=True)
class Case:
    name: str
    rules: dict[str, dict[str, Any]]
    tags: dict[str, str]
    triggered: tuple[str, ...]
    discard: str | None = None
    issues: tuple[tuple[str, str], ...] = ()
    """(rule, kind) of every issue reported."""
    fallback: bool = False
    missing: dict[str, str] = field(default_factory=dict)


R_CT = {"rule": 'tags.Modality == "CT"'}
R_MR = {"rule": 'tags.Modality == "MR"'}
TRUE = {"rule": "True"}
DISCARD = {"rule": "True", "action": "discard"}

SELECTION_CASES = [
    Case("a true rule triggers", {"ct": R_CT, "mr": R_MR}, CT, ("ct",)),
    Case("no true rule triggers nothing", {"mr": R_MR}, CT, ()),
    Case("rules are not exclusive", {"a": R_CT, "b": TRUE, "c": R_MR}, CT, ("a", "b")),
    Case(
        "a triggered discard rule stops the evaluation",
        {"a": R_CT, "d": DISCARD, "later": TRUE, "broken": {"rule": "tags.X =="}},
        CT,
        ("a", "d"),
        discard="d",
    ),
    Case(
        "a discard rule that is false does nothing",
        {"d": {**R_MR, "action": "discard"}, "a": R_CT},
        CT,
        ("a",),
    ),
    Case(
        "the fallback rule is not used when another rule triggered",
        {"fb": {**TRUE, "fallback": True}, "a": R_CT},
        CT,
        ("a",),
    ),
    Case(
        "the fallback rule triggers when nothing else did",
        {"fb": {**TRUE, "fallback": True}, "a": R_MR},
        CT,
        ("fb",),
        fallback=True,
    ),
    Case(
        "the fallback rule must itself be true",
        {"fb": {**R_MR, "fallback": True}, "a": R_MR},
        CT,
        (),
    ),
    Case(
        "the last fallback rule wins",
        {"fb1": {**TRUE, "fallback": True}, "fb2": {**TRUE, "fallback": True}},
        CT,
        ("fb2",),
        fallback=True,
    ),
    Case(
        "a fallback discard rule discards",
        {"fb": {**DISCARD, "fallback": True}, "a": R_MR},
        CT,
        ("fb",),
        discard="fb",
        fallback=True,
    ),
    Case("a disabled rule is skipped", {"a": {**TRUE, "disabled": True}, "b": R_CT}, CT, ("b",)),
    Case(
        "a disabled fallback rule is not used",
        {"fb": {**TRUE, "fallback": True, "disabled": True}},
        CT,
        (),
    ),
    Case(
        "mercureForceRule forces the named rule and skips the others",
        {"a": R_CT, "forced": {"rule": "False"}, "d": DISCARD},
        {**CT, FORCE_RULE_TAG: "forced"},
        ("forced",),
    ),
    Case(
        "mercureForceRule naming no rule is an issue",
        {"a": R_CT},
        {**CT, FORCE_RULE_TAG: "nope"},
        (),
        issues=(("nope", "unknown_forced"),),
    ),
    Case(
        "an invalid rule is reported and the others still trigger",
        {"bad": {"rule": 'tags.Modality == "CT" and'}, "a": R_CT},
        CT,
        ("a",),
        issues=(("bad", "invalid"),),
    ),
    Case(
        "a rule failing on these tags is reported and the others still trigger",
        {"bad": {"rule": "float(tags.PatientName) > 1"}, "a": R_CT},
        CT,
        ("a",),
        issues=(("bad", "failed"),),
    ),
    Case(
        "a missing tag makes a rule false, not an error",
        {"m": {"rule": 'tags.BodyPartExamined == "HEAD"'}, "a": R_CT},
        CT,
        ("a",),
        missing={"m": "BodyPartExamined"},
    ),
    Case(
        "mercure's @Tag@ macro and string methods work",
        {"m": {"rule": '"axial" in @SeriesDescription@.lower()'}},
        CT,
        ("m",),
    ),
    Case(
        "a @Tag@ macro of a missing tag makes the rule false",
        {"m": {"rule": '@BodyPartExamined@ == "HEAD" or True'}},
        CT,
        (),
        missing={"m": "BodyPartExamined"},
    ),
]


@pytest.mark.parametrize("case", SELECTION_CASES, ids=lambda case: case.name)
def test_rule_selection_follows_mercure(case: Case) -> None:
    rules = {name: Rule.model_validate(fields) for name, fields in case.rules.items()}
    selection = select_rules(rules, case.tags)
    assert selection.triggered == case.triggered
    assert selection.discard_rule == case.discard
    assert tuple((issue.rule, issue.kind) for issue in selection.issues) == case.issues
    assert selection.fallback is case.fallback
    assert selection.missing_tags == case.missing


# ---------------------------------------------------------------------------- tasks on a spool


def _route(tmp_path: Path, rules: dict[str, Any], tags: dict[str, str] | None = None) -> Spool:
    spool = make_spool(tmp_path, rules=rules)
    spool.add_series("1.2.3", 2, **(tags or {}))
    spool.route_once()
    return spool


def test_a_route_rule_moves_the_series_into_one_outgoing_task(tmp_path: Path) -> None:
    spool = _route(tmp_path, {"ct": route_rule('tags.Modality == "CT"')})
    [task] = spool.tasks("outgoing")
    assert task["info"]["action"] == "route"
    assert task["info"]["applied_rule"] == ""
    assert task["info"]["triggered_rules"] == {"ct": True}
    assert task["info"]["uid"] == "1.2.3"
    assert task["info"]["uid_type"] == "series"
    assert task["info"]["patient_name"] == "Doe^Jane"
    assert task["info"]["mrn"] == "PID-1"
    assert task["info"]["acc"] == "ACC-1"
    assert task["info"]["sender_aet"] == "TESTSCU"
    assert task["dispatch"]["target_name"] == ["pacs"]
    assert task["dispatch"]["status"]["pacs"]["state"] == "waiting"
    assert task["process"] == {}
    assert spool.task_files("outgoing", task["id"]) == [
        "1.2.3#1.2.3.1.dcm",
        "1.2.3#1.2.3.1.tags",
        "1.2.3#1.2.3.2.dcm",
        "1.2.3#1.2.3.2.tags",
        "task.json",
    ]
    assert not (spool.incoming / "1.2.3").exists()
    dcm = spool.root / "outgoing" / task["id"] / "1.2.3#1.2.3.1.dcm"
    assert os.stat(dcm).st_nlink == 1, "a single task gets the files moved, not copied"
    read_task(spool.root / "outgoing" / task["id"] / "task.json")  # valid for the dispatcher


def test_route_rules_sharing_targets_make_one_task_with_the_union(tmp_path: Path) -> None:
    rules = {
        "r1": route_rule(target="pacs"),
        "r2": route_rule(target=["pacs", "pacs2"]),
        "r3": route_rule(target=["archive"]),
    }
    spool = _route(tmp_path, rules)
    [task] = spool.tasks("outgoing")
    assert task["dispatch"]["target_name"] == ["pacs", "pacs2", "archive"]
    assert sorted(task["dispatch"]["status"]) == ["archive", "pacs", "pacs2"]
    assert task["info"]["triggered_rules"] == {"r1": True, "r2": True, "r3": True}
    assert spool.tasks("processing") == []


def test_a_both_rule_gets_its_own_processing_task_with_merged_settings(tmp_path: Path) -> None:
    rules = {
        "route": route_rule(target="pacs"),
        "ai": {
            "rule": "True",
            "action": "both",
            "target": ["pacs2"],
            "processing_module": "seg",
            "processing_settings": {"threshold": 0.7},
            "processing_retain_images": True,
            "priority": "urgent",
        },
    }
    spool = _route(tmp_path, rules)
    [outgoing] = spool.tasks("outgoing")
    [processing] = spool.tasks("processing")
    assert outgoing["dispatch"]["target_name"] == ["pacs"]
    assert outgoing["info"]["triggered_rules"] == {"route": True}
    info = processing["info"]
    assert (info["action"], info["applied_rule"]) == ("both", "ai")
    assert info["triggered_rules"] == {"route": True, "ai": True}
    assert processing["dispatch"]["target_name"] == ["pacs2"]
    step = processing["process"]
    assert step["module_name"] == "seg"
    assert step["settings"] == {"threshold": 0.7, "mode": "fast"}
    assert step["retain_input_images"] is True
    assert step["module_config"]["docker_tag"] == "example/seg:1"
    # Several tasks: the outgoing one gets hard links, the processing one its own copies.
    name = "1.2.3#1.2.3.1.dcm"
    out_file = spool.root / "outgoing" / outgoing["id"] / name
    proc_file = spool.root / "processing" / processing["id"] / name
    assert out_file.read_bytes() == proc_file.read_bytes()
    assert os.stat(out_file).st_ino != os.stat(proc_file).st_ino
    assert not (spool.incoming / "1.2.3").exists()


def test_a_process_chain_gets_settings_per_step(tmp_path: Path) -> None:
    rules = {
        "chain": {
            "rule": "True",
            "action": "process",
            "processing_module": ["anon", "seg"],
            "processing_settings": [{"keep": []}, {"mode": "slow"}],
        }
    }
    spool = _route(tmp_path, rules)
    [task] = spool.tasks("processing")
    assert task["dispatch"] == {}
    anon, seg = task["process"]
    assert (anon["module_name"], anon["settings"]) == ("anon", {"keep": []})
    assert (seg["module_name"], seg["settings"]) == ("seg", {"threshold": 0.5, "mode": "slow"})


def test_two_process_rules_get_a_task_each(tmp_path: Path) -> None:
    rules = {
        "p1": {"rule": "True", "action": "process", "processing_module": "seg"},
        "p2": {"rule": "True", "action": "process", "processing_module": "anon"},
    }
    spool = _route(tmp_path, rules)
    tasks = spool.tasks("processing")
    assert sorted(task["info"]["applied_rule"] for task in tasks) == ["p1", "p2"]
    for task in tasks:
        assert len(spool.task_files("processing", task["id"])) == 5


def test_notification_only_rules_send_the_series_to_success(tmp_path: Path) -> None:
    rules = {
        "tell": {
            "rule": "True",
            "action": "notification",
            "notification_webhook": "http://example.invalid/hook",
        }
    }
    spool = _route(tmp_path, rules)
    [task] = spool.tasks("success")
    assert (task["info"]["action"], task["info"]["applied_rule"]) == ("notification", "tell")
    assert len(spool.task_files("success", task["id"])) == 5
    [event] = spool.events("notification_requested")
    assert event.payload["rule"] == "tell"
    assert event.payload["triggers"] == ["reception", "completion"]


def test_a_notification_rule_beside_a_route_rule_adds_no_task(tmp_path: Path) -> None:
    rules = {"tell": {"rule": "True", "action": "notification"}, "r": route_rule()}
    spool = _route(tmp_path, rules)
    assert len(spool.tasks("outgoing")) == 1
    assert spool.tasks("success") == []


def test_a_discard_rule_wins_over_rules_that_triggered_before_it(tmp_path: Path) -> None:
    rules = {"r": route_rule(), "d": {"rule": "True", "action": "discard"}}
    spool = _route(tmp_path, rules)
    assert spool.tasks("outgoing") == []
    [task] = spool.tasks("discard")
    assert task["info"]["action"] == "discard"
    assert task["info"]["applied_rule"] == "d"
    assert task["info"]["triggered_rules"] == {"r": True, "d": True}
    assert len(spool.task_files("discard", task["id"])) == 5


def test_a_series_no_rule_wants_is_discarded(tmp_path: Path) -> None:
    spool = _route(tmp_path, {"mr": route_rule('tags.Modality == "MR"')})
    [task] = spool.tasks("discard")
    assert task["info"]["applied_rule"] is None
    assert task["info"]["triggered_rules"] == {}
    assert not (spool.incoming / "1.2.3").exists()


def test_an_invalid_rule_is_reported_and_does_not_stop_the_others(tmp_path: Path) -> None:
    rules = {
        "broken": route_rule("tags.Modality ==", target="pacs2"),
        "failing": route_rule("int(tags.PatientName) == 1", target="archive"),
        "good": route_rule(),
    }
    spool = _route(tmp_path, rules)
    [task] = spool.tasks("outgoing")
    assert task["dispatch"]["target_name"] == ["pacs"]
    errors = {event.payload["rule"]: event.payload for event in spool.events("rule_error")}
    assert errors["broken"]["kind"] == "invalid"
    assert errors["broken"]["series_uid"] is None  # reported when the configuration loads
    assert errors["failing"]["kind"] == "failed"
    assert errors["failing"]["series_uid"] == "1.2.3"
    assert "ValueError" in errors["failing"]["error"]
    status = (spool.root / "state" / "router" / "status.json").read_text()
    assert '"broken"' in status and '"failing"' in status


def test_mercure_force_rule_routes_by_the_named_rule_only(tmp_path: Path) -> None:
    rules = {"normal": route_rule(target="pacs"), "forced": route_rule("False", target="archive")}
    spool = _route(tmp_path, rules, {FORCE_RULE_TAG: "forced"})
    [task] = spool.tasks("outgoing")
    assert task["dispatch"]["target_name"] == ["archive"]
    assert task["info"]["triggered_rules"] == {"forced": True}


def test_a_force_rule_naming_no_rule_sends_the_series_to_error(tmp_path: Path) -> None:
    spool = _route(tmp_path, {"normal": route_rule()}, {FORCE_RULE_TAG: "ghost"})
    [task] = spool.tasks("error")
    assert task["info"]["fail_stage"] == "ROUTING"
    assert "ghost" in task["info"]["fail_reason"]
    assert spool.tasks("outgoing") == []


def test_study_rules_are_not_acted_on_but_the_series_rules_are(tmp_path: Path) -> None:
    rules = {"study": {**route_rule(), "action_trigger": "study"}, "series": route_rule()}
    spool = _route(tmp_path, rules)
    [task] = spool.tasks("outgoing")
    assert task["info"]["triggered_rules"] == {"series": True}
    [error] = spool.events("rule_error")
    assert (error.payload["rule"], error.payload["kind"]) == ("study", "not_implemented")
    assert spool.tasks("studies") == []


def test_a_series_only_study_rules_want_goes_to_error_with_the_reason(tmp_path: Path) -> None:
    spool = _route(tmp_path, {"study": {**route_rule(), "action_trigger": "study"}})
    [task] = spool.tasks("error")
    assert task["info"]["fail_stage"] == "ROUTING"
    assert task["info"]["fail_reason"].startswith("study-level rules not implemented yet")
    assert len(spool.task_files("error", task["id"])) == 5


def test_a_forced_rule_without_a_target_is_reported_and_the_series_kept(tmp_path: Path) -> None:
    rules = {"empty": {"rule": "True", "action": "route", "target": "", "disabled": True}}
    spool = _route(tmp_path, rules, {FORCE_RULE_TAG: "empty"})
    [task] = spool.tasks("error")
    assert "no target" in task["info"]["fail_reason"]
    [error] = spool.events("rule_error")
    assert error.payload["kind"] == "unusable"
