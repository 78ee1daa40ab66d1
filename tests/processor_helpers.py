"""What the processor tests share: a real Docker engine, the module images, task folders.

The images are built by ``modules/build-images`` (the base from a debootstrap root filesystem,
cached; the modules on it) plus the test-only probe module of ``tests/fixtures/probe-module``.
Without an engine the tests skip, except under CI, where they fail (``.ci/run`` starts one).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import docker
import docker.errors
import pytest

from common.config import Config, parse_config
from common.outbox import Event
from common.spool import SEPARATOR
from common.task import Task, TaskDispatch, TaskInfo, TaskProcessing, read_task, write_task
from processor.runtime import LABEL_TASK
from tests import dicom_factory
from tests.helpers import IN_CI, outbox_events

REPO: Final = Path(__file__).resolve().parent.parent
EXAMPLE: Final = "caduceus/example:latest"
ANONYMIZER: Final = "caduceus/anonymizer:latest"
PROBE: Final = "caduceus-test/probe:latest"
PROBE_CONTEXT: Final = REPO / "tests" / "fixtures" / "probe-module"


def require_docker() -> docker.DockerClient:
    """A client of a running engine; skip without one (fail when CI is set)."""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        message = f"no Docker engine ({exc}); install docker.io and start dockerd (.ci/run does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return client


def build_images(client: docker.DockerClient) -> None:
    """Build the module images (idempotent, quick when up to date) and the probe."""
    done = subprocess.run(
        [str(REPO / "modules" / "build-images")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"modules/build-images failed:\n{done.stdout}\n{done.stderr}")
    client.images.build(path=str(PROBE_CONTEXT), tag=PROBE, rm=True, pull=False)


def containers_of(client: docker.DockerClient, task_id: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={task_id}"}))


# ---------------------------------------------------------------------------- configuration


def module(tag: str = EXAMPLE, **fields: Any) -> dict[str, Any]:
    return {"docker_tag": tag, **fields}


def processor_config(data_root: Path, **fields: Any) -> Config:
    raw: dict[str, Any] = {
        "data_root": str(data_root),
        "dispatcher_scan_interval": 0.2,
        "processing_retry_delay": 0,
        "modules": {},
        "rules": {},
        "targets": {},
    }
    raw.update(fields)
    return parse_config(raw, report=False)


def write_config(path: Path, config: Config) -> Path:
    path.write_text(json.dumps(config.dump_for_file(), indent=2), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- task folders


def make_task(
    config: Config,
    task_id: str,
    modules: list[str],
    *,
    rule: str = "rule",
    targets: list[str] | None = None,
    settings: list[dict[str, Any]] | None = None,
    instances: int = 3,
    retain: bool = False,
    seed: str = "proc",
) -> Path:
    """A task folder in ``processing/`` as the router builds it: ``<series>#<name>.dcm`` with
    their ``.tags`` and a ``task.json`` with one step per module."""
    paths = config.spool_paths()
    paths.create()
    scratch = paths.state / "factory" / task_id
    scratch.mkdir(parents=True)
    made = dicom_factory.ct_series(scratch, instances, seed=seed, rows=16, columns=16)
    folder = paths.processing / f".tmp-{task_id}"
    folder.mkdir()
    for instance in made:
        name = f"{instance.series_uid}{SEPARATOR}{instance.path.stem}"
        shutil.copyfile(instance.path, folder / f"{name}.dcm")
        (folder / f"{name}.tags").write_text(
            json.dumps({"SeriesInstanceUID": instance.series_uid}), encoding="utf-8"
        )
    shutil.rmtree(scratch)
    steps = [
        TaskProcessing(
            module_name=name,
            module_config=config.modules.get(name, None),
            settings={
                **(config.modules[name].settings if name in config.modules else {}),
                **((settings or [])[index] if settings and index < len(settings) else {}),
            },
            retain_input_images=retain,
        )
        for index, name in enumerate(modules)
    ]
    task = Task(
        id=task_id,
        info=TaskInfo(
            action="both" if targets else "process",
            uid=made[0].series_uid,
            uid_type="series",
            triggered_rules={rule: True},
            applied_rule=rule,
            patient_name="Doe^Jane",
            mrn="PID-0042",
        ),
        dispatch=TaskDispatch(target_name=targets) if targets else None,
        process=steps[0] if len(steps) == 1 else steps,
    )
    write_task(folder / "task.json", task)
    final = paths.processing / task_id
    folder.rename(final)
    return final


def start_processor(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m processor`` as its own process group, output appended to ``log``."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "processor", "--config", str(config_path)],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def dicom_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.dcm"))


def file_hashes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.dcm"))}


def finished_task(folder: Path) -> Task:
    return read_task(folder / "task.json")


def processor_events(config: Config) -> list[Event]:
    return outbox_events(config.spool_paths().state / "outbox" / "processor.sqlite3")


def kinds(events: list[Event]) -> list[str]:
    return [event.kind for event in events]


def task_events(events: list[Event]) -> list[str]:
    return [str(e.payload["event"]) for e in events if e.kind == "task_event"]
