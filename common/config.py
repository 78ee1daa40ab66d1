"""User configuration (DESIGN §3): the mercure-compatible ``caduceus.json`` as a frozen model.

Field names and defaults are mercure's (``mercure.json``), so an existing mercure configuration
loads as it is. ``docs/configuration.md`` describes every field, the Caduceus additions
(``data_root``, the ``dicom_receiver`` settings) and the deviations from mercure.

Contracts:

* :func:`load_config` and :func:`parse_config` return a valid :class:`Config` or raise
  :class:`~common.errors.ConfigError` whose message names every offending field by its dotted path
  (``rules.ct_rule.action: Input should be 'route', ...``).
* Fields are never silently dropped: mercure settings that Caduceus does not use are kept and
  listed in :attr:`Config.ignored_fields`, fields nobody knows (typos, newer mercure versions) are
  kept and listed in :attr:`Config.unknown_fields`; each load logs one warning per list.
* Secrets may be written as ``"env:NAME"`` or ``"file:/path"`` and are resolved at load;
  :meth:`Config.dump_for_file` writes the references back, never the resolved values.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from datetime import datetime, time
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from common.errors import ConfigError
from common.spool import Folder, SpoolPaths, atomic_write_json

logger = logging.getLogger(__name__)

CONFIG_ENV = "CADUCEUS_CONFIG"
"""Environment variable naming the configuration file (below ``--config``, above the default)."""
DEFAULT_CONFIG_PATH = Path("config/caduceus.json")
BOOKKEEPER_API_KEY_ENV = "CADUCEUS_BOOKKEEPER_API_KEY"
"""When set and non-empty, replaces ``bookkeeper_api_key`` from the file."""
DEFAULT_DATA_ROOT = "./data"
MERCURE_DATA_ROOT = "/opt/mercure/data"
"""Where the spool lives when ``data_root`` is ``null`` (mercure's layout)."""
BOOKKEEPER_TOKEN_PLACEHOLDER = "BOOKKEEPER_TOKEN_PLACEHOLDER"  # noqa: S105 (refused, not used)
"""mercure's shipped placeholder token; refused, as mercure does."""
SECRET_TARGET_FIELDS = frozenset(
    {"password", "http_password", "access_token", "access_key_id", "secret_access_key"}
)
"""Target fields that accept ``env:``/``file:`` references."""

Action = Literal["route", "both", "process", "notification", "discard"]
ActionTrigger = Literal["series", "study"]
StudyTriggerCondition = Literal["timeout", "received_series"]
StudyForceCompletionAction = Literal["discard", "proceed", "ignore"]
Priority = Literal["normal", "urgent", "offpeak"]

# ---------------------------------------------------------------------------- field types

# PS3.5 §6.2, VR AE: at most 16 characters of the default repertoire without backslash or control
# characters; leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_HH_MM = re.compile(r"([01]?\d|2[0-3]):[0-5]\d")
_UNSAFE_NAME = re.compile(r"[/\\#\x00-\x1f\x7f]")
_DOCKER_TAG = re.compile(r"[a-zA-Z0-9\-:/_.@]*")


def _ae_title(value: str) -> str:
    if not _AE_TITLE.fullmatch(value) or not value.strip():
        raise ValueError(
            f"{value!r} is not a valid AE title "
            "(1-16 printable ASCII characters, no backslash, not only spaces)"
        )
    return value.strip()


def _optional_ae_title(value: str) -> str:
    return _ae_title(value) if value else value


def _hh_mm(value: str) -> str:
    if not _HH_MM.fullmatch(value):
        raise ValueError(f"{value!r} is not a time of day as HH:MM")
    return value


def _safe_name(value: str) -> str:
    """Rule, module and target names end up in folder names and task files."""
    if value in ("", ".", "..") or _UNSAFE_NAME.search(value):
        raise ValueError(
            f"{value!r} is not a usable name (empty, '.', '..', or contains '/', '\\', '#' "
            "or a control character)"
        )
    return value


def _ip_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return value


def _none_as_empty(value: Any) -> Any:
    return "" if value is None else value


def _empty_as_none(value: Any) -> Any:
    return None if value == "" else value


def _as_name_list(value: Any) -> Any:
    """mercure writes one name as a string and several as a list; "" means none."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else value


def _settings_shape(value: Any) -> Any:
    if isinstance(value, dict) or (
        isinstance(value, list) and all(isinstance(item, dict) for item in value)
    ):
        return value
    raise ValueError("must be a JSON object, or a list of objects (one per module of a chain)")


def _tags_mapping(value: Any) -> Any:
    """mercure's defaults use ``[]``; older files list tag names without example values."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return dict.fromkeys(value, "")
    return value


def _json_object_text(value: Any) -> Any:
    """mercure stores these as JSON *strings*; an object is accepted and stored as its text."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    return value


def _check_json_object(text: str) -> str:
    _parse_json_object(text)
    return text


def _parse_json_object(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError('must be a JSON object (as a string), e.g. "{\\"KEY\\": \\"value\\"}"')
    return parsed


def _docker_tag(value: str) -> str:
    if not _DOCKER_TAG.fullmatch(value):
        raise ValueError(f"{value!r} is not a Docker image reference")
    return value


Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[int | float, Field(ge=0)]
Interval = Annotated[int | float, Field(gt=0)]
AETitle = Annotated[str, AfterValidator(_ae_title)]
OptionalAETitle = Annotated[
    str, BeforeValidator(_none_as_empty), AfterValidator(_optional_ae_title)
]
OffpeakTime = Annotated[str, AfterValidator(_hh_mm)]
Name = Annotated[str, AfterValidator(_safe_name)]
NameList = Annotated[list[str], BeforeValidator(_as_name_list)]
OptStr = Annotated[str, BeforeValidator(_none_as_empty)]
OptBool = Annotated[bool, BeforeValidator(lambda value: False if value is None else value)]
FolderSetting = Annotated[str | None, BeforeValidator(_empty_as_none)]
IPNetworkText = Annotated[str, AfterValidator(_ip_network)]
JsonObjectText = Annotated[
    str, BeforeValidator(_json_object_text), AfterValidator(_check_json_object)
]
ProcessingSettings = Annotated[
    dict[str, Any] | list[dict[str, Any]], BeforeValidator(_settings_shape)
]


class _Model(BaseModel):
    """Base of every configuration model: frozen; keeps (and reports) fields it does not know."""

    model_config = ConfigDict(frozen=True, extra="allow")

    ignored_settings: ClassVar[frozenset[str]] = frozenset()
    """mercure fields of this model that Caduceus accepts but does not act on."""


# ---------------------------------------------------------------------------- targets


class _TargetBase(_Model):
    contact: OptStr = ""
    comment: OptStr = ""
    direction: Annotated[
        Literal["push", "pull", "both"],
        BeforeValidator(lambda value: "push" if value is None else value),
    ] = "push"

    ignored_settings = frozenset({"direction"})


class _DicomBase(_TargetBase):
    ip: Annotated[str, Field(min_length=1, pattern=r"^\S+$")]
    """Host name or IP address of the peer."""
    port: Port
    aet_target: AETitle
    aet_source: OptionalAETitle = ""
    """Calling AE title; empty means Caduceus' own."""
    pass_sender_aet: bool = False
    pass_receiver_aet: bool = False


class DicomTarget(_DicomBase):
    """DICOM C-STORE; ``ip`` may be the literal ``sender`` (the address the series came from)."""

    target_type: Literal["dicom"] = "dicom"


class DicomTLSTarget(_DicomBase):
    target_type: Literal["dicomtls"] = "dicomtls"
    tls_key: str
    tls_cert: str
    ca_cert: str

    @field_validator("ip")
    @classmethod
    def _no_sender(cls, value: str) -> str:
        if value == "sender":
            raise ValueError("'sender' is not supported for DICOM TLS targets")
        return value


class DicomWebTarget(_TargetBase):
    target_type: Literal["dicomweb"] = "dicomweb"
    url: Annotated[str, Field(pattern=r"^(https?|file)://")]
    qido_url_prefix: str | None = None
    wado_url_prefix: str | None = None
    stow_url_prefix: str | None = None
    access_token: str | None = Field(default=None, repr=False)
    http_user: str | None = None
    http_password: str | None = Field(default=None, repr=False)


class _RemoteFolderBase(_TargetBase):
    folder: str
    user: str
    host: str
    password: str | None = Field(default=None, repr=False)
    file_filter: str | None = None
    """Comma-separated glob patterns of files *not* to send."""


class SftpTarget(_RemoteFolderBase):
    target_type: Literal["sftp"] = "sftp"


class RsyncTarget(_RemoteFolderBase):
    target_type: Literal["rsync"] = "rsync"
    run_on_complete: bool = False


class XnatTarget(_TargetBase):
    target_type: Literal["xnat"] = "xnat"
    project_id: str
    host: str
    user: str
    password: str = Field(repr=False)


class S3Target(_TargetBase):
    target_type: Literal["s3"] = "s3"
    region: str
    bucket: str
    prefix: str = ""
    access_key_id: str = Field(repr=False)
    secret_access_key: str = Field(repr=False)


class FolderTarget(_TargetBase):
    target_type: Literal["folder"] = "folder"
    folder: str
    file_filter: str | None = None


class DummyTarget(_TargetBase):
    target_type: Literal["dummy"] = "dummy"


TARGET_CLASSES: tuple[type[_TargetBase], ...] = (
    DicomTarget,
    DicomTLSTarget,
    DicomWebTarget,
    SftpTarget,
    RsyncTarget,
    XnatTarget,
    S3Target,
    FolderTarget,
    DummyTarget,
)
TARGET_TYPES: frozenset[str] = frozenset(
    cls.model_fields["target_type"].default for cls in TARGET_CLASSES
)

Target = Annotated[
    DicomTarget
    | DicomTLSTarget
    | DicomWebTarget
    | SftpTarget
    | RsyncTarget
    | XnatTarget
    | S3Target
    | FolderTarget
    | DummyTarget,
    Field(discriminator="target_type"),
]


# ---------------------------------------------------------------------------- rules, modules


class Rule(_Model):
    """A routing rule (mercure §3.3). Name lists are always lists, ``""`` in the file is ``[]``."""

    rule: str = "False"
    target: NameList = Field(default_factory=list)
    disabled: bool = False
    fallback: bool = False
    contact: OptStr = ""
    comment: OptStr = ""
    tags: OptStr = ""
    action: Action = "route"
    action_trigger: ActionTrigger = "series"
    study_trigger_condition: StudyTriggerCondition = "timeout"
    study_trigger_series: OptStr = ""
    study_force_completion_action: StudyForceCompletionAction = "discard"
    priority: Priority = "normal"
    processing_module: NameList = Field(default_factory=list)
    processing_settings: ProcessingSettings = Field(default_factory=dict)
    processing_retain_images: bool = False
    notification_webhook: OptStr = ""
    notification_payload: OptStr = ""
    notification_payload_body: OptStr = ""
    notification_email: OptStr = ""
    notification_email_body: OptStr = ""
    notification_email_type: Literal["plain", "html"] = "plain"
    notification_trigger_reception: bool = True
    notification_trigger_completion: bool = True
    notification_trigger_completion_on_request: bool = False
    notification_trigger_error: bool = True
    dynamic_routing: bool = False
    dynamic_routing_allowed_targets: NameList = Field(default_factory=list)
    conditional_alternate_target: OptStr = ""


class Module(_Model):
    """A processing module (mercure §3.6). The three JSON-text fields stay text, as in mercure."""

    docker_tag: Annotated[str, BeforeValidator(_none_as_empty), AfterValidator(_docker_tag)] = ""
    additional_volumes: JsonObjectText = ""
    environment: JsonObjectText = ""
    docker_arguments: JsonObjectText = ""
    settings: dict[str, Any] = Field(default_factory=dict)
    contact: OptStr = ""
    comment: OptStr = ""
    constraints: OptStr = ""
    resources: OptStr = ""
    requires_root: OptBool = False
    requires_persistence: OptBool = False
    persistence_folder_name: OptStr = ""
    network_enabled: bool = False
    """mercure's model defaults to True, but its GUI writes the field for every module and ticks
    it only on request; Caduceus gives a module network only when the field says so."""
    # Caduceus additions
    timeout: Annotated[float, Field(gt=0)] | None = None
    """Seconds the module may run per step before it is killed; None: ``processing_timeout``."""
    retries: Annotated[int, Field(ge=0, le=100)] = 0
    """Automatic new attempts after the module failed (exit code, timeout, bad output)."""

    ignored_settings = frozenset({"constraints", "resources"})

    def parsed_volumes(self) -> dict[str, Any]:
        """``additional_volumes`` as docker-py's ``volumes`` dict (empty when unset)."""
        return _parse_json_object(self.additional_volumes)

    def parsed_environment(self) -> dict[str, Any]:
        return _parse_json_object(self.environment)

    def parsed_docker_arguments(self) -> dict[str, Any]:
        return _parse_json_object(self.docker_arguments)


# ---------------------------------------------------------------------------- nested settings


class DicomReceiver(_Model):
    """mercure's ``dicom_receiver`` plus the Caduceus receiver settings."""

    additional_tags: Annotated[dict[str, str], BeforeValidator(_tags_mapping)] = Field(
        default_factory=dict
    )
    fsync: bool = True
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    """Empty: any calling AE title is accepted."""
    allowed_addresses: list[IPNetworkText] = Field(default_factory=list)
    """IP addresses or CIDR networks; empty: any address is accepted."""
    min_free_space_mb: Annotated[int, Field(ge=0)] = 1024
    workers: Annotated[int, Field(ge=0)] = 0
    max_pdu_size: Annotated[int, Field(ge=0)] = 0
    network_timeout: Annotated[float, Field(gt=0)] = 60.0
    bind_address: Annotated[str, Field(min_length=1)] = "0.0.0.0"

    def calling_aet_allowed(self, aet: str) -> bool:
        """True when ``aet`` (spaces ignored) may open an association."""
        return not self.allowed_calling_aets or aet.strip() in self.allowed_calling_aets

    def address_allowed(self, address: str) -> bool:
        """True when a peer at ``address`` may open an association (IPv4-mapped IPv6 too)."""
        if not self.allowed_addresses:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        networks = (ipaddress.ip_network(text, strict=False) for text in self.allowed_addresses)
        return any(ip.version == net.version and ip in net for net in networks)


class ProcessingLogs(_Model):
    discard_logs: bool = False
    logs_file_store: str | None = None


class DicomRetrieve(_Model):
    """Defined by mercure's model, unused by mercure's code; kept as is."""

    dicom_nodes: list[dict[str, Any]] = Field(default_factory=list)
    destination_folders: list[dict[str, Any]] = Field(default_factory=list)


# ---------------------------------------------------------------------------- the configuration

_SPOOL_FOLDER_FIELDS = tuple(f"{folder.value}_folder" for folder in Folder)
_PLACED_FIELDS = (*_SPOOL_FOLDER_FIELDS, "persistence_folder")
SecretSources = dict[tuple[str, ...], tuple[str | None, str]]


class Config(_Model):
    """The whole ``caduceus.json``. Dict order of ``rules`` is their evaluation order."""

    data_root: str | None = DEFAULT_DATA_ROOT
    appliance_name: str = "master"
    appliance_color: str = "#FFF"
    port: Port = 11112
    accept_compressed_images: bool = True
    incoming_folder: FolderSetting = None
    studies_folder: FolderSetting = None
    outgoing_folder: FolderSetting = None
    success_folder: FolderSetting = None
    error_folder: FolderSetting = None
    discard_folder: FolderSetting = None
    processing_folder: FolderSetting = None
    jobs_folder: FolderSetting = None
    persistence_folder: FolderSetting = None
    router_scan_interval: Interval = 1
    dispatcher_scan_interval: Interval = 1
    cleaner_scan_interval: Interval = 60
    retention: Seconds = 259200
    emergency_clean_percentage: Annotated[int, Field(ge=0, le=100)] = 90
    dispatcher_max_parallel: int | None = None
    """Caduceus dispatcher settings: None means the dispatcher's default; the dispatcher validates
    them (``dispatcher/settings.py``, documented in docs/dispatcher.md)."""
    retry_multiplier: float | None = None
    retry_max_delay: float | None = None
    dispatcher_aet: str | None = None
    dispatcher_max_pdu: int | None = None
    dispatcher_connection_timeout: float | None = None
    dispatcher_acse_timeout: float | None = None
    dispatcher_dimse_timeout: float | None = None
    dispatcher_network_timeout: float | None = None
    processing_max_parallel: int | None = None
    """Caduceus processor settings: None means the processor's default; the processor validates
    them (``processor/settings.py``, documented in docs/processor.md)."""
    processing_timeout: float | None = None
    processing_memory_limit: str | None = None
    processing_cpus: float | None = None
    processing_pids_limit: int | None = None
    processing_user: str | None = None
    processing_volume_roots: list[str] | None = None
    processing_pull_images: bool | None = None
    processing_retry_delay: float | None = None
    processing_retry_max: int | None = None
    docker_url: str | None = None
    error_retention: Seconds = 0
    """Caduceus: seconds a task stays in ``error/`` before the cleaner deletes it; 0 = forever."""
    emergency_clean_error: bool = False
    """Caduceus: emergency cleaning may delete ``error/`` tasks (after success/discard ones)."""
    retry_delay: Seconds = 900
    retry_max: Annotated[int, Field(ge=0)] = 5
    series_complete_trigger: Seconds = 60
    study_complete_trigger: Seconds = 900
    study_forcecomplete_trigger: Seconds = 5400
    dicom_receiver: DicomReceiver = Field(default_factory=DicomReceiver)
    graphite_ip: OptStr = ""
    graphite_port: Port = 2003
    influxdb_host: OptStr = ""
    influxdb_token: OptStr = Field(default="", repr=False)
    influxdb_org: OptStr = ""
    influxdb_bucket: OptStr = ""
    bookkeeper: str = "0.0.0.0:8080"
    bookkeeper_api_key: str | None = Field(default=None, repr=False)
    offpeak_start: OffpeakTime = "22:00"
    offpeak_end: OffpeakTime = "06:00"
    process_runner: Literal["docker", "nomad", ""] = ""
    processing_runtime: str | None = None
    support_root_modules: OptBool = False
    features: dict[str, bool] = Field(default_factory=lambda: {"dummy_target": False})
    processing_logs: ProcessingLogs = Field(default_factory=ProcessingLogs)
    email_notification_from: str = "mercure@mercure.mercure"
    webhook_certificate_location: str | None = None
    phi_notifications: OptBool = False
    server_time: str = "UTC"
    local_time: str = "UTC"
    store_sample_dicom_tags: bool = False
    dicom_retrieve: DicomRetrieve = Field(default_factory=DicomRetrieve)
    targets: dict[Name, Target] = Field(default_factory=dict)
    rules: dict[Name, Rule] = Field(default_factory=dict)
    modules: dict[Name, Module] = Field(default_factory=dict)

    ignored_settings = frozenset(
        {
            "graphite_ip",
            "graphite_port",
            "influxdb_host",
            "influxdb_token",
            "influxdb_org",
            "influxdb_bucket",
            "process_runner",
            "dicom_retrieve",
        }
    )

    _secret_sources: SecretSources = PrivateAttr(default_factory=dict)

    @field_validator("bookkeeper_api_key")
    @classmethod
    def _no_placeholder(cls, value: str | None) -> str | None:
        if value == BOOKKEEPER_TOKEN_PLACEHOLDER:
            raise ValueError("the placeholder token must be replaced by a random secret")
        return value

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        problems = [
            problem
            for name, rule in self.rules.items()
            if not rule.disabled
            for problem in _reference_problems(name, rule, self)
        ]
        if problems:
            raise PydanticCustomError(
                "config_reference",
                "{message}",
                {"message": "; ".join(problems), "problems": problems},
            )
        return self

    # -- derived values

    def spool_paths(self) -> SpoolPaths:
        """Absolute spool folders: an explicit ``<name>_folder`` wins, else ``<data_root>/<name>``.

        Relative paths are taken against the current working directory at the time of the call.
        """
        root = self._data_root()
        folders: dict[str, Path] = {}
        for folder in Folder:
            explicit: str | None = getattr(self, f"{folder.value}_folder")
            folders[folder.name.lower()] = _absolute(explicit) if explicit else root / folder.value
        return SpoolPaths(**folders, state=root / "state")

    def persistence_path(self) -> Path:
        """Root of the modules' persistent folders (``<data_root>/persistence`` unless set)."""
        if self.persistence_folder:
            return _absolute(self.persistence_folder)
        return self._data_root() / "persistence"

    def is_offpeak(self, now: time) -> bool:
        """mercure's rule: inclusive window, wrapping midnight when ``start >= end``."""
        start = datetime.strptime(self.offpeak_start, "%H:%M").time()
        end = datetime.strptime(self.offpeak_end, "%H:%M").time()
        if start < end:
            return start <= now <= end
        return now >= start or now <= end

    def _data_root(self) -> Path:
        return _absolute(self.data_root or MERCURE_DATA_ROOT)

    # -- reporting and writing

    @property
    def ignored_fields(self) -> list[str]:
        """Dotted paths of mercure-only settings present in the file with a non-default value."""
        return [
            f"{prefix}{name}"
            for prefix, model in _walk(self, "")
            for name in sorted(type(model).ignored_settings)
            if name in model.model_fields_set and _differs_from_default(model, name)
        ]

    @property
    def unknown_fields(self) -> list[str]:
        """Dotted paths of fields no model declares (kept, written back, otherwise unused)."""
        return [
            f"{prefix}{name}"
            for prefix, model in _walk(self, "")
            for name in model.model_extra or {}
        ]

    def dump_for_file(self) -> dict[str, Any]:
        """The JSON object to write back: unset folders are left out (so ``data_root`` keeps
        placing them) and secrets loaded from ``env:``/``file:`` are written as those references.
        """
        data = self.model_dump(mode="json")
        for name in _PLACED_FIELDS:
            if data.get(name) is None:
                data.pop(name, None)
        for path, (raw, resolved) in self._secret_sources.items():
            _restore_secret(data, path, raw, resolved)
        return data


def _absolute(path: str) -> Path:
    return Path(path).expanduser().absolute()


def _reference_problems(name: str, rule: Rule, config: Config) -> Iterator[str]:
    """Targets and modules an enabled rule names but the configuration lacks."""
    checks: list[tuple[str, list[str], Mapping[str, object], str]] = []
    if rule.action in ("route", "both"):
        alternate = [rule.conditional_alternate_target] if rule.conditional_alternate_target else []
        checks += [
            ("target", rule.target, config.targets, "target"),
            (
                "dynamic_routing_allowed_targets",
                rule.dynamic_routing_allowed_targets,
                config.targets,
                "target",
            ),
            ("conditional_alternate_target", alternate, config.targets, "target"),
        ]
    if rule.action in ("process", "both"):
        checks.append(("processing_module", rule.processing_module, config.modules, "module"))
    for field, names, known, kind in checks:
        for missing in names:
            if missing not in known:
                yield f"rules.{name}.{field}: unknown {kind} {missing!r}"


def _walk(model: _Model, prefix: str) -> Iterator[tuple[str, _Model]]:
    """``model`` and every configuration model below it, each with its dotted path prefix."""
    yield prefix, model
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, _Model):
            yield from _walk(value, f"{prefix}{name}.")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, _Model):
                    yield from _walk(item, f"{prefix}{name}.{key}.")


def _differs_from_default(model: BaseModel, name: str) -> bool:
    default = type(model).model_fields[name].get_default(call_default_factory=True)
    return bool(getattr(model, name) != default)


def _restore_secret(
    data: dict[str, Any], path: tuple[str, ...], raw: str | None, resolved: str
) -> None:
    node: Any = data
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and node.get(path[-1]) == resolved:
        node[path[-1]] = raw


# ---------------------------------------------------------------------------- secrets


def _resolve_secret(raw: str, where: str, environ: Mapping[str, str]) -> str:
    """``env:NAME`` -> the variable, ``file:/path`` -> the file without trailing newlines."""
    if raw.startswith("env:"):
        name = raw.removeprefix("env:")
        if name not in environ:
            raise ConfigError(f"{where}: environment variable {name!r} is not set")
        return environ[name]
    if raw.startswith("file:"):
        path = Path(raw.removeprefix("file:"))
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read secret file {path}: {exc}") from None
    return raw


def _resolve_secrets(
    data: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], SecretSources]:
    """A copy of ``data`` with secrets resolved, and where each substituted value came from."""
    resolved = dict(data)
    sources: SecretSources = {}
    key = resolved.get("bookkeeper_api_key")
    override = environ.get(BOOKKEEPER_API_KEY_ENV)
    if override:
        sources["bookkeeper_api_key",] = (key if isinstance(key, str) else None, override)
        resolved["bookkeeper_api_key"] = override
    elif isinstance(key, str):
        value = _resolve_secret(key, "bookkeeper_api_key", environ)
        if value != key:
            sources["bookkeeper_api_key",] = (key, value)
            resolved["bookkeeper_api_key"] = value
    targets = resolved.get("targets")
    if isinstance(targets, Mapping):
        resolved["targets"] = {
            name: _resolve_target_secrets(name, target, environ, sources)
            for name, target in targets.items()
        }
    return resolved, sources


def _resolve_target_secrets(
    name: str, target: Any, environ: Mapping[str, str], sources: SecretSources
) -> Any:
    if not isinstance(target, Mapping):
        return target
    target = dict(target)
    for field in sorted(SECRET_TARGET_FIELDS & target.keys()):
        raw = target[field]
        if isinstance(raw, str):
            value = _resolve_secret(raw, f"targets.{name}.{field}", environ)
            if value != raw:
                sources["targets", name, field] = (raw, value)
                target[field] = value
    return target


# ---------------------------------------------------------------------------- errors


def _error_lines(error: ErrorDetails) -> list[str]:
    loc = list(error["loc"])
    # A discriminated union adds the tag to the location: targets.<name>.<target_type>.<field>.
    if len(loc) >= 3 and loc[0] == "targets" and loc[2] in TARGET_TYPES:
        del loc[2]
    message = error["msg"]
    ctx = error.get("ctx") or {}
    if error["type"] == "union_tag_invalid":
        loc.append("target_type")
        expected = ", ".join(sorted(TARGET_TYPES))
        message = f"unknown target type {ctx.get('tag')!r} (expected one of: {expected})"
    elif error["type"] == "union_tag_not_found":
        loc.append("target_type")
        message = "Field required"
    elif error["type"] == "config_reference":
        return [str(problem) for problem in ctx["problems"]]
    elif error["type"] == "value_error":
        message = str(ctx.get("error", message))
    if loc and loc[-1] == "[key]":  # an invalid dict key: the message names it
        del loc[-1]
    where = ".".join(str(part) for part in loc)
    return [f"{where}: {message}" if where else message]


def _validation_message(exc: ValidationError, source: str) -> str:
    lines = [line for error in exc.errors(include_url=False) for line in _error_lines(error)]
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------- public functions


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str = "configuration",
    environ: Mapping[str, str] | None = None,
    report: bool = True,
) -> Config:
    """Validate a configuration object (as read from JSON) into a :class:`Config`.

    Secrets are resolved from ``environ`` (default ``os.environ``). With ``report``, one warning
    lists the ignored mercure settings and one the unknown fields. Raises :class:`ConfigError`
    naming each invalid field; ``source`` names the origin in messages.
    """
    env = os.environ if environ is None else environ
    try:
        resolved, sources = _resolve_secrets(data, env)
    except ConfigError as exc:
        raise ConfigError(f"invalid configuration in {source}:\n  {exc}") from None
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, source)) from None
    config._secret_sources = sources
    if report:
        _report(config, source)
    return config


def _report(config: Config, source: str) -> None:
    if config.ignored_fields:
        logger.warning(
            "%s: mercure settings Caduceus does not use are ignored: %s",
            source,
            ", ".join(config.ignored_fields),
        )
    if config.unknown_fields:
        logger.warning(
            "%s: unknown settings (misspelt?) are kept but have no effect: %s",
            source,
            ", ".join(config.unknown_fields),
        )


def load_config(
    path: Path, *, environ: Mapping[str, str] | None = None, report: bool = True
) -> Config:
    """Read and validate the configuration file at ``path`` (see :func:`parse_config`).

    Raises :class:`ConfigError` when the file is missing or unreadable, is not JSON (with line
    and column), is not a JSON object, or is invalid.
    """
    return parse_config(_read_json(path), source=str(path), environ=environ, report=report)


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} does not exist (choose one with --config or {CONFIG_ENV})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, not {type(data).__name__}")
    return data


def default_config() -> Config:
    """The configuration ``make run`` starts with: spool under ``./data``, DICOM on 11112, no
    targets, rules or modules, and a freshly generated random bookkeeper token (each call)."""
    return Config(
        data_root=DEFAULT_DATA_ROOT,
        port=11112,
        bookkeeper_api_key=secrets.token_urlsafe(32),
    )


def write_default_config(path: Path) -> Config:
    """Write :func:`default_config` to ``path`` atomically (creating parent folders) and return it.

    Refuses (:class:`ConfigError`) to replace an existing file. The file holds a secret, so it is
    made readable by its owner only.
    """
    if path.exists():
        raise ConfigError(f"{path} already exists; not replacing it with a default configuration")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = default_config()
    atomic_write_json(path, config.dump_for_file())
    path.chmod(0o600)
    return config


def resolve_config_path(cli_value: str | None, *, environ: Mapping[str, str] | None = None) -> Path:
    """The configuration file to use: ``--config`` if given, else ``$CADUCEUS_CONFIG``, else
    ``config/caduceus.json`` (relative to the working directory)."""
    if cli_value:
        return Path(cli_value)
    env_value = (os.environ if environ is None else environ).get(CONFIG_ENV)
    return Path(env_value) if env_value else DEFAULT_CONFIG_PATH
