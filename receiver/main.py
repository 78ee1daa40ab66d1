"""Entry point of the receiver service: ``python -m receiver --config PATH``."""

from __future__ import annotations

import argparse
import logging

from common import exitcodes
from common.config import load_config, resolve_config_path
from common.entry import service_parser
from common.errors import ConfigError
from common.logs import setup_logging
from receiver.server import ReceiverServer

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    return service_parser(
        "receiver",
        "DICOM C-ECHO/C-STORE SCP writing every instance into the incoming spool.",
        None,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("receiver")
    config_path = resolve_config_path(args.config).absolute()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        logger.error("invalid configuration %s: %s", config_path, exc)
        return exitcodes.EX_CONFIG
    return ReceiverServer(config_path, config).serve()
