"""The receiving peers under test: DCMTK ``storescp`` and the Caduceus receiver.

A peer is started fresh for every measured run, answers C-ECHO before the run starts, and is
stopped with SIGTERM afterwards. After each run :meth:`Peer.received` lists the SOP Instance UIDs
that reached disk, so a run that lost an instance is reported, never averaged in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs

REPO = Path(__file__).resolve().parent.parent
RECEIVER_MAIN = REPO / "receiver" / "__main__.py"
BENCH_API_KEY = "bench-token-0123456789"
STORESCP_MAX_PDU = 131072
"""The largest receive PDU ``storescp -pdu`` accepts (4096..131072); its default is 16384."""

_THEIR_MAX_PDU = re.compile(r"Their Max PDU Receive Size:\s*(\d+)")


def receiver_available() -> bool:
    return RECEIVER_MAIN.is_file()


@dataclass(frozen=True)
class Received:
    """What a peer stored: SOP Instance UIDs of complete files, and side-car count."""

    sop_uids: list[str]
    sidecars: int | None = None


@dataclass
class Peer:
    """Base class: a receiving process on a free port writing under ``out_dir``."""

    label: str
    work: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    clean_exit_codes: tuple[int, ...] = (0,)

    @property
    def out_dir(self) -> Path:
        return self.work / "received"

    @property
    def log(self) -> Path:
        return self.work / "peer.log"

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        self.clean()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = procs.free_port()
        args, env = self.command()
        self.proc = procs.start(args, self.log, env=env, cwd=REPO)
        try:
            procs.wait_for_echo(self.port, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; last log line: {self.last_log_line()!r}") from exc

    def last_log_line(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def advertised_max_pdu(self) -> int | None:
        out = procs.echo(self.port, debug=True)
        # The first line is logged before the peer answered (0); the last is the peer's value.
        found = _THEIR_MAX_PDU.findall(out.stdout + out.stderr)
        return int(found[-1]) if found else None

    def stop(self) -> tuple[int | None, bool]:
        if self.proc is None:
            return None, True
        result = procs.stop(self.proc)
        self.proc = None
        return result

    def received(self) -> Received:
        raise NotImplementedError

    def clean(self) -> None:
        shutil.rmtree(self.out_dir, ignore_errors=True)


@dataclass
class StoreScp(Peer):
    """DCMTK ``storescp``: bit-preserving, promiscuous, all transfer syntaxes, max PDU 128 KiB."""

    fork: bool = False
    max_pdu: int = STORESCP_MAX_PDU
    clean_exit_codes: tuple[int, ...] = (0, -15)  # storescp has no SIGTERM handler

    def command(self) -> tuple[list[str], dict[str, str]]:
        args = ["storescp", "--fork" if self.fork else "--single-process"]
        args += ["-od", str(self.out_dir), "+B", "-pm", "+xa", "-fe", ".dcm", "-dhl"]
        args += ["-pdu", str(self.max_pdu), str(self.port)]
        return args, procs.dcmtk_env()

    def describe(self) -> str:
        return " ".join(self.command()[0][:-1]).replace(str(self.out_dir), "DIR") + " PORT"

    def received(self) -> Received:
        # storescp names files <modality>.<SOPInstanceUID><ext> and writes them directly.
        uids = [p.name[p.name.index(".") + 1 : -4] for p in self.out_dir.glob("*.dcm")]
        return Received(uids)


@dataclass
class Caduceus(Peer):
    """``python -m receiver --config CFG`` with ``dicom_receiver`` settings from the bench."""

    fsync: bool = True
    workers: int = 2
    max_pdu: int | None = None

    def config(self) -> dict[str, Any]:
        receiver: dict[str, Any] = {
            "fsync": self.fsync,
            "bind_address": "127.0.0.1",
            "workers": self.workers,
            "min_free_space_mb": 100,
        }
        if self.max_pdu is not None:
            receiver["max_pdu_size"] = self.max_pdu
        return {
            "data_root": str(self.out_dir),
            "port": self.port,
            "bookkeeper_api_key": BENCH_API_KEY,
            "dicom_receiver": receiver,
        }

    def command(self) -> tuple[list[str], dict[str, str]]:
        cfg = self.work / "caduceus.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        return [sys.executable, "-m", "receiver", "--config", str(cfg)], procs.dcmtk_env()

    def describe(self) -> str:
        receiver = {k: v for k, v in self.config()["dicom_receiver"].items()}
        return f"python -m receiver, dicom_receiver={json.dumps(receiver)}"

    def received(self) -> Received:
        incoming = self.out_dir / "incoming"
        uids, sidecars = [], 0
        for series in incoming.iterdir() if incoming.is_dir() else []:
            if not series.is_dir() or series.name.startswith("."):
                continue
            for path in series.iterdir():
                if path.name.startswith("."):
                    continue
                if path.suffix == ".dcm" and "#" in path.name:
                    uids.append(path.name.split("#", 1)[1][:-4])
                elif path.suffix == ".tags":
                    sidecars += 1
        return Received(uids, sidecars)
