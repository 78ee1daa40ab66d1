"""Response models of the query API (what the OpenAPI schema documents)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _View(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class SeriesSummary(_View):
    """A series as listed by the search."""

    series_uid: str
    study_uid: str
    patient_name: str | None
    patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None
    series_description: str | None
    series_number: str | None
    modality: str | None
    sender_aet: str | None
    sender_address: str | None
    receiver_aet: str | None
    first_received_at: datetime
    last_received_at: datetime
    instance_count: int
    status: str
    status_at: datetime


class SeriesPage(BaseModel):
    items: list[SeriesSummary]
    limit: int
    offset: int
    total: int | None
    """All matches, when asked for with ``count=true`` (else null)."""
    has_more: bool
    """More matches follow this page."""
    next_cursor: str | None = None
    """Pass as ``cursor`` (with the same filters, sort and order) for the next page; null on
    the last page."""


class FileView(_View):
    """One received instance (a re-sent instance is listed at each reception)."""

    sop_uid: str
    file_name: str
    association_id: str | None
    received_at: datetime


class ReceptionView(_View):
    association_id: str | None
    received_at: datetime
    instance_count: int
    bytes: int | None
    sender_aet: str | None
    sender_address: str | None
    receiver_aet: str | None


class TaskView(_View):
    id: str
    parent_id: str | None
    series_uid: str | None
    study_uid: str | None
    rule: str | None
    target: str | None
    status: str | None
    created_at: datetime
    updated_at: datetime
    data: dict[str, Any] | None
    """The latest ``task.json`` snapshot."""


class SeriesDetail(SeriesSummary):
    """One series with every stored tag, its receptions, files and tasks."""

    study_id: str | None
    body_part_examined: str | None
    protocol_name: str | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    station_name: str | None
    referring_physician_name: str | None
    tags: dict[str, Any] | None
    receptions: list[ReceptionView]
    files: list[FileView]
    """One page of the files (``files_limit``/``files_offset``), in arrival order."""
    files_total: int
    tasks: list[TaskView]


class TaskEventView(_View):
    task_id: str
    time: datetime
    producer: str
    event: str
    severity: str
    info: str
    file_count: int | None
    target: str | None
    rule: str | None


class TaskTimeline(BaseModel):
    """A task, its direct sub-tasks, and the events of all of them in time order."""

    task: TaskView
    subtasks: list[TaskView]
    events: list[TaskEventView]


class ModuleLogView(_View):
    task_id: str
    module: str
    time: datetime
    logs: str


class ModuleOutputView(_View):
    task_id: str
    module: str
    index: int
    time: datetime
    settings: dict[str, Any] | None
    output: Any


class ErrorView(BaseModel):
    """A task event or system event of severity error or critical."""

    source: Literal["task", "system"]
    time: datetime
    producer: str
    event: str
    severity: str
    message: str
    task_id: str | None = None
    rule: str | None = None
    target: str | None = None


class HourStats(BaseModel):
    hour: datetime
    """Start of the hour (UTC)."""
    series: int
    """Series first received in this hour."""
    instances: int
    """Instances received in this hour."""
    failures: int
    """Task and system events of severity error or critical."""


class RuleStats(BaseModel):
    rule: str
    tasks: int
    failures: int


class TargetStats(BaseModel):
    target: str
    dispatches: int
    failures: int


class Totals(BaseModel):
    series: int
    instances: int
    failures: int


class Stats(BaseModel):
    """Dashboard statistics over the last ``days`` days, hour by hour (every hour listed)."""

    since: datetime
    until: datetime
    days: int
    totals: Totals
    hours: list[HourStats]
    rules: list[RuleStats]
    targets: list[TargetStats]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["reachable", "unreachable"]
    revision: str | None
    """Schema revision of the database."""
    expected_revision: str
    """Newest revision this bookkeeper knows."""


class Problem(BaseModel):
    loc: list[str | int]
    field: str
    """``loc`` without ``body``/``query``, dotted: ``events.3.time``."""
    msg: str
    type: str


class ValidationProblem(BaseModel):
    """Answer 422: every problem found (input values are never echoed)."""

    detail: list[Problem]


class Message(BaseModel):
    detail: str


class ErrorList(BaseModel):
    items: list[ErrorView]
    """Newest first."""


class ModuleLogList(BaseModel):
    task_id: str
    items: list[ModuleLogView]


class ModuleOutputList(BaseModel):
    task_id: str
    items: list[ModuleOutputView]
