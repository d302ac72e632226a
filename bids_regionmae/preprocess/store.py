"""Model-ready runs in ``output_dir``: file names, and the reader used by group level.

Per run, participant level writes (``<prefix>`` = the run's entities +
``space-MNI152NLin6Asym_res-2``)::

    <prefix>_desc-modelready_bold.npy      float16, (T, 96, 96, 96), C order: frames are contiguous
    <prefix>_desc-modelready_bold.json     sidecar, written last: the completion marker
    <prefix>_desc-brain_mask.nii.gz (+ .json)   model-grid brain mask (BIDS derivative)
    <prefix>_desc-mean_boldref.nii.gz      temporal mean before normalisation
    <prefix>_desc-preview_bold.nii.gz (+ .json) first frames after normalisation
    <prefix>_desc-modelready_clips.tsv     clip index
    <prefix>_desc-modelready_qc.json       quality control

The pretraining and prediction code reads runs only through
:func:`find_model_ready_runs` and :class:`ModelReadyRun`; the files are named
by :func:`model_ready_paths` and the model-grid images, the clip index and the
sidecar written by :func:`save_model_grid_image`, :func:`write_brain_mask`,
:func:`write_clip_index` and :func:`write_sidecar` (participant level and the
test stores of :mod:`bids_regionmae.testing` both use them).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae.atomic import atomic_path, atomic_write_json, atomic_write_text
from bids_regionmae.grid import MODEL_AFFINE, MODEL_RES, MODEL_SHAPE, MODEL_SPACE
from bids_regionmae.outputs.derivatives import build_output_path

LOGGER = logging.getLogger(__name__)

#: ``format`` field of the sidecar, and its version: bump the version when the
#: stored data changes meaning, so that old outputs are reprocessed.
FORMAT = "regionmae-modelready"
FORMAT_VERSION = 1

#: name -> (desc, suffix, extension) of every file of a model-ready run.
OUTPUT_FILES: dict[str, tuple[str, str, str]] = {
    "data": ("modelready", "bold", ".npy"),
    "sidecar": ("modelready", "bold", ".json"),
    "mask": ("brain", "mask", ".nii.gz"),
    "mask_json": ("brain", "mask", ".json"),
    "mean": ("mean", "boldref", ".nii.gz"),
    "preview": ("preview", "bold", ".nii.gz"),
    "preview_json": ("preview", "bold", ".json"),
    "clips": ("modelready", "clips", ".tsv"),
    "qc": ("modelready", "qc", ".json"),
}
_SIDECAR_GLOBS = ("sub-*/func/*_desc-modelready_bold.json", "sub-*/ses-*/func/*_desc-modelready_bold.json")
#: ``Resolution`` of the model-grid images' sidecars.
RESOLUTION = {MODEL_RES: "2 mm isotropic MNI152NLin6Asym grid cropped/padded to 96x96x96 (NeuroSTORM input grid)"}


def model_ready_paths(entities: dict[str, str], output_dir: str | Path) -> dict[str, Path]:
    """Paths of every output file of one run.

    Parameters
    ----------
    entities : dict
        The run's BIDS entities (``subject``, ``task``, optional ``session``,
        ``run``, ``acquisition``...), as :attr:`RunRecord.entities`.
    output_dir : path

    Returns
    -------
    dict of str to Path
        Keyed as :data:`OUTPUT_FILES`.
    """
    base = {**entities, "space": MODEL_SPACE, "resolution": MODEL_RES}
    return {name: build_output_path({**base, "desc": desc, "suffix": suffix, "extension": ext}, output_dir)
            for name, (desc, suffix, ext) in OUTPUT_FILES.items()}


def save_model_grid_image(data: np.ndarray, path: Path, tr: float | None = None) -> Path:
    """Write a 3-D or 4-D array on the 96^3 model grid as NIfTI (MNI sform/qform; ``tr`` for 4-D), atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(data, MODEL_AFFINE)
    img.header.set_sform(MODEL_AFFINE, code=4)  # NIFTI_XFORM_MNI_152
    img.header.set_qform(MODEL_AFFINE, code=4)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = tr
        img.header.set_zooms(zooms)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def write_brain_mask(paths: dict[str, Path], mask: np.ndarray) -> None:
    """The run's brain mask on the model grid (uint8 NIfTI) and its BIDS sidecar."""
    save_model_grid_image(mask.astype(np.uint8), paths["mask"])
    atomic_write_json(paths["mask_json"], {
        "Type": "Brain", "Resolution": RESOLUTION,
        "Description": "Brain mask of the run resampled onto the model grid (trilinear, > 0.5)."})


def write_clip_index(path: Path, n_frames: int, length: int, stride: int, times: np.ndarray) -> int:
    """The clip index (``clip``, ``onset_frame``, ``n_frames``, ``onset_seconds``); returns the number of clips."""
    starts = list(range(0, n_frames - length + 1, stride))
    atomic_write_text(path, "clip\tonset_frame\tn_frames\tonset_seconds\n" + "".join(
        f"{i}\t{s}\t{length}\t{float(times[s]):.6g}\n" for i, s in enumerate(starts)))
    return len(starts)


def write_sidecar(path: Path, record: dict[str, Any]) -> Path:
    """The run's sidecar, with the store format and ``complete``: write it last, it marks the run complete."""
    return atomic_write_json(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True, **record})


@dataclass
class ModelReadyRun:
    """One preprocessed run, as stored by participant level.

    Attributes
    ----------
    sidecar : Path
        ``..._desc-modelready_bold.json``.
    meta : dict
        Its content (grid, TRs, frames, normalisation stats, sources...).
    entities : dict of str to str
        The run's BIDS entities (``subject``, ``task``, ``session``, ``run``...).
    paths : dict of str to Path
        Every file of the run (keys of :data:`OUTPUT_FILES`).

    Notes
    -----
    ``data`` is opened lazily as a read-only memory map and is left behind when
    an instance is sent to a DataLoader worker, so that is cheap.
    """

    sidecar: Path
    meta: dict[str, Any] = field(repr=False)
    entities: dict[str, str]
    paths: dict[str, Path] = field(repr=False)
    _data: np.memmap | None = field(default=None, repr=False, compare=False)
    _mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    @property
    def subject(self) -> str:
        """Subject label without ``sub-``."""
        return self.entities["subject"]

    @property
    def run_id(self) -> str:
        """File-name prefix of the run, e.g. ``sub-01_task-rest_run-1``."""
        return self.meta.get("run_id") or self.sidecar.name.split("_space-")[0]

    @property
    def n_frames(self) -> int:
        """Frames stored (T)."""
        return int(self.meta["frames"]["output"])

    @property
    def repetition_time(self) -> float:
        """TR (s) of the stored frames."""
        return float(self.meta["repetition_time"])

    @property
    def data(self) -> np.memmap:
        """The run, shape (T, 96, 96, 96), float16, read-only memory map; axes (t, x, y, z)."""
        if self._data is None:
            self._data = np.load(self.paths["data"], mmap_mode="r")
        return self._data

    @property
    def mask(self) -> np.ndarray:
        """Brain mask on the model grid, shape (96, 96, 96), bool."""
        if self._mask is None:
            import nibabel as nib

            self._mask = np.asanyarray(nib.load(str(self.paths["mask"])).dataobj) > 0
        return self._mask

    @property
    def clips(self) -> list[tuple[int, int]]:
        """Clips as ``(start, stop)`` frame ranges (stop exclusive), from the clip index."""
        with open(self.paths["clips"], newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return [(int(r["onset_frame"]), int(r["onset_frame"]) + int(r["n_frames"])) for r in rows]

    def mean_image(self, max_frames: int = 50) -> np.ndarray:
        """Mean image, shape (96, 96, 96) float32: the mean BOLD reference, else the mean of the first frames."""
        path = self.paths.get("mean")
        if path is not None and Path(path).is_file():
            import nibabel as nib

            return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        return np.asarray(self.data[: min(self.n_frames, max_frames)], dtype=np.float32).mean(0)

    def clip(self, index: int) -> np.ndarray:
        """One clip, shape (clip_length, 96, 96, 96), float16 (a view of the memory map)."""
        start, stop = self.clips[index]
        return self.data[start:stop]


def load_model_ready_run(sidecar: str | Path) -> ModelReadyRun:
    """Open a run from its sidecar and check that it is complete.

    Raises
    ------
    ValueError
        The sidecar is unreadable, incomplete, of another format version, or a
        file it lists is missing or has the wrong shape.
    """
    sidecar = Path(sidecar)
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{sidecar}: unreadable sidecar ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("complete") is not True:
        raise ValueError(f"{sidecar}: not a complete {FORMAT} sidecar")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{sidecar}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}; "
                         "rerun participant level")
    files = meta.get("files") or {}
    paths = {name: sidecar.parent / str(rel) for name, rel in files.items()}
    paths["sidecar"] = sidecar
    for name in ("data", "mask", "clips"):
        if name not in paths or not paths[name].is_file():
            raise ValueError(f"{sidecar}: its {name} file is missing")
    shape = (int(meta["frames"]["output"]), *MODEL_SHAPE)
    with open(paths["data"], "rb") as f:
        version = np.lib.format.read_magic(f)
        header = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                  else np.lib.format.read_array_header_2_0(f))
    if tuple(header[0]) != shape or np.dtype(header[2]) != np.float16 or header[1]:
        raise ValueError(f"{sidecar}: data file holds {header[0]} {header[2]}, expected {shape} float16")
    entities = {str(k): str(v) for k, v in (meta.get("entities") or {}).items()}
    if "subject" not in entities:
        raise ValueError(f"{sidecar}: sidecar has no subject entity")
    return ModelReadyRun(sidecar=sidecar, meta=meta, entities=entities, paths=paths)


def find_model_ready_runs(output_dir: str | Path, subjects: list[str] | None = None) -> list[ModelReadyRun]:
    """All complete model-ready runs under ``output_dir``, sorted by file name.

    Parameters
    ----------
    output_dir : path
        The app's output directory.
    subjects : list of str, optional
        Labels with or without ``sub-``; all subjects when None.

    Returns
    -------
    list of ModelReadyRun
        Incomplete or invalid runs (no sidecar yet, missing files, another
        format version) are left out, with a debug log line.
    """
    output_dir = Path(output_dir)
    wanted = None if subjects is None else {s[4:] if s.startswith("sub-") else s for s in subjects}
    sidecars = sorted({p for pattern in _SIDECAR_GLOBS for p in output_dir.glob(pattern)})
    runs = []
    for sidecar in sidecars:
        if wanted is not None and sidecar.name.split("_")[0][4:] not in wanted:
            continue
        try:
            runs.append(load_model_ready_run(sidecar))
        except (ValueError, KeyError, TypeError) as exc:
            LOGGER.debug("skipping %s: %s", sidecar, exc)
    return runs


def data_manifest(runs: list[ModelReadyRun], output_dir: str | Path, split: dict[str, str],
                  clips_per_run: dict[str, int]) -> list[dict[str, Any]]:
    """One row per run for a model's data manifest: entities, split, sidecar checksum, sources.

    Parameters
    ----------
    runs : list of ModelReadyRun
    output_dir : path
        Sidecar paths are written relative to it.
    split : dict of str to str
        Participant -> ``train`` / ``validation`` (others: ``unused``).
    clips_per_run : dict of str to int
        Clips of each run the model saw.

    Returns
    -------
    list of dict
    """
    from bids_regionmae.atomic import sha256_file

    output_dir = Path(output_dir)
    rows = []
    for run in runs:
        meta = run.meta
        sources = {k: {kk: v.get(kk) for kk in ("path", "sha256", "size")}
                   for k, v in (meta.get("sources") or {}).items() if isinstance(v, dict)}
        sidecar = Path(run.sidecar)
        rows.append({
            "run_id": run.run_id,
            "subject": run.subject,
            "entities": run.entities,
            "split": split.get(run.subject, "unused"),
            "sidecar": str(sidecar.relative_to(output_dir)) if sidecar.is_relative_to(output_dir) else str(sidecar),
            "sidecar_sha256": sha256_file(sidecar),
            "data": str(Path(run.paths["data"]).name),
            "data_size": Path(run.paths["data"]).stat().st_size,
            "frames": run.n_frames,
            "clips_used": clips_per_run.get(run.run_id, 0),
            "repetition_time": meta.get("repetition_time"),
            "inputs_fingerprint": meta.get("inputs_fingerprint"),
            "sources": sources,
        })
    return rows
