"""Fast reading of the few top-level elements the side-car needs, from a data set's first bytes.

Building a pydicom ``Dataset`` for every received instance costs about a millisecond, more than
receiving a small image. This reader walks the element headers of an Explicit or Implicit VR
Little Endian data set (every encapsulated transfer syntax is Explicit VR Little Endian), skips
sequences, stops at the pixel data, and keeps the raw bytes of the wanted elements; their values
are then decoded by pydicom's own converters (``pydicom.values.convert_value``), so the text is
the same as pydicom would give.

The walk visits every element header up to the end of the data set — reading from the file what
is not in memory — so a truncated or corrupt data set is refused (:class:`MalformedDataset`)
rather than stored: pydicom's reader silently accepts an element longer than the bytes left.
Big endian and deflated data sets raise :class:`HeaderFallback`, and the caller reads them with
pydicom instead.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Mapping
from typing import Final

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.values import convert_value

PIXEL_DATA: Final = 0x7FE00010
SPECIFIC_CHARACTER_SET: Final = 0x00080005
ITEM: Final = 0xFFFEE000
ITEM_DELIMITER: Final = 0xFFFEE00D
SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
UNDEFINED_LENGTH: Final = 0xFFFFFFFF
MAX_DEPTH: Final = 32

_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TAG_LENGTH = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")


class HeaderFallback(Exception):
    """This reader cannot answer; read the data set with pydicom instead."""


class MalformedDataset(Exception):
    """The data set's structure is broken: an element runs past the end, a bad VR, ..."""


RawElements = dict[int, tuple[str | None, bytes]]
"""Tag -> (VR, or None for Implicit VR, raw value bytes)."""


class Source:
    """The bytes of a received data set: its first bytes in memory, the rest read from its file.

    ``file_offset`` is where the data set starts in the file (after preamble and meta).
    """

    def __init__(self, prefix: bytes, size: int, fd: int | None = None, file_offset: int = 0):
        self.prefix = prefix
        self.size = size
        self._fd = fd
        self._file_offset = file_offset

    def read(self, pos: int, length: int) -> bytes:
        if pos + length > self.size:
            raise MalformedDataset(
                f"element at offset {pos} needs {length} bytes; the data set ends at {self.size}"
            )
        if pos + length <= len(self.prefix):
            return self.prefix[pos : pos + length]
        if self._fd is None:
            raise HeaderFallback("the data set is not in memory")
        data = os.pread(self._fd, length, self._file_offset + pos)
        if len(data) != length:
            raise MalformedDataset(f"the file ends before offset {pos + length}")
        return data


def scan(
    source: Source | bytes, wanted: frozenset[int], *, implicit: bool, complete: bool = True
) -> RawElements:
    """The raw wanted top-level elements of a data set, after checking its whole structure.

    Every element header is read — values only of the wanted elements — so that a truncated or
    corrupt data set raises :class:`MalformedDataset` rather than being stored. Raises
    :class:`HeaderFallback` when the data set is only partly available (``bytes`` with
    ``complete=False``).
    """
    if isinstance(source, bytes):
        size = len(source) if complete else 1 << 62
        source = Source(source, size)
    found: RawElements = {}
    _walk(source, 0, source.size, implicit, 0, wanted, found)
    return found


def _walk(
    source: Source,
    pos: int,
    end: int,
    implicit: bool,
    depth: int,
    wanted: frozenset[int] | None,
    found: RawElements | None,
) -> int:
    """Walk the elements of a data set from ``pos`` up to ``end``; return where it stopped.

    Inside an item of undefined length (``end`` is then the end of the whole data set) the walk
    stops after the Item Delimitation Item.
    """
    if depth > MAX_DEPTH:
        raise MalformedDataset("sequences nested too deeply")
    while pos < end:
        group, element, length = _TAG_LENGTH.unpack(source.read(pos, 8))
        tag = group << 16 | element
        if tag == ITEM_DELIMITER and depth > 0:
            return pos + 8
        if group == 0xFFFE:
            raise MalformedDataset(f"unexpected item tag at offset {pos}")
        vr, length, value_pos = _vr_and_length(source, pos, implicit, length)
        if length == UNDEFINED_LENGTH:
            if vr not in (None, "SQ", "UN", "OB", "OW"):
                raise MalformedDataset(f"undefined length on VR {vr} at offset {pos}")
            # Encapsulated pixel data and sequences are both items up to a delimiter;
            # the content of an undefined-length UN is Implicit VR (PS3.5 §6.2.2).
            pos = _skip_items(source, value_pos, implicit or vr == "UN", depth + 1)
            continue
        if wanted is not None and found is not None and tag in wanted:
            found[tag] = (vr, source.read(value_pos, length))
        elif value_pos + length > source.size:
            source.read(value_pos, length)  # raises MalformedDataset
        pos = value_pos + length
    if depth > 0:
        raise MalformedDataset("item without delimiter")
    if pos != end:
        raise MalformedDataset(f"the last element runs {pos - end} bytes past the end")
    return pos


def _vr_and_length(
    source: Source, pos: int, implicit: bool, implicit_length: int
) -> tuple[str | None, int, int]:
    """(VR or None, value length, value offset) of the element whose header starts at ``pos``."""
    if implicit:
        return None, implicit_length, pos + 8
    header = source.read(pos, 8)
    vr_bytes = header[4:6]
    if not (vr_bytes.isalpha() and vr_bytes.isupper()):
        raise MalformedDataset(f"invalid VR {vr_bytes!r} at offset {pos}")
    if vr_bytes in _LONG_VRS:
        return vr_bytes.decode("ascii"), struct.unpack("<I", source.read(pos + 8, 4))[0], pos + 12
    return vr_bytes.decode("ascii"), _EXPLICIT_SHORT.unpack(header)[3], pos + 8


def _skip_items(source: Source, pos: int, implicit: bool, depth: int) -> int:
    """Offset after the Sequence Delimitation Item of the undefined-length value at ``pos``."""
    while True:
        group, element, length = _TAG_LENGTH.unpack(source.read(pos, 8))
        tag = group << 16 | element
        pos += 8
        if tag == SEQUENCE_DELIMITER:
            return pos
        if tag != ITEM:
            raise MalformedDataset(f"unexpected tag {tag:08X} inside a sequence")
        if length == UNDEFINED_LENGTH:
            pos = _walk(source, pos, source.size, implicit, depth, None, None)
        else:
            if pos + length > source.size:
                source.read(pos, length)  # raises MalformedDataset
            pos += length


def decode(found: Mapping[int, tuple[str | None, bytes]]) -> tuple[dict[int, object], list[int]]:
    """Decode raw elements as pydicom does: (values, tags that did not decode cleanly).

    ASCII values of single-byte or UTF-8 data sets are decoded here with pydicom's padding rules
    (a tenth of the cost); everything else goes through pydicom's converters. A value that
    warned about its character set is kept best-effort and its tag listed.
    """
    charset_raw = found.get(SPECIFIC_CHARACTER_SET)
    charsets: list[str] = []
    if charset_raw is not None:
        charsets = [
            part.strip(" \x00") for part in charset_raw[1].decode("ascii", "replace").split("\\")
        ]
    ascii_text_is_plain = len(charsets) <= 1 and "2022" not in "".join(charsets)
    values: dict[int, object] = {}
    unclean: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encodings = convert_encodings(charsets or None)
        charset_warned = any(is_charset_warning(w.message) for w in caught)
        for tag, (vr, raw) in found.items():
            element_vr = vr or _dictionary_vr(tag)
            text = _plain_text(element_vr, raw, ascii_text_is_plain)
            if text is not None:
                values[tag] = text
                continue
            before = len(caught)
            element = RawDataElement(Tag(tag), element_vr, len(raw), raw, 0, vr is None, True)
            try:
                values[tag] = convert_value(element_vr, element, encodings)
            except (ValueError, NotImplementedError) as exc:
                raise HeaderFallback(f"element {tag:08X}: {exc}") from exc
            new = caught[before:]
            if any(is_charset_warning(w.message) for w in new) or (
                charset_warned and element_vr in _CHARSET_VRS
            ):
                unclean.append(tag)
    return values, unclean


def is_charset_warning(message: Warning | str) -> bool:
    """True for pydicom's warnings about character sets and decoding (not about lengths)."""
    text = str(message)
    return "encod" in text or "decode" in text or "Character Set" in text


_CHARSET_VRS: Final = frozenset({"PN", "SH", "LO", "UC", "ST", "LT", "UT"})
_STRIP_EACH: Final = frozenset({"AE", "DS", "IS"})
"""VRs whose values pydicom strips on both sides, value by value."""
_RSTRIP_EACH: Final = frozenset({"SH", "LO", "UC"})
_RSTRIP_ALL: Final = frozenset({"AS", "CS", "DA", "DT", "TM", "UI", "PN", "ST", "LT", "UT"})


def _plain_text(vr: str, raw: bytes, ascii_text_is_plain: bool) -> str | None:
    """The value as pydicom would print it, for plain ASCII values; None for the others."""
    if not raw.isascii() or b"\x1b" in raw:
        return None
    if vr in _CHARSET_VRS and not ascii_text_is_plain:
        return None
    text = raw.decode("ascii")
    if vr in _RSTRIP_ALL:
        return text.rstrip(" \x00")
    if vr in _STRIP_EACH:
        return "\\".join(part.strip() for part in text.split("\\"))
    if vr in _RSTRIP_EACH:
        return "\\".join(part.rstrip(" \x00") for part in text.split("\\"))
    return None


def _dictionary_vr(tag: int) -> str:
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 and 0x0010 <= element <= 0x00FF:
        return "LO"  # a private creator (PS3.5 §7.8.1)
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    # Ambiguous VRs ("US or SS", "OB or OW") only occur on binary elements; read them as bytes.
    return "UN" if " or " in vr else vr
