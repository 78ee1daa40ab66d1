"""task.json: mercure's schema read and written unchanged, times in UTC, unknown keys kept."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from common.task import (
    Task,
    TaskDispatch,
    TaskDispatchStatus,
    TaskError,
    TaskInfo,
    TaskProcessing,
    TaskStudy,
    format_time,
    parse_task,
    read_task,
    write_task,
)

# mercure.md §4.3, "Illustrative instance" (a series-level `both` rule), verbatim.
MERCURE_TASK: dict[str, Any] = {
    "id": "5f1c2a3e-4b5d-11ef-9a2b-0242ac120002",
    "info": {
        "action": "both",
        "uid": "1.2.826.0.1.3680043.8.498.11",
        "uid_type": "series",
        "triggered_rules": {"ct_ai": True},
        "applied_rule": "ct_ai",
        "patient_name": "Doe^Jane",
        "mrn": "123456",
        "acc": "A0001",
        "sender_address": "10.0.0.12",
        "sender_aet": "CT01",
        "receiver_aet": "MERCURE",
        "device_serial_number": "45678",
        "fail_stage": None,
        "mercure_version": "0.4.1",
        "mercure_appliance": "master",
        "mercure_server": "mercure-host",
    },
    "dispatch": {
        "target_name": ["pacs"],
        "status": {"pacs": {"state": "waiting", "time": "2025-05-01 10:15:02"}},
        "retries": None,
        "next_retry_at": None,
        "series_uid": None,
    },
    "process": {
        "module_name": "segmenter",
        "module_config": {
            "docker_tag": "example/segmenter:1.0",
            "additional_volumes": "",
            "environment": "",
            "docker_arguments": "",
            "settings": {"threshold": 0.5},
            "contact": "",
            "comment": "",
            "constraints": "",
            "resources": "",
            "requires_root": False,
            "requires_persistence": False,
            "persistence_folder_name": "",
            "network_enabled": False,
        },
        "settings": {"threshold": 0.7},
        "retain_input_images": False,
        "output": None,
    },
    "study": {},
    "nomad_info": None,
}

CADUCEUS_INFO_FIELDS: dict[str, Any] = {
    "fail_reason": None,
    "created_at": None,
    "process_failures": 0,
    "process_engine_failures": 0,
    "process_next_retry_at": None,
}
CADUCEUS_MODULE_FIELDS: dict[str, Any] = {"timeout": None, "retries": 0}
CADUCEUS_STATUS_FIELDS: dict[str, Any] = {"attempts": 0, "last_error": None, "instances": {}}


@pytest.fixture
def local_time_utc_plus_2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's local time zone is UTC+2 (POSIX TZ syntax; needs no tz database)."""
    monkeypatch.setenv("TZ", "XXX-2")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def mercure_task() -> dict[str, Any]:
    return copy.deepcopy(MERCURE_TASK)


def test_illustrative_mercure_task_round_trips(local_time_utc_plus_2: None) -> None:
    task = parse_task(mercure_task())
    written = task.dump_for_file()

    expected = mercure_task()
    expected["info"].update(CADUCEUS_INFO_FIELDS)
    expected["dispatch"]["status"]["pacs"].update(CADUCEUS_STATUS_FIELDS)
    expected["process"]["module_config"].update(CADUCEUS_MODULE_FIELDS)
    # mercure's naive local time, written back as ISO 8601 UTC
    expected["dispatch"]["status"]["pacs"]["time"] = "2025-05-01T08:15:02.000Z"
    assert written == expected
    assert parse_task(written) == task


def test_task_file_round_trips_through_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    task = parse_task(mercure_task())
    write_task(path, task)
    assert read_task(path) == task
    assert json.loads(path.read_text(encoding="utf-8")) == task.dump_for_file()
    assert [p.name for p in tmp_path.iterdir()] == ["task.json"]  # no temporary file left


def test_mercure_naive_times_are_local_and_epoch_retry_time_is_read(
    local_time_utc_plus_2: None,
) -> None:
    data = mercure_task()
    data["dispatch"].update(retries=2, next_retry_at=1746087302.5)
    data["study"] = {
        "study_uid": "1.2.3",
        "complete_trigger": "received_series",
        "complete_required_series": "'Axial T2'",
        "creation_time": "2025-05-01 10:15:02",
        "last_receive_time": "2025-05-01 10:16:00",
        "received_series": ["Axial T2"],
        "received_series_uid": ["1.2.3.4"],
        "complete_force": False,
        "complete_force_action": "discard",
    }
    task = parse_task(data)
    assert task.study is not None
    assert task.study.creation_time == datetime(2025, 5, 1, 8, 15, 2, tzinfo=UTC)
    assert task.dispatch is not None
    assert task.dispatch.next_retry_at == datetime(2025, 5, 1, 8, 15, 2, 500000, tzinfo=UTC)
    written = task.dump_for_file()
    assert written["study"]["last_receive_time"] == "2025-05-01T08:16:00.000Z"
    assert written["dispatch"]["next_retry_at"] == "2025-05-01T08:15:02.500Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-05-01T10:15:02Z", datetime(2025, 5, 1, 10, 15, 2, tzinfo=UTC)),
        ("2025-05-01T12:15:02+02:00", datetime(2025, 5, 1, 10, 15, 2, tzinfo=UTC)),
        ("2025-05-01T10:15:02.123456+00:00", datetime(2025, 5, 1, 10, 15, 2, 123456, UTC)),
        ("2025-05-01 12:15:02", datetime(2025, 5, 1, 10, 15, 2, tzinfo=UTC)),  # local (UTC+2)
        (1746094502, datetime(2025, 5, 1, 10, 15, 2, tzinfo=UTC)),
    ],
)
def test_times_are_read_in_every_accepted_form(
    local_time_utc_plus_2: None, text: str | int, expected: datetime
) -> None:
    status = TaskDispatchStatus.model_validate({"state": "complete", "time": text})
    assert status.time == expected
    assert status.time.tzinfo is UTC


@pytest.mark.parametrize("bad", ["0001-01-01 00:00:00", 1e300, float("nan"), "yesterday", True])
def test_unusable_time_is_a_validation_error(local_time_utc_plus_2: None, bad: object) -> None:
    with pytest.raises(ValidationError):
        TaskDispatchStatus.model_validate({"state": "complete", "time": bad})


def test_times_are_written_as_fixed_width_utc() -> None:
    assert format_time(datetime(2025, 5, 1, 10, 15, 2, tzinfo=UTC)) == "2025-05-01T10:15:02.000Z"
    assert format_time(datetime(2025, 5, 1, 10, 15, 2, 999, tzinfo=UTC)) == (
        "2025-05-01T10:15:02.000Z"
    )


def test_mercure_zero_retry_time_means_no_wait() -> None:
    dispatch = TaskDispatch.model_validate({"target_name": "pacs", "next_retry_at": 0})
    assert dispatch.next_retry_at is None
    assert dispatch.target_name == ["pacs"]  # one name as a string, as mercure accepts


@pytest.mark.parametrize("absent", [{}, None])
def test_absent_blocks_are_none_and_written_as_empty_objects(absent: Any) -> None:
    data = mercure_task()
    data.update(dispatch=absent, process=absent, study=absent)
    task = parse_task(data)
    assert (task.dispatch, task.process, task.study) == (None, None, None)
    written = task.dump_for_file()
    assert (written["dispatch"], written["process"], written["study"]) == ({}, {}, {})


def test_processing_chain_is_a_list_of_steps() -> None:
    data = mercure_task()
    step = data["process"]
    data["process"] = [step, {**step, "module_name": "anonymizer", "settings": {}}]
    task = parse_task(data)
    assert [s.module_name for s in task.processing_steps] == ["segmenter", "anonymizer"]
    assert [s["module_name"] for s in task.dump_for_file()["process"]] == [
        "segmenter",
        "anonymizer",
    ]
    single = parse_task(mercure_task())
    assert [s.module_name for s in single.processing_steps] == ["segmenter"]


def test_unknown_keys_are_kept_reported_and_written_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = mercure_task()
    data["module_notes"] = {"model": "v2"}  # mercure's extra="forbid" would refuse the task
    data["info"]["site"] = "north"
    data["dispatch"]["status"]["pacs"]["peer"] = "orthanc"
    data["process"]["gpu"] = True
    path = tmp_path / "task.json"
    path.write_text(json.dumps(data), encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="common.task"):
        task = read_task(path)

    expected = ["module_notes", "info.site", "dispatch.status.pacs.peer", "process.gpu"]
    assert sorted(task.unknown_fields) == sorted(expected)
    assert len(caplog.records) == 1
    assert all(name in caplog.records[0].getMessage() for name in expected)
    write_task(path, task)
    again = json.loads(path.read_text(encoding="utf-8"))
    assert again["module_notes"] == {"model": "v2"}
    assert again["info"]["site"] == "north"
    assert again["dispatch"]["status"]["pacs"]["peer"] == "orthanc"
    assert again["process"]["gpu"] is True


def _invalid(data: dict[str, Any]) -> str:
    with pytest.raises(TaskError) as excinfo:
        parse_task(data, source="outgoing/x/task.json")
    return str(excinfo.value)


def test_errors_name_each_offending_field() -> None:
    data = mercure_task()
    del data["info"]["uid"]
    data["info"]["action"] = "forward"
    data["dispatch"]["status"]["pacs"]["time"] = "yesterday"
    data["dispatch"]["status"]["pacs"]["state"] = "sent"
    message = _invalid(data)
    assert message.startswith("invalid task in outgoing/x/task.json:")
    assert "\n  info.uid: Field required" in message
    assert "\n  info.action: Input should be 'route', 'both'" in message
    assert "\n  dispatch.status.pacs.time: 'yesterday' is not an ISO 8601 time" in message
    assert "\n  dispatch.status.pacs.state: Input should be 'waiting', 'complete'" in message


def test_errors_in_a_chain_name_the_step() -> None:
    data = mercure_task()
    data["process"] = [data["process"], {"settings": {}}]
    assert "process.1.module_name: Field required" in _invalid(data)
    data["process"] = "segmenter"
    assert "process: Input should be a valid dictionary" in _invalid(data)


def test_missing_id_and_info_are_named() -> None:
    message = _invalid({"dispatch": {}})
    assert "id: Field required" in message
    assert "info: Field required" in message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "x",', "invalid JSON at line 1, column 12"),
        ("[]", "a task must be a JSON object, not list"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
)
def test_unreadable_task_file_is_reported(
    tmp_path: Path, content: str | bytes, message: str
) -> None:
    path = tmp_path / "task.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskError, match=message):
        read_task(path)


def test_missing_task_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist"):
        read_task(tmp_path / "task.json")


def test_new_task_built_in_code_has_mercure_defaults() -> None:
    task = Task(
        id="t1",
        info=TaskInfo(action="route", uid="1.2.3", uid_type="series"),
        dispatch=TaskDispatch(target_name=["pacs", "orthanc"]),
        process=TaskProcessing(module_name="m"),
        study=TaskStudy(
            study_uid="1.2",
            creation_time=datetime(2025, 1, 1, tzinfo=UTC),
            last_receive_time=datetime(2025, 1, 1, tzinfo=UTC),
        ),
    )
    written = task.dump_for_file()
    assert written["info"]["patient_name"] == "MISSING"
    assert written["info"]["triggered_rules"] == {}
    assert written["nomad_info"] is None
    assert written["study"]["complete_force_action"] == "discard"
    assert parse_task(written) == task


def test_dispatch_tracks_each_target() -> None:
    dispatch = TaskDispatch(target_name=["pacs", "orthanc"])
    assert dispatch.pending_targets() == ["pacs", "orthanc"]
    status = dispatch.target_status("pacs")
    status.state = "complete"
    status.instances["1.2.3#4.dcm"] = 0x0000
    assert dispatch.pending_targets() == ["orthanc"]
    failed = dispatch.target_status("orthanc")
    failed.state = "error"
    failed.attempts += 1
    failed.last_error = "C-STORE status 0xA700"
    assert dispatch.pending_targets() == ["orthanc"]


def test_assignments_are_validated() -> None:
    info = TaskInfo(action="route", uid="1.2.3", uid_type="series")
    info.fail_stage = "DISPATCHING"
    with pytest.raises(ValidationError):
        info.fail_stage = "SENDING"  # type: ignore[assignment]
