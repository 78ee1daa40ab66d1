"""The processor's settings, taken from the user configuration once per loop iteration.

mercure's fields (``dispatcher_scan_interval`` — mercure's processor polls at the dispatcher's
pace —, ``offpeak_*``, ``support_root_modules``, ``processing_runtime``, ``processing_logs``) and
the Caduceus additions below are declared by :class:`common.config.Config`; the additions
default to None there and get their defaults and validation here; ``docs/processor.md`` lists
them. A bad value is a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.config import Config
from common.service_settings import settings_from_config

NOBODY: Final = "65534:65534"
"""The container user when the processor itself runs as root (Debian's nobody:nogroup)."""

DEFAULT_VOLUME_ROOT: Final = "/opt/caduceus/processor_volumes"
"""Host folders a module may mount (``additional_volumes``) must lie under one of the roots;
mercure's equivalent is ``/opt/mercure/processor_volumes``."""

_USER = re.compile(r"^[0-9]{1,10}(:[0-9]{1,10})?$")
_MEMORY = re.compile(r"^[0-9]+[bkmg]?$", re.IGNORECASE)

Positive = Annotated[float, Field(gt=0)]


class ProcessorSettings(BaseModel):
    """Everything the processor needs from the configuration, validated, frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scan_interval: Positive = 1.0
    max_parallel: Annotated[int, Field(ge=1, le=32)] = 1
    """Tasks processed at once by one processor process (``processing_max_parallel``)."""
    timeout: Positive = 3600.0
    """Default seconds a module step may run (``processing_timeout``; a module's ``timeout``
    wins)."""
    memory_limit: str = "4g"
    """Docker ``mem_limit`` of a module container (``processing_memory_limit``, e.g. ``512m``);
    ``docker_arguments`` of a module may set its own."""
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None
    """CPUs a module container may use (``processing_cpus``); None: all of them."""
    pids_limit: Annotated[int, Field(ge=16)] = 4096
    user: str | None = None
    """``uid[:gid]`` modules run as (``processing_user``); None: the processor's own user, or
    :data:`NOBODY` when the processor runs as root."""
    volume_roots: tuple[str, ...] = (DEFAULT_VOLUME_ROOT,)
    pull_images: bool = False
    """Pull a module's image when it is missing locally (``processing_pull_images``)."""
    retry_delay: Annotated[float, Field(ge=0)] = 60.0
    """Seconds before a task whose run failed for a reason outside the module (engine
    unreachable, Docker API error) is tried again; doubles per attempt up to an hour."""
    retry_max: Annotated[int, Field(ge=1, le=1000)] = 10
    """Attempts for such failures before the task goes to ``error/``."""
    docker_url: str | None = None
    """The engine's address (``docker_url``); None: ``DOCKER_HOST`` or the local socket."""
    support_root_modules: bool = False
    runtime: str | None = None
    discard_logs: bool = False
    offpeak_start: str = "22:00"
    offpeak_end: str = "06:00"

    @field_validator("user")
    @classmethod
    def _user_form(cls, value: str | None) -> str | None:
        if value is not None and not _USER.match(value):
            raise ValueError("must be uid or uid:gid (numbers)")
        return value

    @field_validator("memory_limit")
    @classmethod
    def _memory_form(cls, value: str) -> str:
        if not _MEMORY.match(value):
            raise ValueError("must be a number of bytes with an optional b/k/m/g unit")
        return value

    @field_validator("volume_roots")
    @classmethod
    def _absolute_roots(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for root in value:
            if not os.path.isabs(root):
                raise ValueError(f"{root!r} is not an absolute path")
        return tuple(os.path.normpath(root) for root in value)

    def container_user(self) -> str:
        """The ``uid:gid`` a module runs as unless it requires root."""
        if self.user is not None:
            return self.user
        uid, gid = os.getuid(), os.getgid()
        return NOBODY if uid == 0 else f"{uid}:{gid}"

    def retry_wait(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th infrastructure failure."""
        wait: float = self.retry_delay * 2.0 ** max(failed_attempts - 1, 0)
        return min(wait, max(3600.0, self.retry_delay))

    def is_offpeak(self, now: datetime) -> bool:
        """mercure's window (inclusive, wrapping midnight), in local time."""
        start = datetime.strptime(self.offpeak_start, "%H:%M").time()
        end = datetime.strptime(self.offpeak_end, "%H:%M").time()
        moment = now.time()
        if start < end:
            return start <= moment <= end
        return moment >= start or moment <= end

    @classmethod
    def from_config(cls, config: Config) -> ProcessorSettings:
        """Read the settings; raise :class:`ConfigError` naming an invalid field."""
        return settings_from_config(
            cls,
            config,
            given={
                "scan_interval": config.dispatcher_scan_interval,
                "support_root_modules": bool(config.support_root_modules),
                "runtime": config.processing_runtime or None,
                "discard_logs": config.processing_logs.discard_logs,
                "offpeak_start": config.offpeak_start,
                "offpeak_end": config.offpeak_end,
            },
            optional=_SETTING_FOR,
            names={"scan_interval": "dispatcher_scan_interval"},
            service="processor",
        )


_SETTING_FOR: Final = {
    "processing_max_parallel": "max_parallel",
    "processing_timeout": "timeout",
    "processing_memory_limit": "memory_limit",
    "processing_cpus": "cpus",
    "processing_pids_limit": "pids_limit",
    "processing_user": "user",
    "processing_volume_roots": "volume_roots",
    "processing_pull_images": "pull_images",
    "processing_retry_delay": "retry_delay",
    "processing_retry_max": "retry_max",
    "docker_url": "docker_url",
}
