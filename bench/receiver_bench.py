"""The receiver benchmark: Caduceus ``python -m receiver`` against DCMTK ``storescp``.

Same data, same machine, same sender (DCMTK ``storescu``, ``TCP_NODELAY=1``), in one run. Each
peer is started fresh for each repetition, the repetitions of the peers are interleaved, and the
median of the repetitions is reported. After each run the stored SOP Instance UIDs are compared
with those sent; a run that lost or added an instance is marked failed and left out of the medians.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench import data, pdu_probe, procs, sender
from bench.peers import STORESCP_MAX_PDU, Caduceus, Peer, StoreScp, receiver_available
from bench.results import DISTURBED_RETRIES, PeerResult, RunResult, ScenarioResult, Target

logger = logging.getLogger(__name__)

RECEIVER_WORKERS = 2
"""``dicom_receiver.workers`` given to the receiver: one per core of the benchmark machine."""

PDU_SWEEP = (16384, 65536, 131072, 262144, 1048576, 0)
"""Receiver ``max_pdu_size`` values tried; 0 leaves the choice to the receiver."""

PeerFactory = Callable[[Path], list[Peer]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    spec: data.SetSpec
    associations: int
    peers: PeerFactory
    target: Target | None = None
    quick_per_study: int | None = None
    by_study: bool = False  # one association per study instead of contiguous parts
    measure_pss: bool = False


def _cad(
    work: Path,
    label: str,
    fsync: bool = True,
    workers: int = RECEIVER_WORKERS,
    max_pdu: int | None = None,
) -> Caduceus:
    folder = work / label.replace(" ", "_").replace("=", "-")
    return Caduceus(label, folder, fsync=fsync, workers=workers, max_pdu=max_pdu)


def _scp(work: Path, label: str, fork: bool = False, max_pdu: int = STORESCP_MAX_PDU) -> StoreScp:
    return StoreScp(
        label, work / label.replace(" ", "_").replace("=", "-"), fork=fork, max_pdu=max_pdu
    )


def _main_peers(fork: bool) -> PeerFactory:
    def make(work: Path) -> list[Peer]:
        return [
            _scp(work, "storescp --fork" if fork else "storescp", fork=fork),
            _cad(work, "caduceus fsync=on", fsync=True),
            _cad(work, "caduceus fsync=off", fsync=False),
        ]

    return make


def _pdu_peers(work: Path) -> list[Peer]:
    """storescp at its maximum and default PDU, and the receiver over ``PDU_SWEEP``.

    The receiver runs with fsync off here: the PDU size acts on the network data path, and the
    run-to-run spread of fsync latency would hide it.
    """
    peers: list[Peer] = [_scp(work, "storescp"), _scp(work, "storescp -pdu 16384", max_pdu=16384)]
    for size in PDU_SWEEP:
        peers.append(_cad(work, f"caduceus max_pdu={size}", fsync=False, max_pdu=size))
    return peers


def _memory_peers(work: Path) -> list[Peer]:
    return [
        _scp(work, "storescp --fork", fork=True),
        _cad(work, "caduceus fsync=on", fsync=True, workers=RECEIVER_WORKERS),
    ]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "ct1",
        "CT series, one association",
        data.CT_SERIES,
        1,
        _main_peers(fork=False),
        Target("caduceus fsync=on", "mbps_ratio", 0.5, ">= 0.5x storescp MB/s, fsync on"),
    ),
    Scenario(
        "ct4",
        "CT series over 4 concurrent associations",
        data.CT_SERIES,
        4,
        _main_peers(fork=True),
        Target("caduceus fsync=on", "mbps_ratio", 0.8, ">= 0.8x storescp MB/s, fsync on"),
    ),
    Scenario(
        "small",
        "2,000 small instances, one association",
        data.SMALL_INSTANCES,
        1,
        _main_peers(fork=False),
        Target("caduceus fsync=on", "ips_ratio", 0.5, ">= 0.5x storescp instances/s, fsync on"),
        quick_per_study=500,
    ),
    Scenario(
        "pdu",
        "Max PDU sweep: CT series, one association, receiver fsync off",
        data.CT_SERIES,
        1,
        _pdu_peers,
    ),
    Scenario(
        "memory",
        "Memory: 4 concurrent ~1 GB studies, one association each",
        data.LARGE_STUDIES,
        4,
        _memory_peers,
        Target(
            "caduceus fsync=on", "rss_total_mb", 300, "receiver peak RSS (all processes) < 300 MB"
        ),
        quick_per_study=250,
        by_study=True,
        measure_pss=True,
    ),
)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """``(user, system)`` CPU seconds of ``pid``, its live descendants, and reaped children."""
    user = system = 0.0
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    for proc in family:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        user += t.user + t.children_user
        system += t.system + t.children_system
    return user, system


class _CpuAccount:
    """CPU used during a run by the peer, by the senders, and by everything else.

    "Everything else" is user CPU of the whole machine minus that of the peer, of the bench's
    reaped children (the ``storescu`` processes) and of the bench itself: other users' work.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peer0 = _cpu_seconds(pid)
        self.machine0 = psutil.cpu_times().user + psutil.cpu_times().nice
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)

    def close(self, run: RunResult) -> None:
        peer = _cpu_seconds(self.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        machine_user = psutil.cpu_times().user + psutil.cpu_times().nice - self.machine0
        peer_user, peer_system = peer[0] - self.peer0[0], peer[1] - self.peer0[1]
        sender_user = children.ru_utime - self.children0.ru_utime
        sender_system = children.ru_stime - self.children0.ru_stime
        own_user = own.ru_utime - self.self0.ru_utime
        run.cpu_s = peer_user + peer_system
        run.sender_cpu_s = sender_user + sender_system
        run.other_cpu_s = max(0.0, machine_user - peer_user - sender_user - own_user)


def _verify(peer: Peer, expected: list[data.Instance], run: RunResult) -> None:
    received = peer.received()
    run.stored = len(received.sop_uids)
    sent = {i.sop_uid for i in expected}
    got = set(received.sop_uids)
    if missing := sent - got:
        run.problems.append(f"{len(missing)} of {len(sent)} instances not stored")
    if extra := got - sent:
        run.problems.append(f"{len(extra)} unexpected files")
    if len(received.sop_uids) != len(got):
        run.problems.append("duplicate files for one SOP Instance UID")
    if received.sidecars is not None and received.sidecars != len(got):
        run.problems.append(f"{received.sidecars} .tags side-cars for {len(got)} instances")


def _chunks(scenario: Scenario, dataset: data.DataSet) -> list[list[data.Instance]]:
    if scenario.by_study:
        return [list(study) for study in dataset.studies]
    return data.split(dataset.instances, scenario.associations)


def run_once(
    peer: Peer, chunks: list[list[data.Instance]], log_dir: Path, pss: bool = False
) -> RunResult:
    """Start ``peer``, send ``chunks`` concurrently, verify what is on disk, stop, clean up."""
    run = RunResult()
    expected = [i for chunk in chunks for i in chunk]
    os.sync()  # start every run with no dirty pages from the previous one
    run.busy_before = procs.wait_quiet()
    try:
        peer.start()
    except (RuntimeError, OSError) as exc:
        run.problems.append(f"peer did not start: {exc}")
        peer.stop()
        return run
    assert peer.proc is not None
    try:
        account = _CpuAccount(peer.proc.pid)
        with procs.RssSampler(peer.proc.pid, pss=pss) as sampler:
            sent = sender.send(peer.port, chunks, log_dir)
        account.close(run)
        run.wall_s = sent.wall_s
        run.rss_total, run.rss_max_process = sampler.peak.total, sampler.peak.max_process
        run.pss_total = sampler.peak.pss_total
        if any(sent.returncodes):
            run.problems.append(f"storescu exit codes {sent.returncodes} (see {log_dir})")
        _verify(peer, expected, run)
    finally:
        run.stop_code, run.stop_clean = peer.stop()
        peer.clean()
    if not run.stop_clean or run.stop_code not in peer.clean_exit_codes:
        run.problems.append(f"stop on SIGTERM: exit code {run.stop_code}, clean={run.stop_clean}")
    run.ok = not run.problems
    return run


def run_scenario(
    scenario: Scenario, data_root: Path, work: Path, reps: int, quick: bool
) -> ScenarioResult:
    dataset = data.ensure(scenario.spec, data_root)
    if quick and scenario.quick_per_study:
        dataset = dataset.subset(scenario.quick_per_study)
    chunks = _chunks(scenario, dataset)
    instances = dataset.instances
    result = ScenarioResult(
        scenario.name,
        scenario.title,
        len(instances),
        sum(i.size for i in instances),
        len(chunks),
        target=scenario.target,
    )
    scenario_work = work / scenario.name
    shutil.rmtree(scenario_work, ignore_errors=True)
    peers = scenario.peers(scenario_work)
    results = {p.label: PeerResult(p.label, p.describe()) for p in peers}
    have_receiver = receiver_available()
    for peer in peers:
        if isinstance(peer, Caduceus) and not have_receiver:
            results[peer.label].skipped = "receiver/__main__.py does not exist yet"
    for rep in range(reps):
        for peer in peers:
            res = results[peer.label]
            if res.skipped:
                continue
            logger.info("%s: %s, run %d/%d", scenario.name, peer.label, rep + 1, reps)
            logs = scenario_work / "logs" / f"{peer.work.name}-{rep}"
            for attempt in range(1 + DISTURBED_RETRIES):
                started = time.perf_counter()
                run = run_once(peer, chunks, logs, pss=scenario.measure_pss)
                run.attempts = attempt + 1
                _log_run(scenario, peer, run, result, time.perf_counter() - started)
                if not run.disturbed:
                    break
            res.runs.append(run)
            if any(p.startswith("peer did not start") for p in run.problems):
                res.skipped = f"did not start: {run.problems[0]} (log {peer.log})"
    result.peers = [results[p.label] for p in peers]
    _probe_pdu(peers, result, instances[0])
    return result


def _probe_pdu(peers: list[Peer], result: ScenarioResult, sample: data.Instance) -> None:
    """Record each peer's advertised max PDU and the largest PDU ``storescu`` sends to it."""
    for peer, res in zip(peers, result.peers, strict=True):
        if res.skipped or not res.good:
            continue
        try:
            peer.start()
            res.advertised_max_pdu = peer.advertised_max_pdu()
            res.sent_max_pdu = pdu_probe.largest_sent_pdu(peer.port, sample.path)
        except (RuntimeError, OSError) as exc:
            logger.warning("could not probe the PDU sizes of %s: %s", peer.label, exc)
        finally:
            peer.stop()
            peer.clean()


def _log_run(
    scenario: Scenario, peer: Peer, run: RunResult, result: ScenarioResult, total_s: float
) -> None:
    if not run.ok:
        logger.warning("%s: %s FAILED: %s", scenario.name, peer.label, "; ".join(run.problems))
        return
    logger.info(
        "%s: %s %.3f s, %.1f MB/s, %.0f inst/s, cpu %.2f s, other cpu %.2f s%s, rss %.0f MB "
        "(run took %.1f s)",
        scenario.name,
        peer.label,
        run.wall_s,
        result.bytes / 1e6 / run.wall_s,
        result.instances / run.wall_s,
        run.cpu_s,
        run.other_cpu_s,
        " (DISTURBED)" if run.disturbed else "",
        run.rss_total / 1e6,
        total_s,
    )
