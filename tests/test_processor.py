"""The processor against a real Docker engine: mercure's module contract, chains, failures,
timeouts, dynamic routing, safety defaults, recovery (``docs/processor.md``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import docker.errors
import pytest

from common.config import Config
from common.outbox import Outbox
from common.spool import LockOwner
from processor.events import ProcessEvents
from processor.execute import Outcome, restart_task
from processor.runtime import LABEL_OWNER, LABEL_SERVICE, LABEL_TASK
from processor.service import ProcessorService
from tests.helpers import wait_until
from tests.processor_helpers import (
    EXAMPLE,
    PROBE,
    containers_of,
    dicom_names,
    file_hashes,
    finished_task,
    kinds,
    make_task,
    module,
    processor_config,
    processor_events,
    start_processor,
    task_events,
    write_config,
)

pytestmark = pytest.mark.usefixtures("docker_client")


def run_once(config: Config) -> list[tuple[str, Outcome]]:
    """Run an in-process processor over everything ready, with a real outbox."""
    state = config.spool_paths().state
    events = ProcessEvents(Outbox(state / "outbox" / "processor.sqlite3", "processor"))
    service = ProcessorService(config, events=events)
    try:
        service.once()
    finally:
        events.close()
    return service.outcomes


# ---------------------------------------------------------------------------- the contract


def test_single_step_result_goes_to_success_with_output_and_result_json(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"copy": module(EXAMPLE)})
    folder = make_task(config, "t1", ["copy"], instances=4)
    inputs = file_hashes(folder)

    assert run_once(config) == [("t1", Outcome.SUCCESS)]

    paths = config.spool_paths()
    done = paths.success / "t1"
    assert not folder.exists()
    assert file_hashes(done) == inputs
    task = finished_task(done)
    assert task.process is not None and not isinstance(task.process, list)
    assert task.process.output == {"copied": 4}
    assert json.loads((done / "result.json").read_text()) == {"copied": 4}
    events = processor_events(config)
    assert task_events(events)[:1] == ["PROCESS_BEGIN"]
    assert "PROCESS_COMPLETE" in task_events(events) and "COMPLETE" in task_events(events)
    assert {"module_log", "module_output", "task_update"} <= set(kinds(events))
    output = next(e for e in events if e.kind == "module_output")
    assert output.payload["output"] == {"copied": 4}


def test_action_both_hands_the_result_to_the_dispatcher(tmp_path: Path) -> None:
    config = processor_config(
        tmp_path,
        modules={"copy": module(EXAMPLE)},
        targets={"pacs": {"target_type": "dummy"}},
        features={"dummy_target": True},
    )
    make_task(config, "t2", ["copy"], targets=["pacs"])

    run_once(config)

    outgoing = config.spool_paths().outgoing / "t2"
    task = finished_task(outgoing)
    assert task.dispatch is not None and task.dispatch.target_name == ["pacs"]
    assert len(dicom_names(outgoing)) == 3
    assert not (outgoing / ".processing").exists()


def test_module_sees_mercures_contract_and_runs_confined(tmp_path: Path) -> None:
    config = processor_config(
        tmp_path,
        modules={
            "probe": module(
                PROBE,
                environment='{"PROBE_COLOUR": "blue", "MERCURE_IN_DIR": "/elsewhere"}',
                settings={"level": 1},
                requires_persistence=True,
            )
        },
    )
    make_task(config, "t3", ["probe"], settings=[{"level": 2}])

    run_once(config)

    result = json.loads((config.spool_paths().success / "t3" / "result.json").read_text())
    assert result["uid"] != 0 and result["gid"] != 0
    assert result["cap_eff"] == "0000000000000000"
    assert result["no_new_privs"] == "1"
    assert result["interfaces"] == ["lo"]
    assert result["memory_limit"] == str(4 * 1024**3)  # processing_memory_limit's default
    assert result["pids_limit"] == "4096"
    assert result["env"]["PROBE_COLOUR"] == "blue"
    for name in ("MERCURE_IN_DIR", "MONAI_INPUTPATH", "HOLOSCAN_INPUT_PATH"):
        assert result["env"][name] == "/tmp/data"
    for name in ("MERCURE_OUT_DIR", "MONAI_OUTPUTPATH", "HOLOSCAN_OUTPUT_PATH"):
        assert result["env"][name] == "/tmp/output"
    assert result["env"]["MODULE_PERSISTENCE_DIR"] == "/tmp/persistence"
    assert result["persistence"] == []
    assert result["input_writable"] is False
    assert "task.json" in result["input_files"] and result["copied"] == 3
    assert sum(name.endswith(".tags") for name in result["input_files"]) == 3
    assert result["task_keys"] == sorted(
        ["id", "info", "dispatch", "process", "study", "nomad_info"]
    )
    assert result["process"]["module_name"] == "probe"
    assert result["process"]["settings"] == {"level": 2}


def test_module_with_network_enabled_gets_a_network(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"probe": module(PROBE, network_enabled=True)})
    make_task(config, "t4", ["probe"])

    run_once(config)

    result = json.loads((config.spool_paths().success / "t4" / "result.json").read_text())
    assert result["interfaces"] != ["lo"]


def test_chain_passes_each_output_to_the_next_step(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"first": module(EXAMPLE), "second": module(PROBE)})
    make_task(config, "t5", ["first", "second"], settings=[{"result": {"step": 1}}, {"x": 2}])

    run_once(config)

    done = config.spool_paths().success / "t5"
    task = finished_task(done)
    assert isinstance(task.process, list)
    assert task.process[0].output == {"step": 1}
    probe = task.process[1].output
    assert probe["process"]["module_name"] == "second"
    assert "result.json" not in probe["input_files"]  # step 1's was consumed
    assert probe["copied"] == 3
    combined = json.loads((done / "result.json").read_text())
    assert [name for name, _ in combined] == ["first", "second"]


def test_retain_input_images_keeps_the_received_files_beside_the_output(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"copy": module(EXAMPLE)})
    folder = make_task(config, "t6", ["copy"], retain=True)
    tags = sorted(path.name for path in folder.glob("*.tags"))

    run_once(config)

    done = config.spool_paths().success / "t6"
    assert sorted(path.name for path in done.glob("*.tags")) == tags


# ---------------------------------------------------------------------------- failures


def test_module_exiting_1_moves_the_task_to_error_with_code_and_output(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"bad": module(EXAMPLE, settings={"exit_code": 1})})
    folder = make_task(config, "t7", ["bad"])
    inputs = file_hashes(folder)

    assert run_once(config) == [("t7", Outcome.ERROR)]

    failed = config.spool_paths().error / "t7"
    task = finished_task(failed)
    assert task.info.fail_stage == "PROCESSING"
    assert task.info.fail_reason is not None
    assert "exited with code 1" in task.info.fail_reason
    assert "caduceus-example: copied 3 file(s), exit code 1" in task.info.fail_reason
    assert file_hashes(failed / "input") == inputs  # untouched, for a restart
    assert (failed / "run" / "1" / "module.log").exists()
    assert not (failed / ".processing").exists()
    events = processor_events(config)
    assert "processing_failed" in kinds(events)
    assert any(e.kind == "module_log" and "exit code 1" in e.payload["logs"] for e in events)


def test_failed_task_restarts_from_its_untouched_input(tmp_path: Path) -> None:
    bad = processor_config(tmp_path, modules={"m": module(EXAMPLE, settings={"exit_code": 3})})
    make_task(bad, "t8", ["m"], settings=[{}])
    run_once(bad)
    paths = bad.spool_paths()
    task_path = paths.error / "t8" / "task.json"
    data = json.loads(task_path.read_text())
    data["process"]["settings"] = {}  # the admin fixed the rule's settings
    task_path.write_text(json.dumps(data))

    restart_task(
        paths,
        "t8",
        ProcessEvents(Outbox(paths.state / "outbox" / "processor.sqlite3", "processor")),
    )
    good = processor_config(tmp_path, modules={"m": module(EXAMPLE)})
    assert run_once(good) == [("t8", Outcome.SUCCESS)]

    assert len(dicom_names(paths.success / "t8")) == 3
    assert finished_task(paths.success / "t8").info.fail_stage is None
    assert finished_task(paths.success / "t8").info.fail_reason is None
    assert "PROCESS_RESTART" in task_events(processor_events(good))


def test_module_retries_run_it_again_before_giving_up(tmp_path: Path) -> None:
    config = processor_config(
        tmp_path, modules={"flaky": module(EXAMPLE, settings={"exit_code": 5}, retries=2)}
    )
    make_task(config, "t9", ["flaky"])

    outcomes = []
    for _ in range(3):
        outcomes += run_once(config)

    assert [outcome for _, outcome in outcomes] == [Outcome.RETRY, Outcome.RETRY, Outcome.ERROR]
    task = finished_task(config.spool_paths().error / "t9")
    assert task.info.process_failures == 3


def test_module_past_its_timeout_is_killed_and_the_task_fails_with_timeout(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    config = processor_config(
        tmp_path, modules={"slow": module(EXAMPLE, settings={"sleep": 600}, timeout=3)}
    )
    make_task(config, "t10", ["slow"])

    started = time.monotonic()
    assert run_once(config) == [("t10", Outcome.ERROR)]

    assert time.monotonic() - started < 60
    reason = finished_task(config.spool_paths().error / "t10").info.fail_reason
    assert reason is not None and reason.startswith("timeout: module 'slow' ran longer than 3 s")
    assert containers_of(docker_client, "t10") == []


def test_missing_image_fails_naming_the_tag(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"ghost": module("caduceus-test/no-such:1.0")})
    make_task(config, "t11", ["ghost"])

    assert run_once(config) == [("t11", Outcome.ERROR)]

    reason = finished_task(config.spool_paths().error / "t11").info.fail_reason
    assert reason == (
        "image 'caduceus-test/no-such:1.0' is not on the Docker engine "
        "(processing_pull_images is off)"
    )


def test_unreachable_engine_is_retried_then_reported(tmp_path: Path) -> None:
    socket = tmp_path / "no-docker.sock"
    config = processor_config(
        tmp_path,
        modules={"copy": module(EXAMPLE)},
        docker_url=f"unix://{socket}",
        processing_retry_max=2,
    )
    make_task(config, "t12", ["copy"])

    first = run_once(config)
    second = run_once(config)

    assert [o for _, o in first + second] == [Outcome.RETRY, Outcome.ERROR]
    reason = finished_task(config.spool_paths().error / "t12").info.fail_reason
    assert reason is not None and reason.startswith(f"Docker engine unreachable at unix://{socket}")
    events = processor_events(config)
    assert any(
        e.kind == "system_event" and "unreachable" in e.payload["description"] for e in events
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"docker_arguments": '{"privileged": true}'},
            "module 'm': docker_arguments privileged not allowed",
        ),
        (
            {"additional_volumes": '{"/etc": {"bind": "/host-etc", "mode": "ro"}}'},
            "module 'm': additional_volumes '/etc' is outside the allowed roots",
        ),
        ({"requires_root": True}, "module 'm' requires root, but support_root_modules is off"),
        (
            {"requires_persistence": True, "persistence_folder_name": "../../etc"},
            "module 'm': persistence_folder_name '../../etc' must be a plain folder name",
        ),
    ],
)
def test_unsafe_module_settings_fail_the_task_naming_the_setting(
    tmp_path: Path, fields: dict[str, object], expected: str
) -> None:
    config = processor_config(tmp_path, modules={"m": module(EXAMPLE, **fields)})
    make_task(config, "t13", ["m"])

    assert run_once(config) == [("t13", Outcome.ERROR)]

    reason = finished_task(config.spool_paths().error / "t13").info.fail_reason
    assert reason is not None and reason.startswith(expected)


def test_allowed_docker_arguments_and_volumes_are_applied(tmp_path: Path) -> None:
    shared = tmp_path / "volumes" / "atlas"
    shared.mkdir(parents=True)
    (shared / "atlas.txt").write_text("atlas")
    config = processor_config(
        tmp_path,
        processing_volume_roots=[str(tmp_path / "volumes")],
        modules={
            "probe": module(
                PROBE,
                docker_arguments='{"environment": {"PROBE_FROM_ARGS": "yes"}, "mem_limit": "256m"}',
                additional_volumes=json.dumps({str(shared): {"bind": "/atlas", "mode": "ro"}}),
            )
        },
    )
    make_task(config, "t14", ["probe"])

    assert run_once(config) == [("t14", Outcome.SUCCESS)]

    result = json.loads((config.spool_paths().success / "t14" / "result.json").read_text())
    assert result["env"]["PROBE_FROM_ARGS"] == "yes"
    assert result["memory_limit"] == str(256 * 1024**2)
    assert result["atlas"] == ["atlas.txt"]


# ---------------------------------------------------------------------------- routing


def routing_config(tmp_path: Path, **rule: object) -> Config:
    targets = {name: {"target_type": "dummy"} for name in ("pacs", "ai", "backup", "other")}
    return processor_config(
        tmp_path,
        features={"dummy_target": True},
        targets=targets,
        modules={"m": module(EXAMPLE)},
        rules={
            "rule": {
                "rule": "True",
                "action": "both",
                "target": ["pacs"],
                "processing_module": ["m"],
                **rule,
            }
        },
    )


@pytest.mark.parametrize(
    ("rule", "request_", "folder", "targets"),
    [
        (
            {"dynamic_routing": True, "dynamic_routing_allowed_targets": ["ai"]},
            {"target": "ai"},
            "outgoing",
            ["ai"],
        ),
        (
            {"dynamic_routing": True, "dynamic_routing_allowed_targets": ["ai", "backup"]},
            {"target": ["backup", "ai", "other"]},
            "outgoing",
            ["backup", "ai"],
        ),
        (
            {"dynamic_routing": True, "dynamic_routing_allowed_targets": []},
            {"target": "ai"},
            "outgoing",
            ["pacs"],
        ),
        (
            {"dynamic_routing": False, "dynamic_routing_allowed_targets": ["ai"]},
            {"target": "ai"},
            "outgoing",
            ["pacs"],
        ),
        ({"dynamic_routing": True}, {"discard": True}, "discard", ["pacs"]),
        (
            {"dynamic_routing": True, "conditional_alternate_target": "backup"},
            {"use_alternate_target": True},
            "outgoing",
            ["backup"],
        ),
    ],
)
def test_dynamic_routing_of_the_last_module_is_honoured_within_the_allow_list(
    tmp_path: Path,
    rule: dict[str, object],
    request_: dict[str, object],
    folder: str,
    targets: list[str],
) -> None:
    config = routing_config(tmp_path, **rule)
    make_task(
        config,
        "t15",
        ["m"],
        targets=["pacs"],
        settings=[{"result": {"__mercure_routing": request_}}],
    )

    run_once(config)

    done = getattr(config.spool_paths(), folder) / "t15"
    task = finished_task(done)
    assert task.dispatch is not None and task.dispatch.target_name == targets


def test_refused_dynamic_targets_are_reported(tmp_path: Path) -> None:
    config = routing_config(tmp_path, dynamic_routing=True, dynamic_routing_allowed_targets=["ai"])
    make_task(
        config,
        "t16",
        ["m"],
        targets=["pacs"],
        settings=[{"result": {"__mercure_routing": {"target": ["ai", "other"]}}}],
    )

    run_once(config)

    events = processor_events(config)
    ignored = [e for e in events if e.kind == "dynamic_routing_ignored"]
    assert len(ignored) == 1 and "'other'" in ignored[0].payload["reason"]


def test_unknown_routing_keys_are_reported_not_silently_dropped(tmp_path: Path) -> None:
    config = routing_config(tmp_path, dynamic_routing=True, dynamic_routing_allowed_targets=["ai"])
    make_task(
        config,
        "t22",
        ["m"],
        targets=["pacs"],
        settings=[{"result": {"__mercure_routing": {"targets": ["ai"]}}}],
    )

    run_once(config)

    ignored = [e for e in processor_events(config) if e.kind == "dynamic_routing_ignored"]
    assert [e.payload["reason"] for e in ignored] == [
        "__mercure_routing: unknown keys ignored: 'targets'"
    ]
    assert finished_task(config.spool_paths().outgoing / "t22").dispatch.target_name == ["pacs"]  # type: ignore[union-attr]


def test_module_requested_notification_is_recorded(tmp_path: Path) -> None:
    config = processor_config(
        tmp_path,
        modules={"m": module(EXAMPLE)},
        rules={
            "rule": {
                "rule": "True",
                "action": "process",
                "processing_module": ["m"],
                "notification_webhook": "http://127.0.0.1:9/hook",
                "notification_trigger_completion_on_request": True,
            }
        },
    )
    make_task(config, "t17", ["m"], settings=[{"notification": "nodule found"}])

    run_once(config)

    requested = [e for e in processor_events(config) if e.kind == "notification_requested"]
    assert len(requested) == 1 and requested[0].payload["text"] == "nodule found"


# ---------------------------------------------------------------------------- the service


def test_halt_file_stops_new_tasks(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"copy": module(EXAMPLE)})
    make_task(config, "t18", ["copy"])
    (config.spool_paths().processing / "HALT").touch()

    assert run_once(config) == []

    assert (config.spool_paths().processing / "t18" / "task.json").exists()


def test_processor_killed_while_a_container_runs_recovers_the_task(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    config = processor_config(
        tmp_path,
        modules={"slow": module(EXAMPLE, settings={"sleep": 4, "write_marker": "started"})},
    )
    config_path = write_config(tmp_path / "caduceus.json", config)
    folder = make_task(config, "t19", ["slow"])
    paths = config.spool_paths()
    log = tmp_path / "processor.log"

    first = start_processor(config_path, log)
    try:
        wait_until(
            (folder / "run" / "1" / "out" / "started").exists,
            timeout=60,
            what="the module to start",
        )
        assert containers_of(docker_client, "t19")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert containers_of(docker_client, "t19")  # left running by the dead processor

    second = start_processor(config_path, log)
    try:
        wait_until((paths.success / "t19").exists, timeout=180, what="the task to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)

    assert len(dicom_names(paths.success / "t19")) == 3
    assert not folder.exists()
    assert containers_of(docker_client, "t19") == []
    events = processor_events(config)
    assert "lock_recovered" in kinds(events)


def test_a_container_of_a_dead_processor_is_removed_when_a_processor_starts(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = dataclasses.replace(LockOwner.me("processor"), pid=dead.pid, started=1.0)
    orphan = docker_client.containers.run(
        EXAMPLE,
        detach=True,
        network_mode="none",
        labels={
            LABEL_SERVICE: "processor",
            LABEL_TASK: "orphan-task",
            LABEL_OWNER: owner.to_json().decode(),
        },
        environment={"MERCURE_IN_DIR": "/nonexistent"},
        entrypoint=["python3", "-c", "import time; time.sleep(300)"],
    )
    config = processor_config(tmp_path, modules={})
    proc = start_processor(write_config(tmp_path / "c.json", config), tmp_path / "p.log")
    try:
        wait_until(
            lambda: containers_of(docker_client, "orphan-task") == [],
            timeout=60,
            what="the orphan to be removed",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        with contextlib.suppress(docker.errors.NotFound):
            orphan.remove(force=True)


def test_sigterm_kills_the_running_module_and_leaves_the_task_to_run_again(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    config = processor_config(
        tmp_path,
        modules={"slow": module(EXAMPLE, settings={"sleep": 300, "write_marker": "started"})},
    )
    config_path = write_config(tmp_path / "caduceus.json", config)
    folder = make_task(config, "t20", ["slow"])
    proc = start_processor(config_path, tmp_path / "processor.log")
    try:
        wait_until(
            (folder / "run" / "1" / "out" / "started").exists,
            timeout=60,
            what="the module to start",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)

    assert code == 0
    assert containers_of(docker_client, "t20") == []
    task = finished_task(folder)
    assert task.info.process_failures == 0 and task.info.fail_stage is None
    assert not (folder / ".processing").exists()


def test_missing_image_is_pulled_only_when_asked_and_a_pull_failure_is_named(
    tmp_path: Path,
) -> None:
    tag = "127.0.0.1:9/caduceus-test/unreachable:1.0"  # a registry nobody serves
    config = processor_config(
        tmp_path, processing_pull_images=True, processing_retry_max=1, modules={"m": module(tag)}
    )
    make_task(config, "t21", ["m"])

    assert run_once(config) == [("t21", Outcome.ERROR)]

    reason = finished_task(config.spool_paths().error / "t21").info.fail_reason
    assert reason is not None
    assert reason.startswith(f"image {tag!r} is missing and cannot be pulled:")


def test_two_processors_on_one_spool_run_every_task_exactly_once(tmp_path: Path) -> None:
    config = processor_config(
        tmp_path,
        modules={"copy": module(EXAMPLE, settings={"sleep": 1})},
        processing_max_parallel=2,
    )
    config_path = write_config(tmp_path / "caduceus.json", config)
    ids = [f"m{n}" for n in range(6)]
    for task_id in ids:
        make_task(config, task_id, ["copy"], instances=1, seed=task_id)
    paths = config.spool_paths()
    processes = [start_processor(config_path, tmp_path / f"p{n}.log") for n in range(2)]
    try:
        wait_until(
            lambda: all((paths.success / task_id).exists() for task_id in ids),
            timeout=180,
            what="every task in success/",
        )
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=60) for process in processes]

    assert codes == [0, 0]
    assert sorted(entry.name for entry in paths.success.iterdir()) == ids
    begun = [
        e.payload["task_id"]
        for e in processor_events(config)
        if e.kind == "task_event" and e.payload["event"] == "PROCESS_BEGIN"
    ]
    assert sorted(begun) == ids
