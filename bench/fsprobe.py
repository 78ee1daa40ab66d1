"""The cost of the file system operations a receiver makes per instance, on the spool's disk.

Measured in the same run as the receivers, so that a figure like "the receiver spends 1.5 ms per
instance creating files" can be set against what creating a file costs on this machine at all.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

FILES = 500


@dataclass(frozen=True)
class FsCosts:
    """Mean milliseconds per operation."""

    create_ms: float
    write_10k_ms: float
    write_512k_ms: float
    fsync_10k_ms: float
    fsync_512k_ms: float
    fsync_dir_ms: float
    rename_ms: float

    def describe(self) -> str:
        return (
            f"create+close {self.create_ms:.3f}, rename {self.rename_ms:.3f}, "
            f"write 10 KB {self.write_10k_ms:.3f}, write 512 KB {self.write_512k_ms:.3f}, "
            f"fsync 10 KB file {self.fsync_10k_ms:.3f}, fsync 512 KB file "
            f"{self.fsync_512k_ms:.3f}, unlink + fsync directory {self.fsync_dir_ms:.3f} ms "
            f"(mean of {FILES} files each)"
        )


def _timed_writes(folder: Path, size: int, fsync: bool) -> tuple[float, float, float]:
    """Mean seconds for (create+close, write, fsync) of ``FILES`` files of ``size`` bytes."""
    payload = os.urandom(size)
    create = write = sync = 0.0
    for index in range(FILES):
        path = folder / f"{size}-{int(fsync)}-{index}"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        t1 = time.perf_counter()
        os.write(fd, payload)
        t2 = time.perf_counter()
        if fsync:
            os.fsync(fd)
        t3 = time.perf_counter()
        os.close(fd)
        t4 = time.perf_counter()
        create, write, sync = create + (t1 - t0) + (t4 - t3), write + (t2 - t1), sync + (t3 - t2)
    return create / FILES, write / FILES, sync / FILES


def measure(folder: Path) -> FsCosts:
    """Measure in a scratch folder under ``folder`` (removed afterwards)."""
    scratch = folder / "fsprobe"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        os.sync()
        create, write_10k, _ = _timed_writes(scratch, 10_000, fsync=False)
        _, write_512k, _ = _timed_writes(scratch, 524_288, fsync=False)
        os.sync()
        _, _, fsync_10k = _timed_writes(scratch, 10_000, fsync=True)
        _, _, fsync_512k = _timed_writes(scratch, 524_288, fsync=True)
        dir_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        t0 = time.perf_counter()
        for index in range(FILES):
            os.rename(scratch / f"10000-0-{index}", scratch / f"renamed-{index}")
        rename = (time.perf_counter() - t0) / FILES
        t0 = time.perf_counter()
        for index in range(FILES):
            (scratch / f"renamed-{index}").unlink()
            os.fsync(dir_fd)
        fsync_dir = (time.perf_counter() - t0) / FILES
        os.close(dir_fd)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ms = 1000.0
    return FsCosts(
        create * ms, write_10k * ms, write_512k * ms, fsync_10k * ms, fsync_512k * ms,
        fsync_dir * ms, rename * ms,
    )  # fmt: skip
