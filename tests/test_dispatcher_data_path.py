"""The dispatcher's own C-STORE data path (dispatcher/targets/scu.py) against real peers.

DCMTK storescp (bit-preserving) and Orthanc receive several transfer syntaxes byte for byte;
PDU sizes are checked through a relay that records every PDU the dispatcher sends; peers that
abort, never answer, or stop reading show that every wait is bounded and that exactly the
unacknowledged instances are sent again.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)

from common.config import Config
from dispatcher.events import DispatchEvents
from dispatcher.service import DispatcherService
from tests import dicom_factory
from tests.dicom_factory import Instance
from tests.dispatcher_helpers import (
    ABORT,
    dataset_bytes,
    dicom_target,
    dispatcher_config,
    dispatcher_events,
    load,
    make_task,
    pdu_relay,
    scp_peer,
    silent_peer,
    storescp,
    task_in,
)
from tests.helpers import require_tool
from tests.orthanc import orthanc

pytestmark = [pytest.mark.dcmtk, pytest.mark.usefixtures("dcmtk")]

A_ABORT = 0x07


@pytest.fixture(scope="session")
def syntaxes(data_dir: Path, multiframe: Instance) -> list[Instance]:
    """One instance per transfer syntax: Explicit and Implicit VR Little Endian, JPEG
    baseline, JPEG lossless, deflated, and an uncompressed multi-frame image."""
    folder = data_dir / "dispatch-syntaxes"
    ct = dicom_factory.ct_series(folder / "ct", 3, seed="syntaxes", rows=128, columns=128)
    implicit = folder / "implicit.dcm"
    subprocess.run(
        [require_tool("dcmconv"), "+ti", str(ct[1].path), str(implicit)],
        check=True,
        capture_output=True,
    )
    made = [
        ct[0],
        dicom_factory.describe(implicit),
        dicom_factory.compressed_copy(
            dicom_factory.secondary_capture_8bit(folder), JPEGBaseline8Bit, folder
        ),
        dicom_factory.compressed_copy(ct[2], JPEGLosslessSV1, folder / "jpeg"),
        dicom_factory.compressed_copy(ct[0], DeflatedExplicitVRLittleEndian, folder / "deflate"),
        multiframe,
    ]
    assert [i.transfer_syntax for i in made] == [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEGLosslessSV1,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
    ]
    # The deflated copy keeps ct[0]'s SOP Instance UID: give it a task of its own.
    return made


def service(
    data_root: Path, targets: dict[str, dict[str, object]], **overrides: object
) -> DispatcherService:
    config: Config = load(dispatcher_config(data_root, targets, **overrides))
    config.spool_paths().create()
    return DispatcherService(config, events=DispatchEvents.open(config.spool_paths().state))


def outgoing(data_root: Path) -> Path:
    folder = data_root / "outgoing"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def first_error(data_root: Path) -> str:
    return str(
        next(
            e.payload["error"]
            for e in dispatcher_events(data_root)
            if e.kind == "dispatch_target_done" and not e.payload["ok"]
        )
    )


def padded(data: bytes) -> bytes:
    """``data`` padded to an even length: DCMTK's dcmconv +td writes odd deflated data sets,
    the dispatcher sends them with PS3.5 A.5's trailing NULL byte (PDV fragments are even)."""
    return data + b"\x00" if len(data) % 2 else data


def split_by_uid(instances: list[Instance]) -> list[list[Instance]]:
    """Tasks in which no SOP Instance UID repeats (a peer stores one file per UID)."""
    tasks: list[list[Instance]] = []
    for instance in instances:
        for task in tasks:
            if instance.sop_instance_uid not in {i.sop_instance_uid for i in task}:
                task.append(instance)
                break
        else:
            tasks.append([instance])
    return tasks


def test_every_transfer_syntax_arrives_at_storescp_bit_identical_in_its_own_syntax(
    tmp_path: Path, syntaxes: list[Instance]
) -> None:
    for number, instances in enumerate(split_by_uid(syntaxes)):
        data_root = tmp_path / f"data-{number}"
        make_task(outgoing(data_root), "task-1", instances, ["pacs"])
        with storescp(tmp_path / f"scp-{number}") as peer:
            service(data_root, {"pacs": dicom_target(peer.port)}).once()
            received = peer.received()
        assert (data_root / "success" / "task-1").is_dir()
        for instance in instances:
            stored = received[instance.sop_instance_uid]
            meta = pydicom.filereader.read_file_meta_info(stored)
            assert meta.TransferSyntaxUID == instance.transfer_syntax
            assert dataset_bytes(stored) == padded(dataset_bytes(instance.path))


def test_every_transfer_syntax_arrives_at_orthanc_in_its_own_syntax(
    tmp_path: Path, syntaxes: list[Instance]
) -> None:
    tasks = split_by_uid(syntaxes)
    with orthanc(tmp_path / "orthanc") as pacs:
        target = dicom_target(pacs.dicom_port, aet_target="ORTHANC")
        for number, instances in enumerate(tasks):  # one after the other: a UID repeats
            make_task(outgoing(tmp_path / "data"), f"task-{number}", instances, ["orthanc"])
            service(tmp_path / "data", {"orthanc": target}).once()
            stored = pacs.sop_instances()
            for instance in instances:
                body = pacs.file(stored[instance.sop_instance_uid])
                got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(body))
                original = pydicom.dcmread(instance.path)
                assert got.file_meta.TransferSyntaxUID == instance.transfer_syntax
                assert got.PixelData == original.PixelData
                if instance.transfer_syntax != DeflatedExplicitVRLittleEndian:  # re-deflated
                    assert dataset_bytes(instance.path) in body
    assert len(list((tmp_path / "data" / "success").iterdir())) == len(tasks)


@pytest.mark.parametrize(("peer_max_pdu", "cap"), [(4096, 131072), (131072, 8192)])
def test_pdus_never_exceed_the_peers_maximum_nor_dispatcher_max_pdu(
    tmp_path: Path, ct_series: list[Instance], peer_max_pdu: int, cap: int
) -> None:
    data_root = tmp_path / "data"
    make_task(outgoing(data_root), "task-1", ct_series[:3], ["pacs"])
    with (
        storescp(tmp_path / "scp", max_pdu=peer_max_pdu) as peer,
        pdu_relay(peer.port) as relay,
    ):
        service(data_root, {"pacs": dicom_target(relay.port)}, dispatcher_max_pdu=cap).once()
        received = peer.received()
    limit = min(peer_max_pdu, cap)
    lengths = relay.p_data_lengths()
    assert max(lengths) == limit  # fragments fill the PDUs up to the limit, never beyond
    assert len(lengths) >= 3 * (512 * 512 * 2 // limit)
    for instance in ct_series[:3]:
        assert dataset_bytes(received[instance.sop_instance_uid]) == dataset_bytes(instance.path)


def test_a_peer_without_a_pdu_limit_gets_each_data_set_in_one_streamed_pdu(
    tmp_path: Path, multiframe: Instance
) -> None:
    data_root = tmp_path / "data"
    make_task(outgoing(data_root), "task-1", [multiframe], ["scp"])
    with scp_peer(max_pdu=0) as peer, pdu_relay(peer.port) as relay:
        service(data_root, {"scp": dicom_target(relay.port)}, dispatcher_max_pdu=0).once()
    assert peer.received == [multiframe.sop_instance_uid]
    data_set = len(dataset_bytes(multiframe.path))
    assert data_set > 1 << 20  # more than the 256 KiB the dispatcher reads and sends at once
    assert data_set + 6 in relay.p_data_lengths()  # one PDV item: 6 bytes of header
    assert (data_root / "success" / "task-1").is_dir()


def test_a_peer_that_aborts_mid_series_gets_exactly_the_unacknowledged_instances_again(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    sent = ct_series[:6]
    make_task(outgoing(data_root), "task-1", sent, ["pacs"])
    aborted = False

    def answer(number: int) -> int:
        nonlocal aborted
        if number == 3 and not aborted:
            aborted = True
            return ABORT
        return 0

    with scp_peer(answer) as peer:
        service(data_root, {"pacs": dicom_target(peer.port)}, retry_delay=0).once()
    uids = sorted(instance.sop_instance_uid for instance in sent)  # files go in name order
    assert peer.received == uids[:3] + uids[2:]
    assert peer.associations == 2
    task = task_in(data_root / "success", "task-1")
    assert task.dispatch is not None and task.dispatch.status["pacs"].attempts == 2
    error = first_error(data_root)
    assert "2 of 6 instances delivered" in error
    assert "aborted the association" in error or "closed the connection" in error


def test_a_peer_that_never_answers_a_c_store_is_sent_an_a_abort_after_the_dimse_timeout(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    make_task(outgoing(data_root), "task-1", ct_series[:3], ["pacs"])
    with scp_peer(lambda n: None if n == 2 else 0) as peer, pdu_relay(peer.port) as relay:
        started = time.monotonic()
        service(
            data_root, {"pacs": dicom_target(relay.port)}, dispatcher_dimse_timeout=1, retry_max=1
        ).once()
        elapsed = time.monotonic() - started
        types = [pdu_type for pdu_type, _ in relay.pdus]
    assert elapsed < 10, f"the dispatcher waited {elapsed:.1f} s"
    assert types[-1] == A_ABORT
    task = task_in(data_root / "error", "task-1")
    assert task.info.fail_reason is not None
    assert "no C-STORE response for" in task.info.fail_reason
    assert "within 1 s (dimse timeout)" in task.info.fail_reason


def test_a_peer_that_never_answers_the_association_request_is_given_up_after_the_acse_timeout(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    make_task(outgoing(data_root), "task-1", ct_series[:1], ["pacs"])
    with silent_peer("no-answer") as peer:
        started = time.monotonic()
        service(
            data_root, {"pacs": dicom_target(peer.port)}, dispatcher_acse_timeout=1, retry_max=1
        ).once()
        elapsed = time.monotonic() - started
    assert elapsed < 10, f"the dispatcher waited {elapsed:.1f} s"
    task = task_in(data_root / "error", "task-1")
    assert task.info.fail_reason is not None
    assert "did not answer the association request within 1 s" in task.info.fail_reason


def test_a_peer_that_stops_reading_is_given_up_after_the_network_timeout(
    tmp_path: Path, data_dir: Path
) -> None:
    big = dicom_factory.multiframe(data_dir / "big", seed="big", frames=96, rows=512, columns=256)
    data_root = tmp_path / "data"
    make_task(outgoing(data_root), "task-1", [big], ["pacs"])
    with silent_peer("stop-reading") as peer:
        started = time.monotonic()
        service(
            data_root,
            {"pacs": dicom_target(peer.port)},
            dispatcher_network_timeout=1,
            retry_max=1,
        ).once()
        elapsed = time.monotonic() - started
    assert elapsed < 10, f"the dispatcher waited {elapsed:.1f} s"
    task = task_in(data_root / "error", "task-1")
    assert task.info.fail_reason is not None
    assert "took no data for 1 s (network timeout)" in task.info.fail_reason
