"""Projection of ``series_received``: series, their receptions, and the series status."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import case, select, update

from bookkeeper import bulk
from bookkeeper.batch import IN_CHUNK, Batch, chunks, insert_staged, table_of
from bookkeeper.models import Series, SeriesReception
from bookkeeper.payloads import Envelope, SeriesReceived

TAG_COLUMNS: Final = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyDescription": "study_description",
    "SeriesDescription": "series_description",
    "SeriesNumber": "series_number",
    "Modality": "modality",
    "BodyPartExamined": "body_part_examined",
    "ProtocolName": "protocol_name",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model_name",
    "StationName": "station_name",
    "ReferringPhysicianName": "referring_physician_name",
}
"""Side-car keywords (``series_received`` ``tags``) copied into columns of ``series``."""


def search_name(name: str | None) -> str | None:
    """How a patient name is compared in searches: case-folded, ``^`` as a space, trimmed.

    ``DOE^JOHN`` becomes ``doe john``, so ``doe j`` and ``Doe^J`` both find it by prefix.
    """
    if not name:
        return None
    return " ".join(name.replace("^", " ").casefold().split()) or None


def _tag_values(tags: dict[str, Any]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for keyword, column in TAG_COLUMNS.items():
        value = tags.get(keyword)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            values[column] = None
        else:
            values[column] = str(value).strip() or None
    return values


def project_series_received(batch: Batch, received: list[tuple[Envelope, SeriesReceived]]) -> None:
    """Create the series first received in this batch, add to the others, and record every
    reception. Call it after :func:`bookkeeper.project_tasks.project_tasks`: a new series is
    created with the status its tasks give it in this batch."""
    if not received:
        return
    by_series: dict[str, list[tuple[Envelope, SeriesReceived]]] = {}
    for event, payload in sorted(received, key=lambda item: item[0].time):
        by_series.setdefault(payload.series_uid, []).append((event, payload))
        batch.count(event.time, "instances", value=payload.count)

    created = _create_series(batch, by_series)
    existing: list[dict[str, Any]] = [
        {
            "series_uid": uid,
            "instance_count": sum(p.count for _, p in items),
            "first_received_at": items[0][0].time,
            "last_received_at": items[-1][0].time,
        }
        for uid, items in sorted(by_series.items())
        if uid not in created
    ]
    if existing:
        _lock_series(batch, [row["series_uid"] for row in existing])
        new = bulk.stage(batch.conn, table_of(Series), existing, "series_received")
        batch.conn.execute(
            update(Series)
            .where(Series.series_uid == new.c.series_uid)
            .values(
                instance_count=Series.instance_count + new.c.instance_count,
                first_received_at=case(
                    (Series.first_received_at > new.c.first_received_at, new.c.first_received_at),
                    else_=Series.first_received_at,
                ),
                last_received_at=case(
                    (Series.last_received_at < new.c.last_received_at, new.c.last_received_at),
                    else_=Series.last_received_at,
                ),
            )
        )
    batch.insert_rows(
        SeriesReception,
        [
            {
                "event_id": event.id,
                "series_uid": p.series_uid,
                "association_id": p.association_id,
                "received_at": event.time,
                "instance_count": p.count,
                "bytes": p.bytes,
                "sender_aet": p.calling_ae,
                "sender_address": p.peer_address,
                "receiver_aet": p.called_ae,
            }
            for event, p in received
        ],
    )


def _lock_series(batch: Batch, uids: list[str]) -> None:
    """Lock the rows of ``uids`` in sorted order before an ``UPDATE ... FROM`` changes them,
    so that two batches that share series wait for each other instead of deadlocking (the
    update itself locks in whatever order its join finds the rows). SQLite has one writer."""
    if batch.conn.dialect.name != "postgresql":
        return
    for chunk in chunks(sorted(uids), IN_CHUNK):
        batch.conn.execute(
            select(Series.id)
            .where(Series.series_uid.in_(chunk))
            .order_by(Series.series_uid)
            .with_for_update()
        ).all()


def _create_series(
    batch: Batch, by_series: dict[str, list[tuple[Envelope, SeriesReceived]]]
) -> set[str]:
    """Insert the series not stored yet; return the UIDs this call created.

    A series that a top-level task of this batch gave a newer status is created with that
    status; :func:`project_series_status` then leaves it alone.
    """
    statuses = _new_statuses(batch)
    rows = []
    for uid, items in sorted(by_series.items()):
        event, first = items[0]
        tags = _tag_values(first.tags)
        status, status_at = "received", event.time
        if uid in statuses and statuses[uid][1] >= event.time:
            status, status_at = statuses[uid]
        rows.append(
            {
                "series_uid": uid,
                "study_uid": first.study_uid,
                **tags,
                "patient_name_search": search_name(tags["patient_name"]),
                "sender_aet": first.calling_ae or None,
                "sender_address": first.peer_address or None,
                "receiver_aet": first.called_ae or None,
                "first_received_at": event.time,
                "last_received_at": items[-1][0].time,
                "instance_count": sum(p.count for _, p in items),
                "status": status,
                "status_at": status_at,
                "tags": first.tags,
            }
        )
    staged = bulk.stage(batch.conn, table_of(Series), rows)
    statement = (
        insert_staged(batch.conn, Series, staged)
        .on_conflict_do_nothing(index_elements=["series_uid"])
        .returning(Series.series_uid)
    )
    created = set(batch.conn.execute(statement).scalars())
    for uid in created:
        batch.count(by_series[uid][0][0].time, "series")
    batch.series_created |= created
    return created


def _new_statuses(batch: Batch) -> dict[str, tuple[str, datetime]]:
    """Series UID -> (status, time) of the newest status change of its top-level tasks."""
    newest: dict[str, tuple[str, datetime]] = {}
    for task in batch.tasks.values():
        if task.status_changed and task.parent_id is None and task.series_uid and task.status:
            known = newest.get(task.series_uid)
            if known is None or known[1] <= task.updated_at:
                newest[task.series_uid] = (task.status, task.updated_at)
    return newest


def project_series_status(batch: Batch) -> None:
    """A top-level task's status is its series' status (unless a newer one is stored)."""
    rows: list[dict[str, Any]] = [
        {"series_uid": uid, "status": status, "status_at": at}
        for uid, (status, at) in sorted(_new_statuses(batch).items())
        if uid not in batch.series_created
    ]
    if not rows:
        return
    _lock_series(batch, [row["series_uid"] for row in rows])
    new = bulk.stage(batch.conn, table_of(Series), rows, "series_status")
    batch.conn.execute(
        update(Series)
        .where(Series.series_uid == new.c.series_uid, Series.status_at <= new.c.status_at)
        .values(status=new.c.status, status_at=new.c.status_at)
    )
