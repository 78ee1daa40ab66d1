"""``POST /v1/events``: tokens, idempotency, all-or-nothing batches, field-naming 422s, limits.

One bookkeeper per database backend for the module; every test uses ids and UIDs of its own.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import select

from bookkeeper.db import create_db_engine, head_revision
from bookkeeper.models import EventRecord
from common.outbox import Event
from tests.dicom_factory import Instance
from tests.helpers import (
    API_KEY,
    RECEIVER_AET,
    SENDER_AET,
    SUCCESS,
    ReceiverFactory,
    contexts_for,
    outbox_events,
    outbox_file,
    pynetdicom_store,
    wait_until,
)
from tests.pg import (
    BACKENDS,
    Bookkeeper,
    event,
    post,
    running_bookkeeper,
    series_received,
    unique_uid,
)


@pytest.fixture(scope="module", params=BACKENDS)
def bookkeeper(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bookkeeper]:
    with running_bookkeeper(request.param, tmp_path_factory.mktemp("bookkeeper"), "ingest") as bk:
        yield bk


@pytest.fixture
def client(bookkeeper: Bookkeeper) -> httpx.Client:
    return bookkeeper.client()


def stored_events(bk: Bookkeeper, ids: list[str]) -> list[dict[str, Any]]:
    """The raw envelopes stored under ``ids``, read from the database itself."""
    engine = create_db_engine(bk.sqlalchemy_url)
    columns = (EventRecord.event_id, EventRecord.producer, EventRecord.seq, EventRecord.kind)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(*columns, EventRecord.payload).where(EventRecord.event_id.in_(ids))
            )
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- health, tokens


def test_health_is_open_and_reports_the_schema_revision(bookkeeper: Bookkeeper) -> None:
    response = httpx.get(f"{bookkeeper.url}/health")

    assert response.status_code == 200
    assert response.json()["revision"] == head_revision()
    assert response.json()["database"] == "reachable"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong-token-0123456789"}, id="wrong-token"),
        pytest.param({"Authorization": f"Basic {API_KEY}"}, id="other-scheme"),
        pytest.param({"Authorization": API_KEY}, id="no-scheme"),
        pytest.param({"Authorization": f"Bearer {API_KEY}x"}, id="token-plus-one"),
        pytest.param({"Authorization": "Bearer"}, id="empty-bearer"),
    ],
)
@pytest.mark.parametrize(
    "request_", [("GET", "/v1/series"), ("GET", "/v1/stats"), ("POST", "/v1/events")]
)
def test_requests_without_the_right_token_are_refused(
    bookkeeper: Bookkeeper, headers: dict[str, str], request_: tuple[str, str]
) -> None:
    method, path = request_
    uid = unique_uid()
    body = {"events": [series_received(uid)]} if method == "POST" else None

    response = bookkeeper.client(headers).request(method, path, json=body)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert bookkeeper.client().get(f"/v1/series/{uid}").status_code == 404


@pytest.mark.parametrize("scheme", ["Bearer", "Token", "bearer"])
def test_bearer_and_mercure_token_schemes_are_accepted(bookkeeper: Bookkeeper, scheme: str) -> None:
    client = bookkeeper.client({"Authorization": f"{scheme} {API_KEY}"})

    assert post(client, [event("test_ping", {})])["stored"] == 1
    assert client.get("/v1/series").status_code == 200


# ---------------------------------------------------------------------------- idempotency


def test_a_batch_is_stored_and_a_resent_batch_is_stored_once(
    bookkeeper: Bookkeeper, client: httpx.Client
) -> None:
    uid = unique_uid()
    batch = [series_received(uid, count=3)] + [
        event("test_unknown_kind", {"n": n}, seq=n) for n in range(20)
    ]

    assert post(client, batch) == {"stored": 21, "duplicates": 0}
    assert post(client, batch) == {"stored": 0, "duplicates": 21}
    assert post(client, [*batch[:5], event("test_unknown_kind", {"n": 99})]) == {
        "stored": 1,
        "duplicates": 5,
    }

    series = client.get(f"/v1/series/{uid}").json()
    assert series["instance_count"] == 3  # not 6 or 9: projections run once per event id
    assert len(series["files"]) == 3
    assert len(series["receptions"]) == 1
    assert len(stored_events(bookkeeper, [e["id"] for e in batch])) == 21


def test_an_id_repeated_in_one_batch_is_stored_once(client: httpx.Client) -> None:
    uid = unique_uid()
    once = series_received(uid, count=2)

    assert post(client, [once, copy.deepcopy(once), once]) == {"stored": 1, "duplicates": 2}
    assert client.get(f"/v1/series/{uid}").json()["instance_count"] == 2


def test_the_same_batch_sent_by_two_clients_at_once_is_stored_once(
    bookkeeper: Bookkeeper,
) -> None:
    uid = unique_uid()
    batch = [series_received(uid, count=1) for _ in range(50)]
    batch += [event("test_race", {"n": n}) for n in range(150)]
    results: list[dict[str, Any]] = []
    barrier = threading.Barrier(2)

    def send() -> None:
        client = bookkeeper.client()
        barrier.wait()
        results.append(post(client, batch))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert sorted(r["stored"] for r in results) == [0, 200]
    assert sorted(r["duplicates"] for r in results) == [0, 200]
    assert bookkeeper.client().get(f"/v1/series/{uid}").json()["instance_count"] == 50


def test_unknown_kinds_are_kept_raw_exactly_as_sent(
    bookkeeper: Bookkeeper, client: httpx.Client
) -> None:
    future = event(
        "something_new",
        {"nested": {"list": [1, 2.5, "drei", None, True]}, "text": "Grüße ✓"},
        producer="router-2",
        seq=2**53,
    )

    assert post(client, [future])["stored"] == 1

    [row] = stored_events(bookkeeper, [future["id"]])
    assert row["producer"] == "router-2"
    assert row["seq"] == 2**53
    assert row["kind"] == "something_new"
    assert row["payload"] == future["payload"]


AWKWARD = "back\\slash \\N tab\there new\nline cr\rhere 'quote' \"dq\" \\u0000 Grüße ✓"
"""Characters that the bulk writes must escape (COPY's text format) or pass through as they are."""


def test_text_with_backslashes_tabs_and_newlines_is_stored_exactly(
    bookkeeper: Bookkeeper, client: httpx.Client
) -> None:
    uid, task_id = unique_uid(), f"awkward-{unique_uid()}"
    raw = event("something_new", {"text": AWKWARD, AWKWARD: [AWKWARD]})
    events = [
        raw,
        series_received(uid, tags={"PatientName": f"DOE^{AWKWARD}", "PatientID": AWKWARD}),
        event("task_update", {"task_id": task_id, "series_uid": uid, "data": {"x": AWKWARD}}),
        event("task_event", {"task_id": task_id, "event": "NOTE", "info": AWKWARD}),
        event("module_log", {"task_id": task_id, "module": "m", "logs": AWKWARD}),
    ]

    assert post(client, events)["stored"] == len(events)

    [row] = stored_events(bookkeeper, [raw["id"]])
    assert row["payload"] == raw["payload"]
    detail = client.get(f"/v1/series/{uid}").json()
    assert (detail["patient_name"], detail["patient_id"]) == (f"DOE^{AWKWARD}", AWKWARD)
    assert detail["tags"]["PatientID"] == AWKWARD
    timeline = client.get(f"/v1/tasks/{task_id}").json()
    assert timeline["task"]["data"] == {"x": AWKWARD}
    assert [e["info"] for e in timeline["events"]] == [AWKWARD]
    logs = client.get(f"/v1/tasks/{task_id}/logs").json()
    assert [item["logs"] for item in logs["items"]] == [AWKWARD]
    found = client.get("/v1/series", params={"patient_name": "doe back\\slash"}).json()
    assert [item["series_uid"] for item in found["items"]] == [uid]


def test_extra_envelope_and_payload_fields_are_ignored(client: httpx.Client) -> None:
    uid = unique_uid()
    sent = series_received(uid)
    sent["shipped_by"] = "a future shipper"
    sent["payload"]["a_future_field"] = {"x": 1}

    assert post(client, [sent])["stored"] == 1
    assert client.get(f"/v1/series/{uid}").status_code == 200


# ---------------------------------------------------------------------------- malformed input


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation of the batch: set ``path`` (dotted, into the events list) to ``value``."""

    def mutate(batch: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = batch["events"]
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()

MALFORMED = [
    pytest.param("2.time", "not a time", "events.2.time", id="time-not-a-time"),
    pytest.param("2.time", "2024-05-01T12:00:00", "events.2.time", id="time-without-zone"),
    pytest.param("2.seq", "7", "events.2.seq", id="seq-as-string"),
    pytest.param("2.seq", -1, "events.2.seq", id="seq-negative"),
    pytest.param("2.seq", 2**64, "events.2.seq", id="seq-too-large"),
    pytest.param("2.id", "", "events.2.id", id="empty-id"),
    pytest.param("2.id", "x" * 129, "events.2.id", id="id-too-long"),
    pytest.param("2.kind", _DELETE, "events.2.kind", id="kind-missing"),
    pytest.param("2.kind", "Series-Received", "events.2.kind", id="kind-not-snake-case"),
    pytest.param("2.payload", [1, 2], "events.2.payload", id="payload-not-an-object"),
    pytest.param("2.payload.note", "a\x00b", "events.2.payload", id="nul-in-payload"),
    pytest.param(
        "1.payload.series_uid", _DELETE, "events.1.payload.series_uid", id="no-series-uid"
    ),
    pytest.param("1.payload.count", "2", "events.1.payload.count", id="count-as-string"),
    pytest.param("1.payload.count", 5, "events.1.payload", id="count-not-matching-uids"),
    pytest.param(
        "1.payload.series_uid", "1" * 65, "events.1.payload.series_uid", id="uid-too-long"
    ),
    pytest.param("3.payload.task_id", 42, "events.3.payload.task_id", id="task-id-not-a-string"),
    pytest.param("3.payload.severity", "fatal", "events.3.payload.severity", id="bad-severity"),
]


def _valid_batch(uid: str) -> dict[str, Any]:
    return {
        "events": [
            event("test_ok", {"n": 0}),
            series_received(uid, count=2),
            event("test_ok", {"note": "fine"}),
            event("task_event", {"task_id": "t-1", "event": "REGISTER"}),
        ]
    }


@pytest.mark.parametrize(("path", "value", "field"), MALFORMED)
def test_a_malformed_event_refuses_the_whole_batch_naming_the_field(
    bookkeeper: Bookkeeper, client: httpx.Client, path: str, value: Any, field: str
) -> None:
    uid = unique_uid()
    batch = _valid_batch(uid)
    _set(path, value)(batch)

    response = client.post("/v1/events", json=batch)

    assert response.status_code == 422, response.text
    fields = [problem["field"] for problem in response.json()["detail"]]
    assert field in fields, response.text
    assert "a\x00b" not in response.text  # input is never echoed back
    assert client.get(f"/v1/series/{uid}").status_code == 404
    assert stored_events(bookkeeper, [e["id"] for e in batch["events"]]) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(b"{not json", "body", id="not-json"),
        pytest.param(b'{"events": [{"x": NaN}]}', "body", id="nan"),
        pytest.param(b'{"event": []}', "events", id="misspelt-key"),
        pytest.param(b'{"events": null}', "events", id="events-null"),
        pytest.param(b'{"events": {}}', "events", id="events-not-a-list"),
        pytest.param(b"[]", "body", id="not-an-object"),
        pytest.param(b'{"events": [{"id": "\\ud800"}]}', "body", id="lone-surrogate"),
        pytest.param(
            b'{"events": [{"id": "i", "producer": "p", "seq": 1e400, "kind": "k",'
            b' "time": "2024-05-01T12:00:00Z", "payload": {}}]}',
            "events.0.seq",
            id="infinite-seq",
        ),
    ],
)
def test_a_body_that_is_not_a_batch_is_422(client: httpx.Client, body: bytes, field: str) -> None:
    response = client.post("/v1/events", content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    assert field in [problem["field"] for problem in response.json()["detail"]]


def test_an_infinite_number_inside_a_payload_is_422(client: httpx.Client) -> None:
    body = b'{"events": [{"id": "inf-1", "producer": "p", "seq": 1, "kind": "k",'
    body += b' "time": "2024-05-01T12:00:00Z", "payload": {"x": [1, 1e999]}}]}'

    response = client.post("/v1/events", content=body)

    assert response.status_code == 422
    assert "payload.x.1: numbers must be finite" in response.text


def test_an_empty_batch_stores_nothing(client: httpx.Client) -> None:
    assert post(client, []) == {"stored": 0, "duplicates": 0}


def test_more_events_than_the_batch_limit_is_413_and_stores_nothing(
    bookkeeper: Bookkeeper, client: httpx.Client
) -> None:
    batch = [event("test_big", {}, seq=n) for n in range(5001)]

    response = client.post("/v1/events", json={"events": batch})

    assert response.status_code == 413
    assert "at most 5000" in response.json()["detail"]
    assert stored_events(bookkeeper, [batch[0]["id"], batch[-1]["id"]]) == []
    assert post(client, batch[:5000])["stored"] == 5000


# ---------------------------------------------------------------------------- receiver events


def test_the_receivers_own_events_register_the_series_and_its_files(
    bookkeeper: Bookkeeper,
    client: httpx.Client,
    receiver: ReceiverFactory,
    ct_series: list[Instance],
) -> None:
    rx = receiver()
    sent = ct_series[:4]
    assert pynetdicom_store(rx.port, [i.path for i in sent], contexts=contexts_for(sent)) == [
        SUCCESS
    ] * len(sent)
    events: list[Event] = wait_until(
        lambda: [
            e for e in outbox_events(outbox_file(rx.data_root)) if e.kind == "series_received"
        ],
        timeout=15,
        what="the receiver's series_received event",
    )
    outbox = outbox_events(outbox_file(rx.data_root))

    assert post(client, [e.as_dict() for e in outbox])["stored"] == len(outbox)

    series_uid = events[0].payload["series_uid"]
    series = client.get(f"/v1/series/{series_uid}").json()
    first = pydicom.dcmread(sent[0].path, stop_before_pixels=True)
    assert series["study_uid"] == first.StudyInstanceUID
    assert series["patient_name"] == str(first.PatientName)
    assert series["patient_id"] == first.PatientID
    assert series["modality"] == first.Modality
    assert series["instance_count"] == len(sent)
    assert series["receiver_aet"] == RECEIVER_AET
    assert series["sender_aet"] == SENDER_AET
    assert series["sender_address"] == "127.0.0.1"
    assert {f["sop_uid"] for f in series["files"]} == {i.sop_instance_uid for i in sent}
    assert all(f["file_name"].startswith(f"{series_uid}#") for f in series["files"])
    found = client.get("/v1/series", params={"patient_id": first.PatientID}).json()["items"]
    assert series_uid in [item["series_uid"] for item in found]
    assert datetime.fromisoformat(series["last_received_at"]) <= datetime.now(UTC)
