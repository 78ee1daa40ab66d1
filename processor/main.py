"""Entry point of the processor service: ``python -m processor --config PATH [--once]``."""

from __future__ import annotations

import argparse
import logging
import os

from common import exitcodes
from common.config import load_config, resolve_config_path
from common.entry import service_parser
from common.errors import ConfigError, OutboxError
from common.logs import setup_logging
from processor.events import ProcessEvents
from processor.service import ProcessorService

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    return service_parser(
        "processor",
        "Runs the processing modules of the task folders of processing/ in Docker containers.",
        "process every task that is ready now, then exit",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("processor")
    config_path = resolve_config_path(args.config).absolute()
    try:
        config = load_config(config_path)
        events = ProcessEvents.open(config.spool_paths().state)
        service = ProcessorService(config, config_path, events=events)
    except ConfigError as exc:
        logger.error("invalid configuration %s: %s", config_path, exc)
        return exitcodes.EX_CONFIG
    except OutboxError as exc:
        logger.error("cannot open the event outbox: %s", exc)
        return exitcodes.EX_CANTCREAT
    try:
        if args.once:
            return service.once()
        service.install_signal_handlers()
        code = service.run()
    finally:
        events.close()
    if code == exitcodes.EX_INTERRUPTED:
        # A worker may still be inside a Docker call: leave without joining it.
        logging.shutdown()
        os._exit(code)
    return code
