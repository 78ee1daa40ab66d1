"""The DIMSE command sets of the dispatcher's SCU: C-STORE-RQ and C-ECHO-RQ out, their responses in.

Command sets are always Implicit VR Little Endian, group 0000 only, with the Command Group
Length first (PS3.7 6.3.1, 9.3, E.1). Encoding them directly costs a few microseconds; pydicom
with value validation cost a noticeable part of each C-STORE in pynetdicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# Command Field values (PS3.7 E.1-1).
C_STORE_RQ: Final = 0x0001
C_STORE_RSP: Final = 0x8001
C_ECHO_RQ: Final = 0x0030
C_ECHO_RSP: Final = 0x8030
DATASET_PRESENT: Final = 0x0000
"""CommandDataSetType: any value but 0x0101 means a data set follows (PS3.7 E.1-1)."""
NO_DATASET: Final = 0x0101
PRIORITY_MEDIUM: Final = 0x0000

_GROUP_LENGTH: Final = 0x0000
_AFFECTED_SOP_CLASS: Final = 0x0002
_COMMAND_FIELD: Final = 0x0100
_MESSAGE_ID: Final = 0x0110
_MESSAGE_ID_RESPONDED: Final = 0x0120
_PRIORITY: Final = 0x0700
_DATASET_TYPE: Final = 0x0800
_STATUS: Final = 0x0900
_ERROR_COMMENT: Final = 0x0902
_AFFECTED_SOP_INSTANCE: Final = 0x1000
_ELEMENT: Final = struct.Struct("<HHI")


class CommandError(ValueError):
    """A response command set that cannot be decoded."""


@dataclass(frozen=True)
class Response:
    """What the dispatcher needs of a C-STORE-RSP or C-ECHO-RSP."""

    command_field: int
    message_id_responded: int
    status: int
    error_comment: str = ""


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), priority medium, a data set follows."""
    return _command(
        {
            _AFFECTED_SOP_CLASS: _uid(sop_class_uid),
            _COMMAND_FIELD: _us(C_STORE_RQ),
            _MESSAGE_ID: _us(message_id),
            _PRIORITY: _us(PRIORITY_MEDIUM),
            _DATASET_TYPE: _us(DATASET_PRESENT),
            _AFFECTED_SOP_INSTANCE: _uid(sop_instance_uid),
        }
    )


def c_echo_rq(message_id: int, sop_class_uid: str) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    return _command(
        {
            _AFFECTED_SOP_CLASS: _uid(sop_class_uid),
            _COMMAND_FIELD: _us(C_ECHO_RQ),
            _MESSAGE_ID: _us(message_id),
            _DATASET_TYPE: _us(NO_DATASET),
        }
    )


def decode_response(raw: bytes) -> Response:
    """The fields of a response command set; :class:`CommandError` if it is malformed."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset + _ELEMENT.size <= len(raw):
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        offset += _ELEMENT.size
        if group != 0x0000 or offset + length > len(raw):
            raise CommandError(f"malformed command element ({group:04X},{element:04X})")
        values[element] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise CommandError("trailing bytes after the command set")
    try:
        command_field = _read_us(values[_COMMAND_FIELD])
        responded = _read_us(values[_MESSAGE_ID_RESPONDED])
        status = _read_us(values[_STATUS])
    except KeyError as exc:
        raise CommandError(f"response without element (0000,{exc.args[0]:04X})") from None
    comment = values.get(_ERROR_COMMENT, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    return Response(command_field, responded, status, comment)


def _command(elements: dict[int, bytes]) -> bytes:
    body = b"".join(
        _ELEMENT.pack(0x0000, element, len(value)) + value
        for element, value in sorted(elements.items())
    )
    return _ELEMENT.pack(0x0000, _GROUP_LENGTH, 4) + struct.pack("<I", len(body)) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _read_us(value: bytes) -> int:
    if len(value) != 2:
        raise CommandError("US element of the wrong length")
    return int(struct.unpack("<H", value)[0])


def _uid(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value
