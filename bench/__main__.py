"""``python -m bench [--quick] [--only NAME] [--profile]``: run the benchmarks.

A full run (no ``--quick``, no scenario filter) rewrites its section of ``docs/benchmarks.md``;
other runs write ``bench/out/receiver.md`` and leave the docs alone, so the docs only ever hold
numbers from one complete run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from bench import data, fsprobe, others, procs, profile, report
from bench.peers import REPO, Caduceus, StoreScp, receiver_available
from bench.receiver_bench import RECEIVER_WORKERS, SCENARIOS, Scenario, run_scenario

logger = logging.getLogger("bench")

RET_OK = 0
RET_RUNS_FAILED = 1
"""Some run lost data, or a peer did not start or stop cleanly: see the report."""
RET_USAGE = 2
RET_MISSING_TOOL = 3

OUT = REPO / "bench" / "out"
DOC = REPO / "docs" / "benchmarks.md"
PROFILED = ("ct1", "ct4", "small")
BENCHES = ("receiver", *others.SECTIONS)


def _parser() -> argparse.ArgumentParser:
    names = [*BENCHES, *(s.name for s in SCENARIOS)]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 run each, smaller data sets")
    parser.add_argument("--only", choices=names, help="one bench, or one receiver scenario")
    parser.add_argument("--reps", type=int, help="runs per peer (default 3, or 1 with --quick)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile the receiver with py-spy"
    )
    return parser


def _check_nodelay(work: Path) -> str:
    """Confirm, against a live storescp, that DCMTK honours ``TCP_NODELAY=1`` in this build."""
    peer = StoreScp("nodelay check", work / "nodelay")
    try:
        peer.start()
        honoured = procs.dcmtk_nodelay_honoured(peer.port)
    finally:
        peer.stop()
        shutil.rmtree(peer.work, ignore_errors=True)
    if not honoured:
        logger.warning("echoscu -d does not report disabling Nagle: TCP_NODELAY not honoured")
        return "**not confirmed**: `echoscu -d` did not report disabling Nagle in this run"
    return "confirmed in this run: `echoscu -d` logs `disabling Nagle algorithm as requested`"


def _profiles(scenarios: list[Scenario], quick: bool) -> list[list[str]]:
    if not receiver_available():
        logger.warning("--profile: receiver/__main__.py does not exist yet; nothing to profile")
        return []
    out: list[list[str]] = []
    for scenario in scenarios:
        if scenario.name not in PROFILED:
            continue
        dataset = data.ensure(scenario.spec, OUT / "data")
        if quick and scenario.quick_per_study:
            dataset = dataset.subset(scenario.quick_per_study)
        chunks = data.split(dataset.instances, scenario.associations)
        work = OUT / "work" / f"profile-{scenario.name}"
        results = []
        for mode in profile.MODES:
            peer = Caduceus("caduceus profiled", work, fsync=True, workers=RECEIVER_WORKERS)
            logger.info("%s: profiling the receiver with py-spy (%s)", scenario.name, mode)
            results.append(profile.profile_run(scenario.name, mode, peer, chunks, OUT))
            shutil.rmtree(work, ignore_errors=True)
        out.append(profile.summary(f"{scenario.title}, fsync on", results))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for tool in ("storescp", "storescu", "echoscu"):
        if shutil.which(tool) is None:
            logger.error("%s not found: install DCMTK (apt-get install dcmtk)", tool)
            return RET_MISSING_TOOL
    if args.profile and profile.py_spy() is None:
        logger.error("--profile needs py-spy: .venv/bin/pip install py-spy")
        return RET_MISSING_TOOL
    if args.reps is not None and args.reps < 1:
        logger.error("--reps must be at least 1")
        return RET_USAGE
    reps = args.reps or (1 if args.quick else 3)
    given = sys.argv[1:] if argv is None else argv
    command = "make bench" if not given else "python -m bench " + " ".join(given)
    work = OUT / "work"
    shutil.rmtree(work, ignore_errors=True)
    if args.only in others.SECTIONS:
        others.run(args.only, work, args.quick, command, DOC, OUT)
        return RET_OK
    code = _receiver(args, reps, command, work)
    if args.only is None:
        for name in others.SECTIONS:
            logger.info("benchmark: %s", name)
            others.run(name, work, args.quick, command, DOC, OUT)
    return code


def _receiver(args: argparse.Namespace, reps: int, command: str, work: Path) -> int:
    selected = [s for s in SCENARIOS if args.only in (None, "receiver", s.name)]
    if not receiver_available():
        logger.warning("receiver/__main__.py does not exist yet: measuring storescp only")
    load_before, digest_before = report.load(), report.source_digest()
    nodelay = _check_nodelay(work)
    fs_costs = fsprobe.measure(work)
    logger.info("file system: %s", fs_costs.describe())
    results = [run_scenario(s, OUT / "data", work, reps, args.quick) for s in selected]
    profiles = _profiles(selected, args.quick) if args.profile else []
    peer_commands = {p.label: p.command for r in results for p in r.peers}
    full = not args.quick and args.only in (None, "receiver")
    body = report.receiver_section(
        results,
        reps,
        command,
        report.machine(OUT, load_before, fs_costs.describe(), digest_before),
        peer_commands,
        nodelay,
        profiles,
    )
    target = DOC if full else OUT / "receiver.md"
    if full:
        report.replace_section(DOC, "receiver", body)
    else:
        target.write_text(body + "\n")
    (OUT / "receiver-results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print("\n".join(report.targets_markdown(results)))
    print(f"written: {target}")
    failed = any(run.problems for r in results for p in r.peers for run in p.runs)
    return RET_RUNS_FAILED if failed else RET_OK


if __name__ == "__main__":
    sys.exit(main())
