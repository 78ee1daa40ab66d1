"""Which processing tasks are ready and in which order (no Docker needed)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from common.config import Config
from common.task import now_utc, read_task, write_task
from common.task_queue import BROKEN_GRACE, Scheduler, TaskCache
from processor.queue import scan
from processor.workspace import FINISHED
from tests.processor_helpers import make_task, module, processor_config


def queue_config(tmp_path: Path) -> Config:
    rules = {
        name: {"rule": "True", "action": "process", "processing_module": ["m"], "priority": name}
        for name in ("urgent", "normal", "offpeak")
    }
    return processor_config(tmp_path, modules={"m": module()}, rules=rules)


def ready_ids(config: Config, *, offpeak: bool = False) -> list[str]:
    ready, _ = scan(
        config.spool_paths().processing,
        config,
        now=now_utc(),
        offpeak=offpeak,
        cache=TaskCache(),
    )
    return [c.task_id for c in Scheduler().pick(ready, 10)]


def test_urgent_tasks_go_first_but_not_forever_and_offpeak_waits_for_its_window(
    tmp_path: Path,
) -> None:
    config = queue_config(tmp_path)
    for index, (task_id, rule) in enumerate(
        [("n1", "normal"), ("u1", "urgent"), ("o1", "offpeak"), ("u2", "urgent"), ("u3", "urgent")]
    ):
        folder = make_task(config, task_id, ["m"], rule=rule, instances=1, seed=task_id)
        os.utime(folder, (1_000 + index, 1_000 + index))

    assert ready_ids(config) == ["u1", "u2", "n1", "u3"]
    assert ready_ids(config, offpeak=True) == ["u1", "u2", "n1", "u3", "o1"]


def test_a_task_waiting_for_its_retry_is_not_ready(tmp_path: Path) -> None:
    config = queue_config(tmp_path)
    folder = make_task(config, "r1", ["m"], rule="normal", instances=1)
    task = read_task(folder / "task.json")
    task.info.process_next_retry_at = now_utc() + timedelta(minutes=5)
    write_task(folder / "task.json", task)

    assert ready_ids(config) == []


def test_claimed_locked_and_halted_folders_are_skipped_but_a_finished_one_is_ready(
    tmp_path: Path,
) -> None:
    config = queue_config(tmp_path)
    locked = make_task(config, "l1", ["m"], instances=1, seed="l1")
    (locked / ".lock").touch()
    finished = make_task(config, "f1", ["m"], instances=1, seed="f1")
    (finished / "task.json").unlink()
    (finished / FINISHED).write_text('{"folder": "success"}')

    assert ready_ids(config) == ["f1"]


def test_a_folder_without_a_valid_task_is_broken_after_the_grace_period(tmp_path: Path) -> None:
    config = queue_config(tmp_path)
    folder = make_task(config, "b1", ["m"], instances=1)
    (folder / "task.json").write_text("{not json")
    old = time.time() - BROKEN_GRACE - 5
    os.utime(folder / "task.json", (old, old))
    os.utime(folder, (old, old))

    ready, broken = scan(
        config.spool_paths().processing, config, now=now_utc(), offpeak=False, cache=TaskCache()
    )

    assert ready == []
    assert [item.folder.name for item in broken] == ["b1"]
    assert "invalid JSON" in broken[0].reason
