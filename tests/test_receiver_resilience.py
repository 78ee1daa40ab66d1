"""Concurrent senders, a full disk, SIGTERM and kill -9 mid-transfer: no acknowledged image lost,
no partial file visible."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from tests import dicom_factory
from tests.dicom_factory import Instance
from tests.helpers import (
    OUT_OF_RESOURCES,
    SUCCESS,
    ReceiverFactory,
    all_files,
    assert_only_complete_pairs,
    assert_stored_as_sent,
    associate,
    close_broken,
    contexts_for,
    parse_storescu,
    pynetdicom_store,
    store_status,
    stored_paths,
    storescu_command,
    temp_files,
    wait_until,
)

LONG_SERIES_SLICES = 120


@pytest.fixture(scope="session")
def long_series(data_dir: Path) -> list[Instance]:
    """A 60 MB series: long enough to interrupt a transfer in the middle."""
    return dicom_factory.ct_series(data_dir / "long", LONG_SERIES_SLICES, seed="long")


@pytest.fixture(scope="session")
def big_object(data_dir: Path) -> Instance:
    """One 64 MB multi-frame object: a transfer that is certainly in progress for a while."""
    return dicom_factory.multiframe(data_dir / "big", seed="big", frames=128, rows=512, columns=512)


@contextlib.contextmanager
def storescu_running(port: int, files: list[Path], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """storescu -v sending ``files`` in the background, its output in ``log``; killed on exit."""
    with log.open("wb") as out:
        sender = subprocess.Popen(
            storescu_command(port, files), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield sender
    finally:
        if sender.poll() is None:
            sender.kill()
        sender.wait(timeout=30)


def large_temp_files(incoming: Path, min_size: int) -> list[Path]:
    """Temporary files in ``incoming/.tmp`` larger than ``min_size`` bytes."""
    found = []
    for path in temp_files(incoming):
        with contextlib.suppress(FileNotFoundError):  # renamed in the meantime
            if path.stat().st_size > min_size:
                found.append(path)
    return found


def stored_dcm_count(incoming: Path) -> int:
    return sum(1 for _ in incoming.glob("*/*.dcm"))


def assert_everything_visible_is_complete(incoming: Path, sent: list[Instance]) -> None:
    """Only whole ``.dcm``+``.tags`` pairs in series folders, each identical to what was sent."""
    by_name = {stored_paths(incoming, i)[0].name: i for i in sent}
    for dcm in assert_only_complete_pairs(incoming):
        assert dcm.name in by_name, f"unexpected file {dcm}"
        assert_stored_as_sent(incoming, by_name[dcm.name])


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.usefixtures("dcmtk")
def test_four_concurrent_storescu_senders_all_land_complete(
    receiver: ReceiverFactory, data_dir: Path, tmp_path: Path
) -> None:
    rx = receiver()
    series = [
        dicom_factory.ct_series(data_dir / f"concurrent{n}", 8, seed=f"concurrent{n}")
        for n in range(4)
    ]

    with contextlib.ExitStack() as stack:
        senders = [
            stack.enter_context(
                storescu_running(rx.port, [i.path for i in s], tmp_path / f"storescu{n}.log")
            )
            for n, s in enumerate(series)
        ]
        codes = [p.wait(timeout=120) for p in senders]

    for n, (code, sent) in enumerate(zip(codes, series, strict=True)):
        output = (tmp_path / f"storescu{n}.log").read_text()
        assert code == 0, output
        assert parse_storescu(output) == [i.path for i in sent]
    everything = [i for s in series for i in s]
    for instance in everything:
        assert_stored_as_sent(rx.incoming, instance)
    assert len(assert_only_complete_pairs(rx.incoming)) == len(everything)
    assert temp_files(rx.incoming) == []


@pytest.mark.root
@pytest.mark.slow
def test_full_disk_answers_out_of_resources_and_leaves_no_partial_file(
    small_fs: Callable[[int], Path], receiver: ReceiverFactory, data_dir: Path
) -> None:
    data_root = small_fs(4)
    rx = receiver(data_root=data_root, min_free_space_mb=0)
    sent = dicom_factory.ct_series(data_dir / "fill", 12, seed="fill")  # 6 MB for 4 MB of disk

    statuses = pynetdicom_store(rx.port, [i.path for i in sent], contexts=contexts_for(sent))

    assert SUCCESS in statuses, "not even one instance fitted: the test proves nothing"
    assert OUT_OF_RESOURCES in statuses, f"the disk never filled up: {statuses}"
    assert set(statuses) == {SUCCESS, OUT_OF_RESOURCES}
    acknowledged = [i for i, s in zip(sent, statuses, strict=True) if s == SUCCESS]
    refused = [i for i, s in zip(sent, statuses, strict=True) if s != SUCCESS]
    for instance in acknowledged:
        assert_stored_as_sent(rx.incoming, instance)
    for instance in refused:
        dcm, tags = stored_paths(rx.incoming, instance)
        assert not dcm.exists() and not tags.exists(), f"refused {dcm.name} is visible"
    assert_everything_visible_is_complete(rx.incoming, sent)
    wait_until(lambda: not temp_files(rx.incoming), timeout=10, what="incoming/.tmp to empty")

    # The receiver survives: once space is freed, the refused instances are stored.
    for dcm in rx.incoming.glob("*/*"):
        dcm.unlink()
    retry = refused[:2]
    assert pynetdicom_store(rx.port, [i.path for i in retry], contexts=contexts_for(retry)) == [
        SUCCESS
    ] * len(retry)
    for instance in retry:
        assert_stored_as_sent(rx.incoming, instance)


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.usefixtures("dcmtk")
def test_sigterm_mid_transfer_exits_zero_and_keeps_every_acknowledged_instance(
    receiver: ReceiverFactory, long_series: list[Instance], tmp_path: Path
) -> None:
    rx = receiver()
    log = tmp_path / "storescu.log"
    with storescu_running(rx.port, [i.path for i in long_series], log) as sender:
        wait_until(lambda: stored_dcm_count(rx.incoming) >= 3, timeout=60, what="3 stored slices")
        rx.process.send_signal(signal.SIGTERM)
        code = rx.process.wait(timeout=60)
        sender.wait(timeout=60)

    assert code == 0, "the receiver must exit 0 after SIGTERM"
    acknowledged = parse_storescu(log.read_text())
    assert 1 <= len(acknowledged) < len(long_series), (
        f"{len(acknowledged)} of {len(long_series)} acknowledged: the receiver did not stop "
        "in the middle of the association"
    )
    for path in acknowledged:
        assert_stored_as_sent(rx.incoming, dicom_factory.describe(path))
    assert_everything_visible_is_complete(rx.incoming, long_series)
    assert temp_files(rx.incoming) == [], "a stopped receiver left temporary files"


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.usefixtures("dcmtk")
def test_kill_9_mid_transfer_leaves_only_complete_pairs_and_every_acknowledged_one(
    receiver: ReceiverFactory, long_series: list[Instance], tmp_path: Path
) -> None:
    rx = receiver()
    log = tmp_path / "storescu.log"
    with storescu_running(rx.port, [i.path for i in long_series], log) as sender:
        wait_until(
            lambda: stored_dcm_count(rx.incoming) >= 3 and temp_files(rx.incoming),
            timeout=60,
            what="3 stored slices and one being written",
        )
        rx.kill()
        sender.wait(timeout=60)

    acknowledged = parse_storescu(log.read_text())
    assert 1 <= len(acknowledged) < len(long_series)
    for path in acknowledged:
        assert_stored_as_sent(rx.incoming, dicom_factory.describe(path))
    assert_everything_visible_is_complete(rx.incoming, long_series)


@pytest.mark.slow
def test_restart_after_kill_9_removes_the_dead_processes_temp_files(
    receiver: ReceiverFactory, big_object: Instance
) -> None:
    rx = receiver()
    dataset = pydicom.dcmread(big_object.path)
    result = associate(rx.port, contexts_for([big_object]))
    assert result.assoc.is_established
    sending = threading.Thread(target=store_status, args=(result.assoc, dataset), daemon=True)
    sending.start()
    try:
        leftovers = wait_until(
            lambda: large_temp_files(rx.incoming, 1 << 20),
            timeout=60,
            what="the big object being written into incoming/.tmp",
        )
        rx.kill()
        sending.join(timeout=60)
        assert not sending.is_alive()
    finally:
        if result.assoc.is_established:
            result.assoc.abort()
        close_broken(result.assoc)
    assert all(p.exists() for p in leftovers), "precondition: the temp file outlived the kill"
    assert [p for p in all_files(rx.incoming) if ".tmp" not in p.parts] == []

    restarted = receiver.restart(rx)

    survivors = [p.name for p in leftovers if p.exists()]
    assert survivors == [], "stale temp files of the killed processes survived the restart"
    statuses = pynetdicom_store(
        restarted.port, [big_object.path], contexts=contexts_for([big_object])
    )
    assert statuses == [SUCCESS]
    assert_stored_as_sent(restarted.incoming, big_object)
    assert temp_files(restarted.incoming) == []
