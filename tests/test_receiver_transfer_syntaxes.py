"""Compressed objects are negotiated in their own transfer syntax and stored as received."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import UID, JPEG2000Lossless

from tests import dicom_factory
from tests.dicom_factory import DCMTK_ENCODERS, Instance
from tests.helpers import (
    SUCCESS,
    ReceiverFactory,
    assert_stored_as_sent,
    pynetdicom_store,
    storescu,
    storescu_profile,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.usefixtures("dcmtk")]


@pytest.fixture(scope="session")
def sources(data_dir: Path, ct_series: list[Instance]) -> dict[str, Instance]:
    """Uncompressed inputs: a 16-bit CT slice and an 8-bit image (JPEG baseline needs 8 bits)."""
    sc8 = dicom_factory.secondary_capture_8bit(data_dir / "sc8")
    return {"ct16": ct_series[0], "sc8": sc8}


@pytest.fixture(scope="session")
def compressed(data_dir: Path, sources: dict[str, Instance]) -> dict[str, Instance]:
    """One DCMTK-compressed copy per transfer syntax."""
    folder = data_dir / "compressed"
    return {
        ts: dicom_factory.compressed_copy(sources[source], ts, folder)
        for ts, (_, source) in DCMTK_ENCODERS.items()
    }


@pytest.mark.parametrize("transfer_syntax", list(DCMTK_ENCODERS), ids=lambda ts: UID(ts).keyword)
def test_compressed_object_from_storescu_keeps_its_transfer_syntax_and_bytes(
    receiver: ReceiverFactory,
    compressed: dict[str, Instance],
    tmp_path: Path,
    transfer_syntax: str,
) -> None:
    rx = receiver()
    sent = compressed[transfer_syntax]
    # Propose only the file's own syntax, so that storescu cannot quietly decompress.
    profile = storescu_profile(tmp_path, [(sent.sop_class_uid, [transfer_syntax])])

    run = storescu(rx.port, [sent.path], args=profile)

    assert run.returncode == 0, run.output
    assert run.stored == [sent.path]
    assert_stored_as_sent(rx.incoming, sent, transfer_syntax=transfer_syntax)


def test_jpeg2000_object_from_pynetdicom_keeps_its_transfer_syntax_and_bytes(
    receiver: ReceiverFactory, sources: dict[str, Instance], tmp_path: Path
) -> None:
    if not dicom_factory.j2k_encoder_available():
        pytest.skip("no JPEG 2000 encoder here (pydicom needs pylibjpeg-openjpeg); DCMTK has none")
    sent = dicom_factory.j2k_copy(sources["ct16"], tmp_path)
    rx = receiver()

    statuses = pynetdicom_store(
        rx.port, [sent.path], contexts=[(sent.sop_class_uid, [JPEG2000Lossless])], raw=True
    )

    assert statuses == [SUCCESS]
    assert_stored_as_sent(rx.incoming, sent, transfer_syntax=JPEG2000Lossless)
