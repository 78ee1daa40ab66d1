"""The whole pipeline with processing: DCMTK storescu -> receiver -> router (action ``both``) ->
processor running the first-party anonymiser in a real container -> dispatcher -> Orthanc."""

from __future__ import annotations

import io
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pydicom
import pytest

from tests.dispatcher_helpers import StoreScp, storescp
from tests.helpers import ReceiverFactory, storescu
from tests.orthanc import Orthanc, orthanc
from tests.pipeline_helpers import ORTHANC, running_pipeline, study
from tests.processor_helpers import ANONYMIZER, REPO, start_processor

sys.path.insert(0, str(REPO / "modules" / "anonymizer"))
from caduceus_anonymizer.uids import hashed_uid

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.slow,
    pytest.mark.usefixtures("dcmtk", "docker_client"),
]

SECRET = "e2e-project-secret-0123456789"
DEADLINE = 120.0

IDENTIFYING = (
    "PatientBirthDate",
    "InstitutionName",
    "ReferringPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "AccessionNumber",
    "StudyID",
    "ImageComments",
)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreScp]:
    with storescp(tmp_path / "storescp") as peer:
        yield peer


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc(tmp_path / "orthanc") as peer:
        yield peer


def test_anonymised_study_reaches_orthanc_with_consistent_uids_and_identical_pixels(
    tmp_path: Path,
    receiver: ReceiverFactory,
    scp: StoreScp,
    pacs: Orthanc,
    docker_client: docker.DockerClient,
) -> None:
    sent = study(tmp_path / "sent", "anon-e2e", series=2, per_series=4)
    originals = {i.sop_instance_uid: pydicom.dcmread(i.path) for i in sent}
    overrides = {
        "rules": {
            "research": {
                "rule": "True",
                "action": "both",
                "target": [ORTHANC],
                "processing_module": ["anonymizer"],
                "processing_settings": [{"project_name": "LUNG-AI"}],
            }
        },
        "modules": {
            "anonymizer": {
                "docker_tag": ANONYMIZER,
                "settings": {"secret": SECRET},
                "timeout": 120,
            }
        },
    }
    with running_pipeline(tmp_path, receiver, scp, pacs, **overrides) as pipeline:
        processor = start_processor(pipeline.config_path, tmp_path / "processor.log")
        try:
            run = storescu(pipeline.receiver.port, [i.path for i in sent])
            assert run.returncode == 0, run.output
            assert len(run.stored) == len(sent)
            pipeline.wait(
                lambda: len(pipeline.tasks("success")) == 2,
                timeout=DEADLINE,
                what="both anonymised series delivered",
            )
        finally:
            processor.send_signal(signal.SIGTERM)
            assert processor.wait(timeout=60) == 0

    stored = [pydicom.dcmread(io.BytesIO(pacs.file(oid))) for oid in pacs.instances()]
    assert len(stored) == len(sent)
    by_original = {_original_sop(ds, originals): ds for ds in stored}
    assert set(by_original) == set(originals)
    for original_uid, ds in by_original.items():
        original = originals[original_uid]
        for uid_name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert ds[uid_name].value == hashed_uid(SECRET.encode(), original[uid_name].value)
            assert ds[uid_name].value != original[uid_name].value
        assert ds.PixelData == original.PixelData
        assert str(ds.PatientName) != str(original.PatientName)
        assert ds.PatientID != original.PatientID
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.ClinicalTrialProtocolName == "LUNG-AI"
        for name in IDENTIFYING:
            assert name not in ds or ds[name].value in ("", None, "ANONYMIZED"), name
    assert len({ds.StudyInstanceUID for ds in stored}) == 1
    assert len({ds.SeriesInstanceUID for ds in stored}) == 2
    assert len({str(ds.PatientName) for ds in stored}) == 1
    assert docker_client.containers.list(all=True, filters={"label": "org.caduceus.service"}) == []
    for task in pipeline.tasks("success"):
        assert task["process"]["module_name"] == "anonymizer"
        assert task["process"]["output"] is not None
        assert task["dispatch"]["status"][ORTHANC]["state"] == "complete"


def _original_sop(ds: pydicom.Dataset, originals: dict[str, pydicom.Dataset]) -> str:
    for uid in originals:
        if hashed_uid(SECRET.encode(), uid) == ds.SOPInstanceUID:
            return uid
    raise AssertionError(f"{ds.SOPInstanceUID} maps from no sent instance")
