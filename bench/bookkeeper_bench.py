"""Bookkeeper benchmark: ingest rate (events/s) and query latency (p50/p95) on a big history.

Both measure a real ``python -m bookkeeper`` process over HTTP, as the shippers and the GUI use
it, on SQLite and (when a server is given) PostgreSQL:

- **ingest**: batches of a realistic event mix (per series: ``association``,
  ``series_received`` with 20 instances, two ``task_update``, five ``task_event``; all new ids)
  posted by one client (the shipper is one thread per producer) and by four at once; bodies are
  serialised before the clock starts, so the number is the bookkeeper's, not the client's.
- **queries**: the database is first seeded directly (PostgreSQL ``COPY``, SQLite
  ``executemany`` in large transactions) with ``series`` series and ``events`` raw events
  (1,000,000 and 10,000,000 for the full run), plus one task, one reception and four task
  events per series and hourly and daily statistics; then each dashboard query is run
  ``repeats`` times with varying values and its latency taken at the client.

Call it from the bench runner::

    from bench import bookkeeper_bench
    results = bookkeeper_bench.run(OUT / "work" / "bookkeeper", postgres_url=..., quick=False)
    report.replace_section(DOC, "bookkeeper", bookkeeper_bench.markdown(results))

or alone: ``python -m bench.bookkeeper_bench [--quick] [--postgres URL] [--docs]``. Without
``--postgres``, ``CADUCEUS_TEST_DATABASE_URL`` is used when set (a role that may CREATEDB; each
run creates a database of its own and drops it afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
import psycopg2
from psycopg2 import sql
from sqlalchemy.engine import make_url

from bench import report
from bench.procs import free_port

logger = logging.getLogger("bench.bookkeeper")

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
DOC = REPO / "docs" / "benchmarks.md"
TOKEN = "bench-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POSTGRES_ENV = "CADUCEUS_TEST_DATABASE_URL"
TARGET_INGEST_PG = 5000.0
"""Events/s the issue asks of PostgreSQL, in batches."""
TARGET_P95_MS = 100.0
"""p95 the issue asks of the dashboard's queries."""


@dataclass(frozen=True)
class Scale:
    series: int
    events: int
    ingest_events: int
    repeats: int


FULL = Scale(series=1_000_000, events=10_000_000, ingest_events=100_000, repeats=50)
QUICK = Scale(series=20_000, events=200_000, ingest_events=20_000, repeats=20)


@dataclass
class IngestRun:
    backend: str
    batch: int
    clients: int
    events: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass
class QueryRun:
    backend: str
    name: str
    description: str
    samples_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p95(self) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class BackendResult:
    backend: str
    seed_seconds: float = 0.0
    ingest: list[IngestRun] = field(default_factory=list)
    queries: list[QueryRun] = field(default_factory=list)
    load: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Phase (ingest, queries) -> the machine's 1-minute load average at its start and end."""


@contextlib.contextmanager
def _phase(result: BackendResult, name: str) -> Iterator[None]:
    """Record the machine's load around a phase: other work on it slows the numbers down."""
    before = os.getloadavg()[0]
    yield
    result.load[name] = (before, os.getloadavg()[0])


@dataclass
class Results:
    scale: Scale
    started: str
    backends: list[BackendResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- databases


@contextlib.contextmanager
def _database(backend: str, work: Path, postgres_url: str | None) -> Iterator[str | None]:
    """A fresh database: a new PostgreSQL database (dropped after), or None for SQLite."""
    if backend == "sqlite":
        yield None
        return
    assert postgres_url
    name = f"caduceus_bench_{uuid.uuid4().hex[:8]}"
    admin = _connect(postgres_url)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop(admin, name)
        admin.close()


def _drop(admin: Any, name: str, timeout: float = 120.0) -> None:
    """Drop database ``name``. ``WITH (FORCE)`` fails while an autovacuum worker is in it (this
    role may not signal it), so wait for the worker to finish."""
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with admin.cursor() as cursor:
                cursor.execute(statement)
            return
        except psycopg2.errors.InsufficientPrivilege:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _connect(url: str) -> Any:
    parsed = make_url(url)
    return psycopg2.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database,
    )


class Server:
    """``python -m bookkeeper`` on a free port, its data under ``work``."""

    def __init__(self, work: Path, database_url: str | None) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        self.config = work / "caduceus.json"
        self.config.write_text(
            json.dumps(
                {
                    "data_root": str(work / "data"),
                    "bookkeeper": f"127.0.0.1:{self.port}",
                    "bookkeeper_api_key": TOKEN,
                }
            )
        )
        self.env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        if database_url:
            self.env["DATABASE_URL"] = database_url
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sqlalchemy_url(self) -> str:
        return (
            self.env.get("DATABASE_URL") or f"sqlite:///{self.work}/data/state/bookkeeper.sqlite3"
        )

    def start(self) -> None:
        log = (self.work / "bookkeeper.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bookkeeper", "--config", str(self.config)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + 300  # migrations + ANALYZE on a big SQLite file
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bookkeeper exited with {self.proc.returncode}; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("bookkeeper not healthy after 300 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------- ingest


def _iso(time_: datetime) -> str:
    return time_.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _event(kind: str, payload: dict[str, Any], producer: str, seq: int) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "producer": producer,
        "seq": seq,
        "kind": kind,
        "time": _iso(datetime.now(UTC)),
        "payload": payload,
    }


def event_mix(count: int, producer: str, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` new events, nine per series, as the services would send them."""
    events: list[dict[str, Any]] = []
    seq = 0
    while len(events) < count:
        series_uid = f"2.25.{uuid.uuid4().int}"
        task_id = uuid.uuid4().hex
        association_id = uuid.uuid4().hex
        sops = [f"{series_uid}.{n}" for n in range(1, 21)]
        group: list[tuple[str, dict[str, Any]]] = [
            (
                "association",
                {
                    "association_id": association_id,
                    "calling_ae": "CT1",
                    "called_ae": "CADUCEUS",
                    "peer_address": "10.0.0.7",
                    "outcome": "released",
                    "instances": 20,
                    "bytes": 10_000_000,
                    "failures": {},
                },
            ),
            (
                "series_received",
                {
                    "association_id": association_id,
                    "series_uid": series_uid,
                    "study_uid": f"2.25.{uuid.uuid4().int}",
                    "count": 20,
                    "sop_instance_uids": sops,
                    "files": [f"{series_uid}#{sop}.dcm" for sop in sops],
                    "calling_ae": "CT1",
                    "called_ae": "CADUCEUS",
                    "peer_address": "10.0.0.7",
                    "tags": {
                        "PatientName": f"PATIENT^{rng.randrange(10**6)}",
                        "PatientID": str(rng.randrange(10**7)),
                        "Modality": rng.choice(["CT", "MR", "CR"]),
                    },
                },
            ),
            (
                "task_update",
                {
                    "task_id": task_id,
                    "series_uid": series_uid,
                    "status": "routed",
                    "rule": f"rule{rng.randrange(20)}",
                },
            ),
            ("task_event", {"task_id": task_id, "event": "REGISTER"}),
            ("task_event", {"task_id": task_id, "event": "DISPATCH_BEGIN", "target": "PACS"}),
            (
                "task_event",
                {
                    "task_id": task_id,
                    "event": "DISPATCH_COMPLETE",
                    "target": "PACS",
                    "file_count": 20,
                },
            ),
            ("task_event", {"task_id": task_id, "event": "CLEAN"}),
            ("task_event", {"task_id": task_id, "event": "COMPLETE"}),
            ("task_update", {"task_id": task_id, "status": "complete"}),
        ]
        for kind, payload in group:
            seq += 1
            events.append(_event(kind, payload, producer, seq))
    return events[:count]


def ingest_rate(server: Server, backend: str, batch: int, clients: int, total: int) -> IngestRun:
    """Post ``total`` new events in batches of ``batch`` from ``clients`` threads."""
    rng = random.Random(batch * 31 + clients)
    share = total // clients
    bodies = [
        [
            json.dumps({"events": chunk}).encode()
            for chunk in _chunks(event_mix(share, f"bench-{n}", rng), batch)
        ]
        for n in range(clients)
    ]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def send(mine: list[bytes]) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
            barrier.wait()
            for body in mine:
                response = client.post(
                    "/v1/events", content=body, headers={"Content-Type": "application/json"}
                )
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=send, args=(mine,)) for mine in bodies]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"ingest failed: {errors[:3]}")
    return IngestRun(backend, batch, clients, share * clients, seconds)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------- seeding

SURNAMES = [
    f"{a}{b}"
    for a in (
        "SMITH",
        "MUELLER",
        "GARCIA",
        "NGUYEN",
        "ROSSI",
        "KOWALSKI",
        "SATO",
        "SILVA",
        "DUBOIS",
        "JENSEN",
    )
    for b in ("", "SON", "MAN", "ER", "INI", "OV", "EZ", "ING", "A", "O")
] * 1
"""100 surnames; with the numbered given names below, about 200,000 distinct patients."""
MODALITIES = ["CT"] * 8 + ["MR"] * 5 + ["CR"] * 3 + ["US"] * 2 + ["DX", "MG", "PT", "NM"]
SENDERS = [f"AE_{n:02d}" for n in range(30)]
RULES = [f"rule_{n:02d}" for n in range(20)]
TARGETS = [f"target_{n}" for n in range(8)]
STATUSES = ["complete"] * 90 + ["error"] * 3 + ["discarded"] * 5 + ["routed"] * 2
DAYS = 90
"""The seeded history spans this many days up to now."""


@dataclass
class Samples:
    """Values that exist in the seeded data, for the queries to look for."""

    patient_ids: list[str] = field(default_factory=list)
    accessions: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    series_uids: list[str] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)


class _Writer:
    """Bulk rows into one table: PostgreSQL COPY (CSV), or SQLite executemany."""

    CHUNK = 100_000

    def __init__(self, conn: Any, pg: bool, table: str, columns: list[str]) -> None:
        self.conn, self.pg, self.table, self.columns = conn, pg, table, columns
        self.rows: list[tuple[Any, ...]] = []

    def add(self, *row: Any) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        cursor = self.conn.cursor()
        quoted = ", ".join(f'"{c}"' for c in self.columns)
        if self.pg:
            buffer = io.StringIO()
            # Quoted strings: an empty one is '', not NULL, to COPY.
            csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC).writerows(self.rows)
            buffer.seek(0)
            cursor.copy_expert(f"COPY {self.table} ({quoted}) FROM STDIN WITH (FORMAT csv)", buffer)
        else:
            marks = ", ".join("?" * len(self.columns))
            cursor.executemany(f"INSERT INTO {self.table} ({quoted}) VALUES ({marks})", self.rows)
        self.conn.commit()
        self.rows = []


def _time_text(pg: bool) -> Callable[[datetime], str]:
    if pg:
        return lambda t: t.isoformat()
    return lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f")


def seed(server: Server, scale: Scale, rng: random.Random) -> Samples:
    """Fill the (migrated, empty) database with ``scale`` series and events, directly."""
    url = make_url(server.sqlalchemy_url)
    pg = url.get_backend_name() == "postgresql"
    if pg:
        conn = _connect(server.sqlalchemy_url)
    else:
        conn = sqlite3.connect(url.database or "")
        conn.execute("PRAGMA synchronous = OFF")
    stamp = _time_text(pg)
    now = datetime.now(UTC)
    span = DAYS * 86400
    samples = Samples()
    stats: Counter[tuple[str, str, str]] = Counter()

    series = _Writer(
        conn,
        pg,
        "series",
        [
            "series_uid",
            "study_uid",
            "patient_name",
            "patient_name_search",
            "patient_id",
            "accession_number",
            "modality",
            "study_date",
            "study_description",
            "series_description",
            "sender_aet",
            "receiver_aet",
            "first_received_at",
            "last_received_at",
            "instance_count",
            "status",
            "status_at",
            "tags",
        ],
    )
    receptions = _Writer(
        conn,
        pg,
        "series_receptions",
        ["event_id", "series_uid", "association_id", "received_at", "instance_count", "sender_aet"],
    )
    tasks = _Writer(
        conn,
        pg,
        "tasks",
        [
            "id",
            "series_uid",
            "study_uid",
            "rule",
            "target",
            "status",
            "data",
            "created_at",
            "updated_at",
        ],
    )
    task_events = _Writer(
        conn,
        pg,
        "task_events",
        ["event_id", "task_id", "time", "producer", "event", "severity", "info", "target", "rule"],
    )
    events = _Writer(
        conn, pg, "events", ["event_id", "producer", "seq", "kind", "time", "stored_at", "payload"]
    )
    raw_per_series = max(1, scale.events // scale.series)
    seq = 0
    for n in range(scale.series):
        received = now - timedelta(seconds=rng.randrange(span))
        series_uid = f"1.2.826.0.1.3680043.10.543.{n}"
        study_uid = f"1.2.826.0.1.3680043.10.544.{n // 3}"
        surname, given = rng.choice(SURNAMES), f"GIVEN{rng.randrange(2000)}"
        name = f"{surname}^{given}"
        patient_id = f"PID{rng.randrange(250_000):07d}"
        accession = f"ACC{n // 3:08d}"
        modality, sender = rng.choice(MODALITIES), rng.choice(SENDERS)
        rule, target, status = rng.choice(RULES), rng.choice(TARGETS), rng.choice(STATUSES)
        count = rng.randrange(1, 400)
        task_id = f"task-{n}"
        tags = {
            "PatientName": name,
            "PatientID": patient_id,
            "AccessionNumber": accession,
            "Modality": modality,
        }
        series.add(
            series_uid,
            study_uid,
            name,
            f"{surname} {given}".lower(),
            patient_id,
            accession,
            modality,
            received.strftime("%Y%m%d"),
            f"{modality} study",
            f"{modality} series {n % 7}",
            sender,
            "CADUCEUS",
            stamp(received),
            stamp(received),
            count,
            status,
            stamp(received),
            json.dumps(tags),
        )
        receptions.add(
            uuid.uuid4().hex, series_uid, uuid.uuid4().hex, stamp(received), count, sender
        )
        tasks.add(
            task_id,
            series_uid,
            study_uid,
            rule,
            target,
            status,
            json.dumps({"id": task_id, "info": {"applied_rule": rule}}),
            stamp(received),
            stamp(received),
        )
        hour = received.replace(minute=0, second=0, microsecond=0).isoformat()
        stats[hour, "series", ""] += 1
        stats[hour, "instances", ""] += count
        stats[hour, "rule_tasks", rule] += 1
        for step, event_name in enumerate(
            (
                "REGISTER",
                "DISPATCH_BEGIN",
                "DISPATCH_COMPLETE",
                "ERROR" if status == "error" else "COMPLETE",
            )
        ):
            at = received + timedelta(seconds=step)
            severity = "error" if event_name == "ERROR" else "info"
            task_events.add(
                uuid.uuid4().hex,
                task_id,
                stamp(at),
                "router",
                event_name,
                severity,
                "",
                target,
                rule,
            )
            if severity == "error":
                stats[hour, "failures", ""] += 1
                stats[hour, "rule_failures", rule] += 1
                stats[hour, "target_failures", target] += 1
            elif event_name == "DISPATCH_COMPLETE":
                stats[hour, "target_dispatches", target] += 1
        for k in range(raw_per_series):
            seq += 1
            kind = "series_received" if k == 0 else "task_event"
            payload = {"series_uid": series_uid} if k == 0 else {"task_id": task_id, "event": "X"}
            events.add(
                uuid.uuid4().hex,
                "bench",
                seq,
                kind,
                stamp(received),
                stamp(now),
                json.dumps(payload),
            )
        if n % max(1, scale.series // 200) == 0:
            samples.patient_ids.append(patient_id)
            samples.accessions.append(accession)
            samples.names.append(surname[:5])
            samples.series_uids.append(series_uid)
            samples.task_ids.append(task_id)
        if n and n % 100_000 == 0:
            logger.info("seeded %d series", n)
    for writer in (series, receptions, tasks, task_events, events):
        writer.flush()
    hourly = _Writer(conn, pg, "hourly_stats", ["hour", "metric", "key", "value"])
    days: Counter[tuple[datetime, str, str]] = Counter()
    for (hour, metric, key), value in stats.items():
        start = datetime.fromisoformat(hour)
        hourly.add(stamp(start), metric, key, value)
        days[start.replace(hour=0), metric, key] += value
    hourly.flush()
    daily = _Writer(conn, pg, "daily_stats", ["day", "metric", "key", "value"])
    for (day, metric, key), value in days.items():
        daily.add(stamp(day), metric, key, value)
    daily.flush()
    logger.info("analyzing")
    if pg:
        conn.autocommit = True
        conn.cursor().execute("VACUUM ANALYZE")
    else:
        conn.execute("ANALYZE")
    conn.close()
    return samples


# ---------------------------------------------------------------------------- queries


DEEP: Final = 10_000
"""Rows before the deep pages (by offset and by cursor) of the name-sorted list."""


def _queries(
    samples: Samples, now: datetime, deep_cursor: str
) -> list[tuple[str, str, Callable[[int], str]]]:
    """(name, description, path for the n-th repetition) of each dashboard query.
    ``deep_cursor``: the cursor of the page after the first :data:`DEEP` series by name."""
    day_ago = _iso(now - timedelta(days=1))
    week_ago = _iso(now - timedelta(days=7))

    def pick(values: list[str], n: int) -> str:
        return values[n % len(values)]

    return [
        ("latest", "newest 50 series", lambda n: "/v1/series?limit=50"),
        (
            "name_prefix",
            "patient name prefix, newest 50",
            lambda n: f"/v1/series?patient_name={pick(samples.names, n)}&limit=50",
        ),
        (
            "name_contains",
            "patient name contains (given name)",
            lambda n: f"/v1/series?patient_name=given{n % 2000}&name_match=contains&limit=50",
        ),
        (
            "patient_id",
            "patient ID",
            lambda n: f"/v1/series?patient_id={pick(samples.patient_ids, n)}",
        ),
        (
            "accession",
            "accession number",
            lambda n: f"/v1/series?accession_number={pick(samples.accessions, n)}",
        ),
        (
            "modality_day",
            "modality, last 24 h",
            lambda n: f"/v1/series?modality={MODALITIES[n % 4 * 5]}&received_from={day_ago}",
        ),
        (
            "sender_week",
            "sender AET, last 7 days",
            lambda n: f"/v1/series?sender_aet={SENDERS[n % 30]}&received_from={week_ago}",
        ),
        ("rule", "series of a rule, newest 50", lambda n: f"/v1/series?rule={RULES[n % 20]}"),
        ("status_error", "failed series, newest 50", lambda n: "/v1/series?status=error"),
        (
            "page_10",
            "11th page of 50, by patient name",
            lambda n: "/v1/series?sort=patient_name&order=asc&limit=50&offset=500",
        ),
        (
            "deep_offset",
            f"page after {DEEP:,} by patient name, by offset",
            lambda n: f"/v1/series?sort=patient_name&order=asc&limit=50&offset={DEEP}",
        ),
        (
            "deep_cursor",
            f"page after {DEEP:,} by patient name, by cursor",
            lambda n: f"/v1/series?sort=patient_name&order=asc&limit=50&cursor={deep_cursor}",
        ),
        (
            "count_week",
            "count of last week's series",
            lambda n: f"/v1/series?received_from={week_ago}&count=true&limit=50",
        ),
        (
            "series_detail",
            "one series with files and tasks",
            lambda n: f"/v1/series/{pick(samples.series_uids, n)}",
        ),
        ("task", "one task timeline", lambda n: f"/v1/tasks/{pick(samples.task_ids, n)}"),
        ("errors", "100 newest errors", lambda n: "/v1/errors?limit=100"),
        ("stats_7d", "dashboard statistics, 7 days", lambda n: "/v1/stats?days=7"),
        ("stats_30d", "dashboard statistics, 30 days", lambda n: "/v1/stats?days=30"),
    ]


def query_latency(server: Server, backend: str, samples: Samples, repeats: int) -> list[QueryRun]:
    runs = []
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
        before = client.get(
            "/v1/series",
            params={"sort": "patient_name", "order": "asc", "limit": 50, "offset": DEEP - 50},
        )
        before.raise_for_status()
        deep_cursor = before.json()["next_cursor"]
        for name, description, path in _queries(samples, datetime.now(UTC), deep_cursor):
            run = QueryRun(backend, name, description)
            for n in range(3):  # warm the caches and the connection pool
                client.get(path(n + 1000))
            for n in range(repeats):
                start = time.perf_counter()
                response = client.get(path(n))
                run.samples_ms.append((time.perf_counter() - start) * 1000)
                run.statuses[response.status_code] += 1
            logger.info("%s %s: p50 %.1f ms, p95 %.1f ms", backend, name, run.p50, run.p95)
            runs.append(run)
    return runs


# ---------------------------------------------------------------------------- running


def run_backend(backend: str, work: Path, postgres_url: str | None, scale: Scale) -> BackendResult:
    result = BackendResult(backend)
    with _database(backend, work, postgres_url) as database_url:
        server = Server(work / f"{backend}-ingest", database_url)
        try:
            server.start()
            with _phase(result, "ingest"):
                for batch, clients in ((500, 1), (5000, 1), (500, 4)):
                    run = ingest_rate(server, backend, batch, clients, scale.ingest_events)
                    logger.info(
                        "%s ingest batch %d x %d clients: %.0f events/s",
                        backend,
                        batch,
                        clients,
                        run.per_second,
                    )
                    result.ingest.append(run)
        finally:
            server.stop()
    with _database(backend, work, postgres_url) as database_url:
        server = Server(work / f"{backend}-search", database_url)
        try:
            server.start()  # migrates the empty database
            server.stop()
            start = time.perf_counter()
            samples = seed(server, scale, random.Random(7))
            result.seed_seconds = time.perf_counter() - start
            server.start()
            with _phase(result, "queries"):
                result.queries = query_latency(server, backend, samples, scale.repeats)
        finally:
            server.stop()
    return result


def run(
    work: Path,
    *,
    postgres_url: str | None = None,
    quick: bool = False,
    scale: Scale | None = None,
    backends: tuple[str, ...] = ("sqlite", "postgresql"),
) -> Results:
    """Both benchmarks on SQLite and, given a server URL, PostgreSQL (or only ``backends``)."""
    scale = scale or (QUICK if quick else FULL)
    postgres_url = postgres_url or os.environ.get(POSTGRES_ENV)
    results = Results(scale, datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    shutil.rmtree(work, ignore_errors=True)
    backends = tuple(b for b in backends if b != "postgresql" or postgres_url)
    if not postgres_url:
        results.notes.append(f"PostgreSQL not measured: no server ({POSTGRES_ENV} unset).")
    try:
        for backend in backends:
            results.backends.append(run_backend(backend, work / backend, postgres_url, scale))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: Results) -> str:
    scale = results.scale
    lines = [
        "## Bookkeeper",
        "",
        f"Run {results.started} (`bench/bookkeeper_bench.py`). A real `python -m bookkeeper` "
        "over HTTP on this machine; client and server share its cores.",
        "",
        "### Ingest (`POST /v1/events`, new events, realistic mix)",
        "",
        "| database | batch | clients | events | events/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for backend in results.backends:
        for run_ in backend.ingest:
            lines.append(
                f"| {run_.backend} | {run_.batch} | {run_.clients} | {run_.events:,} | "
                f"{run_.per_second:,.0f} |"
            )
    lines += [
        "",
        f"Target: ≥ {TARGET_INGEST_PG:,.0f} events/s on PostgreSQL in batches.",
        "",
        _load_line(results, "ingest"),
        "",
        f"### Queries on {scale.series:,} series and {scale.events:,} events",
        "",
        "Latency at the client, " + f"{scale.repeats} runs each with varying values "
        "(after 3 warm-up runs).",
        "",
        "| query | " + " | ".join(f"{b.backend} p50 / p95 ms" for b in results.backends) + " |",
        "|---|" + "---:|" * len(results.backends),
    ]
    names = (
        [(q.name, q.description) for q in results.backends[0].queries] if results.backends else []
    )
    for index, (name, description) in enumerate(names):
        cells = []
        for backend in results.backends:
            q = backend.queries[index]
            flag = " ⚠" if q.p95 > TARGET_P95_MS else ""
            cells.append(f"{q.p50:.1f} / {q.p95:.1f}{flag}")
        lines.append(f"| {description} (`{name}`) | " + " | ".join(cells) + " |")
    lines += [
        "",
        _load_line(results, "queries"),
        "",
        _p95_verdict(results)
        + " Seeding took "
        + ", ".join(f"{b.backend} {b.seed_seconds:.0f} s" for b in results.backends)
        + ".",
        *(f"\n{note}" for note in results.notes),
    ]
    return "\n".join(lines)


def _p95_verdict(results: Results) -> str:
    """The legend of the flag when a query misses the target, else that none does."""
    missed = [q for b in results.backends for q in b.queries if q.p95 > TARGET_P95_MS]
    if missed:
        return f"⚠: p95 above the {TARGET_P95_MS:.0f} ms target."
    return f"Every query's p95 is under the {TARGET_P95_MS:.0f} ms target on every database."


def _load_line(results: Results, phase: str) -> str:
    loads = ", ".join(
        f"{b.backend} {b.load[phase][0]:.1f} → {b.load[phase][1]:.1f}"
        for b in results.backends
        if phase in b.load
    )
    return (
        f"Machine load during this part (1-minute load average at its start → end, "
        f"{os.cpu_count()} CPUs, other work included): {loads or 'not recorded'}."
    )


def _jsonable(value: Any) -> Any:
    """``value`` with tuple keys turned into strings and other odd values into text."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bookkeeper_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="20,000 series, 200,000 events")
    parser.add_argument("--series", type=int, help="series to seed (overrides the scale)")
    parser.add_argument("--events", type=int, help="raw events to seed (overrides the scale)")
    parser.add_argument("--postgres", help=f"PostgreSQL server URL (default: ${POSTGRES_ENV})")
    parser.add_argument("--docs", action="store_true", help="rewrite the docs section too")
    parser.add_argument(
        "--backend", choices=("sqlite", "postgresql"), action="append", help="only these"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    scale = QUICK if args.quick else FULL
    if args.series or args.events:
        series = args.series or scale.series
        scale = Scale(series, args.events or series * 10, scale.ingest_events, scale.repeats)
    backends = tuple(args.backend or ("sqlite", "postgresql"))
    results = run(
        OUT / "work" / "bookkeeper", postgres_url=args.postgres, scale=scale, backends=backends
    )
    body = markdown(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bookkeeper.md").write_text(body + "\n")
    (OUT / "bookkeeper-results.json").write_text(json.dumps(_jsonable(asdict(results)), indent=1))
    if args.docs:
        report.replace_section(DOC, "bookkeeper", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
