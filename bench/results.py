"""Result records of the receiver benchmark, and the statistics reported from them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

DISTURBED_SHARE = 0.25
"""A run is disturbed when other processes used, on average, more than this share of one core."""

DISTURBED_RETRIES = 3
"""A disturbed run is repeated up to this many times; the last attempt is kept."""

MB = 1_000_000
"""Throughput is in MB/s with MB = 10^6 bytes of DICOM files sent."""


@dataclass
class RunResult:
    """One measured run: one peer, one data set, all associations."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_total: int = 0
    rss_max_process: int = 0
    pss_total: int | None = None
    sender_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    stored: int = 0
    busy_before: float = 0.0
    attempts: int = 1
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    stop_code: int | None = None
    stop_clean: bool = True

    @property
    def disturbed(self) -> bool:
        return self.wall_s > 0 and self.other_cpu_s / self.wall_s > DISTURBED_SHARE


@dataclass
class PeerResult:
    """All runs of one peer configuration in one scenario."""

    label: str
    command: str
    runs: list[RunResult] = field(default_factory=list)
    advertised_max_pdu: int | None = None
    sent_max_pdu: int | None = None
    skipped: str | None = None

    @property
    def good(self) -> list[RunResult]:
        return [r for r in self.runs if r.ok]

    @property
    def all_ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    @property
    def wall_s(self) -> float | None:
        return statistics.median(r.wall_s for r in self.good) if self.good else None

    @property
    def cpu_s(self) -> float | None:
        return statistics.median(r.cpu_s for r in self.good) if self.good else None

    @property
    def rss_total(self) -> int | None:
        return max((r.rss_total for r in self.runs if r.rss_total), default=None)

    @property
    def other_cpu_s(self) -> float | None:
        return statistics.median(r.other_cpu_s for r in self.good) if self.good else None

    @property
    def pss_total(self) -> int | None:
        return max((r.pss_total for r in self.runs if r.pss_total), default=None)

    @property
    def rss_max_process(self) -> int | None:
        return max((r.rss_max_process for r in self.runs if r.rss_max_process), default=None)


@dataclass
class Target:
    """A target from the issue: ``metric`` of ``peer`` against ``threshold``.

    ``metric`` is ``mbps_ratio`` or ``ips_ratio`` (ratio to the scenario's reference peer, must be
    at least ``threshold``) or ``rss_total_mb`` (must stay below ``threshold``).
    """

    peer: str
    metric: str
    threshold: float
    text: str


@dataclass
class ScenarioResult:
    """One scenario: same data, same sender, several peers, the first being the reference."""

    name: str
    title: str
    instances: int
    bytes: int
    associations: int
    peers: list[PeerResult] = field(default_factory=list)
    target: Target | None = None
    notes: list[str] = field(default_factory=list)

    def mbps(self, peer: PeerResult) -> float | None:
        wall = peer.wall_s
        return self.bytes / MB / wall if wall else None

    def ips(self, peer: PeerResult) -> float | None:
        wall = peer.wall_s
        return self.instances / wall if wall else None

    @property
    def reference(self) -> PeerResult | None:
        return self.peers[0] if self.peers else None

    def ratio(self, peer: PeerResult) -> float | None:
        ref = self.reference
        if ref is None or ref.wall_s is None or peer.wall_s is None:
            return None
        return ref.wall_s / peer.wall_s

    def peer(self, label: str) -> PeerResult | None:
        return next((p for p in self.peers if p.label == label), None)

    def verdict(self) -> tuple[bool | None, str]:
        """``(passed, measured value as text)``; ``None`` when the peer has no good runs."""
        if self.target is None:
            return None, ""
        peer = self.peer(self.target.peer)
        if peer is None or not peer.all_ok:
            return None, "not measured" if peer is None or not peer.runs else "runs failed"
        if self.target.metric == "rss_total_mb":
            value = (peer.rss_total or 0) / MB
            return value < self.target.threshold, f"{value:.0f} MB"
        ratio = self.ratio(peer)
        if ratio is None:
            return None, "no reference"
        return ratio >= self.target.threshold, f"{ratio:.2f}x"
