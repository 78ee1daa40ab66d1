"""Logging set up once per process (daiquiri)."""

import logging
import os

import daiquiri

LOG_LEVEL_ENV = "CADUCEUS_LOG_LEVEL"


def setup_logging(service: str, level: str | None = None) -> None:
    """Configure the root logger for ``service``; call once, from ``main``.

    The level comes from ``level``, else ``CADUCEUS_LOG_LEVEL``, else INFO.
    """
    chosen = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    daiquiri.setup(
        level=getattr(logging, chosen, logging.INFO),
        outputs=[
            daiquiri.output.Stream(
                formatter=daiquiri.formatter.ColorFormatter(
                    fmt=f"%(asctime)s [%(process)d] %(levelname)s {service} %(name)s: %(message)s"
                )
            )
        ],
    )
    # pynetdicom logs every PDU at INFO; keep it quiet unless asked.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
