"""The router as a real process: kill -9 at every step, two routers on one spool, stopping.

The router kills or pauses itself at a named step through its own test hook
(``CADUCEUS_ROUTER_TEST_HOOK``, :mod:`router.hooks`); nothing of it is patched.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from common import exitcodes
from tests.helpers import wait_until
from tests.test_router_support import (
    RouterProcess,
    Spool,
    make_spool,
    route_rule,
    run_router_once,
    start_router,
)

RULES = {
    "route": route_rule(target="pacs"),
    "ai": {"rule": "True", "action": "both", "target": "pacs2", "processing_module": "seg"},
}
"""Two tasks per series (outgoing and processing): every step happens at least twice."""
SERIES = ("1.2.3", "1.2.4")
STEPS = [
    "locked",
    "snapshot_taken",
    "journal_written",
    "files_placed",
    "task_written",
    "task_delivered",
    "files_placed#2",
    "task_written#2",
    "task_delivered#2",
    "events_recorded",
    "sources_removed",
    "journal_removed",
    "task_delivered#3",  # the second series, first task
]


def _wait_for_log(router: RouterProcess, text: str) -> None:
    wait_until(lambda: text in router.log(), timeout=30, what=f"{text!r} in the router log")


def _visible_tasks_are_complete(spool: Spool, instances: int) -> None:
    """What a consumer can see is never half a task."""
    for folder in ("outgoing", "processing"):
        for task in spool.tasks(folder):
            names = spool.task_files(folder, task["id"])
            assert len(names) == 2 * instances + 1, f"{folder}/{task['id']} is incomplete"


def _assert_routed_exactly_once(spool: Spool, sops: dict[str, list[str]]) -> None:
    locations = spool.locations()
    for series_uid, series_sops in sops.items():
        for sop in series_sops:
            where = dict(locations.get(f"{series_uid}#{sop}.dcm", {}))
            assert where == {"outgoing": 1, "processing": 1}, f"{sop}: {where}"
    assert spool.leftovers() == []
    assert [p.name for p in spool.incoming.iterdir()] == [".tmp"]
    assert len(spool.tasks("outgoing")) == len(sops)
    assert len(spool.tasks("processing")) == len(sops)
    created = spool.events("task_created")
    assert len(created) == 2 * len(sops), "each task recorded once, also when redone"


@pytest.mark.parametrize("step", STEPS)
def test_a_router_killed_at_any_step_loses_and_duplicates_nothing(
    tmp_path: Path, step: str
) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    sops = {series_uid: spool.add_series(series_uid, 3) for series_uid in SERIES}

    killed = start_router(spool, hook=f"{step}:kill", name="killed")
    assert killed.wait() == -signal.SIGKILL, killed.log()[-3000:]
    _visible_tasks_are_complete(spool, 3)

    assert run_router_once(spool) == exitcodes.EX_OK
    _assert_routed_exactly_once(spool, sops)
    assert len(spool.events("lock_recovered")) == 1


def test_two_routers_on_one_spool_route_each_series_exactly_once(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules={"route": route_rule()}, router_scan_interval=0.01)
    sops = {f"1.2.{n}": spool.add_series(f"1.2.{n}", 2) for n in range(40)}
    routers = [start_router(spool, name=f"router-{n}") for n in (1, 2)]
    wait_until(
        lambda: [p.name for p in spool.incoming.iterdir()] == [".tmp"],
        timeout=60,
        what="incoming/ to empty",
    )
    for router in routers:
        router.signal(signal.SIGTERM)
    assert [router.wait() for router in routers] == [0, 0]
    tasks = spool.tasks("outgoing")
    assert sorted(task["info"]["uid"] for task in tasks) == sorted(sops)
    locations = spool.locations()
    for series_uid, series_sops in sops.items():
        for sop in series_sops:
            assert dict(locations[f"{series_uid}#{sop}.dcm"]) == {"outgoing": 1}
    assert spool.leftovers() == []


def test_sigterm_finishes_the_series_in_progress_then_exits_0(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    for series_uid in SERIES:
        spool.add_series(series_uid, 2)
    hook = tmp_path / "hook"
    router = start_router(spool, hook=f"task_written:pause:{hook}")
    wait_until((hook / "task_written.reached").exists, timeout=30, what="the pause")
    router.signal(signal.SIGTERM)
    _wait_for_log(router, "SIGTERM received")  # handled while paused mid-series
    (hook / "task_written.go").touch()
    assert router.wait(timeout=30) == exitcodes.EX_OK
    routed = (hook / "task_written.reached").read_text()
    other = next(uid for uid in SERIES if uid != routed)
    assert not (spool.incoming / routed).exists(), "the series in progress was finished"
    assert (spool.incoming / other).is_dir(), "no new series was started after SIGTERM"
    assert [task["info"]["uid"] for task in spool.tasks("outgoing")] == [routed]
    assert spool.leftovers() == []


def test_a_second_sigterm_exits_at_once_and_a_restart_finishes_the_work(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path, rules=RULES)
    sops = {series_uid: spool.add_series(series_uid, 2) for series_uid in SERIES}
    hook = tmp_path / "hook"
    router = start_router(spool, hook=f"files_placed:pause:{hook}")
    wait_until((hook / "files_placed.reached").exists, timeout=30, what="the pause")
    router.signal(signal.SIGTERM)
    _wait_for_log(router, "SIGTERM received")
    router.signal(signal.SIGTERM)
    assert router.wait(timeout=30) == exitcodes.EX_INTERRUPTED
    assert run_router_once(spool) == exitcodes.EX_OK
    _assert_routed_exactly_once(spool, sops)


def test_an_idle_router_stops_promptly_on_sigterm(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, rules=RULES, router_scan_interval=30)
    router = start_router(spool)
    status = spool.root / "state" / "router" / "status.json"
    wait_until(status.exists, timeout=30, what="the router to start")
    started = time.monotonic()
    router.signal(signal.SIGTERM)
    assert router.wait(timeout=10) == exitcodes.EX_OK
    assert time.monotonic() - started < 5
    assert json.loads(status.read_text())["config"]["error"] is None


def test_an_invalid_configuration_exits_with_ex_config(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    spool.config_path.write_text('{"router_scan_interval": 0}')
    assert run_router_once(spool) == exitcodes.EX_CONFIG
