"""DICOM targets against real peers: DCMTK storescp, Orthanc, and a pynetdicom SCP we own."""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from bookkeeper.payloads import KNOWN_KINDS
from common.outbox import Event
from dispatcher.events import DispatchEvents
from dispatcher.service import DispatcherService
from dispatcher.settings import DispatcherSettings
from dispatcher.targets.association import Peer
from dispatcher.targets.dicom import read_dicom_file, requested_contexts
from dispatcher.targets.scu import ScuAssociation
from tests import dicom_factory
from tests.dicom_factory import Instance
from tests.dispatcher_helpers import (
    SCP_AET,
    dataset_bytes,
    dicom_target,
    dispatcher_config,
    dispatcher_events,
    load,
    make_task,
    scp_peer,
    storescp,
    task_in,
)
from tests.helpers import LOCALHOST
from tests.orthanc import orthanc

pytestmark = [pytest.mark.dcmtk, pytest.mark.usefixtures("dcmtk")]


def dispatch_once(
    data_root: Path, targets: dict[str, dict[str, object]], **overrides: object
) -> DispatcherService:
    config = load(dispatcher_config(data_root, targets, **overrides))
    service = DispatcherService(config, events=DispatchEvents.open(config.spool_paths().state))
    service.once()
    return service


def kinds(events: list[Event]) -> list[str]:
    return [event.kind for event in events]


@pytest.fixture(scope="session")
def compressed(data_dir: Path) -> list[Instance]:
    """Three CT slices (UIDs of their own) compressed with DCMTK into three lossless syntaxes."""
    folder = data_dir / "dispatch-compressed"
    sources = dicom_factory.ct_series(
        folder / "source", 3, seed="dispatch-compressed", rows=128, columns=128
    )
    syntaxes = [JPEGLSLossless, RLELossless, "1.2.840.10008.1.2.4.70"]  # JPEG Lossless SV1
    return [
        dicom_factory.compressed_copy(source, ts, folder)
        for source, ts in zip(sources, syntaxes, strict=True)
    ]


def test_series_arrives_at_storescp_with_identical_data_sets(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    with storescp(tmp_path / "scp") as peer:
        outgoing = load(dispatcher_config(data_root, {})).spool_paths().outgoing
        outgoing.mkdir(parents=True)
        make_task(outgoing, "task-1", ct_series, ["pacs"])

        service = dispatch_once(data_root, {"pacs": dicom_target(peer.port)})

        received = peer.received()
    assert [outcome for _, outcome in service.outcomes] == ["success"]
    assert sorted(received) == sorted(i.sop_instance_uid for i in ct_series)
    for instance in ct_series:
        assert dataset_bytes(received[instance.sop_instance_uid]) == dataset_bytes(instance.path)
    task = task_in(data_root / "success", "task-1")
    status = task.dispatch.status["pacs"] if task.dispatch else None
    assert status is not None and status.state == "complete" and status.attempts == 1
    assert len(status.instances) == len(ct_series) and set(status.instances.values()) == {0}
    assert not (data_root / "success" / "task-1" / ".processing").exists()
    events = dispatcher_events(data_root)
    projected = ("task_event", "task_update")
    assert [k for k in kinds(events) if k not in projected] == [
        "dispatch_started",
        "dispatch_target_done",
        "task_moved",
    ]
    task_events = [e.payload["event"] for e in events if e.kind == "task_event"]
    assert task_events == ["DISPATCH_BEGIN", "DISPATCH_COMPLETE", "MOVE", "COMPLETE"]
    updates = [e.payload["status"] for e in events if e.kind == "task_update"]
    assert updates == ["dispatching", "complete"]
    for event in events:  # what the bookkeeper projects must pass its payload check
        if event.kind in KNOWN_KINDS:
            KNOWN_KINDS[event.kind].model_validate(event.payload)


def test_compressed_files_are_sent_in_their_own_transfer_syntax(
    tmp_path: Path, compressed: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    with storescp(tmp_path / "scp") as peer:
        outgoing = data_root / "outgoing"
        outgoing.mkdir(parents=True)
        make_task(outgoing, "task-1", compressed, ["pacs"])

        dispatch_once(data_root, {"pacs": dicom_target(peer.port)})

        received = peer.received()
    for instance in compressed:
        stored = received[instance.sop_instance_uid]
        meta = pydicom.filereader.read_file_meta_info(stored)
        assert meta.TransferSyntaxUID == instance.transfer_syntax
        assert dataset_bytes(stored) == dataset_bytes(instance.path)


def test_compressed_file_is_decompressed_for_a_peer_that_accepts_only_uncompressed(
    tmp_path: Path, ct_series: list[Instance], data_dir: Path
) -> None:
    rle = dicom_factory.compressed_copy(ct_series[0], RLELossless, data_dir / "rle-only")
    data_root = tmp_path / "data"
    (data_root / "outgoing").mkdir(parents=True)
    make_task(data_root / "outgoing", "task-1", [rle], ["scp"])
    with scp_peer() as peer:  # supports Explicit and Implicit VR Little Endian only
        dispatch_once(data_root, {"scp": dicom_target(peer.port)})
    assert peer.received == [rle.sop_instance_uid]
    assert (data_root / "success" / "task-1").is_dir()


def test_contexts_offer_each_stored_syntax_and_an_uncompressed_fallback(
    compressed: list[Instance],
) -> None:
    files = [read_dicom_file(instance.path) for instance in compressed]
    contexts = requested_contexts(files)
    offered = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in contexts}
    ct = UID(dicom_factory.CT_IMAGE_STORAGE)
    for instance in compressed:
        assert (ct, (instance.transfer_syntax,)) in offered
    assert (ct, (ExplicitVRLittleEndian, "1.2.840.10008.1.2")) in offered
    assert len(contexts) == 4


def test_association_socket_has_tcp_nodelay_and_the_network_timeout(tmp_path: Path) -> None:
    with storescp(tmp_path / "scp") as peer:
        target = Peer(LOCALHOST, peer.port, "CADUCEUS", SCP_AET)
        files = [read_dicom_file(dicom_factory.ct_series(tmp_path / "ct", 1)[0].path)]
        assoc = ScuAssociation.request(target, requested_contexts(files), DispatcherSettings())
        try:
            assert assoc.established
            assert assoc.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            timeout = assoc.sock.gettimeout()  # never blocking without a bound
            assert timeout is not None and 0 < timeout <= DispatcherSettings().network_timeout
        finally:
            assoc.release()


def test_ip_sender_and_passed_ae_titles_come_from_the_task(
    tmp_path: Path, ct_series: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    (data_root / "outgoing").mkdir(parents=True)
    make_task(
        data_root / "outgoing",
        "task-1",
        ct_series[:1],
        ["back"],
        sender_address=LOCALHOST,
        sender_aet="SCANNER_CT1",
        receiver_aet=SCP_AET,
    )
    with scp_peer() as peer:
        target = dicom_target(peer.port, ip="sender", aet_target="OTHER", aet_source="ME")
        target.update(pass_sender_aet=True, pass_receiver_aet=True)
        dispatch_once(data_root, {"back": target})
    assert peer.received == [ct_series[0].sop_instance_uid]
    assert peer.calling == ["SCANNER_CT1"]
    assert peer.called == [SCP_AET]


def test_series_arrives_at_orthanc_with_identical_pixel_data(
    tmp_path: Path, ct_series: list[Instance], compressed: list[Instance]
) -> None:
    data_root = tmp_path / "data"
    (data_root / "outgoing").mkdir(parents=True)
    make_task(data_root / "outgoing", "ct", ct_series, ["orthanc"])
    make_task(data_root / "outgoing", "compressed", compressed, ["orthanc"])
    with orthanc(tmp_path / "orthanc") as pacs:
        target = dicom_target(pacs.dicom_port, aet_target="ORTHANC")

        dispatch_once(data_root, {"orthanc": target})

        stored = pacs.sop_instances()
        sent = [*ct_series, *compressed]
        assert sorted(stored) == sorted(i.sop_instance_uid for i in sent)
        for instance in sent:
            body = pacs.file(stored[instance.sop_instance_uid])
            got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(body))
            original = pydicom.dcmread(instance.path)
            assert got.file_meta.TransferSyntaxUID == instance.transfer_syntax
            assert got.PixelData == original.PixelData
            assert dataset_bytes(instance.path) in body
    assert sorted(p.name for p in (data_root / "success").iterdir()) == ["compressed", "ct"]
