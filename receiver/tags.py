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
from collections.abc import Iterable, Mapping
from typing import Any, Final

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

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


def extract_tags(
    ds: Dataset,
    file_meta: FileMetaDataset | None,
    additional: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The side-car content of one instance."""
    tags: dict[str, str] = {}
    charset_errors: list[str] = []
    wanted = [tag for tag in map(resolve_tag, MERCURE_TAGS) if tag is not None]
    for name in additional:
        tag = resolve_tag(name)
        if tag is None:
            logger.warning("additional tag %r is neither a keyword nor gggg,eeee; ignored", name)
        else:
            wanted.append(tag)
    for tag in wanted:
        value, clean = _element_text(ds, tag)
        if value is not None:
            tags[tag_key(tag)] = value
            if not clean:
                charset_errors.append(tag_key(tag))
    if file_meta is not None and "MediaStorageSOPClassUID" in file_meta:
        tags["MediaStorageSOPClassUID"] = str(file_meta.MediaStorageSOPClassUID)
    if charset_errors:
        tags[CHARSET_ERRORS_KEY] = "\\".join(charset_errors)
    if extra:
        tags.update(extra)
    return tags


def _element_text(ds: Dataset, tag: BaseTag) -> tuple[str | None, bool]:
    """(text, decoded cleanly) of the element ``tag`` of ``ds``; (None, True) when absent."""
    if tag not in ds:
        return None, True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            element = ds[tag]
            value = element.value
        except (ValueError, LookupError, TypeError) as exc:
            logger.warning("tag %s cannot be decoded (%s); stored raw", tag_key(tag), exc)
            raw = ds.get_item(tag)
            raw_value = getattr(raw, "value", b"")
            text = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else str(raw_value)
            return text, False
    if isinstance(value, Sequence):
        return None, True
    text = format_value(value) if value is not None else ""
    return text, not caught
