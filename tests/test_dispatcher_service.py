"""The dispatcher service: readiness, HALT, priorities, several instances, crashes and signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from common import exitcodes
from common.spool import LockOwner
from common.task import write_task
from common.wakeup import FolderWatch
from dispatcher.events import DispatchEvents
from dispatcher.queue import Candidate, Scheduler, TaskCache, scan, task_priority
from dispatcher.service import DispatcherService
from dispatcher.settings import DispatcherSettings
from tests import dicom_factory
from tests.dicom_factory import Instance
from tests.dispatcher_helpers import (
    dicom_target,
    dispatcher_config,
    dispatcher_events,
    dispatcher_processes,
    load,
    make_task,
    scp_peer,
    start_dispatcher,
    task_in,
    write_config,
)
from tests.helpers import wait_until

DUMMY = {"target_type": "dummy"}


def small_series(folder: Path, seed: str, count: int) -> list[Instance]:
    return dicom_factory.ct_series(folder / seed, count, seed=seed, rows=32, columns=32)


def slow(seconds: float) -> object:
    """An SCP answer that stores every instance after ``seconds``."""

    def answer(_n: int) -> int:
        time.sleep(seconds)
        return 0

    return answer


def outgoing_of(data_root: Path) -> Path:
    folder = data_root / "outgoing"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def service_for(config: dict[str, object]) -> DispatcherService:
    loaded = load(config)
    loaded.spool_paths().create()
    return DispatcherService(loaded, events=DispatchEvents.open(loaded.spool_paths().state))


# ---------------------------------------------------------------------------- readiness


def test_halt_suspends_picking_tasks(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    series = small_series(tmp_path, "halt", 2)
    make_task(outgoing_of(data_root), "task-1", series, ["void"])
    (data_root / "outgoing" / "HALT").touch()
    config = dispatcher_config(data_root, {"void": DUMMY})

    service_for(config).once()
    assert (data_root / "outgoing" / "task-1").is_dir()

    (data_root / "outgoing" / "HALT").unlink()
    service_for(config).once()
    assert (data_root / "success" / "task-1").is_dir()


def test_folders_being_written_or_claimed_are_not_ready(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    outgoing = outgoing_of(data_root)
    series = small_series(tmp_path, "ready", 1)
    for name in ("written", "claimed", "hidden", "ready"):
        make_task(outgoing, name, series, ["void"])
    (outgoing / "written" / ".lock").touch()
    (outgoing / "claimed" / ".processing").write_bytes(LockOwner.me("dispatcher").to_json())
    (outgoing / "hidden").rename(outgoing / ".hidden")
    config = load(dispatcher_config(data_root, {"void": DUMMY}))

    ready, broken = scan(
        outgoing, config, now=datetime.now().astimezone(), offpeak=False, cache=TaskCache()
    )

    assert [c.task_id for c in ready] == ["ready"]
    assert broken == []


def test_broken_task_folder_goes_to_error_with_the_reason(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    folder = outgoing_of(data_root) / "broken"
    folder.mkdir()
    (folder / "task.json").write_text('{"id": "broken", "info": {}}')
    old = time.time() - 3600
    os.utime(folder / "task.json", (old, old))
    os.utime(folder, (old, old))

    service_for(dispatcher_config(data_root, {})).once()

    reason = (data_root / "error" / "broken" / ".error").read_text()
    assert (
        reason.startswith("DISPATCHING: invalid task") and "info.action: Field required" in reason
    )


# ---------------------------------------------------------------------------- priorities


def candidate(task_id: str, priority: str, mtime: float) -> Candidate:
    return Candidate(task_id, Path(task_id), priority, mtime)  # type: ignore[arg-type]


def test_two_urgent_then_one_normal_even_one_slot_at_a_time() -> None:
    waiting = [candidate(f"u{n}", "urgent", n) for n in range(6)]
    waiting += [candidate(f"n{n}", "normal", n) for n in range(3)]
    scheduler = Scheduler()
    order: list[str] = []
    while waiting:
        (picked,) = scheduler.pick(waiting, 1)
        waiting.remove(picked)
        order.append(picked.task_id)
    assert order == ["u0", "u1", "n0", "u2", "u3", "n1", "u4", "u5", "n2"]


def test_offpeak_tasks_wait_for_the_offpeak_window(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    outgoing = outgoing_of(data_root)
    series = small_series(tmp_path, "offpeak", 1)
    rules = {
        "night": {"rule": "True", "priority": "offpeak", "target": "void"},
        "stat": {"rule": "True", "priority": "urgent", "target": "void"},
    }
    make_task(outgoing, "night-task", series, ["void"], applied_rule="night", triggered=["night"])
    make_task(outgoing, "merged", series, ["void"], applied_rule="", triggered=["night", "stat"])
    config = load(dispatcher_config(data_root, {"void": DUMMY}, rules=rules))
    now = datetime.now().astimezone()

    day, _ = scan(outgoing, config, now=now, offpeak=False, cache=TaskCache())
    night, _ = scan(outgoing, config, now=now, offpeak=True, cache=TaskCache())

    assert {(c.task_id, c.priority) for c in day} == {("merged", "urgent")}
    assert {c.task_id for c in night} == {"night-task", "merged"}
    merged = task_in(outgoing, "merged")
    assert task_priority(merged, config) == "urgent"  # the best of the triggered rules


def test_offpeak_window_wraps_midnight() -> None:
    settings = DispatcherSettings(offpeak_start="22:00", offpeak_end="06:00")
    assert settings.is_offpeak(datetime(2024, 1, 1, 23, 0))
    assert settings.is_offpeak(datetime(2024, 1, 1, 5, 59))
    assert not settings.is_offpeak(datetime(2024, 1, 1, 12, 0))


def test_urgent_tasks_go_first_with_one_normal_after_two_urgent(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    outgoing = outgoing_of(data_root)
    series = small_series(tmp_path, "prio", 1)
    rules = {
        "stat": {"rule": "True", "priority": "urgent", "target": "void"},
        "routine": {"rule": "True", "priority": "normal", "target": "void"},
    }
    for number in range(3):
        make_task(outgoing, f"normal-{number}", series, ["void"], applied_rule="routine")
        make_task(outgoing, f"urgent-{number}", series, ["void"], applied_rule="stat")
        os.utime(outgoing / f"normal-{number}", (number, number))
        os.utime(outgoing / f"urgent-{number}", (number + 10, number + 10))
    service = service_for(
        dispatcher_config(data_root, {"void": DUMMY}, rules=rules, dispatcher_max_parallel=1)
    )
    service.once()
    order = [task_id for task_id, _ in service.outcomes]
    assert order == ["urgent-0", "urgent-1", "normal-0", "urgent-2", "normal-1", "normal-2"]


# ---------------------------------------------------------------------------- several at once


def test_tasks_are_sent_in_parallel(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    outgoing = outgoing_of(data_root)
    for number in range(4):
        make_task(outgoing, f"task-{number}", small_series(tmp_path, f"par{number}", 3), ["pacs"])
    with scp_peer(slow(0.2)) as peer:
        config = dispatcher_config(
            data_root, {"pacs": dicom_target(peer.port)}, dispatcher_max_parallel=4
        )
        started = time.monotonic()
        service_for(config).once()
        elapsed = time.monotonic() - started
    assert len(peer.received) == 12
    assert elapsed < 12 * 0.2, f"{elapsed:.1f} s: the tasks were not sent in parallel"


def test_two_dispatcher_processes_send_each_task_once(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    outgoing = outgoing_of(data_root)
    uids: list[str] = []
    for number in range(8):
        series = small_series(tmp_path, f"two{number}", 3)
        uids += [i.sop_instance_uid for i in series]
        make_task(outgoing, f"task-{number}", series, ["pacs"])
    with scp_peer(slow(0.02)) as peer:
        config = dispatcher_config(data_root, {"pacs": dicom_target(peer.port)})
        config_path = write_config(tmp_path / "caduceus.json", config)
        with dispatcher_processes(config_path, tmp_path, count=2) as procs:
            wait_until(
                lambda: len(list((data_root / "success").glob("task-*"))) == 8,
                timeout=60,
                what="every task in success/",
            )
            codes = [proc.terminate() for proc in procs]
    assert codes == [0, 0]
    assert sorted(peer.received) == sorted(uids)  # every instance exactly once


# ---------------------------------------------------------------------------- crashes, signals


def test_kill_9_mid_send_then_restart_completes_the_task(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    series = small_series(tmp_path, "kill", 30)
    make_task(outgoing_of(data_root), "task-1", series, ["pacs"])
    with scp_peer(slow(0.1)) as peer:
        config = dispatcher_config(data_root, {"pacs": dicom_target(peer.port)})
        config_path = write_config(tmp_path / "caduceus.json", config)
        first = start_dispatcher(config_path, tmp_path / "first.log")
        try:
            wait_until(lambda: len(peer.received) >= 8, timeout=30, what="8 instances sent")
        finally:
            first.kill()
        claim = data_root / "outgoing" / "task-1" / ".processing"
        assert claim.exists(), "the killed dispatcher's claim should be left behind"
        with dispatcher_processes(config_path, tmp_path) as (second,):
            wait_until(
                (data_root / "success" / "task-1").is_dir,
                timeout=60,
                what="the task in success/ after the restart",
            )
            assert second.terminate() == 0
    assert set(peer.received) == {i.sop_instance_uid for i in series}  # at least once
    recovered = [e.payload for e in dispatcher_events(data_root) if e.kind == "lock_recovered"]
    assert len(recovered) == 1 and recovered[0]["owner"]["pid"] == first.process.pid
    assert "is gone" in recovered[0]["reason"]


def test_sigterm_finishes_the_task_in_flight_then_exits_0(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    series = small_series(tmp_path, "term", 20)
    make_task(outgoing_of(data_root), "task-1", series, ["pacs"])
    with scp_peer(slow(0.1)) as peer:
        config = dispatcher_config(data_root, {"pacs": dicom_target(peer.port)})
        config_path = write_config(tmp_path / "caduceus.json", config)
        with dispatcher_processes(config_path, tmp_path) as (proc,):
            wait_until(lambda: len(peer.received) >= 3, timeout=30, what="3 instances sent")
            proc.process.send_signal(signal.SIGTERM)
            assert proc.process.wait(timeout=30) == 0, proc.log()
    assert (data_root / "success" / "task-1").is_dir()
    assert len(peer.received) == 20


def test_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    make_task(outgoing_of(data_root), "task-1", small_series(tmp_path, "twice", 40), ["pacs"])
    with scp_peer(slow(0.2)) as peer:
        config = dispatcher_config(data_root, {"pacs": dicom_target(peer.port)})
        config_path = write_config(tmp_path / "caduceus.json", config)
        with dispatcher_processes(config_path, tmp_path) as (proc,):
            wait_until(lambda: len(peer.received) >= 2, timeout=30, what="2 instances sent")
            proc.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.process.send_signal(signal.SIGTERM)
            assert proc.process.wait(timeout=15) == exitcodes.EX_INTERRUPTED
    assert len(peer.received) < 40
    assert (data_root / "outgoing" / "task-1").is_dir()


def test_stale_claim_of_a_dead_dispatcher_is_recovered_with_an_event(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    make_task(outgoing_of(data_root), "task-1", small_series(tmp_path, "stale", 1), ["void"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = LockOwner("dispatcher", socket.gethostname(), dead.pid, 1.0, "feedface", time.time())
    (data_root / "outgoing" / "task-1" / ".processing").write_bytes(owner.to_json())

    service_for(dispatcher_config(data_root, {"void": DUMMY})).once()

    assert (data_root / "success" / "task-1").is_dir()
    assert not (data_root / "success" / "task-1" / ".processing").exists()
    (event,) = [e for e in dispatcher_events(data_root) if e.kind == "lock_recovered"]
    assert event.payload["task_id"] == "task-1" and event.payload["owner"]["pid"] == dead.pid


def test_invalid_dispatcher_setting_exits_with_ex_config(tmp_path: Path) -> None:
    config = dispatcher_config(tmp_path / "data", {}, dispatcher_max_parallel=0)
    config_path = write_config(tmp_path / "caduceus.json", config)
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "--config", str(config_path), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == exitcodes.EX_CONFIG
    assert "dispatcher_max_parallel" in done.stdout + done.stderr


# ---------------------------------------------------------------------------- folder target


def test_folder_target_gets_a_complete_copy(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    series = small_series(tmp_path, "folder", 3)
    folder = make_task(outgoing_of(data_root), "task-1", series, ["share"])
    (folder / "notes.tags").write_text("{}")
    share = tmp_path / "share"
    share.mkdir()
    target = {"target_type": "folder", "folder": str(share), "file_filter": "*.tags"}

    service_for(dispatcher_config(data_root, {"share": target})).once()

    copied = sorted(p.name for p in (share / "task-1").iterdir())
    expected = sorted([*(p.name for p in folder.parent.parent.glob("success/task-1/*.dcm"))])
    assert copied == sorted([".complete", "task.json", *expected])
    assert len(expected) == 3
    assert json.loads((share / "task-1" / "task.json").read_text())["id"] == "task-1"
    assert [p.name for p in share.iterdir()] == ["task-1"]


def test_crash_after_the_last_status_write_moves_the_task_without_resending(
    tmp_path: Path,
) -> None:
    """kill -9 between the final task.json write and the rename: the next dispatcher finds every
    target complete and only moves the folder."""
    data_root = tmp_path / "data"
    folder = make_task(
        outgoing_of(data_root), "task-1", small_series(tmp_path, "late", 2), ["pacs"]
    )
    task = task_in(data_root / "outgoing", "task-1")
    assert task.dispatch is not None
    task.dispatch.target_status("pacs").state = "complete"
    write_task(folder / "task.json", task)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = LockOwner("dispatcher", socket.gethostname(), dead.pid, 1.0, "0badcafe", time.time())
    (folder / ".processing").write_bytes(owner.to_json())
    with scp_peer() as peer:
        service_for(dispatcher_config(data_root, {"pacs": dicom_target(peer.port)})).once()
    assert peer.received == []
    assert (data_root / "success" / "task-1").is_dir()


# ---------------------------------------------------------------------------- waking up


def test_a_running_dispatcher_sends_a_new_task_at_once_not_at_its_next_scan(
    tmp_path: Path,
) -> None:
    data_root = tmp_path / "data"
    instances = small_series(tmp_path, "wake", 1)
    make_task(outgoing_of(data_root), "first", instances, ["dummy"])
    service = service_for(
        dispatcher_config(data_root, {"dummy": DUMMY}, dispatcher_scan_interval=60)
    )
    runner = threading.Thread(target=service.run)
    runner.start()
    try:
        wait_until((data_root / "success" / "first").is_dir, what="the first task")
        make_task(outgoing_of(data_root), "second", instances, ["dummy"])  # while it sleeps
        wait_until(
            (data_root / "success" / "second").is_dir,
            timeout=20,  # far below the 60 s scan interval it would otherwise wait
            what="the second task",
        )
    finally:
        service.stop()
        runner.join(timeout=30)
    assert not runner.is_alive()


def test_a_folder_watch_reports_entries_renamed_in_and_removed(tmp_path: Path) -> None:
    watch = FolderWatch(tmp_path)
    try:
        assert watch.fileno() is not None  # Linux: inotify is there
        (tmp_path / ".task.building").mkdir()
        (tmp_path / ".task.building").rename(tmp_path / "task")
        (tmp_path / "HALT").touch()
        (tmp_path / "HALT").unlink()
        changes = watch.changes()
        assert [(c.name, c.appeared) for c in changes] == [
            (".task.building", True),
            (".task.building", False),
            ("task", True),
            ("HALT", True),
            ("HALT", False),
        ]
        assert watch.changes() == []
    finally:
        watch.close()
