"""The query API: series search (every filter, paging, sorting), series detail, task timelines,
module logs and results, recent errors and dashboard statistics.

Each backend's bookkeeper is seeded once, through ``POST /v1/events``, with a small history of
the last hours (:func:`seed`). Tests that add events of their own date them in 2020 and use
names of their own, so that the seeded answers stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.pg import (
    BACKENDS,
    Bookkeeper,
    event,
    iso,
    post,
    running_bookkeeper,
    series_received,
    unique_uid,
)

LONG_AGO = datetime(2020, 1, 1, 9, 0, tzinfo=UTC)


def at(text: str) -> datetime:
    """A time the API answered (ISO 8601, ``Z``)."""
    return datetime.fromisoformat(text)


def hour(time: datetime) -> datetime:
    return time.replace(minute=0, second=0, microsecond=0)


@dataclass
class Seed:
    now: datetime
    uids: dict[str, str]
    """Series name in this module (S1..S6) -> SeriesInstanceUID."""
    times: dict[str, datetime]
    """Series name -> last reception."""
    tasks: dict[str, str]
    """Task name in this module -> task id."""

    def names(self, items: list[dict[str, Any]]) -> list[str]:
        by_uid = {uid: name for name, uid in self.uids.items()}
        return [by_uid.get(item["series_uid"], item["series_uid"]) for item in items]


def _tags(name: str, patient_id: str, accession: str, modality: str) -> dict[str, str]:
    return {
        "PatientName": name,
        "PatientID": patient_id,
        "AccessionNumber": accession,
        "Modality": modality,
        "StudyDescription": f"{modality} study",
        "SeriesDescription": f"{modality} series",
        "StudyDate": "20240501",
    }


def seed(client: httpx.Client) -> Seed:
    """Six series, two task trees, their events, logs, outputs, system and audit events."""
    now = datetime.now(UTC)
    ago = {n: now - timedelta(hours=n) for n in range(8)}
    uids = {f"S{n}": unique_uid() for n in range(1, 7)}
    studies = {name: unique_uid() for name in ("ST1", "ST2", "ST3", "ST4")}
    tasks = {name: f"task-{name}-{unique_uid()}" for name in ("T1", "T1a", "T1b", "T2")}
    series = [
        ("S1", "DOE^JOHN", "P-001", "A-1", "CT", "ST1", "CT_SCANNER", ago[5], 3),
        ("S2", "DOE^JANE", "P-002", "A-2", "MR", "ST2", "MR_SCANNER", ago[4], 5),
        ("S3", "O'BRIEN^PAT", "P-003", "A-3", "CT", "ST2", "CT_SCANNER", ago[3], 1),
        ("S4", "MÜLLER^JÜRGEN", "P-004", "A-4", "US", "ST3", "US_CART", ago[2], 2),
        ("S5", "DOE^JOHN", "P-001", "A-1", "CT", "ST1", "CT_SCANNER", ago[1], 2),
        ("S6", "100%_SURE^X", "P-006", "A-6", "OT", "ST4", "OTHER", ago[6], 1),
    ]
    events = [
        series_received(
            uids[name],
            study_uid=studies[study],
            count=count,
            tags=_tags(patient, patient_id, accession, modality),
            calling_ae=sender,
            time=time,
        )
        for name, patient, patient_id, accession, modality, study, sender, time, count in series
    ]
    # S5 arrives over a second association too, half an hour later.
    events.append(series_received(uids["S5"], count=2, time=now - timedelta(minutes=30)))
    t1, t1a, t1b, t2 = (tasks[name] for name in ("T1", "T1a", "T1b", "T2"))
    events += [
        event("task_update", {"task_id": t1, "series_uid": uids["S1"], "rule": "CT_RULE",
                              "target": "PACS", "status": "complete",
                              "data": {"id": t1, "info": {"uid": uids["S1"]}}},
              time=ago[5] + timedelta(minutes=1), producer="router"),
        event("task_update", {"task_id": t1a, "parent_id": t1, "rule": "CT_RULE",
                              "target": "PACS", "status": "complete"},
              time=ago[5] + timedelta(minutes=2), producer="router"),
        event("task_update", {"task_id": t1b, "parent_id": t1, "rule": "CT_AI",
                              "target": ["AI_NODE"], "status": "error"},
              time=ago[5] + timedelta(minutes=2), producer="router"),
        event("task_update", {"task_id": t2, "series_uid": uids["S2"], "rule": "MR_RULE",
                              "status": "routed"},
              time=ago[4] + timedelta(minutes=1), producer="router"),
        event("task_event", {"task_id": t1, "event": "REGISTER", "info": "1 rule"},
              time=ago[5] + timedelta(minutes=1), producer="router"),
        event("task_event", {"task_id": t1a, "event": "DISPATCH_BEGIN", "target": "PACS"},
              time=ago[5] + timedelta(minutes=5), producer="dispatcher"),
        event("task_event", {"task_id": t1a, "event": "DISPATCH_COMPLETE", "file_count": 3},
              time=ago[5] + timedelta(minutes=10), producer="dispatcher"),
        event("task_event", {"task_id": t1b, "event": "PROCESS_BEGIN"},
              time=ago[5] + timedelta(minutes=6), producer="processor"),
        event("task_event", {"task_id": t1b, "event": "ERROR", "info": "module crashed"},
              time=ago[5] + timedelta(minutes=20), producer="processor"),
        event("task_event", {"task_id": t1, "event": "COMPLETE"},
              time=ago[5] + timedelta(minutes=30), producer="router"),
        event("task_event", {"task_id": t2, "event": "REGISTER"},
              time=ago[4] + timedelta(minutes=1), producer="router"),
        event("task_event", {"task_id": t2, "event": "NOTIFICATION", "severity": "WARNING",
                             "info": "webhook slow"},
              time=ago[4] + timedelta(minutes=2), producer="router"),
        event("module_log", {"task_id": t1b, "module": "ai-seg", "logs": "step 1\nstep 2\n"},
              time=ago[5] + timedelta(minutes=19), producer="processor"),
        event("module_output", {"task_id": t1b, "module": "ai-seg", "index": 0,
                                "settings": {"threshold": 0.5}, "output": {"score": 0.9}},
              time=ago[5] + timedelta(minutes=19), producer="processor"),
        event("system_event", {"event": "BOOT", "description": "router started"},
              time=ago[6], producer="router"),
        event("system_event", {"event": "DISK", "severity": "critical",
                               "description": "disk full"},
              time=ago[3], producer="cleaner"),
        event("outbox_overflow", {"dropped": 12, "kinds": {"series_received": 12},
                                  "first_dropped_at": iso(ago[3]),
                                  "last_dropped_at": iso(ago[2]), "max_bytes": 1024},
              time=now - timedelta(hours=2, minutes=30), producer="receiver"),
        event("audit_event", {"event": "LOGIN", "user": "admin"}, producer="webgui"),
        event("config_version", {"user": "admin", "content": {"port": 11112}},
              producer="webgui"),
    ]  # fmt: skip
    result = post(client, events)
    assert result == {"stored": len(events), "duplicates": 0}
    times = {name: time for name, *_, time, _count in series}
    times["S5"] = now - timedelta(minutes=30)
    return Seed(now=now, uids=uids, times=times, tasks=tasks)


@pytest.fixture(scope="module", params=BACKENDS)
def bookkeeper(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bookkeeper]:
    with running_bookkeeper(request.param, tmp_path_factory.mktemp("bookkeeper"), "query") as bk:
        yield bk


@pytest.fixture(scope="module")
def seeded(bookkeeper: Bookkeeper) -> Seed:
    return seed(bookkeeper.client())


@pytest.fixture
def client(bookkeeper: Bookkeeper) -> httpx.Client:
    return bookkeeper.client()


def search(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/series", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def recent(seed: Seed) -> dict[str, str]:
    """Limits a search to the seeded series."""
    return {"received_from": iso(seed.now - timedelta(hours=7))}


# ---------------------------------------------------------------------------- series search


@pytest.mark.parametrize(
    ("name", "match", "expected"),
    [
        ("doe", "prefix", {"S1", "S2", "S5"}),
        ("DOE^JA", "prefix", {"S2"}),
        ("Doe J", "prefix", {"S1", "S2", "S5"}),
        ("doe  john", "prefix", {"S1", "S5"}),
        ("müller", "prefix", {"S4"}),
        ("MÜLLER^JÜ", "prefix", {"S4"}),
        ("o'brien", "prefix", {"S3"}),
        ("john", "prefix", set()),
        ("john", "contains", {"S1", "S5"}),
        ("JA", "contains", {"S2"}),
        ("100%", "prefix", {"S6"}),
        ("%", "contains", {"S6"}),
        ("_", "contains", {"S6"}),
        ("1__%", "prefix", set()),
    ],
)
def test_patient_name_search_is_case_insensitive_and_takes_wildcards_literally(
    client: httpx.Client, seeded: Seed, name: str, match: str, expected: set[str]
) -> None:
    found = search(client, patient_name=name, name_match=match, **recent(seeded))

    assert set(seeded.names(found["items"])) == expected


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("patient_id", "P-001", {"S1", "S5"}),
        ("accession_number", "A-2", {"S2"}),
        ("modality", "CT", {"S1", "S3", "S5"}),
        ("sender_aet", "CT_SCANNER", {"S1", "S3", "S5"}),
        ("sender_aet", "ct_scanner", set()),
        ("rule", "CT_AI", {"S1"}),
        ("rule", "MR_RULE", {"S2"}),
        ("rule", "NO_SUCH_RULE", set()),
        ("status", "complete", {"S1"}),
        ("status", "routed", {"S2"}),
        ("status", "received", {"S3", "S4", "S5", "S6"}),
    ],
)
def test_series_search_filters_by_each_field(
    client: httpx.Client, seeded: Seed, field: str, value: str, expected: set[str]
) -> None:
    found = search(client, **{field: value}, **recent(seeded))

    assert set(seeded.names(found["items"])) == expected


def test_series_search_by_study_and_series_uid(client: httpx.Client, seeded: Seed) -> None:
    one = search(client, series_uid=seeded.uids["S3"])["items"]
    assert seeded.names(one) == ["S3"]
    study = one[0]["study_uid"]

    assert set(seeded.names(search(client, study_uid=study)["items"])) == {"S2", "S3"}


def test_filters_combine(client: httpx.Client, seeded: Seed) -> None:
    found = search(client, modality="CT", patient_name="doe", **recent(seeded))

    assert set(seeded.names(found["items"])) == {"S1", "S5"}


def test_series_search_by_time_range_of_the_last_reception(
    client: httpx.Client, seeded: Seed
) -> None:
    window = {
        "received_from": iso(seeded.times["S3"]),  # inclusive
        "received_to": iso(seeded.times["S4"] + timedelta(minutes=1)),
    }
    assert set(seeded.names(search(client, **window)["items"])) == {"S3", "S4"}

    naive = seeded.times["S3"].replace(tzinfo=None).isoformat()  # taken as UTC
    found = search(
        client, received_from=naive, received_to=iso(seeded.times["S3"] + timedelta(seconds=1))
    )
    assert seeded.names(found["items"]) == ["S3"]


def test_paging_returns_every_match_once_with_has_more_and_total(
    client: httpx.Client, seeded: Seed
) -> None:
    pages = []
    offset = 0
    while True:
        page = search(client, limit=4, offset=offset, count=True, **recent(seeded))
        assert page["total"] == 6
        pages.append(page)
        offset += 4
        if not page["has_more"]:
            break

    names = [name for page in pages for name in seeded.names(page["items"])]
    assert [len(page["items"]) for page in pages] == [4, 2]
    assert names == ["S5", "S4", "S3", "S2", "S1", "S6"]  # newest reception first
    assert search(client, limit=4, **recent(seeded))["total"] is None


@pytest.mark.parametrize(
    ("sort", "key"),
    [
        ("received", "last_received_at"),
        ("first_received", "first_received_at"),
        ("patient_id", "patient_id"),
        ("accession_number", "accession_number"),
        ("modality", "modality"),
        ("instance_count", "instance_count"),
        ("series_uid", "series_uid"),
        ("status", "status"),
        ("study_date", "study_date"),
    ],
)
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_series_are_sorted_by_the_chosen_field(
    client: httpx.Client, seeded: Seed, sort: str, key: str, order: str
) -> None:
    items = search(client, sort=sort, order=order, **recent(seeded))["items"]

    values = [at(item[key]) if key.endswith("_at") else item[key] for item in items]
    assert values == sorted(values, reverse=order == "desc")
    assert len(items) == 6


def test_sorting_by_patient_name_ignores_case_and_carets(
    client: httpx.Client, seeded: Seed
) -> None:
    items = search(client, sort="patient_name", order="asc", **recent(seeded))["items"]

    assert [item["patient_name"] for item in items] == [
        "100%_SURE^X",
        "DOE^JANE",
        "DOE^JOHN",
        "DOE^JOHN",
        "MÜLLER^JÜRGEN",
        "O'BRIEN^PAT",
    ]


@pytest.mark.parametrize(
    "params",
    [
        {"sort": "patient_birth_date"},
        {"sort": "id; DROP TABLE series"},
        {"order": "sideways"},
        {"limit": 0},
        {"limit": 501},
        {"offset": -1},
        {"received_from": "yesterday"},
        {"patient_name": "a\x00b"},
        {"name_match": "regex"},
        {"patient_id": "x" * 257},
    ],
)
def test_invalid_search_parameters_are_422_naming_the_parameter(
    client: httpx.Client, params: dict[str, Any]
) -> None:
    response = client.get("/v1/series", params=params)

    assert response.status_code == 422, response.text
    assert [problem["field"] for problem in response.json()["detail"]] == list(params)


# ---------------------------------------------------------------------------- one series


def test_series_detail_has_its_tags_receptions_files_and_tasks(
    client: httpx.Client, seeded: Seed
) -> None:
    detail = client.get(f"/v1/series/{seeded.uids['S5']}").json()

    assert detail["patient_name"] == "DOE^JOHN"
    assert detail["study_description"] == "CT study"
    assert detail["tags"]["PatientID"] == "P-001"
    assert detail["instance_count"] == 4
    assert len(detail["receptions"]) == 2
    assert [r["instance_count"] for r in detail["receptions"]] == [2, 2]
    assert detail["files_total"] == 4
    assert [f["sop_uid"] for f in detail["files"]] == [
        f"{seeded.uids['S5']}.{n}" for n in (1, 2, 1, 2)
    ]
    assert at(detail["first_received_at"]) < at(detail["last_received_at"])

    s1 = client.get(f"/v1/series/{seeded.uids['S1']}").json()
    assert {task["id"] for task in s1["tasks"]} == {
        seeded.tasks["T1"],
        seeded.tasks["T1a"],
        seeded.tasks["T1b"],
    }
    assert s1["status"] == "complete"


def test_series_files_are_paged(client: httpx.Client, seeded: Seed) -> None:
    uid = seeded.uids["S5"]
    first = client.get(f"/v1/series/{uid}", params={"files_limit": 3}).json()
    rest = client.get(f"/v1/series/{uid}", params={"files_limit": 3, "files_offset": 3}).json()

    assert len(first["files"]) == 3
    assert len(rest["files"]) == 1
    assert first["files_total"] == rest["files_total"] == 4


def test_an_unknown_series_is_404(client: httpx.Client) -> None:
    response = client.get(f"/v1/series/{unique_uid()}")

    assert response.status_code == 404
    assert response.json() == {"detail": "no such series"}


# ---------------------------------------------------------------------------- tasks


def test_a_task_timeline_has_its_subtasks_and_all_their_events_in_time_order(
    client: httpx.Client, seeded: Seed
) -> None:
    t1, t1a, t1b = (seeded.tasks[name] for name in ("T1", "T1a", "T1b"))

    timeline = client.get(f"/v1/tasks/{t1}").json()

    assert timeline["task"]["id"] == t1
    assert timeline["task"]["rule"] == "CT_RULE"
    assert timeline["task"]["data"]["info"]["uid"] == seeded.uids["S1"]
    assert {sub["id"] for sub in timeline["subtasks"]} == {t1a, t1b}
    subtasks = {sub["id"]: sub for sub in timeline["subtasks"]}
    assert subtasks[t1a]["series_uid"] == seeded.uids["S1"]  # inherited from the parent
    assert subtasks[t1b]["target"] == "AI_NODE"
    assert [(e["task_id"], e["event"]) for e in timeline["events"]] == [
        (t1, "REGISTER"),
        (t1a, "DISPATCH_BEGIN"),
        (t1b, "PROCESS_BEGIN"),
        (t1a, "DISPATCH_COMPLETE"),
        (t1b, "ERROR"),
        (t1, "COMPLETE"),
    ]
    error = timeline["events"][4]
    assert error["severity"] == "error"
    assert error["info"] == "module crashed"
    assert error["rule"] == "CT_AI"  # from the task
    assert timeline["events"][3]["file_count"] == 3


def test_a_subtask_timeline_has_only_its_own_events(client: httpx.Client, seeded: Seed) -> None:
    timeline = client.get(f"/v1/tasks/{seeded.tasks['T1a']}").json()

    assert timeline["task"]["parent_id"] == seeded.tasks["T1"]
    assert timeline["subtasks"] == []
    assert [e["event"] for e in timeline["events"]] == ["DISPATCH_BEGIN", "DISPATCH_COMPLETE"]


def test_module_logs_and_results_of_a_task_include_its_subtasks(
    client: httpx.Client, seeded: Seed
) -> None:
    t1 = seeded.tasks["T1"]

    logs = client.get(f"/v1/tasks/{t1}/logs").json()
    results = client.get(f"/v1/tasks/{t1}/results").json()

    assert logs["task_id"] == t1
    assert [(log["module"], log["logs"]) for log in logs["items"]] == [
        ("ai-seg", "step 1\nstep 2\n")
    ]
    assert [(r["module"], r["index"], r["output"], r["settings"]) for r in results["items"]] == [
        ("ai-seg", 0, {"score": 0.9}, {"threshold": 0.5})
    ]
    assert client.get(f"/v1/tasks/{seeded.tasks['T2']}/logs").json()["items"] == []


@pytest.mark.parametrize("suffix", ["", "/logs", "/results"])
def test_an_unknown_task_is_404(client: httpx.Client, suffix: str) -> None:
    response = client.get(f"/v1/tasks/no-such-task{suffix}")

    assert response.status_code == 404
    assert response.json() == {"detail": "no such task"}


def test_task_snapshots_merge_and_an_older_one_only_fills_gaps(client: httpx.Client) -> None:
    uid = unique_uid()
    task_id = f"merge-{uid}"
    when = [LONG_AGO + timedelta(hours=n) for n in range(4)]
    post(client, [series_received(uid, time=when[0])])
    snapshots = [
        ({"series_uid": uid, "rule": "M", "status": "routed", "data": {"v": 1}}, when[1]),
        ({"status": "complete", "data": {"v": 3}}, when[3]),
        ({"status": "processing", "target": "PACS", "data": {"v": 2}}, when[2]),  # older
    ]
    for fields, time in snapshots:
        post(client, [event("task_update", {"task_id": task_id, **fields}, time=time)])
    task = client.get(f"/v1/tasks/{task_id}").json()["task"]
    series = client.get(f"/v1/series/{uid}").json()

    assert (task["status"], task["rule"], task["target"], task["data"]) == (
        "complete",
        "M",
        "PACS",
        {"v": 3},
    )
    assert (at(task["created_at"]), at(task["updated_at"])) == (when[1], when[3])
    assert (series["status"], at(series["status_at"])) == ("complete", when[3])


def test_an_event_for_an_unknown_task_creates_the_task(client: httpx.Client) -> None:
    task_id = f"stub-{unique_uid()}"

    post(client, [event("task_event", {"task_id": task_id, "event": "REGISTER"}, time=LONG_AGO)])
    timeline = client.get(f"/v1/tasks/{task_id}").json()

    assert timeline["task"]["status"] is None
    assert at(timeline["task"]["created_at"]) == LONG_AGO
    assert [e["event"] for e in timeline["events"]] == ["REGISTER"]


# ---------------------------------------------------------------------------- errors, stats


def test_recent_errors_are_task_and_system_errors_newest_first(
    client: httpx.Client, seeded: Seed
) -> None:
    errors = client.get("/v1/errors", params={"limit": 3}).json()["items"]

    assert [(e["source"], e["event"], e["severity"]) for e in errors] == [
        ("system", "OUTBOX_OVERFLOW", "error"),
        ("system", "DISK", "critical"),
        ("task", "ERROR", "error"),
    ]
    assert "refused 12 events" in errors[0]["message"]
    assert errors[0]["producer"] == "receiver"
    assert errors[2]["task_id"] == seeded.tasks["T1b"]
    assert errors[2]["message"] == "module crashed"
    assert errors[2]["target"] == "AI_NODE"

    since = iso(seeded.now - timedelta(hours=4))
    newer = client.get("/v1/errors", params={"since": since}).json()["items"]
    assert [e["event"] for e in newer] == ["OUTBOX_OVERFLOW", "DISK"]


def test_stats_count_series_instances_failures_rules_and_targets_by_hour(
    client: httpx.Client, seeded: Seed
) -> None:
    stats = client.get("/v1/stats", params={"days": 1}).json()

    assert len(stats["hours"]) == 24
    assert at(stats["hours"][-1]["hour"]) == hour(seeded.now)
    assert stats["totals"] == {"series": 6, "instances": 16, "failures": 3}
    by_hour = {at(h["hour"]): h for h in stats["hours"]}
    assert by_hour[hour(seeded.times["S2"])]["series"] == 1
    assert by_hour[hour(seeded.times["S2"])]["instances"] == 5
    assert stats["rules"] == [
        {"rule": "CT_RULE", "tasks": 2, "failures": 0},
        {"rule": "CT_AI", "tasks": 1, "failures": 1},
        {"rule": "MR_RULE", "tasks": 1, "failures": 0},
    ]
    assert stats["targets"] == [
        {"target": "PACS", "dispatches": 1, "failures": 0},
        {"target": "AI_NODE", "dispatches": 0, "failures": 1},
    ]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/stats", {"days": 0}),
        ("/v1/stats", {"days": 91}),
        ("/v1/errors", {"limit": 0}),
        ("/v1/errors", {"since": "soon"}),
    ],
)
def test_invalid_parameters_of_errors_and_stats_are_422(
    client: httpx.Client, path: str, params: dict[str, Any]
) -> None:
    assert client.get(path, params=params).status_code == 422


def test_the_longest_values_the_payloads_allow_are_stored(client: httpx.Client) -> None:
    uid = "1." + "2" * 59  # its instances, uid.1 and uid.2, have 64 characters
    task_id = "t" * 128
    longest = [
        series_received(uid, study_uid="3" * 64, calling_ae="A" * 256, time=LONG_AGO),
        event(
            "task_update",
            {"task_id": task_id, "series_uid": uid, "rule": "r" * 256,
             "target": ["x" * 100, "y" * 100], "status": "s" * 64},
            time=LONG_AGO,
            producer="p" * 128,
        ),
        event(
            "task_event",
            {"task_id": task_id, "event": "E" * 64, "severity": "CRITICAL", "target": "t" * 256},
            time=LONG_AGO,
        ),
        event("module_log", {"task_id": task_id, "module": "m" * 256, "logs": "z" * 100_000}),
        event("audit_event", {"event": "LOGIN", "user": "u" * 256}),
    ]  # fmt: skip

    assert post(client, longest)["stored"] == len(longest)
    assert client.get(f"/v1/series/{uid}").json()["status"] == "s" * 64
    timeline = client.get(f"/v1/tasks/{task_id}").json()
    assert timeline["task"]["target"] == "x" * 100 + ", " + "y" * 100
    assert timeline["events"][0]["severity"] == "critical"
