"""Malformed datasets and hostile UIDs get a failure status and leave nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests import dicom_factory
from tests.dicom_factory import CT_IMAGE_STORAGE, HOSTILE_UIDS, Instance
from tests.helpers import (
    CANNOT_UNDERSTAND,
    INVALID_UID,
    SUCCESS,
    ReceiverFactory,
    all_files,
    assert_nothing_stored,
    assert_stored_as_sent,
    pynetdicom_store,
)

CT_CONTEXT = [(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])]

MALFORMED: dict[str, Callable[[Instance, Path], Path]] = {
    "garbage-bytes": lambda _, folder: dicom_factory.garbage(folder),
    "truncated-mid-pixel-data": lambda ct, folder: dicom_factory.truncated(
        ct, folder, keep=-1000, name="cut-in-pixels.dcm"
    ),
    "truncated-in-element-header": dicom_factory.truncated_in_element_header,
    "element-length-past-end": lambda _, folder: dicom_factory.length_past_end(folder),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_undecodable_dataset_is_refused_with_cannot_understand_and_nothing_kept(
    receiver: ReceiverFactory, ct_series: list[Instance], tmp_path: Path, kind: str
) -> None:
    rx = receiver()
    bad = MALFORMED[kind](ct_series[0], tmp_path / "bad")
    good = ct_series[1]

    statuses = pynetdicom_store(rx.port, [bad], contexts=CT_CONTEXT, raw=True)
    assert statuses == [CANNOT_UNDERSTAND]
    assert_nothing_stored(rx.incoming)

    # A refusal must not break the association: a good instance after it is stored.
    statuses = pynetdicom_store(rx.port, [bad, good.path], contexts=CT_CONTEXT, raw=True)
    assert statuses == [CANNOT_UNDERSTAND, SUCCESS]
    assert_stored_as_sent(rx.incoming, good)
    assert [p.name for p in all_files(rx.incoming)] == sorted(
        [
            f"{good.series_uid}#{good.sop_instance_uid}.dcm",
            f"{good.series_uid}#{good.sop_instance_uid}.tags",
        ]
    )


HOSTILE_CASES = [
    pytest.param(value, None, id=f"series-{name}") for name, value in HOSTILE_UIDS.items()
] + [
    # pynetdicom (as any SCU) refuses to put a UID over 64 characters into the C-STORE request.
    pytest.param(None, value, id=f"sop-instance-{name}")
    for name, value in HOSTILE_UIDS.items()
    if len(value) <= 64
]


@pytest.mark.parametrize(("series_uid", "sop_uid"), HOSTILE_CASES)
def test_hostile_uid_is_refused_and_nothing_is_written_anywhere(
    receiver: ReceiverFactory, tmp_path: Path, series_uid: str | None, sop_uid: str | None
) -> None:
    rx = receiver()
    bad = dicom_factory.hostile(tmp_path / "sent", "case", series_uid=series_uid, sop_uid=sop_uid)
    before = _tree(tmp_path), sorted(p.name for p in tmp_path.parent.iterdir())

    with dicom_factory.unvalidated():  # pydicom would warn about the UID while sending it
        statuses = pynetdicom_store(rx.port, [bad], contexts=CT_CONTEXT, raw=True)

    assert statuses == [INVALID_UID]
    assert_nothing_stored(rx.incoming)
    # Nothing escaped the spool either: the test's folder and its parent are as they were
    # (logs and the receiver's own state aside).
    assert (_tree(tmp_path), sorted(p.name for p in tmp_path.parent.iterdir())) == before


def _tree(root: Path) -> set[str]:
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if not path.name.endswith(".log") and "state" not in path.relative_to(root).parts
    }
