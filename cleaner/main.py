"""Entry point of the cleaner service: ``python -m cleaner --config PATH [--once]``."""

from __future__ import annotations

import argparse
import logging

from cleaner.service import CleanerService
from common import exitcodes
from common.config import load_config, resolve_config_path
from common.entry import service_parser
from common.errors import ConfigError
from common.logs import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    return service_parser(
        "cleaner",
        "Deletes finished tasks after their retention (off-peak) and, when the disk "
        "passes the emergency threshold, the oldest until it is back under.",
        "make one cleaning pass, then exit (70 on a failure)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("cleaner")
    config_path = resolve_config_path(args.config).absolute()
    try:
        service = CleanerService(load_config(config_path), config_path)
    except ConfigError as exc:
        logger.error("invalid configuration %s: %s", config_path, exc)
        return exitcodes.EX_CONFIG
    if args.once:
        return service.once()
    service.install_signal_handlers()
    return service.run()
