"""Entry point of the bookkeeper service: ``python -m bookkeeper --config PATH``.

Exit codes (:mod:`common.exitcodes`): ``EX_OK`` after a SIGTERM/SIGINT (requests in flight are
finished first), ``EX_CONFIG`` when the configuration is unusable (no token, a placeholder or
short one, a bad ``bookkeeper`` address or ``DATABASE_URL``, or a database schema newer than this
Caduceus), ``EX_UNAVAILABLE`` when the database cannot be reached or the port cannot be bound
(the supervisor retries with backoff), ``EX_INTERRUPTED`` after a second signal.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from alembic.util import CommandError
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from bookkeeper.api import create_app
from bookkeeper.db import create_db_engine, migrate, optimise
from bookkeeper.settings import Settings
from common import exitcodes
from common.config import CONFIG_ENV, load_config, resolve_config_path
from common.errors import ConfigError
from common.logs import setup_logging

logger = logging.getLogger(__name__)

GC_THRESHOLDS = (100_000, 20, 20)
"""Allocations between young collections, and young (then middle) collections between older
ones; see :func:`_tune_gc`."""
GRACEFUL_SHUTDOWN_S = 30
"""How long a stop waits for requests in flight (an ingest batch commits within it)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caduceus bookkeeper",
        description="Stores the events of every Caduceus service; answers history queries "
        "over HTTP. Database: $DATABASE_URL, else SQLite in <data_root>/state.",
    )
    parser.add_argument(
        "--config", help=f"configuration file (default: ${CONFIG_ENV} or config/caduceus.json)"
    )
    return parser


class _Server(uvicorn.Server):
    """uvicorn, with the signals left to :class:`_Stopper` (uvicorn would re-raise a caught
    SIGTERM after its shutdown, and the process would then die of it instead of exiting 0)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Stopper:
    """Two-stage stop: the first SIGTERM/SIGINT ends the service cleanly, a second at once."""

    def __init__(self) -> None:
        self.requested = False
        self.forced = False
        self.server: _Server | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            if self.server is not None:
                self.server.force_exit = True
            logger.warning("second %s: stopping at once", signal.Signals(signum).name)
            return
        self.requested = True
        logger.info("%s: finishing requests in flight, then stopping", signal.Signals(signum).name)
        if self.server is not None:
            self.server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("bookkeeper")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # bookkeeper.db logs migrations
    stopper = _Stopper()
    stopper.install()
    config_path = resolve_config_path(args.config).absolute()
    try:
        settings = Settings.from_config(load_config(config_path), os.environ)
    except ConfigError as exc:
        logger.error("invalid configuration %s: %s", config_path, exc)
        return exitcodes.EX_CONFIG
    engine = create_db_engine(settings.database_url)
    try:
        return _prepare_and_serve(settings, engine, stopper)
    finally:
        engine.dispose()


def _prepare_and_serve(settings: Settings, engine: Engine, stopper: _Stopper) -> int:
    where = settings.safe_database_url()
    try:
        revision = migrate(engine)
        optimise(engine)
    except CommandError as exc:
        logger.error("cannot migrate the database %s: %s", where, exc)
        return exitcodes.EX_CONFIG
    except (SQLAlchemyError, OSError) as exc:
        logger.error("cannot reach or migrate the database %s: %s", where, exc)
        return exitcodes.EX_UNAVAILABLE
    if stopper.requested:
        return exitcodes.EX_OK
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return exitcodes.EX_UNAVAILABLE
    with sock:
        _tune_gc()
        host, port = sock.getsockname()[:2]
        logger.info(
            "listening on http://%s:%d (database %s, schema %s)", host, port, where, revision
        )
        return _serve(create_app(settings, engine), sock, stopper)


def _tune_gc() -> None:
    """Collect cyclic garbage less often than Python's default (every 700 allocations).

    Parsing and projecting a batch of 5,000 events allocates hundreds of thousands of
    objects, nearly all freed by reference counting, and each default collection walks the
    batch being built: that took 40 % of the parsing. What is allocated until now (modules,
    the app) is moved out of the collector's sight for good.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _serve(app: FastAPI, sock: socket.socket, stopper: _Stopper) -> int:
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    stopper.server = server
    if not stopper.requested:
        server.run(sockets=[sock])
    if stopper.forced:
        return exitcodes.EX_INTERRUPTED
    if not server.started and not stopper.requested:
        logger.error("the HTTP server did not start")
        return exitcodes.EX_SOFTWARE
    logger.info("stopped")
    return exitcodes.EX_OK


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so that a busy port is a clear error before serving.

    It is created with ``IPPROTO_TCP`` explicitly: asyncio switches Nagle off (``TCP_NODELAY``)
    only on sockets whose protocol says TCP, and ``socket.create_server`` leaves it 0. With Nagle
    on, every response on a kept-alive connection waited ~40 ms for the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock
