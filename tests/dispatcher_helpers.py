"""Test helpers of the dispatcher: task folders in a tmp spool, and the peers it sends to.

Peers are real: DCMTK ``storescp`` as a process, and a pynetdicom SCP the tests own (it can
answer any status, or stop answering, on purpose). Nothing of the dispatcher is patched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.sop_class import Verification

from common.config import Config, parse_config
from common.outbox import Event
from common.task import Task, TaskDispatch, TaskInfo, read_task, write_task
from receiver.negotiation import negotiate
from receiver.pdu import Connection, ProtocolError
from tests.dicom_factory import Instance, dataset_offset
from tests.helpers import (
    API_KEY,
    LOCALHOST,
    free_port,
    outbox_events,
    require_tool,
    wait_until,
)

SCP_AET = "TESTSCP"


# ---------------------------------------------------------------------------- spool and config


def dispatcher_config(
    data_root: Path,
    targets: dict[str, dict[str, Any]],
    *,
    rules: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A configuration with quick retries and short timeouts for tests."""
    config: dict[str, Any] = {
        "data_root": str(data_root),
        "bookkeeper_api_key": API_KEY,
        "dispatcher_scan_interval": 0.2,
        "retry_delay": 0,
        "retry_max": 3,
        "dispatcher_dimse_timeout": 10,
        "dispatcher_acse_timeout": 10,
        "dispatcher_network_timeout": 10,
        "dispatcher_connection_timeout": 5,
        "targets": targets,
        "rules": rules or {},
    }
    config.update(overrides)
    return config


def dicom_target(port: int, **fields: Any) -> dict[str, Any]:
    return {"target_type": "dicom", "ip": LOCALHOST, "port": port, "aet_target": SCP_AET, **fields}


def load(config: dict[str, Any]) -> Config:
    return parse_config(config, report=False)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config, indent=2))
    return path


def make_task(
    outgoing: Path,
    task_id: str,
    instances: Sequence[Instance],
    targets: Sequence[str],
    *,
    applied_rule: str | None = "rule",
    triggered: Sequence[str] = ("rule",),
    **info: Any,
) -> Path:
    """A task folder ``outgoing/<task_id>`` holding copies of ``instances`` and a task.json.

    It is built under a hidden name and renamed in, as the router delivers folders.
    """
    temp = outgoing / f".{task_id}.building"
    temp.mkdir(parents=True)
    for instance in instances:
        name = f"{instance.series_uid}#{instance.sop_instance_uid}.dcm"
        shutil.copyfile(instance.path, temp / name)
    series_uid = instances[0].series_uid if instances else "1.2.3"
    task = Task(
        id=task_id,
        info=TaskInfo(
            action="route",
            uid=series_uid,
            uid_type="series",
            triggered_rules=dict.fromkeys(triggered, True),
            applied_rule=applied_rule,
            **info,
        ),
        dispatch=TaskDispatch(target_name=list(targets)),
    )
    write_task(temp / "task.json", task)
    folder = outgoing / task_id
    temp.rename(folder)
    return folder


def task_in(root: Path, task_id: str) -> Task:
    return read_task(root / task_id / "task.json", report=False)


def dataset_bytes(path: Path) -> bytes:
    """The data set of a DICOM file, without preamble and meta header."""
    return path.read_bytes()[dataset_offset(path) :]


def dispatcher_events(data_root: Path) -> list[Event]:
    path = data_root / "state" / "outbox" / "dispatcher.sqlite3"
    return outbox_events(path) if path.exists() else []


# ---------------------------------------------------------------------------- dispatcher process


@dataclass
class DispatcherProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_dispatcher(config_path: Path, log_path: Path, *args: str) -> DispatcherProcess:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(config_path), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config_path.parent,
        )
    return DispatcherProcess(process, log_path)


@contextlib.contextmanager
def dispatcher_processes(
    config_path: Path, folder: Path, count: int = 1
) -> Iterator[list[DispatcherProcess]]:
    """``count`` dispatcher processes; stopped (SIGTERM, then SIGKILL) at the end."""
    started = [start_dispatcher(config_path, folder / f"dispatcher-{n}.log") for n in range(count)]
    try:
        yield started
    finally:
        for proc in started:
            if proc.process.poll() is None:
                try:
                    proc.terminate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


# ---------------------------------------------------------------------------- storescp


@dataclass
class StoreScp:
    """DCMTK storescp on a free loopback port, bit-preserving, writing into ``out_dir``."""

    out_dir: Path
    port: int = 0
    log_path: Path | None = None
    max_pdu: int = 131072
    process: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None) -> StoreScp:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or self.port or free_port()
        self.log_path = self.log_path or self.out_dir.parent / f"storescp-{self.port}.log"
        command = [
            require_tool("storescp"),
            "--single-process",
            "-od",
            str(self.out_dir),
            "+B",
            "-pm",
            "+xa",
            "-fe",
            ".dcm",
            "-pdu",
            str(self.max_pdu),
            str(self.port),
        ]
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.out_dir
            )
        wait_until(self._answers, timeout=30, what=f"storescp on port {self.port}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"storescp exited with {self.process.returncode}")
        done = subprocess.run(
            [require_tool("echoscu"), "-to", "2", LOCALHOST, str(self.port)],
            capture_output=True,
            timeout=20,
            check=False,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        return done.returncode == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> file, of what storescp wrote (``<modality>.<uid>.dcm``)."""
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in self.out_dir.glob("*.dcm")
        }


@contextlib.contextmanager
def storescp(folder: Path, **kwargs: Any) -> Iterator[StoreScp]:
    peer = StoreScp(folder, **kwargs).start()
    try:
        yield peer
    finally:
        peer.stop()


# ---------------------------------------------------------------------------- a pynetdicom SCP


ABORT = -1
"""``ScpPeer.answer`` value: abort the association instead of answering."""


@dataclass
class ScpPeer:
    """A Storage SCP we own: ``answer(n)`` gives the status of the n-th C-STORE (1-based),
    None to block (never answer) until the test ends, or :data:`ABORT` to send an A-ABORT."""

    answer: Callable[[int], int | None] = lambda _n: 0x0000
    max_pdu: int = 16382
    """The Maximum Length it advertises (0: unlimited)."""
    port: int = 0
    received: list[str] = field(default_factory=list)
    """SOP Instance UIDs of every C-STORE request, in order (also the unanswered ones)."""
    associations: int = 0
    calling: list[str] = field(default_factory=list)
    called: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ScpPeer:
        ae = AE(ae_title=SCP_AET)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(
                context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = self.max_pdu
        self.port = self.port or free_port()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted)]
        self._server = ae.start_server((LOCALHOST, self.port), block=False, evt_handlers=handlers)
        return self

    def _on_accepted(self, event: evt.Event) -> None:
        request = event.assoc.requestor.primitive
        with self._lock:
            self.associations += 1
            self.calling.append(str(request.calling_ae_title).strip())
            self.called.append(str(request.called_ae_title).strip())

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            number = len(self.received)
        code = self.answer(number)
        if code == ABORT:
            event.assoc.abort()
            return 0xA700  # never sent: the association is gone
        if code is None:
            self.release.wait(120)  # "never" answer; the test releases us at its end
            return 0xA700
        return code

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@contextlib.contextmanager
def scp_peer(
    answer: Callable[[int], int | None] = lambda _n: 0, *, max_pdu: int = 16382
) -> Iterator[ScpPeer]:
    peer = ScpPeer(answer=answer, max_pdu=max_pdu).start()
    try:
        yield peer
    finally:
        peer.stop()


# ---------------------------------------------------------------------------- raw TCP peers


class PduRelay:
    """A TCP relay in front of a peer that records every PDU the requestor sends through it,
    as (PDU type, length of the variable field) — to check PDU sizes and aborts."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.pdus: list[tuple[int, int]] = []
        self._listener = socket.create_server((LOCALHOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = [self._listener]
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((LOCALHOST, self.upstream_port), timeout=10)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        pending, skip = b"", 0
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                if record:
                    pending, skip = self._record(pending + chunk, skip)
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _record(self, data: bytes, skip: int) -> tuple[bytes, int]:
        """Record the PDU headers in ``data``, ``skip`` bytes into the current PDU's body;
        return an unfinished header and the bytes of body still to skip."""
        while True:
            taken = min(skip, len(data))
            data, skip = data[taken:], skip - taken
            if len(data) < 6:
                return data, skip
            pdu_type, length = struct.unpack(">BxI", data[:6])
            self.pdus.append((pdu_type, length))
            data, skip = data[6:], length

    def p_data_lengths(self) -> list[int]:
        return [length for pdu_type, length in self.pdus if pdu_type == 0x04]

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@contextlib.contextmanager
def pdu_relay(upstream_port: int) -> Iterator[PduRelay]:
    relay = PduRelay(upstream_port)
    try:
        yield relay
    finally:
        relay.close()


class SilentPeer:
    """A TCP peer that misbehaves on purpose: ``"no-answer"`` accepts connections and never
    answers the A-ASSOCIATE-RQ; ``"stop-reading"`` accepts the association (every context,
    as the receiver negotiates) and then never reads again."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._listener = socket.create_server((LOCALHOST, 0))
        # A small receive window, so that a peer that stops reading blocks the sender soon.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.port = int(self._listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            if self.mode == "stop-reading":
                with contextlib.suppress(OSError, ProtocolError):
                    _accept_association(sock)

    def close(self) -> None:
        for sock in [self._listener, *self.connections]:
            with contextlib.suppress(OSError):
                sock.close()


def _accept_association(sock: socket.socket) -> None:
    conn = Connection(sock)
    _pdu_type, length = conn.read_pdu_header()
    rq = conn.read_associate_rq(length)
    negotiated = negotiate(rq.presentation_context_definition_list, accept_compressed=True)
    ac = A_ASSOCIATE()
    ac.application_context_name = rq.application_context_name
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0
    ac.presentation_context_definition_results_list = negotiated.results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    ac.user_information = [max_length]
    conn.send_associate_ac(ac)


@contextlib.contextmanager
def silent_peer(mode: str) -> Iterator[SilentPeer]:
    peer = SilentPeer(mode)
    try:
        yield peer
    finally:
        peer.close()
