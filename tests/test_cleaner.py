"""The cleaner: retention off-peak, emergency cleaning, locks, crash safety — on a real spool.

Passes run in-process through ``CleanerService.once()``; the crash and signal tests run
``python -m cleaner`` as its own process. Ages are real: a task is old once the wall clock has
passed its arrival (the later of the folder's ctime and mtime) by more than the retention.
The emergency tests fill a small tmpfs (root) to a known level with real files.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cleaner.service import CleanerService
from common.config import load_config
from common.exitcodes import EX_CONFIG, EX_OK
from common.outbox import Event, outbox_path
from common.spool import LockOwner, Marker, SpoolPaths
from tests.helpers import API_KEY, outbox_events, wait_until

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
RETENTION = 1.0
"""Seconds; short, so that tests wait about a second for a task to become old."""
ALL_DAY = {"offpeak_start": "00:00", "offpeak_end": "00:00"}
"""Equal start and end: the off-peak window is the whole day (mercure's rule)."""
NO_EMERGENCY = {"emergency_clean_percentage": 100}
"""Usage can never be over 100 %: the host's own disk never triggers emergency cleaning."""
ONLY_EMERGENCY = {**ALL_DAY, "retention": 10**9}
"""Off-peak all day, but a retention nothing reaches: only emergency cleaning deletes."""


# ---------------------------------------------------------------------------- helpers


def offpeak_around_now() -> dict[str, str]:
    return _window(-1, 1)


def offpeak_away_from_now() -> dict[str, str]:
    return _window(2, 3)


def _window(start_h: int, end_h: int) -> dict[str, str]:
    now = datetime.now()
    return {
        "offpeak_start": (now + timedelta(hours=start_h)).strftime("%H:%M"),
        "offpeak_end": (now + timedelta(hours=end_h)).strftime("%H:%M"),
    }


class Spool:
    """A real spool under ``tmp_path`` and the configuration file the cleaner reads."""

    def __init__(self, tmp_path: Path, **folders: Path) -> None:
        self.tmp_path = tmp_path
        self.data_root = tmp_path / "data"
        self.folders = folders
        self.paths = SpoolPaths.under(self.data_root)
        self.paths.create()
        self.success = folders.get("success", self.paths.success)
        self.discard = folders.get("discard", self.paths.discard)
        self.error = folders.get("error", self.paths.error)
        for folder in (self.success, self.discard, self.error):
            folder.mkdir(parents=True, exist_ok=True)
        self.config_path = tmp_path / "caduceus.json"

    def configure(self, **settings: Any) -> Path:
        config = {
            "data_root": str(self.data_root),
            "bookkeeper_api_key": API_KEY,
            **{f"{name}_folder": str(path) for name, path in self.folders.items()},
            **settings,
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        return self.config_path

    def clean_once(self, **settings: Any) -> None:
        """One in-process pass with ``settings`` in the configuration."""
        self.configure(**settings)
        assert CleanerService(load_config(self.config_path)).once() == EX_OK

    def events(self, kind: str | None = None) -> list[Event]:
        path = outbox_path(self.paths.state, "cleaner")
        if not path.exists():
            return []
        return [e for e in outbox_events(path) if kind is None or e.kind == kind]

    def deleted_ids(self) -> list[str]:
        return [event.payload["task_id"] for event in self.events("task_deleted")]


def make_task(folder: Path, task_id: str, *, files: int = 2, size: int = 1000) -> Path:
    """A task folder delivered as a writer does: built under a hidden name, then renamed."""
    staging = folder / f".{task_id}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    task = {"id": task_id, "info": {"action": "route", "uid": "1.2.3", "uid_type": "series"}}
    (staging / "task.json").write_text(json.dumps(task))
    for number in range(files):
        (staging / f"1.2.3#{number}.dcm").write_bytes(bytes(size))
    final = folder / task_id
    staging.rename(final)
    return final


def arrival(path: Path) -> float:
    st = path.stat()
    return max(st.st_ctime, st.st_mtime)


def wait_older_than(paths: list[Path], seconds: float) -> None:
    newest = max(arrival(path) for path in paths)
    wait_until(
        lambda: time.time() > newest + seconds + 0.05,
        timeout=seconds + 10,
        what=f"the tasks to be older than {seconds} s",
    )


def visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def hidden(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".")}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait(30)
    return process.pid


def write_lock(folder: Path, marker: Marker, *, service: str, pid: int) -> None:
    owner = LockOwner(
        service=service,
        host=socket.gethostname(),
        pid=pid,
        started=time.time() - 100,
        token=secrets.token_hex(8),
        created=time.time() - 100,
    )
    (folder / marker).write_bytes(owner.to_json())


# ---------------------------------------------------------------------------- retention


def test_retention_deletes_old_success_and_discard_tasks_offpeak_and_keeps_young_ones(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    old = [make_task(spool.success, "s-old"), make_task(spool.discard, "d-old", files=3)]
    size = sum(path.stat().st_size for path in old[1].iterdir())
    wait_older_than(old, RETENTION)
    make_task(spool.success, "s-young")
    make_task(spool.discard, "d-young")

    spool.clean_once(retention=RETENTION, **offpeak_around_now(), **NO_EMERGENCY)

    assert visible(spool.success) == {"s-young"}
    assert visible(spool.discard) == {"d-young"}
    assert hidden(spool.success) == hidden(spool.discard) == set()
    events = {e.payload["task_id"]: e.payload for e in spool.events("task_deleted")}
    assert set(events) == {"s-old", "d-old"}
    discard = events["d-old"]
    assert discard["folder"] == "discard"
    assert discard["reason"] == "retention"
    assert discard["age_s"] > RETENTION
    assert discard["files"] == 4  # task.json and three instances
    assert discard["bytes"] == size
    assert discard["bytes_freed"] > 0
    assert discard["path"] == str(spool.discard / "d-old")
    clean = {e.payload["task_id"]: e.payload for e in spool.events("task_event")}
    assert set(clean) == {"s-old", "d-old"}, "mercure's CLEAN task event for the task history"
    assert clean["d-old"]["event"] == "CLEAN"
    assert clean["d-old"]["file_count"] == 4


def test_retention_waits_for_the_offpeak_window(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    make_task(spool.success, "s1")
    make_task(spool.discard, "d1")

    spool.clean_once(retention=0, **offpeak_away_from_now(), **NO_EMERGENCY)
    assert visible(spool.success) == {"s1"}
    assert visible(spool.discard) == {"d1"}
    assert spool.events() == []

    spool.clean_once(retention=0, **offpeak_around_now(), **NO_EMERGENCY)
    assert visible(spool.success) == visible(spool.discard) == set()
    assert sorted(spool.deleted_ids()) == ["d1", "s1"]


def test_locked_folders_are_never_deleted_even_when_the_lock_is_stale(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    stale = make_task(spool.success, "stale-lock")
    write_lock(stale, Marker.LOCK, service="router", pid=dead_pid())
    processing = make_task(spool.success, "processing")
    write_lock(processing, Marker.PROCESSING, service="dispatcher", pid=os.getpid())
    broken = make_task(spool.discard, "unreadable-lock")
    (broken / Marker.LOCK).write_text("not json")
    make_task(spool.discard, "free")

    # retention 0 in the window, and an emergency that is always on (0 %): both respect locks
    spool.clean_once(retention=0, emergency_clean_percentage=0, **ALL_DAY)

    assert visible(spool.success) == {"stale-lock", "processing"}
    assert visible(spool.discard) == {"unreadable-lock"}
    assert (stale / Marker.LOCK).exists()
    assert spool.deleted_ids() == ["free"]
    assert spool.events("task_deleted")[0].payload["reason"] == "emergency"


def test_a_dead_cleaners_own_claim_is_recovered_and_the_task_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    claimed = make_task(spool.success, "claimed")
    write_lock(claimed, Marker.LOCK, service="cleaner", pid=dead_pid())

    spool.clean_once(retention=0, **ALL_DAY, **NO_EMERGENCY)

    assert visible(spool.success) == set()
    assert spool.deleted_ids() == ["claimed"]
    [recovered] = spool.events("lock_recovered")
    assert recovered.payload["task_id"] == "claimed"
    assert recovered.payload["owner"]["service"] == "cleaner"


def test_error_tasks_are_kept_by_default_and_deleted_after_error_retention(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    failed = make_task(spool.error, "failed")
    make_task(spool.success, "done")

    # default: error/ kept forever, by retention and by an (always on) emergency alike
    spool.clean_once(retention=0, emergency_clean_percentage=0, **ALL_DAY)
    assert visible(spool.error) == {"failed"}
    assert spool.deleted_ids() == ["done"]

    wait_older_than([failed], 0.2)
    spool.clean_once(retention=0, error_retention=0.2, **offpeak_away_from_now(), **NO_EMERGENCY)
    assert visible(spool.error) == {"failed"}, "error retention waits for the window too"

    spool.clean_once(retention=0, error_retention=0.2, **ALL_DAY, **NO_EMERGENCY)
    assert visible(spool.error) == set()
    last = spool.events("task_deleted")[-1].payload
    assert (last["task_id"], last["folder"], last["reason"]) == ("failed", "error", "retention")


def test_abandoned_temp_folders_of_dead_writers_go_and_live_writers_stay(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    token = secrets.token_hex(4)
    live = spool.success / f".t-live.{os.getpid()}.{token}.tmp"
    dead = spool.discard / f".t-dead.{dead_pid()}.{token}.tmp"
    unknown = spool.success / ".someone-elses-folder"
    for folder in (live, dead, unknown):
        folder.mkdir()
        (folder / "1.2.3#1.dcm").write_bytes(bytes(100))
    young_dead = spool.success / f".t-young.{dead_pid()}.{token}.tmp"
    wait_older_than([live, dead, unknown], RETENTION)
    young_dead.mkdir()

    spool.clean_once(retention=RETENTION, **ALL_DAY, **NO_EMERGENCY)

    assert hidden(spool.success) == {live.name, unknown.name, young_dead.name}
    assert hidden(spool.discard) == set()
    [event] = spool.events("task_deleted")
    assert (event.payload["task_id"], event.payload["reason"]) == ("t-dead", "abandoned")


def test_a_cleaned_folder_that_holds_the_spool_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, success=tmp_path / "data")  # a mistake: success/ is the data root
    series = spool.paths.incoming / "1.2.3"
    series.mkdir()
    (series / "1.2.3#1.dcm").write_bytes(bytes(10))
    make_task(spool.paths.discard, "d1")

    spool.clean_once(retention=0, emergency_clean_percentage=0, **ALL_DAY)

    assert (series / "1.2.3#1.dcm").exists()
    assert {p.name for p in spool.data_root.iterdir()} >= {"incoming", "outgoing", "state"}
    assert spool.deleted_ids() == ["d1"], "the other folders are still cleaned"


# ---------------------------------------------------------------------------- emergency


def fill(folder: Path, mib: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "filler.bin").write_bytes(bytes(mib * MIB))


def usage_of(path: Path) -> tuple[int, int]:
    """(used, total) bytes, counted as ``df`` does."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize


@pytest.mark.root
def test_emergency_deletes_the_oldest_first_only_until_under_the_threshold(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    fs = small_fs(24)
    spool = Spool(tmp_path, success=fs / "success", discard=fs / "discard", error=fs / "error")
    locked = make_task(spool.success, "t00-locked", files=1, size=MIB)
    write_lock(locked, Marker.LOCK, service="router", pid=dead_pid())
    names = [f"t{n:02d}" for n in range(1, 11)]
    for number, name in enumerate(names):
        make_task(spool.success if number % 2 else spool.discard, name, files=1, size=MIB)
    make_task(spool.error, "e01", files=1, size=MIB)
    fill(fs / "incoming", 6)
    threshold = 55
    used, total = usage_of(fs)
    assert used * 100 > total * (threshold + 15), "the filesystem is filled well over"

    # outside the off-peak window: emergency cleaning runs at any time of day
    spool.clean_once(emergency_clean_percentage=threshold, **offpeak_away_from_now())

    deleted = spool.deleted_ids()
    count = len(deleted)
    assert 1 <= count < len(names)
    assert deleted == names[:count], "oldest first"
    assert visible(spool.success) | visible(spool.discard) == {"t00-locked", *names[count:]}
    assert visible(spool.error) == {"e01"}
    assert (fs / "incoming" / "filler.bin").exists()
    used, total = usage_of(fs)
    last_freed = spool.events("task_deleted")[-1].payload["bytes_freed"]
    assert used * 100 <= total * threshold, "back under the threshold"
    assert (used + last_freed) * 100 > total * threshold, "no task deleted beyond that"
    assert {e.payload["reason"] for e in spool.events("task_deleted")} == {"emergency"}
    [started] = spool.events("emergency_clean_started")
    [finished] = spool.events("emergency_clean_finished")
    assert started.payload["usage_percent"] > threshold
    assert started.payload["threshold"] == threshold
    assert finished.payload["under_threshold"] is True
    assert finished.payload["deleted"] == count
    assert finished.payload["locked"] == 1
    assert finished.payload["usage_percent"] <= threshold
    [system] = spool.events("system_event")
    assert (system.payload["event"], system.payload["severity"]) == ("EMERGENCY_CLEAN", "warning")


@pytest.mark.root
def test_emergency_deletes_error_tasks_only_when_configured_and_only_last(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    fs = small_fs(16)
    spool = Spool(tmp_path, success=fs / "success", discard=fs / "discard", error=fs / "error")
    make_task(spool.error, "e1", files=1, size=MIB)
    make_task(spool.error, "e2", files=1, size=MIB)
    make_task(spool.error, "e3", files=1, size=MIB)
    make_task(spool.success, "s1", files=1, size=MIB)  # the youngest, yet deleted first
    fill(fs / "incoming", 9)
    used, total = usage_of(fs)
    threshold = int((used - 2.5 * MIB) * 100 / total)  # needs three tasks gone

    spool.clean_once(emergency_clean_percentage=threshold, **ONLY_EMERGENCY)
    assert spool.deleted_ids() == ["s1"]
    assert visible(spool.error) == {"e1", "e2", "e3"}
    [finished] = spool.events("emergency_clean_finished")
    assert finished.payload["under_threshold"] is False
    [system] = spool.events("system_event")
    assert system.payload["severity"] == "error", "still over the threshold"

    spool.clean_once(
        emergency_clean_percentage=threshold, emergency_clean_error=True, **ONLY_EMERGENCY
    )
    assert spool.deleted_ids() == ["s1", "e1", "e2"]
    assert visible(spool.error) == {"e3"}


@pytest.mark.root
def test_emergency_judges_each_filesystem_on_its_own(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    full, roomy = small_fs(8), small_fs(8)
    spool = Spool(tmp_path, success=full / "success", discard=roomy / "discard")
    make_task(spool.success, "s1", files=1, size=MIB)
    make_task(spool.success, "s2", files=1, size=MIB)
    make_task(spool.discard, "d1", files=1, size=MIB)
    fill(full / "incoming", 3)  # 5 of 8 MiB used: one task less is under 60 %

    spool.clean_once(emergency_clean_percentage=60, **ONLY_EMERGENCY)

    assert spool.deleted_ids() == ["s1"]
    assert visible(spool.discard) == {"d1"}
    [started] = spool.events("emergency_clean_started")
    assert started.payload["folders"] == [str(spool.success)]


# ---------------------------------------------------------------------------- the process


def start_cleaner(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    with (config.parent / "cleaner.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cleaner", "--config", str(config), *extra],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)


KILL_FILES = 500
"""Instances per task in the kill tests: enough that each step of a deletion takes a while."""


def claimed(success: Path) -> bool:
    """A task folder holds the cleaner's ``.lock``: it was claimed but not renamed yet."""
    return any((success / name / Marker.LOCK).exists() for name in visible(success))


def renamed(success: Path) -> bool:
    """A task folder was renamed to its hidden ``.deleting`` name."""
    return any(name.endswith(".deleting") for name in hidden(success))


def removing(success: Path) -> bool:
    """Files of a renamed task are being removed."""
    for name in hidden(success):
        with contextlib.suppress(FileNotFoundError):
            if name.endswith(".deleting") and len(os.listdir(success / name)) < KILL_FILES:
                return True
    return False


@pytest.mark.parametrize("moment", [claimed, renamed, removing], ids=lambda f: f.__name__)
def test_kill_9_mid_delete_then_restart_leaves_no_half_task(
    tmp_path: Path, moment: Callable[[Path], bool]
) -> None:
    spool = Spool(tmp_path)
    names = ["t0", "t1", "t2"]
    tasks = [make_task(spool.success, name, files=KILL_FILES, size=16) for name in names]
    whole = {path.name for path in tasks[0].iterdir()}
    config = spool.configure(retention=0, cleaner_scan_interval=60, **ALL_DAY, **NO_EMERGENCY)

    process = start_cleaner(config)
    try:
        wait_until(
            lambda: moment(spool.success), timeout=60, interval=0.001, what=moment.__doc__ or ""
        )
        process.kill()
        assert process.wait(10) == -signal.SIGKILL
    finally:
        stop(process)

    for name in visible(spool.success):  # whatever is visible is whole
        present = {path.name for path in (spool.success / name).iterdir()}
        assert whole <= present, f"task {name} is visible but incomplete"

    assert start_cleaner(config, "--once").wait(60) == EX_OK
    assert list(spool.success.iterdir()) == []
    assert sorted(spool.deleted_ids()) == names, "one event per task, none lost or doubled"
    assert sorted(e.payload["task_id"] for e in spool.events("task_event")) == names


def test_sigterm_mid_delete_exits_0_and_the_next_start_finishes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    names = ["t0", "t1", "t2"]
    for name in names:
        make_task(spool.success, name, files=KILL_FILES, size=16)
    config = spool.configure(retention=0, cleaner_scan_interval=60, **ALL_DAY, **NO_EMERGENCY)

    process = start_cleaner(config)
    try:
        wait_until(lambda: removing(spool.success), timeout=60, interval=0.001, what="a removal")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == EX_OK
        assert time.monotonic() - started < 5
    finally:
        stop(process)
    assert visible(spool.success) < set(names), "it stopped before deleting every task"

    assert start_cleaner(config, "--once").wait(60) == EX_OK
    assert list(spool.success.iterdir()) == []
    assert sorted(spool.deleted_ids()) == names


def test_service_exits_0_promptly_on_sigterm(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    make_task(spool.discard, "old")
    config = spool.configure(retention=0, cleaner_scan_interval=60, **ALL_DAY, **NO_EMERGENCY)

    process = start_cleaner(config)
    try:
        wait_until(lambda: not visible(spool.discard), timeout=60, what="the first pass")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == EX_OK
        assert time.monotonic() - started < 5
    finally:
        stop(process)
    assert spool.deleted_ids() == ["old"]


def test_invalid_configuration_exits_with_ex_config(tmp_path: Path) -> None:
    config = Spool(tmp_path).configure(emergency_clean_percentage=150)
    assert start_cleaner(config).wait(60) == EX_CONFIG
    assert "emergency_clean_percentage" in (tmp_path / "cleaner.log").read_text()
