"""Measure the P-DATA-TF PDU sizes a sender really uses, with a relay between sender and peer.

The max PDU an acceptor advertises is only an upper bound: the requestor may send smaller PDUs
(DCMTK has its own ceiling). The relay forwards bytes both ways unchanged and parses the PDU
headers (PS3.8 §9.3.1: type, reserved, 4-byte big-endian length) of the sender's stream.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
from pathlib import Path

from bench import procs

P_DATA_TF = 0x04
_HEADER = struct.Struct(">BxI")


class _PduMeter:
    """Incremental parser of a PDU stream; remembers the largest P-DATA-TF PDU length."""

    def __init__(self) -> None:
        self._header = b""
        self._remaining = 0
        self.largest = 0

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                continue
            need = _HEADER.size - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == _HEADER.size:
                pdu_type, length = _HEADER.unpack(self._header)
                if pdu_type == P_DATA_TF:
                    self.largest = max(self.largest, length)
                self._header, self._remaining = b"", length


def _pump(src: socket.socket, dst: socket.socket, meter: _PduMeter | None) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(1 << 20):
            if meter is not None:
                meter.feed(chunk)
            dst.sendall(chunk)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def largest_sent_pdu(peer_port: int, file: Path, timeout: float = 60.0) -> int | None:
    """Send ``file`` with ``storescu`` through the relay; the largest P-DATA-TF PDU length sent.

    The length is the PDU's length field (it excludes the 6-byte PDU header), the quantity a
    max PDU size limits (PS3.8 §D.1).
    """
    meter = _PduMeter()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(timeout)
        port = listener.getsockname()[1]
        scu = subprocess.Popen(
            ["storescu", "-to", "10", "127.0.0.1", str(port), str(file)],
            env=procs.dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client, _ = listener.accept()
        except TimeoutError:
            scu.kill()
            scu.wait()
            return None
        with client, socket.create_connection(("127.0.0.1", peer_port), timeout=timeout) as up:
            for sock in (client, up):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            back = threading.Thread(target=_pump, args=(up, client, None), daemon=True)
            back.start()
            _pump(client, up, meter)
            back.join(timeout)
        code = scu.wait(timeout)
    return meter.largest if code == 0 else None
