"""Shipping outboxes to the bookkeeper (common/shipper.py, shipper/; docs/events.md "Shipping").

The bookkeeper side is :class:`FakeBookkeeper`, a real HTTP server on an ephemeral port that
implements the ingest contract (idempotent by event id, 401/413/422) and can fail on demand; it is
an in-process fake of something we own. The outboxes are real SQLite files in ``tmp_path``, and
the service runs as its own process (``python -m shipper``) where kills and signals matter.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.config import Config
from common.errors import ConfigError
from common.exitcodes import EX_CONFIG, EX_OK, EX_UNAVAILABLE
from common.outbox import Outbox, outbox_path
from common.shipper import (
    REJECTED_KIND,
    Backoff,
    BookkeeperRefused,
    BookkeeperUnavailable,
    Endpoint,
    Shipper,
    dead_letter_path,
)
from tests.helpers import LOCALHOST, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
TOKEN = "shipper-test-token-0123456789"
FAST = Backoff(initial=0.05, cap=0.4, refused=30.0)


# ---------------------------------------------------------------------------- the fake bookkeeper


class FakeBookkeeper:
    """The bookkeeper's ingest contract over real HTTP, with failure modes switched by attribute.

    ``POST /v1/events`` with ``{"events": [...]}`` and ``Authorization: Bearer <token>``: 200
    ``{"stored": n, "duplicates": m}`` (an id is stored once, in arrival order); 401 for a bad
    token; 413 above ``max_batch`` events or ``max_body`` bytes; 422 when an event id is in
    ``poison`` (nothing of the batch is stored). ``fail_status`` answers every request with that
    status; ``delay`` holds each answer; ``hold_after_store`` stores a batch, then waits for
    ``release`` before answering.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.token = TOKEN
        self.max_batch = 5000
        self.max_body = 50 * 1024 * 1024
        self.poison: set[str] = set()
        self.fail_status: int | None = None
        self.bad_ok_body = False
        self.delay = 0.0
        self.hold_after_store = False
        self.holding = threading.Event()
        self.release = threading.Event()
        self.stored: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.requests: list[tuple[float, int, int]] = []
        """(monotonic time, events in the batch, status answered)"""
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def endpoint(self, token: str = TOKEN) -> Endpoint:
        return Endpoint(self.url, token)

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(200 if self.path == "/health" else 404, {"status": "ok"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer = fake._ingest(self.path, self.headers.get("Authorization"), body)
                if status == 200 and fake.hold_after_store:
                    fake.holding.set()
                    fake.release.wait(30)
                if fake.delay:
                    fake.release.wait(fake.delay)
                with contextlib.suppress(OSError):  # the client may be gone (killed, timed out)
                    self._answer(status, answer)

            def _answer(self, status: int, answer: Any) -> None:
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((LOCALHOST, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def _ingest(self, path: str, auth: str | None, body: bytes) -> tuple[int, Any]:
        status, answer = self._judge(path, auth, body)
        with self._changed:
            self.requests.append((time.monotonic(), _batch_len(body), status))
            self._changed.notify_all()
        return status, answer

    def _judge(self, path: str, auth: str | None, body: bytes) -> tuple[int, Any]:
        if path != "/v1/events":
            return 404, {"detail": "Not Found"}
        if self.fail_status is not None:
            return self.fail_status, {"detail": f"failing with {self.fail_status} on purpose"}
        if not secrets.compare_digest(auth or "", f"Bearer {self.token}"):
            return 401, {"detail": "bad token"}
        events = json.loads(body)["events"]
        if len(events) > self.max_batch or len(body) > self.max_body:
            return 413, {"detail": f"at most {self.max_batch} events and {self.max_body} bytes"}
        for index, event in enumerate(events):
            if event["id"] in self.poison:
                return 422, {"detail": [{"loc": ["body", "events", index], "msg": "poison"}]}
        if self.bad_ok_body:
            return 200, b"<html>a proxy's page</html>"
        return 200, self._store(events)

    def _store(self, events: list[dict[str, Any]]) -> dict[str, int]:
        with self._changed:
            fresh = [event for event in events if event["id"] not in self.stored]
            self.stored.update((event["id"], event) for event in fresh)
            self.duplicates += len(events) - len(fresh)
            self._changed.notify_all()
        return {"stored": len(fresh), "duplicates": len(events) - len(fresh)}

    def wait_stored(self, count: int, timeout: float = 30.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.stored) >= count, timeout):
                pytest.fail(f"{len(self.stored)} events stored after {timeout} s, not {count}")

    def wait_requests(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.requests) >= count, timeout)

    def kinds(self) -> list[str]:
        return [event["kind"] for event in self.stored.values()]


def _batch_len(body: bytes) -> int:
    try:
        return len(json.loads(body)["events"])
    except (ValueError, KeyError, TypeError):
        return -1


def assert_in_order(fake: FakeBookkeeper) -> None:
    """Each producer's events were stored in increasing ``seq``."""
    last: dict[str, int] = {}
    for event in fake.stored.values():
        producer, seq = event["producer"], event["seq"]
        assert seq > last.get(producer, 0), f"{producer} seq {seq} arrived after {last[producer]}"
        last[producer] = seq


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake() -> Iterator[FakeBookkeeper]:
    bookkeeper = FakeBookkeeper()
    bookkeeper.start()
    yield bookkeeper
    bookkeeper.stop()


@pytest.fixture
def down() -> Iterator[FakeBookkeeper]:
    """A bookkeeper that is not running yet; ``start()`` brings it up on its port."""
    bookkeeper = FakeBookkeeper()
    yield bookkeeper
    bookkeeper.stop()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(outbox_path(tmp_path / "state", "receiver"), "receiver") as box:
        yield box


def record(outbox: Outbox, count: int, start: int = 0) -> list[str]:
    return outbox.record_many(("association", {"n": n}) for n in range(start, start + count))


# ---------------------------------------------------------------------------- delivery


def test_batch_is_delivered_with_the_token_and_acknowledged(
    fake: FakeBookkeeper, outbox: Outbox
) -> None:
    ids = record(outbox, 20)
    with Shipper(outbox, fake.endpoint()) as shipper:
        assert shipper.ship_once() == 20
        assert shipper.ship_once() == 0

    assert list(fake.stored) == ids
    assert outbox.count() == 0
    assert fake.stored[ids[0]]["payload"] == {"n": 0}
    assert fake.stored[ids[0]]["producer"] == "receiver"


def test_batches_follow_seq_order_across_many_batches(fake: FakeBookkeeper, outbox: Outbox) -> None:
    ids = record(outbox, 1050)
    with Shipper(outbox, fake.endpoint(), batch_size=100) as shipper:
        assert shipper.drain() == 1050

    assert list(fake.stored) == ids
    assert [size for _, size, _ in fake.requests] == [100] * 10 + [50]
    assert_in_order(fake)


def test_resent_events_are_stored_once(fake: FakeBookkeeper, outbox: Outbox) -> None:
    ids = record(outbox, 10)
    fake._store([event.as_dict() for event in outbox.pending(4)])  # delivered, never acked
    with Shipper(outbox, fake.endpoint()) as shipper:
        shipper.drain()

    assert list(fake.stored) == ids
    assert fake.duplicates == 4


def test_background_thread_ships_events_as_they_are_recorded(
    fake: FakeBookkeeper, outbox: Outbox
) -> None:
    shipper = Shipper(outbox, fake.endpoint(), poll_interval=0.05)
    shipper.start()
    try:
        for round_ in range(5):
            record(outbox, 30, start=round_ * 30)
            fake.wait_stored((round_ + 1) * 30)
    finally:
        assert shipper.stop(5.0)
    assert outbox.count() == 0
    assert [event["payload"]["n"] for event in fake.stored.values()] == list(range(150))


# ---------------------------------------------------------------------------- outages


def test_unreachable_bookkeeper_keeps_every_event(down: FakeBookkeeper, outbox: Outbox) -> None:
    record(outbox, 5)
    with (
        Shipper(outbox, down.endpoint(), timeout=2.0) as shipper,
        pytest.raises(BookkeeperUnavailable, match="cannot reach"),
    ):
        shipper.ship_once()
    assert outbox.count() == 5


def test_bookkeeper_that_does_not_answer_times_out(fake: FakeBookkeeper, outbox: Outbox) -> None:
    record(outbox, 3)
    fake.delay = 30.0
    started = time.monotonic()
    with (
        Shipper(outbox, fake.endpoint(), timeout=0.3) as shipper,
        pytest.raises(BookkeeperUnavailable, match="did not answer in time"),
    ):
        shipper.ship_once()
    assert time.monotonic() - started < 5
    assert outbox.count() == 3


def test_server_errors_back_off_exponentially_then_deliver(
    fake: FakeBookkeeper, outbox: Outbox
) -> None:
    ids = record(outbox, 50)
    fake.fail_status = 503
    shipper = Shipper(outbox, fake.endpoint(), backoff=FAST, poll_interval=0.05)
    shipper.start()
    try:
        assert fake.wait_requests(7, timeout=10)
        fake.fail_status = None
        fake.wait_stored(50)
    finally:
        assert shipper.stop(5.0)

    times = [at for at, _, status in fake.requests if status == 503][:7]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    ceilings = [min(0.4, 0.05 * 2**n) for n in range(len(gaps))]
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        assert ceiling / 2 * 0.9 <= gap <= ceiling + 1.0, (gaps, ceilings)
    assert sum(gaps[3:]) > sum(gaps[:3])  # it grows, up to the cap
    assert list(fake.stored) == ids
    assert outbox.count() == 0


def test_outage_while_producing_loses_nothing_and_keeps_order(
    down: FakeBookkeeper, tmp_path: Path
) -> None:
    """The producer records at full speed during the outage; all arrive once, in order."""
    path = outbox_path(tmp_path / "state", "router")
    with Outbox(path, "shipper") as shipping_box, Outbox(path, "router") as producer:
        shipper = Shipper(shipping_box, down.endpoint(), backoff=FAST, poll_interval=0.05)
        shipper.start()
        try:
            ids: list[str] = []
            for n in range(2000):
                ids.append(producer.record("task_event", {"n": n}))
            assert down.requests == []  # nobody there to ask
            down.start()
            down.wait_stored(2000)
            wait_until(lambda: producer.count() == 0, timeout=10, what="acknowledgements")
        finally:
            assert shipper.stop(5.0)
    assert list(down.stored) == ids
    assert down.duplicates == 0
    assert_in_order(down)


# ---------------------------------------------------------------------------- refusals


def test_bad_token_keeps_events_and_waits_long_until_the_token_changes(
    fake: FakeBookkeeper, outbox: Outbox
) -> None:
    ids = record(outbox, 10)
    shipper = Shipper(outbox, fake.endpoint("wrong-token"), backoff=FAST, poll_interval=0.05)
    with pytest.raises(BookkeeperRefused, match="bookkeeper_api_key"):
        shipper.ship_once()
    shipper.start()
    try:
        assert fake.wait_requests(2, timeout=10)
        assert not fake.wait_requests(3, timeout=0.5)  # the long wait, not FAST's 0.05 s
        shipper.endpoint = fake.endpoint()  # configuration fixed: retried at once
        fake.wait_stored(10, timeout=5)
    finally:
        assert shipper.stop(5.0)
    assert [status for _, _, status in fake.requests[:2]] == [401, 401]
    assert list(fake.stored) == ids


def test_wrong_address_is_a_configuration_problem(fake: FakeBookkeeper, outbox: Outbox) -> None:
    record(outbox, 1)
    with (
        Shipper(outbox, Endpoint(fake.url + "/elsewhere", TOKEN)) as shipper,
        pytest.raises(BookkeeperRefused, match="HTTP 404"),
    ):
        shipper.ship_once()
    assert outbox.count() == 1


def test_ok_that_is_not_the_bookkeepers_answer_acknowledges_nothing(
    fake: FakeBookkeeper, outbox: Outbox
) -> None:
    record(outbox, 4)
    fake.bad_ok_body = True
    with (
        Shipper(outbox, fake.endpoint()) as shipper,
        pytest.raises(BookkeeperUnavailable, match="not the bookkeeper's answer"),
    ):
        shipper.ship_once()
    assert outbox.count() == 4


def test_batch_too_large_halves_the_batch_size(fake: FakeBookkeeper, outbox: Outbox) -> None:
    ids = record(outbox, 300)
    fake.max_batch = 60
    with Shipper(outbox, fake.endpoint()) as shipper:
        assert shipper.ship_once() == 37
        assert shipper.batch_size == 37
        shipper.drain()

    assert [(size, status) for _, size, status in fake.requests[:4]] == [
        (300, 413),
        (150, 413),
        (75, 413),
        (37, 200),
    ]
    assert list(fake.stored) == ids


def test_poison_event_is_set_aside_and_the_rest_delivered_in_order(
    fake: FakeBookkeeper, outbox: Outbox
) -> None:
    ids = record(outbox, 200)
    poison = {ids[37], ids[150]}
    fake.poison = set(poison)
    with Shipper(outbox, fake.endpoint()) as shipper:
        shipper.drain()

    good = [event_id for event_id in ids if event_id not in poison]
    assert list(fake.stored)[:198] == good
    assert fake.kinds()[198:] == [REJECTED_KIND, REJECTED_KIND]
    reports = [event["payload"] for event in list(fake.stored.values())[198:]]
    assert [report["event_id"] for report in reports] == [ids[37], ids[150]]
    assert all("poison" in report["error"] and report["status"] == 422 for report in reports)
    assert outbox.count() == 0
    assert len(fake.requests) < 40  # bisection, not one request per event

    lines = dead_letter_path(outbox.path).read_text().splitlines()
    set_aside = [json.loads(line) for line in lines]
    assert [entry["event"]["id"] for entry in set_aside] == [ids[37], ids[150]]
    assert set_aside[0]["event"]["payload"] == {"n": 37}
    assert set_aside[0]["status"] == 422
    assert "poison" in set_aside[0]["error"]


def test_event_too_large_even_alone_is_set_aside(fake: FakeBookkeeper, outbox: Outbox) -> None:
    small = record(outbox, 1)
    huge = outbox.record("module_log", {"text": "x" * 20_000})
    small += record(outbox, 1, start=1)
    fake.max_body = 10_000
    with Shipper(outbox, fake.endpoint()) as shipper:
        shipper.drain()

    assert list(fake.stored)[:2] == small
    (entry,) = [json.loads(line) for line in dead_letter_path(outbox.path).read_text().splitlines()]
    assert entry["event"]["id"] == huge
    assert entry["status"] == 413


def test_bookkeeper_refusing_everything_holds_the_stream(
    fake: FakeBookkeeper, outbox: Outbox
) -> None:
    record(outbox, 50)
    fake.fail_status = 422
    with (
        Shipper(outbox, fake.endpoint(), max_rejected_in_row=3) as shipper,
        pytest.raises(BookkeeperRefused, match="refused 3 events in a row"),
    ):
        shipper.drain()

    assert len(dead_letter_path(outbox.path).read_text().splitlines()) == 3
    pending = outbox.pending(100)
    assert len(pending) == 47 + 3  # the rest, then the three reports
    assert [event.kind for event in pending[-3:]] == [REJECTED_KIND] * 3


# ---------------------------------------------------------------------------- stopping


def test_stop_drains_what_is_pending(fake: FakeBookkeeper, outbox: Outbox) -> None:
    record(outbox, 3000)
    shipper = Shipper(outbox, fake.endpoint(), batch_size=100, poll_interval=60)
    shipper.start()
    assert shipper.stop(20.0)
    assert outbox.count() == 0
    assert len(fake.stored) == 3000


def test_stop_with_the_bookkeeper_down_returns_promptly(
    down: FakeBookkeeper, outbox: Outbox
) -> None:
    record(outbox, 10)
    shipper = Shipper(outbox, down.endpoint(), backoff=Backoff(initial=30, cap=30))
    shipper.start()
    started = time.monotonic()
    assert shipper.stop(5.0)
    assert time.monotonic() - started < 3
    assert outbox.count() == 10


# ---------------------------------------------------------------------------- configuration


def test_endpoint_from_mercure_host_port() -> None:
    config = Config(bookkeeper="0.0.0.0:8080", bookkeeper_api_key=TOKEN)
    endpoint = Endpoint.from_config(config)
    assert endpoint == Endpoint("http://127.0.0.1:8080", TOKEN)
    assert endpoint.events_url == "http://127.0.0.1:8080/v1/events"
    assert TOKEN not in repr(endpoint)

    behind_proxy = Config(bookkeeper="https://bk.example.org/caduceus/", bookkeeper_api_key=TOKEN)
    assert (
        Endpoint.from_config(behind_proxy).events_url == "https://bk.example.org/caduceus/v1/events"
    )


def test_endpoint_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="bookkeeper_api_key"):
        Endpoint.from_config(Config(bookkeeper="127.0.0.1:8080"))


# ---------------------------------------------------------------------------- the service


def write_config(tmp_path: Path, port: int, **overrides: Any) -> Path:
    settings = {
        "data_root": str(tmp_path / "data"),
        "bookkeeper": f"{LOCALHOST}:{port}",
        "bookkeeper_api_key": TOKEN,
        **overrides,
    }
    path = tmp_path / "caduceus.json"
    path.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    return path


def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "state"


def start_service(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "CADUCEUS_BOOKKEEPER_API_KEY"}
    log = (config.parent / "shipper.log").open("ab")
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "shipper", "--config", str(config), *extra],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@contextlib.contextmanager
def service(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = start_service(config)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_service_ships_every_outbox_including_new_ones_and_stops_on_sigterm(
    fake: FakeBookkeeper, tmp_path: Path
) -> None:
    config = write_config(tmp_path, fake.port)
    with Outbox(outbox_path(state_dir(tmp_path), "receiver"), "receiver") as box:
        receiver_ids = record(box, 700)
    with service(config) as process:
        fake.wait_stored(700)
        with Outbox(outbox_path(state_dir(tmp_path), "router"), "router") as box:
            router_ids = record(box, 300)  # a file that appeared after the start
            fake.wait_stored(1000)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == EX_OK
        assert time.monotonic() - started < 5

    stored = list(fake.stored)
    assert [i for i in stored if i in set(receiver_ids)] == receiver_ids
    assert [i for i in stored if i in set(router_ids)] == router_ids
    assert_in_order(fake)


def test_kill_9_mid_batch_then_restart_loses_nothing(fake: FakeBookkeeper, tmp_path: Path) -> None:
    config = write_config(tmp_path, fake.port)
    with Outbox(outbox_path(state_dir(tmp_path), "receiver"), "receiver") as box:
        ids = record(box, 1200)
        fake.hold_after_store = True  # the first batch is committed, its answer never arrives
        with service(config) as process:
            assert fake.holding.wait(30)
            process.kill()
            assert process.wait(10) == -signal.SIGKILL
        assert box.count() == 1200  # nothing was acknowledged
        fake.hold_after_store = False
        fake.release.set()
        with service(config) as process:
            fake.wait_stored(1200)
            wait_until(lambda: box.count() == 0, timeout=10, what="acknowledgements")
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == EX_OK

    assert list(fake.stored) == ids
    assert fake.duplicates == 500  # the batch in flight went again and was absorbed


def test_once_mode_drains_and_reports_an_unreachable_bookkeeper(
    down: FakeBookkeeper, tmp_path: Path
) -> None:
    config = write_config(tmp_path, down.port)
    with Outbox(outbox_path(state_dir(tmp_path), "receiver"), "receiver") as box:
        record(box, 40)
        assert start_service(config, "--once").wait(30) == EX_UNAVAILABLE
        assert box.count() == 40
        down.start()
        assert start_service(config, "--once").wait(30) == EX_OK
        assert box.count() == 0
    assert len(down.stored) == 40


def test_service_without_a_token_refuses_its_configuration(tmp_path: Path) -> None:
    config = write_config(tmp_path, 8080, bookkeeper_api_key=None)
    assert start_service(config).wait(30) == EX_CONFIG
    assert "bookkeeper_api_key" in (tmp_path / "shipper.log").read_text()


# ---------------------------------------------------------------------------- the real bookkeeper


def start_bookkeeper(config: Path) -> subprocess.Popen[bytes]:
    """``python -m bookkeeper`` on its embedded SQLite database (``DATABASE_URL`` removed)."""
    drop = {"CADUCEUS_BOOKKEEPER_API_KEY", "DATABASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    with (config.parent / "bookkeeper.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bookkeeper", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the bookkeeper exited {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=60, what="the bookkeeper's /health", interval=0.2)


def stored_in_bookkeeper(data_root: Path) -> list[tuple[str, str, int]]:
    """``(event_id, producer, seq)`` of every stored event, in the order they were stored."""
    database = data_root / "state" / "bookkeeper.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as conn:
        rows = conn.execute("SELECT event_id, producer, seq FROM events ORDER BY pk").fetchall()
    return [(str(a), str(b), int(c)) for a, b, c in rows]


@contextlib.contextmanager
def real_bookkeeper(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real bookkeeper on the configuration's port, healthy; stopped with SIGTERM (exit 0)."""
    process = start_bookkeeper(config)
    try:
        port = json.loads(config.read_text())["bookkeeper"].rsplit(":", 1)[1]
        wait_healthy(process, f"http://{LOCALHOST}:{port}", config.parent / "bookkeeper.log")
        yield process
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == EX_OK
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def assert_stored_once_in_order(data_root: Path, ids: list[str]) -> None:
    stored = stored_in_bookkeeper(data_root)
    assert [event_id for event_id, _, _ in stored] == ids
    seqs = [seq for _, _, seq in stored]
    assert seqs == sorted(seqs)


@pytest.mark.slow
def test_bookkeeper_outage_10000_events_arrive_once_in_order(tmp_path: Path) -> None:
    """The issue's outage test, against the real bookkeeper: nothing lost, nothing twice."""
    config = write_config(tmp_path, free_port())
    with (
        Outbox(outbox_path(state_dir(tmp_path), "receiver"), "receiver") as box,
        service(config) as shipper,
    ):
        ids: list[str] = []
        for chunk in range(200):  # the producer works at full speed while the bookkeeper is down
            ids += box.record_many(
                ("association", {"association_id": f"a{chunk}-{n}", "instances": n})
                for n in range(50)
            )
        assert box.count() == 10_000
        assert shipper.poll() is None
        with real_bookkeeper(config):
            wait_until(lambda: box.count() == 0, timeout=180, what="the outbox to drain")
            shipper.send_signal(signal.SIGTERM)
            assert shipper.wait(10) == EX_OK

    assert_stored_once_in_order(tmp_path / "data", ids)
    assert len(ids) == 10_000


@pytest.mark.slow
def test_kill_9_while_shipping_to_the_real_bookkeeper_loses_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    with (
        Outbox(outbox_path(state_dir(tmp_path), "receiver"), "receiver") as box,
        real_bookkeeper(config),
    ):
        ids = record(box, 5000)
        with service(config) as shipper:
            wait_until(lambda: box.count() < 5000, timeout=60, what="the first acknowledgement")
            shipper.kill()
            assert shipper.wait(10) == -signal.SIGKILL
        assert box.count() > 0  # killed while shipping
        with service(config) as shipper:
            wait_until(lambda: box.count() == 0, timeout=120, what="the outbox to drain")
            shipper.send_signal(signal.SIGTERM)
            assert shipper.wait(10) == EX_OK

    assert_stored_once_in_order(tmp_path / "data", ids)
