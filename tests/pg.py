"""PostgreSQL for the tests, and the bookkeeper as a real process on it or on SQLite.

PostgreSQL comes from ``CADUCEUS_TEST_DATABASE_URL`` (``.ci/run`` starts a private cluster and
exports it): a role that may ``CREATEDB``. Each user of :func:`fresh_database` gets a database of
its own, dropped afterwards. Without the variable, PostgreSQL tests skip — or fail when ``CI`` is
set, so that CI can never pass by skipping them.

The bookkeeper runs as ``python -m bookkeeper`` on a free port and is talked to over HTTP with
httpx, as the services and the GUI do.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import psycopg2
import pytest
from psycopg2 import sql
from sqlalchemy.engine import make_url

from tests.helpers import API_KEY, IN_CI, LOCALHOST, free_port, wait_until

TEST_DATABASE_URL_ENV: Final = "CADUCEUS_TEST_DATABASE_URL"
BACKENDS: Final = ("sqlite", "postgresql")
"""The databases every bookkeeper test module runs against."""
AUTH: Final = {"Authorization": f"Bearer {API_KEY}"}


# ---------------------------------------------------------------------------- PostgreSQL


def postgres_url() -> str:
    """The test server's URL; skip without one (fail when CI is set)."""
    url = os.environ.get(TEST_DATABASE_URL_ENV)
    if not url:
        message = f"no PostgreSQL: set {TEST_DATABASE_URL_ENV} (.ci/run does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return url


def _admin(url: str) -> Any:
    parsed = make_url(url)
    conn = psycopg2.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database,
        connect_timeout=10,
    )
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def fresh_database(label: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration; yields its URL."""
    server = postgres_url()
    name = f"caduceus_{label[:30]}_{uuid.uuid4().hex[:8]}".lower()
    conn = _admin(server)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        wait_until(lambda: _dropped(conn, name), timeout=60, what=f"database {name} to drop")
        conn.close()


def _dropped(conn: Any, name: str) -> bool:
    """Drop database ``name``, closing its sessions; False while an autovacuum worker is in it.

    ``WITH (FORCE)`` must be allowed to signal every process in the database, and this role
    may not signal an autovacuum worker (which the bookkeeper's bulk writes start often): the
    drop fails until the worker is done.
    """
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    try:
        with conn.cursor() as cursor:
            cursor.execute(statement)
    except psycopg2.errors.InsufficientPrivilege:
        return False
    return True


@contextlib.contextmanager
def database_for(backend: str, folder: Path, label: str) -> Iterator[str | None]:
    """``DATABASE_URL`` for ``backend``: a fresh PostgreSQL database, or None (the bookkeeper's
    embedded SQLite file under ``folder``)."""
    if backend == "postgresql":
        with fresh_database(label) as url:
            yield url
    else:
        yield None


def sqlite_file(data_root: Path) -> Path:
    return data_root / "state" / "bookkeeper.sqlite3"


# ---------------------------------------------------------------------------- the bookkeeper


@dataclass
class Bookkeeper:
    """A ``python -m bookkeeper`` process."""

    process: subprocess.Popen[bytes]
    port: int
    data_root: Path
    config_path: Path
    log_path: Path
    database_url: str | None
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def sqlalchemy_url(self) -> str:
        """Where its data is, for tests that look at the tables themselves."""
        return self.database_url or f"sqlite:///{sqlite_file(self.data_root)}"

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        """An HTTP client with the token (unless ``headers`` says otherwise)."""
        client = httpx.Client(
            base_url=self.url, headers=AUTH if headers is None else headers, timeout=60
        )
        self.clients.append(client)
        return client

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code (a hang is a failure)."""
        for client in self.clients:
            client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            pytest.fail(f"bookkeeper pid {self.process.pid} ignored SIGTERM for {timeout:.0f} s")


def write_config(folder: Path, port: int, **settings: Any) -> Path:
    """A configuration for one bookkeeper: data under ``folder/data``, the test token."""
    config: dict[str, Any] = {
        "data_root": str(folder / "data"),
        "bookkeeper": f"{LOCALHOST}:{port}",
        "bookkeeper_api_key": API_KEY,
    }
    config.update(settings)
    path = folder / "caduceus.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def bookkeeper_env(database_url: str | None, **extra: str) -> dict[str, str]:
    """The environment of a bookkeeper process: ours, minus settings the test decides."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATABASE_URL", "CADUCEUS_BOOKKEEPER_API_KEY", "CADUCEUS_CONFIG")
    }
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(extra)
    return env


def run_bookkeeper(
    config_path: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a bookkeeper that is expected to exit by itself (refusing to start)."""
    return subprocess.run(
        [sys.executable, "-m", "bookkeeper", "--config", str(config_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_bookkeeper(
    folder: Path, database_url: str | None, *, port: int | None = None
) -> Bookkeeper:
    """Start ``python -m bookkeeper`` with its data in ``folder``; wait until healthy."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config_path = folder / "caduceus.json"
    if not config_path.exists():
        write_config(folder, port)
    number = len(list(folder.glob("bookkeeper-*.log"))) + 1
    log_path = folder / f"bookkeeper-{number}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bookkeeper", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=bookkeeper_env(database_url),
            start_new_session=True,
        )
    bk = Bookkeeper(process, port, folder / "data", config_path, log_path, database_url)
    wait_healthy(bk)
    return bk


def wait_healthy(bk: Bookkeeper, timeout: float = 60.0) -> None:
    def healthy() -> bool:
        if bk.process.poll() is not None:
            pytest.fail(f"bookkeeper exited with {bk.process.returncode}:\n{bk.log()[-5000:]}")
        try:
            return httpx.get(f"{bk.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=timeout, what=f"the bookkeeper on port {bk.port} to be healthy")


@contextlib.contextmanager
def running_bookkeeper(backend: str, folder: Path, label: str) -> Iterator[Bookkeeper]:
    """A healthy bookkeeper on a fresh database of ``backend``; stopped (exit 0 checked) after."""
    with database_for(backend, folder, label) as database_url:
        bk = start_bookkeeper(folder, database_url)
        try:
            yield bk
        finally:
            code = bk.terminate()
        if code != 0:
            pytest.fail(f"bookkeeper exited with {code} after SIGTERM:\n{bk.log()[-5000:]}")


# ---------------------------------------------------------------------------- events


def iso(time: datetime) -> str:
    """A time as the outbox writes it: ISO 8601 UTC, microseconds, ``Z``."""
    return time.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def event(
    kind: str,
    payload: dict[str, Any],
    *,
    time: datetime | None = None,
    producer: str = "test",
    seq: int = 1,
    event_id: str | None = None,
) -> dict[str, Any]:
    """One envelope, exactly as ``Event.as_dict()`` makes it."""
    return {
        "id": event_id or uuid.uuid4().hex,
        "producer": producer,
        "seq": seq,
        "kind": kind,
        "time": iso(time or datetime.now(UTC)),
        "payload": payload,
    }


def series_received(
    series_uid: str,
    *,
    study_uid: str = "1.2.840.99.1",
    count: int = 2,
    tags: dict[str, str] | None = None,
    calling_ae: str = "SCANNER",
    time: datetime | None = None,
    association_id: str | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A ``series_received`` event shaped like the receiver's."""
    sops = [f"{series_uid}.{n}" for n in range(1, count + 1)]
    return event(
        "series_received",
        {
            "association_id": association_id or uuid.uuid4().hex,
            "series_uid": series_uid,
            "study_uid": study_uid,
            "count": count,
            "sop_instance_uids": sops,
            "files": [f"{series_uid}#{sop}.dcm" for sop in sops],
            "bytes": 1000 * count,
            "calling_ae": calling_ae,
            "called_ae": "CADUCEUS",
            "peer_address": "192.0.2.10",
            "tags": tags or {},
        },
        time=time,
        producer="receiver",
        event_id=event_id,
    )


def post(client: httpx.Client, events: list[dict[str, Any]]) -> dict[str, Any]:
    """POST a batch and return the answer, which must be 200."""
    response = client.post("/v1/events", json={"events": events})
    if response.status_code != 200:
        pytest.fail(f"POST /v1/events answered {response.status_code}: {response.text[:2000]}")
    result: dict[str, Any] = response.json()
    return result


def unique_uid() -> str:
    """A fresh DICOM UID (2.25 + a uuid, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"
