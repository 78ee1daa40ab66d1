"""End to end with the real shipper: events recorded while the bookkeeper is down all arrive,
exactly once, once it is up (the issue's outage test), on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from bookkeeper.db import create_db_engine
from bookkeeper.models import EventRecord
from common.outbox import NewEvent, Outbox
from common.shipper import Backoff, BookkeeperUnavailable, Endpoint, Shipper
from tests.helpers import API_KEY, LOCALHOST, free_port, wait_until
from tests.pg import BACKENDS, database_for, start_bookkeeper

EVENTS = 10_000
SERIES = 100
"""The 10,000 events: one ``series_received`` of 3 instances per series, the rest task events."""


def _record_history(outbox: Outbox) -> list[str]:
    """Record EVENTS events into ``outbox`` as a service would; return the series UIDs."""
    uids = [f"2.25.{uuid.uuid4().int}" for _ in range(SERIES)]
    events: list[NewEvent] = []
    for uid in uids:
        sops = [f"{uid}.{n}" for n in range(3)]
        events.append(
            NewEvent(
                "series_received",
                {
                    "series_uid": uid,
                    "study_uid": "1.2.3",
                    "count": 3,
                    "sop_instance_uids": sops,
                    "files": [f"{uid}#{sop}.dcm" for sop in sops],
                    "tags": {"PatientName": "OUTAGE^TEST", "Modality": "CT"},
                },
            )
        )
    per_series = (EVENTS - SERIES) // SERIES
    for uid in uids:
        events += [
            NewEvent("task_event", {"task_id": f"task-{uid}", "event": "REGISTER", "info": str(n)})
            for n in range(per_series)
        ]
    for start in range(0, len(events), 1000):
        outbox.record_many(events[start : start + 1000])
    assert outbox.count() == EVENTS
    return uids


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_events_recorded_while_the_bookkeeper_is_down_arrive_exactly_once(
    tmp_path: Path, backend: str
) -> None:
    port = free_port()
    endpoint = Endpoint(f"http://{LOCALHOST}:{port}", API_KEY)
    with (
        database_for(backend, tmp_path, "outage") as database_url,
        Outbox(tmp_path / "outbox" / "router.sqlite3", "router") as outbox,
    ):
        uids = _record_history(outbox)
        shipper = Shipper(outbox, endpoint, backoff=Backoff(initial=0.05, cap=0.5))
        with pytest.raises(BookkeeperUnavailable):
            shipper.ship_once()
        shipper.start()  # keeps retrying while the bookkeeper is down
        time.sleep(0.5)  # a few refused connections; nothing may be lost meanwhile
        assert outbox.count() == EVENTS

        bk = start_bookkeeper(tmp_path / "bookkeeper", database_url, port=port)
        try:
            wait_until(lambda: outbox.count() == 0, timeout=120, what="the outbox to drain")
            assert shipper.stop(5.0)

            engine = create_db_engine(bk.sqlalchemy_url)
            try:
                with engine.connect() as conn:
                    stored = conn.execute(
                        select(func.count(), func.min(EventRecord.seq), func.max(EventRecord.seq))
                    ).one()
            finally:
                engine.dispose()
            assert tuple(stored) == (EVENTS, 1, EVENTS)
            with httpx.Client(base_url=bk.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
                page = c.get("/v1/series", params={"patient_name": "outage", "count": True}).json()
                assert page["total"] == SERIES
                assert {item["instance_count"] for item in page["items"]} == {3}
                timeline = c.get(f"/v1/tasks/task-{uids[0]}").json()
                assert len(timeline["events"]) == (EVENTS - SERIES) // SERIES
        finally:
            assert bk.terminate() == 0
