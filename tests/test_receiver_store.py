"""The receiver stores what DCMTK and pynetdicom send, byte for byte, under the spool contract."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests import dicom_factory
from tests.dicom_factory import Instance
from tests.helpers import (
    SUCCESS,
    ReceiverFactory,
    assert_only_complete_pairs,
    assert_stored_as_sent,
    associate,
    contexts_for,
    echoscu,
    pynetdicom_store,
    read_tags,
    stored_paths,
    storescu,
    storescu_profile,
    temp_files,
)


@pytest.mark.dcmtk
def test_echoscu_gets_a_successful_c_echo(receiver: ReceiverFactory) -> None:
    rx = receiver()

    done = echoscu(rx.port, calling="ANY-AE", called="WHATEVER")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Received Echo Response (Success)" in done.stdout + done.stderr


@pytest.mark.dcmtk
def test_ct_series_from_storescu_scan_dir_lands_byte_for_byte(
    receiver: ReceiverFactory, ct_series: list[Instance]
) -> None:
    rx = receiver()
    folder = ct_series[0].path.parent

    run = storescu(rx.port, [folder], args=["+sd"])

    assert run.returncode == 0, run.output
    assert sorted(run.stored) == sorted(i.path for i in ct_series)
    for instance in ct_series:
        assert_stored_as_sent(rx.incoming, instance)
    assert len(assert_only_complete_pairs(rx.incoming)) == len(ct_series)
    assert temp_files(rx.incoming) == []


def test_ct_series_from_pynetdicom_lands_byte_for_byte(
    receiver: ReceiverFactory, ct_series: list[Instance]
) -> None:
    rx = receiver()
    datasets = [pydicom.dcmread(i.path) for i in ct_series]

    statuses = pynetdicom_store(rx.port, datasets, contexts=contexts_for(ct_series))

    assert statuses == [SUCCESS] * len(ct_series)
    for instance in ct_series:
        assert_stored_as_sent(rx.incoming, instance)
    assert len(assert_only_complete_pairs(rx.incoming)) == len(ct_series)


def test_explicit_vr_is_preferred_and_recorded_in_the_meta_header(
    receiver: ReceiverFactory, ct_series: list[Instance]
) -> None:
    rx = receiver()
    proposed = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    sent = ct_series[0]

    with associate(rx.port, [(sent.sop_class_uid, proposed)]) as assoc:
        assert assoc.is_established
        accepted = assoc.accepted_contexts[0].transfer_syntax[0]
        status = assoc.send_c_store(pydicom.dcmread(sent.path))

    assert accepted == ExplicitVRLittleEndian
    assert status.Status == SUCCESS
    assert_stored_as_sent(rx.incoming, sent, transfer_syntax=accepted)


def test_implicit_vr_only_sender_is_stored_with_implicit_vr_meta(
    receiver: ReceiverFactory, ct_series: list[Instance]
) -> None:
    rx = receiver()
    sent = ct_series[1]

    statuses = pynetdicom_store(
        rx.port,
        [pydicom.dcmread(sent.path)],
        contexts=[(sent.sop_class_uid, [ImplicitVRLittleEndian])],
    )

    assert statuses == [SUCCESS]
    stored = assert_stored_as_sent(rx.incoming, sent, transfer_syntax=ImplicitVRLittleEndian)
    assert stored.original_encoding == (True, True)


@pytest.mark.dcmtk
def test_multiframe_object_lands_byte_for_byte(
    receiver: ReceiverFactory, multiframe: Instance
) -> None:
    rx = receiver()

    run = storescu(rx.port, [multiframe.path])

    assert run.returncode == 0, run.output
    assert run.stored == [multiframe.path]
    stored = assert_stored_as_sent(rx.incoming, multiframe)
    assert stored.NumberOfFrames == 8


@pytest.mark.dcmtk
def test_unknown_private_sop_class_is_accepted_and_stored(
    receiver: ReceiverFactory, tmp_path: Path
) -> None:
    rx = receiver()
    private = dicom_factory.private_sop_class(tmp_path / "private")
    profile = storescu_profile(tmp_path, [(private.sop_class_uid, [private.transfer_syntax])])

    run = storescu(rx.port, [private.path], args=profile)

    assert run.returncode == 0, run.output
    assert run.stored == [private.path]
    stored = assert_stored_as_sent(rx.incoming, private)
    assert stored.file_meta.MediaStorageSOPClassUID == dicom_factory.PRIVATE_SOP_CLASS


@pytest.mark.dcmtk
def test_instances_of_several_series_in_one_association_go_to_their_folders(
    receiver: ReceiverFactory, ct_series: list[Instance], multiframe: Instance
) -> None:
    rx = receiver()
    sent = [*ct_series[:3], multiframe]

    run = storescu(rx.port, [i.path for i in sent])

    assert run.returncode == 0, run.output
    for instance in sent:
        assert_stored_as_sent(rx.incoming, instance)
    folders = sorted(p.name for p in rx.incoming.iterdir() if not p.name.startswith("."))
    assert folders == sorted({ct_series[0].series_uid, multiframe.series_uid})


def test_without_fsync_the_series_lands_all_the_same(
    receiver: ReceiverFactory, ct_series: list[Instance]
) -> None:
    rx = receiver(fsync=False)

    statuses = pynetdicom_store(rx.port, [i.path for i in ct_series[:4]], contexts=_ct(ct_series))

    assert statuses == [SUCCESS] * 4
    for instance in ct_series[:4]:
        assert_stored_as_sent(rx.incoming, instance)


def test_configured_additional_tags_are_in_the_side_car(
    receiver: ReceiverFactory, ct_series: list[Instance]
) -> None:
    rx = receiver(additional_tags={"StudyTime": "", "PixelSpacing": "", "RescaleIntercept": ""})
    sent = ct_series[2]

    statuses = pynetdicom_store(rx.port, [sent.path], contexts=_ct(ct_series))

    assert statuses == [SUCCESS]
    tags = read_tags(stored_paths(rx.incoming, sent)[1])
    assert tags["StudyTime"] == "101500"
    assert tags["PixelSpacing"] == "0.9765625\\0.9765625"
    assert tags["RescaleIntercept"] == "-1024"


def _ct(series: list[Instance]) -> list[tuple[str, list[str]]]:
    return contexts_for(series[:1])
