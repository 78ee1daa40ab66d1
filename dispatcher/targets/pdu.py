"""The DICOM Upper Layer PDUs the dispatcher's SCU sends and reads (PS3.8 9.3).

pynetdicom's PDU and primitive classes encode the A-ASSOCIATE-RQ and decode the A-ASSOCIATE-AC,
-RJ and A-ABORT; P-DATA-TF headers, A-RELEASE and A-ABORT are a few bytes each and are packed
here directly.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from common.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from common.ul import (
    A_ABORT_TYPE,
    A_RELEASE_RQ_TYPE,
    P_DATA_TF_TYPE,
)
from dispatcher.targets.association import Peer

APPLICATION_CONTEXT: Final = UID("1.2.840.10008.3.1.1.1")
"""The DICOM Application Context Name (PS3.7 A.2.1)."""
RECEIVE_PDU: Final = 16384
"""Largest PDU the dispatcher accepts (A-ASSOCIATE-RQ Maximum Length, PS3.8 D.1): it only
receives responses of about 200 bytes."""
MAX_INCOMING_PDU: Final = 1 << 20
"""A PDU from the peer larger than this is a protocol error (protects memory)."""
PDV_OVERHEAD: Final = 6
"""Bytes of a PDV item that are not fragment: item length (4), context id, control header."""

PDU_HEADER: Final = struct.Struct(">BxI")
PDV_HEADER: Final = struct.Struct(">IBB")
P_DATA_HEADER_SIZE: Final = PDU_HEADER.size + PDV_HEADER.size
COMMAND: Final = 0x01
LAST: Final = 0x02
"""Message Control Header bits (PS3.8 E.2)."""
RELEASE_RQ: Final = PDU_HEADER.pack(A_RELEASE_RQ_TYPE, 4) + b"\x00" * 4
ABORT: Final = PDU_HEADER.pack(A_ABORT_TYPE, 4) + b"\x00\x00\x00\x00"
"""A-ABORT, source 0 (service user), reason 0 (PS3.8 9.3.8)."""
_ABORT_SOURCE: Final = {0: "service user", 2: "service provider"}
_ABORT_REASON: Final = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


class Source(Protocol):
    """Where a data set's bytes come from: an unbuffered file, or ``io.BytesIO``."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Padded:
    """``source`` followed by one NULL byte."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._padded = False

    def readinto(self, buffer: memoryview, /) -> int | None:
        count = self._source.readinto(buffer)
        if count or self._padded:
            return count
        self._padded = True
        buffer[0] = 0
        return 1


class SourceFailed(Exception):
    """The data set's source failed or ended early."""


class ProtocolError(Exception):
    """The peer sent something PS3.8 does not allow here."""


def read_fully(source: Source, view: memoryview) -> None:
    """Fill ``view`` from ``source``; :class:`SourceFailed` when it cannot."""
    got = 0
    while got < len(view):
        try:
            count = source.readinto(view[got:])
        except OSError as exc:
            raise SourceFailed(exc.strerror or str(exc)) from None
        if not count:
            raise SourceFailed("the file is shorter than when the send began")
        got += count


def numbered(contexts: Sequence[PresentationContext]) -> dict[int, PresentationContext]:
    """Contexts with the odd ids 1, 3, 5, ... (PS3.8 9.3.2.2)."""
    numbered: dict[int, PresentationContext] = {}
    for index, context in enumerate(contexts):
        context.context_id = 2 * index + 1
        numbered[2 * index + 1] = context
    return numbered


def associate_rq(peer: Peer, contexts: dict[int, PresentationContext]) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = peer.calling
    primitive.called_ae_title = peer.called
    primitive.presentation_context_definition_list = list(contexts.values())
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = RECEIVE_PDU
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    primitive.user_information = [max_length, class_uid, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def p_data_header(context_id: int, fragment: int, control: int) -> bytes:
    """P-DATA-TF PDU header with one PDV item header (PS3.8 9.3.5, E.2)."""
    return PDU_HEADER.pack(P_DATA_TF_TYPE, fragment + PDV_OVERHEAD) + PDV_HEADER.pack(
        fragment + 2, context_id, control
    )


def command_fragments(body: bytes, command: bytearray) -> bool:
    """Append the command fragments of a P-DATA-TF PDU body; True after the last one."""
    offset = 0
    while offset + PDV_HEADER.size <= len(body):
        length, _context_id, control = PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise ProtocolError("malformed PDV item")
        if not control & COMMAND:
            raise ProtocolError("a data set fragment in a response")
        command += body[offset + PDV_HEADER.size : end]
        if len(command) > MAX_INCOMING_PDU:
            raise ProtocolError("response command set too long")
        if control & LAST:
            if end != len(body):
                raise ProtocolError("data after the last fragment of a response")
            return True
        offset = end
    if offset != len(body):
        raise ProtocolError("malformed P-DATA-TF PDU")
    return False


def abort_pdu(body: bytes) -> bytes:
    return PDU_HEADER.pack(A_ABORT_TYPE, len(body)) + body


def abort_text(raw: bytes) -> str:
    pdu = A_ABORT_RQ()
    try:
        pdu.decode(raw)
    except Exception:  # pynetdicom raises assorted errors on a malformed PDU
        return "malformed A-ABORT"
    source = _ABORT_SOURCE.get(int(pdu.source or 0), f"source {pdu.source}")
    if pdu.source == 2:
        reason_code = int(pdu.reason_diagnostic or 0)
        return f"{source}: {_ABORT_REASON.get(reason_code, f'reason {reason_code}')}"
    return source
