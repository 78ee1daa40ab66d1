"""Values are decoded with the dataset's Specific Character Set into proper Unicode side-cars."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import dicom_factory
from tests.dicom_factory import CHARSET_CASES, CharsetCase
from tests.helpers import ReceiverFactory, assert_stored_as_sent, read_tags, stored_paths, storescu

pytestmark = [pytest.mark.dcmtk, pytest.mark.usefixtures("dcmtk")]


@pytest.mark.parametrize("case", CHARSET_CASES, ids=lambda case: case.name)
def test_patient_name_in_side_car_is_decoded_from_its_character_set(
    receiver: ReceiverFactory, tmp_path: Path, case: CharsetCase
) -> None:
    rx = receiver()
    sent = dicom_factory.charset_dataset(case, tmp_path / "sent")

    run = storescu(rx.port, [sent.path])

    assert run.returncode == 0, run.output
    # The stored dataset keeps the original bytes: no re-encoding on the way in.
    assert_stored_as_sent(rx.incoming, sent)
    tags = read_tags(stored_paths(rx.incoming, sent)[1])
    assert tags["PatientName"] == case.patient_name
    assert tags["SpecificCharacterSet"] == "\\".join(case.specific_character_set)
    if case.description is not None:
        assert tags["SeriesDescription"] == case.description
