"""A DICOM association as requestor (SCU) on one blocking socket: negotiation, C-STORE, C-ECHO.

pynetdicom's PDU and primitive classes encode the A-ASSOCIATE-RQ and decode the A-ASSOCIATE-AC,
A-ASSOCIATE-RJ and A-ABORT; everything after the negotiation runs here, in the calling thread,
straight on the socket (PS3.8 9.3): a C-STORE-RQ command set and the data set go out as
P-DATA-TF PDUs no larger than the peer accepts, the data set streamed from the file on disk in
fixed-size pieces after its File Meta Information (nothing decoded, memory bounded by one
piece), then the C-STORE-RSP is read. No reactor thread, no queues, no polling: pynetdicom's
requestor spent about 4 ms of CPU per instance on those (``docs/dispatcher.md``).

Every wait is bounded: the TCP connect (``connection_timeout``), the negotiation and the release
(``acse_timeout``), each response (``dimse_timeout``, a deadline for the whole response), and
each socket send and receive (``network_timeout``: a peer that stops reading cannot block a send
longer than that). Any failure after the association was established raises
:class:`AssociationLost` after sending an A-ABORT and closing the socket, so the caller knows
exactly which requests got a response.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from common import ul
from dispatcher.settings import DispatcherSettings
from dispatcher.targets import dimse, pdu
from dispatcher.targets.association import Peer, connect_problem, rejection_text

logger = logging.getLogger(__name__)

UNLIMITED_PDU: Final = 1 << 24
"""PDU size when neither the peer nor ``dispatcher_max_pdu`` limits it (streamed all the same)."""
STREAM_CHUNK: Final = 1 << 18
"""Bytes read from a file and sent per socket call; larger PDUs are streamed in such pieces."""
_MSG_MORE: Final = getattr(socket, "MSG_MORE", 0)
"""Linux: hold a small send back until the next one fills the segment (with TCP_NODELAY on, the
command PDU would otherwise leave as a segment of its own)."""


class AssociationRefused(Exception):
    """No association: the connection or the negotiation failed. The message says why."""


class AssociationLost(Exception):
    """The association ended abnormally after it was established (abort sent, socket closed).

    ``no_response`` is set when the peer did not answer a request within ``dimse_timeout``."""

    def __init__(self, message: str, *, no_response: bool = False) -> None:
        super().__init__(message)
        self.no_response = no_response


class FileReadError(Exception):
    """The file cannot be opened; nothing was sent and the association goes on."""


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: UID
    transfer_syntax: UID


class ScuAssociation:
    """An association as requestor: :meth:`request` makes one; :meth:`release`, or
    :meth:`close` (which aborts an association still established), ends it."""

    def __init__(self, sock: socket.socket, peer: Peer, settings: DispatcherSettings) -> None:
        self.sock = sock
        self.peer = peer
        self.settings = settings
        self.accepted: list[AcceptedContext] = []
        self.peer_max_pdu = 0
        """The peer's Maximum Length (0: unlimited, PS3.8 D.1)."""
        self.max_fragment = 0
        """Largest fragment per P-DATA-TF PDU: the PDU's variable field (one PDV item) fits the
        peer's Maximum Length (PS3.8 9.3.5, D.1), capped by ``dispatcher_max_pdu``."""
        self.established = False
        self._buffer = bytearray()
        self._received = bytearray()
        self._message_id = 0
        self._timeout: float | None = None

    # ------------------------------------------------------------------ negotiation

    @classmethod
    def request(
        cls, peer: Peer, contexts: Sequence[PresentationContext], settings: DispatcherSettings
    ) -> ScuAssociation:
        """Connect and negotiate; :class:`AssociationRefused` with a precise reason."""
        assoc = cls(_connect(peer, settings.connection_timeout), peer, settings)
        try:
            assoc._negotiate(pdu.numbered(contexts))
        except BaseException:
            assoc.close()
            raise
        return assoc

    def _negotiate(self, proposed: dict[int, PresentationContext]) -> None:
        try:
            self._sendall(pdu.associate_rq(self.peer, proposed))
        except OSError as exc:
            raise AssociationRefused(
                f"{self.peer} closed the connection before the association request "
                f"({exc.strerror or exc})"
            ) from None
        ac = self._negotiation_answer(time.monotonic() + self.settings.acse_timeout)
        for result in ac.presentation_context_definition_results_list:
            context_id = int(result.context_id or 0)
            if result.result == 0 and context_id in proposed and result.transfer_syntax:
                abstract = UID(str(proposed[context_id].abstract_syntax))
                self.accepted.append(
                    AcceptedContext(context_id, abstract, UID(result.transfer_syntax[0]))
                )
        for item in ac.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
        limits = [size for size in (self.peer_max_pdu, self.settings.max_pdu) if size > 0]
        self.max_fragment = (min(limits) if limits else UNLIMITED_PDU) - pdu.PDV_OVERHEAD
        self.max_fragment -= self.max_fragment % 2  # fragments have even lengths (see _send)
        self._buffer = bytearray(pdu.P_DATA_HEADER_SIZE + min(self.max_fragment, STREAM_CHUNK))
        self.established = True

    def _negotiation_answer(self, deadline: float) -> A_ASSOCIATE:
        try:
            pdu_type, body = self._read_pdu(deadline)
        except TimeoutError:
            raise AssociationRefused(
                f"{self.peer} did not answer the association request within "
                f"{self.settings.acse_timeout:g} s"
            ) from None
        except (OSError, _PeerClosed, pdu.ProtocolError):
            raise AssociationRefused(
                f"{self.peer} aborted the association or closed the connection during negotiation"
            ) from None
        raw = pdu.PDU_HEADER.pack(pdu_type, len(body)) + body
        try:
            if pdu_type == ul.A_ASSOCIATE_AC_TYPE:
                ac = A_ASSOCIATE_AC()
                ac.decode(raw)
                return ac.to_primitive()
            rj = A_ASSOCIATE_RJ()
            if pdu_type == ul.A_ASSOCIATE_RJ_TYPE:
                rj.decode(raw)
        except Exception as exc:  # pynetdicom raises assorted errors on a malformed PDU
            raise AssociationRefused(
                f"{self.peer} sent an undecodable answer to the association request: {exc}"
            ) from None
        if pdu_type == ul.A_ASSOCIATE_RJ_TYPE:
            result, source, reason = (
                int(rj.result or 0),
                int(rj.source or 0),
                int(rj.reason_diagnostic or 0),
            )
            raise AssociationRefused(rejection_text(self.peer, result, source, reason))
        if pdu_type == ul.A_ABORT_TYPE:
            raise AssociationRefused(
                f"{self.peer} aborted the association during negotiation ({pdu.abort_text(raw)})"
            )
        raise AssociationRefused(
            f"{self.peer} answered the association request with PDU type 0x{pdu_type:02X}"
        )

    # ------------------------------------------------------------------ services

    def context_for(self, sop_class: str, syntaxes: Sequence[str]) -> AcceptedContext | None:
        """The accepted context for ``sop_class`` with the first of ``syntaxes`` that has one."""
        for syntax in syntaxes:
            for context in self.accepted:
                if context.abstract_syntax == sop_class and context.transfer_syntax == syntax:
                    return context
        return None

    def store_file(
        self, context: AcceptedContext, sop_instance: str, path: Path, offset: int
    ) -> dimse.Response:
        """C-STORE the data set of ``path``, from byte ``offset`` to the end, as it is on disk.

        :class:`FileReadError` when the file cannot be opened (nothing was sent; the
        association goes on); :class:`AssociationLost` for everything that ends it."""
        try:
            f = path.open("rb", buffering=0)
        except OSError as exc:
            raise FileReadError(f"cannot open {path.name}: {exc.strerror or exc}") from None
        with f:
            size = os.fstat(f.fileno()).st_size - offset
            f.seek(offset)
            message_id = self._next_message_id()
            command = dimse.c_store_rq(message_id, context.abstract_syntax, sop_instance)
            self._send(context.context_id, command, f, size)
        return self._response(message_id, dimse.C_STORE_RSP)

    def store_bytes(
        self, context: AcceptedContext, sop_instance: str, data: bytes
    ) -> dimse.Response:
        """C-STORE a data set already encoded in ``context``'s transfer syntax."""
        message_id = self._next_message_id()
        command = dimse.c_store_rq(message_id, context.abstract_syntax, sop_instance)
        self._send(context.context_id, command, io.BytesIO(data), len(data))
        return self._response(message_id, dimse.C_STORE_RSP)

    def echo(self, context: AcceptedContext) -> dimse.Response:
        """C-ECHO on a Verification context."""
        message_id = self._next_message_id()
        self._send(context.context_id, dimse.c_echo_rq(message_id, context.abstract_syntax))
        return self._response(message_id, dimse.C_ECHO_RSP)

    def release(self) -> None:
        """A-RELEASE (PS3.8 7.2), answered within ``acse_timeout``, else an abort and
        :class:`AssociationLost`. The socket is closed either way."""
        deadline = time.monotonic() + self.settings.acse_timeout
        try:
            self._sendall(pdu.RELEASE_RQ)
            pdu_type, _ = self._read_pdu(deadline)
        except TimeoutError:
            self.abort()
            raise AssociationLost(
                f"no A-RELEASE-RP within {self.settings.acse_timeout:g} s: association aborted"
            ) from None
        except (OSError, _PeerClosed, pdu.ProtocolError) as exc:
            self.abort()
            raise AssociationLost(f"the release failed: {_describe(exc, self.settings)}") from None
        if pdu_type != ul.A_RELEASE_RP_TYPE:
            self.abort()
            raise AssociationLost(f"the peer answered A-RELEASE-RQ with PDU type 0x{pdu_type:02X}")
        self.established = False
        self.close()

    def abort(self) -> None:
        """Send A-ABORT (best effort, PS3.8 7.3) and close the socket."""
        if self.established:
            self.established = False
            with contextlib.suppress(OSError):
                self._sendall(pdu.ABORT, timeout=1.0)
        self.close()

    def close(self) -> None:
        """Close the socket; an association still established is aborted first."""
        if self.established:
            self.abort()
            return
        with contextlib.suppress(OSError):
            self.sock.close()

    # ------------------------------------------------------------------ sending

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _send(
        self, context_id: int, command: bytes, source: pdu.Source | None = None, size: int = 0
    ) -> None:
        """The command set, then (with ``source``) ``size`` bytes of data set, as P-DATA-TF
        PDUs. Any failure aborts the association: a half-sent message cannot be taken back."""
        if source is not None and size % 2:
            # PDV fragments have even lengths (DCMTK aborts on an odd one). Only a deflated data
            # set can be odd; PS3.5 A.5 pads it with one trailing NULL byte, as pydicom does in
            # files (DCMTK's dcmconv +td does not).
            source, size = pdu.Padded(source), size + 1
        try:
            self._send_command(context_id, command, more=source is not None)
            if source is not None:
                self._send_dataset(context_id, source, size)
        except pdu.SourceFailed as exc:
            self.abort()
            raise AssociationLost(f"reading the file failed while it was sent: {exc}") from None
        except OSError as exc:
            message = self._why_send_failed(exc)
            self.abort()
            raise AssociationLost(message) from None

    def _send_command(self, context_id: int, command: bytes, *, more: bool) -> None:
        parts = []
        for start in range(0, len(command), self.max_fragment):
            fragment = command[start : start + self.max_fragment]
            control = pdu.COMMAND | (pdu.LAST if start + self.max_fragment >= len(command) else 0)
            parts += [pdu.p_data_header(context_id, len(fragment), control), fragment]
        self._sendall(b"".join(parts), _MSG_MORE if more else 0)

    def _send_dataset(self, context_id: int, source: pdu.Source, size: int) -> None:
        """``size`` bytes of ``source`` in PDUs of at most ``max_fragment`` bytes of data, each
        read into the buffer behind its headers and sent with one call (larger PDUs in pieces
        of the buffer's size)."""
        view = memoryview(self._buffer)
        remaining = size
        while True:
            fragment = min(remaining, self.max_fragment)
            remaining -= fragment
            control = pdu.LAST if remaining == 0 else 0
            view[: pdu.P_DATA_HEADER_SIZE] = pdu.p_data_header(context_id, fragment, control)
            start, left = pdu.P_DATA_HEADER_SIZE, fragment
            while True:
                piece = min(left, len(view) - start)
                if piece:
                    pdu.read_fully(source, view[start : start + piece])
                self._sendall(view[: start + piece])
                left -= piece
                if left == 0:
                    break
                start = 0
            if remaining == 0:
                return

    def _sendall(
        self, data: bytes | memoryview, flags: int = 0, timeout: float | None = None
    ) -> None:
        self._set_timeout(timeout or self.settings.network_timeout)
        self.sock.sendall(data, flags)

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._timeout:
            self.sock.settimeout(seconds)
            self._timeout = seconds

    def _why_send_failed(self, exc: OSError) -> str:
        if isinstance(exc, TimeoutError):
            return (
                f"the peer took no data for {self.settings.network_timeout:g} s "
                "(network timeout): association aborted"
            )
        # The peer may have said why before it closed: an A-ABORT waiting to be read.
        with contextlib.suppress(OSError, _PeerClosed, pdu.ProtocolError):
            pdu_type, body = self._read_pdu(time.monotonic() + 0.2)
            if pdu_type == ul.A_ABORT_TYPE:
                return f"the peer aborted the association ({pdu.abort_text(pdu.abort_pdu(body))})"
        return f"the connection was lost ({exc.strerror or exc})"

    # ------------------------------------------------------------------ receiving

    def _response(self, message_id: int, command_field: int) -> dimse.Response:
        """The response to ``message_id`` within ``dimse_timeout``, else abort and raise."""
        try:
            response = self._read_response(time.monotonic() + self.settings.dimse_timeout)
        except TimeoutError:
            self.abort()
            raise AssociationLost(
                f"no response within {self.settings.dimse_timeout:g} s (dimse timeout): "
                "association aborted",
                no_response=True,
            ) from None
        except _PeerAborted as exc:
            self.established = False
            self.close()
            raise AssociationLost(f"the peer aborted the association ({exc})") from None
        except (OSError, _PeerClosed, pdu.ProtocolError, dimse.CommandError) as exc:
            self.abort()
            raise AssociationLost(_describe(exc, self.settings)) from None
        if response.command_field != command_field or response.message_id_responded != message_id:
            self.abort()
            raise AssociationLost(
                f"the peer answered message {message_id} with command "
                f"0x{response.command_field:04X} for message {response.message_id_responded}"
            )
        return response

    def _read_response(self, deadline: float) -> dimse.Response:
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu(deadline)
            if pdu_type == ul.A_ABORT_TYPE:
                raise _PeerAborted(pdu.abort_text(pdu.abort_pdu(body)))
            if pdu_type != ul.P_DATA_TF_TYPE:
                raise pdu.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            if pdu.command_fragments(body, command):
                return dimse.decode_response(bytes(command))

    def _read_pdu(self, deadline: float) -> tuple[int, bytes]:
        pdu_type, length = pdu.PDU_HEADER.unpack(self._read_exact(pdu.PDU_HEADER.size, deadline))
        if length > pdu.MAX_INCOMING_PDU:
            raise pdu.ProtocolError(f"PDU of {length} bytes refused")
        return pdu_type, self._read_exact(length, deadline)

    def _read_exact(self, size: int, deadline: float) -> bytes:
        """``size`` bytes, each receive bounded by ``network_timeout`` and all by ``deadline``."""
        while len(self._received) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._set_timeout(min(left, self.settings.network_timeout))
            chunk = self.sock.recv(max(size - len(self._received), 4096))
            if not chunk:
                raise _PeerClosed("the peer closed the connection")
            self._received += chunk
        data = bytes(self._received[:size])
        del self._received[:size]
        return data


class _PeerClosed(Exception):
    pass


class _PeerAborted(Exception):
    pass


def _connect(peer: Peer, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((peer.host, peer.port), timeout=timeout)
    except socket.gaierror as exc:
        raise AssociationRefused(
            f"cannot connect to {peer.host}:{peer.port}: unknown host ({exc.strerror})"
        ) from None
    except TimeoutError:
        raise AssociationRefused(
            f"cannot connect to {peer.host}:{peer.port}: no answer within {timeout:g} s"
        ) from None
    except OSError as exc:
        problem = exc.strerror or connect_problem(peer.host, peer.port, timeout) or str(exc)
        raise AssociationRefused(f"cannot connect to {peer.host}:{peer.port}: {problem}") from None
    # Without TCP_NODELAY each small PDU (command set, response) may wait for the ACK of the
    # previous segment: Nagle's algorithm meeting delayed ACKs, up to 40 ms per message.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _describe(exc: BaseException, settings: DispatcherSettings) -> str:
    if isinstance(exc, TimeoutError):
        return f"no data from the peer for {settings.network_timeout:g} s (network timeout)"
    if isinstance(exc, _PeerClosed):
        return "the peer closed the connection"
    if isinstance(exc, OSError):
        return f"the connection was lost ({exc.strerror or exc})"
    return f"protocol error from the peer: {exc}"
