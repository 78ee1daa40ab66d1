"""The user configuration: mercure compatibility, Caduceus additions, validation, secrets."""

from __future__ import annotations

import json
import logging
import stat
from datetime import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from common.config import (
    BOOKKEEPER_API_KEY_ENV,
    BOOKKEEPER_TOKEN_PLACEHOLDER,
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DicomTarget,
    DicomTLSTarget,
    DicomWebTarget,
    DummyTarget,
    FolderTarget,
    RsyncTarget,
    S3Target,
    SftpTarget,
    XnatTarget,
    default_config,
    load_config,
    parse_config,
    resolve_config_path,
    write_default_config,
)
from common.errors import ConfigError
from common.spool import SpoolPaths

FIXTURE = Path(__file__).parent / "fixtures" / "mercure.json"
SPOOL_NAMES = ("incoming", "studies", "processing", "outgoing", "success", "error", "discard")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BOOKKEEPER_API_KEY_ENV, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def sftp_target(password: str) -> dict[str, Any]:
    return {
        "target_type": "sftp",
        "folder": "/in",
        "user": "u",
        "host": "sftp.example.org",
        "password": password,
    }


# ---------------------------------------------------------------------------- mercure.json


def test_mercure_config_loads_with_its_values() -> None:
    config = load_config(FIXTURE)

    assert config.appliance_name == "mercure-radiology"
    assert config.accept_compressed_images is False
    assert config.retention == 604800
    assert config.retry_max == 8
    assert config.offpeak_start == "21:30"
    assert config.offpeak_end == "6:00"
    assert config.bookkeeper == "172.17.0.1:8080"
    assert config.dicom_receiver.additional_tags["ProtocolName"] == "CT HEAD W/O"
    assert config.processing_logs.logs_file_store == "/opt/mercure/processing_logs"
    assert config.features == {"dummy_target": True}
    assert config.local_time == "Europe/Berlin"
    assert config.support_root_modules is True


def test_mercure_targets_load_as_their_types() -> None:
    targets = load_config(FIXTURE).targets

    expected = {
        "pacs_main": DicomTarget,
        "back_to_sender": DicomTarget,
        "research_tls": DicomTLSTarget,
        "orthanc_web": DicomWebTarget,
        "ai_vendor_sftp": SftpTarget,
        "nas_rsync": RsyncTarget,
        "xnat_research": XnatTarget,
        "s3_archive": S3Target,
        "local_export": FolderTarget,
        "blackhole": DummyTarget,
    }
    assert {name: type(target) for name, target in targets.items()} == expected
    pacs = targets["pacs_main"]
    assert isinstance(pacs, DicomTarget)
    assert (pacs.ip, pacs.port, pacs.aet_target, pacs.aet_source) == (
        "10.20.30.40",
        104,
        "PACS_MAIN",
        "MERCURE",
    )
    assert pacs.pass_receiver_aet is True
    sender = targets["back_to_sender"]
    assert isinstance(sender, DicomTarget)
    assert sender.ip == "sender"
    web = targets["orthanc_web"]
    assert isinstance(web, DicomWebTarget)
    assert web.contact == ""
    assert web.http_password == "orthanc-pass-1"
    rsync = targets["nas_rsync"]
    assert isinstance(rsync, RsyncTarget)
    assert rsync.run_on_complete is True
    assert rsync.password is None


def test_mercure_rules_load_in_file_order_with_names_as_lists() -> None:
    rules = load_config(FIXTURE).rules

    assert list(rules) == [
        "ct_head_to_pacs",
        "lung_ai",
        "mr_brain_study",
        "mammo_study_timeout",
        "stroke_alert",
        "drop_localizers",
        "old_rsync_rule",
        "catch_all",
    ]
    assert rules["ct_head_to_pacs"].target == ["pacs_main"]
    assert rules["ct_head_to_pacs"].processing_module == []
    assert rules["ct_head_to_pacs"].priority == "urgent"
    lung = rules["lung_ai"]
    assert lung.action == "both"
    assert lung.target == ["pacs_main", "back_to_sender"]
    assert lung.processing_module == ["anonymizer", "nodule_detector"]
    assert lung.processing_settings == [{"keep_dates": False}, {"threshold": 0.7}]
    assert lung.dynamic_routing_allowed_targets == ["pacs_main", "research_tls"]
    assert lung.notification_email_type == "html"
    brain = rules["mr_brain_study"]
    assert (brain.action_trigger, brain.study_trigger_condition) == ("study", "received_series")
    assert brain.study_force_completion_action == "proceed"
    assert brain.priority == "offpeak"
    assert brain.processing_settings == {"atlas": "MNI152"}
    assert rules["stroke_alert"].action == "notification"
    assert rules["drop_localizers"].action == "discard"
    assert rules["catch_all"].fallback is True


def test_disabled_rule_may_name_a_deleted_target() -> None:
    rule = load_config(FIXTURE).rules["old_rsync_rule"]

    assert rule.disabled is True
    assert rule.target == ["retired_target"]


def test_mercure_modules_keep_json_text_and_parse_it_on_request() -> None:
    modules = load_config(FIXTURE).modules
    raw_modules = json.loads(FIXTURE.read_text())["modules"]

    detector = modules["nodule_detector"]
    assert detector.docker_arguments == raw_modules["nodule_detector"]["docker_arguments"]
    assert detector.parsed_docker_arguments() == {
        "runtime": "nvidia",
        "mem_limit": "8g",
        "shm_size": "2g",
    }
    assert detector.parsed_volumes() == {
        "/opt/mercure/processor_volumes/models": {"bind": "/models", "mode": "ro"}
    }
    assert detector.parsed_environment()["OMP_NUM_THREADS"] == "4"
    assert detector.requires_persistence is True
    assert detector.persistence_folder_name == "nodule_cache"
    assert modules["anonymizer"].parsed_docker_arguments() == {}
    assert modules["anonymizer"].network_enabled is False


def test_mercure_config_written_back_keeps_every_mercure_value() -> None:
    raw = json.loads(FIXTURE.read_text())
    config = load_config(FIXTURE)

    dumped = config.dump_for_file()

    for name in ("targets", "rules", "modules", "dicom_receiver"):
        raw.pop(name)
    assert {name: dumped[name] for name in raw} == raw
    raw_modules = json.loads(FIXTURE.read_text())["modules"]
    assert {
        name: {key: module[key] for key in raw_modules[name]}
        for name, module in dumped["modules"].items()
    } == raw_modules
    assert parse_config(dumped) == config


def test_mercure_settings_caduceus_does_not_use_are_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="common.config"):
        config = load_config(FIXTURE)

    assert config.ignored_fields == [
        "influxdb_bucket",
        "influxdb_host",
        "influxdb_org",
        "influxdb_token",
        "process_runner",
        "targets.orthanc_web.direction",
        "modules.brain_volumetry.constraints",
        "modules.brain_volumetry.resources",
    ]
    assert config.unknown_fields == []
    [record] = caplog.records
    assert "ignored" in record.getMessage()
    assert "modules.brain_volumetry.constraints" in record.getMessage()


def test_mercure_setting_at_its_default_is_not_reported_as_ignored() -> None:
    config = parse_config({"graphite_ip": "", "graphite_port": 2003, "process_runner": ""})

    assert config.ignored_fields == []


def test_unknown_fields_are_kept_reported_and_written_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = {
        "prot": 104,
        "rules": {"ct": {"rule": "True", "acton": "discard", "action": "discard"}},
        "dicom_receiver": {"fsync_": False},
    }

    with caplog.at_level(logging.WARNING, logger="common.config"):
        config = parse_config(data)

    assert config.unknown_fields == ["prot", "dicom_receiver.fsync_", "rules.ct.acton"]
    [record] = caplog.records
    assert "unknown" in record.getMessage()
    assert "rules.ct.acton" in record.getMessage()
    assert config.dump_for_file()["rules"]["ct"]["acton"] == "discard"


def test_report_can_be_switched_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="common.config"):
        load_config(FIXTURE, report=False)

    assert caplog.records == []


# ---------------------------------------------------------------------------- defaults


def test_empty_file_gets_mercure_defaults_and_caduceus_additions() -> None:
    config = parse_config({})

    assert config.port == 11112
    assert config.appliance_name == "master"
    assert (config.router_scan_interval, config.cleaner_scan_interval) == (1, 60)
    assert (config.retention, config.retry_delay, config.retry_max) == (259200, 900, 5)
    assert config.series_complete_trigger == 60
    assert config.study_complete_trigger == 900
    assert config.study_forcecomplete_trigger == 5400
    assert (config.offpeak_start, config.offpeak_end) == ("22:00", "06:00")
    assert config.bookkeeper == "0.0.0.0:8080"
    assert config.bookkeeper_api_key is None
    assert config.features == {"dummy_target": False}
    assert config.email_notification_from == "mercure@mercure.mercure"
    assert config.data_root == "./data"
    assert (config.targets, config.rules, config.modules) == ({}, {}, {})


def test_compressed_images_are_accepted_unless_the_file_says_false() -> None:
    assert parse_config({}).accept_compressed_images is True
    assert parse_config({"accept_compressed_images": False}).accept_compressed_images is False


def test_receiver_defaults() -> None:
    receiver = parse_config({}).dicom_receiver

    assert receiver.additional_tags == {}
    assert receiver.fsync is True
    assert receiver.allowed_calling_aets == []
    assert receiver.allowed_addresses == []
    assert receiver.min_free_space_mb == 1024
    assert receiver.workers == 0
    assert receiver.max_pdu_size == 0
    assert receiver.network_timeout == 60.0
    assert receiver.bind_address == "0.0.0.0"


def test_mercure_default_empty_tag_list_means_no_additional_tags() -> None:
    config = parse_config({"dicom_receiver": {"additional_tags": []}})

    assert config.dicom_receiver.additional_tags == {}


def test_rule_defaults_are_mercures() -> None:
    rule = parse_config({"rules": {"r": {}}}).rules["r"]

    assert rule.rule == "False"
    assert (rule.action, rule.action_trigger, rule.priority) == ("route", "series", "normal")
    assert rule.study_trigger_condition == "timeout"
    assert rule.study_force_completion_action == "discard"
    assert rule.notification_trigger_reception is True
    assert rule.notification_trigger_completion_on_request is False
    assert rule.processing_settings == {}


def test_configuration_is_frozen() -> None:
    config = parse_config({})

    with pytest.raises(ValidationError):
        config.port = 104


# ---------------------------------------------------------------------------- spool placement


def test_spool_folders_are_placed_under_data_root(tmp_path: Path) -> None:
    config = parse_config({"data_root": str(tmp_path / "spool")})

    paths = config.spool_paths()

    assert paths == SpoolPaths.under(tmp_path / "spool")
    assert paths.state == tmp_path / "spool" / "state"
    assert config.persistence_path() == tmp_path / "spool" / "persistence"


def test_explicit_folder_field_overrides_data_root(tmp_path: Path) -> None:
    fast_disk = tmp_path / "ssd" / "incoming"
    config = parse_config({"data_root": str(tmp_path / "spool"), "incoming_folder": str(fast_disk)})

    paths = config.spool_paths()

    assert paths.incoming == fast_disk
    assert paths.outgoing == tmp_path / "spool" / "outgoing"
    assert paths.state == tmp_path / "spool" / "state"


def test_mercure_folder_fields_place_the_spool_where_mercure_had_it() -> None:
    paths = load_config(FIXTURE).spool_paths()

    for name in (*SPOOL_NAMES, "jobs"):
        assert getattr(paths, name) == Path("/opt/mercure/data") / name


def test_relative_data_root_resolves_against_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    paths = parse_config({"data_root": "./data", "error_folder": "errors"}).spool_paths()

    assert paths.incoming == tmp_path / "data" / "incoming"
    assert paths.error == tmp_path / "errors"


def test_null_data_root_means_mercure_layout() -> None:
    paths = parse_config({"data_root": None}).spool_paths()

    assert paths.incoming == Path("/opt/mercure/data/incoming")
    assert paths.state == Path("/opt/mercure/data/state")


def test_spool_paths_can_be_created(tmp_path: Path) -> None:
    paths = parse_config({"data_root": str(tmp_path)}).spool_paths()

    paths.create()

    assert all(path.is_dir() for path in paths.all())


# ---------------------------------------------------------------------------- validation


def ct_rule(**fields: Any) -> dict[str, Any]:
    return {"rules": {"ct_rule": {"rule": "True", "target": "pacs", **fields}}, **PACS}


PACS = {
    "targets": {
        "pacs": {"target_type": "dicom", "ip": "10.0.0.1", "port": "104", "aet_target": "PACS"}
    }
}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"port": 70000}, "port: Input should be less than or equal to 65535"),
        ({"port": "eleven"}, "port: Input should be a valid integer"),
        (ct_rule(action="send"), "rules.ct_rule.action: Input should be 'route', 'both'"),
        (ct_rule(action_trigger="patient"), "rules.ct_rule.action_trigger: Input should be"),
        (ct_rule(priority="high"), "rules.ct_rule.priority: Input should be 'normal'"),
        (ct_rule(target="nowhere"), "rules.ct_rule.target: unknown target 'nowhere'"),
        (
            ct_rule(action="process", processing_module=["anon", "ai"]),
            "rules.ct_rule.processing_module: unknown module 'anon'",
        ),
        (ct_rule(processing_settings=[1]), "rules.ct_rule.processing_settings: must be"),
        (
            {"targets": {"pacs": {"target_type": "ftp"}}},
            "targets.pacs.target_type: unknown target type 'ftp'",
        ),
        ({"targets": {"pacs": {"ip": "x"}}}, "targets.pacs.target_type: Field required"),
        (
            {"targets": {"pacs": {**PACS["targets"]["pacs"], "port": 0}}},
            "targets.pacs.port: Input should be greater than or equal to 1",
        ),
        (
            {
                "targets": {
                    "pacs": {**PACS["targets"]["pacs"], "aet_target": "A_VERY_LONG_AE_TITLE"}
                }
            },
            "targets.pacs.aet_target: 'A_VERY_LONG_AE_TITLE' is not a valid AE title",
        ),
        (
            {"targets": {"pacs": {**PACS["targets"]["pacs"], "aet_source": "BACK\\SLASH"}}},
            "targets.pacs.aet_source:",
        ),
        (
            {"targets": {"web": {"target_type": "dicomweb", "url": "orthanc:8042"}}},
            "targets.web.url: String should match pattern",
        ),
        (
            {"targets": {"s3": {"target_type": "s3", "region": "eu", "bucket": "b"}}},
            "targets.s3.access_key_id: Field required",
        ),
        (
            {"dicom_receiver": {"allowed_addresses": ["10.0.0.0/8", "10.1.0.0/33"]}},
            "dicom_receiver.allowed_addresses.1: '10.1.0.0/33' is not an IP address",
        ),
        (
            {"dicom_receiver": {"allowed_calling_aets": ["OK", ""]}},
            "dicom_receiver.allowed_calling_aets.1: '' is not a valid AE title",
        ),
        ({"dicom_receiver": {"workers": -1}}, "dicom_receiver.workers: Input should be greater"),
        ({"offpeak_start": "25:00"}, "offpeak_start: '25:00' is not a time of day as HH:MM"),
        ({"offpeak_end": "6pm"}, "offpeak_end: '6pm' is not a time of day"),
        (
            {"modules": {"ai": {"docker_arguments": "{runtime: nvidia}"}}},
            "modules.ai.docker_arguments: is not valid JSON",
        ),
        (
            {"modules": {"ai": {"environment": "[]"}}},
            "modules.ai.environment: must be a JSON object",
        ),
        ({"rules": {"ct/../x": {}}}, "rules.ct/../x: 'ct/../x' is not a usable name"),
        (
            {"bookkeeper_api_key": BOOKKEEPER_TOKEN_PLACEHOLDER},
            "bookkeeper_api_key: the placeholder token must be replaced",
        ),
    ],
)
def test_invalid_configuration_names_the_field(
    tmp_path: Path, data: dict[str, Any], expected: str
) -> None:
    path = write_json(tmp_path / "caduceus.json", data)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_every_invalid_field_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"port": 0, "retry_max": -1, **ct_rule(action="send")})

    message = str(caught.value)
    assert "\n  port:" in message
    assert "\n  retry_max:" in message
    assert "\n  rules.ct_rule.action:" in message


def test_sender_is_refused_for_dicom_tls_targets() -> None:
    target = {
        "target_type": "dicomtls",
        "ip": "sender",
        "port": 2762,
        "aet_target": "X",
        "tls_key": "k",
        "tls_cert": "c",
        "ca_cert": "a",
    }

    with pytest.raises(ConfigError, match=r"targets\.tls\.ip: 'sender' is not supported"):
        parse_config({"targets": {"tls": target}})


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "caduceus.json"
    path.write_text('{\n  "port": 11112,\n  "rules": {,}\n}\n', encoding="utf-8")

    with pytest.raises(ConfigError, match=r"invalid JSON at line 3, column 13"):
        load_config(path)


def test_missing_file_gives_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "caduceus.json"

    with pytest.raises(ConfigError, match=r"configuration file .*nowhere/caduceus.json does not"):
        load_config(path)


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "caduceus.json", [1, 2])

    with pytest.raises(ConfigError, match="top level must be a JSON object, not list"):
        load_config(path)


def test_module_json_settings_may_be_given_as_objects() -> None:
    config = parse_config({"modules": {"ai": {"docker_arguments": {"mem_limit": "2g"}}}})

    module = config.modules["ai"]
    assert module.docker_arguments == '{"mem_limit": "2g"}'
    assert module.parsed_docker_arguments() == {"mem_limit": "2g"}


# ---------------------------------------------------------------------------- secrets


def test_target_secret_from_environment_variable() -> None:
    config = parse_config(
        {"targets": {"vendor": sftp_target("env:VENDOR_SFTP_PASSWORD")}},
        environ={"VENDOR_SFTP_PASSWORD": "s3cr3t"},
    )

    target = config.targets["vendor"]
    assert isinstance(target, SftpTarget)
    assert target.password == "s3cr3t"
    assert "s3cr3t" not in repr(config)


def test_target_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "s3_secret"
    secret.write_text("wJalrXUtnFEMI/K7MDENG\n", encoding="utf-8")
    s3 = {
        "target_type": "s3",
        "region": "eu-central-1",
        "bucket": "cohort",
        "access_key_id": "AKIA0001",
        "secret_access_key": f"file:{secret}",
    }

    config = parse_config({"targets": {"s3": s3}})

    target = config.targets["s3"]
    assert isinstance(target, S3Target)
    assert target.secret_access_key == "wJalrXUtnFEMI/K7MDENG"


def test_bookkeeper_key_from_file_reference(tmp_path: Path) -> None:
    key_file = tmp_path / "bookkeeper.key"
    key_file.write_text("from-a-file", encoding="utf-8")
    path = write_json(tmp_path / "caduceus.json", {"bookkeeper_api_key": f"file:{key_file}"})

    assert load_config(path).bookkeeper_api_key == "from-a-file"


def test_bookkeeper_key_environment_variable_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_json(tmp_path / "caduceus.json", {"bookkeeper_api_key": "env:UNSET_VARIABLE"})
    monkeypatch.setenv(BOOKKEEPER_API_KEY_ENV, "from-the-environment")

    config = load_config(path)

    assert config.bookkeeper_api_key == "from-the-environment"
    assert config.dump_for_file()["bookkeeper_api_key"] == "env:UNSET_VARIABLE"


def test_missing_secret_variable_names_the_field_and_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"targets\.vendor\.password: environment variable 'NOPE'"
    ):
        parse_config({"targets": {"vendor": sftp_target("env:NOPE")}}, environ={})


def test_unreadable_secret_file_names_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    with pytest.raises(ConfigError, match="bookkeeper_api_key: cannot read secret file"):
        parse_config({"bookkeeper_api_key": f"file:{missing}"})


def test_secrets_are_written_back_as_references_not_values() -> None:
    data = {
        "bookkeeper_api_key": "env:BK_KEY",
        "targets": {"vendor": sftp_target("env:SFTP_PW")},
    }

    config = parse_config(data, environ={"BK_KEY": "key-value", "SFTP_PW": "pw-value"})
    dumped = config.dump_for_file()

    assert dumped["bookkeeper_api_key"] == "env:BK_KEY"
    assert dumped["targets"]["vendor"]["password"] == "env:SFTP_PW"
    assert "pw-value" not in json.dumps(dumped)


def test_a_changed_secret_is_written_as_its_new_value() -> None:
    config = parse_config(
        {"targets": {"vendor": sftp_target("env:SFTP_PW")}}, environ={"SFTP_PW": "old"}
    )
    vendor = config.targets["vendor"].model_copy(update={"password": "new"})

    changed = config.model_copy(update={"targets": {"vendor": vendor}})

    assert changed.dump_for_file()["targets"]["vendor"]["password"] == "new"


# ---------------------------------------------------------------------------- default file


def test_default_config_has_a_random_bookkeeper_key() -> None:
    first, second = default_config(), default_config()

    assert first.bookkeeper_api_key is not None
    assert len(first.bookkeeper_api_key) >= 32
    assert first.bookkeeper_api_key != second.bookkeeper_api_key
    assert (first.data_root, first.port) == ("./data", 11112)


def test_write_default_config_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "config" / "caduceus.json"

    written = write_default_config(path)

    assert load_config(path) == written
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk["data_root"] == "./data"
    assert on_disk["port"] == 11112
    assert on_disk["bookkeeper_api_key"] == written.bookkeeper_api_key
    assert "incoming_folder" not in on_disk
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_default_config_never_replaces_a_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "caduceus.json", {"appliance_name": "mine"})

    with pytest.raises(ConfigError, match="already exists"):
        write_default_config(path)

    assert json.loads(path.read_text()) == {"appliance_name": "mine"}


def test_config_path_comes_from_cli_then_environment_then_default() -> None:
    env = {CONFIG_ENV: "/etc/caduceus/caduceus.json"}

    assert resolve_config_path("site.json", environ=env) == Path("site.json")
    assert resolve_config_path(None, environ=env) == Path("/etc/caduceus/caduceus.json")
    assert resolve_config_path(None, environ={}) == DEFAULT_CONFIG_PATH
    assert resolve_config_path("", environ={CONFIG_ENV: ""}) == Path("config/caduceus.json")


# ---------------------------------------------------------------------------- helpers on the model


def test_receiver_allow_lists() -> None:
    receiver = parse_config(
        {
            "dicom_receiver": {
                "allowed_calling_aets": ["CT_SCANNER ", "MR1"],
                "allowed_addresses": ["10.1.0.0/16", "192.168.5.7", "fd00::/8"],
            }
        }
    ).dicom_receiver

    assert receiver.calling_aet_allowed("CT_SCANNER")
    assert receiver.calling_aet_allowed("MR1 ")
    assert not receiver.calling_aet_allowed("ROGUE")
    assert receiver.address_allowed("10.1.200.3")
    assert receiver.address_allowed("::ffff:10.1.0.9")
    assert receiver.address_allowed("192.168.5.7")
    assert receiver.address_allowed("fd00::1")
    assert not receiver.address_allowed("192.168.5.8")
    assert not receiver.address_allowed("not-an-address")


def test_empty_allow_lists_admit_everyone() -> None:
    receiver = parse_config({}).dicom_receiver

    assert receiver.calling_aet_allowed("ANYONE")
    assert receiver.address_allowed("203.0.113.9")


@pytest.mark.parametrize(
    ("start", "end", "now", "expected"),
    [
        ("22:00", "06:00", time(23, 30), True),
        ("22:00", "06:00", time(5, 59), True),
        ("22:00", "06:00", time(12, 0), False),
        ("9:00", "17:00", time(12, 0), True),
        ("9:00", "17:00", time(18, 0), False),
    ],
)
def test_offpeak_window_wraps_midnight(start: str, end: str, now: time, expected: bool) -> None:
    config = parse_config({"offpeak_start": start, "offpeak_end": end})

    assert config.is_offpeak(now) is expected
