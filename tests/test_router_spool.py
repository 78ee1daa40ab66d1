"""The router on a real spool: completion, late arrivals, broken input, events, housekeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bookkeeper.payloads import KNOWN_KINDS, check_json
from common.spool import LockOwner, Marker
from router.delivery import OWNER_NAME, TEMP_SUFFIX
from router.hooks import Step
from tests.helpers import wait_until
from tests.test_router_support import base_tags, make_spool, route_rule

RULES = {"ct": route_rule('tags.Modality == "CT"')}


def _dead_owner() -> LockOwner:
    """A lock owner whose process has exited (a real pid, reaped)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    owner = LockOwner.me("router")
    return LockOwner(owner.service, owner.host, int(child.stdout), 1.0, "dead", owner.created)


# ---------------------------------------------------------------------------- completion


def test_a_series_is_routed_only_when_nothing_arrived_for_the_trigger_time(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path, rules=RULES, series_complete_trigger=30)
    spool.add_series("1.2.3", 2)
    router = spool.router()
    try:
        router.tick()
        assert spool.tasks("outgoing") == []
        assert (spool.incoming / "1.2.3").is_dir()
        spool.age("1.2.3", 31)
        stats = router.tick()
    finally:
        router.close()
    assert stats.routed == 1
    assert len(spool.tasks("outgoing")) == 1


def test_an_old_folder_with_a_fresh_file_is_not_complete(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES, series_complete_trigger=30)
    spool.add_series("1.2.3", 2)
    spool.age("1.2.3", 100)
    newest = spool.incoming / "1.2.3" / "1.2.3#1.2.3.2.tags"
    os.utime(newest)  # this file is recent, though the folder is old
    os.utime(spool.incoming / "1.2.3", (time.time() - 100, time.time() - 100))
    spool.route_once()
    assert spool.tasks("outgoing") == []


def test_a_dcm_without_its_side_car_stays_and_is_routed_once_the_side_car_is_there(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 2)
    spool.add("1.2.3", "1.2.3.9", side_car=False)
    spool.route_once()
    [first] = spool.tasks("outgoing")
    assert "1.2.3#1.2.3.9.dcm" not in spool.task_files("outgoing", first["id"])
    assert sorted(p.name for p in (spool.incoming / "1.2.3").iterdir()) == ["1.2.3#1.2.3.9.dcm"]

    spool.route_once()  # still no side-car: nothing happens, nothing is lost
    assert len(spool.tasks("outgoing")) == 1
    spool.add_side_car("1.2.3", "1.2.3.9")
    spool.route_once()
    second = next(t for t in spool.tasks("outgoing") if t["id"] != first["id"])
    assert spool.task_files("outgoing", second["id"]) == [
        "1.2.3#1.2.3.9.dcm",
        "1.2.3#1.2.3.9.tags",
        "task.json",
    ]
    assert not (spool.incoming / "1.2.3").exists()


def test_an_instance_arriving_while_the_series_is_routed_is_not_lost(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 3)

    def late_arrival(step: Step, series_uid: str) -> None:
        if step is Step.SNAPSHOT_TAKEN:
            spool.add("1.2.3", "1.2.3.late")
        if step is Step.SOURCES_REMOVED:
            spool.add("1.2.3", "1.2.3.later")

    spool.route_once(checkpoint=late_arrival)
    [first] = spool.tasks("outgoing")
    assert len(spool.task_files("outgoing", first["id"])) == 7
    left = sorted(p.name for p in (spool.incoming / "1.2.3").iterdir())
    assert left == [
        "1.2.3#1.2.3.late.dcm",
        "1.2.3#1.2.3.late.tags",
        "1.2.3#1.2.3.later.dcm",
        "1.2.3#1.2.3.later.tags",
    ]
    spool.route_once()
    assert len(spool.tasks("outgoing")) == 2
    assert {name: dict(where) for name, where in spool.locations().items()} == {
        f"1.2.3#1.2.3.{n}.dcm": {"outgoing": 1} for n in ("1", "2", "3", "late", "later")
    }


def test_the_router_reads_a_folder_again_only_when_it_changed(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES, series_complete_trigger=0)
    for number in range(5):
        spool.add("1.2.9", f"1.2.9.{number}", side_car=False)  # never routable
    spool.age("1.2.9", 2)
    router = spool.router()
    try:
        router.tick()
        router.tick()
        assert router.scanner.folders_read == 1
        spool.add("1.2.9", "1.2.9.7", side_car=False)  # a new name: read once more
        spool.age("1.2.9", 1)
        router.tick()
        router.tick()
        assert router.scanner.folders_read == 2
    finally:
        router.close()


# ---------------------------------------------------------------------------- broken input


def test_a_broken_side_car_sends_the_series_to_error_once(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 3)
    (spool.incoming / "1.2.3" / "1.2.3#1.2.3.2.tags").write_text('{"Modality": "CT",')
    spool.route_once()
    spool.route_once()
    [task] = spool.tasks("error")
    assert spool.tasks("outgoing") == []
    assert task["info"]["fail_stage"] == "ROUTING"
    reason = task["info"]["fail_reason"]
    assert reason.startswith("1.2.3#1.2.3.2.tags: the side-car is not valid JSON")
    assert "line 1" in reason
    assert len(spool.task_files("error", task["id"])) == 7
    assert not (spool.incoming / "1.2.3").exists()
    [event] = spool.events("series_error")
    assert event.payload["reason"] == reason
    assert event.payload["task_id"] == task["id"]


def test_a_side_car_that_is_not_an_object_or_not_utf8_is_an_error(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 1)
    (spool.incoming / "1.2.3" / "1.2.3#1.2.3.1.tags").write_text("[1, 2]")
    spool.add_series("1.2.4", 1)
    (spool.incoming / "1.2.4" / "1.2.4#1.2.4.1.tags").write_bytes(b'{"Modality": "\xff"}')
    spool.route_once()
    reasons = sorted(task["info"]["fail_reason"] for task in spool.tasks("error"))
    assert reasons == [
        "1.2.3#1.2.3.1.tags: the side-car is not a JSON object but list",
        "1.2.4#1.2.4.1.tags: the side-car is not UTF-8 (byte 14)",
    ]


def test_a_file_that_is_not_dicom_sends_the_series_to_error(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 2)
    (spool.incoming / "1.2.3" / "1.2.3#1.2.3.1.dcm").write_bytes(b"garbage")
    spool.route_once()
    [task] = spool.tasks("error")
    assert task["info"]["fail_reason"] == (
        "1.2.3#1.2.3.1.dcm: not a DICOM file (no 'DICM' prefix after the 128-byte preamble)"
    )
    assert spool.tasks("outgoing") == []


# ---------------------------------------------------------------------------- events and status


def test_routing_records_the_series_and_each_task(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 2)
    spool.route_once()
    [registered] = spool.events("series_registered")
    assert registered.payload["series_uid"] == "1.2.3"
    assert registered.payload["instance_count"] == 2
    assert registered.payload["tags"] == base_tags("1.2.3", "1.2.3.1")
    assert registered.payload["triggered_rules"] == ["ct"]
    [created] = spool.events("task_created")
    [task] = spool.tasks("outgoing")
    assert created.id == f"task_created-{task['id']}"
    assert created.payload["task"] == task
    assert created.payload["targets"] == ["pacs"]
    assert (created.payload["action"], created.payload["folder"]) == ("route", "outgoing")


def test_a_dead_routers_lock_is_recovered_with_an_event(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 2)
    lock = spool.incoming / "1.2.3" / Marker.LOCK
    lock.write_bytes(_dead_owner().to_json())
    spool.route_once()
    assert len(spool.tasks("outgoing")) == 1
    [event] = spool.events("lock_recovered")
    assert event.payload["series_uid"] == "1.2.3"
    assert "is gone" in event.payload["reason"]


def test_a_live_lock_makes_the_router_skip_the_series(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 2)
    (spool.incoming / "1.2.3" / Marker.LOCK).write_bytes(LockOwner.me("router").to_json())
    router = spool.router()
    try:
        stats = router.tick()
    finally:
        router.close()
    assert (stats.ready, stats.busy, stats.routed) == (1, 1, 0)
    assert spool.tasks("outgoing") == []


def test_temporary_task_folders_of_dead_routers_are_removed(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    dead = spool.root / "outgoing" / f".dead{TEMP_SUFFIX}"
    live = spool.root / "processing" / f".live{TEMP_SUFFIX}"
    orphan = spool.root / "success" / f".orphan{TEMP_SUFFIX}"
    for folder in (dead, live, orphan):
        folder.mkdir()
        (folder / "x.dcm").write_bytes(b"x")
    (dead / OWNER_NAME).write_bytes(_dead_owner().to_json())
    (live / OWNER_NAME).write_bytes(LockOwner.me("router").to_json())
    os.utime(orphan, (time.time() - 1000, time.time() - 1000))
    spool.route_once()
    assert not dead.exists()
    assert not orphan.exists()
    assert live.exists()


def test_an_invalid_new_configuration_is_refused_and_the_last_valid_one_kept(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    router = spool.router()
    try:
        spool.config_path.write_text('{"rules": {"x": {"action": "fly"}}}')
        spool.add_series("1.2.3", 1)
        router.tick()
        assert len(spool.tasks("outgoing")) == 1
        status = json.loads((spool.root / "state" / "router" / "status.json").read_text())
        assert "rules.x.action" in status["config"]["error"]

        spool.reconfigure(rules={"mr": route_rule('tags.Modality == "MR"')})
        spool.add_series("1.2.4", 1)
        router.tick()
    finally:
        router.close()
    assert len(spool.tasks("discard")) == 1, "the new rules apply at the next tick"
    status = json.loads((spool.root / "state" / "router" / "status.json").read_text())
    assert status["config"]["error"] is None


def test_an_emptied_folder_left_with_a_dead_lock_is_removed(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    folder = spool.incoming / "1.2.3"
    folder.mkdir()
    (folder / Marker.LOCK).write_bytes(_dead_owner().to_json())
    spool.route_once()
    assert not folder.exists()


def test_a_file_that_never_gets_its_partner_goes_to_error_instead_of_staying_forever(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    spool.add_series("1.2.3", 2)
    spool.add("1.2.3", "1.2.3.lone", side_car=False)
    spool.age("1.2.3", 0.5)
    router = spool.router(orphan_after=1.0)
    try:
        router.tick()
        [task] = spool.tasks("outgoing")
        assert len(spool.task_files("outgoing", task["id"])) == 5
        assert spool.tasks("error") == [], "not an orphan yet"
        spool.age("1.2.3", 0.5)
        router.tick()
        assert spool.tasks("error") == []
        time.sleep(0.6)
        router.tick()  # nothing changed on disk: the cached folder state turns it in
    finally:
        router.close()
    [error] = spool.tasks("error")
    assert spool.task_files("error", error["id"]) == ["1.2.3#1.2.3.lone.dcm", "task.json"]
    assert "waited more than 1 s for their .dcm/.tags partner" in error["info"]["fail_reason"]
    assert not (spool.incoming / "1.2.3").exists()
    [event] = spool.events("series_error")
    assert event.payload["files"] == ["1.2.3#1.2.3.lone.dcm"]


def test_a_large_backlog_is_routed_over_several_short_ticks(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    for number in range(3):
        spool.add_series(f"1.2.{number}", 1)
    router = spool.router(tick_budget=0.0)
    try:
        first = router.tick()
        assert (first.ready, first.routed, first.cut_short) == (3, 1, True)
        router.once()  # drains the rest, tick after tick
    finally:
        router.close()
    assert len(spool.tasks("outgoing")) == 3


def test_the_events_the_bookkeeper_projects_have_its_shapes(tmp_path: Path) -> None:
    rules = {
        "r": route_rule(target=["pacs", "pacs2"]),
        "ai": {"rule": "True", "action": "process", "processing_module": "seg"},
    }
    spool = make_spool(tmp_path, rules=rules)
    spool.add_series("1.2.3", 2)
    spool.add_series("1.2.4", 1)
    (spool.incoming / "1.2.4" / "1.2.4#1.2.4.1.tags").write_text("{")
    spool.route_once()
    events = spool.events()
    assert {"task_update", "task_event"} <= {event.kind for event in events}
    for event in events:
        assert check_json(event.payload) is None
        model = KNOWN_KINDS.get(event.kind)
        if model is not None:
            model.model_validate(event.payload)
    updates = {e.payload["task_id"]: e.payload for e in events if e.kind == "task_update"}
    statuses = sorted(update["status"] for update in updates.values())
    assert statuses == ["error", "routed", "routed"]
    [outgoing] = spool.tasks("outgoing")
    assert updates[outgoing["id"]]["target"] == "pacs, pacs2"
    assert updates[outgoing["id"]]["rule"] == "r"
    assert updates[outgoing["id"]]["data"] == outgoing
    errors = [e.payload for e in events if e.kind == "task_event" and e.payload["event"] == "ERROR"]
    assert len(errors) == 1 and "not valid JSON" in errors[0]["info"]


# ---------------------------------------------------------------------------- waking up


def test_the_scan_notes_when_the_next_series_becomes_complete(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES, series_complete_trigger=30)
    spool.add_series("1.2.3", 2)
    spool.add_series("1.2.4", 1)
    spool.age("1.2.3", 10)  # complete in 20 s
    spool.age("1.2.4", 25)  # complete in 5 s: the next one
    router = spool.router()
    try:
        assert router.tick().ready == 0
        last_file = (spool.incoming / "1.2.4").stat().st_mtime
        assert router.scanner.next_due is not None
        assert abs(router.scanner.next_due - (last_file + 30)) < 0.01
        spool.age("1.2.4", 31)
        spool.age("1.2.3", 31)
        assert router.tick().routed == 2
        assert router.scanner.next_due is None  # nothing left to wait for
    finally:
        router.close()


def test_a_running_router_routes_a_series_once_it_is_complete_not_at_its_next_scan(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path, rules=RULES, series_complete_trigger=1, router_scan_interval=60)
    spool.add_series("1.2.3", 1)
    spool.age("1.2.3", 5)
    router = spool.router()
    runner = threading.Thread(target=router.run)
    runner.start()
    try:
        wait_until(lambda: spool.tasks("outgoing"), timeout=20, what="the first series")
        spool.add_series("1.2.4", 2)  # while the router sleeps
        wait_until(
            lambda: len(spool.tasks("outgoing")) == 2,
            timeout=20,  # far below the 60 s scan interval the router would otherwise wait
            what="the second series to be routed",
        )
    finally:
        router.stop()
        runner.join(timeout=30)
        router.close()
    assert not runner.is_alive()
