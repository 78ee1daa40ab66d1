"""The receiver's listener: one process per association.

The parent process only accepts connections and forks; each association is served by its own
child process, so concurrent senders use every core, a crash or a hostile peer affects one
association only, and each child's memory is returned to the system when it ends (storescp
``--fork`` works the same way). The parent stays single-threaded so that forking is safe, re-reads
the configuration between connections (every setting but the port applies to the next
association), and reaps its children.

Stopping (SIGTERM or SIGINT): the parent stops accepting and passes SIGTERM to the children; a
child finishes the C-STORE in progress — the instance is stored and answered — then aborts the
association and exits. The parent exits 0 once every child is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Final

from common import exitcodes
from common.config import Config, load_config
from common.errors import CaduceusError, ConfigError
from common.outbox import NewEvent, Outbox, outbox_path
from receiver.association import Association, AssociationSummary, ReceiverSettings
from receiver.pdu import Connection
from receiver.tempfiles import clean_stale_temp_files

logger = logging.getLogger(__name__)

DEFAULT_MAX_PDU: Final = 1 << 20
"""Largest PDU the receiver advertises when the configuration leaves it at 0.

Chosen by measurement (docs/benchmarks.md, max-PDU sweep): larger PDUs mean fewer PDU headers
and reads per instance; the data path streams every PDU to disk in fixed chunks, so the size does
not bound memory."""

MAX_ASSOCIATIONS: Final = 64
"""Concurrent associations; further connections wait in the listen backlog."""

STOP_GRACE: Final = 120.0
"""Seconds the children get to finish the instance in progress before they are killed."""

POLL_INTERVAL: Final = 1.0


def receiver_settings(config: Config) -> ReceiverSettings:
    """The per-association settings from a validated configuration."""
    receiver = config.dicom_receiver
    return ReceiverSettings(
        incoming=config.spool_paths().incoming,
        accept_compressed=config.accept_compressed_images,
        additional_tags=tuple(receiver.additional_tags),
        durable=receiver.fsync,
        access=receiver,
        min_free_bytes=receiver.min_free_space_mb * (1 << 20),
        max_pdu=receiver.max_pdu_size or DEFAULT_MAX_PDU,
        network_timeout=receiver.network_timeout,
    )


class ReceiverServer:
    """Accepts associations on the configured port and serves each in a child process."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.settings = receiver_settings(config)
        self._config_mtime = _mtime(config_path)
        self._children: set[int] = set()
        self._stopping = False
        self._listener: socket.socket | None = None

    # ------------------------------------------------------------------ parent

    def serve(self) -> int:
        """Run until stopped; returns the process exit code."""
        paths = self.config.spool_paths()
        paths.create()
        clean_stale_temp_files(paths.incoming)
        address = (self.config.dicom_receiver.bind_address, self.config.port)
        try:
            self._listener = socket.create_server(address, backlog=128)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", address[0], address[1], exc)
            return exitcodes.EX_UNAVAILABLE
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        logger.info("receiving DICOM on %s:%d into %s", *address, paths.incoming)
        try:
            while not self._stopping:
                self._step(self._listener, wake_r)
        finally:
            self._listener.close()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
        return self._stop_children()

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("%s received: stopping", signal.Signals(signum).name)
        self._stopping = True

    def _step(self, listener: socket.socket, wake_r: int) -> None:
        self._reap()
        watch: list[socket.socket | int] = (
            [wake_r] if len(self._children) >= MAX_ASSOCIATIONS else [listener, wake_r]
        )
        try:
            readable, _, _ = select.select(watch, [], [], POLL_INTERVAL)
        except InterruptedError:
            return
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        if self._stopping:
            return
        self._reload_config()
        if listener in readable:
            try:
                conn, peer = listener.accept()
            except OSError as exc:
                logger.warning("accept failed: %s", exc)
                return
            self._fork(conn, peer)

    def _reload_config(self) -> None:
        mtime = _mtime(self.config_path)
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            logger.error("configuration change refused, keeping the last valid one: %s", exc)
            return
        if config.port != self.config.port:
            logger.warning("the new port %d applies after a restart of the receiver", config.port)
        self.config = config
        self.settings = receiver_settings(config)
        logger.info("configuration reloaded")

    def _fork(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        pid = os.fork()
        if pid == 0:
            code = exitcodes.EX_SOFTWARE
            try:
                code = self._child(conn, peer)
            finally:
                os._exit(code)
        conn.close()
        self._children.add(pid)

    def _reap(self) -> None:
        for pid in list(self._children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)

    def _stop_children(self) -> int:
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self._children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for pid in self._children:
            logger.error("association process %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        logger.info("receiver stopped")
        return exitcodes.EX_OK

    # ------------------------------------------------------------------ child

    def _child(self, conn: socket.socket, peer: tuple[str, int]) -> int:
        assert self._listener is not None
        self._listener.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer_address = peer[0]
        association = Association(Connection(conn), peer_address, self.settings)
        association.summary.peer_port = peer[1]

        def on_term(_signum: int, _frame: FrameType | None) -> None:
            association.request_stop()

        signal.signal(signal.SIGTERM, on_term)
        try:
            summary = association.run()
        except Exception:
            logger.exception("association from %s failed", peer_address)
            return exitcodes.EX_SOFTWARE
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the association is over: record it
        self._record(summary)
        return exitcodes.EX_OK

    def _record(self, summary: AssociationSummary) -> None:
        """Record one ``association`` and one ``series_received`` event per series."""
        association_id = uuid.uuid4().hex
        common = {
            "association_id": association_id,
            "calling_ae": summary.calling_ae,
            "called_ae": summary.called_ae,
            "peer_address": summary.peer_address,
            "peer_port": summary.peer_port,
        }
        events = [
            NewEvent(
                "association",
                {
                    **common,
                    "outcome": summary.outcome,
                    "instances": summary.instances,
                    "bytes": summary.bytes,
                    "failures": summary.failures,
                    "started_at": _iso(summary.started),
                    "ended_at": _iso(summary.ended),
                    "duration_s": round(summary.ended - summary.started, 3),
                },
            )
        ]
        for series_uid, series in summary.series.items():
            payload = {**common, "series_uid": series_uid, **asdict(series)}
            payload["count"] = len(series.sop_instance_uids)
            events.append(NewEvent("series_received", payload))
        try:
            with Outbox(
                outbox_path(self.config.spool_paths().state, "receiver"), "receiver"
            ) as box:
                box.record_many(events)
        except CaduceusError:
            logger.exception("could not record the events of association %s", association_id)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
