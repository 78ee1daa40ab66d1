"""The spool contract: atomic writes and locks with owner, heartbeat and stale recovery."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import LockedError
from common.spool import (
    Marker,
    SpoolLock,
    SpoolPaths,
    atomic_write_bytes,
    atomic_write_json,
    is_halted,
    read_owner,
    recover_if_stale,
)
from tests.helpers import wait_until


def test_spool_paths_place_every_folder_under_the_root(tmp_path: Path) -> None:
    paths = SpoolPaths.under(tmp_path / "data")
    paths.create()
    names = {path.name for path in (tmp_path / "data").iterdir()}
    expected = {"incoming", "studies", "processing", "outgoing", "success", "error", "discard"}
    assert expected | {"jobs", "state"} == names
    assert (paths.incoming / ".tmp").is_dir()


def test_atomic_write_leaves_no_temporary_file_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "task.json"
    atomic_write_json(target, {"id": "a"})
    atomic_write_json(target, {"id": "b", "name": "Müller"})
    assert json.loads(target.read_text("utf-8")) == {"id": "b", "name": "Müller"}
    assert [p.name for p in tmp_path.iterdir()] == ["task.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "task.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["task.json"]


def test_a_killed_writer_never_leaves_a_partial_file_under_the_final_name(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    code = (
        "import sys; from pathlib import Path; from common.spool import atomic_write_bytes\n"
        "while True: atomic_write_bytes(Path(sys.argv[1]), b'x' * 20_000_000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
    # The writer rewrites the file in a loop, so it is always in the middle of a write.
    wait_until(target.exists, timeout=20, what="the first complete write")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"x" * 20_000_000


def test_lock_names_its_owner_and_is_removed_on_exit(tmp_path: Path) -> None:
    lock_path = tmp_path / Marker.PROCESSING
    with SpoolLock(lock_path, "dispatcher") as lock:
        owner = read_owner(lock_path)
        assert owner is not None
        assert (owner.service, owner.pid) == ("dispatcher", os.getpid())
        assert lock.recovered is None
    assert not lock_path.exists()


def test_a_live_owners_lock_cannot_be_taken(tmp_path: Path) -> None:
    lock_path = tmp_path / Marker.LOCK
    with SpoolLock(lock_path, "router"), pytest.raises(LockedError):
        SpoolLock(lock_path, "router").acquire()


def _hold_lock_forever(path: str) -> None:
    lock = SpoolLock(Path(path), "processor")
    lock.acquire()
    time.sleep(3600)


def test_the_lock_of_a_killed_process_is_recovered(tmp_path: Path) -> None:
    lock_path = tmp_path / Marker.PROCESSING
    child = multiprocessing.get_context("spawn").Process(
        target=_hold_lock_forever, args=(str(lock_path),)
    )
    child.start()
    wait_until(lock_path.exists, timeout=20, what="the child's lock")
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join()
    with SpoolLock(lock_path, "processor") as lock:
        assert lock.recovered is not None
        assert lock.recovered.owner is not None
        assert lock.recovered.owner.pid == child.pid
        assert "gone" in lock.recovered.reason


def test_a_lock_with_a_stale_heartbeat_is_recovered(tmp_path: Path) -> None:
    lock_path = tmp_path / Marker.LOCK
    lock_path.write_text(
        json.dumps(
            {
                "service": "router",
                "host": "another-host",
                "pid": 1,
                "started": 0.0,
                "token": "t",
                "created": 0.0,
            }
        )
    )
    old = time.time() - 600
    os.utime(lock_path, (old, old))
    with SpoolLock(lock_path, "router", stale_after=60) as lock:
        assert lock.recovered is not None
        assert "heartbeat" in lock.recovered.reason


def test_a_lock_on_another_host_with_a_fresh_heartbeat_is_respected(tmp_path: Path) -> None:
    lock_path = tmp_path / Marker.LOCK
    lock_path.write_text(
        json.dumps(
            {
                "service": "router",
                "host": "another-host",
                "pid": 1,
                "started": 0.0,
                "token": "t",
                "created": time.time(),
            }
        )
    )
    with pytest.raises(LockedError):
        SpoolLock(lock_path, "router", stale_after=60).acquire()


def test_the_heartbeat_keeps_a_long_held_lock_fresh(tmp_path: Path) -> None:
    lock_path = tmp_path / Marker.LOCK
    with SpoolLock(lock_path, "processor", stale_after=0.6, heartbeat=0.1):
        first = lock_path.stat().st_mtime
        wait_until(lambda: lock_path.stat().st_mtime > first, timeout=5, what="a heartbeat")
        time.sleep(0.8)
        assert recover_if_stale(lock_path, stale_after=0.6) is None
        assert lock_path.exists()


def _recover(path: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        with SpoolLock(Path(path), "dispatcher", stale_after=60):
            results.put("got it")
            time.sleep(0.5)
    except LockedError:
        results.put("locked")


def test_of_several_recoverers_exactly_one_takes_a_dead_lock(tmp_path: Path) -> None:
    lock_path = tmp_path / Marker.PROCESSING
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    lock_path.write_text(
        json.dumps(
            {
                "service": "dispatcher",
                "host": os.uname().nodename,
                "pid": int(dead.stdout),
                "started": 1.0,
                "token": "t",
                "created": time.time(),
            }
        )
    )
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_recover, args=(str(lock_path), results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes.count("got it") == 1, outcomes


def test_halt_marker_suspends_a_folder(tmp_path: Path) -> None:
    assert not is_halted(tmp_path)
    (tmp_path / Marker.HALT).touch()
    assert is_halted(tmp_path)
