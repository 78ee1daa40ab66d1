"""Entry point of the dispatcher service: ``python -m dispatcher --config PATH [--once]``."""

from __future__ import annotations

from common.task_loop import task_service_main
from dispatcher.events import DispatchEvents
from dispatcher.service import DispatcherService


def main(argv: list[str] | None = None) -> int:
    return task_service_main(
        argv,
        service="dispatcher",
        description="Sends the task folders of outgoing/ to their targets (C-STORE, folder, ...).",
        once_help="dispatch every task that is ready now, then exit",
        events_class=DispatchEvents,
        build=lambda config, path, events: DispatcherService(config, path, events=events),
    )
