"""The ``.tags`` side-car: a flat JSON object of tag keyword -> string (mercure's getdcmtags).

Values are decoded with the data set's Specific Character Set, including ISO 2022 code
extensions and multi-valued character sets (PS3.5 §6.1, Annex H/I/J), into Unicode. A value that
cannot be decoded cleanly is kept best-effort (undecodable bytes replaced) and its keyword is
listed in ``CharsetErrors``, so that the image is never stranded (mercure issues 59/82).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from receiver.header import is_charset_warning

logger = logging.getLogger(__name__)

MERCURE_TAGS: Final = (
    "SpecificCharacterSet",
    "Modality",
    "BodyPartExamined",
    "ProtocolName",
    "RetrieveAETitle",
    "StationAETitle",
    "Manufacturer",
    "ManufacturerModelName",
    "StudyDescription",
    "CodeValue",
    "CodeMeaning",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "SeriesNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "SequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "MagneticFieldStrength",
    "StationName",
    "DeviceSerialNumber",
    "DeviceUID",
    "SoftwareVersions",
    "ContrastBolusAgent",
    "ImageComments",
    "SliceThickness",
    "InstanceNumber",
    "AcquisitionNumber",
    "InstitutionName",
    "AcquisitionType",
    "ImageType",
)
"""mercure's tag list (getdcmtags ``tags_list.h``) plus SOPClassUID, StudyDate and StudyTime."""

CHARSET_ERRORS_KEY: Final = "CharsetErrors"
_GROUP_ELEMENT = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$")


def resolve_tag(name: str) -> BaseTag | None:
    """A tag from a keyword or ``gggg,eeee`` / ``(gggg,eeee)``; None when unknown."""
    match = _GROUP_ELEMENT.match(name.strip())
    if match:
        return Tag(int(match.group(1), 16), int(match.group(2), 16))
    number = tag_for_keyword(name.strip())
    return Tag(number) if number is not None else None


def tag_key(tag: BaseTag) -> str:
    """The side-car key of ``tag``: its keyword, or ``(gggg,eeee)`` when it has none."""
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


def format_value(value: Any) -> str:
    """A tag value as mercure writes it: multi-values joined with a backslash."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(format_value(item) for item in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


@dataclass(frozen=True)
class TagSelection:
    """The elements a side-car holds: mercure's list plus the configured additional tags."""

    tags: tuple[BaseTag, ...]
    numbers: frozenset[int]

    @classmethod
    def build(cls, additional: Iterable[str] = ()) -> TagSelection:
        tags = [tag for tag in map(resolve_tag, MERCURE_TAGS) if tag is not None]
        for name in additional:
            tag = resolve_tag(name)
            if tag is None:
                logger.warning(
                    "additional tag %r is neither a keyword nor gggg,eeee; ignored", name
                )
            elif tag not in tags:
                tags.append(tag)
        return cls(tags=tuple(tags), numbers=frozenset(int(tag) for tag in tags))


ValueReader = Callable[[BaseTag], tuple[str | None, bool]]
"""Returns (text or None when absent, decoded cleanly) for a tag."""


def build_tags(
    read: ValueReader, selection: TagSelection, extra: Mapping[str, str]
) -> dict[str, str]:
    """The side-car content: selected values, charset problems, then ``extra`` entries."""
    tags: dict[str, str] = {}
    charset_errors: list[str] = []
    for tag in selection.tags:
        value, clean = read(tag)
        if value is not None:
            tags[tag_key(tag)] = value
            if not clean:
                charset_errors.append(tag_key(tag))
    if charset_errors:
        tags[CHARSET_ERRORS_KEY] = "\\".join(charset_errors)
    tags.update(extra)
    return tags


def dataset_reader(ds: Dataset) -> ValueReader:
    """Values from a pydicom data set (the general path)."""
    return lambda tag: _element_text(ds, tag)


def decoded_reader(values: Mapping[int, object], unclean: Iterable[int]) -> ValueReader:
    """Values decoded by :mod:`receiver.header` (the fast path)."""
    unclean_tags = frozenset(unclean)

    def read(tag: BaseTag) -> tuple[str | None, bool]:
        if int(tag) not in values:
            return None, True
        value = values[int(tag)]
        text = format_value(value) if value is not None else ""
        return text, int(tag) not in unclean_tags

    return read


def _element_text(ds: Dataset, tag: BaseTag) -> tuple[str | None, bool]:
    """(text, decoded cleanly) of the element ``tag`` of ``ds``; (None, True) when absent."""
    if tag not in ds:
        return None, True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = ds[tag].value
        except (ValueError, LookupError, TypeError) as exc:
            logger.warning("tag %s cannot be decoded (%s); stored raw", tag_key(tag), exc)
            raw_value = getattr(ds.get_item(tag), "value", b"")
            text = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else str(raw_value)
            return text, False
    if isinstance(value, Sequence):
        return None, True
    text = format_value(value) if value is not None else ""
    return text, not any(is_charset_warning(w.message) for w in caught)
