"""Overhead of one processing step (issue 5): the processor against ``docker run`` by hand.

The same 300-slice CT series (``bench.data.CT_SERIES``, 512x512x16 bit) is processed by the
first-party example module (``caduceus/example``: it copies its input to its output and writes
``result.json``), in the same run, two ways:

* **processor**: a task folder in ``processing/`` as the router leaves it; timed from the
  moment the processor picks it (``ProcessRunner.run``: claim, input moved to ``input/``, hard
  links for the step, container created, started and waited for, logs read, container removed,
  ``result.json`` read, output moved to ``success/``, folder removed, events recorded) to the
  result in ``success/``.
* **by hand**: ``docker run --rm --network none --user 65534:65534 -v in:/tmp/data:ro
  -v out:/tmp/output caduceus/example:latest`` on a folder with the same files and a
  ``task.json``, timed around the command.

Overhead = processor - by hand, the median of the repetitions, which alternate between the
two. Needs a running Docker engine and the module images (``modules/build-images``).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Final

from bench import data
from common.config import parse_config
from common.outbox import Outbox
from common.spool import SEPARATOR
from common.task import Task, TaskInfo, TaskProcessing, write_task
from processor.events import ProcessEvents
from processor.execute import Outcome, ProcessRunner
from processor.settings import ProcessorSettings

OUT: Final = Path(__file__).resolve().parent / "out"
IMAGE: Final = "caduceus/example:latest"
TARGET_NOTE: Final = "issue 5 asks for the figure, against docker run by hand; no threshold"


def _place(instances: list[data.Instance], folder: Path) -> None:
    """Hard links named as the router names them (``<series>#<name>.dcm``)."""
    folder.mkdir(parents=True)
    for inst in instances:
        (folder / f"bench{SEPARATOR}{inst.path.name}").hardlink_to(inst.path)


def _task(task_id: str) -> Task:
    return Task(
        id=task_id,
        info=TaskInfo(action="process", uid="1.2.3", uid_type="series", applied_rule="bench"),
        process=TaskProcessing(module_name="copy", settings={}),
    )


def _processor_once(spool: Path, instances: list[data.Instance], rep: int) -> float:
    config = parse_config(
        {"data_root": str(spool), "modules": {"copy": {"docker_tag": IMAGE}}}, report=False
    )
    paths = config.spool_paths()
    paths.create()
    task_id = f"bench-{rep}"
    staging = paths.processing / f".tmp-{task_id}"
    _place(instances, staging)
    write_task(staging / "task.json", _task(task_id))
    folder = paths.processing / task_id
    staging.rename(folder)
    events = ProcessEvents(Outbox(paths.state / "outbox" / "processor.sqlite3", "processor"))
    runner = ProcessRunner(paths, events)
    try:
        started = time.perf_counter()
        outcome = runner.run(folder, config, ProcessorSettings.from_config(config))
        elapsed = time.perf_counter() - started
    finally:
        events.close()
    if outcome != Outcome.SUCCESS:
        raise RuntimeError(f"processing failed: {outcome}")
    if len(list((paths.success / task_id).glob("*.dcm"))) != len(instances):
        raise RuntimeError("the processed task lacks files")
    return elapsed


def _by_hand_once(work: Path, instances: list[data.Instance], rep: int) -> float:
    in_dir, out_dir = work / f"hand-{rep}" / "in", work / f"hand-{rep}" / "out"
    _place(instances, in_dir)
    write_task(in_dir / "task.json", _task(f"hand-{rep}"))
    out_dir.mkdir()
    shutil.chown(out_dir, 65534, 65534)
    command = [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        "65534:65534",
        "-v",
        f"{in_dir}:/tmp/data:ro",
        "-v",
        f"{out_dir}:/tmp/output",
        IMAGE,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    elapsed = time.perf_counter() - started
    if len(list(out_dir.glob("*.dcm"))) != len(instances):
        raise RuntimeError("docker run produced too few files")
    return elapsed


def bench_processor(work: Path, quick: bool) -> dict[str, Any]:
    dataset = data.ensure(data.CT_SERIES, OUT / "data")
    instances = dataset.instances[: 60 if quick else 300]
    reps = 1 if quick else 5
    work.mkdir(parents=True, exist_ok=True)
    processor: list[float] = []
    by_hand: list[float] = []
    for rep in range(reps):
        by_hand.append(_by_hand_once(work, instances, rep))
        processor.append(_processor_once(work / f"spool-{rep}", instances, rep))
        shutil.rmtree(work / f"hand-{rep}")
        shutil.rmtree(work / f"spool-{rep}")
    return {
        "instances": len(instances),
        "total_bytes": sum(inst.size for inst in instances),
        "reps": reps,
        "processor_s": processor,
        "by_hand_s": by_hand,
        "processor_median_s": statistics.median(processor),
        "by_hand_median_s": statistics.median(by_hand),
        "overhead_median_s": statistics.median(
            p - h for p, h in zip(processor, by_hand, strict=True)
        ),
        "docker": subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
    }


def markdown(result: dict[str, Any]) -> str:
    runs = ", ".join(
        f"{p:.2f}/{h:.2f}" for p, h in zip(result["processor_s"], result["by_hand_s"], strict=True)
    )
    return "\n".join(
        [
            f"{result['instances']} CT instances ({result['total_bytes'] / 1e6:.1f} MB), the"
            f" example module (`{IMAGE}`, copies input to output), Docker engine"
            f" {result['docker']}; {result['reps']} alternating repetitions, medians."
            f" ({TARGET_NOTE}.)",
            "",
            "| measurement | seconds |",
            "|---|---:|",
            "| processor: task picked → results in success/ |"
            f" {result['processor_median_s']:.2f} |",
            f"| `docker run --rm` of the same image by hand | {result['by_hand_median_s']:.2f} |",
            f"| **overhead of the processor** (per-run difference, median) |"
            f" **{result['overhead_median_s']:.2f}** |",
            "",
            f"Each run, processor/by hand (s): {runs}.",
            "",
            "The processor's extra work over `docker run`: the claim, moving the files into"
            " `input/`, one hard link per file for the step, `task.json` for the module, the"
            " ownership of `out/`, reading the logs and `result.json`, the final `task.json`"
            " (fsync), the rename to `success/` and the events in the outbox.",
        ]
    )
