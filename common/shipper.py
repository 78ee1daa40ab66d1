"""Shipping event outboxes to the bookkeeper (DESIGN §8; ``docs/events.md``, "Shipping").

A :class:`Shipper` is one background thread that sends one :class:`~common.outbox.Outbox` to the
bookkeeper in batches (``POST /v1/events``) and acknowledges what the bookkeeper stored. The
``shipper`` service (:class:`ShipperService`, ``python -m shipper``) runs one per outbox file of
the host, so the services themselves never speak HTTP and never need a thread.

Contracts:

* Events are sent strictly in ``seq`` order and acknowledged only after a 200; a crash anywhere
  makes the batch go again, which the bookkeeper absorbs by event id. Nothing is ever dropped.
* Connection errors, timeouts, 5xx, 408 and 429 back off exponentially with jitter and retry
  (:class:`Backoff`); 401, 403 and other 4xx are a configuration problem: logged as errors and
  retried after a long wait, or at once when the endpoint is replaced.
* 413: the batch size is halved. 422: the batch is bisected to the first event the bookkeeper
  refuses; the events before it are delivered and it is *set aside* — appended to a dead-letter
  JSONL file beside the outbox, then acknowledged — and an ``event_rejected`` event says so. After
  ``max_rejected_in_row`` refusals with nothing accepted between them the shipper stops setting
  events aside and holds the stream instead (the bookkeeper probably refuses everything).
* Every HTTP call has a timeout; each shipper has one ``httpx.Client``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import httpx

from common.config import Config
from common.errors import CaduceusError, ConfigError, OutboxError
from common.outbox import Event, Outbox, utc_now

logger = logging.getLogger(__name__)

EVENTS_PATH: Final = "/v1/events"
BATCH_SIZE: Final = 500
MAX_BATCH: Final = 5000
"""The bookkeeper's largest batch (its 413 above that)."""
REQUEST_TIMEOUT: Final = 10.0
REJECTED_KIND: Final = "event_rejected"
"""Kind of the event a shipper records when it sets a refused event aside."""
MAX_REJECTED_IN_ROW: Final = 10
_GROW_AFTER: Final = 16
"""Accepted batches in a row after which a batch size halved by a 413 doubles again."""
_DETAIL_CHARS: Final = 2000
_REMIND_EVERY: Final = 20
"""A long outage is logged as a WARNING at every this many failed attempts."""
JOIN_MARGIN: Final = 2.0
"""Beyond ``stop``'s timeout: a last SQLite acknowledgement may take this long."""

Outcome = Literal["accepted", "rejected", "too_large"]


class ShippingError(CaduceusError):
    """A batch was not delivered; its events stay in the outbox."""


class BookkeeperUnavailable(ShippingError):
    """Transient: no connection, a timeout, a 5xx/408/429, or a 200 that is not the contract's."""


class BookkeeperRefused(ShippingError):
    """A configuration problem (401, 403, 404, ...) or a bookkeeper that refuses every event."""


@dataclass(frozen=True)
class Endpoint:
    """Where the bookkeeper's ingest is and the token it wants."""

    url: str
    """Base URL, e.g. ``http://127.0.0.1:8080``."""
    token: str = field(repr=False)

    @property
    def events_url(self) -> str:
        return self.url.rstrip("/") + EVENTS_PATH

    @classmethod
    def from_config(cls, config: Config) -> Endpoint:
        """The bookkeeper of ``config``; :class:`ConfigError` without a token or a usable address.

        ``bookkeeper`` is mercure's ``host:port`` (a scheme may be given); a wildcard bind address
        such as ``0.0.0.0`` means this host.
        """
        if not config.bookkeeper_api_key:
            raise ConfigError("bookkeeper_api_key: not set; events cannot be shipped without it")
        text = config.bookkeeper.strip()
        try:
            url = httpx.URL(text if "://" in text else f"http://{text}")
        except httpx.InvalidURL as exc:
            raise ConfigError(f"bookkeeper: {text!r} is not host:port ({exc})") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"bookkeeper: {text!r} is not host:port")
        if url.host in ("0.0.0.0", "::"):
            url = url.copy_with(host="127.0.0.1" if url.host == "0.0.0.0" else "::1")
        return cls(str(url).rstrip("/"), config.bookkeeper_api_key)


@dataclass(frozen=True)
class Backoff:
    """Waits between failed attempts, in seconds."""

    initial: float = 0.5
    cap: float = 30.0
    refused: float = 60.0
    """The wait after a :class:`BookkeeperRefused`: someone has to fix the configuration."""

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Wait after ``failures`` transient failures in a row: doubling, capped, jittered."""
        ceiling = min(self.cap, self.initial * 2 ** min(max(failures - 1, 0), 60))
        return (rng or random).uniform(ceiling / 2, ceiling)


def dead_letter_path(outbox_file: Path) -> Path:
    """Where events refused from ``<name>.sqlite3`` are set aside: ``<name>.dead-letter.jsonl``."""
    return outbox_file.with_name(f"{outbox_file.stem}.dead-letter.jsonl")


class Shipper:
    """Ships one outbox to the bookkeeper from a background thread (or by :meth:`ship_once`).

    The caller owns ``outbox`` (open and close it). ``stop`` (or leaving the ``with`` block) ends
    the thread and closes the HTTP client.
    """

    def __init__(
        self,
        outbox: Outbox,
        endpoint: Endpoint,
        *,
        batch_size: int = BATCH_SIZE,
        timeout: float = REQUEST_TIMEOUT,
        backoff: Backoff | None = None,
        poll_interval: float = 1.0,
        dead_letter: Path | None = None,
        max_rejected_in_row: int = MAX_REJECTED_IN_ROW,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, not {batch_size}")
        self.outbox = outbox
        self.max_batch_size = self.batch_size = batch_size
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.poll_interval = poll_interval
        self.dead_letter = dead_letter or dead_letter_path(outbox.path)
        self.max_rejected_in_row = max_rejected_in_row
        self._endpoint = endpoint
        self._client = httpx.Client(timeout=timeout)
        self._wake = threading.Event()
        self._drain_until: float | None = None
        self._thread: threading.Thread | None = None
        self._rejected_in_row = 0
        self._accepted_in_row = 0

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    @endpoint.setter
    def endpoint(self, endpoint: Endpoint) -> None:
        """Replace the bookkeeper address or token (configuration reload); retries at once."""
        self._endpoint = endpoint
        self._wake.set()

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a Shipper starts once")
        self._thread = threading.Thread(
            target=self._run, name=f"shipper-{self.outbox.producer}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> bool:
        """Ship what can be shipped within ``timeout`` seconds, then end the thread.

        A failure ends the draining at once (the events stay for the next start). Returns False
        when the thread did not end in time (stuck in an outbox write); the client then stays open.
        """
        self.request_stop(timeout)
        return self.join(timeout + JOIN_MARGIN)

    def request_stop(self, timeout: float) -> None:
        """Start stopping without waiting: drain for at most ``timeout`` seconds from now."""
        deadline = time.monotonic() + timeout
        if self._drain_until is None or deadline < self._drain_until:
            self._drain_until = deadline
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; close the HTTP client once it has. True when ended."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        self._client.close()
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(0.0)

    def _run(self) -> None:
        failures = 0
        while not self._drain_deadline_passed():
            try:
                moved = self.ship_once()
            except Exception as exc:
                if self._drain_until is not None:
                    logger.info("stopping with events left in %s: %s", self.outbox.path, exc)
                    return
                failures += 1
                self._wait(self._after_failure(exc, failures))
                continue
            if failures:
                logger.info("bookkeeper at %s takes events again", self._endpoint.url)
                failures = 0
            if moved == 0:
                if self._drain_until is not None:
                    return
                self._wait(self.poll_interval)

    def _after_failure(self, exc: Exception, failures: int) -> float:
        """Log the failure and return the wait before the next attempt."""
        where = self.outbox.path.name
        if isinstance(exc, BookkeeperRefused):
            delay = self.backoff.refused
            logger.error("%s: %s; events kept, next try in %.0f s", where, exc, delay)
        elif isinstance(exc, ShippingError | OutboxError):
            delay = self.backoff.delay(failures)
            # Once at the start of an outage, then a reminder about every ten minutes.
            level = logging.WARNING if failures % _REMIND_EVERY == 1 else logging.DEBUG
            logger.log(
                level, "%s: %s; events kept, retry %d in %.1f s", where, exc, failures, delay
            )
        else:
            delay = self.backoff.delay(failures)
            logger.exception("%s: shipping failed; events kept, retrying (%.1f s)", where, delay)
        return delay

    def _wait(self, delay: float) -> None:
        self._wake.wait(delay)
        self._wake.clear()

    def _drain_deadline_passed(self) -> bool:
        return self._drain_until is not None and time.monotonic() >= self._drain_until

    # ------------------------------------------------------------------ shipping

    def drain(self) -> int:
        """Ship until the outbox is empty; return how many events left it (``once`` mode).

        Raises :class:`ShippingError` at the first failure, without retrying.
        """
        total = 0
        while moved := self.ship_once():
            total += moved
        return total

    def ship_once(self) -> int:
        """Send the oldest pending batch; return how many events left the outbox (0: empty).

        Events leave the outbox when the bookkeeper stored them (or had them already) and when
        they are set aside as refused. Raises :class:`ShippingError` when nothing could be
        delivered; the events stay.
        """
        batch = self.outbox.pending(self.batch_size)
        if not batch:
            return 0
        while True:
            outcome, detail = self._send(batch)
            if outcome == "accepted":
                self._accepted(batch)
                return len(batch)
            if outcome == "rejected" or len(batch) == 1:
                return self._isolate(batch, outcome, detail)
            batch = batch[: len(batch) // 2]
            self.batch_size = len(batch)
            self._accepted_in_row = 0
            logger.warning("bookkeeper: batch too large (413); batch size now %d", len(batch))

    def _isolate(self, batch: list[Event], outcome: Outcome, detail: str) -> int:
        """Bisect a refused batch to its first refused event; deliver the events before it.

        ``outcome`` and ``detail`` are the answer to ``batch``. Returns the events that left the
        outbox: those delivered before the refused one, and the refused one once set aside.
        """
        moved = 0
        answered = True  # outcome and detail are the answer to exactly this batch
        while len(batch) > 1:
            half = batch[: len(batch) // 2]
            result, result_detail = self._send(half)
            if result == "accepted":
                self._accepted(half)
                moved += len(half)
                batch, answered = batch[len(half) :], False
            else:
                batch, outcome, detail, answered = half, result, result_detail, True
        if not answered:  # refused only by inference: ask about this event alone
            outcome, detail = self._send(batch)
            if outcome == "accepted":
                self._accepted(batch)
                return moved + 1
        self._set_aside(batch[0], outcome, detail)
        return moved + 1

    def _accepted(self, batch: Sequence[Event]) -> None:
        self.outbox.ack(event.id for event in batch)
        self._rejected_in_row = 0
        self._accepted_in_row += 1
        if self._accepted_in_row >= _GROW_AFTER and self.batch_size < self.max_batch_size:
            self.batch_size = min(self.batch_size * 2, self.max_batch_size)
            self._accepted_in_row = 0

    def _set_aside(self, event: Event, outcome: Outcome, detail: str) -> None:
        """Move a refused event to the dead-letter file, then out of the outbox."""
        status = 422 if outcome == "rejected" else 413
        if self._rejected_in_row >= self.max_rejected_in_row:
            raise BookkeeperRefused(
                f"the bookkeeper refused {self._rejected_in_row} events in a row (HTTP {status}) "
                f"and accepted none in between; holding event {event.id} and those after it "
                f"rather than setting the stream aside: {detail[:200]}"
            )
        self._rejected_in_row += 1
        record = {
            "event": event.as_dict(),
            "status": status,
            "error": detail,
            "rejected_at": utc_now(),
        }
        with self.dead_letter.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.outbox.ack([event.id])
        logger.error(
            "bookkeeper refused %s event %s (seq %d, HTTP %d): set aside in %s: %s",
            event.kind,
            event.id,
            event.seq,
            status,
            self.dead_letter,
            detail[:500],
        )
        if event.kind != REJECTED_KIND:  # a refused report of a refusal is not reported again
            self.outbox.record(
                REJECTED_KIND,
                {
                    "event_id": event.id,
                    "event_kind": event.kind,
                    "event_producer": event.producer,
                    "event_seq": event.seq,
                    "status": status,
                    "error": detail[:_DETAIL_CHARS],
                    "dead_letter": self.dead_letter.name,
                },
            )

    def _send(self, batch: Sequence[Event]) -> tuple[Outcome, str]:
        """POST one batch; the outcome for 200, 422 and 413, else :class:`ShippingError`."""
        endpoint = self._endpoint
        body = json.dumps(
            {"events": [event.as_dict() for event in batch]},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        try:
            response = self._client.post(
                endpoint.events_url,
                content=body,
                headers={
                    "Authorization": f"Bearer {endpoint.token}",
                    "Content-Type": "application/json",
                },
                timeout=self._request_timeout(),
            )
        except httpx.TimeoutException as exc:
            raise BookkeeperUnavailable(
                f"bookkeeper at {endpoint.url} did not answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            raise BookkeeperUnavailable(
                f"cannot reach the bookkeeper at {endpoint.url}: {exc}"
            ) from exc
        return _outcome(response, len(batch))

    def _request_timeout(self) -> float:
        if self._drain_until is None:
            return self.timeout
        left = self._drain_until - time.monotonic()
        if left <= 0:
            raise BookkeeperUnavailable("out of time to drain")
        return min(self.timeout, left)


def _outcome(response: httpx.Response, sent: int) -> tuple[Outcome, str]:
    status = response.status_code
    detail = response.text[:_DETAIL_CHARS]
    if status == httpx.codes.OK:
        _check_stored(response, sent)
        return "accepted", ""
    if status == httpx.codes.UNPROCESSABLE_ENTITY:
        return "rejected", detail
    if status == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
        return "too_large", detail
    if status >= 500 or status in (httpx.codes.REQUEST_TIMEOUT, httpx.codes.TOO_MANY_REQUESTS):
        raise BookkeeperUnavailable(f"bookkeeper answered HTTP {status}: {detail[:200]}")
    if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        raise BookkeeperRefused(
            f"bookkeeper refused the token (HTTP {status}): check bookkeeper_api_key"
        )
    raise BookkeeperRefused(
        f"bookkeeper answered HTTP {status} to {response.request.url}: check the bookkeeper "
        f"address ({detail[:200]})"
    )


def _check_stored(response: httpx.Response, sent: int) -> None:
    """A 200 must be the bookkeeper's ``{"stored": n, "duplicates": m}``, or nothing is acked."""
    try:
        answer: Any = response.json()
        stored, duplicates = int(answer["stored"]), int(answer["duplicates"])
    except (ValueError, TypeError, KeyError) as exc:
        raise BookkeeperUnavailable(
            f"HTTP 200 from {response.request.url} is not the bookkeeper's answer: "
            f"{response.text[:200]!r}"
        ) from exc
    if stored + duplicates != sent:
        logger.warning(
            "bookkeeper stored %d and had %d of %d events sent", stored, duplicates, sent
        )
