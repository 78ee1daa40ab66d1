"""The task file (DESIGN §5; mercure §4.3): ``task.json`` as pydantic models, in mercure's schema.

Every task folder holds a ``task.json`` that the router creates and the processor and dispatcher
update. It follows mercure's ``Task`` model so that mercure's processing modules, which read the
file inside their container, work unchanged. ``docs/task.md`` describes every field and the
Caduceus additions.

Contracts:

* "Absent" is ``None`` in Python; ``dispatch``, ``process`` and ``study`` are written as ``{}``
  when absent, exactly as mercure writes them, and ``{}`` (or ``null``) reads back as ``None``.
* Times are aware UTC :class:`~datetime.datetime` objects, written as ISO 8601 UTC
  (``2025-05-01T08:15:02.000Z``). mercure's naive local strings (``2025-05-01 10:15:02``, taken
  as the local time of the reading host) and epoch seconds (``next_retry_at``) are accepted.
* Keys nobody declares (a module's own notes, a newer mercure's fields) never make a task
  unreadable: they are kept, written back unchanged and listed in :attr:`Task.unknown_fields`;
  :func:`read_task` logs one warning naming them. Caduceus' own additions live only inside the
  nested objects, which mercure's models read leniently, never at the top level (where mercure's
  ``extra="forbid"`` would refuse them).
* :func:`read_task` returns a valid :class:`Task` or raises :class:`TaskError` naming each
  offending field by its dotted path; :func:`write_task` replaces the file atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    field_serializer,
    field_validator,
)
from pydantic_core import ErrorDetails

from common.config import Action, Module, StudyForceCompletionAction, StudyTriggerCondition
from common.errors import CaduceusError
from common.spool import atomic_write_json

logger = logging.getLogger(__name__)

MISSING = "MISSING"
"""mercure's value for a tag the series lacks (``patient_name``, ``mrn``, ``acc``, ...)."""

FailStage = Literal["DISPATCHING", "PROCESSING", "ROUTING"]
UidType = Literal["series", "study"]
DispatchState = Literal["waiting", "complete", "error"]


class TaskError(CaduceusError):
    """A task file is missing, unreadable or invalid; the message names the offending field."""


# ---------------------------------------------------------------------------- times


def now_utc() -> datetime:
    """The current time as an aware UTC datetime (what every time field holds)."""
    return datetime.now(UTC)


def _parse_time(value: Any) -> Any:
    """ISO 8601 (any offset, or naive = local time), mercure's ``YYYY-MM-DD HH:MM:SS`` (local
    time) or epoch seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{value!r} is not a valid time in epoch seconds") from None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO 8601 time (nor mercure's 'YYYY-MM-DD HH:MM:SS')"
            ) from None
    return value


def _as_utc(value: datetime) -> datetime:
    # astimezone() takes a naive datetime as local time, which is what mercure wrote.
    try:
        return value.astimezone(UTC)
    except (OverflowError, OSError):
        raise ValueError(f"{value.isoformat()} is out of the supported range") from None


def format_time(value: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``: fixed width, so the text sorts as the time."""
    return _as_utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Timestamp = Annotated[
    datetime,
    BeforeValidator(_parse_time),
    AfterValidator(_as_utc),
    PlainSerializer(format_time, return_type=str, when_used="json"),
]


def _empty_as_none(value: Any) -> Any:
    """mercure writes ``{}`` for an absent block (and a chain may be ``[]``)."""
    return None if value in ({}, [], "") else value


def _none_as_empty_list(value: Any) -> Any:
    return [] if value is None else value


def _as_name_list(value: Any) -> Any:
    """mercure accepts one target name as a string."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else value


# ---------------------------------------------------------------------------- the models


class _TaskModel(BaseModel):
    """Base of the task models: mutable, validated on assignment, keeps keys it does not know."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class TaskInfo(_TaskModel):
    """What the task is about and where it came from (mercure ``TaskInfo``)."""

    action: Action
    uid: str
    """SeriesInstanceUID, or StudyInstanceUID for a study task."""
    uid_type: UidType
    triggered_rules: dict[str, bool] | str = Field(default_factory=dict)
    """Every rule that triggered for the series, as ``{name: true}`` (a string in old files)."""
    applied_rule: str | None = None
    """The rule that owns the task; ``""`` for a merged series-level routing task."""
    patient_name: str | None = MISSING
    mrn: str = MISSING
    acc: str = MISSING
    sender_address: str = MISSING
    sender_aet: str = MISSING
    receiver_aet: str = MISSING
    device_serial_number: str | None = None
    mercure_version: str = ""
    mercure_appliance: str = ""
    mercure_server: str = ""
    fail_stage: FailStage | None = None
    """Set when the task is moved to ``error/``; cleared on restart."""
    # Caduceus additions
    fail_reason: str | None = None
    """Why the task failed, for the GUI (with ``fail_stage``)."""
    created_at: Timestamp | None = None
    """When the router created the task."""
    process_failures: int = Field(default=0, ge=0)
    """Processing attempts that failed through the module (exit code, timeout, bad output)."""
    process_engine_failures: int = Field(default=0, ge=0)
    """Processing attempts that failed outside the module (engine unreachable, API error)."""
    process_next_retry_at: Timestamp | None = None
    """Not before this time is the processing tried again."""


class TaskDispatchStatus(_TaskModel):
    """Delivery state of one target (mercure ``TaskDispatchStatus`` plus Caduceus fields)."""

    state: DispatchState = "waiting"
    time: Timestamp = Field(default_factory=now_utc)
    """When ``state`` last changed."""
    # Caduceus additions
    attempts: int = Field(default=0, ge=0)
    """Delivery attempts made to this target."""
    last_error: str | None = None
    """Why the last attempt failed (None after a success)."""
    instances: dict[str, int] = Field(default_factory=dict)
    """Per instance (file name relative to the task folder): the DIMSE status of its last
    C-STORE to this target (PS3.4 Annex B; 0 = success). A retry resends only the instances
    without a success or warning status."""


class TaskDispatch(_TaskModel):
    """Where the task goes (mercure ``TaskDispatch``). A partly delivered task retries only the
    targets whose ``status`` is not ``complete``."""

    target_name: Annotated[list[str], BeforeValidator(_as_name_list)] = Field(default_factory=list)
    status: dict[str, TaskDispatchStatus] = Field(default_factory=dict)
    retries: int | None = None
    """Failed dispatch attempts of the task so far."""
    next_retry_at: Timestamp | None = None
    """Not before this time is the task tried again (mercure: epoch seconds, 0 = now)."""
    series_uid: str | None = None

    @field_validator("next_retry_at", mode="before")
    @classmethod
    def _zero_is_now(cls, value: Any) -> Any:
        return None if value == 0 and not isinstance(value, bool) else value

    @field_validator("status", mode="before")
    @classmethod
    def _null_status(cls, value: Any) -> Any:
        return {} if value is None else value

    def target_status(self, target: str) -> TaskDispatchStatus:
        """The status of ``target``, created as ``waiting`` when the task has none yet."""
        if target not in self.status:
            self.status[target] = TaskDispatchStatus()
        return self.status[target]

    def pending_targets(self) -> list[str]:
        """Targets not yet delivered, in ``target_name`` order."""
        return [
            name
            for name in self.target_name
            if name not in self.status or self.status[name].state != "complete"
        ]


class TaskProcessing(_TaskModel):
    """One processing step (mercure ``TaskProcessing``); a module reads ``settings``."""

    module_name: str
    module_config: Module | None = None
    """A copy of the module's configuration at routing time."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The module's settings overlaid with the rule's ``processing_settings`` for this step."""
    retain_input_images: bool = False
    output: Any = None
    """The content of the module's ``result.json``, once it ran."""

    @field_validator("settings", mode="before")
    @classmethod
    def _null_settings(cls, value: Any) -> Any:
        return {} if value is None else value


class TaskStudy(_TaskModel):
    """Collection state of a study-level task (mercure ``TaskStudy``)."""

    study_uid: str
    complete_trigger: StudyTriggerCondition | None = None
    complete_required_series: str = ""
    creation_time: Timestamp
    last_receive_time: Timestamp
    received_series: Annotated[list[str], BeforeValidator(_none_as_empty_list)] = Field(
        default_factory=list
    )
    """SeriesDescription of every series received so far."""
    received_series_uid: Annotated[list[str], BeforeValidator(_none_as_empty_list)] = Field(
        default_factory=list
    )
    complete_force: bool = False
    complete_force_action: StudyForceCompletionAction | None = "discard"


def _process_kind(value: Any) -> str:
    return "chain" if isinstance(value, list) else "step"


Processing = Annotated[
    Annotated[TaskProcessing, Tag("step")] | Annotated[list[TaskProcessing], Tag("chain")],
    Discriminator(_process_kind),
]


class Task(_TaskModel):
    """The whole ``task.json``; ``id`` equals the task folder's name."""

    id: str
    info: TaskInfo
    dispatch: Annotated[TaskDispatch | None, BeforeValidator(_empty_as_none)] = None
    process: Annotated[Processing | None, BeforeValidator(_empty_as_none)] = None
    """One step, or a list of steps run in order (a chain)."""
    study: Annotated[TaskStudy | None, BeforeValidator(_empty_as_none)] = None
    nomad_info: Any = None
    """mercure's Nomad job information; kept, unused by Caduceus."""

    @field_serializer("dispatch", "process", "study", mode="wrap")
    def _absent_as_empty(self, value: Any, handler: SerializerFunctionWrapHandler) -> Any:
        return {} if value is None else handler(value)

    @property
    def processing_steps(self) -> list[TaskProcessing]:
        """``process`` as a list: empty, one step, or the chain."""
        if self.process is None:
            return []
        return list(self.process) if isinstance(self.process, list) else [self.process]

    @property
    def unknown_fields(self) -> list[str]:
        """Dotted paths of keys no model declares (kept and written back unchanged)."""
        return [path for prefix, model in _walk(self, "") for path in _extras(model, prefix)]

    def dump_for_file(self) -> dict[str, Any]:
        """The JSON object written to ``task.json`` (mercure's layout)."""
        return self.model_dump(mode="json")


def _walk(model: _TaskModel, prefix: str) -> Iterator[tuple[str, _TaskModel]]:
    yield prefix, model
    for name in type(model).model_fields:
        value = getattr(model, name)
        items: list[tuple[str, Any]] = []
        if isinstance(value, _TaskModel):
            items = [(f"{prefix}{name}.", value)]
        elif isinstance(value, list):
            items = [(f"{prefix}{name}.{index}.", item) for index, item in enumerate(value)]
        elif isinstance(value, dict):
            items = [(f"{prefix}{name}.{key}.", item) for key, item in value.items()]
        for path, item in items:
            if isinstance(item, _TaskModel):
                yield from _walk(item, path)


def _extras(model: _TaskModel, prefix: str) -> list[str]:
    return [f"{prefix}{key}" for key in model.model_extra or {}]


# ---------------------------------------------------------------------------- reading, writing


def _error_line(error: ErrorDetails) -> str:
    loc = [str(part) for part in error["loc"]]
    # The discriminated union of ``process`` adds its tag to the location: process.step.x.
    if len(loc) >= 2 and loc[0] == "process" and loc[1] in ("step", "chain"):
        del loc[1]
    message = error["msg"]
    if error["type"] == "value_error":
        message = str((error.get("ctx") or {}).get("error", message))
    where = ".".join(loc)
    return f"{where}: {message}" if where else message


def parse_task(data: Any, *, source: str = "task", report: bool = True) -> Task:
    """Validate a task object (as read from JSON). Raises :class:`TaskError` naming each
    offending field; with ``report``, logs one warning listing unknown keys."""
    if not isinstance(data, dict):
        raise TaskError(f"{source}: a task must be a JSON object, not {type(data).__name__}")
    try:
        task = Task.model_validate(data)
    except ValidationError as exc:
        lines = [_error_line(error) for error in exc.errors(include_url=False)]
        raise TaskError(f"invalid task in {source}:\n  " + "\n  ".join(lines)) from None
    if report and task.unknown_fields:
        logger.warning(
            "%s: unknown task fields are kept but not used: %s",
            source,
            ", ".join(task.unknown_fields),
            extra={"task_id": task.id},
        )
    return task


def read_task(path: Path, *, report: bool = True) -> Task:
    """Read and validate the ``task.json`` at ``path`` (see :func:`parse_task`).

    Raises :class:`TaskError` when the file is missing or unreadable, is not JSON (with line and
    column), or is not a valid task.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"task file {path} does not exist") from None
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    return parse_task(data, source=str(path), report=report)


def write_task(path: Path, task: Task, *, durable: bool = True) -> None:
    """Write ``task`` to ``path`` atomically (temp file, fsync, rename; see ``common.spool``)."""
    atomic_write_json(path, task.dump_for_file(), durable=durable)
