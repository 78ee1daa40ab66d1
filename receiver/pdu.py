"""DICOM Upper Layer PDUs on a blocking socket (PS3.8 §9.3).

The association negotiation PDUs are decoded and encoded with pynetdicom's PDU classes; the data
path (P-DATA-TF) is read here directly from a buffered socket so that data set fragments are
streamed to disk without being assembled in memory or handed between threads.
"""

from __future__ import annotations

import io
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, cast

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

from common.ul import (
    A_ASSOCIATE_RQ_TYPE,
    A_RELEASE_RP_TYPE,
    P_DATA_TF_TYPE,
)
from receiver import status

MAX_ASSOCIATE_RQ_LENGTH: Final = 1 << 20
"""An A-ASSOCIATE-RQ larger than this is refused (protects memory; real ones are a few KB)."""

READ_BUFFER: Final = 1 << 14
"""Read buffer of a connection. Reads of at least this size bypass the buffer and go straight
from the socket into the caller's memory (CPython's BufferedReader), so data set fragments, which
are larger, are not copied twice; the buffer only serves the small header reads."""

_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol (bad PDU, unexpected type, short read)."""


class PeerClosed(ProtocolError):
    """The peer closed the connection."""


@dataclass(frozen=True)
class PdvHeader:
    """One presentation data value item header inside a P-DATA-TF PDU."""

    length: int
    """Length of the fragment (without the two header bytes)."""
    context_id: int
    is_command: bool
    is_last: bool


class Connection:
    """A blocking socket with a read buffer and PDU helpers."""

    def __init__(self, sock: socket.socket, read_buffer: int = READ_BUFFER) -> None:
        self.sock = sock
        self._reader = cast(io.BufferedReader, sock.makefile("rb", buffering=read_buffer))
        self.peer_max_pdu = 0
        """Largest PDU the peer accepts (0 = unlimited), from its A-ASSOCIATE-RQ."""

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self.sock.close()

    # ------------------------------------------------------------------ reading

    def read_exact(self, size: int) -> bytes:
        data: bytes | None = self._reader.read(size)
        if data is None or len(data) < size:
            raise PeerClosed("connection closed by the peer")
        return data

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` completely from the connection."""
        got = self._reader.readinto(view)
        if got is None or got < len(view):
            raise PeerClosed("connection closed by the peer")

    def read_pdu_header(self) -> tuple[int, int]:
        """Read the next PDU header: (pdu type, length of the rest)."""
        pdu_type, length = _HEADER.unpack(self.read_exact(_HEADER.size))
        return pdu_type, length

    def read_pdv_header(self) -> PdvHeader:
        item_length, context_id, control = _PDV_HEADER.unpack(self.read_exact(_PDV_HEADER.size))
        if item_length < 2:
            raise ProtocolError(f"PDV item length {item_length} is too short")
        return PdvHeader(
            length=item_length - 2,
            context_id=context_id,
            is_command=bool(control & 0x01),
            is_last=bool(control & 0x02),
        )

    def read_associate_rq(self, length: int) -> A_ASSOCIATE:
        if length > MAX_ASSOCIATE_RQ_LENGTH:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes refused")
        body = self.read_exact(length)
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(_HEADER.pack(A_ASSOCIATE_RQ_TYPE, length) + body)
            return pdu.to_primitive()
        except Exception as exc:  # pynetdicom raises assorted errors on bad input
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}") from exc

    def skip(self, length: int) -> None:
        while length:
            chunk = self._reader.read(min(length, 1 << 16))
            if not chunk:
                raise PeerClosed("connection closed by the peer")
            length -= len(chunk)

    # ------------------------------------------------------------------ writing

    def send_associate_ac(self, primitive: A_ASSOCIATE) -> None:
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())

    def send_associate_rj(self, result: int, source: int, reason: int) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = result
        primitive.result_source = source
        primitive.diagnostic = reason
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())

    def send_release_rp(self) -> None:
        self.sock.sendall(_HEADER.pack(A_RELEASE_RP_TYPE, 4) + b"\x00" * 4)

    def send_abort(
        self,
        source: int = status.ABORT_SOURCE_PROVIDER,
        reason: int = status.ABORT_REASON_NOT_SPECIFIED,
    ) -> None:
        primitive: A_ABORT | A_P_ABORT
        if source == status.ABORT_SOURCE_PROVIDER:
            primitive = A_P_ABORT()
            primitive.provider_reason = reason
        else:
            primitive = A_ABORT()
            primitive.abort_source = source
        pdu = A_ABORT_RQ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())

    def send_command(self, context_id: int, command: bytes) -> None:
        """Send a command set as P-DATA-TF PDUs no larger than the peer accepts."""
        self.sock.sendall(b"".join(_p_data_pdus(context_id, command, self.peer_max_pdu)))


def _p_data_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> Iterable[bytes]:
    # A PDU of maximum length L carries one PDV of at most L - 6 bytes of fragment (PS3.8 9.3.5).
    fragment = len(command) if peer_max_pdu == 0 else max(peer_max_pdu - 6, 1)
    chunks = [command[i : i + fragment] for i in range(0, len(command), fragment)] or [b""]
    for index, chunk in enumerate(chunks):
        control = 0x01 | (0x02 if index == len(chunks) - 1 else 0x00)
        pdv = _PDV_HEADER.pack(len(chunk) + 2, context_id, control) + chunk
        yield _HEADER.pack(P_DATA_TF_TYPE, len(pdv)) + pdv
