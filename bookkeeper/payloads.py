"""What the ingest accepts: the event envelope and the payloads of the kinds it knows.

The envelope is ``Event.as_dict()`` of :mod:`common.outbox` (``docs/events.md``). Payloads of
known kinds are checked against the models below; unknown kinds are stored raw (forward
compatible). Unknown *fields* are ignored everywhere, as ``docs/events.md`` asks of consumers.

Every string anywhere in an event must be storable in both databases: no NUL character (refused
by PostgreSQL text and JSONB), and every number finite (JSON has no NaN or infinity).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, Union, cast

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    StringConstraints,
    create_model,
    model_validator,
)

from bookkeeper.db import to_json

MAX_INT64: Final = 2**63 - 1
MAX_INT32: Final = 2**31 - 1
MAX_DEPTH: Final = 64
"""Deepest nesting of objects and arrays accepted in a payload."""


def to_utc(value: datetime) -> datetime:
    """An aware time converted to UTC (refusing times that fall outside the calendar in UTC)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time is out of range once converted to UTC") from None


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _integral(value: Any) -> Any:
    """JSON (and JSON Schema) count ``5.0`` as the integer 5; strings and booleans are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Integral = BeforeValidator(_integral)
"""An integer as JSON has them: ``5`` or ``5.0``, never ``"5"``, ``true`` or ``5.5``."""

UtcTime = Annotated[AwareDatetime, AfterValidator(to_utc)]
"""An ISO 8601 time with a time zone (``Z`` or an offset), converted to UTC."""


_Checked = AfterValidator(no_nul)

Name = Annotated[StrictStr, StringConstraints(min_length=1, max_length=128), _Checked]
"""An identifier: event id, producer, task id, association id."""
Uid = Annotated[StrictStr, StringConstraints(min_length=1, max_length=64), _Checked]
"""A DICOM UID (PS3.5 9.1: at most 64 characters)."""
Label = Annotated[StrictStr, StringConstraints(min_length=1, max_length=256), _Checked]
"""A rule, target or module name."""
Word = Annotated[StrictStr, StringConstraints(min_length=1, max_length=64), _Checked]
"""An event name (``REGISTER``, ``BOOT``...) or a status."""
Short = Annotated[StrictStr, StringConstraints(max_length=256), _Checked]
"""A short text that may be empty (a user name, an AE title)."""
Text = Annotated[StrictStr, StringConstraints(max_length=16 * 1024 * 1024), _Checked]
"""Free text (info, description, module logs)."""
Count = Annotated[StrictInt, Field(ge=0, le=MAX_INT64), _Integral]


def _severity(value: Any) -> Any:
    if isinstance(value, str):
        return value.lower()
    return value


Severity = Annotated[Literal["info", "warning", "error", "critical"], BeforeValidator(_severity)]
"""mercure's INFO/WARNING/ERROR/CRITICAL, by name (case-insensitive)."""


def check_json(value: Any, path: str = "payload", depth: int = 0) -> str | None:
    """Why ``value`` cannot be stored as JSON in both databases (naming the place), or None."""
    problem: str | None = None
    path = path if len(path) <= 200 else f"{path[:200]}..."
    if depth > MAX_DEPTH:
        problem = f"{path}: nested deeper than {MAX_DEPTH} levels"
    elif isinstance(value, str) and "\x00" in value:
        problem = f"{path}: must not contain a NUL character"
    elif isinstance(value, float) and not math.isfinite(value):
        problem = f"{path}: numbers must be finite"
    elif isinstance(value, dict):
        if any("\x00" in key for key in value):
            return f"{path}: a key must not contain a NUL character"
        items = ((f"{path}.{key}", item) for key, item in value.items())
        problem = next(filter(None, (check_json(v, p, depth + 1) for p, v in items)), None)
    elif isinstance(value, list):
        items = ((f"{path}.{n}", item) for n, item in enumerate(value))
        problem = next(filter(None, (check_json(v, p, depth + 1) for p, v in items)), None)
    return problem


class CheckedPayload(dict[str, Any]):
    """A payload found storable, with its JSON text (``json_text``), so that it is serialised
    once: the ingest stores that text as it is."""

    __slots__ = ("json_text",)
    json_text: str


def _storable(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` as a :class:`CheckedPayload`, or ValueError naming the first problem.

    Serialising is the quick check: :func:`to_json` refuses non-finite numbers, a NUL is
    escaped as ``\\u0000`` (in keys too), and a text with at most ``MAX_DEPTH`` brackets
    cannot nest deeper. Only a suspect payload is walked by :func:`check_json`, which also
    finds the place to name (and clears the false alarms: a ``\\u0000`` written literally,
    brackets inside strings).
    """
    try:
        text: str | None = to_json(value)
    except ValueError:
        text = None
    if text is None or "\\u0000" in text or text.count("{") + text.count("[") > MAX_DEPTH:
        problem = check_json(value)
        if problem:
            raise ValueError(problem)
        text = text or to_json(value)
    payload = CheckedPayload(value)
    payload.json_text = text
    return payload


# ---------------------------------------------------------------------------- the envelope


class Envelope(BaseModel):
    """One event as shipped: exactly ``Event.as_dict()`` (extra fields are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: Name
    producer: Name
    seq: Count
    kind: Annotated[StrictStr, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    time: UtcTime
    payload: Annotated[
        dict[str, Any],
        AfterValidator(_storable),
        Field(
            description="The kind's data. No string or key anywhere in it may contain U+0000, "
            "and every number must be finite."
        ),
    ]


class Batch(BaseModel):
    """The body of ``POST /v1/events``: ``{"events": [...]}`` (other keys are ignored)."""

    events: list[Envelope]


class IngestResult(BaseModel):
    """The answer to ``POST /v1/events``: new events stored, and events already stored before."""

    stored: int
    duplicates: int


# ---------------------------------------------------------------------------- known kinds


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class SeriesReceived(_Payload):
    """``series_received`` (receiver): part of a series stored during one association."""

    series_uid: Uid
    study_uid: Uid
    count: Count
    association_id: Name | None = None
    sop_instance_uids: list[Uid] = Field(default_factory=list)
    files: list[Label] = Field(default_factory=list)
    bytes: Count | None = None
    calling_ae: Short | None = None
    called_ae: Short | None = None
    peer_address: Short | None = None
    tags: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SeriesReceived:
        if self.files and len(self.files) != len(self.sop_instance_uids):
            raise ValueError("files and sop_instance_uids must have the same length")
        if self.sop_instance_uids and self.count != len(self.sop_instance_uids):
            raise ValueError("count must equal the number of sop_instance_uids")
        return self


def _targets(value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ", ".join(value) or None
    return value


class TaskUpdate(_Payload):
    """``task_update``: a snapshot of a task; present, non-null fields replace stored ones."""

    task_id: Name
    parent_id: Name | None = None
    series_uid: Uid | None = None
    study_uid: Uid | None = None
    rule: Label | None = None
    target: Annotated[Label | None, BeforeValidator(_targets)] = None
    status: Word | None = None
    data: dict[str, Any] | None = None


class TaskEventPayload(_Payload):
    """``task_event``: something that happened to a task (mercure's task event)."""

    task_id: Name
    event: Word
    severity: Severity | None = None
    info: Text = ""
    file_count: Annotated[StrictInt, Field(ge=0, le=MAX_INT32), _Integral] | None = None
    target: Label | None = None
    rule: Label | None = None

    def effective_severity(self) -> str:
        """The severity given, else ``error`` for an ``ERROR`` event and ``info`` otherwise."""
        if self.severity is not None:
            return self.severity
        return "error" if self.event.upper() == "ERROR" else "info"


class SystemEventPayload(_Payload):
    """``system_event``: a service-level event (mercure's ``mercure_events``)."""

    event: Word
    severity: Severity = "info"
    description: Text = ""


class AuditEventPayload(_Payload):
    """``audit_event``: a user action in the web GUI (mercure's ``webgui_events``)."""

    event: Word
    user: Short = ""
    description: Text = ""


class ModuleLogPayload(_Payload):
    """``module_log``: what a processing module printed while it ran for a task."""

    task_id: Name
    module: Label
    logs: Text


class ModuleOutputPayload(_Payload):
    """``module_output``: a processing module's ``result.json`` for a task."""

    task_id: Name
    module: Label
    index: Annotated[StrictInt, Field(ge=0, le=MAX_INT32), _Integral] = 0
    settings: dict[str, Any] | None = None
    output: Any = None


class ConfigVersionPayload(_Payload):
    """``config_version``: a configuration as saved (secrets removed by the producer)."""

    content: dict[str, Any]
    user: Short = ""
    comment: Text = ""


class OutboxOverflowPayload(_Payload):
    """``outbox_overflow`` (written by :mod:`common.outbox`): events a full outbox refused."""

    dropped: Count
    kinds: dict[str, Any] = Field(default_factory=dict)
    first_dropped_at: StrictStr | None = None
    last_dropped_at: StrictStr | None = None
    max_bytes: Count | None = None


KNOWN_KINDS: Final[dict[str, type[_Payload]]] = {
    "series_received": SeriesReceived,
    "task_update": TaskUpdate,
    "task_event": TaskEventPayload,
    "system_event": SystemEventPayload,
    "audit_event": AuditEventPayload,
    "module_log": ModuleLogPayload,
    "module_output": ModuleOutputPayload,
    "config_version": ConfigVersionPayload,
    "outbox_overflow": OutboxOverflowPayload,
}
"""Kinds projected into tables; every other kind (``association`` too) is kept raw only."""


def iter_known(events: list[Envelope]) -> Iterator[tuple[int, type[_Payload]]]:
    """Index and payload model of every event of a known kind."""
    for number, event in enumerate(events):
        model = KNOWN_KINDS.get(event.kind)
        if model is not None:
            yield number, model


def documented_batch() -> type[BaseModel]:
    """The batch as the OpenAPI schema describes it: an envelope per known kind (with its
    payload's shape), or any other kind with any object. Documentation only: requests are
    checked by :class:`Batch` and then by the kind's payload model."""
    variants: list[Any] = [
        create_model(
            f"{model.__name__.removesuffix('Payload')}Event",
            __base__=Envelope,
            __doc__=f"A ``{kind}`` event. {model.__doc__ or ''}".strip(),
            kind=(cast(Any, Literal)[kind], ...),
            payload=(model, ...),
        )
        for kind, model in KNOWN_KINDS.items()
    ]
    event_type = cast(Any, Union)[(*variants, Envelope)]
    return create_model("Batch", __doc__=Batch.__doc__, events=(cast(Any, list)[event_type], ...))
