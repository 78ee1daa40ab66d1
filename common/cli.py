"""The ``caduceus`` command (``[project.scripts]``); see ``docs/running.md``.

    caduceus up [--config PATH] [--only SERVICE,...]   every service, each its own process
    caduceus SERVICE [ARGS...]                          one service in the foreground
    caduceus config check [FILE] [--config PATH]        validate a configuration
    caduceus config init [--config PATH]                write a default configuration

The configuration file is ``--config``, else ``$CADUCEUS_CONFIG``, else ``config/caduceus.json``.
Exit codes are those of :mod:`common.exitcodes`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, cast

from common import exitcodes
from common.config import CONFIG_ENV, Config, load_config, resolve_config_path, write_default_config
from common.errors import ConfigError
from common.logs import setup_logging
from common.spool import SpoolPaths
from common.supervisor import ChildSpec, RestartPolicy, Supervisor

SERVICES = (
    "receiver",
    "router",
    "processor",
    "dispatcher",
    "cleaner",
    "bookkeeper",
    "shipper",
    "webgui",
)
"""Every service (DESIGN §2), in the order ``caduceus up`` starts them."""

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A command cannot go on; ``main`` prints the message and exits with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def is_implemented(service: str) -> bool:
    """True when ``python -m <service>`` exists (the service has a ``__main__`` module)."""
    try:
        return importlib.util.find_spec(f"{service}.__main__") is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run one ``caduceus`` command and return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in SERVICES:
            return run_service(args[0], args[1:])
        parser = build_parser()
        try:
            namespace = parser.parse_args(args)
        except SystemExit as exc:  # --help, --version, or a usage error
            return _exit_code(exc)
        handler = cast(Handler, namespace.handler)
        return handler(namespace)
    except CommandError as exc:
        print(f"caduceus: {exc}", file=sys.stderr)
        return exc.code


# ---------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with ``EX_USAGE`` (sysexits) rather than argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="caduceus",
        description="Caduceus DICOM orchestrator. Exit codes: docs/running.md.",
        epilog=f"The configuration is --config, else ${CONFIG_ENV}, else config/caduceus.json.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.set_defaults(handler=_help_handler(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    up = commands.add_parser("up", help="run every service, each as its own process")
    _add_config_option(up)
    up.add_argument(
        "--only",
        metavar="SERVICE,...",
        type=_service_list,
        help=f"run only these services (of: {', '.join(SERVICES)})",
    )
    up.set_defaults(handler=cmd_up)

    config = commands.add_parser("config", help="check or create a configuration file")
    config.set_defaults(handler=_help_handler(config))
    config_commands = config.add_subparsers(title="commands", metavar="COMMAND")
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file", nargs="?", metavar="FILE", help="the file (default: as --config)")
    _add_config_option(check)
    check.set_defaults(handler=cmd_config_check)
    init = config_commands.add_parser("init", help="write a default configuration if none exists")
    _add_config_option(init)
    init.set_defaults(handler=cmd_config_init)

    for service in SERVICES:
        # Listed for --help only: main() hands everything after the name to the service itself.
        one = commands.add_parser(service, help=f"run the {service} service in the foreground")
        one.add_argument("args", nargs=argparse.REMAINDER, help="the service's own options")
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${CONFIG_ENV}, else config/caduceus.json)",
    )


def _service_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown service {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SERVICES)}"
        )
    return list(dict.fromkeys(names))


def _help_handler(parser: argparse.ArgumentParser) -> Handler:
    def print_help(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return exitcodes.EX_USAGE

    return print_help


def _version() -> str:
    try:
        return importlib.metadata.version("caduceus")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return exitcodes.EX_OK
    return exc.code if isinstance(exc.code, int) else exitcodes.EX_FAILURE


# ---------------------------------------------------------------------- commands


def run_service(service: str, argv: list[str]) -> int:
    """``caduceus <service> [args...]``: the service's own ``main(args)``, in this process."""
    if not is_implemented(service):
        ready = ", ".join(s for s in SERVICES if is_implemented(s)) or "none"
        raise CommandError(
            f"the {service} service is not implemented yet (implemented: {ready})",
            exitcodes.EX_UNAVAILABLE,
        )
    module = importlib.import_module(f"{service}.main")
    service_main = cast(Callable[[list[str]], int], module.main)
    try:
        return int(service_main(argv))
    except SystemExit as exc:  # the service's --help or usage error
        return _exit_code(exc)


def cmd_up(args: argparse.Namespace) -> int:
    """``caduceus up``: every (chosen, implemented) service under a :class:`Supervisor`."""
    setup_logging("supervisor")
    services, missing = _services_to_run(cast(list[str] | None, args.only))
    config_path = resolve_config_path(args.config).absolute()
    config = _load_or_create(config_path)
    spool = config.spool_paths()
    try:
        spool.create()
    except OSError as exc:
        raise CommandError(
            f"cannot create the spool folders: {exc}", exitcodes.EX_CANTCREAT
        ) from exc

    _print_locations(config_path, spool, missing)

    children = [
        ChildSpec(
            name=service,
            argv=(sys.executable, "-m", service, "--config", str(config_path)),
            env={"PYTHONUNBUFFERED": "1"},
            watch=config_path,
        )
        for service in services
    ]
    supervisor = Supervisor(children, RestartPolicy())
    supervisor.install_signal_handlers()
    print(f"Starting {', '.join(services)}; Ctrl-C stops them.", flush=True)
    return supervisor.run()


def _print_locations(config_path: Path, spool: SpoolPaths, missing: list[str]) -> None:
    print(f"Configuration: {config_path}")
    print("Spool folders:")
    for folder in spool.all():
        print(f"  {folder}")
    if missing:
        print(f"Not implemented yet, not started: {', '.join(missing)}")


def _services_to_run(only: list[str] | None) -> tuple[list[str], list[str]]:
    """The services to start and, without ``--only``, those skipped as not implemented."""
    wanted = only or list(SERVICES)
    missing = [service for service in wanted if not is_implemented(service)]
    if only and missing:
        raise CommandError(f"not implemented yet: {', '.join(missing)}", exitcodes.EX_UNAVAILABLE)
    services = [service for service in wanted if service not in missing]
    if not services:
        raise CommandError("no service is implemented yet", exitcodes.EX_UNAVAILABLE)
    return services, missing


def _load_or_create(path: Path) -> Config:
    """The configuration at ``path``; a default one, written there, when the file is absent."""
    try:
        if path.exists():
            return load_config(path, report=False)  # each service reports ignored fields itself
        config = write_default_config(path)
    except ConfigError as exc:
        raise CommandError(str(exc), exitcodes.EX_CONFIG) from exc
    except OSError as exc:
        raise CommandError(
            f"cannot write a default configuration to {path}: {exc}", exitcodes.EX_CANTCREAT
        ) from exc
    print(f"No configuration at {path}: wrote a default one (DICOM port {config.port}).")
    return config


def cmd_config_check(args: argparse.Namespace) -> int:
    """``caduceus config check``: ``EX_OK`` and a summary, or ``EX_CONFIG`` and the field."""
    path = Path(args.file) if args.file else resolve_config_path(args.config)
    try:
        config = load_config(path, report=False)
        _check_service_settings(config)
    except ConfigError as exc:
        raise CommandError(str(exc), exitcodes.EX_CONFIG) from exc
    counts = ", ".join(
        _count(len(items), noun)
        for items, noun in (
            (config.targets, "target"),
            (config.rules, "rule"),
            (config.modules, "module"),
        )
    )
    print(f"OK {path}: {counts}; spool under {config.spool_paths().state.parent}")
    if config.ignored_fields:
        print(f"  mercure settings Caduceus ignores: {', '.join(config.ignored_fields)}")
    if config.unknown_fields:
        print(f"  unknown settings (misspelt?), no effect: {', '.join(config.unknown_fields)}")
    return exitcodes.EX_OK


def _check_service_settings(config: Config) -> None:
    """The services' own settings, as each service checks them at start (ConfigError)."""
    from dispatcher.settings import DispatcherSettings  # noqa: PLC0415 - services import common
    from processor.settings import ProcessorSettings  # noqa: PLC0415

    DispatcherSettings.from_config(config)
    ProcessorSettings.from_config(config)


def cmd_config_init(args: argparse.Namespace) -> int:
    """``caduceus config init``: write a default configuration, never over an existing one."""
    path = resolve_config_path(args.config).absolute()
    if path.exists():
        print(f"{path} exists; left unchanged.")
        return exitcodes.EX_OK
    try:
        write_default_config(path)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc}", exitcodes.EX_CANTCREAT) from exc
    except ConfigError as exc:  # created meanwhile by someone else
        print(f"{exc}.")
        return exitcodes.EX_OK
    print(f"Wrote a default configuration to {path}.")
    return exitcodes.EX_OK


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


if __name__ == "__main__":
    sys.exit(main())
