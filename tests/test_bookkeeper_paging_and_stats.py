"""Keyset (cursor) paging of the series search, and the daily statistics behind the dashboard.

Each backend gets a bookkeeper of its own, so that the counts asked for here are exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from bookkeeper.batch import day_of
from bookkeeper.db import create_db_engine
from bookkeeper.models import DailyStat, HourlyStat
from tests.pg import BACKENDS, Bookkeeper, event, post, running_bookkeeper, series_received

SENDER = "CURSOR_SCU"
NAMES = ["KIM^A", "kim^b", None, "ADAMS^Z", "KIM^A", None, "Ölund^Per", "adams^z", "BROWN"]
"""Patient names of the paged series, round robin: duplicates, case, non-ASCII and none."""
SERIES = 23


@pytest.fixture(scope="module", params=BACKENDS)
def bookkeeper(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bookkeeper]:
    with running_bookkeeper(request.param, tmp_path_factory.mktemp("bookkeeper"), "paging") as bk:
        yield bk


@pytest.fixture(scope="module")
def paged(bookkeeper: Bookkeeper) -> list[str]:
    """The UIDs of 23 series from one sender, some sharing a name, count or time."""
    start = datetime(2020, 3, 1, 8, 0, tzinfo=UTC)
    events = []
    uids = []
    for n in range(SERIES):
        uid = f"2.25.777{n:04d}"
        tags = {"PatientName": NAMES[n % len(NAMES)]} if NAMES[n % len(NAMES)] else {}
        if n % 4:
            tags["AccessionNumber"] = f"ACC{n % 5}"
        # Series 3, 9, 15 and 21 share their time with the one before: ties broken by id.
        time = start + timedelta(minutes=n - (n % 6 == 3))
        events.append(
            series_received(uid, count=1 + n % 3, tags=tags, calling_ae=SENDER, time=time)
        )
        uids.append(uid)
    post(bookkeeper.client(), events)
    return uids


def _page(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/series", params={"sender_aet": SENDER, **params})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _walk(client: httpx.Client, sort: str, order: str) -> list[str]:
    """Every series, four at a time, each page asked for with the cursor of the one before."""
    seen: list[str] = []
    page = _page(client, sort=sort, order=order, limit=4)
    while True:
        seen += [item["series_uid"] for item in page["items"]]
        assert page["has_more"] == (page["next_cursor"] is not None)
        if page["next_cursor"] is None:
            return seen
        page = _page(client, sort=sort, order=order, limit=4, cursor=page["next_cursor"])


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        ("received", "desc"),
        ("received", "asc"),
        ("patient_name", "asc"),
        ("patient_name", "desc"),
        ("accession_number", "desc"),
        ("instance_count", "asc"),
    ],
)
def test_a_cursor_walk_returns_every_series_once_in_the_order_of_offset_paging(
    bookkeeper: Bookkeeper, paged: list[str], sort: str, order: str
) -> None:
    client = bookkeeper.client()
    everything = _page(client, sort=sort, order=order, limit=500)
    expected = [item["series_uid"] for item in everything["items"]]

    walked = _walk(client, sort=sort, order=order)

    assert sorted(expected) == sorted(paged)
    assert walked == expected


def test_series_without_a_name_come_last_in_both_orders_and_on_cursor_pages(
    bookkeeper: Bookkeeper, paged: list[str]
) -> None:
    client = bookkeeper.client()
    nameless = {uid for n, uid in enumerate(paged) if NAMES[n % len(NAMES)] is None}
    for order in ("asc", "desc"):
        walked = _walk(client, sort="patient_name", order=order)
        assert set(walked[-len(nameless) :]) == nameless


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_offset_pages_go_on_past_the_named_series_into_the_nameless_ones(
    bookkeeper: Bookkeeper, paged: list[str], order: str
) -> None:
    client = bookkeeper.client()
    everything = _page(client, sort="patient_name", order=order, limit=500)["items"]
    expected = [item["series_uid"] for item in everything]

    for offset in range(0, SERIES + 3, 3):
        page = _page(client, sort="patient_name", order=order, limit=3, offset=offset)
        assert [item["series_uid"] for item in page["items"]] == expected[offset : offset + 3]
        assert page["has_more"] == (offset + 3 < SERIES)


def test_a_cursor_page_keeps_the_filters(bookkeeper: Bookkeeper, paged: list[str]) -> None:
    client = bookkeeper.client()
    first = _page(client, patient_name="kim", sort="patient_name", order="asc", limit=2)
    rest = _page(
        client,
        patient_name="kim",
        sort="patient_name",
        order="asc",
        limit=50,
        cursor=first["next_cursor"],
    )

    names = [item["patient_name"] for item in first["items"] + rest["items"]]
    assert names == sorted(names, key=lambda name: name.lower())
    assert len(names) == 9
    assert {name.lower() for name in names} == {"kim^a", "kim^b"}


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"cursor": "not-a-cursor"}, "not a cursor"),
        ({"cursor": "W10"}, "not a cursor"),  # base64 of "[]"
        ({"sort": "patient_name", "cursor": "{received}"}, "another sort"),
        ({"cursor": "{received}", "order": "asc"}, "another sort"),
        ({"cursor": "{received}", "offset": 4}, "offset"),
    ],
)
def test_a_cursor_that_does_not_fit_the_search_is_422_naming_it(
    bookkeeper: Bookkeeper, paged: list[str], params: dict[str, Any], problem: str
) -> None:
    client = bookkeeper.client()
    cursor = _page(client, limit=2)["next_cursor"]
    params = {
        key: value.replace("{received}", cursor) if isinstance(value, str) else value
        for key, value in params.items()
    }

    response = client.get("/v1/series", params={"limit": 2, **params})

    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["field"] == "cursor"
    assert problem in detail["msg"]


# ---------------------------------------------------------------------------- statistics


def _history(now: datetime) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tasks of rule STATS_RULE at hours spread over 40 days (window edges included), and
    what a 30-day window must count of them."""
    until = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    since = until - timedelta(days=30)
    times = [
        since - timedelta(minutes=30),  # just before the window
        since + timedelta(minutes=10),  # its first hour
        day_of(since) + timedelta(days=1, minutes=5),  # its first midnight
        since + timedelta(days=3, hours=7),
        since + timedelta(days=12, hours=23, minutes=59),
        since + timedelta(days=29, hours=1),
        day_of(now) + timedelta(minutes=1),  # today
        now - timedelta(minutes=1),  # the current hour
        since - timedelta(days=9),  # long before
    ]
    events = []
    expected = {"tasks": 0, "failures": 0, "dispatches": 0}
    for n, time in enumerate(times):
        task_id = f"stats-task-{n}"
        events += [
            event("task_update", {"task_id": task_id, "rule": "STATS_RULE"}, time=time),
            event(
                "task_event",
                {"task_id": task_id, "event": "DISPATCH_COMPLETE", "target": "STATS_PACS"},
                time=time,
            ),
        ]
        if n % 2:
            events.append(event("task_event", {"task_id": task_id, "event": "ERROR"}, time=time))
        if since <= time < until:
            expected["tasks"] += 1
            expected["dispatches"] += 1
            expected["failures"] += n % 2
    return events, expected


def test_statistics_kept_by_day_equal_the_hourly_counts_after_batches_are_sent_again(
    bookkeeper: Bookkeeper,
) -> None:
    client = bookkeeper.client()
    events, expected = _history(datetime.now(UTC))
    for _ in range(2):
        post(client, events)
    post(client, events[::2])  # part of it a third time

    stats = client.get("/v1/stats", params={"days": 30}).json()

    [rule] = [r for r in stats["rules"] if r["rule"] == "STATS_RULE"]
    [target] = [t for t in stats["targets"] if t["target"] == "STATS_PACS"]
    assert rule == {
        "rule": "STATS_RULE",
        "tasks": expected["tasks"],
        "failures": expected["failures"],
    }
    assert target == {
        "target": "STATS_PACS",
        "dispatches": expected["dispatches"],
        "failures": 0,
    }
    assert _daily(bookkeeper) == _hourly_by_day(bookkeeper)


def _daily(bookkeeper: Bookkeeper) -> dict[tuple[datetime, str, str], int]:
    engine = create_db_engine(bookkeeper.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(DailyStat.day, DailyStat.metric, DailyStat.key, DailyStat.value)
            )
            return {(day, metric, key): value for day, metric, key, value in rows}
    finally:
        engine.dispose()


def _hourly_by_day(bookkeeper: Bookkeeper) -> dict[tuple[datetime, str, str], int]:
    engine = create_db_engine(bookkeeper.sqlalchemy_url)
    totals: dict[tuple[datetime, str, str], int] = {}
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    HourlyStat.hour, HourlyStat.metric, HourlyStat.key, func.sum(HourlyStat.value)
                ).group_by(HourlyStat.hour, HourlyStat.metric, HourlyStat.key)
            )
            for hour, metric, key, value in rows:
                totals[day_of(hour), metric, key] = (
                    totals.get((day_of(hour), metric, key), 0) + value
                )
    finally:
        engine.dispose()
    return totals
