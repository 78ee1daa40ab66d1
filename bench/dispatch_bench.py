"""Dispatch throughput: the Caduceus dispatcher against DCMTK ``storescu``, both to ``storescp``.

``bench_dispatch()`` sends the 300-slice CT series (``bench.data.CT_SERIES``) to a fresh
``storescp`` (bit-preserving, max PDU 128 KiB, ``TCP_NODELAY=1``) in interleaved runs:

* **dispatcher**: the series as one task folder (hard links into a scratch spool), dispatched by
  an in-process :class:`dispatcher.service.DispatcherService` in ``once`` mode. Time runs from
  the call until the task folder is in ``success/``: scan, claim, association, every C-STORE
  answered, release, task.json written, folder moved.
* **storescu**: DCMTK ``storescu`` sending the same files over one association, from process
  start to exit (``bench.sender.send``).

Each peer run is checked: every SOP Instance UID must be on disk, else the run fails and is not
averaged in. Median of ``reps`` runs each. The sender's CPU time is measured too: the bench
process's own user + system time around the dispatch (the dispatcher runs in it), and
``storescu``'s from ``RUSAGE_CHILDREN`` around its run.

The **max-PDU sweep** dispatches the same series with the dispatcher's PDU cap
(``dispatcher_max_pdu``) at each size of ``CAP_SIZES``, to a peer that accepts PDUs up to
``peer_max_pdu`` (the Caduceus receiver, which advertises what it is told; storescp stops at
128 KiB), and, against storescp, with storescp's own ``-pdu`` limit.

``python -m bench.dispatch_bench [--quick]`` writes ``bench/out/dispatch.md``. From
``bench/__main__.py``: ``result = bench_dispatch(OUT / "work" / "dispatch", quick=args.quick)``
then ``report_markdown(result)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import data, procs, sender
from bench.peers import REPO, Caduceus, Peer, StoreScp
from common.config import parse_config
from common.logs import setup_logging
from dispatcher.service import DispatcherService
from dispatcher.settings import MEASURED_MAX_PDU

logger = logging.getLogger("bench.dispatch")

OUT = REPO / "bench" / "out"
QUICK_SLICES = 60
STORESCP_PDUS = (16384, 65536, 131072)
QUIET_WAIT = 20.0
"""Seconds each run waits at most for a quiet machine (``procs.wait_quiet``)."""
CAP_SIZES = (16384, 65536, 131072, 524288, 1 << 20, 4 << 20)


@dataclass
class Runs:
    """Seconds of each successful run, and the failures."""

    label: str
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    """User + system CPU seconds of the sender, per successful run."""

    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else None

    def mb_s(self, total_bytes: int) -> float | None:
        median = self.median()
        return total_bytes / median / 1e6 if median else None


@dataclass
class DispatchBenchResult:
    instances: int
    total_bytes: int
    reps: int
    dispatcher: Runs
    storescu: Runs
    storescp_pdu: dict[int, Runs]
    """storescp's own -pdu limit -> dispatcher runs (dispatcher cap 0: the peer decides)."""
    cap_pdu: dict[int, Runs]
    """Dispatcher cap -> runs against the Caduceus receiver advertising ``peer_max_pdu``."""
    peer_max_pdu: int
    cpu_before: float

    @property
    def ratio(self) -> float | None:
        ours, theirs = self.dispatcher.median(), self.storescu.median()
        return theirs / ours if ours and theirs else None


def bench_dispatch(
    work: Path,
    *,
    quick: bool = False,
    reps: int | None = None,
    slices: int | None = None,
    pdu_sweep: bool = True,
    peer_max_pdu: int = 16 << 20,
    quiet_wait: float = QUIET_WAIT,
) -> DispatchBenchResult:
    """Run the dispatch benchmark in ``work`` (wiped first and afterwards); see the module."""
    reps = reps or (1 if quick else 3)
    dataset = data.ensure(data.CT_SERIES, OUT / "data")
    instances = dataset.instances[: slices or (QUICK_SLICES if quick else None)]
    total = sum(item.size for item in instances)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = DispatchBenchResult(
        instances=len(instances),
        total_bytes=total,
        reps=reps,
        dispatcher=Runs("dispatcher"),
        storescu=Runs("storescu"),
        storescp_pdu={},
        cap_pdu={},
        peer_max_pdu=peer_max_pdu,
        cpu_before=procs.wait_quiet(max_wait_s=quiet_wait),
    )
    try:
        for rep in range(reps):
            logger.info("run %d/%d", rep + 1, reps)
            scp = StoreScp("storescp", work / "scp")
            _run(result.dispatcher, scp, work, instances, 0, quiet_wait)
            _storescu_run(
                result.storescu, StoreScp("storescp", work / "scp"), work, instances, quiet_wait
            )
            if not pdu_sweep:
                continue
            for size in STORESCP_PDUS:
                runs = result.storescp_pdu.setdefault(size, Runs(str(size)))
                scp = StoreScp("storescp", work / "scp", max_pdu=size)
                _run(runs, scp, work, instances, 0, quiet_wait)
            for cap in CAP_SIZES:
                runs = result.cap_pdu.setdefault(cap, Runs(str(cap)))
                rx = Caduceus("receiver", work / "rx", max_pdu=peer_max_pdu, fsync=False)
                _run(runs, rx, work, instances, cap, quiet_wait)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _run(
    runs: Runs, peer: Peer, work: Path, instances: list[data.Instance], cap: int, quiet_wait: float
) -> None:
    """One dispatcher run to a fresh ``peer``, with the dispatcher's PDU cap ``cap``."""
    spool = work / "spool"
    shutil.rmtree(spool, ignore_errors=True)
    task = spool / "outgoing" / "bench-task"
    task.mkdir(parents=True)
    for number, item in enumerate(instances):
        os.link(item.path, task / f"bench#{number:05d}.dcm")
    _write_task(task, [item.sop_uid for item in instances])
    try:
        peer.start()
    except RuntimeError as exc:
        runs.failures.append(f"peer did not start: {exc}")
        return
    try:
        config = parse_config(_config(spool, peer.port, cap), report=False)
        service = DispatcherService(config)
        subprocess_sync()
        procs.wait_quiet(max_wait_s=quiet_wait)
        cpu = _cpu(resource.RUSAGE_SELF)
        started = time.perf_counter()
        service.once()
        elapsed = time.perf_counter() - started
        cpu = _cpu(resource.RUSAGE_SELF) - cpu
        finished = (spool / "success" / "bench-task").is_dir()
        _check(runs, peer, instances, elapsed, finished, cpu)
    finally:
        peer.stop()
        peer.clean()
        shutil.rmtree(spool, ignore_errors=True)


def _storescu_run(
    runs: Runs, peer: Peer, work: Path, instances: list[data.Instance], quiet_wait: float
) -> None:
    try:
        peer.start()
    except RuntimeError as exc:
        runs.failures.append(f"peer did not start: {exc}")
        return
    try:
        subprocess_sync()
        procs.wait_quiet(max_wait_s=quiet_wait)
        cpu = _cpu(resource.RUSAGE_CHILDREN)
        sent = sender.send(peer.port, [instances], work / "storescu-logs")
        cpu = _cpu(resource.RUSAGE_CHILDREN) - cpu
        _check(runs, peer, instances, sent.wall_s, sent.returncodes == [0], cpu)
    finally:
        peer.stop()
        peer.clean()


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _check(
    runs: Runs,
    peer: Peer,
    instances: list[data.Instance],
    elapsed: float,
    finished: bool,
    cpu: float,
) -> None:
    got = set(peer.received().sop_uids)
    missing = [item.sop_uid for item in instances if item.sop_uid not in got]
    if not finished or missing:
        runs.failures.append(f"finished={finished}, {len(missing)} instance(s) missing")
    else:
        runs.seconds.append(elapsed)
        runs.cpu_seconds.append(cpu)


def _write_task(folder: Path, uids: list[str]) -> None:
    task = {
        "id": folder.name,
        "info": {"action": "route", "uid": "bench", "uid_type": "series", "applied_rule": ""},
        "dispatch": {"target_name": ["peer"]},
    }
    (folder / "task.json").write_text(json.dumps(task))


def _config(spool: Path, port: int, cap: int) -> dict[str, Any]:
    return {
        "data_root": str(spool),
        "bookkeeper_api_key": "bench-token-0123456789",
        "dispatcher_max_pdu": cap,
        "targets": {
            "peer": {"target_type": "dicom", "ip": "127.0.0.1", "port": port, "aet_target": "ANY"}
        },
    }


def subprocess_sync() -> None:
    """Flush dirty pages so that a run does not pay for the previous one's writes."""
    os.sync()


# ---------------------------------------------------------------------------- the report


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return f"{value:.{digits}f}{unit}" if value is not None else "n/a"


def report_markdown(result: DispatchBenchResult, *, heading: bool = True) -> str:
    """The results as Markdown (``heading``: start with ``## Dispatcher``)."""
    mb = result.total_bytes / 1e6
    lines = ["## Dispatcher", ""] if heading else []
    lines += [
        f"{result.instances} CT instances (512x512x16 bit, {mb:.1f} MB), one association, "
        f"median of {result.reps} run(s), the two senders' runs interleaved; machine CPU before "
        f"the runs {result.cpu_before:.0f}%.",
        "",
        "| sender -> storescp | median s | MB/s | sender CPU s | CPU ms / instance "
        "| runs ok / failed |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for runs in (result.dispatcher, result.storescu):
        cpu = runs.cpu_median()
        per_instance = cpu * 1000 / result.instances if cpu is not None else None
        lines.append(
            f"| {runs.label} | {_fmt(runs.median(), digits=2)} | "
            f"{_fmt(runs.mb_s(result.total_bytes))} | {_fmt(cpu, digits=2)} | "
            f"{_fmt(per_instance, digits=2)} | {len(runs.seconds)} / {len(runs.failures)} |"
        )
    lines += [
        "",
        f"Dispatcher / storescu throughput: **{_fmt(result.ratio, digits=2)}x** "
        f"(target >= 0.5x: {'pass' if (result.ratio or 0) >= 0.5 else 'FAIL'}).",
    ]
    if result.storescp_pdu:
        lines += ["", "storescp `-pdu` (its max receive PDU; the dispatcher sends that size):", ""]
        lines += ["| storescp -pdu | MB/s |", "|---:|---:|"]
        for size, runs in result.storescp_pdu.items():
            lines.append(f"| {size} | {_fmt(runs.mb_s(result.total_bytes))} |")
    if result.cap_pdu:
        lines += [
            "",
            f"Dispatcher PDU cap (`dispatcher_max_pdu`) against the Caduceus receiver advertising "
            f"{result.peer_max_pdu} bytes (fsync off); built-in default {MEASURED_MAX_PDU}:",
            "",
            "| cap | MB/s |",
            "|---:|---:|",
        ]
        for cap, runs in result.cap_pdu.items():
            lines.append(f"| {cap} | {_fmt(runs.mb_s(result.total_bytes))} |")
    failures = [
        f"{runs.label}: {failure}"
        for runs in (
            result.dispatcher,
            result.storescu,
            *result.storescp_pdu.values(),
            *result.cap_pdu.values(),
        )
        for failure in runs.failures
    ]
    if failures:
        lines += ["", "Failed runs: " + "; ".join(failures)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch_bench")
    parser.add_argument("--quick", action="store_true", help="60 slices, one run each")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--no-sweep", action="store_true", help="skip the max-PDU sweep")
    parser.add_argument("--slices", type=int, help="send only the first N slices")
    parser.add_argument(
        "--quiet-wait", type=float, default=QUIET_WAIT, help="max seconds to wait for a quiet CPU"
    )
    args = parser.parse_args(argv)
    setup_logging("bench")
    result = bench_dispatch(
        OUT / "work" / "dispatch",
        quick=args.quick,
        reps=args.reps,
        slices=args.slices,
        pdu_sweep=not args.no_sweep,
        quiet_wait=args.quiet_wait,
    )
    text = report_markdown(result)
    (OUT / "dispatch.md").write_text(text)
    sys.stdout.write(text)
    return 0 if not (result.dispatcher.failures or result.storescu.failures) else 1


if __name__ == "__main__":
    sys.exit(main())
