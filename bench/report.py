"""Markdown for ``docs/benchmarks.md``: the machine, the method, and one table per scenario.

Each bench owns a marked section (``<!-- NAME:begin -->`` .. ``<!-- NAME:end -->``) that it
rewrites whole; the rest of the file is left as it is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import psutil

from bench import procs
from bench.results import DISTURBED_RETRIES, DISTURBED_SHARE, MB, PeerResult, ScenarioResult

DOC_HEADER = """# Benchmarks

Every figure in this file is measured, by a script in `bench/` run with `make bench`
(`.venv/bin/python -m bench`), and written here by that script together with the machine and the
comparison it was measured against in the same run. Do not edit the marked sections by hand.
"""


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _os_name() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def _filesystem(path: Path) -> str:
    path = path.resolve()
    best = None
    for part in psutil.disk_partitions(all=True):
        if path.is_relative_to(part.mountpoint) and (
            best is None or len(part.mountpoint) > len(best.mountpoint)
        ):
            best = part
    if best is None:
        return "unknown"
    free = psutil.disk_usage(best.mountpoint).free / 2**30
    return f"{best.fstype} on {best.device} (mounted at {best.mountpoint}, {free:.0f} GiB free)"


def source_digest() -> str:
    """A short digest of the Python sources of ``receiver/`` and ``common/`` as measured."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in sorted([*root.glob("receiver/*.py"), *root.glob("common/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def machine(
    out_dir: Path, load_before: str, fs_costs: str, digest_before: str
) -> list[tuple[str, str]]:
    """What the numbers were measured on; ``digest_before`` is :func:`source_digest` at start."""
    digest = source_digest()
    if digest != digest_before:
        digest = (
            f"**{digest_before} at the start, {digest} at the end: the sources changed during "
            "the run, so runs may have measured different code**"
        )
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "status", "--porcelain"]) != "unknown"
    return [
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} cores"),
        ("RAM", f"{psutil.virtual_memory().total / 2**30:.1f} GiB"),
        ("OS / kernel", f"{_os_name()} / Linux {platform.release()}"),
        ("Disk (received files)", _filesystem(out_dir)),
        ("File system costs there, this run (`bench/fsprobe.py`)", fs_costs),
        ("Python", platform.python_version()),
        (
            "pynetdicom / pydicom",
            f"{metadata.version('pynetdicom')} / {metadata.version('pydicom')}",
        ),
        ("DCMTK", procs.tool_version("storescp")),
        ("Caduceus commit", f"{commit}{' + uncommitted changes' if dirty else ''}"),
        ("sha256 of receiver/*.py + common/*.py", digest),
        ("Load average before / after the run", f"{load_before} / {load()}"),
    ]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mb(value: int | None) -> str:
    return "-" if not value else f"{value / MB:.0f}"


def _peer_row(scenario: ScenarioResult, peer: PeerResult) -> str:
    if peer.skipped and not peer.runs:
        return f"| {peer.label} | not run: {peer.skipped} |" + " |" * 10
    ok = f"{len(peer.good)}/{len(peer.runs)}"
    ratio = scenario.ratio(peer)
    pdu, sent = peer.advertised_max_pdu, peer.sent_max_pdu
    cells = [
        peer.label,
        _time_cell(peer),
        _num(scenario.mbps(peer), ".1f"),
        _num(scenario.ips(peer), ".0f"),
        "1 (reference)" if peer is scenario.reference else _num(ratio, ".2f"),
        _num(peer.cpu_s, ".2f"),
        _num(peer.other_cpu_s, ".2f"),
        _mb(peer.rss_total),
        _mb(peer.rss_max_process),
        "-" if pdu is None else ("0 (unlimited)" if pdu == 0 else str(pdu)),
        "-" if sent is None else str(sent),
        ok,
    ]
    return "| " + " | ".join(cells) + " |"


def _problems(scenario: ScenarioResult) -> list[str]:
    lines = []
    for peer in scenario.peers:
        for index, run in enumerate(peer.runs):
            if run.problems:
                lines.append(f"- {peer.label}, run {index + 1}: {'; '.join(run.problems)}")
    return lines


def _range(peer: PeerResult) -> tuple[float, float]:
    walls = [r.wall_s for r in peer.good]
    return min(walls), max(walls)


def _time_cell(peer: PeerResult) -> str:
    if peer.wall_s is None:
        return "-"
    low, high = _range(peer)
    if len(peer.good) < 2:
        return f"{peer.wall_s:.3f}"
    return f"{peer.wall_s:.3f} ({low:.3f}-{high:.3f})"


def _fsync_cost(scenario: ScenarioResult) -> str | None:
    on, off = scenario.peer("caduceus fsync=on"), scenario.peer("caduceus fsync=off")
    if on is None or off is None or on.wall_s is None or off.wall_s is None:
        return None
    text = (
        f"fsync on vs off: {_num(scenario.mbps(on), '.1f')} vs "
        f"{_num(scenario.mbps(off), '.1f')} MB/s"
    )
    if on.wall_s > off.wall_s:
        per_instance = (on.wall_s - off.wall_s) / scenario.instances * 1000
        text += (
            f": fsync costs {1 - off.wall_s / on.wall_s:.0%} of the throughput "
            f"({per_instance:.2f} ms per instance)"
        )
    else:
        text += ": no cost of fsync measurable in this run (fsync on was not slower)"
    (lo_on, hi_on), (lo_off, hi_off) = _range(on), _range(off)
    if lo_on <= hi_off and lo_off <= hi_on:
        text += "; the ranges of the runs overlap, so the difference is within run-to-run noise"
    return text + "."


def _pss(scenario: ScenarioResult) -> str | None:
    measured = [(p.label, p.pss_total) for p in scenario.peers if p.pss_total]
    if not measured:
        return None
    parts = ", ".join(f"{label} {value / MB:.0f} MB" for label, value in measured)
    return (
        f"Peak PSS, all processes (shared pages divided among the processes sharing them): {parts}."
    )


def _best_pdu(scenario: ScenarioResult) -> str | None:
    sweep = [p for p in scenario.peers if p.label.startswith("caduceus max_pdu=") and p.good]
    if not sweep:
        return None
    best = max(sweep, key=lambda p: scenario.mbps(p) or 0.0)
    size = best.label.split("=", 1)[1]
    text = (
        f"Best receiver max PDU measured: **{size}**"
        f"{' (the receiver default)' if size == '0' else ''}, advertised as "
        f"{best.advertised_max_pdu}, at {_num(scenario.mbps(best), '.1f')} MB/s."
    )
    _, slowest = _range(best)
    tied = [p.label for p in sweep if p is not best and _range(p)[0] <= slowest]
    if tied:
        text += (
            f" The ranges of the runs of {', '.join(tied)} overlap with its range, so it is not "
            "measurably better than those."
        )
    same = [p.label for p in sweep if p.sent_max_pdu == best.sent_max_pdu and p is not best]
    if same and best.sent_max_pdu:
        text += (
            f" storescu sent PDUs of at most {best.sent_max_pdu} bytes to this peer and to "
            f"{', '.join(same)} alike, so those rows repeat one experiment and differ by noise."
        )
    return text


HEADER = (
    "| peer | time (s), median (range) | MB/s | instances/s | ratio to reference | peer CPU (s) "
    "| other processes' CPU (s) "
    "| peak RSS, all processes (MB) | peak RSS, largest process (MB) | max PDU advertised "
    "| largest PDU storescu sent | runs ok |\n|---" + "|---:" * 11 + "|"
)


def scenario_markdown(scenario: ScenarioResult, reps: int) -> list[str]:
    lines = [
        f"### {scenario.title}",
        "",
        f"{scenario.instances} instances, {scenario.bytes / MB:.1f} MB of files, "
        f"{scenario.associations} association(s); median of {reps} run(s); "
        f"reference: {scenario.reference.label if scenario.reference else '-'}.",
        "",
        HEADER,
        *(_peer_row(scenario, peer) for peer in scenario.peers),
        "",
    ]
    extra = [x for x in (_fsync_cost(scenario), _pss(scenario), _best_pdu(scenario)) if x]
    lines += [*extra, *([""] if extra else [])]
    runs = [r for p in scenario.peers for r in p.runs]
    retried = sum(r.attempts - 1 for r in runs)
    disturbed = sum(1 for r in runs if r.disturbed)
    if retried or disturbed:
        lines += [
            f"Runs repeated because other processes used more than {DISTURBED_SHARE:.0%} of a "
            f"core during them: {retried}; runs still disturbed after "
            f"{DISTURBED_RETRIES} repeats (kept, less reliable): {disturbed}.",
            "",
        ]
    if problems := _problems(scenario):
        lines += ["Failed runs (left out of the medians):", "", *problems, ""]
    return lines


def targets_markdown(scenarios: list[ScenarioResult]) -> list[str]:
    lines = ["| scenario | target | measured | result |", "|---|---|---:|---|"]
    for scenario in scenarios:
        if scenario.target is None:
            continue
        passed, measured = scenario.verdict()
        verdict = {True: "pass", False: "**FAIL**", None: "not measured"}[passed]
        lines.append(
            f"| {scenario.title} | {scenario.target.text} | {measured or '-'} | {verdict} |"
        )
    return [*lines, ""]


def replace_section(doc: Path, name: str, body: str) -> None:
    """Rewrite the ``name`` section of ``doc`` (created if missing) with ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else DOC_HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{block}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


METHOD = """\
Method:

- Sender: always DCMTK `storescu`, one process per association, each sending its share of the
  files, all started together. Time runs from the first `storescu` start to the last `storescu`
  exit, i.e. until every C-STORE has been answered and every association released. MB/s is
  bytes of DICOM files sent (MB = 10^6 bytes) per second.
- `TCP_NODELAY=1` is in the environment of `storescp`, `storescu` and `echoscu`: Debian's DCMTK
  leaves Nagle's algorithm on unless that variable is set ({nodelay}).
- Each peer is started fresh for each run and the runs of the peers are interleaved. Before
  each run the bench calls `sync` and waits (up to 60 s) until the machine is quiet (under 25%
  CPU over 0.5 s); after it, the received files are deleted.
- After each run the SOP Instance UIDs on disk are compared with those sent (and, for
  Caduceus, the `.tags` side-cars are counted); a run that lost an instance fails and is left
  out of the medians. A run also fails if the peer does not exit cleanly on SIGTERM.
- `storescp` writes through the page cache and never calls fsync.
- Peer CPU: user + system CPU seconds of the peer's processes during the run (median); close
  to the time column means the peer is CPU-bound. Other processes' CPU: user CPU seconds of the
  whole machine during the run, less the peer's, the senders' and the bench's own, i.e. other
  work on the machine (median). A run during which it exceeds a quarter of a core on average
  is repeated (up to 3 times).
- Peak RSS: sampled with psutil every 50 ms over the peer process and all its descendants, the
  largest over the runs. "All processes" is the largest sum in one sample (pages shared between
  processes are counted in each, so it is an upper bound); "largest process" the largest
  single process.
- Max PDU advertised: read from `echoscu -d` against the peer. Largest PDU storescu sent: the
  P-DATA-TF PDU length field, measured by sending one file of the scenario through a relay
  that parses the PDU headers (`bench/pdu_probe.py`)."""


PROFILE_NOTE = """\
One extra run per scenario and mode, not part of the timed results, with the receiver at fsync
on. `cpu`: samples of threads on CPU, all receiver processes: where CPU goes. `wall`: samples of
the main thread of each association process whether it runs or waits: where an association's
time goes, waits on the socket and the disk included. A line's self time includes the system
calls it makes; lines are grouped by what they do from their code. Full tables (every line,
functions by self and inclusive time) in `bench/out/profile-<scenario>-<mode>.md`."""


def receiver_section(
    scenarios: list[ScenarioResult],
    reps: int,
    command: str,
    machine_rows: list[tuple[str, str]],
    peer_commands: dict[str, str],
    nodelay: str,
    profiles: list[list[str]],
) -> str:
    lines = [
        "## Receiver",
        "",
        f"Generated by `{command}` on {today()}.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in machine_rows),
        "",
        METHOD.format(nodelay=nodelay),
        "",
        "### Targets (issue 2)",
        "",
        *targets_markdown(scenarios),
    ]
    for scenario in scenarios:
        lines += scenario_markdown(scenario, reps)
    lines += ["### Peer command lines", ""]
    lines += [f"- {label}: `{cmd}`" for label, cmd in peer_commands.items()]
    lines.append("")
    if profiles:
        lines += ["### Where the receiver's time goes (py-spy, `--profile`)", "", PROFILE_NOTE, ""]
    for profile in profiles:
        lines += [*profile, ""]
    return "\n".join(lines)
