"""De-identification of one dataset: Table E.1-1 with the chosen options, applied recursively.

Works on pydicom 2.3 and 3.0 alike: it only uses ``Dataset`` item access, ``DataElement.value``
and ``Sequence``, and never touches Pixel Data (an attribute the table does not list, so it is kept
as the bytes that were read).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from caduceus_anonymizer import dates
from caduceus_anonymizer.profile import Action, Column, profile
from caduceus_anonymizer.settings import Dates, PrivateTags, Settings
from caduceus_anonymizer.uids import UidMapper

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_VRS = frozenset({"AT", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})
DUMMY_TEXT = "ANONYMIZED"
# Dummy values of action D, by VR (PS3.5 Table 6.2-1 formats).
DUMMY_BY_VR: dict[str, Any] = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "UR": "urn:anonymized",
    **{vr: DUMMY_TEXT for vr in TEXT_VRS},
    **{vr: 0 for vr in NUMBER_VRS},
    **{vr: b"\x00\x00" for vr in BINARY_VRS},
}
OVERLAY_GROUPS = range(0x6000, 0x6100)
PATIENT_IDENTITY_REMOVED = 0x00120062
# Attributes whose values identify the patient or the visit: a free-text descriptor that contains
# one of them is not clean (Clean Descriptors Option, PS3.15 E.3.5).
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "AdmissionID",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "InstitutionName",
    "InstitutionAddress",
    "StudyID",
)
MIN_TOKEN_LENGTH = 2


@dataclass
class Counts:
    """What was done, by kind, over all instances (no values, so no PHI)."""

    by_action: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str) -> None:
        self.by_action[kind] += 1


@dataclass(frozen=True)
class Patient:
    """What the de-identification of one instance needs to know about its patient."""

    pseudonym: str
    offset: datetime.timedelta
    identifiers: re.Pattern[str] | None


class Deidentifier:
    """Applies the profile to datasets; one instance per run so UID counts add up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uids = UidMapper(settings.secret)
        self.counts = Counts()
        self._chosen = chosen_columns(settings)
        self._profile = profile()

    def deidentify(self, ds: Dataset) -> None:
        """De-identify ``ds`` in place (file meta included) and mark it as de-identified."""
        patient = self._patient(ds)
        self._walk(ds, patient)
        self._mark(ds, patient)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            self._clean_meta(meta, ds)

    # ------------------------------------------------------------------------------ patient

    def _patient(self, ds: Dataset) -> Patient:
        key = _text(ds, "PatientID") or _text(ds, "PatientName")
        secret = self.settings.secret
        pseudonym = self.settings.pseudonym
        if pseudonym is None:
            digest = hmac.new(secret, b"patient\x00" + key.encode(), hashlib.sha256).hexdigest()
            pseudonym = self.settings.pseudonym_prefix + digest[:16].upper()
        offset = dates.patient_offset(secret, key, self.settings.date_shift_max_days)
        return Patient(pseudonym, offset, identifying_pattern(ds))

    # ------------------------------------------------------------------------------ the walk

    def _walk(self, ds: Dataset, patient: Patient) -> None:
        creators = _private_creators(ds)
        for tag in list(ds.keys()):
            group, element = tag >> 16, tag & 0xFFFF
            if group % 2:
                self._private(ds, tag, creators, patient)
            elif element == 0 or group == 0 or group in OVERLAY_GROUPS:
                # group lengths are recomputed by nobody and would be wrong; command elements and
                # overlays (PS3.15 E.1-1: Overlay Data and Comments X) go whole
                del ds[tag]
                self.counts.add("removed")
            else:
                self._public(ds, tag, patient)

    def _private(self, ds: Dataset, tag: int, creators: dict[int, str], patient: Patient) -> None:
        group, element = tag >> 16, tag & 0xFFFF
        keep = False
        if self.settings.private_tags is PrivateTags.KEEP_SAFE:
            if 0x10 <= element <= 0xFF:  # a private creator: kept if one of its elements is
                keep = any(s.group == group and s.creator == creators.get(tag) for s in self._safe)
            elif element >= 0x1000:
                creator = creators.get((group << 16) | (element >> 8))
                keep = any(
                    (s.group, s.creator, s.offset) == (group, creator, element & 0xFF)
                    for s in self._safe
                )
        if not keep:
            del ds[tag]
            self.counts.add("private_removed")
            return
        self.counts.add("private_kept")
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                self._walk(item, patient)

    @property
    def _safe(self) -> tuple[Any, ...]:
        return self.settings.safe_private

    def _public(self, ds: Dataset, tag: int, patient: Patient) -> None:
        rule = self._profile.rule(tag)
        if rule is None:
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item, patient)
            return
        action, column = rule.action(self._chosen)
        elem = ds[tag]
        if action is Action.REMOVE_OR_EMPTY_OR_UID:
            vr = elem.VR
            action = {"UI": Action.UID, "SQ": Action.KEEP}.get(vr, Action.EMPTY)
        self._apply(ds, elem, action, column, patient)

    def _apply(
        self,
        ds: Dataset,
        elem: DataElement,
        action: Action,
        column: Column | None,
        patient: Patient,
    ) -> None:
        if action is Action.REMOVE:
            del ds[elem.tag]
        elif action is Action.KEEP or (action is Action.CLEAN and elem.VR == "SQ"):
            self._recurse(elem, patient)
        elif action is Action.EMPTY:
            _set(elem, Sequence() if elem.VR == "SQ" else _empty(elem.VR))
        elif action is Action.DUMMY:
            self._dummy(elem, patient)
        elif action is Action.UID:
            self._uid(ds, elem)
        elif column is Column.RETAIN_LONG_MODIFIED_DATES:
            self._shift(ds, elem, patient)
        else:
            self._clean(ds, elem, patient)
        self.counts.add(f"{action.value}:{column.value}" if column else action.value)

    def _recurse(self, elem: DataElement, patient: Patient) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                self._walk(item, patient)

    def _dummy(self, elem: DataElement, patient: Patient) -> None:
        if elem.VR == "SQ":  # a dummy sequence: the items, de-identified
            self._recurse(elem, patient)
        elif elem.VR == "UI":
            elem.value = _map_values(elem.value, self.uids)
        else:
            _set(elem, DUMMY_BY_VR.get(elem.VR, DUMMY_TEXT))

    def _uid(self, ds: Dataset, elem: DataElement) -> None:
        if elem.VR != "UI" or not isinstance(elem.value, str | MultiValue | list):
            del ds[elem.tag]  # a UID that cannot be read as one cannot be mapped
            return
        elem.value = _map_values(elem.value, self.uids)

    def _shift(self, ds: Dataset, elem: DataElement, patient: Patient) -> None:
        shift = {"DA": dates.shift_da, "DT": dates.shift_dt}.get(elem.VR)
        if shift is None and elem.VR not in ("TM", "SH"):
            # a binary timestamp (Certified Timestamp, Frame Origin Timestamp) cannot be moved
            del ds[elem.tag]
            self.counts.add("unshiftable_removed")
            return
        if shift is None or elem.value in (None, ""):
            return  # TM, the UTC offset (SH) and empty values stay: the offset is whole days
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        moved = [shift(str(value), patient.offset) for value in values]
        if any(value is None for value in moved):
            del ds[elem.tag]  # not a date that can be moved, so not one that can be kept
            self.counts.add("unshiftable_removed")
            return
        elem.value = moved if len(moved) > 1 else moved[0]

    def _clean(self, ds: Dataset, elem: DataElement, patient: Patient) -> None:
        """Keep a descriptor only when no identifying value of the dataset occurs in it."""
        if elem.VR not in TEXT_VRS or patient.identifiers is None:
            return
        if elem.value is not None and patient.identifiers.search(str(elem.value)):
            del ds[elem.tag]
            self.counts.add("clean_removed")

    # ------------------------------------------------------------------------------ marks

    def _mark(self, ds: Dataset, patient: Patient) -> None:
        """PS3.15 E.1.1 and the Patient and Clinical Trial Subject modules (PS3.3 C.7.1)."""
        ds.PatientName = patient.pseudonym
        ds.PatientID = patient.pseudonym
        project = self.settings.project_name
        if project is not None:
            ds.ClinicalTrialSponsorName = project
            ds.ClinicalTrialProtocolID = project
            ds.ClinicalTrialProtocolName = project
            ds.ClinicalTrialSiteID = ""
            ds.ClinicalTrialSiteName = ""
            ds.ClinicalTrialSubjectID = patient.pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = {
            Dates.REMOVE: "REMOVED",
            Dates.KEEP: "UNMODIFIED",
            Dates.SHIFT: "MODIFIED",
        }[self.settings.dates]
        codes = method_codes(self.settings)
        ds.DeidentificationMethod = [meaning for _, meaning in codes]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)

    def _clean_meta(self, meta: Dataset, ds: Dataset) -> None:
        """The file meta follows the dataset; application entity titles go (PS3.10 7.1)."""
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword in (
            "SourceApplicationEntityTitle",
            "SendingApplicationEntityTitle",
            "ReceivingApplicationEntityTitle",
            "SourcePresentationAddress",
            "SendingPresentationAddress",
            "ReceivingPresentationAddress",
            "PrivateInformationCreatorUID",
            "PrivateInformation",
        ):
            if keyword in meta:
                delattr(meta, keyword)


# ---------------------------------------------------------------------------- helpers

# (code value, code meaning) of CID 7050 "De-identification Method" (PS3.16)
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")


def method_codes(settings: Settings) -> list[tuple[str, str]]:
    """The CID 7050 codes for the profile and each option in effect."""
    codes = [BASIC_PROFILE_CODE]
    if settings.clean_descriptors:
        codes.append(("113105", "Clean Descriptors Option"))
    if settings.dates is Dates.KEEP:
        codes.append(("113106", "Retain Longitudinal Temporal Information Full Dates Option"))
    if settings.dates is Dates.SHIFT:
        codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
    if settings.retain_patient_characteristics:
        codes.append(("113108", "Retain Patient Characteristics Option"))
    if settings.retain_device_identity:
        codes.append(("113109", "Retain Device Identity Option"))
    if settings.retain_uids:
        codes.append(("113110", "Retain UIDs Option"))
    if settings.private_tags is PrivateTags.KEEP_SAFE:
        codes.append(("113111", "Retain Safe Private Option"))
    if settings.retain_institution_identity:
        codes.append(("113112", "Retain Institution Identity Option"))
    return codes


def chosen_columns(settings: Settings) -> frozenset[Column]:
    """The option columns of Table E.1-1 that ``settings`` choose."""
    flags = {
        Column.RETAIN_UIDS: settings.retain_uids,
        Column.RETAIN_DEVICE_IDENTITY: settings.retain_device_identity,
        Column.RETAIN_INSTITUTION_IDENTITY: settings.retain_institution_identity,
        Column.RETAIN_PATIENT_CHARACTERISTICS: settings.retain_patient_characteristics,
        Column.RETAIN_LONG_FULL_DATES: settings.dates is Dates.KEEP,
        Column.RETAIN_LONG_MODIFIED_DATES: settings.dates is Dates.SHIFT,
        Column.CLEAN_DESCRIPTORS: settings.clean_descriptors,
    }
    return frozenset(column for column, chosen in flags.items() if chosen)


def identifying_pattern(ds: Dataset) -> re.Pattern[str] | None:
    """A case-insensitive pattern of the identifying values in ``ds`` (whole words only)."""
    tokens: set[str] = set()
    for keyword in IDENTIFYING_KEYWORDS:
        elem = _element(ds, keyword)
        if elem is None or elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        for value in values:
            text = str(value)
            if elem.VR == "PN":
                tokens.update(re.split(r"[\^=\s,]+", text))
            elif elem.VR == "DA":
                tokens.update(_date_spellings(text))
            tokens.add(text.strip())
    words = sorted((t for t in tokens if len(t) >= MIN_TOKEN_LENGTH), key=len, reverse=True)
    if not words:
        return None
    alternatives = "|".join(re.escape(word) for word in words)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _date_spellings(value: str) -> list[str]:
    if len(value) != 8 or not value.isdigit():
        return []
    y, m, d = value[:4], value[4:6], value[6:]
    return [value, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"]


def _private_creators(ds: Dataset) -> dict[int, str]:
    creators = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements, not tags
        if (tag >> 16) % 2 and 0x10 <= (tag & 0xFFFF) <= 0xFF:
            value = ds[tag].value
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            creators[int(tag)] = str(value or "").strip()
    return creators


def _element(ds: Dataset, keyword: str) -> DataElement | None:
    return ds.data_element(keyword) if keyword in ds else None


def _text(ds: Dataset, keyword: str) -> str:
    elem = _element(ds, keyword)
    return "" if elem is None or elem.value is None else str(elem.value).strip()


def _empty(vr: str) -> Any:
    if vr in BINARY_VRS:
        return b""
    if vr in NUMBER_VRS:
        return None
    return ""


def _set(elem: DataElement, value: Any) -> None:
    elem.value = value


def _map_values(value: Any, mapper: UidMapper) -> Any:
    if isinstance(value, MultiValue | list):
        return [mapper(str(v)) for v in value]
    return mapper(str(value)) if value else value
