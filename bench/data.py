"""Benchmark data sets, generated once with pydicom and cached under ``bench/out/data``.

Each set is a folder of DICOM files (Explicit VR Little Endian, DICOM File Format) plus a
``manifest.json`` listing every file with its SOP Instance UID and size. A set whose manifest
matches the generator's version and parameters is reused; otherwise it is rebuilt from scratch.
UIDs and pixel data derive from a fixed seed, so every machine generates the same bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SetSpec:
    """What to generate: ``studies`` studies of one series of ``count`` slices each."""

    name: str
    count: int
    size: int  # rows == columns
    studies: int = 1
    seed: int = 20240


@dataclass(frozen=True)
class Instance:
    """One generated file."""

    path: Path
    sop_uid: str
    size: int


@dataclass(frozen=True)
class DataSet:
    """A generated set: its instances in sending order, grouped by study."""

    name: str
    studies: tuple[tuple[Instance, ...], ...]

    @property
    def instances(self) -> list[Instance]:
        return [inst for study in self.studies for inst in study]

    def subset(self, per_study: int) -> DataSet:
        """The first ``per_study`` instances of each study (for ``--quick``)."""
        return DataSet(self.name, tuple(study[:per_study] for study in self.studies))


CT_SERIES = SetSpec("ct", count=300, size=512)
SMALL_INSTANCES = SetSpec("small", count=2000, size=64, seed=20241)
# 4 studies of 2,000 x 512x512x16-bit slices: ~1.05 GB each.
LARGE_STUDIES = SetSpec("studies-4x1g", count=2000, size=512, studies=4, seed=20242)


def _uid(spec: SetSpec, *parts: object) -> str:
    return generate_uid(entropy_srcs=[spec.name, str(spec.seed), *map(str, parts)])


def _pixels(rng: np.random.Generator, size: int) -> np.ndarray:
    """A CT-like slice: a disc of soft tissue on air, with noise (int16, HU + 1024 offset)."""
    yy, xx = np.mgrid[0:size, 0:size]
    r = (size // 2) * 0.85
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < r * r
    base = np.where(disc, 1064, 24).astype(np.int16)
    noise = rng.integers(-40, 40, size=(size, size), dtype=np.int16)
    return base + noise


def _dataset(spec: SetSpec, study: int, index: int, pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid(spec, "sop", study, index)
    ds.StudyInstanceUID = _uid(spec, "study", study)
    ds.SeriesInstanceUID = _uid(spec, "series", study)
    ds.FrameOfReferenceUID = _uid(spec, "for", study)
    ds.Modality = "CT"
    ds.PatientName = f"Bench^{spec.name}^{study}"
    ds.PatientID = f"BENCH-{spec.name}-{study}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"ACC{study:04d}"
    ds.StudyID = str(study + 1)
    ds.StudyDescription = f"Benchmark {spec.name}"
    ds.SeriesDescription = f"Benchmark series {study + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "Caduceus bench"
    ds.ImagePositionPatient = [-250.0, -250.0, -1.0 * index]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.Rows = ds.Columns = spec.size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _generate(spec: SetSpec, folder: Path) -> None:
    logger.info(
        "generating %s: %d x %d study(ies) into %s", spec.name, spec.count, spec.studies, folder
    )
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    base = _pixels(rng, spec.size)
    entries: list[tuple[int, str, str, int]] = []
    for study in range(spec.studies):
        study_dir = folder / f"study{study}"
        study_dir.mkdir()
        for index in range(spec.count):
            # Cheap per-slice variation: a rolled base plus fresh noise on a strip.
            pixels = np.roll(base, index * 7 + study * 131, axis=1)
            pixels[index % spec.size] += rng.integers(-5, 5, size=spec.size, dtype=np.int16)
            ds = _dataset(spec, study, index, pixels)
            path = study_dir / f"{index:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            rel = path.relative_to(folder).as_posix()
            entries.append((study, rel, ds.SOPInstanceUID, path.stat().st_size))
    manifest = {
        "version": GENERATOR_VERSION,
        "spec": spec.__dict__,
        "files": entries,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _load(spec: SetSpec, folder: Path) -> DataSet | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("spec") != spec.__dict__:
        return None
    studies: list[list[Instance]] = [[] for _ in range(spec.studies)]
    for study, rel, uid, size in manifest["files"]:
        path = folder / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
        studies[study].append(Instance(path, uid, size))
    return DataSet(spec.name, tuple(tuple(s) for s in studies))


def ensure(spec: SetSpec, root: Path) -> DataSet:
    """The data set for ``spec`` under ``root``, generated if missing or stale."""
    folder = root / spec.name
    loaded = _load(spec, folder)
    if loaded is None:
        _generate(spec, folder)
        loaded = _load(spec, folder)
        if loaded is None:
            raise RuntimeError(f"generated data set {folder} does not verify")
    return loaded


def split(instances: Sequence[Instance], parts: int) -> list[list[Instance]]:
    """``instances`` in ``parts`` contiguous, nearly equal chunks."""
    size, rest = divmod(len(instances), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < rest else 0)
        chunks.append(list(instances[start:end]))
        start = end
    return chunks
