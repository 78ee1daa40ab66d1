"""The receiver records one ``association`` and per-series ``series_received`` events in its
outbox (docs/events.md), not one per instance."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from common.outbox import Event
from tests import dicom_factory
from tests.dicom_factory import Instance
from tests.helpers import (
    INVALID_UID,
    LOCALHOST,
    RECEIVER_AET,
    SENDER_AET,
    SUCCESS,
    ReceiverFactory,
    contexts_for,
    outbox_events,
    outbox_file,
    pynetdicom_store,
    stored_paths,
    wait_until,
)


def test_association_and_series_received_events_describe_what_was_stored(
    receiver: ReceiverFactory, ct_series: list[Instance], multiframe: Instance, tmp_path: Path
) -> None:
    rx = receiver()
    sent = [*ct_series[:3], multiframe]
    refused = dicom_factory.hostile(tmp_path, "event", series_uid="../../etc", sop_uid=None)
    contexts = contexts_for(sent)

    with dicom_factory.unvalidated():
        statuses = pynetdicom_store(
            rx.port, [i.path for i in sent] + [refused], contexts=contexts, raw=True
        )
    assert statuses == [SUCCESS] * len(sent) + [INVALID_UID]

    events = wait_until(
        lambda: [
            e
            for e in _events_of(rx.data_root, "association")
            if e.payload["calling_ae"] == SENDER_AET
        ],
        timeout=15,
        what="the association event",
    )
    assert len(events) == 1
    association = events[0].payload
    assert association["calling_ae"] == SENDER_AET
    assert association["called_ae"] == RECEIVER_AET
    assert association["peer_address"] == LOCALHOST
    assert association["outcome"] == "released"
    assert association["instances"] == len(sent)
    assert association["failures"] == {"0xC211": 1}
    for field in ("started_at", "ended_at"):
        assert datetime.fromisoformat(association[field].replace("Z", "+00:00"))

    by_series = {
        e.payload["series_uid"]: e.payload for e in _events_of(rx.data_root, "series_received")
    }
    assert sorted(by_series) == sorted({i.series_uid for i in sent})
    for series_uid, payload in by_series.items():
        expected = [i for i in sent if i.series_uid == series_uid]
        assert payload["association_id"] == association["association_id"]
        assert payload["study_uid"] == expected[0].study_uid
        assert payload["count"] == len(expected)
        assert payload["sop_instance_uids"] == [i.sop_instance_uid for i in expected]
        assert payload["files"] == [stored_paths(rx.incoming, i)[0].name for i in expected]


def _events_of(data_root: Path, kind: str) -> list[Event]:
    path = outbox_file(data_root)
    if not path.exists():
        return []
    return [e for e in outbox_events(path) if e.kind == kind]
