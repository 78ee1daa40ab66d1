"""The durable local event outbox (DESIGN §8; the contract is written up in ``docs/events.md``).

Every service records its events here first; a shipper later sends them to the bookkeeper in
batches (:meth:`Outbox.pending`) and deletes what the bookkeeper stored (:meth:`Outbox.ack`). A
bookkeeper outage therefore loses nothing and blocks nothing on the receive path.

Storage is one SQLite file per service (:func:`outbox_path`) in WAL mode with
``synchronous=FULL``: when :meth:`Outbox.record` returns, the event is in the write-ahead log and
flushed to disk, so it survives a ``kill -9`` of the process and a power loss. Several processes
of one service may record into the same file at once: every write is one short ``BEGIN
IMMEDIATE`` transaction and waits up to ``busy_timeout`` seconds for the write lock. Within a
process an :class:`Outbox` is thread-safe (one connection, guarded by a lock); it must not cross a
``fork`` — open one in each process.

The outbox is bounded. While its live data would exceed ``max_bytes``, new events are *refused*
(never the stored ones deleted): they are counted, by kind, and when there is room again a single
``outbox_overflow`` event recording the gap is stored in the sequence where the gap is. Refusal is
not an error: :meth:`Outbox.record` returns normally, so a full outbox never stops images.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

from common.errors import OutboxError

logger = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
DEFAULT_MAX_BYTES: Final = 256 * MIB
DEFAULT_BUSY_TIMEOUT: Final = 10.0
"""Seconds a write waits for another process's transaction before it fails."""

OVERFLOW_KIND: Final = "outbox_overflow"
"""Kind of the system event that records how many events a full outbox refused."""

SCHEMA_VERSION: Final = 1

_ROW_OVERHEAD: Final = 64
"""Bytes a stored event takes beyond its text columns (record header, rowid, index entry)."""
_GAP_EVENT_SIZE: Final = 512
"""Room an ``outbox_overflow`` event needs; an ack that frees this much closes the gap."""
_WAL_SIZE_LIMIT: Final = 16 * MIB
"""The WAL is truncated back to this size after a checkpoint."""
_VACUUM_PAGES: Final = 2048
"""At most this many free pages are returned to the filesystem after one ack (8 MiB)."""
_VACUUM_MIN_FREE: Final = 256
"""Free pages are kept for reuse up to this many (1 MiB); only beyond it is the file shrunk."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    id       TEXT NOT NULL UNIQUE,
    producer TEXT NOT NULL,
    kind     TEXT NOT NULL,
    time     TEXT NOT NULL,
    payload  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS overflow (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    dropped     INTEGER NOT NULL,
    first_time  TEXT NOT NULL,
    last_time   TEXT NOT NULL,
    kinds       TEXT NOT NULL
);
"""


def outbox_path(state_dir: Path, service: str) -> Path:
    """Where ``service`` keeps its outbox: ``<state>/outbox/<service>.sqlite3``."""
    return state_dir / "outbox" / f"{service}.sqlite3"


def utc_now() -> str:
    """The current time as ISO 8601 UTC with microseconds and a ``Z`` suffix."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """One recorded event: the envelope every service sends to the bookkeeper."""

    id: str
    """Unique id (uuid4 hex unless the producer chose one); the bookkeeper stores an id once."""
    producer: str
    """The service (or service instance) that recorded the event."""
    seq: int
    """Position in this outbox; increases with every stored event and is never reused."""
    kind: str
    time: str
    """When the event was recorded, ISO 8601 UTC (``2024-05-01T12:00:00.000000Z``)."""
    payload: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The envelope as a JSON-ready dict (what the shipper sends)."""
        return {
            "id": self.id,
            "producer": self.producer,
            "seq": self.seq,
            "kind": self.kind,
            "time": self.time,
            "payload": self.payload,
        }


class NewEvent(NamedTuple):
    """An event to record with :meth:`Outbox.record_many`."""

    kind: str
    payload: Mapping[str, Any]
    event_id: str | None = None


class _Row(NamedTuple):
    id: str
    kind: str
    time: str
    payload: str
    size: int
    """Estimated bytes the row takes in the file."""


class Outbox:
    """A durable, bounded, multi-process event outbox in one SQLite file.

    >>> with Outbox(outbox_path(paths.state, "receiver"), "receiver") as outbox:
    ...     outbox.record("association", {"calling_ae": "CT1", ...})

    :meth:`record` and :meth:`record_many` raise :class:`OutboxError` for a bad kind, id or
    payload (nothing of the call is stored) and when the file cannot be written (disk full, lock
    not obtained within ``busy_timeout``, corrupt file). A full outbox is not an error.
    """

    def __init__(
        self,
        path: Path,
        producer: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        if not producer:
            raise OutboxError("an outbox needs a producer name")
        if max_bytes <= 0:
            raise OutboxError(f"max_bytes must be positive, not {max_bytes}")
        self.path = path
        self.producer = producer
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = _open(path, busy_timeout)
        self._page_size: int = self._conn.execute("PRAGMA page_size").fetchone()[0]

    # ------------------------------------------------------------------------ recording

    def record(self, kind: str, payload: Mapping[str, Any], *, event_id: str | None = None) -> str:
        """Store one event durably and return its id.

        When this returns, the event is on disk. A repeated id is stored once (the first
        payload is kept). While the outbox is full the event is refused and counted instead
        (see the module docstring); the id is returned all the same.
        """
        return self.record_many([NewEvent(kind, payload, event_id)])[0]

    def record_many(self, events: Iterable[NewEvent | tuple[str, Mapping[str, Any]]]) -> list[str]:
        """Store several events in one transaction; return their ids in the given order.

        Each item is a :class:`NewEvent` or a ``(kind, payload)`` pair. Every payload is
        checked before anything is written, so a bad one stores none of the batch.
        """
        rows = [
            _prepare(item if isinstance(item, NewEvent) else NewEvent(*item)) for item in events
        ]
        if rows:
            with self._transaction("record events") as conn:
                for row in rows:
                    self._insert(conn, row)
        return [row.id for row in rows]

    def _insert(self, conn: sqlite3.Connection, row: _Row) -> None:
        if self._has_room(conn, row.size):
            self._close_overflow(conn)
            conn.execute(
                "INSERT INTO events (id, producer, kind, time, payload) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (row.id, self.producer, row.kind, row.time, row.payload),
            )
        elif conn.execute("SELECT 1 FROM events WHERE id = ?", (row.id,)).fetchone() is None:
            self._note_dropped(conn, row)

    # ------------------------------------------------------------------------ shipping

    def pending(self, limit: int = 500) -> list[Event]:
        """Up to ``limit`` stored events, oldest (lowest ``seq``) first."""
        if limit < 1:
            raise OutboxError(f"limit must be at least 1, not {limit}")
        with self._guarded("read events") as conn:
            rows = conn.execute(
                "SELECT seq, id, producer, kind, time, payload FROM events ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            Event(id=id_, producer=producer, seq=seq, kind=kind, time=time, payload=json.loads(p))
            for seq, id_, producer, kind, time, p in rows
        ]

    def ack(self, event_ids: Iterable[str]) -> None:
        """Delete the events the bookkeeper has stored; unknown ids are ignored."""
        ids = [(event_id,) for event_id in event_ids]
        if not ids:
            return
        with self._transaction("acknowledge events") as conn:
            conn.executemany("DELETE FROM events WHERE id = ?", ids)
            if self._has_room(conn, _GAP_EVENT_SIZE):
                self._close_overflow(conn)
        self._shrink()

    def _shrink(self) -> None:
        """Give free pages back to the filesystem, a bounded amount per call (best effort)."""
        try:
            with self._guarded("shrink") as conn:
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
                if free >= _VACUUM_MIN_FREE:
                    # executescript, because each step of this pragma frees only one page.
                    conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_PAGES});")
        except OutboxError as exc:
            logger.warning("%s", exc)

    # ------------------------------------------------------------------------ state

    def count(self) -> int:
        """Number of stored (not yet acknowledged) events."""
        with self._guarded("count events") as conn:
            result: int = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        return result

    def size_bytes(self) -> int:
        """Bytes of live data in the file (the quantity bounded by ``max_bytes``)."""
        with self._guarded("measure") as conn:
            return self._used_bytes(conn)

    def dropped(self) -> int:
        """Events refused since the outbox last had room (0 when it is not full)."""
        with self._guarded("read the overflow counter") as conn:
            row = conn.execute("SELECT dropped FROM overflow").fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        """Close the file (idempotent); later calls raise :class:`OutboxError`."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, {self.producer!r})"

    # ------------------------------------------------------------------------ overflow

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
        free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def _has_room(self, conn: sqlite3.Connection, size: int) -> bool:
        return self._used_bytes(conn) + size <= self.max_bytes

    def _note_dropped(self, conn: sqlite3.Connection, row: _Row) -> None:
        current = conn.execute("SELECT kinds FROM overflow").fetchone()
        kinds: dict[str, int] = {} if current is None else json.loads(current[0])
        kinds[row.kind] = kinds.get(row.kind, 0) + 1
        if current is None:
            logger.warning(
                "event outbox %s is full (limit %d bytes): refusing new events until the "
                "bookkeeper acknowledges some",
                self.path,
                self.max_bytes,
            )
            conn.execute(
                "INSERT INTO overflow (one, dropped, first_time, last_time, kinds)"
                " VALUES (1, 1, ?, ?, ?)",
                (row.time, row.time, json.dumps(kinds)),
            )
        else:
            conn.execute(
                "UPDATE overflow SET dropped = dropped + 1, last_time = ?, kinds = ?",
                (row.time, json.dumps(kinds)),
            )
        logger.debug("outbox full: dropped %s event %s", row.kind, row.id)

    def _close_overflow(self, conn: sqlite3.Connection) -> None:
        """If events were refused, store the ``outbox_overflow`` event that records the gap."""
        current = conn.execute(
            "SELECT dropped, first_time, last_time, kinds FROM overflow"
        ).fetchone()
        if current is None:
            return
        dropped, first_time, last_time, kinds = current
        payload = {
            "dropped": dropped,
            "kinds": json.loads(kinds),
            "first_dropped_at": first_time,
            "last_dropped_at": last_time,
            "max_bytes": self.max_bytes,
        }
        conn.execute(
            "INSERT INTO events (id, producer, kind, time, payload) VALUES (?, ?, ?, ?, ?)",
            (uuid.uuid4().hex, self.producer, OVERFLOW_KIND, utc_now(), json.dumps(payload)),
        )
        conn.execute("DELETE FROM overflow")
        logger.warning(
            "event outbox %s has room again; %d events were refused between %s and %s",
            self.path,
            dropped,
            first_time,
            last_time,
        )

    # ------------------------------------------------------------------------ connection

    @contextmanager
    def _guarded(self, action: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the thread lock, with SQLite errors raised as OutboxError."""
        with self._lock:
            if self._conn is None:
                raise OutboxError(f"cannot {action}: outbox {self.path} is closed")
            if os.getpid() != self._pid:
                raise OutboxError(
                    f"cannot {action}: outbox {self.path} was opened by process {self._pid}; "
                    "open an Outbox in each process"
                )
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot {action} in outbox {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """A short write transaction that takes the write lock up front (``BEGIN IMMEDIATE``).

        Taking it up front means a busy file is waited for (``busy_timeout``) instead of failing
        on a read-to-write upgrade.
        """
        with self._guarded(action) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def _prepare(new: NewEvent) -> _Row:
    """Check and serialise one event before any transaction starts."""
    if not isinstance(new.kind, str) or not new.kind:
        raise OutboxError(f"an event kind must be a non-empty string, not {new.kind!r}")
    if new.event_id is not None and (not isinstance(new.event_id, str) or not new.event_id):
        raise OutboxError(f"the id of a {new.kind!r} event must be a non-empty string")
    if not isinstance(new.payload, Mapping):
        kind_of = type(new.payload).__name__
        raise OutboxError(f"the payload of a {new.kind!r} event must be a mapping, not {kind_of}")
    try:
        text = json.dumps(
            dict(new.payload), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise OutboxError(
            f"the payload of a {new.kind!r} event is not JSON-serialisable: {exc}"
        ) from exc
    event_id = new.event_id or uuid.uuid4().hex
    time = utc_now()
    size = len(event_id) + len(new.kind) + len(time) + len(text.encode()) + _ROW_OVERHEAD
    return _Row(id=event_id, kind=new.kind, time=time, payload=text, size=size)


def _open(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open (creating if needed) the outbox file and bring its schema up to date."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as exc:
        raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
    try:
        _configure(conn, path)
        _migrate(conn, path)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    # auto_vacuum only takes effect on a new, empty file; it lets ack() shrink the file.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OutboxError(f"outbox {path} cannot use WAL mode (journal_mode is {mode})")
    # FULL: the WAL is fsynced at every commit, so a recorded event survives a power loss too.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"outbox {path} has schema version {version}; this Caduceus knows up to "
                f"{SCHEMA_VERSION}"
            )
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
