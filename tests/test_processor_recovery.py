"""A processor that died while moving a finished result: the next one completes the move and
runs nothing again (no Docker engine involved: nothing may run)."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.task import read_task, write_task
from processor.events import ProcessEvents
from processor.execute import Outcome, ProcessRunner
from processor.settings import ProcessorSettings
from processor.workspace import FINISHED, Workspace
from tests.processor_helpers import make_task, module, processor_config


def test_a_result_left_with_finished_is_moved_on_without_running_the_module(
    tmp_path: Path,
) -> None:
    config = processor_config(
        tmp_path,
        modules={"m": module("caduceus-test/never-run:1")},
        docker_url=f"unix://{tmp_path}/no-engine.sock",
    )
    folder = make_task(config, "x1", ["m"])
    ws = Workspace(folder)
    ws.gather_input()
    ws.result.mkdir()
    for path in ws.input.glob("*.dcm"):
        shutil.copyfile(path, ws.result / path.name)
    write_task(ws.result / "task.json", read_task(ws.task_file))
    (folder / FINISHED).write_text('{"folder": "success"}')
    paths = config.spool_paths()

    outcome = ProcessRunner(paths, ProcessEvents(None)).run(
        folder, config, ProcessorSettings.from_config(config)
    )

    assert outcome == Outcome.SUCCESS
    assert not folder.exists()
    assert len(list((paths.success / "x1").glob("*.dcm"))) == 3
    assert read_task(paths.success / "x1" / "task.json").id == "x1"


def test_a_folder_whose_result_was_already_moved_is_only_removed(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"m": module()})
    folder = make_task(config, "x2", ["m"])
    (folder / FINISHED).write_text('{"folder": "outgoing"}')
    paths = config.spool_paths()

    outcome = ProcessRunner(paths, ProcessEvents(None)).run(
        folder, config, ProcessorSettings.from_config(config)
    )

    assert outcome == Outcome.SUCCESS
    assert not folder.exists()
    assert list(paths.outgoing.iterdir()) == []


def test_a_failing_move_of_a_finished_result_keeps_the_result(tmp_path: Path) -> None:
    config = processor_config(tmp_path, modules={"m": module()})
    folder = make_task(config, "x3", ["m"])
    ws = Workspace(folder)
    ws.gather_input()
    ws.result.mkdir()
    write_task(ws.result / "task.json", read_task(ws.task_file))
    (folder / FINISHED).write_text('{"folder": "success"}')
    paths = config.spool_paths()
    paths.success.rmdir()
    paths.success.write_text("a file where the success folder should be")

    outcome = ProcessRunner(paths, ProcessEvents(None)).run(
        folder, config, ProcessorSettings.from_config(config)
    )

    assert outcome == Outcome.RETRY
    assert (ws.result / "task.json").exists()
    assert (folder / FINISHED).exists()
