"""The steps of preprocessing one run: read -> normalise -> write.

1. *read* (:func:`read_inputs`, :func:`map_mask`): open the BOLD run and
   its brain mask, check them, take the TR, drop non-steady-state frames,
   plan the time resampling, and put the mask on the 96^3 model grid;
2. *stream* (:func:`stream_frames`): frames go through a reader thread and
   the spatial resampler into a float16 frame store while per-voxel
   statistics accumulate (:func:`_read_frames`); then every output frame is
   z-scored with the run's global mean and standard deviation and written to
   the model-ready array (:func:`_normalise`);
3. *write* (:func:`write_outputs`): mask, mean image, preview, clip index,
   QC and, last, the sidecar that marks the run complete.

The public entry point is :func:`bids_regionmae.preprocess.run.preprocess_run`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae import __version__
from bids_regionmae.atomic import atomic_path, atomic_write_json, sha256_file, temporary_sibling
from bids_regionmae.bids.records import RunRecord
from bids_regionmae.errors import InputDataError
from bids_regionmae.grid import MODEL_AFFINE, MODEL_RES, MODEL_SHAPE, MODEL_SPACE
from bids_regionmae.preprocess.framestore import DeltaCodec, Float16FrameStore, output_frames
from bids_regionmae.preprocess.normalize import MAX_NONFINITE_FRACTION, Normalizer, RunStats, StatsAccumulator
from bids_regionmae.preprocess.qc import framewise_displacement_summary, region_coverage
from bids_regionmae.preprocess.resample import SpatialResampler, TimePlan, time_plan
from bids_regionmae.preprocess.source import (
    BoldSource,
    Confounds,
    FrameReader,
    check_mni,
    load_mask,
    open_bold,
    read_confounds,
)
from bids_regionmae.preprocess.store import (
    OUTPUT_FILES,
    RESOLUTION,
    save_model_grid_image,
    write_brain_mask,
    write_clip_index,
    write_sidecar,
)

__all__ = ["FrameStats", "GridMask", "RunInputs", "map_mask", "read_inputs", "stream_frames", "write_outputs"]

#: Frames written to the preview NIfTI.
PREVIEW_FRAMES = 5
_N_VOXELS = int(np.prod(MODEL_SHAPE))


# ---------------------------------------------------------------------------- read


@dataclass
class RunInputs:
    """The opened, checked inputs of a run and its time plan.

    Attributes
    ----------
    bold : BoldSource
    mask : ndarray of bool, shape of the BOLD grid
    tr : float
        Repetition time of the source frames (s).
    confounds : Confounds
    dropped : ndarray of bool, shape (n_source_frames,)
        Non-steady-state frames left out.
    kept_index : ndarray of int
    plan : TimePlan
        Output frames from the kept source frames.
    warnings : list of str
        Collected by every step; the run's warnings.
    """

    bold: BoldSource
    mask: np.ndarray
    tr: float
    confounds: Confounds
    dropped: np.ndarray
    kept_index: np.ndarray
    plan: TimePlan
    warnings: list[str]


def _repetition_time(record: RunRecord, bold: BoldSource, warnings: list[str]) -> float:
    tr = float(record.repetition_time) if record.repetition_time else float("nan")
    if not np.isfinite(tr) or tr <= 0:
        if bold.header_tr is None:
            raise InputDataError(f"{record.bold}: no repetition time in the run record nor in the NIfTI header. "
                                 "Add RepetitionTime to the BOLD JSON sidecar.")
        return bold.header_tr
    if bold.header_tr is not None and abs(bold.header_tr - tr) > 0.01 * tr:
        warnings.append(f"RepetitionTime {tr} s (sidecar) differs from the NIfTI header's {bold.header_tr} s; "
                        "using the sidecar")
    return tr


def read_inputs(record: RunRecord, parameters: Mapping[str, Any]) -> RunInputs | str:
    """Open and check the run; the reason it is skipped (a string) when it is shorter than one clip.

    Raises
    ------
    InputDataError
        The inputs are unusable (not 4-D, grids differ, not an MNI space, no TR...).
    """
    warnings: list[str] = []
    bold = open_bold(record.bold)
    mask_src = load_mask(record.mask, bold)
    check_mni(bold, mask_src, record.space)
    n_total = bold.n_frames
    tr = _repetition_time(record, bold, warnings)
    confounds = read_confounds(record.confounds, n_total)
    dropped = confounds.nonsteady if parameters["drop_nonsteady"] else np.zeros(n_total, bool)
    kept_index = np.flatnonzero(~dropped)
    if dropped.any():
        first_kept = kept_index[0] if kept_index.size else n_total
        if np.any(np.flatnonzero(dropped) > first_kept):
            warnings.append("non-steady-state frames flagged after the start of the run were dropped too")
    plan = time_plan(kept_index * tr, tr, parameters["target_tr"])
    clip_length = parameters["clip_length"]
    if len(plan) < clip_length:
        return (f"{record.bold}: {len(plan)} frames after dropping {int(dropped.sum())} non-steady-state frames"
                + (f" and resampling to TR {plan.repetition_time} s" if parameters["target_tr"] else "")
                + f", fewer than one clip of {clip_length}; run skipped (other runs go on). Lower --clip-length "
                  "to use it.")
    return RunInputs(bold=bold, mask=mask_src, tr=tr, confounds=confounds, dropped=dropped, kept_index=kept_index,
                     plan=plan, warnings=warnings)


@dataclass
class GridMask:
    """The brain mask on the model grid and the resampler that put it there.

    Attributes
    ----------
    resampler : SpatialResampler
    model_mask : ndarray of bool, shape (96, 96, 96)
    share : float
        Share of the source mask's volume inside the model grid.
    index : ndarray of int
        Flat indices of the mask voxels.
    flat : ndarray of bool, shape (96**3,)
    """

    resampler: SpatialResampler
    model_mask: np.ndarray
    share: float
    index: np.ndarray
    flat: np.ndarray


def map_mask(record: RunRecord, inputs: RunInputs, method: str) -> GridMask:
    """Resample the brain mask onto the model grid (trilinear > 0.5).

    Raises
    ------
    InputDataError
        No mask voxel on the model grid.
    """
    bold = inputs.bold
    if method == "separable" and SpatialResampler(bold.affine, bold.shape[:3]).method == "grid_sample":
        method = "grid_sample"  # oblique grids cannot be separated
    resampler = SpatialResampler(bold.affine, bold.shape[:3], method=method)
    model_mask = resampler.resample_mask(inputs.mask)
    voxel_volume = float(abs(np.linalg.det(bold.affine[:3, :3])))
    share = float(model_mask.sum() * 8.0 / (inputs.mask.sum() * voxel_volume))
    if not model_mask.any():
        raise InputDataError(f"{record.mask}: the brain mask has no voxel on the model grid. Check the "
                             "space of the run.")
    if share < 0.95:
        inputs.warnings.append(f"only {share:.1%} of the brain mask volume falls inside the 96^3 model grid")
    flat = model_mask.ravel()
    return GridMask(resampler=resampler, model_mask=model_mask, share=share, index=np.flatnonzero(flat), flat=flat)


# ---------------------------------------------------------------------------- stream: read frames, normalise


@dataclass
class FrameStats:
    """What streaming the frames found.

    Attributes
    ----------
    stats : StatsAccumulator
    run : RunStats
        Global mean/std, per-voxel mean, tSNR, non-finite counts.
    codec : DeltaCodec
    source_nonfinite : int
        NaN/Inf values inside the source mask.
    bold_sha256 : str
    preview : list of ndarray
        The first normalised frames, flat (96**3,).
    """

    stats: StatsAccumulator
    run: RunStats
    codec: DeltaCodec
    source_nonfinite: int
    bold_sha256: str
    preview: list[np.ndarray]


def _read_frames(store: Float16FrameStore, inputs: RunInputs, grid: GridMask
                 ) -> tuple[StatsAccumulator, DeltaCodec, int, bool, str]:
    """Resample every kept source frame into ``store`` as deviations from the first frame; accumulate statistics.

    Returns
    -------
    stats, codec, source_nonfinite, has_nan, bold_sha256
    """
    bold, resampler = inputs.bold, grid.resampler
    keep_all = ~inputs.dropped
    may_be_nonfinite = bold.dtype.kind == "f" or bold.slope != 1.0 or bold.inter != 0.0
    fused = inputs.plan.identity  # statistics of the kept frames are those of the output
    stats: StatsAccumulator | None = None
    codec: DeltaCodec | None = None
    source_nonfinite, has_nan, k = 0, False, 0
    with FrameReader(bold) as reader:
        scratch = np.empty((reader.chunk_frames, _N_VOXELS), np.float32)
        for t0, frames in reader:
            keep = keep_all[t0:t0 + frames.shape[0]]
            if not keep.any():
                continue
            if not keep.all():
                frames = frames[keep]
            n = frames.shape[0]
            bad_model = None
            if may_be_nonfinite and not np.isfinite(frames).all():
                bad = ~np.isfinite(frames)
                source_nonfinite += int(bad[:, inputs.mask].sum())
                frames = np.where(bad, np.float32(0.0), frames)
                bad_model = resampler(bad.astype(np.float32)).reshape(n, -1) > 0
            # Deviations from the run's first frame (the reference of stats and storage).
            out = scratch[:n]
            if stats is None:
                resampler(frames, out=out.reshape(n, *MODEL_SHAPE))
                if bad_model is not None:
                    out[bad_model] = np.nan
                stats = StatsAccumulator(out[0], grid.index)
                codec = DeltaCodec(stats.reference, grid.index)
                np.subtract(out, stats.reference, out=out)
            else:
                resampler(frames, out=out.reshape(n, *MODEL_SHAPE), subtract=stats.reference.reshape(MODEL_SHAPE))
            if bad_model is not None:
                out[bad_model] = np.nan
                has_nan = True
            if fused:
                stats.add(out, may_have_nan=bad_model is not None)
                store.write(k, codec.encode(out, stats.last_sq))
            else:
                store.write(k, codec.encode(out))
            k += n
        bold_sha256 = reader.sha256
    if not fused:
        for _, block in output_frames(store, inputs.plan):
            stats.add(np.multiply(block, np.float32(1.0 / codec.scale), out=block), has_nan)
    return stats, codec, source_nonfinite, has_nan, bold_sha256


def _check_stats(record: RunRecord, run_stats: RunStats, stats: StatsAccumulator, grid: GridMask,
                 warnings: list[str]) -> None:
    """Refuse unusable runs; removes voxels that were never finite from ``grid``'s mask."""
    n_in_mask = stats.n_frames * grid.index.size
    fraction_nonfinite = run_stats.n_nonfinite / max(n_in_mask, 1)
    if run_stats.n_values == 0 or fraction_nonfinite > MAX_NONFINITE_FRACTION:
        raise InputDataError(f"{record.bold}: {fraction_nonfinite:.0%} of the in-mask values are NaN/Inf. "
                             "The run is unusable; re-run fMRIPrep for it or exclude it.")
    if run_stats.all_zero:
        raise InputDataError(f"{record.bold}: every value inside the brain mask is 0 (an all-zero run). "
                             "Re-run fMRIPrep for this run or exclude it.")
    if not (np.isfinite(run_stats.mean) and np.isfinite(run_stats.std)):
        raise InputDataError(f"{record.bold}: values too large to normalise (mean {run_stats.mean}, std "
                             f"{run_stats.std}); the file is probably corrupted. Re-run fMRIPrep for this run.")
    n_constant = int(run_stats.constant.sum())
    if n_constant >= int((~run_stats.all_invalid).sum()) or not run_stats.std > 0:
        raise InputDataError(f"{record.bold}: the signal never changes over time inside the brain mask "
                             f"(all {n_constant} in-mask voxels are constant). Re-run fMRIPrep for this run "
                             "or exclude it.")
    if n_constant:
        warnings.append(f"{n_constant} in-mask voxels are constant over time")
    if run_stats.n_nonfinite:
        warnings.append(f"{run_stats.n_nonfinite} in-mask values were NaN/Inf (set to the background)")
    if run_stats.all_invalid.any():
        warnings.append(f"{int(run_stats.all_invalid.sum())} in-mask voxels were NaN/Inf in every frame "
                        "and were removed from the mask")
        grid.flat = grid.flat.copy()
        grid.flat[grid.index[run_stats.all_invalid]] = False
        grid.model_mask = grid.flat.reshape(MODEL_SHAPE)


def _normalise(store: Float16FrameStore, data_tmp: Path, plan: TimePlan, normalize: Normalizer,
               has_nan: bool) -> list[np.ndarray]:
    """Write the z-scored output frames (in place in the store without time resampling); returns the preview."""
    preview: list[np.ndarray] = []
    if plan.identity:
        for m0, block in output_frames(store, plan):
            z = normalize(block, has_nan)
            preview.extend(z[:max(0, PREVIEW_FRAMES - len(preview))].copy())
            store.write(m0, z)
        return preview
    with open(data_tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                "shape": (len(plan), *MODEL_SHAPE)})
        for _, block in output_frames(store, plan):
            z = normalize(block, has_nan)
            preview.extend(z[:max(0, PREVIEW_FRAMES - len(preview))].copy())
            f.write(z.data)
    return preview


def stream_frames(record: RunRecord, inputs: RunInputs, grid: GridMask, data_path: Path,
                  background: float) -> FrameStats:
    """Read, check and normalise every frame into the model-ready array ``data_path`` (written atomically).

    Without time resampling the frame store is the output file itself, normalised in place; with it, the
    store is a temporary file next to it.

    Raises
    ------
    InputDataError
        The run is unusable (mostly NaN, all zero, constant, too large to normalise).
    """
    plan = inputs.plan
    spill = temporary_sibling(data_path.with_suffix(".f16"))
    with atomic_path(data_path) as data_tmp:
        store_path = data_tmp if plan.identity else spill
        try:
            with Float16FrameStore(store_path, inputs.kept_index.size,
                                   (len(plan), *MODEL_SHAPE) if plan.identity else None) as store:
                stats, codec, source_nonfinite, has_nan, sha256 = _read_frames(store, inputs, grid)
                run_stats = stats.finish()
                _check_stats(record, run_stats, stats, grid, inputs.warnings)
                if codec.clipped:
                    inputs.warnings.append(f"{codec.clipped} in-mask values lie over 250x the median intensity "
                                           "away from the first frame and were clipped")
                normalize = Normalizer(grid.flat, stats.reference, codec.scale, run_stats.mean, run_stats.std,
                                       background)
                preview = _normalise(store, data_tmp, plan, normalize, has_nan)
        finally:
            if not plan.identity:
                spill.unlink(missing_ok=True)
    return FrameStats(stats=stats, run=run_stats, codec=codec, source_nonfinite=source_nonfinite,
                      bold_sha256=sha256, preview=preview)


# ---------------------------------------------------------------------------- write


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def _write_images(record: RunRecord, paths: Mapping[str, Path], inputs: RunInputs, grid: GridMask,
                  frames: FrameStats, background: float) -> None:
    """Brain mask (+ sidecar), mean image and preview (+ sidecar) on the model grid."""
    eff_tr = inputs.plan.repetition_time
    write_brain_mask(dict(paths), grid.model_mask)
    save_model_grid_image(frames.run.voxel_mean.reshape(MODEL_SHAPE), paths["mean"])
    preview = np.stack(frames.preview).astype(np.float32).reshape(-1, *MODEL_SHAPE).transpose(1, 2, 3, 0)
    save_model_grid_image(np.ascontiguousarray(preview), paths["preview"], tr=eff_tr)
    atomic_write_json(paths["preview_json"], {
        "RepetitionTime": eff_tr, "TaskName": record.task, "SkullStripped": True, "Resolution": RESOLUTION,
        "Description": f"First {len(frames.preview)} model-ready frames: globally z-scored inside the brain mask, "
                       f"background {background}."})


def _qc_record(record: RunRecord, inputs: RunInputs, grid: GridMask, frames: FrameStats,
               voxel_labels: np.ndarray | None, groups: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    run_stats = frames.run
    fraction_nonfinite = run_stats.n_nonfinite / max(frames.stats.n_frames * grid.index.size, 1)
    return {
        "run_id": record.run_id,
        "tsnr_median": _round(run_stats.tsnr_median()),
        "framewise_displacement": framewise_displacement_summary(inputs.confounds.framewise_displacement,
                                                                 np.flatnonzero(~inputs.dropped)),
        "mask": {"model_voxels": int(grid.model_mask.sum()), "source_voxels": int(inputs.mask.sum()),
                 "share_in_model_grid": round(grid.share, 6)},
        "nonfinite": {"source_values_in_mask": frames.source_nonfinite,
                      "model_values_in_mask": run_stats.n_nonfinite, "fraction": round(fraction_nonfinite, 8)},
        "constant_voxels": int(run_stats.constant.sum()),
        "region_coverage": (region_coverage(grid.model_mask, voxel_labels, groups)
                            if voxel_labels is not None else None),
        "warnings": inputs.warnings,
    }


def _sources(record: RunRecord, bold_sha256: str) -> dict[str, Any]:
    sources = {"bold": {"path": str(record.bold), "size": Path(record.bold).stat().st_size, "sha256": bold_sha256},
               "mask": {"path": str(record.mask), "size": Path(record.mask).stat().st_size,
                        "sha256": sha256_file(record.mask)}}
    if record.confounds is not None:
        sources["confounds"] = {"path": str(record.confounds), "size": Path(record.confounds).stat().st_size,
                                "sha256": sha256_file(record.confounds)}
    return sources


def _sidecar(record: RunRecord, entities: Mapping[str, str], paths: Mapping[str, Path],
             parameters: Mapping[str, Any], fingerprint: str, inputs: RunInputs, grid: GridMask,
             frames: FrameStats, n_clips: int) -> dict[str, Any]:
    bold, plan, run_stats = inputs.bold, inputs.plan, frames.run
    note = None
    if record.space != MODEL_SPACE:
        note = (f"{record.space} was resampled onto the {MODEL_SPACE} grid by world coordinates "
                "(no template-to-template transform); the templates differ by a few mm.")
    return {
        "run_id": record.run_id,
        "entities": dict(entities), "generated_by": {"name": "regionmae", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": _sources(record, frames.bold_sha256),
        "source_space": record.space,
        "source_grid": {"shape": list(bold.shape), "affine": bold.affine.tolist(), "zooms": list(bold.zooms),
                        "dtype": str(bold.dtype)},
        "space": MODEL_SPACE, "resolution": MODEL_RES,
        "grid": {"shape": list(MODEL_SHAPE), "affine": MODEL_AFFINE.tolist(),
                 "layout": "(t, x, y, z) float16, C order: one frame is one contiguous block",
                 "resampling": {**grid.resampler.describe(), "interpolation": "trilinear (exact for 'crop')",
                                "mask": "trilinear > 0.5"},
                 "note": note},
        "repetition_time": plan.repetition_time,
        "original_repetition_time": inputs.tr,
        "frames": {"total": bold.n_frames, "dropped": np.flatnonzero(inputs.dropped).tolist(),
                   "kept": int(inputs.kept_index.size), "output": len(plan),
                   "time_resampled": not plan.identity,
                   "first_frame_seconds": float(plan.times[0]) if len(plan) else None},
        "normalization": {"method": "global z-score inside the brain mask (mean/std over all in-mask voxels "
                                    "and frames)", "mean": run_stats.mean, "std": run_stats.std,
                          "n_values": run_stats.n_values, "background_value": parameters["background_value"]},
        "nonfinite_values": run_stats.n_nonfinite,
        "constant_voxels": int(run_stats.constant.sum()),
        "clips": {"length": parameters["clip_length"], "stride": parameters["clip_stride"], "count": n_clips},
        "files": {name: paths[name].name for name in OUTPUT_FILES if name != "sidecar"},
        "parameters": dict(parameters),
        "inputs_fingerprint": fingerprint,
        "warnings": inputs.warnings,
    }


def write_outputs(record: RunRecord, entities: Mapping[str, str], paths: Mapping[str, Path],
                  parameters: Mapping[str, Any], fingerprint: str, inputs: RunInputs, grid: GridMask,
                  frames: FrameStats, voxel_labels: np.ndarray | None,
                  groups: Mapping[str, Sequence[int]] | None) -> None:
    """Mask, mean, preview, clip index, QC and, last (the completion marker), the sidecar."""
    _write_images(record, paths, inputs, grid, frames, parameters["background_value"])
    n_clips = write_clip_index(paths["clips"], len(inputs.plan), parameters["clip_length"],
                               parameters["clip_stride"], inputs.plan.times)
    atomic_write_json(paths["qc"], _qc_record(record, inputs, grid, frames, voxel_labels, groups))
    write_sidecar(paths["sidecar"], _sidecar(record, entities, paths, parameters, fingerprint, inputs, grid, frames,
                                             n_clips))
