"""Builders of test DICOM files: real, valid objects plus deliberately broken ones.

Everything is deterministic: pixel data comes from a seeded PRNG and UIDs are derived from a seed
string, so a failing test can be rerun on identical bytes. Valid objects are written in DICOM File
Format with explicit lengths and no group lengths, so that a peer re-encoding them (DCMTK storescu
parses and re-writes what it sends) produces the same bytes.

Compressed copies are made with DCMTK's own encoders (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``,
``dcmconv +td``); the caller checks the tools are there (``helpers.require_tool``).
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_GRAYSCALE_WORD_SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.3")
PRIVATE_SOP_CLASS = UID("1.2.826.0.1.3680043.9.9999.1")
"""A storage SOP class no dictionary knows (the receiver must accept it, like storescp -pm)."""

UID_ROOT = "1.2.826.0.1.3680043.8.498."
"""pydicom's registered root; every generated UID hangs below it."""

# Tags of mercure's getdcmtags list that a receiver must put into the ``.tags`` side-car when
# they are present in the dataset (mercure getdcmtags/tags_list.h).
MERCURE_TAGS = (
    "SpecificCharacterSet",
    "Modality",
    "BodyPartExamined",
    "ProtocolName",
    "StationAETitle",
    "Manufacturer",
    "ManufacturerModelName",
    "StudyDescription",
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
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "MagneticFieldStrength",
    "StationName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "ContrastBolusAgent",
    "ImageComments",
    "SliceThickness",
    "InstanceNumber",
    "AcquisitionNumber",
    "InstitutionName",
    "ImageType",
)


@dataclass(frozen=True)
class Instance:
    """What a test needs to know about one file it sends."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str


def uid(*seed: object) -> UID:
    """A valid UID derived deterministically from ``seed``."""
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[repr(part) for part in seed])


def describe(path: Path) -> Instance:
    """Read back the identifying UIDs of a file written by this module."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Instance(
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
    )


# ---------------------------------------------------------------------------- valid objects


def base_dataset(
    seed: str,
    *,
    sop_class: str = CT_IMAGE_STORAGE,
    modality: str = "CT",
    instance_number: int = 1,
    series_uid: str | None = None,
) -> Dataset:
    """Patient/study/series/equipment attributes covering most of mercure's tag list."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(seed, "instance", instance_number)
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.AcquisitionDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101530.250"
    ds.AcquisitionTime = "101531"
    ds.AccessionNumber = f"ACC{zlib.crc32(seed.encode()) % 10**8:08d}"
    ds.Modality = modality
    ds.Manufacturer = "Caduceus Test Factory"
    ds.InstitutionName = "St. Elsewhere"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StationName = "CT01"
    ds.StudyDescription = "Chest with contrast"
    ds.SeriesDescription = f"Axial 1.25mm {seed}"
    ds.ManufacturerModelName = "Factory 3000"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "CHEST"
    ds.ContrastBolusAgent = "Iodine"
    ds.SliceThickness = "1.25"
    ds.DeviceSerialNumber = "SN-12345"
    ds.SoftwareVersions = ["1.0", "2.1"]
    ds.ProtocolName = "Chest routine"
    ds.StudyInstanceUID = uid(seed, "study")
    ds.SeriesInstanceUID = series_uid or uid(seed, "series")
    ds.StudyID = "S1"
    ds.SeriesNumber = "3"
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = str(instance_number)
    ds.ImageComments = "made by tests/dicom_factory.py"
    return ds


def set_pixels(
    ds: Dataset,
    rng: random.Random,
    *,
    rows: int,
    columns: int,
    bits: int,
    frames: int = 1,
    signed: bool = False,
) -> None:
    """Grayscale pixel data of seeded random values, ``bits`` bits allocated and stored."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = str(frames)
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = rng.randbytes(rows * columns * (bits // 8) * frames)
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"


def write(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` in DICOM File Format (preamble, meta header) under ``path``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(
    folder: Path,
    slices: int,
    *,
    seed: str = "ct",
    rows: int = 512,
    columns: int = 512,
) -> list[Instance]:
    """A CT series of ``slices`` 16-bit signed images, Explicit VR Little Endian."""
    rng = random.Random(seed)
    series: list[Instance] = []
    for number in range(1, slices + 1):
        ds = base_dataset(seed, instance_number=number)
        ds.ImagePositionPatient = [-250, -250, -1.25 * number]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = str(-1.25 * number)
        ds.PixelSpacing = ["0.9765625", "0.9765625"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        set_pixels(ds, rng, rows=rows, columns=columns, bits=16, signed=True)
        series.append(describe(write(ds, folder / f"ct{number:04d}.dcm")))
    return series


def multiframe(
    folder: Path,
    *,
    seed: str = "multiframe",
    frames: int = 8,
    rows: int = 256,
    columns: int = 256,
) -> Instance:
    """A Multi-frame Grayscale Word Secondary Capture image with ``frames`` 16-bit frames."""
    ds = base_dataset(seed, sop_class=MULTIFRAME_GRAYSCALE_WORD_SC_STORAGE, modality="OT")
    ds.ConversionType = "WSD"
    ds.FrameTime = "100"
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    set_pixels(ds, random.Random(seed), rows=rows, columns=columns, bits=16, frames=frames)
    return describe(write(ds, folder / f"{seed}.dcm"))


def secondary_capture_8bit(folder: Path, *, seed: str = "sc8") -> Instance:
    """An 8-bit Secondary Capture image: the input JPEG baseline needs."""
    ds = base_dataset(seed, sop_class=SECONDARY_CAPTURE_STORAGE, modality="OT")
    ds.ConversionType = "WSD"
    set_pixels(ds, random.Random(seed), rows=128, columns=128, bits=8)
    return describe(write(ds, folder / f"{seed}.dcm"))


def private_sop_class(folder: Path, *, seed: str = "private") -> Instance:
    """An instance of a storage SOP class no dictionary knows."""
    ds = base_dataset(seed, sop_class=PRIVATE_SOP_CLASS, modality="OT")
    ds.add_new(0x00991000, "LO", "CADUCEUS TEST")
    ds.add_new(0x00991010, "OB", random.Random(seed).randbytes(4096))
    return describe(write(ds, folder / f"{seed}.dcm"))


# ---------------------------------------------------------------------------- compression

# transfer syntax -> (DCMTK command, the source it needs: "ct16" or "sc8")
DCMTK_ENCODERS: dict[str, tuple[list[str], str]] = {
    JPEGBaseline8Bit: (["dcmcjpeg", "+eb"], "sc8"),
    JPEGLosslessSV1: (["dcmcjpeg", "+e1"], "ct16"),
    JPEGLossless: (["dcmcjpeg", "+el"], "ct16"),
    JPEGLSLossless: (["dcmcjpls", "+el"], "ct16"),
    RLELossless: (["dcmcrle"], "ct16"),
    DeflatedExplicitVRLittleEndian: (["dcmconv", "+td"], "ct16"),
}


def compressed_copy(source: Instance, transfer_syntax: str, folder: Path) -> Instance:
    """Compress ``source`` into ``transfer_syntax`` with DCMTK; the SOP Instance UID is kept."""
    command, _ = DCMTK_ENCODERS[transfer_syntax]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.path.stem}-{transfer_syntax}.dcm"
    subprocess.run([*command, str(source.path), str(target)], check=True, capture_output=True)
    made = describe(target)
    if made.transfer_syntax != transfer_syntax:
        raise RuntimeError(f"{command} wrote {made.transfer_syntax}, not {transfer_syntax}")
    return made


def j2k_encoder_available() -> bool:
    """True when pydicom can encode JPEG 2000 here (it needs pylibjpeg-openjpeg)."""
    from pydicom.pixels import get_encoder  # noqa: PLC0415 - optional machinery

    return bool(get_encoder(JPEG2000Lossless).is_available)


def j2k_copy(source: Instance, folder: Path) -> Instance:
    """Compress ``source`` to JPEG 2000 lossless with pydicom (needs pylibjpeg-openjpeg)."""
    ds = pydicom.dcmread(source.path)
    ds.compress(JPEG2000Lossless)
    return describe(write(ds, folder / f"{source.path.stem}-j2k.dcm", JPEG2000Lossless))


# ---------------------------------------------------------------------------- character sets


@dataclass(frozen=True)
class CharsetCase:
    """A PatientName encoded in a character set, with the Unicode it must decode to."""

    name: str
    specific_character_set: list[str]
    patient_name_bytes: bytes
    patient_name: str
    description_bytes: bytes | None = None
    description: str | None = None


CHARSET_CASES = (
    # PS3.5 Annex H.3.1: Japanese, default repertoire + JIS X 0208 via ISO 2022 code extensions.
    CharsetCase(
        name="japanese-iso2022-ir87",
        specific_character_set=["", "ISO 2022 IR 87"],
        patient_name_bytes=(
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
        ),
        patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
    ),
    # PS3.5 Annex H.3.2: multi-valued, JIS X 0201 katakana in G1 + JIS X 0208.
    CharsetCase(
        name="japanese-multivalued-ir13-ir87",
        specific_character_set=["ISO 2022 IR 13", "ISO 2022 IR 87"],
        patient_name_bytes=(
            b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J="
            b"\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J"
        ),
        patient_name="ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
    ),
    # PS3.5 Annex I.2: Korean, KS X 1001 designated into G1 with ESC $ ) C.
    CharsetCase(
        name="korean-iso2022-ir149",
        specific_character_set=["", "ISO 2022 IR 149"],
        patient_name_bytes=(
            b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7="
            b"\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf"
        ),
        patient_name="Hong^Gildong=洪^吉洞=홍^길동",
    ),
    # Latin-1, single-valued.
    CharsetCase(
        name="latin1-ir100",
        specific_character_set=["ISO_IR 100"],
        patient_name_bytes="Müller^François".encode("latin-1"),
        patient_name="Müller^François",
        description_bytes="Schädel nativ".encode("latin-1"),
        description="Schädel nativ",
    ),
)


def charset_dataset(case: CharsetCase, folder: Path) -> Instance:
    """A small CT image whose PatientName (and description) are raw bytes in ``case``'s charset."""
    ds = base_dataset(case.name)
    ds.SpecificCharacterSet = case.specific_character_set
    ds["PatientName"] = DataElement(0x00100010, "PN", case.patient_name_bytes)
    ds.ReferringPhysicianName = ""
    if case.description_bytes is not None:
        ds["SeriesDescription"] = DataElement(0x0008103E, "LO", case.description_bytes)
    set_pixels(ds, random.Random(case.name), rows=16, columns=16, bits=16, signed=True)
    return describe(write(ds, folder / f"{case.name}.dcm"))


# ---------------------------------------------------------------------------- broken objects


def _file_with_body(path: Path, sop_class: str, sop_instance: str, body: bytes) -> Path:
    """A file with a valid preamble and meta header followed by ``body`` as the dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + body)
    return path


def dataset_offset(path: Path) -> int:
    """Byte offset where the dataset starts, after the file meta information."""
    with path.open("rb") as f:
        pydicom.filereader.read_preamble(f, force=False)
        pydicom.filereader._read_file_meta_info(f)
        return f.tell()


def garbage(folder: Path, *, seed: str = "garbage") -> Path:
    """A valid meta header followed by bytes that are no dataset at all (invalid VRs)."""
    rng = random.Random(seed)
    body = b"\xde\xad\xbe\xef" + bytes(rng.randrange(0x80, 0x100) for _ in range(4092))
    return _file_with_body(folder / f"{seed}.dcm", CT_IMAGE_STORAGE, uid(seed), body)


def truncated(source: Instance, folder: Path, *, keep: int, name: str) -> Path:
    """``source`` with its dataset cut after ``keep`` bytes (negative: that many from the end)."""
    raw = source.path.read_bytes()
    start = dataset_offset(source.path)
    body = raw[start:]
    cut = body[:keep]
    return _file_with_body(folder / name, source.sop_class_uid, source.sop_instance_uid, cut)


def truncated_in_element_header(source: Instance, folder: Path) -> Path:
    """``source`` cut in the middle of the PixelData element's header (after tag and VR)."""
    body = source.path.read_bytes()[dataset_offset(source.path) :]
    header = body.rindex(b"\xe0\x7f\x10\x00")
    return truncated(source, folder, keep=header + 6, name="cut-in-header.dcm")


def length_past_end(folder: Path, *, seed: str = "overrun") -> Path:
    """A dataset whose StudyDescription (before the UIDs) claims more bytes than follow."""
    ds = base_dataset(seed)
    ds.StudyDescription = "OVERRUN!"
    set_pixels(ds, random.Random(seed), rows=16, columns=16, bits=16)
    written = write(ds, folder / f"{seed}-source.dcm")
    raw = bytearray(written.read_bytes())
    element = raw.index(b"\x08\x00\x30\x10LO\x08\x00OVERRUN!")
    raw[element + 6 : element + 8] = (0xFFF0).to_bytes(2, "little")
    start = dataset_offset(written)
    written.unlink()
    return _file_with_body(
        folder / f"{seed}.dcm", CT_IMAGE_STORAGE, str(ds.SOPInstanceUID), bytes(raw[start:])
    )


@contextlib.contextmanager
def unvalidated() -> Iterator[None]:
    """Let pydicom write values that break the standard (for hostile input)."""
    settings = pydicom_config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = pydicom_config.IGNORE
    settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


HOSTILE_UIDS = {
    "dotdot": "../../etc",
    "dotdot-after-digits": "1.2.3/../../x",
    "slash": "1.2.3/4",
    "nul": "1.2.3\x00.4",
    "backslash-dotdot": "..\\..\\x",
    "too-long": "1." + "2" * 198,
}
"""UIDs that are invalid (PS3.5 9.1) and, used as a path, would escape or break the spool."""


def hostile(folder: Path, name: str, *, series_uid: str | None, sop_uid: str | None) -> Path:
    """A small valid-looking CT image whose Series and/or SOP Instance UID is hostile."""
    seed = f"hostile-{name}-{series_uid is not None}-{sop_uid is not None}"
    ds = base_dataset(seed)
    set_pixels(ds, random.Random(seed), rows=16, columns=16, bits=16)
    with unvalidated():
        if series_uid is not None:
            ds["SeriesInstanceUID"] = DataElement(0x0020000E, "UI", series_uid)
        if sop_uid is not None:
            ds["SOPInstanceUID"] = DataElement(0x00080018, "UI", sop_uid)
        body = DicomBytesIO()
        body.is_little_endian = True
        body.is_implicit_VR = False
        pydicom.filewriter.write_dataset(body, ds)
        return _file_with_body(
            folder / f"{seed}.dcm", CT_IMAGE_STORAGE, str(ds.SOPInstanceUID), body.getvalue()
        )
