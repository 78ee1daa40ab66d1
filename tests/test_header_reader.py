"""The fast side-car reader must give exactly what pydicom gives, or step aside."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from common.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from receiver import header
from receiver.storage import encode_file_meta
from receiver.tags import TagSelection, build_tags, dataset_reader, decoded_reader

SELECTION = TagSelection.build(["Rows", "0028,0030", "ImageType", "(0009,0010)"])


def _encode(ds: Dataset, implicit: bool) -> bytes:
    """The data set bytes (without meta) as a sender would transmit them."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _fast_tags(body: bytes, implicit: bool, prefix: int = 1 << 16) -> dict[str, str]:
    found = header.scan(
        body[:prefix],
        SELECTION.numbers | {header.SPECIFIC_CHARACTER_SET},
        implicit=implicit,
        complete=len(body) <= prefix,
    )
    values, unclean = header.decode(found)
    return build_tags(decoded_reader(values, unclean), SELECTION, {})


def _pydicom_tags(body: bytes, implicit: bool) -> dict[str, str]:
    ds = read_dataset(io.BytesIO(body), implicit, True, stop_when=_at_pixel_data)
    return build_tags(dataset_reader(ds), SELECTION, {})


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= 0x7FE00010


def _rich_dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "Müller^François"
    ds.PatientID = "ID 42"
    ds.StudyDescription = "Kopf nativ  "
    ds.SliceThickness = " 1.50"
    ds.InstanceNumber = "7 "
    ds.StationAETitle = " CT1 "
    ds.SequenceVariant = ["SK ", "SP"]
    ds.InstitutionName = "Klinik  "
    ds.ImageComments = "two words \\ and more "
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodeMeaning = "Brain"
    nested = Dataset()
    nested.ReferencedSOPInstanceUID = generate_uid()
    item.ReferencedImageSequence = Sequence([nested])
    ds.AnatomicRegionSequence = Sequence([item, item])
    ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00091001, "OB", b"\x01\x02\x03\x04")
    ds.BitsAllocated = 16
    ds.Rows = 4
    ds.Columns = 4
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.PixelData = b"\x00\x01" * 16
    return ds


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_fast_reader_matches_pydicom_with_nested_sequences(implicit: bool) -> None:
    body = _encode(_rich_dataset(), implicit)
    assert _fast_tags(body, implicit) == _pydicom_tags(body, implicit)
    assert _fast_tags(body, implicit)["PatientName"] == "Müller^François"
    assert _fast_tags(body, implicit)["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"


def test_fast_reader_skips_undefined_length_sequences() -> None:
    ds = _rich_dataset()
    ds["AnatomicRegionSequence"].is_undefined_length = True
    for item in ds.AnatomicRegionSequence:
        item.is_undefined_length_sequence_item = True
    body = _encode(ds, False)
    assert b"\xfe\xff\xdd\xe0" in body  # a sequence delimitation item really is there
    assert _fast_tags(body, False) == _pydicom_tags(body, False)


REAL_FILES = [
    get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
] + sorted(get_charset_files("chr*.dcm"))


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: Path(str(p)).name)
def test_fast_reader_matches_pydicom_on_real_files(path: str | None) -> None:
    assert path is not None
    ds = pydicom.dcmread(path)
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    body = _encode(ds, implicit)
    assert _fast_tags(body, implicit) == _pydicom_tags(body, implicit)


def test_a_prefix_that_ends_before_the_pixel_data_falls_back() -> None:
    ds = _rich_dataset()
    ds.ImageComments = "x" * 5000
    body = _encode(ds, False)
    with pytest.raises(header.HeaderFallback):
        _fast_tags(body, False, prefix=1000)


@pytest.mark.parametrize(
    "body",
    [b"\x08\x00\x05\x00zz\x02\x00ab", b"\x08\x00\x05\x00CS\x40\x00ab", b"\x08\x00\x05\x00CS"],
    ids=["invalid-vr", "value-past-the-end", "cut-header"],
)
def test_malformed_data_sets_are_recognised(body: bytes) -> None:
    with pytest.raises(header.MalformedDataset):
        header.scan(body, frozenset({0x00080005}), implicit=False, complete=True)


def test_undecodable_text_is_kept_and_flagged() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesInstanceUID = "1.2.3"
    ds.add_new(0x00100010, "PN", b"Bad\xff\xfeName")
    body = _encode(ds, False)
    tags = _fast_tags(body, False)
    assert tags["PatientName"].startswith("Bad")
    assert tags["CharsetErrors"] == "PatientName"


@pytest.mark.parametrize("source_ae", ["STORESCU", "ODD", ""])
@pytest.mark.parametrize("sop_uid", ["1.2.3", "1.2.34"])
def test_file_meta_is_byte_identical_to_pydicom(source_ae: str, sop_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    expected = io.BytesIO()
    write_file_meta_info(expected, meta, enforce_standard=True)  # type: ignore[arg-type]
    mine = encode_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop_uid,
        transfer_syntax=ExplicitVRLittleEndian,
        source_ae=source_ae,
    )
    assert mine == expected.getvalue()


def test_file_meta_reads_back_with_pydicom(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    body = _encode(_rich_dataset(), False)
    meta = encode_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        transfer_syntax=ExplicitVRLittleEndian,
        source_ae="CT1",
    )
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta + body)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.SourceApplicationEntityTitle == "CT1"
    assert ds.PatientName == "Müller^François"


@pytest.mark.parametrize("cut", [1, 7, 1000], ids=["last-byte", "mid-header", "mid-pixel-data"])
def test_truncated_data_sets_are_malformed(cut: int) -> None:
    ds = _rich_dataset()
    ds.PixelData = b"\x01\x02" * 1000
    body = _encode(ds, False)
    with pytest.raises(header.MalformedDataset):
        header.scan(body[:-cut], SELECTION.numbers, implicit=False)


def test_a_header_beyond_the_prefix_is_read_from_the_file(tmp_path: Path) -> None:
    ds = _rich_dataset()
    # pushes the wanted elements after it out of the prefix
    ds.add_new(0x00091002, "UN", b"x" * 70_000)
    ds.PatientSex = "O"
    body = _encode(ds, False)
    path = tmp_path / "data"
    path.write_bytes(b"META" + body)
    fd = os.open(path, os.O_RDONLY)
    try:
        source = header.Source(body[:1000], len(body), fd, file_offset=4)
        found = header.scan(source, SELECTION.numbers, implicit=False)
    finally:
        os.close(fd)
    values, unclean = header.decode(found)
    tags = build_tags(decoded_reader(values, unclean), SELECTION, {})
    assert tags == _pydicom_tags(body, False)
    assert tags["PatientSex"] == "O"


def test_elements_after_the_pixel_data_are_checked_too() -> None:
    ds = _rich_dataset()
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # Data Set Trailing Padding
    body = _encode(ds, False)
    header.scan(body, SELECTION.numbers, implicit=False)
    with pytest.raises(header.MalformedDataset):
        header.scan(body[:-3], SELECTION.numbers, implicit=False)
