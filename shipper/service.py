"""The shipper service: every event outbox of this host to the bookkeeper (``docs/events.md``).

One :class:`~common.shipper.Shipper` thread per outbox file ``<state>/outbox/*.sqlite3``; files
that appear later (a service started for the first time) are picked up within
``discover_interval``. This process is the only one that speaks HTTP to the bookkeeper, so the
services stay free of HTTP and of threads (the receiver forks from a single-threaded parent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from common import exitcodes
from common.config import Config, load_config
from common.errors import ConfigError, OutboxError
from common.outbox import Outbox
from common.shipper import (
    BATCH_SIZE,
    JOIN_MARGIN,
    REQUEST_TIMEOUT,
    Backoff,
    Endpoint,
    Shipper,
    ShippingError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShipperOptions:
    """How each :class:`Shipper` of a :class:`ShipperService` runs."""

    batch_size: int = BATCH_SIZE
    timeout: float = REQUEST_TIMEOUT
    backoff: Backoff = field(default_factory=Backoff)
    poll_interval: float = 1.0


class ShipperService:
    """Ships every outbox file of the host, ``<state>/outbox/*.sqlite3``, one thread each.

    :meth:`run` looks for new outbox files and a changed configuration every
    ``discover_interval`` seconds until :meth:`stop`; :meth:`once` ships each file until it is
    empty and returns. A changed ``bookkeeper`` or ``bookkeeper_api_key`` applies at once; a
    changed data folder after a restart.
    """

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        options: ShipperOptions | None = None,
        discover_interval: float = 2.0,
        stop_timeout: float = 3.0,
    ) -> None:
        self.endpoint = Endpoint.from_config(config)
        self.outbox_dir = config.spool_paths().state / "outbox"
        self.config_path = config_path
        self.options = options or ShipperOptions()
        self.discover_interval = discover_interval
        self.stop_timeout = stop_timeout
        self._config_stamp = _mtime(config_path)
        self._shippers: dict[Path, Shipper] = {}
        self._refused: set[Path] = set()
        self._stopping = False  # plain flags: set from signal handlers
        self._force = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop (draining up to ``stop_timeout``); a second one, at once."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.stop(force=self._stopping)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self, *, force: bool = False) -> None:
        """Ask :meth:`run` to return; safe from a signal handler and from any thread."""
        self._force = self._force or force
        self._stopping = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"s")

    def run(self) -> int:
        """Ship until stopped: ``EX_OK`` when stopped cleanly, ``EX_INTERRUPTED`` when forced."""
        logger.info("shipping %s/*.sqlite3 to %s", self.outbox_dir, self.endpoint.url)
        try:
            while not self._stopping:
                self._reload_config()
                self._discover(start=True)
                select.select([self._wake_r], [], [], self.discover_interval)
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            return self._shutdown()
        finally:
            self._close()

    def once(self) -> int:
        """Ship every outbox until it is empty: ``EX_OK``, or ``EX_UNAVAILABLE`` at a failure."""
        code = exitcodes.EX_OK
        try:
            self._discover(start=False)
            for path, shipper in self._shippers.items():
                try:
                    moved = shipper.drain()
                except (ShippingError, OutboxError) as exc:
                    logger.error("%s: %s", path, exc)
                    code = exitcodes.EX_UNAVAILABLE
                else:
                    logger.info("%s: %d events shipped", path, moved)
            return code
        finally:
            self._close()

    def _discover(self, *, start: bool) -> None:
        for path in sorted(self.outbox_dir.glob("*.sqlite3")):
            if path in self._shippers:
                continue
            try:
                outbox = Outbox(path, path.stem)
            except OutboxError as exc:
                if path not in self._refused:
                    logger.error("cannot ship %s: %s", path, exc)
                    self._refused.add(path)
                continue
            self._refused.discard(path)
            shipper = self._new_shipper(outbox)
            self._shippers[path] = shipper
            if start:
                shipper.start()
                logger.info("shipping %s", path)

    def _new_shipper(self, outbox: Outbox) -> Shipper:
        options = self.options
        return Shipper(
            outbox,
            self.endpoint,
            batch_size=options.batch_size,
            timeout=options.timeout,
            backoff=options.backoff,
            poll_interval=options.poll_interval,
        )

    def _reload_config(self) -> None:
        stamp = _mtime(self.config_path)
        if self.config_path is None or stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            endpoint = Endpoint.from_config(load_config(self.config_path, report=False))
        except ConfigError as exc:
            logger.error("configuration change refused, keeping the last valid one: %s", exc)
            return
        if endpoint != self.endpoint:
            logger.info("bookkeeper now %s (or its token changed)", endpoint.url)
            self.endpoint = endpoint
            for shipper in self._shippers.values():
                shipper.endpoint = endpoint

    def _shutdown(self) -> int:
        shippers = list(self._shippers.values())
        for shipper in shippers:
            shipper.request_stop(self.stop_timeout)
        deadline = time.monotonic() + self.stop_timeout + JOIN_MARGIN
        for shipper in shippers:
            while not shipper.join(0.1):
                if self._force or time.monotonic() >= deadline:
                    logger.warning("stopping without waiting for the shippers to finish")
                    return exitcodes.EX_INTERRUPTED if self._force else exitcodes.EX_SOFTWARE
        logger.info("shipper stopped")
        return exitcodes.EX_OK

    def _close(self) -> None:
        for shipper in self._shippers.values():
            if shipper.join(0.0):
                shipper.outbox.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0
