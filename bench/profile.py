"""``--profile``: extra runs of the receiver under py-spy, summarised as top functions and lines.

py-spy attaches to the running receiver and follows its child processes (``--subprocesses``),
sampling Python stacks 100 times a second. Two runs per profiled scenario:

- ``cpu``: only threads that are on CPU (py-spy's default): where CPU goes.
- ``wall``: threads waiting or not (``--idle``), summarised over the main thread of the
  receiver's child processes when it has any (the parent of a process-per-association server
  only waits in ``accept``; helper threads mostly wait for work): where each association's wall
  time goes, including waits on the socket and the disk. The raw file keeps every thread.

Self time of a line includes the C code and system calls it runs (``os.fsync``, ``os.write``).
Profiled runs are not part of the timed results. Output in ``bench/out``:
``profile-<scenario>-<mode>.txt`` (collapsed stacks, for flamegraph tools) and ``.md``.
"""

from __future__ import annotations

import linecache
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import sender
from bench.data import Instance
from bench.peers import REPO, Caduceus

RATE_HZ = 100
MODES = ("cpu", "wall")
_THREAD_ROOT = "Thread._bootstrap ("
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, else on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("create a file (open with O_CREAT/O_TMPFILE)", r"os\.open\(.*O_(CREAT|TMPFILE)"),
        ("flush to disk (fsync, fdatasync, sync_file_range)", r"fsync|fdatasync|sync_file_range"),
        ("write file data (os.write)", r"os\.(write|pwrite|writev)\("),
        ("rename, link or unlink", r"os\.(rename|replace|link|unlink|remove)\(|\.unlink\("),
        ("read from the network", r"readinto|recv"),
        ("send to the network", r"sendall|\.send\("),
        (
            "thread pool hand-off, waits on other threads",
            r"Condition\.wait|_worker \(|Queue\.get|Event\.wait|join",
        ),
        ("wait in select/poll", r"select\.select|\.poll\(|selectors"),
    )
)
OTHER = "everything else (Python code, other calls)"


def categorise(by_line: list[tuple[str, int]]) -> dict[str, int]:
    """Samples per category of what a line does, from its function and code text."""
    counts = dict.fromkeys([*(name for name, _ in CATEGORIES), OTHER], 0)
    for line, count in by_line:
        name = next((n for n, pattern in CATEGORIES if pattern.search(line)), OTHER)
        counts[name] += count
    return counts


@dataclass
class Profile:
    scenario: str
    mode: str
    wall_s: float
    samples: int
    by_function: list[tuple[str, int]]
    by_line: list[tuple[str, int]]
    """Every line, most samples first."""
    inclusive: list[tuple[str, int]]
    raw: Path
    children_only: bool


def _short_file(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3."):
        if marker in file:
            file = file.split(marker, 1)[1]
            return file.split("/", 1)[-1] if marker.startswith("/lib") else file
    return file


def _names(frame: str) -> tuple[str, str]:
    """``(function (file), function (file:line) `code`)`` for a py-spy frame."""
    match = _FRAME.match(frame)
    if not match:
        return frame, frame
    file = _short_file(match["file"])
    if not match["line"]:
        return f"{match['func']} ({file})", f"{match['func']} ({file})"
    path = Path(match["file"])
    code = linecache.getline(str(path if path.is_absolute() else REPO / path), int(match["line"]))
    code = code.strip().replace("|", "\\|")
    where = f"{match['func']} ({file}:{match['line']})"
    return f"{match['func']} ({file})", f"{where} `{code}`" if code else where


def _parse(raw: Path) -> list[tuple[int, list[str], int]]:
    """``(process depth, frames, count)`` per collapsed stack line."""
    rows = []
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        parts = stack.split(";")
        depth = sum(1 for p in parts if p.startswith("process "))
        frames = [p for p in parts if not p.startswith(("process ", "thread "))]
        if frames:
            rows.append((depth, frames, int(count_text)))
    return rows


def summarise(
    raw: Path, children_only: bool, main_thread_only: bool
) -> tuple[int, list[Counter[str]]]:
    """Total samples, and counters of self time by function, by line, and inclusive time."""
    rows = _parse(raw)
    if children_only and any(depth > 1 for depth, _, _ in rows):
        rows = [row for row in rows if row[0] > 1]
    if main_thread_only:
        rows = [row for row in rows if not row[1][0].startswith(_THREAD_ROOT)]
    by_function: Counter[str] = Counter()
    by_line: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for _, frames, count in rows:
        func, line = _names(frames[-1])
        by_function[func] += count
        by_line[line] += count
        for name in {_names(f)[0] for f in frames}:
            inclusive[name] += count
    return sum(count for _, _, count in rows), [by_function, by_line, inclusive]


def _wait_sampling(log: Path, proc: subprocess.Popen[bytes], deadline_s: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if "Sampling process" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"py-spy exited with {proc.returncode}: see {log}")
        time.sleep(0.05)
    raise RuntimeError(f"py-spy did not start sampling within {deadline_s:.0f} s")


def profile_run(
    scenario: str, mode: str, peer: Caduceus, chunks: list[list[Instance]], out_dir: Path
) -> Profile:
    """Run ``peer`` once under py-spy (``mode`` ``cpu`` or ``wall``) while ``storescu`` sends."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    stem = out_dir / f"profile-{scenario}-{mode}"
    raw, log = stem.with_suffix(".txt"), stem.with_suffix(".log")
    peer.start()
    assert peer.proc is not None
    try:
        with log.open("wb") as log_file:
            args = [exe, "record", "--pid", str(peer.proc.pid), "--subprocesses"]
            args += ["--rate", str(RATE_HZ), "--format", "raw", "--output", str(raw)]
            spy = subprocess.Popen(
                [*args, *(["--idle"] if mode == "wall" else [])],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_sampling(log, spy)
            sent = sender.send(peer.port, chunks, out_dir / f"{stem.name}-logs")
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    finally:
        peer.stop()
        peer.clean()
    wall = mode == "wall"
    samples, (by_function, by_line, inclusive) = summarise(raw, wall, main_thread_only=wall)
    profile = Profile(
        scenario,
        mode,
        sent.wall_s,
        samples,
        by_function.most_common(40),
        by_line.most_common(),
        inclusive.most_common(40),
        raw,
        wall,
    )
    stem.with_suffix(".md").write_text("\n".join(markdown(profile)) + "\n")
    return profile


def _table(title: str, rows: list[tuple[str, int]], total: int, top: int) -> list[str]:
    lines = [f"| {title} | samples | share |", "|---|---:|---:|"]
    for name, count in rows[:top]:
        cell = name if "`" in name else f"`{name}`"
        lines.append(f"| {cell} | {count} | {count / max(total, 1):.1%} |")
    return [*lines, ""]


def describe(profile: Profile) -> str:
    what = {
        "cpu": "on-CPU samples of all receiver processes and threads",
        "wall": "samples, waiting or not, of the main thread "
        + ("of the association processes" if profile.children_only else "of each process"),
    }[profile.mode]
    return (
        f"`{profile.mode}` profile: {profile.samples} {what}, at {RATE_HZ} Hz during a send of "
        f"{profile.wall_s:.2f} s (raw stacks: `bench/out/{profile.raw.name}`)."
    )


def markdown(profile: Profile, top: int = 40, full: bool = True) -> list[str]:
    """The profile in full: categories, lines, functions (self and inclusive)."""
    lines = [describe(profile), "", *breakdown([profile])]
    lines += _table("line (self time)", profile.by_line, profile.samples, top)
    if full:
        lines += _table("function (self time)", profile.by_function, profile.samples, top)
        lines += _table("function (inclusive time)", profile.inclusive, profile.samples, top)
    return lines


def breakdown(profiles: list[Profile]) -> list[str]:
    """One table: share of samples per category, one column per profile (cpu, wall)."""
    shares = [categorise(p.by_line) for p in profiles]
    header = "| what the line does | " + " | ".join(f"{p.mode} share" for p in profiles) + " |"
    lines = [header, "|---" + "|---:" * len(profiles) + "|"]
    for name in shares[0]:
        cells = [
            f"{s[name] / max(p.samples, 1):.0%}" for s, p in zip(shares, profiles, strict=True)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def summary(title: str, profiles: list[Profile], top: int = 8) -> list[str]:
    """For the docs: the category breakdown, then the top lines of each profile."""
    lines = [f"#### {title}", "", *(describe(p) for p in profiles), "", *breakdown(profiles)]
    for p in profiles:
        lines += _table(f"`{p.mode}`: line (self time)", p.by_line, p.samples, top)
    return lines
