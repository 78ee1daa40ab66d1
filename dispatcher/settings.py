"""The dispatcher's settings, taken from the user configuration once per loop iteration.

mercure's fields (``dispatcher_scan_interval``, ``retry_delay``, ``retry_max``, ``offpeak_*``)
and the Caduceus additions below are declared by :class:`common.config.Config`; the additions
default to None there and get their defaults and validation here; ``docs/dispatcher.md`` lists
them. A bad value is a :class:`ConfigError` naming the field, as for every other setting.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field

from common.config import Config
from common.service_settings import settings_from_config

DEFAULT_AE_TITLE: Final = "CADUCEUS"
"""Calling AE title of the dispatcher when a target names none (``aet_source`` empty)."""

MEASURED_MAX_PDU: Final = 131072
"""Largest P-DATA-TF PDU the dispatcher sends, when the peer accepts larger ones.

Chosen by measurement (``bench/dispatch_bench.py``, max-PDU sweep, ``docs/dispatcher.md``):
with the streamed data path no PDU size from 16 KiB to 4 MiB gained throughput consistently
across runs, against storescp or against a receiver accepting 16 MiB. The data set is streamed
from the file whatever the PDU size, so the cap bounds nothing but the PDU; 128 KiB is what
storescp and most PACS accept anyway."""

CADUCEUS_FIELDS: Final = (
    "dispatcher_max_parallel",
    "retry_multiplier",
    "retry_max_delay",
    "dispatcher_aet",
    "dispatcher_max_pdu",
    "dispatcher_connection_timeout",
    "dispatcher_acse_timeout",
    "dispatcher_dimse_timeout",
    "dispatcher_network_timeout",
)
"""Configuration fields the dispatcher adds to mercure's (see the module docstring)."""

Positive = Annotated[float, Field(gt=0)]


class DispatcherSettings(BaseModel):
    """Everything the dispatcher needs from the configuration, validated, frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scan_interval: Positive = 1.0
    max_parallel: Annotated[int, Field(ge=1, le=64)] = 2
    """Tasks in flight at once in one dispatcher process (``dispatcher_max_parallel``)."""
    retry_delay: Annotated[float, Field(ge=0)] = 900.0
    retry_multiplier: Annotated[float, Field(ge=1)] = 2.0
    retry_max_delay: Annotated[float, Field(ge=0)] = 3600.0
    retry_max: Annotated[int, Field(ge=0)] = 5
    """Attempts before a task goes to ``error/`` (mercure: 0 and 1 both mean one attempt)."""
    ae_title: Annotated[str, Field(min_length=1, max_length=16)] = DEFAULT_AE_TITLE
    max_pdu: Annotated[int, Field(ge=0)] = MEASURED_MAX_PDU
    """Largest PDU sent (0: as large as the peer accepts)."""
    connection_timeout: Positive = 10.0
    acse_timeout: Positive = 30.0
    dimse_timeout: Positive = 60.0
    network_timeout: Positive = 60.0
    offpeak_start: str = "22:00"
    offpeak_end: str = "06:00"

    def retry_wait(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failed attempt (1, 2, ...).

        ``retry_delay * retry_multiplier ** (n - 1)``, at most ``retry_max_delay`` (but never
        less than ``retry_delay``).
        """
        exponent = max(failed_attempts - 1, 0)
        try:
            wait = self.retry_delay * self.retry_multiplier**exponent
        except OverflowError:
            wait = float("inf")
        return min(wait, max(self.retry_max_delay, self.retry_delay))

    def attempts_allowed(self) -> int:
        """Attempts before giving up: mercure gives up when ``retries >= retry_max``."""
        return max(self.retry_max, 1)

    def is_offpeak(self, now: datetime) -> bool:
        """mercure's window (inclusive, wrapping midnight), in local time."""
        start = datetime.strptime(self.offpeak_start, "%H:%M").time()
        end = datetime.strptime(self.offpeak_end, "%H:%M").time()
        moment = now.time()
        if start < end:
            return start <= moment <= end
        return moment >= start or moment <= end

    @classmethod
    def from_config(cls, config: Config) -> DispatcherSettings:
        """Read the settings; raise :class:`ConfigError` naming an invalid Caduceus field."""
        return settings_from_config(
            cls,
            config,
            given={
                "scan_interval": config.dispatcher_scan_interval,
                "retry_delay": config.retry_delay,
                "retry_max": config.retry_max,
                "offpeak_start": config.offpeak_start,
                "offpeak_end": config.offpeak_end,
            },
            optional={field: _SETTING_FOR[field] for field in CADUCEUS_FIELDS},
            names={"scan_interval": "dispatcher_scan_interval"},
            service="dispatcher",
        )


_SETTING_FOR: Final = {
    "dispatcher_max_parallel": "max_parallel",
    "retry_multiplier": "retry_multiplier",
    "retry_max_delay": "retry_max_delay",
    "dispatcher_aet": "ae_title",
    "dispatcher_max_pdu": "max_pdu",
    "dispatcher_connection_timeout": "connection_timeout",
    "dispatcher_acse_timeout": "acse_timeout",
    "dispatcher_dimse_timeout": "dimse_timeout",
    "dispatcher_network_timeout": "network_timeout",
}
