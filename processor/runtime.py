"""Runs one module step in a Docker container, with mercure's contract and Caduceus' limits.

The contract (DESIGN §7, mercure ``docker_runtime``): the step's input folder is mounted at
``/tmp/data`` — **read-only**: the task's input stays untouched for a restart, so no backup
copy is needed (mercure copies every file to ``as_received/``) — and its output folder at
``/tmp/output``; ``MERCURE_IN_DIR``/``MERCURE_OUT_DIR`` and the MONAI/Holoscan aliases name
them; the module's ``environment`` is added; ``/tmp/persistence`` when the module asks for it.

Safety defaults: a non-root user, ``cap_drop=ALL``, ``no-new-privileges``, no network unless
``network_enabled``, memory/CPU/pid limits, a timeout after which the container is killed,
``docker_arguments`` and ``additional_volumes`` only from an allow-list; the container is
removed whatever happens, and containers left by a killed processor are found by their labels
and removed before the task runs again.

Failures are classified for the caller: :class:`ModuleFailure` (the module's fault: exit
code, timeout — retried per the module's ``retries``), :class:`EngineFailure` (outside the
module: the engine is unreachable, an API error — retried with backoff), and
:class:`ConfigFailure` (cannot succeed until someone changes something: image missing,
forbidden argument or volume — straight to ``error/``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from common.config import Module
from common.spool import LockOwner
from processor.settings import ProcessorSettings

logger = logging.getLogger(__name__)

IN_DIR: Final = "/tmp/data"  # noqa: S108 - mercure's contract, a path inside the container
OUT_DIR: Final = "/tmp/output"  # noqa: S108 - inside the container
PERSISTENCE_DIR: Final = "/tmp/persistence"  # noqa: S108 - inside the container

LABEL_SERVICE: Final = "org.caduceus.service"
LABEL_TASK: Final = "org.caduceus.task"
LABEL_STEP: Final = "org.caduceus.step"
LABEL_OWNER: Final = "org.caduceus.owner"
"""The processor process that runs the container (:class:`~common.spool.LockOwner` JSON):
a container whose owner is dead is an orphan, removed at the next start."""

ALLOWED_DOCKER_ARGUMENTS: Final = frozenset(
    {
        "mem_limit",
        "memswap_limit",
        "cpu_period",
        "cpu_quota",
        "cpuset_cpus",
        "cpu_shares",
        "cpuset_mems",
        "nano_cpus",
        "shm_size",
        "runtime",
        "labels",
        "blkio_weight",
        "device_read_bps",
        "device_write_bps",
        "device_read_iops",
        "device_write_iops",
        "pids_limit",
        "environment",
        "read_only",
        "stop_signal",
        "stop_timeout",
        "healthcheck",
    }
)
"""mercure's ``ALLOWED_DOCKER_ARGS``: resource limits and harmless options. Anything else
(``privileged``, ``cap_add``, ``network_mode``, ``volumes``, ``devices``, ``pid_mode``...) in
a module's ``docker_arguments`` fails the task with the argument named."""

WAIT_SLICE: Final = 1.0
"""Seconds of one wait for the container's exit; between two, cancellation and the timeout
are checked."""
KILL_GRACE: Final = 10.0
MAX_LOG_BYTES: Final = 16 * 1024 * 1024


class RunFailure(Exception):
    """A step could not run to a success; ``str()`` is the reason shown to users."""

    def __init__(self, reason: str, logs: str = "") -> None:
        super().__init__(reason)
        self.logs = logs
        """What the container printed, when it ran."""


class ModuleFailure(RunFailure):
    """The module failed: non-zero exit code, timeout, unusable output."""

    step: int = 0
    """The index of the failing step in the chain."""


class EngineFailure(RunFailure):
    """The Docker engine failed us: unreachable, or an API error; worth retrying later."""


class ConfigFailure(RunFailure):
    """Cannot succeed until the configuration or the engine's images change."""


class Interrupted(Exception):
    """The processor is stopping: the container was killed, the attempt does not count."""


@dataclass(frozen=True)
class StepSpec:
    """What one container run needs."""

    task_id: str
    index: int
    module_name: str
    module: Module
    in_dir: Path
    out_dir: Path
    persistence_dir: Path | None
    timeout: float


@dataclass(frozen=True)
class StepRun:
    """A finished container run."""

    exit_code: int
    logs: str
    duration_s: float
    image_id: str


def connect(settings: ProcessorSettings) -> docker.DockerClient:
    """A client for the engine, checked with a ping; :class:`EngineFailure` naming the address
    when the engine cannot be reached."""
    where = settings.docker_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    client: docker.DockerClient | None = None
    try:
        _probe_socket(where)
        if settings.docker_url:
            client = docker.DockerClient(base_url=settings.docker_url, timeout=60)
        else:
            client = docker.from_env(timeout=60)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        if client is not None:
            client.close()
        raise EngineFailure(f"Docker engine unreachable at {where}: {_short(exc)}") from None
    return client


def _probe_socket(where: str) -> None:
    """Connect to a ``unix://`` engine socket once (docker-py leaks the socket of a refused
    connection, and says less about why)."""
    if not where.startswith("unix://"):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(10)
        try:
            probe.connect(where.removeprefix("unix://"))
        except OSError as exc:
            raise OSError(f"{exc.strerror or exc}") from None


def remove_orphans(client: docker.DockerClient) -> int:
    """Remove processor containers whose owning processor process is dead (killed while the
    module ran); the number removed. Containers of live processors, here or on other hosts
    sharing the engine, are left alone."""
    try:
        found = client.containers.list(all=True, filters={"label": f"{LABEL_SERVICE}=processor"})
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EngineFailure(f"cannot list containers: {_short(exc)}") from None
    removed = 0
    for container in found:
        raw = (container.labels or {}).get(LABEL_OWNER, "")
        owner = LockOwner.from_json(raw.encode())
        if owner is not None and owner.is_alive():
            continue
        logger.warning(
            "removing orphaned container %s (task %s)",
            container.short_id,
            (container.labels or {}).get(LABEL_TASK, "?"),
        )
        _remove(container)
        removed += 1
    return removed


def remove_task_containers(client: docker.DockerClient, task_id: str) -> int:
    """Remove every container labelled with ``task_id`` (left by a processor killed mid-run);
    the number removed."""
    try:
        found = client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
    except docker.errors.DockerException as exc:
        raise EngineFailure(f"cannot list containers: {_short(exc)}") from None
    for container in found:
        logger.warning("task %s: removing left-over container %s", task_id, container.short_id)
        _remove(container)
    return len(found)


class ContainerRunner:
    """Runs :class:`StepSpec` s on one engine client (one runner per attempt)."""

    def __init__(
        self, client: docker.DockerClient, settings: ProcessorSettings, cancel: threading.Event
    ) -> None:
        self.client = client
        self.settings = settings
        self.cancel = cancel
        self.owner = LockOwner.me("processor").to_json().decode()

    def run(self, spec: StepSpec) -> StepRun:
        """Run the step's container to its end; raises a :class:`RunFailure` or
        :class:`Interrupted`. The container is removed in every case."""
        tag = spec.module.docker_tag
        if not tag:
            raise ConfigFailure(f"module {spec.module_name!r} has no docker_tag")
        image_id = self._image(tag)
        kwargs = self.container_arguments(spec)
        try:
            container = self.client.containers.create(image_id, **kwargs)
        except docker.errors.APIError as exc:
            if exc.is_client_error():
                raise ConfigFailure(f"Docker refused the container: {_short(exc)}") from None
            raise EngineFailure(f"Docker could not create the container: {_short(exc)}") from None
        except docker.errors.DockerException as exc:
            raise EngineFailure(f"Docker could not create the container: {_short(exc)}") from None
        started = time.monotonic()
        try:
            try:
                container.start()
            except docker.errors.DockerException as exc:
                raise EngineFailure(
                    f"Docker could not start the container: {_short(exc)}"
                ) from None
            try:
                code = self._wait(container, spec)
            except ModuleFailure as exc:
                exc.logs = _logs(container)
                raise
            logs = _logs(container)
        finally:
            _remove(container)
        duration = time.monotonic() - started
        return StepRun(exit_code=code, logs=logs, duration_s=duration, image_id=image_id)

    # ------------------------------------------------------------------ pieces

    def _image(self, tag: str) -> str:
        """The local image's id; pulled only when allowed and missing."""
        try:
            return str(self.client.images.get(tag).id)
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.DockerException as exc:
            raise EngineFailure(f"cannot inspect image {tag!r}: {_short(exc)}") from None
        if not self.settings.pull_images:
            raise ConfigFailure(
                f"image {tag!r} is not on the Docker engine (processing_pull_images is off)"
            )
        try:
            logger.info("pulling image %s", tag)
            return str(self.client.images.pull(tag).id)
        except docker.errors.DockerException as exc:
            raise ConfigFailure(
                f"image {tag!r} is missing and cannot be pulled: {_short(exc)}"
            ) from None

    def container_arguments(self, spec: StepSpec) -> dict[str, Any]:
        """The keyword arguments of ``containers.create`` for ``spec`` (checked)."""
        module = spec.module
        environment: dict[str, Any] = {
            str(key): str(value) for key, value in module.parsed_environment().items()
        }
        contract = {
            "MERCURE_IN_DIR": IN_DIR,
            "MERCURE_OUT_DIR": OUT_DIR,
            "MONAI_INPUTPATH": IN_DIR,
            "MONAI_OUTPUTPATH": OUT_DIR,
            "HOLOSCAN_INPUT_PATH": IN_DIR,
            "HOLOSCAN_OUTPUT_PATH": OUT_DIR,
            "CADUCEUS_MODULE_NAME": spec.module_name,
        }
        volumes: dict[str, dict[str, str]] = {
            str(spec.in_dir): {"bind": IN_DIR, "mode": "ro"},
            str(spec.out_dir): {"bind": OUT_DIR, "mode": "rw"},
        }
        if spec.persistence_dir is not None:
            volumes[str(spec.persistence_dir)] = {"bind": PERSISTENCE_DIR, "mode": "rw"}
            contract["MODULE_PERSISTENCE_DIR"] = PERSISTENCE_DIR
        for host, bind in self._extra_volumes(spec).items():
            volumes[host] = bind
        kwargs: dict[str, Any] = {
            "volumes": volumes,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "mem_limit": self.settings.memory_limit,
            "pids_limit": self.settings.pids_limit,
            "labels": {},
        }
        if self.settings.cpus is not None:
            kwargs["nano_cpus"] = int(self.settings.cpus * 1e9)
        if not module.network_enabled:
            kwargs["network_mode"] = "none"
        if self.settings.runtime:
            kwargs["runtime"] = self.settings.runtime
        if module.requires_root:
            if not self.settings.support_root_modules:
                raise ConfigFailure(
                    f"module {spec.module_name!r} requires root, "
                    "but support_root_modules is off in the configuration"
                )
        else:
            kwargs["user"] = self.settings.container_user()
        self._apply_docker_arguments(spec, kwargs, environment)
        environment.update(contract)  # the contract's paths are not negotiable
        kwargs["environment"] = environment
        kwargs["labels"].update(
            {
                LABEL_SERVICE: "processor",
                LABEL_TASK: spec.task_id,
                LABEL_STEP: str(spec.index),
                LABEL_OWNER: self.owner,
            }
        )
        return kwargs

    @staticmethod
    def _apply_docker_arguments(
        spec: StepSpec, kwargs: dict[str, Any], environment: dict[str, Any]
    ) -> None:
        """The module's allow-listed ``docker_arguments`` over the defaults."""
        module = spec.module
        extra = module.parsed_docker_arguments()
        forbidden = sorted(set(extra) - ALLOWED_DOCKER_ARGUMENTS)
        if forbidden:
            raise ConfigFailure(
                f"module {spec.module_name!r}: docker_arguments {', '.join(forbidden)} "
                f"not allowed (allowed: {', '.join(sorted(ALLOWED_DOCKER_ARGUMENTS))})"
            )
        for key, value in extra.items():
            if key == "environment":
                if not isinstance(value, dict):
                    raise ConfigFailure(
                        f"module {spec.module_name!r}: docker_arguments.environment "
                        "must be an object"
                    )
                environment.update({str(k): str(v) for k, v in value.items()})
            elif key == "labels":
                if isinstance(value, dict):
                    kwargs["labels"].update({str(k): str(v) for k, v in value.items()})
            else:
                kwargs[key] = value

    def _extra_volumes(self, spec: StepSpec) -> dict[str, dict[str, str]]:
        """``additional_volumes``, each host path inside an allowed root, never over the
        contract's folders."""
        try:
            volumes = spec.module.parsed_volumes()
        except ValueError as exc:
            raise ConfigFailure(f"module {spec.module_name!r}: additional_volumes: {exc}") from None
        checked: dict[str, dict[str, str]] = {}
        reserved = (IN_DIR, OUT_DIR, PERSISTENCE_DIR)
        for host, bind in volumes.items():
            where = f"module {spec.module_name!r}: additional_volumes {host!r}"
            if not isinstance(bind, dict) or not isinstance(bind.get("bind"), str):
                raise ConfigFailure(f"{where}: needs a {{'bind': path, 'mode': ...}} object")
            real = os.path.realpath(host)
            if not any(
                real == root or real.startswith(root + os.sep)
                for root in self.settings.volume_roots
            ):
                raise ConfigFailure(
                    f"{where} is outside the allowed roots "
                    f"({', '.join(self.settings.volume_roots)}; processing_volume_roots)"
                )
            target = os.path.normpath(bind["bind"])
            if any(
                target == r or r.startswith(target + "/") or target.startswith(r + "/")
                for r in reserved
            ):
                raise ConfigFailure(f"{where}: cannot mount over {target}")
            mode = bind.get("mode", "ro")
            if mode not in ("ro", "rw"):
                raise ConfigFailure(f"{where}: mode must be 'ro' or 'rw'")
            checked[real] = {"bind": target, "mode": mode}
        return checked

    def _wait(self, container: Container, spec: StepSpec) -> int:
        """The exit code; kills the container on timeout (:class:`ModuleFailure`) or on
        cancellation (:class:`Interrupted`)."""
        deadline = time.monotonic() + spec.timeout
        while True:
            if self.cancel.is_set():
                _kill(container)
                raise Interrupted(f"task {spec.task_id}: stopped while {spec.module_name} ran")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill(container)
                raise ModuleFailure(
                    f"timeout: module {spec.module_name!r} ran longer than {spec.timeout:g} s "
                    "and was killed"
                )
            try:
                result = container.wait(timeout=min(WAIT_SLICE, remaining))
            except requests.exceptions.ReadTimeout:
                continue
            except requests.exceptions.ConnectionError as exc:
                if "timed out" in str(exc).lower():
                    continue
                raise EngineFailure(
                    f"lost the Docker engine while the module ran: {_short(exc)}"
                ) from None
            except docker.errors.DockerException as exc:
                raise EngineFailure(f"waiting for the container failed: {_short(exc)}") from None
            error = (result.get("Error") or {}).get("Message") if isinstance(result, dict) else None
            if error:
                raise EngineFailure(f"the container failed to run: {error}")
            return int(result.get("StatusCode", -1))


def _kill(container: Container) -> None:
    try:
        container.kill()
        container.wait(timeout=KILL_GRACE)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        logger.warning("cannot kill container %s: %s", container.short_id, _short(exc))


def _logs(container: Container) -> str:
    try:
        raw: bytes = container.logs(stdout=True, stderr=True, timestamps=True)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        return f"(the container's logs could not be read: {_short(exc)})"
    if len(raw) > MAX_LOG_BYTES:
        raw = b"(earlier output cut)\n" + raw[-MAX_LOG_BYTES:]
    return raw.decode("utf-8", errors="replace")


def _remove(container: Container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        logger.error("cannot remove container %s: %s", container.short_id, _short(exc))


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."
