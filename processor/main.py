"""Entry point of the processor service: ``python -m processor --config PATH [--once]``."""

from __future__ import annotations

from common.task_loop import task_service_main
from processor.events import ProcessEvents
from processor.service import ProcessorService


def main(argv: list[str] | None = None) -> int:
    return task_service_main(
        argv,
        service="processor",
        description="Runs the processing modules of the task folders of processing/ in Docker "
        "containers.",
        once_help="process every task that is ready now, then exit",
        events_class=ProcessEvents,
        build=lambda config, path, events: ProcessorService(config, path, events=events),
    )
