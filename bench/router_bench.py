"""The router benchmark: tick time with 10,000 series waiting in ``incoming/`` (issue 4).

:func:`bench_router_tick` builds a spool with ``series`` one-instance series (a small Part 10
file and a mercure-like side-car each), then measures, in process and on the real file system:

* ``waiting``: ticks while no series is complete yet (``series_complete_trigger`` 1 hour) — the
  first tick with an empty cache, then warm ticks (the steady state of a busy router);
* ``scan``: finding all of them complete (trigger 0), with an empty cache (reads every folder);
* ``routing``: one tick that routes ``routed`` of them (one route rule, one ``outgoing/`` task
  each, every step flushed as in production), as series per second.

Call it as ``bench_router_tick(Path("/some/scratch/dir"))``; it returns a dict of numbers and
leaves the spool under ``tmp_dir/router-bench`` (delete it afterwards).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from common.config import Config, parse_config
from router.service import Router

logger = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043.8.498.99."


def _config(data_root: Path, trigger: float) -> Config:
    return parse_config(
        {
            "data_root": str(data_root),
            "bookkeeper_api_key": "bench-token-0123456789",
            "series_complete_trigger": trigger,
            "targets": {"pacs": {"target_type": "dummy"}},
            "rules": {"ct": {"rule": 'tags.Modality == "CT"', "target": "pacs"}},
        },
        report=False,
    )


def _fill(incoming: Path, series: int) -> None:
    dicom = b"\0" * 128 + b"DICM" + os.urandom(380)
    for number in range(series):
        series_uid = f"{UID_ROOT}{number}"
        folder = incoming / series_uid
        folder.mkdir()
        stem = folder / f"{series_uid}#{series_uid}.1"
        stem.with_suffix(".1.dcm").write_bytes(dicom)
        tags = {
            "Modality": "CT",
            "SeriesInstanceUID": series_uid,
            "StudyInstanceUID": f"{UID_ROOT}0",
            "PatientName": "Bench^Mark",
            "SeriesDescription": f"series {number}",
            "SenderAET": "BENCH",
        }
        stem.with_suffix(".1.tags").write_text(json.dumps(tags))


def bench_router_tick(
    tmp_dir: Path, *, series: int = 10_000, routed: int = 1_000, warm_ticks: int = 5
) -> dict[str, Any]:
    """Measure router ticks with ``series`` series waiting (see the module doc)."""
    data_root = tmp_dir / "router-bench"
    started = time.monotonic()
    waiting_router = Router(_config(data_root, 3600.0))
    _fill(waiting_router.paths.incoming, series)
    fill_s = time.monotonic() - started
    try:
        cold = waiting_router.tick()
        warm = [waiting_router.tick().duration_s for _ in range(warm_ticks)]
    finally:
        waiting_router.close()

    ready_router = Router(_config(data_root, 0.0))
    try:
        scan_started = time.monotonic()
        ready = ready_router.scanner.ready(time.time(), 0.0)
        scan_s = time.monotonic() - scan_started
        # Route a part only: the rest stays waiting, so the tick below measures routing.
        for name in ready[routed:]:
            del ready_router.scanner.states[name]
        route_started = time.monotonic()
        done = 0
        for name in ready[:routed]:
            done += ready_router.route_series(name).value == "routed"
        routing_s = time.monotonic() - route_started
    finally:
        ready_router.close()

    result = {
        "series": series,
        "fill_s": round(fill_s, 3),
        "waiting_cold_tick_s": round(cold.duration_s, 4),
        "waiting_warm_tick_s": round(statistics.median(warm), 4),
        "waiting_warm_tick_max_s": round(max(warm), 4),
        "ready_scan_s": round(scan_s, 4),
        "ready_found": len(ready),
        "routed": done,
        "routing_s": round(routing_s, 3),
        "routing_series_per_s": round(done / routing_s, 1) if routing_s else None,
        "routing_ms_per_series": round(1000 * routing_s / done, 2) if done else None,
    }
    logger.info("router tick benchmark: %s", result)
    return result
