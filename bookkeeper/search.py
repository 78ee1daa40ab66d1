"""Series search (``GET /v1/series``): filters, sort order, and paging by offset or by cursor.

A page is ``limit`` rows in the order asked, ties broken by insertion order (the series id),
empty values last. Paging by ``offset`` counts the rows before the page, so a deep page costs
as much as all the pages before it. Paging by ``cursor`` (keyset paging) starts right after the
last row of the previous page, through the sort column's index, and costs the same at any
depth. Every page tells the cursor of the next one (``next_cursor``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator
from sqlalchemy import ColumnElement, Select, and_, exists, func, literal, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from bookkeeper.models import Series, Task
from bookkeeper.project_series import search_name
from bookkeeper.queries import QueryText, QueryTime, assume_utc
from bookkeeper.views import SeriesPage, SeriesSummary

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
TIME_SORTS: Final = frozenset({"received", "first_received"})
MAX_CURSOR: Final = 1024


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the sort, and the sort value and id of its last row."""

    sort: str
    order: str
    value: str | int | datetime | None
    id: int

    def encode(self) -> str:
        value = self.value.isoformat() if isinstance(self.value, datetime) else self.value
        text = json.dumps([self.sort, self.order, value, self.id], separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """The cursor in ``token``; ValueError when it is not one this bookkeeper made."""
        try:
            padded = token + "=" * (-len(token) % 4)
            sort, order, value, id_ = json.loads(base64.urlsafe_b64decode(padded))
        except (ValueError, TypeError, binascii.Error):
            raise ValueError("not a cursor of this API") from None
        known = isinstance(sort, str) and sort in SORTABLE and order in ("asc", "desc")
        if not known or not _int64(id_):
            raise ValueError("not a cursor of this API")
        return cls(sort, order, _sort_value(sort, value), id_)


def _int64(value: Any) -> bool:
    return type(value) is int and -(2**63) <= value < 2**63


def _sort_value(sort: str, value: Any) -> str | int | datetime | None:
    """The sort value a cursor holds, as the sort column's type (ValueError if it is not).

    Anything the database could not compare is refused here, so that a forged cursor is a 422
    and never a database error.
    """
    if sort in TIME_SORTS and isinstance(value, str):
        try:
            return assume_utc(datetime.fromisoformat(value))
        except ValueError:
            pass
    elif sort == "instance_count" and _int64(value):
        return value  # type: ignore[no-any-return]
    elif sort not in TIME_SORTS and sort != "instance_count":
        text_value = isinstance(value, str) and "\x00" not in value
        if text_value or (value is None and sort not in NOT_NULL_SORTS):
            return value  # type: ignore[no-any-return]
    raise ValueError("not a cursor of this API")


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
    cursor: str | None = Field(
        None,
        max_length=MAX_CURSOR,
        description="`next_cursor` of the previous page: the page after it, found through an "
        "index at any depth. Give the same filters, `sort` and `order` again; not with "
        "`offset`.",
    )
    count: bool = Field(False, description="Also count all matches (`total`); slower.")

    @field_validator("cursor")
    @classmethod
    def _cursor_fits(cls, token: str | None, info: ValidationInfo) -> str | None:
        if token is None:
            return None
        cursor = Cursor.decode(token)
        if (cursor.sort, cursor.order) != (info.data.get("sort"), info.data.get("order")):
            raise ValueError("the cursor belongs to another sort or order")
        if info.data.get("offset"):
            raise ValueError("a cursor cannot be combined with an offset")
        return token


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


def _name_condition(query: SeriesQuery) -> ColumnElement[bool] | None:
    needle = search_name(query.patient_name)
    if needle is None:
        return None
    if query.name_match == "contains":
        pattern = f"%{_escape_like(needle)}%"
        return Series.patient_name_search.like(pattern, escape="\\")
    # A range on the index, which is in code point order on both databases (the column is
    # COLLATE "C" on PostgreSQL); SQLite's LIKE could not use it.
    column = Series.patient_name_search
    upper = _after(needle)
    if upper is None:
        return column.like(f"{_escape_like(needle)}%", escape="\\")
    return and_(column >= needle, column < upper)


def _series_filters(query: SeriesQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    name = _name_condition(query)
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


def _sort_column(sort: str) -> ColumnElement[Any]:
    return SORTABLE[sort].expression


def search_series(session: Session, query: SeriesQuery) -> SeriesPage:
    """One page of the series matching ``query``, in the order asked (ties by series id)."""
    statement = select(Series).where(*_series_filters(query))
    if query.cursor is None:
        page = _by_offset(session, statement, query)
    else:
        page = _after_cursor(session, statement, query, Cursor.decode(query.cursor))
    total = None
    if query.count:
        total = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
    items = page[: query.limit]
    next_cursor = None
    if len(page) > query.limit:
        last = items[-1]
        value = getattr(last, SORTABLE[query.sort].key)
        next_cursor = Cursor(query.sort, query.order, value, last.id).encode()
    return SeriesPage(
        items=[SeriesSummary.model_validate(row) for row in items],
        limit=query.limit,
        offset=query.offset,
        total=total,
        has_more=next_cursor is not None,
        next_cursor=next_cursor,
    )


def _by_offset(session: Session, statement: Select[Series], query: SeriesQuery) -> list[Series]:
    """The ``limit + 1`` rows from ``offset`` on.

    Like a cursor page, in two parts: the rows with a value, ordered as the sort column's index
    is (an index cannot serve ``DESC NULLS LAST`` on PostgreSQL: that sorted the whole table),
    then the rows without one, by id. Only an offset past every row with a value needs their
    count, to know how many rows without one to skip.
    """
    wanted = query.limit + 1
    column = _sort_column(query.sort)
    nullable = query.sort not in NOT_NULL_SORTS
    valued = statement.where(column.is_not(None)) if nullable else statement
    rows = list(session.scalars(valued.order_by(*_order(query)).limit(wanted).offset(query.offset)))
    if len(rows) == wanted or not nullable:
        return rows
    skip = 0
    if not rows and query.offset:
        counted = session.scalar(select(func.count()).select_from(valued.subquery())) or 0
        skip = max(0, query.offset - counted)
    empty = statement.where(column.is_(None)).order_by(_by_id(query))
    rows += session.scalars(empty.limit(wanted - len(rows)).offset(skip))
    return rows


def _order(query: SeriesQuery) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    column = _sort_column(query.sort)
    if query.order == "desc":
        return column.desc(), Series.id.desc()
    return column.asc(), Series.id.asc()


def _by_id(query: SeriesQuery) -> ColumnElement[Any]:
    return Series.id.desc() if query.order == "desc" else Series.id.asc()


def _after_cursor(
    session: Session, statement: Select[Series], query: SeriesQuery, cursor: Cursor
) -> list[Series]:
    """The ``limit + 1`` rows after ``cursor``.

    Rows with a value come first, found by a row comparison ``(value, id) > (v, i)`` that
    both databases answer with a range of the sort column's index; the rows without a value
    (empty values sort last) follow, by id. Each part is ordered the way its index is, so no
    part sorts more than the rows it returns.
    """
    wanted = query.limit + 1
    desc = query.order == "desc"
    column = _sort_column(query.sort)
    rows: list[Series] = []
    if cursor.value is not None:
        key = tuple_(column, Series.id)
        mark = tuple_(literal(cursor.value, column.type), literal(cursor.id, Series.id.type))
        after: ColumnElement[bool] = key < mark if desc else key > mark
        rows = list(session.scalars(statement.where(after).order_by(*_order(query)).limit(wanted)))
        if len(rows) == wanted or query.sort in NOT_NULL_SORTS:
            return rows
        empty: ColumnElement[bool] = column.is_(None)
    else:
        empty = and_(column.is_(None), Series.id < cursor.id if desc else Series.id > cursor.id)
    rows += session.scalars(
        statement.where(empty).order_by(_by_id(query)).limit(wanted - len(rows))
    )
    return rows
