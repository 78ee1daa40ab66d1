"""Entry point: ``python -m caduceus_anonymizer`` de-identifies a mercure module's input folder.

Reads every ``*.dcm`` in ``$MERCURE_IN_DIR`` (default ``/tmp/data``), writes the de-identified
instances to ``$MERCURE_OUT_DIR`` (default ``/tmp/output``) as ``<new SeriesUID>#<new SOP Instance
UID>.dcm`` and a ``result.json`` with counts. Exit codes are the ``EXIT_*`` constants below; a
failure leaves no output instance behind and says why on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError

from caduceus_anonymizer import __version__
from caduceus_anonymizer.deidentify import Deidentifier, method_codes
from caduceus_anonymizer.settings import SettingsError, load_task_settings, parse_settings

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error (a bug, or a full disk)
EXIT_CONFIG = 2  # task.json or the settings are missing, malformed or unsafe
EXIT_INPUT = 3  # an input file is not DICOM or cannot be de-identified
SEPARATOR = "#"  # mercure's series separator in file names (mercure_defs.SEPARATOR)
_PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3


class InputError(Exception):
    """An input file that cannot be read as DICOM or cannot be de-identified."""


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the module once; ``environ`` defaults to ``os.environ``. Returns the exit code."""
    if argv:
        print("usage: python -m caduceus_anonymizer (no arguments; see README.md)", file=sys.stderr)
        return EXIT_CONFIG
    env = os.environ if environ is None else environ
    in_dir = Path(env.get("MERCURE_IN_DIR", "/tmp/data"))  # noqa: S108 - mercure's contract
    out_dir = Path(env.get("MERCURE_OUT_DIR", "/tmp/output"))  # noqa: S108
    try:
        settings = parse_settings(load_task_settings(in_dir, env), env)
    except SettingsError as exc:
        print(f"caduceus-anonymizer: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    deidentifier = Deidentifier(settings)
    written: list[Path] = []
    try:
        summary = run(in_dir, out_dir, deidentifier, written)
    except InputError as exc:
        _remove(written)
        print(f"caduceus-anonymizer: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:
        _remove(written)
        print(f"caduceus-anonymizer: cannot write the output: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"caduceus-anonymizer: de-identified {summary['instances']} instance(s)", file=sys.stderr)
    return EXIT_OK


def run(
    in_dir: Path, out_dir: Path, deidentifier: Deidentifier, written: list[Path]
) -> dict[str, Any]:
    """De-identify every ``*.dcm`` of ``in_dir`` into ``out_dir``; return the result summary."""
    sources = sorted(p for p in in_dir.glob("*.dcm") if p.is_file())
    out_dir.mkdir(parents=True, exist_ok=True)
    series: set[str] = set()
    studies: set[str] = set()
    transfer_syntaxes: Counter[str] = Counter()
    for source in sources:
        ds = _read(source)
        try:
            deidentifier.deidentify(ds)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise InputError(f"{source.name}: cannot be de-identified: {exc}") from exc
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        studies.add(str(ds.get("StudyInstanceUID", "") or ""))
        series.add(series_uid)
        transfer_syntaxes[str(ds.file_meta.TransferSyntaxUID)] += 1
        target = out_dir / f"{series_uid}{SEPARATOR}{ds.SOPInstanceUID}.dcm"
        written.append(target)
        _write(ds, target, source)
    summary = _summary(deidentifier, len(sources), len(series), len(studies), transfer_syntaxes)
    result = out_dir / "result.json"
    written.append(result)
    result.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _read(source: Path) -> FileDataset:
    try:
        ds = pydicom.dcmread(source)
    except InvalidDicomError as exc:
        raise InputError(f"{source.name}: not a DICOM file: {exc}") from exc
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InputError(f"{source.name}: cannot be read as DICOM: {exc}") from exc
    if "SOPInstanceUID" not in ds or "TransferSyntaxUID" not in ds.file_meta:
        raise InputError(f"{source.name}: no SOP Instance UID or no transfer syntax")
    return ds


def _write(ds: FileDataset, target: Path, source: Path) -> None:
    """Write in the transfer syntax that was read, with file meta and preamble (PS3.10 7.1)."""
    kwargs: dict[str, Any] = (
        {"enforce_file_format": True} if _PYDICOM_3 else {"write_like_original": False}
    )
    try:
        ds.save_as(target, **kwargs)
    except (ValueError, TypeError, KeyError, OverflowError, NotImplementedError) as exc:
        raise InputError(
            f"{source.name}: the de-identified instance cannot be written: {exc}"
        ) from exc


def _summary(
    deidentifier: Deidentifier,
    instances: int,
    series: int,
    studies: int,
    transfer_syntaxes: Counter[str],
) -> dict[str, Any]:
    settings = deidentifier.settings
    return {
        "module": "caduceus-anonymizer",
        "version": __version__,
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "methods": [f"{code} {meaning}" for code, meaning in method_codes(settings)],
        "instances": instances,
        "series": series,
        "studies": studies,
        "uids_replaced": deidentifier.uids.replaced,
        "transfer_syntaxes": dict(sorted(transfer_syntaxes.items())),
        "attributes": dict(sorted(deidentifier.counts.by_action.items())),
    }


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
