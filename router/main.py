"""Entry point of the router service: ``python -m router --config PATH [--once]``."""

from __future__ import annotations

import argparse
import logging
import os

from common import exitcodes
from common.config import load_config, resolve_config_path
from common.entry import service_parser
from common.errors import CaduceusError, ConfigError
from common.logs import setup_logging
from router.hooks import checkpoint_from_env
from router.service import Router

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    return service_parser(
        "router",
        "Routes every complete series in incoming/ into tasks, by the rules.",
        "route every series that is complete now, then exit (70 if one failed)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("router")
    config_path = resolve_config_path(args.config).absolute()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        logger.error("invalid configuration %s: %s", config_path, exc)
        return exitcodes.EX_CONFIG
    try:
        checkpoint = checkpoint_from_env(os.environ)
    except ValueError as exc:
        logger.error("%s", exc)
        return exitcodes.EX_USAGE
    try:
        router = Router(config, config_path, checkpoint=checkpoint)
    except (OSError, CaduceusError) as exc:
        logger.error("cannot prepare the spool or the event outbox: %s", exc)
        return exitcodes.EX_CANTCREAT
    try:
        if args.once:
            return router.once()
        router.install_signal_handlers()
        return router.run()
    finally:
        router.close()
