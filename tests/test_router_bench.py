"""The router benchmark runs (on a small spool; ``make bench`` sizes: 10,000 series)."""

from __future__ import annotations

from pathlib import Path

from bench.router_bench import bench_router_tick


def test_the_router_tick_benchmark_measures_waiting_and_routing(tmp_path: Path) -> None:
    result = bench_router_tick(tmp_path, series=60, routed=20, warm_ticks=2)
    assert result["series"] == 60
    assert result["ready_found"] == 60
    assert result["routed"] == 20
    assert result["waiting_warm_tick_s"] < 1.0
    assert len(list((tmp_path / "router-bench" / "outgoing").iterdir())) == 20
    assert len(list((tmp_path / "router-bench" / "incoming").iterdir())) == 41  # and .tmp
