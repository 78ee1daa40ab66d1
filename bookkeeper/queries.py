"""The read side: series search, series detail, task timeline, logs, results, errors, stats."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints
from sqlalchemy import ColumnElement, and_, exists, func, select, text
from sqlalchemy.orm import InstrumentedAttribute, Session

from bookkeeper.batch import hour_of
from bookkeeper.models import (
    EventRecord,
    HourlyStat,
    ModuleLog,
    ModuleOutput,
    Series,
    SeriesReception,
    SystemEvent,
    Task,
    TaskEvent,
)
from bookkeeper.payloads import no_nul
from bookkeeper.project_series import search_name
from bookkeeper.views import (
    ErrorView,
    FileView,
    HourStats,
    ModuleLogView,
    ModuleOutputView,
    ReceptionView,
    RuleStats,
    SeriesDetail,
    SeriesPage,
    SeriesSummary,
    Stats,
    TargetStats,
    TaskEventView,
    TaskTimeline,
    TaskView,
    Totals,
)

SortField = Literal[
    "received",
    "first_received",
    "patient_name",
    "patient_id",
    "accession_number",
    "modality",
    "study_date",
    "instance_count",
    "series_uid",
    "status",
]
SORTABLE: Final[dict[str, InstrumentedAttribute[Any]]] = {
    "received": Series.last_received_at,
    "first_received": Series.first_received_at,
    "patient_name": Series.patient_name_search,
    "patient_id": Series.patient_id,
    "accession_number": Series.accession_number,
    "modality": Series.modality,
    "study_date": Series.study_date,
    "instance_count": Series.instance_count,
    "series_uid": Series.series_uid,
    "status": Series.status,
}
"""The only columns a search may sort by (each backed by an index or cheap on a page)."""
NOT_NULL_SORTS: Final = frozenset(
    {"received", "first_received", "instance_count", "series_uid", "status"}
)
# The partial indexes ix_task_events_errors / ix_system_events_errors are defined by this very
# text; repeating it verbatim (not as bound parameters) lets both databases use them.
ERRORS_ONLY: Final = "severity IN ('error', 'critical')"
HOURLY_METRICS: Final = ("series", "instances", "failures")
KEYED_METRICS: Final = ("rule_tasks", "rule_failures", "target_dispatches", "target_failures")


def assume_utc(value: datetime) -> datetime:
    """A time in UTC; a time without a zone is taken to be UTC already."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time is out of range once converted to UTC") from None


QueryTime = Annotated[datetime, AfterValidator(assume_utc)]
QueryText = Annotated[str, StringConstraints(max_length=256), AfterValidator(no_nul)]


class SeriesQuery(BaseModel):
    """Filters, order and page of ``GET /v1/series``; every given filter must match."""

    patient_name: QueryText | None = Field(
        None,
        description="Patient name, case-insensitive; `^` and spaces are the same "
        "(`doe^j` finds `DOE^JOHN`).",
    )
    name_match: Literal["prefix", "contains"] = Field(
        "prefix", description="How `patient_name` matches."
    )
    patient_id: QueryText | None = None
    accession_number: QueryText | None = None
    modality: QueryText | None = None
    study_uid: QueryText | None = None
    series_uid: QueryText | None = None
    sender_aet: QueryText | None = Field(None, description="Calling AE title of the sender.")
    rule: QueryText | None = Field(None, description="A task of the series used this rule.")
    status: QueryText | None = None
    received_from: QueryTime | None = Field(
        None, description="Last received at or after (ISO 8601; UTC without a zone)."
    )
    received_to: QueryTime | None = Field(None, description="Last received before.")
    sort: SortField = "received"
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=10_000_000)
    count: bool = Field(False, description="Also count all matches (`total`); slower.")


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _after(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (code point
    order), or None when there is none to compute."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return None
    following = 0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1
    return prefix[:-1] + chr(following)


def _name_condition(session: Session, query: SeriesQuery) -> ColumnElement[bool] | None:
    needle = search_name(query.patient_name)
    if needle is None:
        return None
    column = Series.patient_name_search
    if query.name_match == "contains":
        return column.like(f"%{_escape_like(needle)}%", escape="\\")
    upper = _after(needle)
    if session.get_bind().dialect.name == "sqlite" and upper is not None:
        # A range on the (binary-collated) column uses its index; SQLite's LIKE would not.
        return and_(column >= needle, column < upper)
    # PostgreSQL: LIKE 'prefix%' uses the text_pattern_ops index.
    return column.like(f"{_escape_like(needle)}%", escape="\\")


def _series_filters(session: Session, query: SeriesQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    name = _name_condition(session, query)
    if name is not None:
        conditions.append(name)
    exact = {
        Series.patient_id: query.patient_id,
        Series.accession_number: query.accession_number,
        Series.modality: query.modality,
        Series.study_uid: query.study_uid,
        Series.series_uid: query.series_uid,
        Series.sender_aet: query.sender_aet,
        Series.status: query.status,
    }
    conditions += [column == value for column, value in exact.items() if value is not None]
    if query.rule is not None:
        conditions.append(
            exists().where(Task.series_uid == Series.series_uid, Task.rule == query.rule)
        )
    if query.received_from is not None:
        conditions.append(Series.last_received_at >= query.received_from)
    if query.received_to is not None:
        conditions.append(Series.last_received_at < query.received_to)
    return conditions


def search_series(session: Session, query: SeriesQuery) -> SeriesPage:
    """One page of the series matching ``query``, in the order asked (ties by series id)."""
    statement = select(Series).where(*_series_filters(session, query))
    column = SORTABLE[query.sort]
    ordered = column.desc() if query.order == "desc" else column.asc()
    if query.sort not in NOT_NULL_SORTS:
        ordered = ordered.nulls_last()
    tie = Series.id.desc() if query.order == "desc" else Series.id.asc()
    page = session.scalars(
        statement.order_by(ordered, tie).limit(query.limit + 1).offset(query.offset)
    ).all()
    total = None
    if query.count:
        total = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
    return SeriesPage(
        items=[SeriesSummary.model_validate(row) for row in page[: query.limit]],
        limit=query.limit,
        offset=query.offset,
        total=total,
        has_more=len(page) > query.limit,
    )


def series_detail(
    session: Session, series_uid: str, files_limit: int, files_offset: int
) -> SeriesDetail | None:
    """A series with its receptions, one page of files and its tasks; None when unknown."""
    series = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
    if series is None:
        return None
    receptions = session.scalars(
        select(SeriesReception)
        .where(SeriesReception.series_uid == series_uid)
        .order_by(SeriesReception.received_at, SeriesReception.id)
    ).all()
    files = _files(session, receptions)
    tasks = session.scalars(
        select(Task).where(Task.series_uid == series_uid).order_by(Task.created_at, Task.id)
    ).all()
    summary = SeriesSummary.model_validate(series).model_dump()
    return SeriesDetail(
        **summary,
        study_id=series.study_id,
        body_part_examined=series.body_part_examined,
        protocol_name=series.protocol_name,
        manufacturer=series.manufacturer,
        manufacturer_model_name=series.manufacturer_model_name,
        station_name=series.station_name,
        referring_physician_name=series.referring_physician_name,
        tags=series.tags,
        receptions=[ReceptionView.model_validate(row) for row in receptions],
        files=files[files_offset : files_offset + files_limit],
        files_total=len(files),
        tasks=[TaskView.model_validate(row) for row in tasks],
    )


def _files(session: Session, receptions: Sequence[SeriesReception]) -> list[FileView]:
    """Every file of the receptions, in arrival order, from their ``series_received`` events."""
    ids = [reception.event_id for reception in receptions]
    payloads: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(EventRecord.event_id, EventRecord.payload).where(
                EventRecord.event_id.in_(ids[start : start + 500])
            )
        )
        payloads.update({event_id: payload for event_id, payload in rows})
    files = []
    for reception in receptions:
        payload = payloads.get(reception.event_id, {})
        sop_uids = payload.get("sop_instance_uids") or []
        names = payload.get("files") or [""] * len(sop_uids)
        files += [
            FileView(
                sop_uid=sop_uid,
                file_name=name,
                association_id=reception.association_id,
                received_at=reception.received_at,
            )
            for sop_uid, name in zip(sop_uids, names, strict=False)
        ]
    return files


# ---------------------------------------------------------------------------- tasks


def _family(session: Session, task_id: str) -> tuple[Task, list[Task]] | None:
    task = session.get(Task, task_id)
    if task is None:
        return None
    subtasks = session.scalars(
        select(Task).where(Task.parent_id == task_id).order_by(Task.created_at, Task.id)
    ).all()
    return task, list(subtasks)


def task_timeline(session: Session, task_id: str) -> TaskTimeline | None:
    """The task, its direct sub-tasks, and all their events by time; None when unknown."""
    family = _family(session, task_id)
    if family is None:
        return None
    task, subtasks = family
    ids = [task.id, *(sub.id for sub in subtasks)]
    events = session.scalars(
        select(TaskEvent).where(TaskEvent.task_id.in_(ids)).order_by(TaskEvent.time, TaskEvent.id)
    ).all()
    return TaskTimeline(
        task=TaskView.model_validate(task),
        subtasks=[TaskView.model_validate(sub) for sub in subtasks],
        events=[TaskEventView.model_validate(event) for event in events],
    )


def task_logs(session: Session, task_id: str) -> list[ModuleLogView] | None:
    """Module logs of the task and its sub-tasks, by time; None when the task is unknown."""
    family = _family(session, task_id)
    if family is None:
        return None
    ids = [family[0].id, *(sub.id for sub in family[1])]
    rows = session.scalars(
        select(ModuleLog).where(ModuleLog.task_id.in_(ids)).order_by(ModuleLog.time, ModuleLog.id)
    ).all()
    return [ModuleLogView.model_validate(row) for row in rows]


def task_results(session: Session, task_id: str) -> list[ModuleOutputView] | None:
    """Module outputs of the task and its sub-tasks; None when the task is unknown."""
    family = _family(session, task_id)
    if family is None:
        return None
    ids = [family[0].id, *(sub.id for sub in family[1])]
    rows = session.scalars(
        select(ModuleOutput)
        .where(ModuleOutput.task_id.in_(ids))
        .order_by(ModuleOutput.time, ModuleOutput.index, ModuleOutput.id)
    ).all()
    return [ModuleOutputView.model_validate(row) for row in rows]


# ---------------------------------------------------------------------------- errors, stats


def recent_errors(session: Session, limit: int, since: datetime | None) -> list[ErrorView]:
    """The newest ``limit`` task and system events of severity error or critical."""
    task_query = select(TaskEvent).where(text(ERRORS_ONLY))
    system_query = select(SystemEvent).where(text(ERRORS_ONLY))
    if since is not None:
        task_query = task_query.where(TaskEvent.time >= since)
        system_query = system_query.where(SystemEvent.time >= since)
    task_rows = session.scalars(
        task_query.order_by(TaskEvent.time.desc(), TaskEvent.id.desc()).limit(limit)
    ).all()
    system_rows = session.scalars(
        system_query.order_by(SystemEvent.time.desc(), SystemEvent.id.desc()).limit(limit)
    ).all()
    errors = [
        ErrorView(
            source="task",
            time=row.time,
            producer=row.producer,
            event=row.event,
            severity=row.severity,
            message=row.info,
            task_id=row.task_id,
            rule=row.rule,
            target=row.target,
        )
        for row in task_rows
    ] + [
        ErrorView(
            source="system",
            time=row.time,
            producer=row.producer,
            event=row.event,
            severity=row.severity,
            message=row.description,
        )
        for row in system_rows
    ]
    errors.sort(key=lambda error: error.time, reverse=True)
    return errors[:limit]


def statistics(session: Session, days: int, now: datetime | None = None) -> Stats:
    """Hour-by-hour counters of the last ``days`` days (the current hour included)."""
    until = hour_of(now or datetime.now(UTC)) + timedelta(hours=1)
    since = until - timedelta(days=days)
    in_window = (HourlyStat.hour >= since, HourlyStat.hour < until)
    hourly = {
        since + timedelta(hours=n): {"series": 0, "instances": 0, "failures": 0}
        for n in range(days * 24)
    }
    for hour, metric, value in session.execute(
        select(HourlyStat.hour, HourlyStat.metric, HourlyStat.value).where(
            *in_window, HourlyStat.metric.in_(HOURLY_METRICS)
        )
    ):
        if hour in hourly:
            hourly[hour][metric] += value
    rules: dict[str, dict[str, int]] = {}
    targets: dict[str, dict[str, int]] = {}
    for metric, key, total in session.execute(
        select(HourlyStat.metric, HourlyStat.key, func.sum(HourlyStat.value))
        .where(*in_window, HourlyStat.metric.in_(KEYED_METRICS))
        .group_by(HourlyStat.metric, HourlyStat.key)
    ):
        kind, _, counter = metric.partition("_")
        if kind == "rule":
            rules.setdefault(key, {"tasks": 0, "failures": 0})[counter] += int(total)
        else:
            targets.setdefault(key, {"dispatches": 0, "failures": 0})[counter] += int(total)
    hours = [HourStats(hour=hour, **counts) for hour, counts in hourly.items()]
    return Stats(
        since=since,
        until=until,
        days=days,
        totals=Totals(
            series=sum(h.series for h in hours),
            instances=sum(h.instances for h in hours),
            failures=sum(h.failures for h in hours),
        ),
        hours=hours,
        rules=sorted(
            (RuleStats(rule=rule, **counts) for rule, counts in rules.items()),
            key=lambda item: (-item.tasks, item.rule),
        ),
        targets=sorted(
            (TargetStats(target=target, **counts) for target, counts in targets.items()),
            key=lambda item: (-item.dispatches, item.target),
        ),
    )
