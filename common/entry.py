"""What every service's ``main()`` shares: its command line."""

from __future__ import annotations

import argparse

from common.config import CONFIG_ENV


def service_parser(
    service: str, description: str, once_help: str | None
) -> argparse.ArgumentParser:
    """``caduceus <service> [--config PATH] [--once]``; ``--once`` only when ``once_help``."""
    parser = argparse.ArgumentParser(prog=f"caduceus {service}", description=description)
    parser.add_argument(
        "--config", help=f"configuration file (default: ${CONFIG_ENV} or config/caduceus.json)"
    )
    if once_help is not None:
        parser.add_argument("--once", action="store_true", help=once_help)
    return parser
