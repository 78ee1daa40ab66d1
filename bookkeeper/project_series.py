"""Projection of ``series_received``: series, their receptions, and the series status."""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import bindparam, case, update

from bookkeeper.batch import Batch, dialect_insert
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
    if not received:
        return
    by_series: dict[str, list[tuple[Envelope, SeriesReceived]]] = {}
    for event, payload in sorted(received, key=lambda item: item[0].time):
        by_series.setdefault(payload.series_uid, []).append((event, payload))
        batch.count(event.time, "instances", value=payload.count)

    created = _create_series(batch, by_series)
    existing = [
        {
            "b_uid": uid,
            "b_count": sum(p.count for _, p in items),
            "b_first": items[0][0].time,
            "b_last": items[-1][0].time,
        }
        for uid, items in sorted(by_series.items())
        if uid not in created
    ]
    if existing:
        batch.conn.execute(
            update(Series)
            .where(Series.series_uid == bindparam("b_uid"))
            .values(
                instance_count=Series.instance_count + bindparam("b_count"),
                first_received_at=case(
                    (Series.first_received_at > bindparam("b_first"), bindparam("b_first")),
                    else_=Series.first_received_at,
                ),
                last_received_at=case(
                    (Series.last_received_at < bindparam("b_last"), bindparam("b_last")),
                    else_=Series.last_received_at,
                ),
            ),
            existing,
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


def _create_series(
    batch: Batch, by_series: dict[str, list[tuple[Envelope, SeriesReceived]]]
) -> set[str]:
    """Insert the series not stored yet; return the UIDs this call created."""
    rows = []
    for uid, items in sorted(by_series.items()):
        event, first = items[0]
        tags = _tag_values(first.tags)
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
                "status": "received",
                "status_at": event.time,
                "tags": first.tags,
            }
        )
    statement = (
        dialect_insert(batch.conn, Series)
        .on_conflict_do_nothing(index_elements=["series_uid"])
        .returning(Series.series_uid)
    )
    created = set(batch.conn.execute(statement, rows).scalars())
    for uid in created:
        batch.count(by_series[uid][0][0].time, "series")
    return created


def project_series_status(batch: Batch) -> None:
    """A top-level task's status is its series' status (unless a newer one is stored)."""
    rows = [
        {"b_uid": task.series_uid, "b_status": task.status, "b_at": task.updated_at}
        for task in batch.tasks.values()
        if task.status_changed and task.parent_id is None and task.series_uid and task.status
    ]
    if rows:
        batch.conn.execute(
            update(Series)
            .where(Series.series_uid == bindparam("b_uid"), Series.status_at <= bindparam("b_at"))
            .values(status=bindparam("b_status"), status_at=bindparam("b_at")),
            sorted(rows, key=lambda row: str(row["b_uid"])),
        )
