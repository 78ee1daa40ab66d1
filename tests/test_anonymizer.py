"""The anonymizer module (modules/anonymizer): PS3.15 Annex E de-identification as a mercure module.

Most tests run the module in-process through ``main()``. With ``CADUCEUS_MODULE_PYTHON`` set to
another interpreter (e.g. a venv with pydicom 2.3.1, as in the module's Debian image), every run
goes through ``python -m caduceus_anonymizer`` under that interpreter instead; the data is still
built and checked with the test venv's pydicom.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    RLELossless,
)

from tests import dicom_factory
from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "modules" / "anonymizer"
sys.path.insert(0, str(MODULE_DIR))

from caduceus_anonymizer.__main__ import main  # noqa: E402
from caduceus_anonymizer.profile import Column, profile  # noqa: E402

MODULE_PYTHON = os.environ.get("CADUCEUS_MODULE_PYTHON")
SECRET = "project-secret-for-tests-0123"
UID_2_25 = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")
PHI = (
    "Doe",
    "Jane",
    "PID-0042",
    "St. Elsewhere",
    "Referrer",
    "SN-12345",
    "19700101",
    "20240102",
    "CT01",
    "Operator",
    "Secret Clinic",
    "OTHER-ID-7",
)


# ---------------------------------------------------------------------------- test data


def rich_instance(
    folder: Path,
    seed: str,
    number: int,
    *,
    series_uid: str | None = None,
    patient: str = "PID-0042",
) -> Path:
    """A small CT image with sequences, private attributes, an overlay and a curve."""
    ds = dicom_factory.base_dataset(seed, instance_number=number, series_uid=series_uid)
    ds.PatientID = patient
    ds.StudyInstanceUID = dicom_factory.uid("study", patient)
    ds.FrameOfReferenceUID = dicom_factory.uid("for", patient)
    ds.OperatorsName = "Operator^Olga"
    ds.PatientAge = "054Y"
    ds.PatientWeight = "71.5"
    ds.InstitutionAddress = "1 Secret Clinic Road"
    ds.ImageComments = "Follow-up of Jane Doe"
    ds.StudyDescription = "Chest with contrast"
    other = Dataset()
    other.PatientID = "OTHER-ID-7"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    reference = Dataset()
    reference.ReferencedSOPClassUID = dicom_factory.CT_IMAGE_STORAGE
    reference.ReferencedSOPInstanceUID = dicom_factory.uid(seed, "instance", 1)
    ds.ReferencedImageSequence = Sequence([reference])
    request = Dataset()
    request.AccessionNumber = ds.AccessionNumber
    request.RequestingPhysician = "Referrer^Rita"
    request.StudyInstanceUID = ds.StudyInstanceUID
    ds.RequestAttributesSequence = Sequence([request])
    region = Dataset()
    region.CodeValue = "51185008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    region.OperatorsName = "Operator^Olga"  # misplaced on purpose: nested items are walked too
    region.StudyInstanceUID = ds.StudyInstanceUID
    ds.AnatomicRegionSequence = Sequence([region])
    ds.add_new(0x00090010, "LO", "CADUCEUS SAFE")
    ds.add_new(0x00091001, "LO", "safe value")
    ds.add_new(0x00091002, "LO", "Doe^Jane in a private tag")
    private_item = Dataset()
    private_item.PatientName = "Doe^Jane"
    ds.add_new(0x00091003, "SQ", Sequence([private_item]))
    ds.add_new(0x60000010, "US", 16)
    ds.add_new(0x60000011, "US", 16)
    ds.add_new(0x60003000, "OW", b"\x01\x00" * 16)
    ds.add_new(0x50000005, "US", 1)
    dicom_factory.set_pixels(ds, random.Random(seed), rows=8, columns=8, bits=16, signed=True)
    return dicom_factory.write(ds, folder / f"{seed}-{number}.dcm")


def write_task(in_dir: Path, settings: dict[str, Any] | None, *, chain: bool = False) -> None:
    step = {"module_name": "anon", "settings": settings or {}, "retain_input_images": False}
    process: Any = step
    if chain:
        other = {"module_name": "other", "settings": {"secret": "not-this-one"}}
        process = [other, {**step, "module_config": {"docker_tag": "caduceus/anonymizer:dev"}}]
    task = {"id": "t1", "info": {"action": "process", "uid": "x"}, "process": process}
    (in_dir / "task.json").write_text(json.dumps(task))


def run(
    in_dir: Path, out_dir: Path, env: dict[str, str] | None = None, *, subprocess_run: bool = False
) -> tuple[int, str]:
    """Run the module on ``in_dir``; return (exit code, stderr)."""
    environ = {"MERCURE_IN_DIR": str(in_dir), "MERCURE_OUT_DIR": str(out_dir), **(env or {})}
    if subprocess_run or MODULE_PYTHON:
        proc = subprocess.run(
            [MODULE_PYTHON or sys.executable, "-m", "caduceus_anonymizer"],
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(MODULE_DIR), **environ},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return proc.returncode, proc.stderr
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main([], environ)
    return code, stderr.getvalue()


def anonymize(tmp_path: Path, settings: dict[str, Any], *, instances: int = 2) -> list[Dataset]:
    """Make ``instances`` rich instances of one series, run the module, return the outputs."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    series = dicom_factory.uid("series", "rich")
    for number in range(1, instances + 1):
        rich_instance(in_dir, "rich", number, series_uid=series)
    write_task(in_dir, {"secret": SECRET, **settings})
    code, stderr = run(in_dir, out_dir)
    assert code == 0, stderr
    return [pydicom.dcmread(path) for path in sorted(out_dir.glob("*.dcm"))]


def all_values(ds: Dataset) -> Iterator[str]:
    """Every value of ``ds`` and its sequences, as text."""
    for elem in ds.iterall():
        if elem.VR != "SQ":
            yield str(elem.value)


def codes(ds: Dataset) -> set[str]:
    return {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}


# ---------------------------------------------------------------------------- the basic profile


def test_basic_profile_leaves_no_identifying_value_anywhere(tmp_path: Path) -> None:
    outputs = anonymize(tmp_path, {})
    assert len(outputs) == 2
    for ds in outputs:
        leaked = [v for v in all_values(ds) for phi in PHI if phi.lower() in v.lower()]
        assert leaked == []
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert codes(ds) == {"113100"}
        assert ds.StudyDate == ""
        assert ds.AccessionNumber == ""
        assert ds.InstitutionName == "ANONYMIZED"
        assert "OtherPatientIDsSequence" not in ds
        assert "ImageComments" not in ds
        assert "SeriesDescription" not in ds
        assert ds.OperatorsName == "ANONYMIZED"  # X/Z/D, resolved to D
        assert ds.Modality == "CT"  # not in Table E.1-1: kept


def test_private_attributes_overlays_and_curves_are_removed_by_default(tmp_path: Path) -> None:
    (ds, _) = anonymize(tmp_path, {})
    assert [elem.tag for elem in ds if elem.tag.group % 2] == []
    assert [elem.tag for elem in ds if elem.tag.group in (0x5000, 0x6000)] == []


def test_patient_gets_a_derived_pseudonym_stable_for_the_patient(tmp_path: Path) -> None:
    first = anonymize(tmp_path / "a", {})
    again = anonymize(tmp_path / "b", {})
    assert first[0].PatientName == first[0].PatientID == again[1].PatientID
    assert str(first[0].PatientID).startswith("ANON-")
    assert "PID-0042" not in str(first[0].PatientID)


def test_fixed_pseudonym_and_project_name_fill_the_clinical_trial_attributes(
    tmp_path: Path,
) -> None:
    (ds, _) = anonymize(tmp_path, {"pseudonym": "SUBJ-001", "project_name": "LungStudy"})
    assert ds.PatientName == "SUBJ-001"
    assert ds.PatientID == "SUBJ-001"
    assert ds.ClinicalTrialSubjectID == "SUBJ-001"
    assert ds.ClinicalTrialProtocolName == "LungStudy"
    assert ds.ClinicalTrialProtocolID == "LungStudy"
    assert ds.ClinicalTrialSponsorName == "LungStudy"


def test_nested_sequences_are_deidentified_and_references_follow_the_new_uids(
    tmp_path: Path,
) -> None:
    outputs = anonymize(tmp_path, {})
    by_number = {int(ds.InstanceNumber): ds for ds in outputs}
    first, second = by_number[1], by_number[2]
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "RequestAttributesSequence" not in second  # X
    region = second.AnatomicRegionSequence[0]  # not in Table E.1-1: kept, its items de-identified
    assert region.CodeMeaning == "Chest"
    assert region.OperatorsName == "ANONYMIZED"
    assert region.StudyInstanceUID == second.StudyInstanceUID


# ---------------------------------------------------------------------------- UIDs


def test_uids_are_consistent_across_the_series_of_a_study(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    for series in ("s1", "s2"):
        for number in (1, 2):
            rich_instance(in_dir, series, number, series_uid=dicom_factory.uid(series))
    write_task(in_dir, {"secret": SECRET})
    assert run(in_dir, out_dir)[0] == 0
    outputs = {path.name: pydicom.dcmread(path) for path in out_dir.glob("*.dcm")}
    assert len(outputs) == 4
    assert len({ds.StudyInstanceUID for ds in outputs.values()}) == 1
    assert len({ds.FrameOfReferenceUID for ds in outputs.values()}) == 1
    assert len({ds.SeriesInstanceUID for ds in outputs.values()}) == 2
    originals = {dicom_factory.uid("s1"), dicom_factory.uid("s2")}
    for name, ds in outputs.items():
        assert name == f"{ds.SeriesInstanceUID}#{ds.SOPInstanceUID}.dcm"
        assert ds.SeriesInstanceUID not in originals
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert UID_2_25.match(uid) and len(uid) <= 64
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == dicom_factory.CT_IMAGE_STORAGE


def test_same_secret_maps_the_same_uid_to_the_same_uid_in_every_run(tmp_path: Path) -> None:
    first = anonymize(tmp_path / "a", {})
    again = anonymize(tmp_path / "b", {})
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]
    assert first[0].StudyInstanceUID == again[0].StudyInstanceUID


def test_a_study_sent_later_gets_the_same_study_uid(tmp_path: Path) -> None:
    """Two runs on different series of one study: the study and frame of reference still match."""
    outputs = []
    for series in ("early", "late"):
        in_dir, out_dir = tmp_path / series / "in", tmp_path / series / "out"
        rich_instance(in_dir, series, 1)
        write_task(in_dir, {"secret": SECRET})
        assert run(in_dir, out_dir)[0] == 0
        (path,) = out_dir.glob("*.dcm")
        outputs.append(pydicom.dcmread(path))
    assert outputs[0].StudyInstanceUID == outputs[1].StudyInstanceUID
    assert outputs[0].SeriesInstanceUID != outputs[1].SeriesInstanceUID


def test_a_different_secret_gives_different_uids(tmp_path: Path) -> None:
    first = anonymize(tmp_path / "a", {})
    other = anonymize(tmp_path / "b", {"secret": "another-project-secret-456"})
    assert {ds.SOPInstanceUID for ds in first}.isdisjoint(ds.SOPInstanceUID for ds in other)
    assert first[0].PatientID != other[0].PatientID


# ---------------------------------------------------------------------------- pixel data


TRANSFER_SYNTAXES = {
    "explicit-le": (ExplicitVRLittleEndian, None),
    "implicit-le": (ImplicitVRLittleEndian, ["dcmconv", "+ti"]),
    "deflated": (DeflatedExplicitVRLittleEndian, ["dcmconv", "+td"]),
    "rle": (RLELossless, ["dcmcrle"]),
    "jpeg-lossless": (JPEGLosslessSV1, ["dcmcjpeg", "+e1"]),
}


@pytest.mark.parametrize("name", TRANSFER_SYNTAXES)
def test_pixel_data_and_transfer_syntax_are_kept_byte_for_byte(tmp_path: Path, name: str) -> None:
    transfer_syntax, command = TRANSFER_SYNTAXES[name]
    source_dir, in_dir, out_dir = tmp_path / "src", tmp_path / "in", tmp_path / "out"
    (source,) = dicom_factory.ct_series(source_dir, 1, rows=32, columns=32)
    in_dir.mkdir()
    target = in_dir / "in.dcm"
    if command is None:
        target.write_bytes(source.path.read_bytes())
    else:
        require_tool(command[0])
        subprocess.run([*command, str(source.path), str(target)], check=True, capture_output=True)
    original = pydicom.dcmread(target)
    assert original.file_meta.TransferSyntaxUID == transfer_syntax
    write_task(in_dir, {"secret": SECRET})
    code, stderr = run(in_dir, out_dir)
    assert code == 0, stderr
    (path,) = out_dir.glob("*.dcm")
    result = pydicom.dcmread(path)
    assert result.file_meta.TransferSyntaxUID == transfer_syntax
    assert result.PixelData == original.PixelData
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    assert result.SOPInstanceUID != original.SOPInstanceUID


# ---------------------------------------------------------------------------- options


# (settings, option code, attribute, value with the option, value without it)
OPTIONS = {
    "retain-device-identity": (
        {"retain_device_identity": True},
        "113109",
        "DeviceSerialNumber",
        "SN-12345",
        "ANONYMIZED",
    ),
    "retain-institution-identity": (
        {"retain_institution_identity": True},
        "113112",
        "InstitutionName",
        "St. Elsewhere",
        "ANONYMIZED",
    ),
    "retain-patient-characteristics": (
        {"retain_patient_characteristics": True},
        "113108",
        "PatientSex",
        "F",
        "",
    ),
    "retain-patient-age": (
        {"retain_patient_characteristics": True},
        "113108",
        "PatientAge",
        "054Y",
        None,
    ),
    "full-dates": ({"dates": "keep"}, "113106", "StudyDate", "20240102", ""),
    "full-dates-times": ({"dates": "keep"}, "113106", "AcquisitionTime", "101531", ""),
    "clean-descriptors-keeps-clean-text": (
        {"clean_descriptors": True},
        "113105",
        "StudyDescription",
        "Chest with contrast",
        None,
    ),
    "clean-descriptors-removes-text-naming-the-patient": (
        {"clean_descriptors": True},
        "113105",
        "ImageComments",
        None,
        None,
    ),
    "safe-private": (
        {"private_tags": "keep_safe", "safe_private": ["0009,CADUCEUS SAFE,01"]},
        "113111",
        (0x0009, 0x1001),
        "safe value",
        None,
    ),
    "safe-private-keeps-no-other": (
        {"private_tags": "keep_safe", "safe_private": ["0009,CADUCEUS SAFE,01"]},
        "113111",
        (0x0009, 0x1002),
        None,
        None,
    ),
}


def _value(ds: Dataset, attribute: str | tuple[int, int]) -> str | None:
    if attribute not in ds:
        return None
    return str(ds[attribute].value)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_each_option_retains_exactly_what_its_column_says(
    tmp_path: Path, name: str, enabled: bool
) -> None:
    settings, code, attribute, with_option, without_option = OPTIONS[name]
    (ds, _) = anonymize(tmp_path, settings if enabled else {})
    assert _value(ds, attribute) == (with_option if enabled else without_option)
    assert (code in codes(ds)) is enabled


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
def test_retain_uids_keeps_the_original_uids(tmp_path: Path, enabled: bool) -> None:
    (ds, _) = anonymize(tmp_path, {"retain_uids": enabled})
    original = dicom_factory.uid("series", "rich")
    assert (ds.SeriesInstanceUID == original) is enabled
    assert ("113110" in codes(ds)) is enabled


def test_modified_dates_shift_every_date_of_a_patient_by_one_offset(tmp_path: Path) -> None:
    outputs = anonymize(tmp_path, {"dates": "shift", "date_shift_max_days": 100})
    for ds in outputs:
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "113107" in codes(ds)
        assert ds.StudyDate == ds.SeriesDate == ds.AcquisitionDate
        assert "20231024" <= ds.StudyDate <= "20240101"
        assert ds.StudyTime == "101500"  # a whole number of days: times unchanged
    assert outputs[0].StudyDate == outputs[1].StudyDate


def test_modified_dates_differ_between_patients_and_match_across_runs(tmp_path: Path) -> None:
    shifted = {}
    for patient in ("PAT-A", "PAT-B", "PAT-A"):
        in_dir, out_dir = tmp_path / f"{patient}-{len(shifted)}" / "in", tmp_path / "o" / patient
        rich_instance(in_dir, patient, 1, patient=patient)
        write_task(in_dir, {"secret": SECRET, "dates": "shift"})
        assert run(in_dir, out_dir)[0] == 0
        (path,) = out_dir.glob("*.dcm")
        shifted.setdefault(patient, set()).add(pydicom.dcmread(path).StudyDate)
    assert len(shifted["PAT-A"]) == 1
    assert shifted["PAT-A"] != shifted["PAT-B"]


def test_every_option_together_still_removes_the_patient_identity(tmp_path: Path) -> None:
    settings = {
        "retain_uids": True,
        "retain_device_identity": True,
        "retain_institution_identity": True,
        "retain_patient_characteristics": True,
        "clean_descriptors": True,
        "dates": "shift",
        "private_tags": "keep_safe",
        "safe_private": ["0009,CADUCEUS SAFE,01"],
    }
    for ds in anonymize(tmp_path, settings):
        values = list(all_values(ds))
        for phi in ("Doe", "Jane", "PID-0042", "OTHER-ID-7", "Referrer", "19700101"):
            assert not [v for v in values if phi.lower() in v.lower()], phi


def test_profile_table_has_every_attribute_of_the_basic_profile() -> None:
    table = profile()
    assert len(table.exact) > 600
    assert table.rule(0x00100010).basic == "Z"  # Patient's Name
    assert table.rule(0x00080018).basic == "U"  # SOP Instance UID
    assert table.rule(0x50001234) is not None  # curve data (50xx,xxxx)
    assert table.rule(0x7FE00010) is None  # Pixel Data: not in the table, kept


def test_profile_table_is_the_2026d_edition() -> None:
    table = profile()
    assert len(table.exact) == 653  # 656 rows less the three repeating-group masks
    dose_model = table.rule(0x3004007F)  # Dose Calculation Model Name, new in 2026d
    assert dose_model is not None
    assert (dose_model.basic, dose_model.options) == ("X", {Column.CLEAN_DESCRIPTORS: "C"})
    referenced_patient = table.rule(0x00081120)
    assert referenced_patient is not None
    assert referenced_patient.options == {Column.RETAIN_UIDS: "K"}
    station_ae = table.rule(0x00080055)  # AE titles are cleaned, not kept, with device identity
    assert station_ae is not None
    assert station_ae.options == {Column.RETAIN_DEVICE_IDENTITY: "C"}


# ---------------------------------------------------------------------------- result.json


def test_result_json_counts_what_was_done_without_phi(tmp_path: Path) -> None:
    anonymize(tmp_path, {"project_name": "LungStudy"}, instances=3)
    text = (tmp_path / "out" / "result.json").read_text()
    result = json.loads(text)
    assert result["instances"] == 3
    assert result["series"] == 1
    assert result["studies"] == 1
    assert result["uids_replaced"] >= 5
    assert result["methods"] == ["113100 Basic Application Confidentiality Profile"]
    assert [phi for phi in PHI if phi in text] == []


# ---------------------------------------------------------------------------- settings and errors


def test_process_as_a_chain_uses_this_modules_step(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    rich_instance(in_dir, "chain", 1)
    write_task(in_dir, {"secret": SECRET, "pseudonym": "CHAINED"}, chain=True)
    code, stderr = run(in_dir, out_dir)
    assert code == 0, stderr
    (path,) = out_dir.glob("*.dcm")
    assert pydicom.dcmread(path).PatientName == "CHAINED"


def test_secret_can_come_from_an_environment_variable(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    rich_instance(in_dir, "env", 1)
    write_task(in_dir, {"secret_env": "ANON_SECRET"})
    code, stderr = run(in_dir, out_dir, {"ANON_SECRET": SECRET})
    assert code == 0, stderr
    in_process = anonymize(tmp_path / "ref", {})
    (path,) = out_dir.glob("*.dcm")
    assert pydicom.dcmread(path).StudyInstanceUID == in_process[0].StudyInstanceUID


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        ({}, {}, "no secret configured"),
        ({"secret_env": "ANON_SECRET"}, {}, "no secret configured"),
        ({"secret": "short"}, {}, "shorter than 16"),
        ({"secret": SECRET, "retain_uid": True}, {}, "unknown setting(s): retain_uid"),
        ({"secret": SECRET, "dates": "fuzzy"}, {}, "dates must be one of"),
        ({"secret": SECRET, "retain_uids": "yes"}, {}, "retain_uids must be true or false"),
    ],
    ids=["no-secret", "secret-env-unset", "short-secret", "typo", "bad-dates", "bad-bool"],
)
def test_bad_configuration_exits_2_with_the_reason_and_no_output(
    tmp_path: Path, settings: dict[str, Any], env: dict[str, str], message: str
) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    rich_instance(in_dir, "config", 1)
    write_task(in_dir, settings)
    code, stderr = run(in_dir, out_dir, env, subprocess_run=True)
    assert code == 2
    assert "configuration error" in stderr
    assert message in stderr
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_missing_task_json_is_a_configuration_error(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    rich_instance(in_dir, "notask", 1)
    code, stderr = run(in_dir, out_dir)
    assert code == 2
    assert "task.json is missing" in stderr


def test_a_non_dicom_input_fails_naming_the_file_and_leaves_no_output(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    rich_instance(in_dir, "good", 1)
    (in_dir / "zzz-report.dcm").write_text("this is a PDF report, honestly")
    write_task(in_dir, {"secret": SECRET})
    code, stderr = run(in_dir, out_dir, subprocess_run=True)
    assert code == 3
    assert "zzz-report.dcm" in stderr
    assert "not a DICOM file" in stderr
    assert list(out_dir.glob("*")) == []


def test_subprocess_and_in_process_runs_agree(tmp_path: Path) -> None:
    in_dir = tmp_path / "in"
    rich_instance(in_dir, "agree", 1)
    write_task(in_dir, {"secret": SECRET, "dates": "shift"})
    outputs = []
    for index, use_subprocess in enumerate((True, False)):
        out_dir = tmp_path / f"out{index}"
        code, stderr = run(in_dir, out_dir, subprocess_run=use_subprocess)
        assert code == 0, stderr
        (path,) = out_dir.glob("*.dcm")
        outputs.append(path)
    assert outputs[0].name == outputs[1].name
    first, second = (pydicom.dcmread(path) for path in outputs)
    assert first == second
