"""The bookkeeper's HTTP API: :func:`create_app` builds it (``docs/bookkeeper.md``).

``POST /v1/events`` stores batches of events; ``GET /v1/...`` answers the GUI's questions;
``GET /health`` is open. Everything under ``/v1`` needs the shared token:
``Authorization: Bearer <token>`` (mercure's ``Token <token>`` works too).

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at
runtime, and they name dependencies local to :func:`create_app`.
"""

import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final, TypeVar

import pydantic_core
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator, StringConstraints, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bookkeeper import queries, search
from bookkeeper.db import create_db_engine, current_revision, head_revision
from bookkeeper.ingest import ingest
from bookkeeper.payloads import (
    Batch,
    Envelope,
    IngestResult,
    _Payload,
    documented_batch,
    iter_known,
    no_nul,
)
from bookkeeper.settings import Settings
from bookkeeper.views import (
    ErrorList,
    Health,
    Message,
    ModuleLogList,
    ModuleOutputList,
    Problem,
    SeriesDetail,
    SeriesPage,
    Stats,
    TaskTimeline,
    ValidationProblem,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PROBLEMS: Final = 50
"""A 422 lists at most this many problems."""
RETRIES: Final = 3
"""Attempts of an ingest transaction that PostgreSQL aborted as a deadlock."""
_RETRYABLE_PGCODES: Final = frozenset({"40P01", "40001"})  # deadlock, serialization failure

Uid = Annotated[str, StringConstraints(max_length=64), AfterValidator(no_nul)]
TaskId = Annotated[str, StringConstraints(max_length=128), AfterValidator(no_nul)]


class BatchInvalid(Exception):
    """A batch failed validation; ``problems`` name the fields."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} problems")
        self.problems = problems


_LOCATIONS: Final = frozenset({"body", "query", "path", "header"})


def _problem(loc: tuple[str | int, ...], msg: str, kind: str) -> Problem:
    """A problem at ``loc``; its ``field`` leaves out where (body, query...) the field was."""
    inner = loc[1:] if loc and loc[0] in _LOCATIONS else loc
    field = ".".join(str(part) for part in inner) or str(loc[0] if loc else "")
    return Problem(loc=list(loc), field=field, msg=msg, type=kind)


def _problems(errors: list[Any], prefix: tuple[str | int, ...]) -> list[Problem]:
    return [
        _problem((*prefix, *error["loc"]), str(error["msg"]), str(error["type"]))
        for error in errors[:MAX_PROBLEMS]
    ]


def parse_batch(body: bytes, max_batch: int) -> tuple[list[Envelope], dict[int, _Payload]]:
    """The events of a ``POST /v1/events`` body and the checked payloads of known kinds.

    Raises :class:`BatchInvalid` (422) and ``HTTPException(413)`` for more than ``max_batch``.
    """
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise BatchInvalid([_problem(("body",), f"invalid JSON: {exc}", "json_invalid")]) from None
    events = data.get("events") if isinstance(data, dict) else None
    if isinstance(events, list) and len(events) > max_batch:
        raise HTTPException(413, f"{len(events)} events in one batch; at most {max_batch}")
    try:
        batch = Batch.model_validate(data)
    except ValidationError as exc:
        raise BatchInvalid(_problems(exc.errors(include_url=False), ("body",))) from None
    payloads: dict[int, _Payload] = {}
    problems: list[Problem] = []
    for number, model in iter_known(batch.events):
        try:
            payloads[number] = model.model_validate(batch.events[number].payload)
        except ValidationError as exc:
            prefix = ("body", "events", number, "payload")
            problems += _problems(exc.errors(include_url=False), prefix)
    if problems:
        raise BatchInvalid(problems[:MAX_PROBLEMS])
    return batch.events, payloads


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _token_check(settings: Settings) -> Callable[[str | None], None]:
    expected = settings.token.get_secret_value().encode()
    header = APIKeyHeader(
        name="Authorization",
        auto_error=False,
        scheme_name="token",
        description="`Bearer <token>`, or mercure's `Token <token>`.",
    )

    def check(authorization: Annotated[str | None, Security(header)] = None) -> None:
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme.lower() in ("bearer", "token") and secrets.compare_digest(
            value.strip().encode(), expected
        ):
            return
        raise HTTPException(401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"})

    return check


def _retryable(exc: OperationalError) -> bool:
    return getattr(exc.orig, "pgcode", None) in _RETRYABLE_PGCODES


def store_body(engine: Engine, body: bytes, max_batch: int) -> IngestResult:
    """Parse a ``POST /v1/events`` body and store it in one transaction (retried when
    PostgreSQL aborts it as a deadlock or serialisation failure)."""
    events, payloads = parse_batch(body, max_batch)
    for attempt in range(1, RETRIES + 1):
        try:
            with engine.begin() as conn:
                return ingest(conn, events, payloads)
        except OperationalError as exc:
            if attempt == RETRIES or not _retryable(exc):
                raise
            logger.warning("ingest attempt %d aborted (%s); retrying", attempt, exc.orig)
    raise AssertionError("unreachable")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The bookkeeper's ASGI app, on ``engine`` (default: one for ``settings.database_url``).

    Connects lazily: nothing touches the database until a request does. The schema must be
    migrated already (``main`` does it before serving).
    """
    engine = engine or create_db_engine(settings.database_url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    expected_revision = head_revision()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="Caduceus bookkeeper",
        version="1",
        summary="The history of every series: ingest of service events, queries for the GUI.",
        lifespan=lifespan,
    )
    _install_handlers(app)

    def session() -> Iterator[Session]:
        with sessions() as db:
            yield db

    api = APIRouter(
        prefix="/v1",
        dependencies=[Depends(_token_check(settings))],
        responses={401: {"model": Message}, 422: {"model": ValidationProblem}},
    )

    @api.post(
        "/events",
        response_model=IngestResult,
        summary="Store a batch of events (idempotent by event id)",
        responses={413: {"model": Message}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}},
            }
        },
    )
    async def post_events(request: Request) -> IngestResult:
        """Stores every event whose ``id`` is new, all or nothing. ``stored`` counts the new
        ones, ``duplicates`` those already stored (or repeated in the batch)."""
        body = await _read_body(request, settings.max_body_bytes)
        # Parsed in the thread too: a big batch takes tens of milliseconds of CPU, which would
        # stall every other request on the event loop meanwhile.
        result = await run_in_threadpool(store_body, engine, body, settings.max_batch)
        logger.debug("stored %d events, %d duplicates", result.stored, result.duplicates)
        return result

    @api.get("/series", response_model=SeriesPage, summary="Search series")
    def get_series(
        db: Annotated[Session, Depends(session)], query: Annotated[search.SeriesQuery, Query()]
    ) -> SeriesPage:
        return search.search_series(db, query)

    @api.get(
        "/series/{series_uid}",
        response_model=SeriesDetail,
        summary="One series with its receptions, files and tasks",
        responses={404: {"model": Message}},
    )
    def get_one_series(
        db: Annotated[Session, Depends(session)],
        series_uid: Annotated[Uid, Path()],
        files_limit: Annotated[int, Query(ge=0, le=100_000)] = 1000,
        files_offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> SeriesDetail:
        detail = queries.series_detail(db, series_uid, files_limit, files_offset)
        if detail is None:
            raise HTTPException(404, "no such series")
        return detail

    @api.get(
        "/tasks/{task_id}",
        response_model=TaskTimeline,
        summary="A task's timeline, with its sub-tasks",
        responses={404: {"model": Message}},
    )
    def get_task(
        db: Annotated[Session, Depends(session)], task_id: Annotated[TaskId, Path()]
    ) -> TaskTimeline:
        return _found(queries.task_timeline(db, task_id), "no such task")

    @api.get(
        "/tasks/{task_id}/logs",
        response_model=ModuleLogList,
        summary="Module logs of a task and its sub-tasks",
        responses={404: {"model": Message}},
    )
    def get_task_logs(
        db: Annotated[Session, Depends(session)], task_id: Annotated[TaskId, Path()]
    ) -> ModuleLogList:
        items = _found(queries.task_logs(db, task_id), "no such task")
        return ModuleLogList(task_id=task_id, items=items)

    @api.get(
        "/tasks/{task_id}/results",
        response_model=ModuleOutputList,
        summary="Module outputs (result.json) of a task and its sub-tasks",
        responses={404: {"model": Message}},
    )
    def get_task_results(
        db: Annotated[Session, Depends(session)], task_id: Annotated[TaskId, Path()]
    ) -> ModuleOutputList:
        items = _found(queries.task_results(db, task_id), "no such task")
        return ModuleOutputList(task_id=task_id, items=items)

    @api.get("/errors", response_model=ErrorList, summary="Recent errors, newest first")
    def get_errors(
        db: Annotated[Session, Depends(session)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        since: Annotated[queries.QueryTime | None, Query()] = None,
    ) -> ErrorList:
        return ErrorList(items=queries.recent_errors(db, limit, since))

    @api.get("/stats", response_model=Stats, summary="Dashboard statistics, hour by hour")
    def get_stats(
        db: Annotated[Session, Depends(session)], days: Annotated[int, Query(ge=1, le=90)] = 7
    ) -> Response:
        # Serialised here, once: FastAPI would validate all the hours of the answer again.
        stats = queries.statistics(db, days)
        return Response(stats.model_dump_json(), media_type="application/json")

    app.include_router(api)

    @app.get(
        "/health",
        response_model=Health,
        summary="Liveness and schema revision (no token needed)",
        responses={503: {"model": Health}},
    )
    def health() -> JSONResponse:
        try:
            revision = current_revision(engine)
        except DBAPIError as exc:
            logger.warning("health check: database unreachable: %s", exc.orig)
            body = Health(
                status="unavailable",
                database="unreachable",
                revision=None,
                expected_revision=expected_revision,
            )
            return JSONResponse(body.model_dump(), status_code=503)
        ok = revision == expected_revision
        body = Health(
            status="ok" if ok else "unavailable",
            database="reachable",
            revision=revision,
            expected_revision=expected_revision,
        )
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app


def _found(value: T | None, message: str) -> T:
    if value is None:
        raise HTTPException(404, message)
    return value


def _install_handlers(app: FastAPI) -> None:
    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = _problems(list(exc.errors()), ())
        return JSONResponse(ValidationProblem(detail=problems).model_dump(), status_code=422)

    async def invalid_batch(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BatchInvalid)
        return JSONResponse(ValidationProblem(detail=exc.problems).model_dump(), status_code=422)

    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        logger.error("database unavailable: %s", exc)
        return JSONResponse(
            {"detail": "database unavailable"}, status_code=503, headers={"Retry-After": "5"}
        )

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(BatchInvalid, invalid_batch)
    app.add_exception_handler(OperationalError, database_down)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI schema, with the ingest body (read by hand, for 413 and exact 422s)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        batch = documented_batch().model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(batch.pop("$defs", {}))
        components["Batch"] = batch
        app.openapi_schema = schema
        return schema

    return build
