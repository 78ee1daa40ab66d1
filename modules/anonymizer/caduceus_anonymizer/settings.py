"""The module's settings: read from ``task.json`` -> ``process.settings`` and validated.

mercure passes the settings of the current processing step as ``process`` (a dict). When a chain
is passed as a list, the step is the one whose ``module_name`` is ``$CADUCEUS_MODULE_NAME``, or else
the only step whose image name ends in ``anonymizer``. Unknown keys are an error: a misspelt option
of an anonymiser must not be ignored silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

MIN_SECRET_LENGTH = 16
MAX_LO_LENGTH = 64  # PS3.5 Table 6.2-1: LO holds at most 64 characters


E = TypeVar("E", bound=StrEnum)


class SettingsError(Exception):
    """The task file or the settings are missing, malformed or unsafe."""


class Dates(StrEnum):
    """What happens to dates and times (PS3.15 E.3.6)."""

    REMOVE = "remove"  # the Basic Profile
    KEEP = "keep"  # Retain Longitudinal Temporal Information Full Dates Option
    SHIFT = "shift"  # ... Modified Dates Option: a constant day offset per patient


class PrivateTags(StrEnum):
    """What happens to private attributes (PS3.15 E.3.10)."""

    REMOVE = "remove"
    KEEP_SAFE = "keep_safe"  # Retain Safe Private Option, with the safe list in ``safe_private``


@dataclass(frozen=True)
class SafePrivate:
    """One private attribute known to be safe: group, private creator and element offset."""

    group: int
    creator: str
    offset: int


@dataclass(frozen=True)
class Settings:
    """Validated settings; see README.md for each key."""

    secret: bytes
    project_name: str | None = None
    pseudonym: str | None = None
    pseudonym_prefix: str = "ANON-"
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    dates: Dates = Dates.REMOVE
    date_shift_max_days: int = 365
    private_tags: PrivateTags = PrivateTags.REMOVE
    safe_private: tuple[SafePrivate, ...] = ()


_BOOLS = (
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "clean_descriptors",
)
_KNOWN = {
    "secret",
    "secret_env",
    "project_name",
    "pseudonym",
    "pseudonym_prefix",
    "dates",
    "date_shift_max_days",
    "private_tags",
    "safe_private",
    *_BOOLS,
}


def load_task_settings(in_dir: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """The raw ``process.settings`` of this step from ``in_dir/task.json`` (``{}`` if absent)."""
    task_path = in_dir / "task.json"
    try:
        task = json.loads(task_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{task_path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{task_path} cannot be read: {exc}") from None
    if not isinstance(task, dict):
        raise SettingsError(f"{task_path} is not a JSON object")
    step = _current_step(task.get("process"), environ)
    settings = step.get("settings") or {}
    if not isinstance(settings, dict):
        raise SettingsError("process.settings in task.json is not a JSON object")
    return dict(settings)


def _current_step(process: object, environ: Mapping[str, str]) -> dict[str, Any]:
    if process is None or isinstance(process, dict):
        return process or {}
    if not isinstance(process, list) or not all(isinstance(s, dict) for s in process):
        raise SettingsError("process in task.json is neither an object nor a list of objects")
    name = environ.get("CADUCEUS_MODULE_NAME")
    steps: list[dict[str, Any]]
    if name:
        steps = [s for s in process if s.get("module_name") == name]
    else:
        steps = [s for s in process if _image_name(s).endswith("anonymizer")]
    if len(steps) != 1:
        raise SettingsError(
            f"process in task.json is a chain of {len(process)} steps and {len(steps)} of them "
            "match this module; set CADUCEUS_MODULE_NAME to the step's module_name"
        )
    return steps[0]


def _image_name(step: dict[str, Any]) -> str:
    config = step.get("module_config") or {}
    tag = str(config.get("docker_tag", "")) if isinstance(config, dict) else ""
    return tag.split("@")[0].rsplit(":", 1)[0] if "/" in tag or ":" in tag else tag


def parse_settings(raw: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Validate ``raw`` (``process.settings``); raise :class:`SettingsError` with the reason."""
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
    flags = {key: _bool(raw, key) for key in _BOOLS}
    dates = _choice(raw, "dates", Dates, Dates.REMOVE)
    private_tags = _choice(raw, "private_tags", PrivateTags, PrivateTags.REMOVE)
    max_days = raw.get("date_shift_max_days", 365)
    if isinstance(max_days, bool) or not isinstance(max_days, int) or not 1 <= max_days <= 36500:
        raise SettingsError("date_shift_max_days must be an integer from 1 to 36500")
    return Settings(
        secret=_secret(raw, environ),
        project_name=_text(raw, "project_name"),
        pseudonym=_text(raw, "pseudonym"),
        pseudonym_prefix=_text(raw, "pseudonym_prefix", max_length=32) or "ANON-",
        dates=dates,
        date_shift_max_days=max_days,
        private_tags=private_tags,
        safe_private=_safe_private(raw.get("safe_private", [])),
        **flags,
    )


def _secret(raw: Mapping[str, Any], environ: Mapping[str, str]) -> bytes:
    if "secret" in raw and "secret_env" in raw:
        raise SettingsError("set either secret or secret_env, not both")
    if "secret_env" in raw:
        name = raw["secret_env"]
        if not isinstance(name, str) or not name:
            raise SettingsError("secret_env must name an environment variable")
        value = environ.get(name, "")
        origin = f"environment variable {name}"
    else:
        value = raw.get("secret", "")
        origin = "setting secret"
    if not isinstance(value, str) or not value:
        raise SettingsError(
            "no secret configured: set process.settings.secret, or secret_env to the name of an "
            "environment variable holding it (there is no built-in secret)"
        )
    if len(value) < MIN_SECRET_LENGTH:
        raise SettingsError(f"the secret from {origin} is shorter than {MIN_SECRET_LENGTH} chars")
    return value.encode("utf-8")


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise SettingsError(f"{key} must be true or false")
    return value


def _choice(raw: Mapping[str, Any], key: str, enum: type[E], default: E) -> E:
    value = raw.get(key, default.value)
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise SettingsError(f"{key} must be one of: {allowed}") from None


def _text(raw: Mapping[str, Any], key: str, *, max_length: int = MAX_LO_LENGTH) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{key} must be a non-empty string")
    if len(value) > max_length or any(c in value for c in "\\^=") or not value.isprintable():
        raise SettingsError(
            f"{key} must be at most {max_length} printable characters without \\ ^ or ="
        )
    return value


def _safe_private(value: object) -> tuple[SafePrivate, ...]:
    """Parse ``["0019,GEMS_ACQU_01,10", ...]``: group, private creator, element offset (hex)."""
    if not isinstance(value, list):
        raise SettingsError("safe_private must be a list of 'gggg,CREATOR,ee' strings")
    entries = []
    for entry in value:
        group, _, rest = str(entry).partition(",")
        creator, _, offset = rest.rpartition(",")
        try:
            parsed = SafePrivate(int(group, 16), creator.strip(), int(offset, 16))
        except ValueError:
            raise SettingsError(f"safe_private entry {entry!r} is not 'gggg,CREATOR,ee'") from None
        if parsed.group % 2 == 0 or not parsed.creator or not 0 <= parsed.offset <= 0xFF:
            raise SettingsError(f"safe_private entry {entry!r} is not 'gggg,CREATOR,ee'")
        entries.append(parsed)
    return tuple(entries)
