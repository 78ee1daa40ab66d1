"""Encoding and decoding of DIMSE command sets (PS3.7 §9.3, §E; Implicit VR Little Endian)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

C_STORE_RQ: Final = 0x0001
C_STORE_RSP: Final = 0x8001
C_ECHO_RQ: Final = 0x0030
C_ECHO_RSP: Final = 0x8030
NO_DATASET: Final = 0x0101
"""CommandDataSetType value meaning no data set follows (PS3.7 E.1)."""

_TAG_GROUP_LENGTH: Final = 0x0000
_TAG_AFFECTED_SOP_CLASS: Final = 0x0002
_TAG_COMMAND_FIELD: Final = 0x0100
_TAG_MESSAGE_ID: Final = 0x0110
_TAG_MESSAGE_ID_RESPONDED: Final = 0x0120
_TAG_MOVE_ORIGINATOR_AE: Final = 0x1030
_TAG_DATASET_TYPE: Final = 0x0800
_TAG_STATUS: Final = 0x0900
_TAG_ERROR_COMMENT: Final = 0x0902
_TAG_AFFECTED_SOP_INSTANCE: Final = 0x1000

_US_TAGS: Final = frozenset(
    {_TAG_COMMAND_FIELD, _TAG_MESSAGE_ID, _TAG_MESSAGE_ID_RESPONDED, _TAG_DATASET_TYPE, _TAG_STATUS}
)


class CommandError(ValueError):
    """The command set cannot be decoded."""


@dataclass(frozen=True)
class Command:
    """The fields of a request command set the receiver needs."""

    command_field: int
    message_id: int
    has_dataset: bool
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_ae: str


def decode_command(raw: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set (group 0000 only)."""
    values: dict[int, bytes] = {}
    offset = 0
    end = len(raw)
    while offset + 8 <= end:
        group, elem, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise CommandError(f"malformed command element ({group:04X},{elem:04X})")
        values[elem] = raw[offset : offset + length]
        offset += length
    if offset != end:
        raise CommandError("trailing bytes after the command set")
    try:
        command_field = _us(values[_TAG_COMMAND_FIELD])
        message_id = _us(values.get(_TAG_MESSAGE_ID, b"\x00\x00"))
        dataset_type = _us(values.get(_TAG_DATASET_TYPE, struct.pack("<H", NO_DATASET)))
    except KeyError as exc:
        raise CommandError("command set without CommandField") from exc
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_dataset=dataset_type != NO_DATASET,
        sop_class_uid=_text(values.get(_TAG_AFFECTED_SOP_CLASS, b"")),
        sop_instance_uid=_text(values.get(_TAG_AFFECTED_SOP_INSTANCE, b"")),
        move_originator_ae=_text(values.get(_TAG_MOVE_ORIGINATOR_AE, b"")),
    )


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str,
    sop_instance_uid: str = "",
    error_comment: str = "",
) -> bytes:
    """Encode a response command set without data set (C-STORE-RSP, C-ECHO-RSP)."""
    elements: dict[int, bytes] = {
        _TAG_AFFECTED_SOP_CLASS: _uid(sop_class_uid),
        _TAG_COMMAND_FIELD: struct.pack("<H", command_field),
        _TAG_MESSAGE_ID_RESPONDED: struct.pack("<H", message_id),
        _TAG_DATASET_TYPE: struct.pack("<H", NO_DATASET),
        _TAG_STATUS: struct.pack("<H", status),
    }
    if error_comment:
        # ErrorComment is LO: at most 64 characters (PS3.7 C.4).
        elements[_TAG_ERROR_COMMENT] = _pad(error_comment[:64].encode("ascii", "replace"), b" ")
    if sop_instance_uid:
        elements[_TAG_AFFECTED_SOP_INSTANCE] = _uid(sop_instance_uid)
    body = b"".join(
        struct.pack("<HHI", 0x0000, elem, len(value)) + value
        for elem, value in sorted(elements.items())
    )
    group_length = struct.pack("<HHII", 0x0000, _TAG_GROUP_LENGTH, 4, len(body))
    return group_length + body


def _us(value: bytes) -> int:
    if len(value) != 2:
        raise CommandError("US element of wrong length")
    return int(struct.unpack("<H", value)[0])


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def _uid(uid: str) -> bytes:
    return _pad(uid.encode("ascii"), b"\x00")


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value
