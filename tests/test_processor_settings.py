"""The processor's settings: defaults, and errors that name the configuration field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.errors import ConfigError
from processor.settings import NOBODY, ProcessorSettings
from tests.processor_helpers import processor_config


def test_defaults_are_safe(tmp_path: Path) -> None:
    settings = ProcessorSettings.from_config(processor_config(tmp_path))

    assert settings.timeout == 3600
    assert settings.memory_limit == "4g"
    assert settings.pids_limit == 4096
    assert settings.pull_images is False
    assert settings.volume_roots == ("/opt/caduceus/processor_volumes",)
    expected = NOBODY if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    assert settings.container_user() == expected


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("processing_timeout", -5, "processing_timeout: Input should be greater than 0"),
        ("processing_user", "root", "processing_user: Value error, must be uid or uid:gid"),
        ("processing_memory_limit", "lots", "processing_memory_limit: Value error, must be"),
        ("processing_volume_roots", ["relative/dir"], "processing_volume_roots: Value error"),
        ("processing_max_parallel", 0, "processing_max_parallel: Input should be greater"),
        ("dispatcher_scan_interval", 0, "dispatcher_scan_interval:"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    try:
        config = processor_config(tmp_path, **{field: value})
    except ConfigError as exc:  # refused by the configuration model itself
        assert field in str(exc)
        return
    with pytest.raises(ConfigError) as raised:
        ProcessorSettings.from_config(config)

    assert str(raised.value).startswith("invalid processor settings:")
    assert message in str(raised.value)


def test_retry_wait_doubles_up_to_an_hour(tmp_path: Path) -> None:
    settings = ProcessorSettings.from_config(processor_config(tmp_path, processing_retry_delay=60))

    assert [settings.retry_wait(n) for n in (1, 2, 3, 7, 20)] == [60, 120, 240, 3600, 3600]
