"""The read side: series search, series detail, task timeline, logs, results, errors, stats."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

from pydantic import AfterValidator, StringConstraints
from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from bookkeeper.batch import day_of, hour_of
from bookkeeper.models import (
    DailyStat,
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
from bookkeeper.views import (
    ErrorView,
    FileView,
    HourStats,
    ModuleLogView,
    ModuleOutputView,
    ReceptionView,
    RuleStats,
    SeriesDetail,
    SeriesSummary,
    Stats,
    TargetStats,
    TaskEventView,
    TaskTimeline,
    TaskView,
    Totals,
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


def _keyed_totals(
    session: Session, since: datetime, until: datetime
) -> Iterator[tuple[str, str, int]]:
    """(metric, key, total) of the rule and target counters over [since, until).

    Whole days come from ``daily_stats``; the hours before the first midnight and after the
    last one from ``hourly_stats``. A 30-day window thus reads about 30 rows per key, not 720.
    """
    first_day = day_of(since) if since == day_of(since) else day_of(since) + timedelta(days=1)
    last_day = max(first_day, day_of(until))
    daily = (
        select(DailyStat.metric, DailyStat.key, func.sum(DailyStat.value))
        .where(
            DailyStat.day >= first_day,
            DailyStat.day < last_day,
            DailyStat.metric.in_(KEYED_METRICS),
        )
        .group_by(DailyStat.metric, DailyStat.key)
    )
    edges = (
        select(HourlyStat.metric, HourlyStat.key, func.sum(HourlyStat.value))
        .where(
            or_(
                and_(HourlyStat.hour >= since, HourlyStat.hour < first_day),
                and_(HourlyStat.hour >= last_day, HourlyStat.hour < until),
            ),
            HourlyStat.metric.in_(KEYED_METRICS),
        )
        .group_by(HourlyStat.metric, HourlyStat.key)
    )
    for query in (daily, edges):
        for metric, key, total in session.execute(query):
            yield metric, key, int(total)


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
    for metric, key, total in _keyed_totals(session, since, until):
        kind, _, counter = metric.partition("_")
        if kind == "rule":
            rules.setdefault(key, {"tasks": 0, "failures": 0})[counter] += total
        else:
            targets.setdefault(key, {"dispatches": 0, "failures": 0})[counter] += total
    # Built from counts this function computed: nothing to validate (up to 2,160 hours).
    hours = [
        HourStats.model_construct(
            hour=hour, series=c["series"], instances=c["instances"], failures=c["failures"]
        )
        for hour, c in hourly.items()
    ]
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
