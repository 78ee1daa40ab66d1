"""Entry point of the shipper service: ``python -m shipper --config PATH [--once]``."""

from __future__ import annotations

import argparse
import logging

from common import exitcodes
from common.config import load_config, resolve_config_path
from common.entry import service_parser
from common.errors import ConfigError
from common.logs import setup_logging
from shipper.service import ShipperService

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    return service_parser(
        "shipper",
        "Ships every event outbox of this host (<state>/outbox) to the bookkeeper.",
        "ship every outbox until it is empty, then exit (69 when the bookkeeper failed)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("shipper")
    config_path = resolve_config_path(args.config).absolute()
    try:
        service = ShipperService(load_config(config_path), config_path)
    except ConfigError as exc:
        logger.error("invalid configuration %s: %s", config_path, exc)
        return exitcodes.EX_CONFIG
    if args.once:
        return service.once()
    service.install_signal_handlers()
    return service.run()
