"""Pipeline overhead: last instance received -> last instance at the target (issue 4).

:func:`bench_pipeline` sends the 300-slice CT series (``bench.data.CT_SERIES``) through the whole
pipeline — DCMTK ``storescu`` -> ``python -m receiver`` -> ``python -m router`` ->
``python -m dispatcher`` -> DCMTK ``storescp`` (bit-preserving, max PDU 128 KiB, ``TCP_NODELAY=1``)
— every service a process of its own on one configuration, as in production (receiver fsync on,
one route rule). In the same run it measures the **pure send time**: ``storescu`` sending the
same files straight to a fresh ``storescp`` (``bench.sender.send``, process start to exit).

For each pipeline run, from file times on the real file system (one clock):

* ``received``: the newest ``.dcm``/``.tags`` of the task, which keep the receiver's mtimes
  through the router's hard links and the dispatcher's rename — the last instance received;
* ``at_target``: the newest file ``storescp`` wrote — the last instance at the target;
* ``overhead = at_target - received - series_complete_trigger - pure send time`` (target < 1 s).

The breakdown: ``complete_to_task`` (series complete -> the router's ``info.created_at``: the
router's scan latency and routing), ``task_to_first`` (-> the first file at ``storescp``:
delivery, the dispatcher's scan latency, the association), ``dispatch`` (first -> last file at
``storescp``; compare with the pure send time).

Two configurations run: ``default intervals`` (``router_scan_interval`` and
``dispatcher_scan_interval`` 1 s, mercure's and Caduceus' defaults) and ``short intervals``
(0.1 s each). With polling loops the default intervals cost up to 2 s; since the router sleeps
until the next series becomes complete and the dispatcher wakes when a task folder is renamed
into ``outgoing/`` (``docs/router.md``, ``docs/dispatcher.md``), both rows should agree.

Call it as ``bench_pipeline(Path("bench/out/work/pipeline"), quick=True)`` (60 slices, one run
per configuration) or ``quick=False`` (300 slices, median of 3), or run
``python -m bench.pipeline_bench [--quick]``, which prints the result and writes
``bench/out/pipeline.json``. The work folder is wiped before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import data, procs, sender
from bench.peers import BENCH_API_KEY, REPO, StoreScp

logger = logging.getLogger("bench.pipeline")

OUT = REPO / "bench" / "out"
QUICK_SLICES = 60
TRIGGER_S = 1.0
"""``series_complete_trigger`` of the runs; subtracted from the measured time."""
TARGET_S = 1.0
DEADLINE_S = 300.0
"""Longest a run may take from the send to the last file at the target."""
QUIET_WAIT_S = 20.0
CONFIGS: dict[str, float] = {"default intervals": 1.0, "short intervals": 0.1}
"""Configuration name -> router and dispatcher scan interval, seconds."""
SERVICES = ("receiver", "router", "dispatcher")
READY_LINES = {"router": "routing ", "dispatcher": "dispatching "}
"""A line each loop logs when it starts (``router.service``, ``dispatcher.service``)."""


@dataclass
class PipelineRun:
    """One run through the pipeline; times in seconds."""

    overhead_s: float
    received_to_target_s: float
    complete_to_task_s: float
    task_to_first_s: float
    dispatch_s: float
    receive_s: float
    """storescu -> receiver, process start to exit (not part of the overhead)."""
    cpu_before: float


@dataclass
class ConfigResult:
    scan_interval_s: float
    runs: list[PipelineRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, name: str) -> float | None:
        values = [getattr(run, name) for run in self.runs]
        return round(statistics.median(values), 3) if values else None


def bench_pipeline(work_dir: Path, quick: bool) -> dict[str, Any]:
    """Measure the pipeline overhead in ``work_dir`` (wiped first and afterwards); see the
    module doc. Returns a JSON-ready dict; ``overhead_s`` per configuration is the median."""
    reps = 1 if quick else 3
    dataset = data.ensure(data.CT_SERIES, OUT / "data")
    instances = dataset.instances[: QUICK_SLICES if quick else None]
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    pure: list[float] = []
    pure_failures: list[str] = []
    results = {name: ConfigResult(interval) for name, interval in CONFIGS.items()}
    try:
        for rep in range(reps):
            logger.info("run %d/%d: storescu -> storescp", rep + 1, reps)
            _pure_send(instances, work_dir, pure, pure_failures)
            for name, result in results.items():
                logger.info("run %d/%d: the pipeline, %s", rep + 1, reps, name)
                try:
                    result.runs.append(_pipeline_run(instances, work_dir, result.scan_interval_s))
                except RunFailed as exc:
                    result.failures.append(str(exc))
        pure_s = statistics.median(pure) if pure else None
        if pure_s is not None:
            for result in results.values():
                for run in result.runs:
                    run.overhead_s = round(run.received_to_target_s - TRIGGER_S - pure_s, 3)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return _summary(instances, reps, pure, pure_failures, results)


class RunFailed(RuntimeError):
    """A run that did not deliver every instance, or whose services misbehaved."""


def _pure_send(
    instances: list[data.Instance], work: Path, seconds: list[float], failures: list[str]
) -> None:
    peer = StoreScp("storescp", work / "direct")
    peer.start()
    try:
        procs.wait_quiet(max_wait_s=QUIET_WAIT_S)
        sent = sender.send(peer.port, [instances], work / "direct-logs")
        got = set(peer.received().sop_uids)
        missing = sum(item.sop_uid not in got for item in instances)
        if sent.returncodes != [0] or missing:
            failures.append(f"storescu exit {sent.returncodes}, {missing} instance(s) missing")
        else:
            seconds.append(sent.wall_s)
    finally:
        peer.stop()
        peer.clean()


def _config(spool: Path, port: int, scp_port: int, interval: float) -> dict[str, Any]:
    return {
        "data_root": str(spool),
        "port": port,
        "bookkeeper_api_key": BENCH_API_KEY,
        "dicom_receiver": {"bind_address": "127.0.0.1", "min_free_space_mb": 100},
        "series_complete_trigger": TRIGGER_S,
        "router_scan_interval": interval,
        "dispatcher_scan_interval": interval,
        "targets": {
            "pacs": {"target_type": "dicom", "ip": "127.0.0.1", "port": scp_port, "aet_target": "X"}
        },
        "rules": {"everything": {"rule": "True", "action": "route", "target": "pacs"}},
    }


def _pipeline_run(instances: list[data.Instance], work: Path, interval: float) -> PipelineRun:
    run_dir = work / "pipeline"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    peer = StoreScp("storescp", run_dir / "target")
    peer.start()
    spool = run_dir / "spool"
    port = procs.free_port()
    config_path = run_dir / "caduceus.json"
    config_path.write_text(json.dumps(_config(spool, port, peer.port, interval), indent=2))
    started: dict[str, Any] = {}
    try:
        for service in SERVICES:
            args = [sys.executable, "-m", service, "--config", str(config_path)]
            started[service] = procs.start(args, run_dir / f"{service}.log", cwd=REPO)
        procs.wait_for_echo(port, started["receiver"])
        for service, line in READY_LINES.items():
            _wait_for_log(run_dir / f"{service}.log", line, started[service])
        os.sync()  # the receiver's fsyncs should not pay for earlier runs' writes
        cpu_before = procs.wait_quiet(max_wait_s=QUIET_WAIT_S)
        sent = sender.send(port, [instances], run_dir / "storescu-logs")
        if sent.returncodes != [0]:
            raise RunFailed(f"storescu -> receiver exited {sent.returncodes}")
        task = _wait_for_success(spool / "success", peer, instances, started)
        return _measure(task, peer.out_dir, sent.wall_s, cpu_before)
    finally:
        for service, proc in started.items():
            code, clean = procs.stop(proc)
            if not clean or code != 0:
                logger.warning("%s stopped with %s (clean=%s)", service, code, clean)
        peer.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _wait_for_log(path: Path, text: str, proc: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"{path.stem} exited with {proc.returncode}")
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RunFailed(f"{path.stem} did not start within 60 s")


def _wait_for_success(
    success: Path, peer: StoreScp, instances: list[data.Instance], started: dict[str, Any]
) -> Path:
    """The task folder once it is in success/ and storescp has every instance."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        tasks = [p for p in success.glob("*") if not p.name.startswith(".")]
        if tasks:
            got = set(peer.received().sop_uids)
            missing = sum(item.sop_uid not in got for item in instances)
            if len(tasks) != 1 or missing:
                raise RunFailed(f"{len(tasks)} task(s) in success/, {missing} instance(s) missing")
            return tasks[0]
        for service, proc in started.items():
            if proc.poll() is not None:
                raise RunFailed(f"{service} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RunFailed(f"no task in success/ within {DEADLINE_S:.0f} s")


def _measure(task: Path, target: Path, receive_s: float, cpu_before: float) -> PipelineRun:
    received = max(p.stat().st_mtime for p in task.iterdir() if p.suffix in (".dcm", ".tags"))
    arrived = [p.stat().st_mtime for p in target.glob("*.dcm")]
    first, last = min(arrived), max(arrived)
    created_at = json.loads((task / "task.json").read_text())["info"]["created_at"]
    created = datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()
    return PipelineRun(
        overhead_s=0.0,  # needs the pure send time: set by bench_pipeline
        received_to_target_s=round(last - received, 3),
        complete_to_task_s=round(created - received - TRIGGER_S, 3),
        task_to_first_s=round(first - created, 3),
        dispatch_s=round(last - first, 3),
        receive_s=round(receive_s, 3),
        cpu_before=round(cpu_before, 1),
    )


def _summary(
    instances: list[data.Instance],
    reps: int,
    pure: list[float],
    pure_failures: list[str],
    results: dict[str, ConfigResult],
) -> dict[str, Any]:
    configs: dict[str, Any] = {}
    for name, result in results.items():
        overhead = result.median("overhead_s")
        configs[name] = {
            "router_scan_interval_s": result.scan_interval_s,
            "dispatcher_scan_interval_s": result.scan_interval_s,
            "overhead_s": overhead,
            "target_met": overhead is not None and overhead < TARGET_S,
            "received_to_target_s": result.median("received_to_target_s"),
            "complete_to_task_s": result.median("complete_to_task_s"),
            "task_to_first_s": result.median("task_to_first_s"),
            "dispatch_s": result.median("dispatch_s"),
            "runs": [asdict(run) for run in result.runs],
            "failures": result.failures,
        }
    return {
        "instances": len(instances),
        "total_bytes": sum(item.size for item in instances),
        "reps": reps,
        "series_complete_trigger_s": TRIGGER_S,
        "target_s": TARGET_S,
        "pure_send_s": round(statistics.median(pure), 3) if pure else None,
        "pure_send_runs": [round(s, 3) for s in pure],
        "pure_send_failures": pure_failures,
        "configs": configs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_bench")
    parser.add_argument("--quick", action="store_true", help="60 slices, one run each")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = bench_pipeline(OUT / "work" / "pipeline", quick=args.quick)
    text = json.dumps(result, indent=2)
    (OUT / "pipeline.json").write_text(text + "\n")
    sys.stdout.write(text + "\n")
    failed = result["pure_send_failures"] or any(c["failures"] for c in result["configs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
