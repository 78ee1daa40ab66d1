"""The event outbox (common/outbox.py, docs/events.md), on real SQLite files in tmp_path."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from common.errors import OutboxError
from common.outbox import OVERFLOW_KIND, Event, NewEvent, Outbox, outbox_path

REPO = Path(__file__).resolve().parent.parent
PAD = "x" * 1000
"""Payload padding, so that a few dozen events fill a small outbox."""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return outbox_path(tmp_path / "state", "receiver")


@pytest.fixture
def outbox(path: Path) -> Iterator[Outbox]:
    with Outbox(path, "receiver") as box:
        yield box


def kinds(events: list[Event]) -> list[str]:
    return [event.kind for event in events]


# ---------------------------------------------------------------------------- envelope, basics


def test_outbox_lives_under_the_state_folder_per_service(tmp_path: Path) -> None:
    assert outbox_path(tmp_path, "router") == tmp_path / "outbox" / "router.sqlite3"


def test_recorded_event_carries_the_full_envelope(outbox: Outbox) -> None:
    before = datetime.now(UTC)
    event_id = outbox.record("association", {"calling_ae": "CT1", "instances": 3})

    (event,) = outbox.pending()
    assert event.id == event_id
    assert len(event_id) == 32
    int(event_id, 16)
    assert event.producer == "receiver"
    assert event.kind == "association"
    assert event.payload == {"calling_ae": "CT1", "instances": 3}
    assert event.seq >= 1
    assert event.time.endswith("Z")
    recorded = datetime.fromisoformat(event.time)
    assert recorded.utcoffset() is not None
    assert recorded.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert before <= recorded <= datetime.now(UTC)
    assert event.as_dict() == {
        "id": event_id,
        "producer": "receiver",
        "seq": event.seq,
        "kind": "association",
        "time": event.time,
        "payload": {"calling_ae": "CT1", "instances": 3},
    }


def test_pending_returns_oldest_first_up_to_the_limit(outbox: Outbox) -> None:
    ids = [outbox.record("tick", {"n": n}) for n in range(10)]

    assert [event.id for event in outbox.pending(limit=4)] == ids[:4]
    seqs = [event.seq for event in outbox.pending()]
    assert seqs == sorted(set(seqs))
    assert outbox.count() == 10


def test_recorded_events_survive_close_and_reopen_in_order(path: Path) -> None:
    with Outbox(path, "receiver") as box:
        ids = [box.record("series_received", {"n": n}) for n in range(20)]

    with Outbox(path, "receiver") as box:
        pending = box.pending()
    assert [event.id for event in pending] == ids
    assert [event.payload["n"] for event in pending] == list(range(20))


def test_repeated_event_id_is_stored_once(outbox: Outbox) -> None:
    first = outbox.record("association", {"try": 1}, event_id="assoc-42")
    second = outbox.record("association", {"try": 2}, event_id="assoc-42")
    outbox.record_many([NewEvent("association", {"try": 3}, "assoc-42")])

    assert first == second == "assoc-42"
    (event,) = outbox.pending()
    assert event.payload == {"try": 1}


def test_ack_removes_acknowledged_events_and_ignores_unknown_ids(outbox: Outbox) -> None:
    ids = [outbox.record("tick", {"n": n}) for n in range(5)]

    outbox.ack([ids[0], ids[2], "never-recorded"])

    assert [event.id for event in outbox.pending()] == [ids[1], ids[3], ids[4]]
    outbox.ack([])
    assert outbox.count() == 3


def test_seq_is_never_reused_after_ack(outbox: Outbox) -> None:
    outbox.record("tick", {})
    last = outbox.record("tick", {})
    (last_seq,) = [e.seq for e in outbox.pending() if e.id == last]
    outbox.ack(e.id for e in outbox.pending())

    outbox.record("tick", {})

    assert outbox.pending()[0].seq > last_seq


def test_record_many_stores_a_batch_in_order(outbox: Outbox) -> None:
    ids = outbox.record_many(
        [("series_received", {"n": 0}), NewEvent("series_received", {"n": 1}, "chosen")]
    )

    assert ids[1] == "chosen"
    assert [event.id for event in outbox.pending()] == ids
    assert outbox.record_many([]) == []


def test_ack_gives_space_back_after_a_large_backlog(path: Path) -> None:
    with Outbox(path, "receiver") as box:
        box.record_many([("tick", {"pad": PAD})] * 3000)
        full = box.size_bytes()
        box.ack(event.id for event in box.pending(limit=5000))
        assert box.size_bytes() < full / 4

    assert path.stat().st_size < full / 2


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "payload",
    [{"when": object()}, {"uids": {"1.2.3"}}, {"value": math.nan}, {"raw": b"\x00"}],
    ids=["object", "set", "nan", "bytes"],
)
def test_non_serialisable_payload_raises_outbox_error_naming_the_kind(
    outbox: Outbox, payload: dict[str, Any]
) -> None:
    with pytest.raises(OutboxError, match="'series_received'"):
        outbox.record("series_received", payload)
    assert outbox.count() == 0


def test_payload_that_is_not_a_mapping_is_refused(outbox: Outbox) -> None:
    with pytest.raises(OutboxError, match=r"'association'.*mapping"):
        outbox.record("association", ["not", "a", "mapping"])  # type: ignore[arg-type]


def test_empty_kind_is_refused(outbox: Outbox) -> None:
    with pytest.raises(OutboxError, match="kind"):
        outbox.record("", {})


def test_batch_with_one_bad_payload_stores_nothing(outbox: Outbox) -> None:
    with pytest.raises(OutboxError, match="'broken'"):
        outbox.record_many([("fine", {"n": 1}), ("broken", {"x": object()}), ("fine", {})])
    assert outbox.count() == 0


# ---------------------------------------------------------------------------- lifecycle


def test_closed_outbox_refuses_use(path: Path) -> None:
    with Outbox(path, "receiver") as box:
        box.record("tick", {})
    box.close()  # idempotent

    with pytest.raises(OutboxError, match="closed"):
        box.record("tick", {})
    with pytest.raises(OutboxError, match="closed"):
        box.pending()


def test_outbox_from_a_newer_caduceus_is_refused(path: Path) -> None:
    Outbox(path, "receiver").close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()

    with pytest.raises(OutboxError, match="schema version 99"):
        Outbox(path, "receiver")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_outbox_opened_before_fork_refuses_use_in_the_child(outbox: Outbox) -> None:
    pid = os.fork()
    if pid == 0:  # the child: must refuse, never share the parent's connection
        try:
            outbox.record("tick", {})
        except OutboxError:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    outbox.record("tick", {})  # the parent is unaffected
    assert outbox.count() == 1


# ---------------------------------------------------------------------------- bounded size


def test_full_outbox_refuses_new_events_and_keeps_the_old_ones(path: Path) -> None:
    with Outbox(path, "receiver", max_bytes=64 * 1024) as box:
        ids = [box.record("association", {"n": n, "pad": PAD}) for n in range(100)]

        stored = box.pending(limit=1000)
        assert 0 < len(stored) < 100
        assert [event.id for event in stored] == ids[: len(stored)]
        assert box.dropped() == 100 - len(stored)
        assert box.size_bytes() <= 64 * 1024 + 4 * 4096  # page granularity
        assert OVERFLOW_KIND not in kinds(stored)


def test_overflow_gap_is_recorded_as_one_event_when_there_is_room_again(path: Path) -> None:
    with Outbox(path, "receiver", max_bytes=64 * 1024) as box:
        for n in range(60):
            box.record("association", {"n": n, "pad": PAD})
        box.record("series_received", {"pad": PAD})
        box.record("series_received", {"pad": PAD})
        dropped = box.dropped()
        assert dropped > 2
        stored = box.pending(limit=1000)

        box.ack(event.id for event in stored[:10])
        after_gap = box.record("association", {"n": "after"})

        pending = box.pending(limit=1000)
        assert box.dropped() == 0
        assert kinds(pending).count(OVERFLOW_KIND) == 1
        gap, last = pending[-2], pending[-1]
        assert gap.kind == OVERFLOW_KIND
        assert last.id == after_gap
        assert gap.payload["dropped"] == dropped
        assert gap.payload["kinds"] == {"association": dropped - 2, "series_received": 2}
        assert gap.payload["first_dropped_at"] <= gap.payload["last_dropped_at"]
        assert gap.payload["max_bytes"] == 64 * 1024


def test_refused_resend_of_a_stored_event_is_not_counted_as_dropped(path: Path) -> None:
    with Outbox(path, "receiver", max_bytes=64 * 1024) as box:
        first = box.record("association", {"pad": PAD}, event_id="first")
        while box.dropped() == 0:
            box.record("association", {"pad": PAD})
        assert box.dropped() == 1

        assert box.record("association", {"pad": PAD}, event_id=first) == first
        assert box.dropped() == 1


def test_event_larger_than_the_whole_outbox_is_dropped_not_raised(path: Path) -> None:
    with Outbox(path, "receiver", max_bytes=64 * 1024) as box:
        box.record("series_received", {"sop_instance_uids": ["1.2.3.4"] * 20000})
        assert box.count() == 0
        assert box.dropped() == 1


# ---------------------------------------------------------------------------- concurrency

_RECORDING_CHILD = """
import sys
from pathlib import Path

from common.outbox import Outbox

outbox = Outbox(Path(sys.argv[1]), "receiver")
n = 0
while True:
    event_id = outbox.record("association", {"n": n, "pad": "x" * 200})
    sys.stdout.write(event_id + "\\n")
    sys.stdout.flush()
    n += 1
"""


def _record_until_killed(path: Path, wanted: int) -> list[str]:
    """Run a child that records in a loop, SIGKILL it mid-stream; the ids it saw returned."""
    child = subprocess.Popen(
        [sys.executable, "-c", _RECORDING_CHILD, str(path)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    assert child.stdout is not None
    reported: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(reported) < wanted and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            reported.append(line)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        reported += child.stdout.readlines()
    finally:
        child.kill()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert len(reported) >= wanted
    return [line.strip() for line in reported if line.endswith("\n")]


def test_kill_9_after_record_returned_loses_nothing(path: Path) -> None:
    confirmed: list[str] = []
    for _ in range(3):  # each kill lands mid-transaction; the next round recovers the WAL
        confirmed += _record_until_killed(path, wanted=200)

    with Outbox(path, "receiver") as box:
        stored = [event.id for event in box.pending(limit=100_000)]
    # every id the child saw returned is stored, in order; at most the one in flight per kill
    # was committed without being reported
    assert [event_id for event_id in stored if event_id in set(confirmed)] == confirmed
    assert len(stored) - len(confirmed) <= 3


def test_record_waits_for_another_writer_only_up_to_the_busy_timeout(path: Path) -> None:
    with Outbox(path, "receiver", busy_timeout=0.3) as box:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            started = time.monotonic()
            with pytest.raises(OutboxError, match="locked"):
                box.record("tick", {})
            assert 0.25 <= time.monotonic() - started < 5
            other.execute("ROLLBACK")
        finally:
            other.close()

        box.record("tick", {})
        assert box.count() == 1


def _record_from_process(path: str, worker: int, start: Any, events: int) -> None:
    """A worker process: open the outbox when told to, record ``events`` events, mixed API."""
    start.wait(30)
    with Outbox(Path(path), f"receiver-{worker}") as box:
        n = 0
        while n < events:
            if n % 10 == 0:
                box.record_many([("tick", {"worker": worker, "n": n + i}) for i in range(5)])
                n += 5
            else:
                box.record("tick", {"worker": worker, "n": n})
                n += 1


def test_concurrent_processes_record_into_one_outbox_without_loss(path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [
        ctx.Process(target=_record_from_process, args=(str(path), w, start, 300)) for w in range(4)
    ]
    for process in workers:
        process.start()
    start.set()  # all open the fresh file and record at once
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]

    with Outbox(path, "receiver") as box:
        events = box.pending(limit=10_000)
    assert len(events) == 4 * 300
    assert len({event.id for event in events}) == len(events)
    for w in range(4):
        mine = [event for event in events if event.producer == f"receiver-{w}"]
        assert [event.payload["n"] for event in mine] == list(range(300))
        assert all(event.payload["worker"] == w for event in mine)


def test_threads_share_one_outbox_safely(outbox: Outbox) -> None:
    errors: list[BaseException] = []

    def record(thread: int) -> None:
        try:
            for n in range(100):
                outbox.record("tick", {"thread": thread, "n": n})
                if n % 25 == 0:
                    outbox.pending(limit=10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    events = outbox.pending(limit=10_000)
    assert len(events) == 800
    for t in range(8):
        assert [e.payload["n"] for e in events if e.payload["thread"] == t] == list(range(100))
