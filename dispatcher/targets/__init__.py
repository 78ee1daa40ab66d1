"""The registry of target handlers, keyed by the ``target_type`` discriminator of the
configuration's target union (``common.config.Target``).

A target type without a handler gets :class:`Unsupported`, whose attempts fail permanently with
"target type 'sftp' is not supported yet" — the task goes to ``error/`` with that reason.
"""

from __future__ import annotations

from typing import Final

from common.config import Target
from dispatcher.targets.base import TargetHandler, TargetJob, TargetResult
from dispatcher.targets.dicom import DicomHandler
from dispatcher.targets.dummy import DummyHandler
from dispatcher.targets.folder import FolderHandler

HANDLERS: Final[dict[str, TargetHandler]] = {
    "dicom": DicomHandler(),
    "folder": FolderHandler(),
    "dummy": DummyHandler(),
}


class Unsupported:
    """Stands in for a target type that has no handler yet."""

    def __init__(self, target_type: str) -> None:
        self.target_type = target_type

    def send(self, job: TargetJob) -> TargetResult:
        return TargetResult(
            ok=False,
            permanent=True,
            message=f"target type {self.target_type!r} is not supported yet",
        )


def handler_for(target: Target) -> TargetHandler:
    """The handler of ``target``'s type (an :class:`Unsupported` one when there is none)."""
    return HANDLERS.get(target.target_type) or Unsupported(target.target_type)


__all__ = ["HANDLERS", "TargetHandler", "TargetJob", "TargetResult", "Unsupported", "handler_for"]
