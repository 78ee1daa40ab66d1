"""End to end: DCMTK storescu -> the receiver -> the router -> tasks in outgoing/.

Both services run as their own processes on one spool; the study travels over real DICOM.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pydicom
import pytest

from tests import dicom_factory
from tests.dicom_factory import Instance, dataset_offset
from tests.helpers import SENDER_AET, ReceiverFactory, storescu, wait_until
from tests.test_router_support import Spool, route_rule, start_router, write_config


def _two_series_study(folder: Path) -> list[Instance]:
    """One study, two series of four small CT slices each."""
    rng = random.Random("e2e")
    instances: list[Instance] = []
    for series in (1, 2):
        series_uid = dicom_factory.uid("e2e", "series", series)
        for number in range(1, 5):
            ds = dicom_factory.base_dataset(
                "e2e", instance_number=10 * series + number, series_uid=series_uid
            )
            ds.SeriesDescription = f"series {series}"
            dicom_factory.set_pixels(ds, rng, rows=64, columns=64, bits=16, signed=True)
            path = dicom_factory.write(ds, folder / f"s{series}-{number}.dcm")
            instances.append(dicom_factory.describe(path))
    return instances


@pytest.mark.dcmtk
def test_a_study_sent_by_storescu_arrives_in_outgoing_bit_identical(
    receiver: ReceiverFactory, tmp_path: Path
) -> None:
    sent = _two_series_study(tmp_path / "sent")
    rx = receiver()
    config_dir = tmp_path / "router-config"
    config_dir.mkdir()
    rules = {"ct": route_rule('tags.Modality == "CT"', target=["pacs", "archive"])}
    config_path = write_config(
        config_dir, rx.data_root, rules=rules, series_complete_trigger=1, router_scan_interval=0.2
    )
    spool = Spool(rx.data_root, config_path)
    router = start_router(spool)
    try:
        run = storescu(rx.port, [instance.path for instance in sent])
        assert run.returncode == 0, run.output
        assert len(run.stored) == len(sent)
        wait_until(
            lambda: (
                len(spool.tasks("outgoing")) == 2
                and [p.name for p in spool.incoming.iterdir()] == [".tmp"]
            ),
            timeout=60,
            what="both series to be routed",
        )
    finally:
        router.signal(signal.SIGTERM)
        assert router.wait() == 0, router.log()[-3000:]

    tasks = {task["info"]["uid"]: task for task in spool.tasks("outgoing")}
    assert sorted(tasks) == sorted({instance.series_uid for instance in sent})
    for instance in sent:
        task = tasks[instance.series_uid]
        assert task["dispatch"]["target_name"] == ["pacs", "archive"]
        assert task["info"]["sender_aet"] == SENDER_AET
        folder = spool.root / "outgoing" / task["id"]
        stem = f"{instance.series_uid}#{instance.sop_instance_uid}"
        routed = folder / f"{stem}.dcm"
        assert (folder / f"{stem}.tags").is_file()
        sent_body = instance.path.read_bytes()[dataset_offset(instance.path) :]
        assert routed.read_bytes()[dataset_offset(routed) :] == sent_body
        meta = pydicom.filereader.read_file_meta_info(routed)
        assert meta.MediaStorageSOPInstanceUID == instance.sop_instance_uid
    for task in tasks.values():
        assert len(spool.task_files("outgoing", task["id"])) == 2 * 4 + 1
    registered = {event.payload["series_uid"]: event for event in spool.events("series_registered")}
    assert {uid: event.payload["instance_count"] for uid, event in registered.items()} == {
        uid: 4 for uid in tasks
    }
