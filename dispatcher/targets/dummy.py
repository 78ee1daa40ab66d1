"""Dummy targets: accept every task and send nothing (mercure ``dummy``, for tests and demos)."""

from __future__ import annotations

from dispatcher.targets.base import TargetJob, TargetResult


class DummyHandler:
    def send(self, job: TargetJob) -> TargetResult:
        return TargetResult(ok=True)
