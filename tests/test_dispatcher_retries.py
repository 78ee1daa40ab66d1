"""Failures and retries: per-target status, backoff, error/, and a peer that stops answering."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from bookkeeper.payloads import KNOWN_KINDS
from common.task import now_utc
from dispatcher.events import DispatchEvents
from dispatcher.execute import restart_task
from dispatcher.service import DispatcherService
from dispatcher.settings import DispatcherSettings
from tests.dicom_factory import Instance
from tests.dispatcher_helpers import (
    dicom_target,
    dispatcher_config,
    dispatcher_events,
    load,
    make_task,
    scp_peer,
    storescp,
    task_in,
)
from tests.helpers import OUT_OF_RESOURCES, free_port, wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.usefixtures("dcmtk")]

# pynetdicom 3.0.4 drops the socket of a refused TCP connection without closing it (transport.py
# AssociationSocket.connect: shutdown() raises ENOTCONN before close()); CPython closes it when
# the last reference goes, with a ResourceWarning. Harmless; ignored where a port is closed.
refused_connection_leaks_socket = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


def service_for(
    data_root: Path, targets: dict[str, dict[str, object]], **overrides: object
) -> DispatcherService:
    config = load(dispatcher_config(data_root, targets, **overrides))
    config.spool_paths().create()
    return DispatcherService(config, events=DispatchEvents.open(config.spool_paths().state))


@refused_connection_leaks_socket
def test_target_down_then_up_is_delivered_after_retries(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    port = free_port()
    targets = {"pacs": dicom_target(port)}
    make_task(_outgoing(data_root), "task-1", ct_series[:4], ["pacs"])

    service_for(data_root, targets, retry_delay=0.3, retry_max=10).once()  # nobody listens

    task = task_in(data_root / "outgoing", "task-1")
    assert task.dispatch is not None and task.dispatch.retries == 1
    status = task.dispatch.status["pacs"]
    assert status.state == "error"
    assert status.last_error is not None and "Connection refused" in status.last_error
    assert task.dispatch.next_retry_at is not None and task.dispatch.next_retry_at > now_utc()
    with storescp(tmp_path / "scp", port=port) as peer:

        def delivered() -> bool:
            service_for(data_root, targets, retry_delay=0.3, retry_max=10).once()
            return (data_root / "success" / "task-1").is_dir()

        wait_until(delivered, timeout=30, what="the task to be delivered", interval=0.2)
        assert len(peer.received()) == 4
    done = task_in(data_root / "success", "task-1")
    assert done.dispatch is not None and done.dispatch.status["pacs"].attempts == 2
    assert "dispatch_retry_scheduled" in [e.kind for e in dispatcher_events(data_root)]


def test_out_of_resources_goes_to_error_after_retry_max_with_the_status(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    make_task(_outgoing(data_root), "task-1", ct_series[:2], ["full"])
    with scp_peer(lambda _n: OUT_OF_RESOURCES) as peer:
        service_for(data_root, {"full": dicom_target(peer.port)}, retry_max=3).once()
    assert len(peer.received) == 3 * 2  # three attempts of two instances
    assert not (data_root / "outgoing" / "task-1").exists()
    task = task_in(data_root / "error", "task-1")
    assert task.info.fail_stage == "DISPATCHING"
    assert task.info.fail_reason is not None and "0xA700 Out of Resources" in task.info.fail_reason
    assert task.dispatch is not None and task.dispatch.retries == 3
    status = task.dispatch.status["full"]
    assert status.attempts == 3 and set(status.instances.values()) == {0xA700}
    events = dispatcher_events(data_root)
    failed = [e for e in events if e.kind == "dispatch_failed"]
    assert len(failed) == 1 and "0xA700" in failed[0].payload["reason"]
    moved = [e.payload for e in events if e.kind == "task_moved"]
    assert moved == [{"task_id": "task-1", "from": "outgoing/task-1", "to": "error/task-1"}]
    for event in events:  # what the bookkeeper projects must pass its payload check
        if event.kind in KNOWN_KINDS:
            KNOWN_KINDS[event.kind].model_validate(event.payload)
    suspended = [
        e.payload for e in events if e.kind == "task_event" and e.payload["event"] == "SUSPEND"
    ]
    assert len(suspended) == 1


@refused_connection_leaks_socket
def test_failed_task_restarts_from_error(tmp_path: Path, ct_series: list[Instance]) -> None:
    data_root = tmp_path / "data"
    make_task(_outgoing(data_root), "task-1", ct_series[:2], ["pacs"])
    service_for(data_root, {"pacs": dicom_target(free_port())}, retry_max=1).once()
    assert (data_root / "error" / "task-1").is_dir()

    restart_task(load(dispatcher_config(data_root, {})).spool_paths(), "task-1")

    with storescp(tmp_path / "scp") as peer:
        service_for(data_root, {"pacs": dicom_target(peer.port)}, retry_max=1).once()
    task = task_in(data_root / "success", "task-1")
    assert task.info.fail_stage is None and task.info.fail_reason is None


def test_a_peer_that_stops_answering_is_aborted_and_only_unacknowledged_instances_resent(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    sent = ct_series[:8]
    make_task(_outgoing(data_root), "task-1", sent, ["pacs"])
    dimse_timeout = 2.0
    with scp_peer(lambda n: None if n == 3 else 0) as peer:  # never answers the 3rd C-STORE
        service = service_for(
            data_root,
            {"pacs": dicom_target(peer.port)},
            dispatcher_dimse_timeout=dimse_timeout,
            retry_delay=0,
        )
        started = time.monotonic()
        service.once()
        elapsed = time.monotonic() - started
    assert elapsed < dimse_timeout + 10, f"the dispatcher waited {elapsed:.1f} s"
    uids = sorted(instance.sop_instance_uid for instance in sent)  # files go in name order
    # First association: 1, 2 answered, 3 unanswered (aborted); second: exactly 3..8.
    assert peer.received == uids[:3] + uids[2:]
    assert peer.associations == 2
    task = task_in(data_root / "success", "task-1")
    assert task.dispatch is not None
    status = task.dispatch.status["pacs"]
    assert status.attempts == 2 and len(status.instances) == 8
    first_error = next(
        e.payload["error"] for e in dispatcher_events(data_root) if e.kind == "dispatch_target_done"
    )
    assert "no C-STORE response" in first_error and "5 instance(s) not sent" in first_error


def test_with_two_targets_only_the_failing_one_is_retried(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    make_task(_outgoing(data_root), "task-1", ct_series[:3], ["good", "flaky"])
    # The flaky peer refuses every instance of the first association, then stores.
    with (
        storescp(tmp_path / "scp") as good,
        scp_peer(lambda n: OUT_OF_RESOURCES if n <= 3 else 0) as flaky,
    ):
        service_for(
            data_root, {"good": dicom_target(good.port), "flaky": dicom_target(flaky.port)}
        ).once()
        good_files = sorted(good.out_dir.glob("*.dcm"))
    assert len(good_files) == 3
    assert len(flaky.received) == 6 and flaky.associations == 2
    task = task_in(data_root / "success", "task-1")
    assert task.dispatch is not None
    assert task.dispatch.status["good"].attempts == 1
    assert task.dispatch.status["flaky"].attempts == 2
    done = [
        (e.payload["target"], e.payload["ok"])
        for e in dispatcher_events(data_root)
        if e.kind == "dispatch_target_done"
    ]
    assert done == [("good", True), ("flaky", False), ("flaky", True)]


def test_unsupported_target_type_fails_at_once_with_a_clear_reason(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    make_task(_outgoing(data_root), "task-1", ct_series[:1], ["remote"])
    sftp = {"target_type": "sftp", "folder": "/in", "user": "u", "host": "h"}
    service_for(data_root, {"remote": sftp}, retry_max=5).once()
    task = task_in(data_root / "error", "task-1")
    assert task.info.fail_reason == "remote: target type 'sftp' is not supported yet"
    assert task.dispatch is not None and task.dispatch.retries == 1


def test_unknown_target_fails_with_its_name(tmp_path: Path, ct_series: list[Instance]) -> None:
    data_root = tmp_path / "data"
    make_task(_outgoing(data_root), "task-1", ct_series[:1], ["gone"])
    service_for(data_root, {}).once()
    task = task_in(data_root / "error", "task-1")
    assert task.info.fail_reason == "gone: target 'gone' is not configured"


def test_backoff_grows_exponentially_up_to_the_maximum() -> None:
    settings = DispatcherSettings(retry_delay=10, retry_multiplier=3, retry_max_delay=100)
    assert [settings.retry_wait(n) for n in range(1, 6)] == [10, 30, 90, 100, 100]
    assert DispatcherSettings(retry_delay=900, retry_multiplier=1).retry_wait(4) == 900


@refused_connection_leaks_socket
def test_next_retry_at_follows_the_backoff(tmp_path: Path, ct_series: list[Instance]) -> None:
    data_root = tmp_path / "data"
    make_task(_outgoing(data_root), "task-1", ct_series[:1], ["pacs"])
    before = now_utc()
    service_for(
        data_root, {"pacs": dicom_target(free_port())}, retry_delay=60, retry_multiplier=2
    ).once()
    task = task_in(data_root / "outgoing", "task-1")
    assert task.dispatch is not None and task.dispatch.next_retry_at is not None
    wait = task.dispatch.next_retry_at - before
    assert timedelta(seconds=59) < wait < timedelta(seconds=70)


def _outgoing(data_root: Path) -> Path:
    outgoing = data_root / "outgoing"
    outgoing.mkdir(parents=True, exist_ok=True)
    return outgoing


def test_a_file_that_is_not_dicom_fails_the_task_at_once(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    folder = make_task(_outgoing(data_root), "task-1", ct_series[:1], ["pacs"])
    (folder / "notes.dcm").write_text("not DICOM at all")
    with scp_peer() as peer:
        service_for(data_root, {"pacs": dicom_target(peer.port)}, retry_max=5).once()
    assert peer.received == []
    task = task_in(data_root / "error", "task-1")
    assert task.info.fail_reason == (
        "pacs: notes.dcm is not a readable DICOM file: "
        "no 'DICM' prefix after a 128-byte preamble (PS3.10 7.1)"
    )
