"""The whole pipeline, end to end, as real processes: a scanner to two PACS, crashes included.

DCMTK ``storescu`` sends a study to the receiver; the router routes every series (one rule,
``True``, to both targets); the dispatcher sends each task to DCMTK ``storescp`` and to Orthanc;
the cleaner runs alongside. All of them are OS processes on one spool and one configuration
file (``tests/pipeline_helpers.py``). The crash tests kill -9 one service at a point of the
flow, restart it and check that every instance the receiver acknowledged reaches both targets
at least once and that nothing is left stuck (no lock, claim, journal or temporary file).

A target answering 0xA700 is covered by ``tests/test_dispatcher_dicom.py``; kill -9 of the
cleaner by ``tests/test_cleaner.py``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from common.spool import LockOwner
from tests.dicom_factory import Instance
from tests.dispatcher_helpers import (
    StoreScp,
    dataset_bytes,
    dispatcher_config,
    dispatcher_processes,
    make_task,
    storescp,
    write_config,
)
from tests.helpers import ReceiverFactory, free_port, parse_storescu, storescu, wait_until
from tests.orthanc import Orthanc, orthanc
from tests.pipeline_helpers import ORTHANC, STORESCP, Pipeline, running_pipeline, study
from tests.test_cleaner import ALL_DAY, start_cleaner

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow, pytest.mark.usefixtures("dcmtk")]

DEADLINE = 60.0
"""Seconds any one stage of the flow may take on a loaded 2-core machine."""


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreScp]:
    """A running DCMTK storescp (bit-preserving, TCP_NODELAY=1)."""
    with storescp(tmp_path / "storescp") as peer:
        yield peer


@pytest.fixture(scope="module")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the module: it takes about 3 s to stop."""
    with orthanc(tmp_path_factory.mktemp("orthanc")) as peer:
        yield peer


@pytest.fixture
def pacs(orthanc_server: Orthanc) -> Orthanc:
    """Orthanc, emptied: every test's study is the only thing in it."""
    client = orthanc_server.client
    for patient in client.get("/patients").raise_for_status().json():
        client.delete(f"/patients/{patient}").raise_for_status()
    assert orthanc_server.instances() == []
    return orthanc_server


# ---------------------------------------------------------------------------- assertions


def orthanc_files(pacs: Orthanc) -> dict[str, bytes]:
    """SOP Instance UID -> the file Orthanc serves, for every stored instance."""
    return {uid: pacs.file(orthanc_id) for uid, orthanc_id in pacs.sop_instances().items()}


def assert_at_targets(
    pipeline: Pipeline, instances: Sequence[Instance], *, exactly: bool = True
) -> None:
    """Every instance is at storescp and in Orthanc with its data set bytes unchanged.

    ``exactly``: nothing else arrived either (otherwise: at least these).
    """
    expected = {instance.sop_instance_uid for instance in instances}
    at_scp = pipeline.scp.received()
    in_pacs = orthanc_files(pipeline.pacs)
    assert expected <= set(at_scp), f"missing at storescp: {sorted(expected - set(at_scp))}"
    assert expected <= set(in_pacs), f"missing in Orthanc: {sorted(expected - set(in_pacs))}"
    if exactly:
        assert set(at_scp) == expected
        assert set(in_pacs) == expected
    for instance in instances:
        sent = dataset_bytes(instance.path)
        original = pydicom.dcmread(instance.path)
        received = at_scp[instance.sop_instance_uid]
        assert dataset_bytes(received) == sent, f"{received.name}: data set bytes differ"
        body = in_pacs[instance.sop_instance_uid]
        assert body.endswith(sent), f"Orthanc {instance.sop_instance_uid}: data set differs"
        stored = pydicom.dcmread(DicomBytesIO(body))
        assert stored.SOPInstanceUID == instance.sop_instance_uid
        assert stored.PixelData == original.PixelData


def assert_nothing_stuck(pipeline: Pipeline) -> None:
    assert pipeline.stale() == [], "stale locks, claims, journals or temporary files"
    assert pipeline.incoming_is_empty(), pipeline.describe_spool()
    for folder in ("outgoing", "error", "processing"):
        assert pipeline.tasks(folder) == [], f"tasks left in {folder}/"


def series_of(instances: Sequence[Instance]) -> set[str]:
    return {instance.series_uid for instance in instances}


def send(pipeline: Pipeline, instances: Sequence[Instance]) -> None:
    run = storescu(pipeline.receiver.port, [instance.path for instance in instances])
    assert run.returncode == 0, run.output[-3000:]
    assert len(run.stored) == len(instances), run.output[-3000:]


# ---------------------------------------------------------------------------- the happy path


def test_a_multi_series_study_from_storescu_reaches_storescp_and_orthanc_bit_identical(
    tmp_path: Path, receiver: ReceiverFactory, scp: StoreScp, pacs: Orthanc
) -> None:
    sent = study(tmp_path / "sent", "e2e", series=2, per_series=6)
    with running_pipeline(tmp_path, receiver, scp, pacs) as pipeline:
        send(pipeline, sent)
        pipeline.wait(
            lambda: pipeline.settled(tasks=2), timeout=DEADLINE, what="both series in success/"
        )

        assert_at_targets(pipeline, sent)
        tasks = pipeline.tasks("success")
        assert {task["info"]["uid"] for task in tasks} == series_of(sent)
        for task in tasks:
            assert task["dispatch"]["target_name"] == [STORESCP, ORTHANC]
            for target in (STORESCP, ORTHANC):
                status = task["dispatch"]["status"][target]
                assert status["state"] == "complete"
                assert status["attempts"] == 1
                assert len(status["instances"]) == 6
                assert set(status["instances"].values()) == {0}
        assert_nothing_stuck(pipeline)
        assert pipeline.cleaner_events("task_deleted") == []


# ---------------------------------------------------------------------------- retries


def failed_twice(pipeline: Pipeline) -> bool:
    """Both tasks are in outgoing/ with two failed attempts recorded (``dispatch.retries``,
    written at the end of an attempt, after the per-target status)."""
    retries = [task["dispatch"].get("retries") or 0 for task in pipeline.tasks("outgoing")]
    return len(retries) == 2 and min(retries) >= 2


def test_target_down_then_up_is_delivered_after_retries(
    tmp_path: Path, receiver: ReceiverFactory, pacs: Orthanc
) -> None:
    sent = study(tmp_path / "sent", "down-up", series=2, per_series=5)
    scp = StoreScp(tmp_path / "storescp", port=free_port())  # configured, not started yet
    try:
        with running_pipeline(tmp_path, receiver, scp, pacs) as pipeline:
            send(pipeline, sent)
            pipeline.wait(
                lambda: failed_twice(pipeline),
                timeout=DEADLINE,
                what="two failed attempts of both tasks",
            )
            for task in pipeline.tasks("outgoing"):
                status = task["dispatch"]["status"]
                assert status[ORTHANC]["state"] == "complete"
                assert status[STORESCP]["state"] != "complete"
                assert status[STORESCP]["attempts"] >= 2
                assert "refused" in status[STORESCP]["last_error"].lower(), status[STORESCP]

            scp.start()
            pipeline.wait(
                lambda: pipeline.settled(tasks=2), timeout=DEADLINE, what="delivery after retries"
            )

            assert_at_targets(pipeline, sent)
            for task in pipeline.tasks("success"):
                status = task["dispatch"]["status"]
                assert status[STORESCP]["state"] == "complete"
                assert status[STORESCP]["attempts"] >= 3
                assert status[ORTHANC]["attempts"] == 1, "a delivered target is not resent"
            done = pipeline.dispatcher_events("dispatch_target_done")
            to_orthanc = [e for e in done if e.payload["target"] == ORTHANC]
            assert len(to_orthanc) == 2 and all(e.payload["ok"] for e in to_orthanc)
            assert_nothing_stuck(pipeline)
    finally:
        scp.stop()


# ---------------------------------------------------------------------------- crashes


def test_receiver_killed_mid_transfer_loses_no_acknowledged_instance(
    tmp_path: Path, receiver: ReceiverFactory, scp: StoreScp, pacs: Orthanc
) -> None:
    sent = study(tmp_path / "sent", "rx-kill", series=2, per_series=40, size=256)
    with running_pipeline(tmp_path, receiver, scp, pacs) as pipeline:
        sender = pipeline.send_in_background([instance.path for instance in sent])
        incoming = pipeline.spool.incoming
        pipeline.wait(
            lambda: len(list(incoming.glob("*/*.tags"))) >= 8,
            timeout=DEADLINE,
            what="the first instances stored",
        )
        pipeline.kill_receiver()
        output, _ = sender.communicate(timeout=60)
        acknowledged_files = {path.name for path in parse_storescu(output)}
        acknowledged = [i for i in sent if i.path.name in acknowledged_files]
        assert 0 < len(acknowledged) < len(sent), "the kill did not land mid-transfer"
        assert sender.returncode != 0

        # What the receiver acknowledged goes through while it is down.
        expected = {i.sop_instance_uid for i in acknowledged}
        pipeline.wait(
            lambda: expected <= pipeline.scp_uids() and not pipeline.tasks("outgoing"),
            timeout=DEADLINE,
            what="every acknowledged instance delivered",
        )
        assert_at_targets(pipeline, acknowledged, exactly=False)

        # The restarted receiver removes the dead one's temporary files; the scanner resends
        # what was not acknowledged.
        pipeline.restart_receiver()
        send(pipeline, [i for i in sent if i.path.name not in acknowledged_files])
        pipeline.wait(
            lambda: (
                pipeline.incoming_is_empty()
                and not pipeline.tasks("outgoing")
                and pipeline.scp_uids() == {i.sop_instance_uid for i in sent}
            ),
            timeout=DEADLINE,
            what="every instance delivered",
        )

        assert_at_targets(pipeline, sent)
        assert_nothing_stuck(pipeline)


def delivered_at_least_once(pipeline: Pipeline, series: set[str]) -> bool:
    """Every series has a task in success/; nothing is left to route or send."""
    if not pipeline.incoming_is_empty() or pipeline.tasks("outgoing"):
        return False
    return {task["info"]["uid"] for task in pipeline.tasks("success")} == series


ROUTER_KILL_STEPS = ["snapshot_taken", "journal_written", "task_written", "events_recorded"]
"""Before the plan is durable, with the plan but no task, with a hidden task folder, with
every task delivered but the sources still in incoming/."""


@pytest.mark.parametrize("step", ROUTER_KILL_STEPS)
def test_router_killed_while_routing_then_restarted_delivers_everything(
    tmp_path: Path, receiver: ReceiverFactory, scp: StoreScp, pacs: Orthanc, step: str
) -> None:
    sent = study(tmp_path / "sent", f"router-{step}", series=2, per_series=5)
    with running_pipeline(tmp_path, receiver, scp, pacs, router=False) as pipeline:
        pipeline.start_router(hook=f"{step}:kill")
        send(pipeline, sent)
        assert pipeline.router_ended() == -signal.SIGKILL, "the test hook did not kill it"

        pipeline.start_router()
        pipeline.wait(
            lambda: delivered_at_least_once(pipeline, series_of(sent)),
            timeout=DEADLINE,
            what="both series delivered",
        )

        assert_at_targets(pipeline, sent)
        assert_nothing_stuck(pipeline)
        assert len(pipeline.router_events("lock_recovered")) == 1


@pytest.mark.parametrize("step", ["task_delivered", "sources_removed"])
def test_a_task_dispatched_while_the_router_was_down_is_not_routed_again(
    tmp_path: Path, receiver: ReceiverFactory, scp: StoreScp, pacs: Orthanc, step: str
) -> None:
    """The router dies after renaming the task into outgoing/ (journal and lock left behind);
    the dispatcher sends the task and moves it to success/ before the router is back. The
    restarted router must finish the journal without creating the task a second time."""
    sent = study(tmp_path / "sent", "router-redo", series=1, per_series=5)
    with running_pipeline(tmp_path, receiver, scp, pacs, router=False) as pipeline:
        pipeline.start_router(hook=f"{step}:kill")
        send(pipeline, sent)
        assert pipeline.router_ended() == -signal.SIGKILL
        pipeline.wait(
            lambda: len(pipeline.tasks("success")) == 1,
            timeout=DEADLINE,
            what="the task dispatched while the router is down",
        )

        pipeline.start_router()
        pipeline.wait(pipeline.incoming_is_empty, timeout=DEADLINE, what="the journal carried out")
        pipeline.wait(
            lambda: not pipeline.tasks("outgoing"), timeout=DEADLINE, what="outgoing/ empty"
        )

        assert_at_targets(pipeline, sent)
        assert_nothing_stuck(pipeline)
        success = sorted(p.name for p in (pipeline.data_root / "success").iterdir())
        assert len(success) == 1, f"the task was created and dispatched again: {success}"
        assert len(pipeline.dispatcher_events("dispatch_started")) == 1


def test_dispatcher_killed_mid_send_delivers_every_instance_after_restart(
    tmp_path: Path, receiver: ReceiverFactory, scp: StoreScp, pacs: Orthanc
) -> None:
    sent = study(tmp_path / "sent", "dispatcher-kill", series=2, per_series=40, size=256)
    with running_pipeline(tmp_path, receiver, scp, pacs) as pipeline:
        send(pipeline, sent)
        out_dir = pipeline.scp.out_dir
        pipeline.wait(
            lambda: len(list(out_dir.glob("*.dcm"))) >= 5,
            timeout=DEADLINE,
            what="the dispatcher sending",
        )
        killed = pipeline.dispatcher
        assert killed is not None
        pipeline.kill_dispatcher()
        claims = list((pipeline.data_root / "outgoing").glob("*/.processing"))
        assert claims, "the kill did not land while a task was claimed"

        pipeline.start_dispatcher()
        pipeline.wait(
            lambda: pipeline.settled(tasks=2), timeout=DEADLINE, what="both tasks delivered"
        )

        assert_at_targets(pipeline, sent)
        assert_nothing_stuck(pipeline)
        recovered = pipeline.dispatcher_events("lock_recovered")
        assert len(recovered) == len(claims)
        assert {e.payload["owner"]["pid"] for e in recovered} == {killed.process.pid}


# ---------------------------------------------------------------------------- the cleaner


def test_the_cleaner_alongside_deletes_delivered_tasks_only(
    tmp_path: Path, receiver: ReceiverFactory, scp: StoreScp, pacs: Orthanc
) -> None:
    """Retention 0 in an all-day off-peak window: each task is deleted as soon as it is in
    success/, and the flow in front of it is not disturbed."""
    sent = study(tmp_path / "sent", "cleaner", series=2, per_series=5)
    with running_pipeline(tmp_path, receiver, scp, pacs, retention=0, **ALL_DAY) as pipeline:
        send(pipeline, sent)
        pipeline.wait(
            lambda: len(pipeline.cleaner_events("task_deleted")) == 2,
            timeout=DEADLINE,
            what="both delivered tasks deleted by the cleaner",
        )

        assert_at_targets(pipeline, sent)
        moved = {e.payload["task_id"] for e in pipeline.dispatcher_events("task_moved")}
        deleted = pipeline.cleaner_events("task_deleted")
        assert {e.payload["task_id"] for e in deleted} == moved
        assert {e.payload["folder"] for e in deleted} == {"success"}
        assert pipeline.tasks("success") == []
        assert_nothing_stuck(pipeline)


def test_a_claim_a_killed_dispatcher_left_in_success_does_not_keep_the_task_forever(
    tmp_path: Path,
) -> None:
    """The state kill -9 leaves in that window (too narrow to hit on purpose from outside):
    a delivered task in success/ still holding the dead dispatcher's claim. With the
    dispatcher and the cleaner running (retention 0, all day), it must be deleted."""
    data_root = tmp_path / "data"
    config = dispatcher_config(
        data_root,
        {"pacs": {"target_type": "dummy"}},
        retention=0,
        cleaner_scan_interval=0.2,
        emergency_clean_percentage=100,
        **ALL_DAY,
    )
    config_path = write_config(tmp_path / "caduceus.json", config)
    instances = study(tmp_path / "sent", "claim", series=1, per_series=1)
    folder = make_task(data_root / "success", "task-1", instances, ["pacs"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = LockOwner("dispatcher", socket.gethostname(), dead.pid, 1.0, "deadbeef", time.time())
    (folder / ".processing").write_bytes(owner.to_json())

    with dispatcher_processes(config_path, tmp_path):
        cleaner = start_cleaner(config_path)
        try:
            wait_until(lambda: not folder.exists(), timeout=5, what="the task to be deleted")
        finally:
            cleaner.send_signal(signal.SIGTERM)
            assert cleaner.wait(timeout=30) == 0
