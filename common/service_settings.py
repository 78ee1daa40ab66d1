"""How a service reads its own settings from the configuration (the dispatcher's, the
processor's): mercure's fields as they are, the Caduceus additions only when set (None in
:class:`~common.config.Config` means "the service's default"), validated by the service's
frozen pydantic model, and every error named by its configuration field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from common.config import Config
from common.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseModel)


def settings_from_config(
    model: type[SettingsT],
    config: Config,
    *,
    given: Mapping[str, Any],
    optional: Mapping[str, str],
    names: Mapping[str, str],
    service: str,
) -> SettingsT:
    """Validate ``given`` (setting -> value) plus each ``optional`` configuration field (field ->
    setting) that is not None; :class:`ConfigError` names each bad value by its configuration
    field (``names``: setting -> field, for the settings not in ``optional``)."""
    values = dict(given)
    for field, setting in optional.items():
        value = getattr(config, field, None)
        if value is not None:
            values[setting] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        field_for = {**names, **{setting: field for field, setting in optional.items()}}
        lines = []
        for error in exc.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else ""
            lines.append(f"{field_for.get(name, name)}: {error['msg']}")
        raise ConfigError(f"invalid {service} settings:\n  " + "\n  ".join(lines)) from None
