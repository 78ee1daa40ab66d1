"""DCMTK ``storescu`` as the sender: one process per association, timed start to exit."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.data import Instance

SEND_DEADLINE_S = 1800.0


@dataclass(frozen=True)
class SendResult:
    """Wall time from the first ``storescu`` start to the last exit, and their exit codes."""

    wall_s: float
    returncodes: list[int]


def send(port: int, chunks: list[list[Instance]], log_dir: Path) -> SendResult:
    """Send each chunk over its own association, all concurrently, and wait for all to exit.

    ``storescu`` exits once every C-STORE in its association is answered and the association
    released, so the wall time covers every instance acknowledged by the peer. Its default
    ``--halt`` makes any failed store end it with a non-zero code.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = procs.dcmtk_env()
    running: list[subprocess.Popen[bytes]] = []
    logs = []
    start = time.perf_counter()
    for index, chunk in enumerate(chunks):
        log = (log_dir / f"storescu-{index}.log").open("wb")
        logs.append(log)
        args = ["storescu", "-to", "10", "127.0.0.1", str(port), *(str(i.path) for i in chunk)]
        running.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env))
    codes: list[int] = []
    try:
        for proc in running:
            remaining = SEND_DEADLINE_S - (time.perf_counter() - start)
            try:
                codes.append(proc.wait(timeout=max(remaining, 1.0)))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return SendResult(time.perf_counter() - start, codes)
