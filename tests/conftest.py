"""Shared fixtures: the receiver as a real process, and test data made once per session."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import docker
import pytest

from tests import dicom_factory
from tests.helpers import Receiver, ReceiverFactory, require_root, require_tool
from tests.processor_helpers import build_images, require_docker

RECEIVERS = pytest.StashKey[list[Receiver]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the log of every receiver a failed test started to its report."""
    report = yield
    if report.failed:
        receivers: list[Receiver] = item.stash.get(RECEIVERS, [])
        for number, rx in enumerate(receivers, 1):
            report.sections.append((f"receiver {number} (port {rx.port}) log", rx.log()[-20_000:]))
    return report


@pytest.fixture
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReceiverFactory]:
    """Start ``python -m receiver`` on a free port; a factory, so a test can start several.

    See :class:`ReceiverFactory`. Teardown sends SIGTERM to every receiver the test started and
    asserts exit code 0, unless the test killed the process; the receiver logs of a failed test
    are attached to its report.
    """
    factory = ReceiverFactory(tmp_path)
    request.node.stash[RECEIVERS] = factory.started
    yield factory

    problems: list[str] = []
    for rx in factory.started:
        if rx.expected_exit is not None:
            code = rx.terminate()
            if code != rx.expected_exit:
                problems.append(f"receiver pid {rx.pid} exited {code}, not {rx.expected_exit}")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rx.pid, signal.SIGKILL)  # association workers left behind, if any
    if problems:
        pytest.fail("; ".join(problems))


# ---------------------------------------------------------------------------- test data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dicom")


@pytest.fixture(scope="session")
def ct_series(data_dir: Path) -> list[dicom_factory.Instance]:
    """Twelve 512x512 16-bit CT slices, Explicit VR Little Endian."""
    return dicom_factory.ct_series(data_dir / "ct", 12, seed="ct")


@pytest.fixture(scope="session")
def multiframe(data_dir: Path) -> dicom_factory.Instance:
    return dicom_factory.multiframe(data_dir / "multiframe", frames=8)


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """The DCMTK command-line tools the tests use (skip without them, fail under CI)."""
    for tool in ("storescu", "echoscu", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv"):
        require_tool(tool)


# ---------------------------------------------------------------------------- a small filesystem


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount small tmpfs filesystems (size in MiB) under ``tmp_path``; unmounted at teardown.

    Request this fixture *before* ``receiver`` so that the receivers stop before the unmount.
    """
    require_root("mounts a tmpfs")
    mounts: list[Path] = []

    def mount(size_mb: int) -> Path:
        point = tmp_path / f"fs{len(mounts) + 1}"
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(point)],
            check=True,
            capture_output=True,
        )
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        done = subprocess.run(["umount", str(point)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the real Docker engine, with the module images built (processor tests)."""
    client = require_docker()
    build_images(client)
    yield client
    client.close()
