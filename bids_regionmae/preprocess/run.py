"""Participant level: turn fMRIPrep runs into model-ready arrays in ``output_dir``.

For each :class:`~bids_regionmae.bids.records.RunRecord`:

1. open the BOLD run and its brain mask, check them (4-D, same grid, an MNI
   space), read the non-steady-state flags and FD from the confounds table;
2. stream frames through a reader thread (one pass over the file, sha256 on
   the way) and resample them onto the 96^3 model grid by world coordinates
   (:mod:`.resample`), accumulating per-voxel statistics;
3. park the frames as scaled float16 deviations in a file
   (:mod:`.framestore`): memory stays ~0.5 GB whatever the run length;
4. optionally interpolate linearly in time to ``target_tr``;
5. z-score with one global mean and std over all in-mask voxels and frames
   (NeuroSTORM), background set to ``background_value``, NaN/Inf counted and
   set to the background;
6. write the float16 ``(T, 96, 96, 96)`` array, mask, mean, preview, clip
   index and QC, and last the sidecar that marks the run complete.

Every file is written through :func:`bids_regionmae.atomic.atomic_path`, so an
interrupted run never leaves a half-written file under a final name (a killed
process's temporaries are removed by the next run); a rerun skips runs whose
sidecar holds the same inputs fingerprint (paths, sizes, mtimes, parameters).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import numbers
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bids_regionmae import __version__
from bids_regionmae.atomic import atomic_path, atomic_write_json, atomic_write_text, sha256_file, temporary_sibling
from bids_regionmae.bids.records import RunRecord
from bids_regionmae.errors import InputDataError, UsageError
from bids_regionmae.grid import MODEL_AFFINE, MODEL_RES, MODEL_SHAPE, MODEL_SPACE
from bids_regionmae.preprocess.framestore import DeltaCodec, Float16FrameStore
from bids_regionmae.preprocess.normalize import MAX_NONFINITE_FRACTION, Normalizer, StatsAccumulator
from bids_regionmae.preprocess.qc import check_atlas, framewise_displacement_summary, region_coverage
from bids_regionmae.preprocess.resample import SpatialResampler, TimePlan, time_plan
from bids_regionmae.preprocess.source import (
    FrameReader,
    check_mni,
    load_mask,
    open_bold,
    read_confounds,
)
from bids_regionmae.preprocess.store import (
    FORMAT,
    FORMAT_VERSION,
    OUTPUT_FILES,
    load_model_ready_run,
    model_ready_paths,
)

LOGGER = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = ("done", "skipped-complete", "skipped-short", "failed")
#: Frames written to the preview NIfTI.
PREVIEW_FRAMES = 5
_N_VOXELS = int(np.prod(MODEL_SHAPE))
_OUT_CHUNK = 4  # model-grid frames per chunk in the passes after reading (14 MB in float32)


@dataclass
class RunResult:
    """Outcome of preprocessing one run.

    Attributes
    ----------
    status : {"done", "skipped-complete", "skipped-short", "failed"}
    outputs : dict of str to Path
        Files of the run (keys of :data:`~bids_regionmae.preprocess.store.OUTPUT_FILES`);
        empty unless ``done`` or ``skipped-complete``.
    message : str
        Why a run was skipped or failed, or warnings of a done run.
    run_id : str
        e.g. ``sub-01_task-rest_run-1``.
    seconds : float
        Wall time spent on the run.
    """

    status: str
    outputs: dict[str, Path] = field(default_factory=dict)
    message: str = ""
    run_id: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Not failed."""
        return self.status != "failed"


# ------------------------------------------------------------------ parameters
def _check_parameters(*, target_tr: float | None, clip_length: int, clip_stride: int | None,
                      background_value: float,
                      voxel_labels: np.ndarray | None, groups: Mapping[str, Sequence[int]] | None,
                      resample_method: str = "auto", **_: Any) -> None:
    """Raise UsageError naming the bad parameter, what is allowed and what was given."""
    if target_tr is not None and not (isinstance(target_tr, numbers.Real) and np.isfinite(target_tr)
                                      and target_tr > 0):
        raise UsageError(f"target_tr must be a positive number of seconds or None, got {target_tr!r}")
    if isinstance(clip_length, bool) or not isinstance(clip_length, numbers.Integral) or clip_length < 1:
        raise UsageError(f"clip_length must be a positive integer, got {clip_length!r}")
    if clip_stride is not None and (isinstance(clip_stride, bool) or not isinstance(clip_stride, numbers.Integral)
                                    or clip_stride < 1):
        raise UsageError(f"clip_stride must be a positive integer or None (= clip_length), got {clip_stride!r}")
    if not isinstance(background_value, numbers.Real) or not np.isfinite(background_value):
        raise UsageError(f"background_value must be a finite number, got {background_value!r}")
    if resample_method not in ("auto", "separable", "grid_sample"):
        raise UsageError(f"resample_method must be 'auto', 'separable' or 'grid_sample', got {resample_method!r}")
    try:
        check_atlas(voxel_labels, groups)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _atlas_digest(voxel_labels: np.ndarray | None, groups: Mapping[str, Sequence[int]] | None) -> str | None:
    if voxel_labels is None:
        return None
    h = hashlib.sha256(np.ascontiguousarray(voxel_labels, dtype=np.int32).tobytes())
    h.update(json.dumps({str(k): [int(x) for x in v] for k, v in (groups or {}).items()},
                        sort_keys=True).encode())
    return h.hexdigest()


#: Short BIDS entity keys (as in ``RunRecord.acquisition``) -> the long names of the output patterns.
_LONG_NAMES = {"acq": "acquisition", "rec": "reconstruction", "dir": "direction", "echo": "echo",
               "ce": "ceagent", "part": "part", "chunk": "chunk"}


def run_entities(record: RunRecord) -> dict[str, str]:
    """The run's entities for output names, including those only given in ``record.acquisition``."""
    entities = dict(record.entities)
    for token in (record.acquisition or "").split("_"):
        key, _, value = token.partition("-")
        if key and value:
            entities.setdefault(_LONG_NAMES.get(key, key), value)
    return entities


def _output_paths(record: RunRecord, output_dir: str | Path) -> dict[str, Path]:
    paths = model_ready_paths(run_entities(record), output_dir)
    missing = set(record.run_id.split("_")) - set(paths["data"].name.split("_"))
    if missing:  # two runs would share output names
        raise InputDataError(f"{record.bold}: entities {sorted(missing)} cannot be written in output names "
                             "(the output patterns lack them). Select one of these runs with --bids-filter-file.")
    return paths


def inputs_fingerprint(record: RunRecord, parameters: dict[str, Any], atlas_digest: str | None = None) -> str:
    """Cheap fingerprint of a run's inputs: paths, sizes, mtimes, parameters.

    Parameters
    ----------
    record : RunRecord
    parameters : dict
        Processing parameters that change the outputs.
    atlas_digest : str, optional
        Hash of the atlas used for QC.

    Returns
    -------
    str
        sha256 hex digest; equal digests mean the outputs can be reused.
    """
    files: dict[str, Any] = {}
    for role, path in (("bold", record.bold), ("mask", record.mask), ("confounds", record.confounds)):
        if path is None:
            files[role] = None
            continue
        path = Path(path)
        try:
            st = path.stat()
            files[role] = [str(path.resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            files[role] = [str(path), None, None]
    payload = {"format_version": FORMAT_VERSION, "files": files, "parameters": parameters,
               "space": record.space, "repetition_time": record.repetition_time, "atlas": atlas_digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _complete(paths: dict[str, Path], fingerprint: str) -> bool:
    try:
        run = load_model_ready_run(paths["sidecar"])
    except (ValueError, KeyError, TypeError):
        return False
    if run.meta.get("inputs_fingerprint") != fingerprint:
        return False
    return all(p.is_file() for p in run.paths.values())


def _remove_stale_temporaries(paths: dict[str, Path]) -> None:
    """Delete temporary files of this run left by a killed process (pid no longer alive)."""
    for path in paths.values():
        stem = temporary_sibling(path).name.split(".tmp-")[0]
        for tmp in path.parent.glob(f"{glob_escape(stem)}.tmp-*"):
            match = re.search(r"\.tmp-(\d+)-", tmp.name)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    tmp.unlink()


def glob_escape(text: str) -> str:
    """Escape glob metacharacters."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- frames
def _output_frames(store: Float16FrameStore, plan: TimePlan,
                   chunk: int = _OUT_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(m0, deviations)``: the output frames as stored (scaled deviations), (n, V) float32.

    With time resampling each output frame is ``(1 - w) * a + w * b`` of two
    stored frames (linear, so it commutes with the scaling); NaN markers
    propagate where ``w > 0``. The yielded array is reused: use it before
    asking for the next chunk.
    """
    n_out = len(plan)
    raw = np.empty(0, np.float16)
    wide = np.empty(0, np.float32)
    interpolated = np.empty((chunk, _N_VOXELS), np.float32)
    for m0 in range(0, n_out, chunk):
        m1 = min(n_out, m0 + chunk)
        lo, hi = int(plan.index0[m0:m1].min()), int(plan.index1[m0:m1].max()) + 1
        size = (hi - lo) * _N_VOXELS
        if raw.size < size:  # buffers are reused: fresh large arrays cost page faults
            raw, wide = np.empty(size, np.float16), np.empty(size, np.float32)
        source = DeltaCodec.widen(store.read(lo, hi, out=raw[:size].reshape(hi - lo, -1)),
                                  out=wide[:size].reshape(hi - lo, -1))
        if plan.identity:
            yield m0, source
            continue
        out = interpolated[:m1 - m0]
        for m in range(m0, m1):
            a = source[plan.index0[m] - lo]
            w = float(plan.weight1[m])
            if w == 0.0:
                out[m - m0] = a
            else:
                np.multiply(a, np.float32(1.0 - w), out=out[m - m0])
                out[m - m0] += np.float32(w) * source[plan.index1[m] - lo]
        yield m0, out


# --------------------------------------------------------------------- writing
def _nifti(data: np.ndarray, tr: float | None = None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, MODEL_AFFINE)
    img.header.set_sform(MODEL_AFFINE, code=4)  # NIFTI_XFORM_MNI_152
    img.header.set_qform(MODEL_AFFINE, code=4)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = tr
        img.header.set_zooms(zooms)
    return img


def _save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _clip_table(n_frames: int, length: int, stride: int, times: np.ndarray) -> list[tuple[int, int, int, float]]:
    starts = range(0, n_frames - length + 1, stride)
    return [(i, s, length, float(times[s])) for i, s in enumerate(starts)]


_RESOLUTION = {MODEL_RES: "2 mm isotropic MNI152NLin6Asym grid cropped/padded to 96x96x96 "
                          "(NeuroSTORM input grid)"}


# ---------------------------------------------------------------------- public
def preprocess_run(record: RunRecord, output_dir: str | Path, *, voxel_labels: np.ndarray | None = None,
                   groups: Mapping[str, Sequence[int]] | None = None, target_tr: float | None = None,
                   clip_length: int = 20, clip_stride: int | None = None, drop_nonsteady: bool = True,
                   background_value: float = 0.0, overwrite: bool = False,
                   resample_method: str = "auto") -> RunResult:
    """Preprocess one run into model-ready files in ``output_dir``.

    Parameters
    ----------
    record : RunRecord
        The run (BOLD, brain mask, confounds, TR, space).
    output_dir : path
        Derivatives folder (see :func:`~bids_regionmae.outputs.derivatives.init_derivatives`).
    voxel_labels : ndarray, shape (96, 96, 96), int, optional
        Atlas labels on the model grid, for the region-coverage QC.
    groups : mapping of str to list of int, optional
        Region groups of ``voxel_labels`` (e.g. lobes) for the QC.
    target_tr : float, optional
        Resample linearly in time to this TR (s). None keeps the run's TR.
    clip_length : int
        Frames per clip (NeuroSTORM: 20). Runs with fewer frames are skipped.
    clip_stride : int, optional
        Frames between clip onsets; default ``clip_length`` (non-overlapping).
    drop_nonsteady : bool
        Drop frames flagged by ``non_steady_state_outlier*`` confounds.
    background_value : float
        Value of voxels outside the brain mask after normalisation.
    overwrite : bool
        Reprocess even when complete outputs with the same inputs exist.
    resample_method : {"auto", "separable", "grid_sample"}
        Spatial engine (:class:`~bids_regionmae.preprocess.resample.SpatialResampler`);
        "auto" takes the exact crop when the grids share a lattice. The others
        give the same values up to float rounding (for validation and benchmarks).

    Returns
    -------
    RunResult
        ``failed`` results carry the error message; nothing is raised for a
        bad run.

    Raises
    ------
    UsageError
        A parameter is invalid (the same for every run).
    """
    _check_parameters(target_tr=target_tr, clip_length=clip_length, clip_stride=clip_stride,
                      background_value=background_value,
                      voxel_labels=voxel_labels, groups=groups, resample_method=resample_method)
    started = time.perf_counter()
    run_id = record.run_id
    parameters = {"target_tr": target_tr, "clip_length": int(clip_length),
                  "clip_stride": int(clip_stride or clip_length), "drop_nonsteady": bool(drop_nonsteady),
                  "background_value": float(background_value), "resample_method": resample_method}
    try:
        paths = _output_paths(record, output_dir)
        fingerprint = inputs_fingerprint(record, parameters, _atlas_digest(voxel_labels, groups))
        if not overwrite and _complete(paths, fingerprint):
            return RunResult("skipped-complete", {k: p for k, p in paths.items() if p.is_file()},
                             "outputs complete and inputs unchanged", run_id, time.perf_counter() - started)
        # Withdraw an older result first: without its sidecar it is not "complete".
        paths["sidecar"].unlink(missing_ok=True)
        _remove_stale_temporaries(paths)
        with np.errstate(over="ignore", invalid="ignore"), _compute_threads():  # garbage values are reported
            result = _process(record, paths, parameters, fingerprint, voxel_labels, groups)
    except InputDataError as exc:
        result = RunResult("failed", {}, str(exc))
    except Exception as exc:  # one failing run never stops the others
        LOGGER.debug("unexpected error in %s", run_id, exc_info=True)
        result = RunResult("failed", {}, f"{record.bold}: unexpected {type(exc).__name__}: {exc}")
    result.run_id = run_id
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _compute_threads() -> Iterator[None]:
    """Leave one core to the reader thread (inflating the input) while torch computes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _process(record: RunRecord, paths: dict[str, Path], parameters: dict[str, Any], fingerprint: str,
             voxel_labels: np.ndarray | None, groups: Mapping[str, Sequence[int]] | None) -> RunResult:
    warnings: list[str] = []
    bold = open_bold(record.bold)
    mask_src = load_mask(record.mask, bold)
    check_mni(bold, mask_src, record.space)
    n_total = bold.n_frames

    tr = float(record.repetition_time) if record.repetition_time else float("nan")
    if not np.isfinite(tr) or tr <= 0:
        if bold.header_tr is None:
            raise InputDataError(f"{record.bold}: no repetition time in the run record nor in the NIfTI header. "
                                 "Add RepetitionTime to the BOLD JSON sidecar.")
        tr = bold.header_tr
    elif bold.header_tr is not None and abs(bold.header_tr - tr) > 0.01 * tr:
        warnings.append(f"RepetitionTime {tr} s (sidecar) differs from the NIfTI header's {bold.header_tr} s; "
                        "using the sidecar")

    confounds = read_confounds(record.confounds, n_total)
    dropped = confounds.nonsteady if parameters["drop_nonsteady"] else np.zeros(n_total, bool)
    kept_index = np.flatnonzero(~dropped)
    if dropped.any():
        first_kept = kept_index[0] if kept_index.size else n_total
        if np.any(np.flatnonzero(dropped) > first_kept):
            warnings.append("non-steady-state frames flagged after the start of the run were dropped too")
    plan = time_plan(kept_index * tr, tr, parameters["target_tr"])
    n_out = len(plan)
    clip_length = parameters["clip_length"]
    if n_out < clip_length:
        return RunResult("skipped-short", {}, (
            f"{record.bold}: {n_out} frames after dropping {int(dropped.sum())} non-steady-state frames"
            + (f" and resampling to TR {plan.repetition_time} s" if parameters["target_tr"] else "")
            + f", fewer than one clip of {clip_length}; run skipped (other runs go on). Lower --clip-length "
              "to use it."))

    method = parameters["resample_method"]
    if method == "separable" and SpatialResampler(bold.affine, bold.shape[:3]).method == "grid_sample":
        method = "grid_sample"  # oblique grids cannot be separated
    resampler = SpatialResampler(bold.affine, bold.shape[:3], method=method)
    model_mask = resampler.resample_mask(mask_src)
    voxel_volume = float(abs(np.linalg.det(bold.affine[:3, :3])))
    mask_share = float(model_mask.sum() * 8.0 / (mask_src.sum() * voxel_volume))
    if not model_mask.any():
        raise InputDataError(f"{record.mask}: the brain mask has no voxel on the model grid. Check the "
                             "space of the run.")
    if mask_share < 0.95:
        warnings.append(f"only {mask_share:.1%} of the brain mask volume falls inside the 96^3 model grid")
    mask_flat = model_mask.ravel()
    mask_index = np.flatnonzero(mask_flat)

    keep_all = ~dropped
    may_be_nonfinite = bold.dtype.kind == "f" or bold.slope != 1.0 or bold.inter != 0.0
    stats: StatsAccumulator | None = None
    fused = plan.identity  # statistics of the kept frames are those of the output
    source_nonfinite = 0
    has_nan = False
    codec: DeltaCodec | None = None
    spill = temporary_sibling(paths["data"].with_suffix(".f16"))
    background = parameters["background_value"]
    preview: list[np.ndarray] = []
    with atomic_path(paths["data"]) as data_tmp:
        # Without time resampling the store is the output file itself, normalised in place.
        store_path = data_tmp if plan.identity else spill
        try:
            with Float16FrameStore(store_path, kept_index.size,
                                   (n_out, *MODEL_SHAPE) if plan.identity else None) as store:
                k = 0
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
                            source_nonfinite += int(bad[:, mask_src].sum())
                            frames = np.where(bad, np.float32(0.0), frames)
                            bad_model = resampler(bad.astype(np.float32)).reshape(n, -1) > 0
                        # Deviations from the run's first frame (the reference of stats and storage).
                        out = scratch[:n]
                        if stats is None:
                            resampler(frames, out=out.reshape(n, *MODEL_SHAPE))
                            if bad_model is not None:
                                out[bad_model] = np.nan
                            stats = StatsAccumulator(out[0], mask_index)
                            codec = DeltaCodec(stats.reference, mask_index)
                            np.subtract(out, stats.reference, out=out)
                        else:
                            resampler(frames, out=out.reshape(n, *MODEL_SHAPE),
                                      subtract=stats.reference.reshape(MODEL_SHAPE))
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
                    for _, block in _output_frames(store, plan):
                        stats.add(np.multiply(block, np.float32(1.0 / codec.scale), out=block), has_nan)
                run_stats = stats.finish()
                mask_flat, model_mask = _check_stats(record, run_stats, stats, mask_index, mask_flat, warnings)
                if codec.clipped:
                    warnings.append(f"{codec.clipped} in-mask values lie over 250x the median intensity away "
                                    "from the first frame and were clipped")

                # ---------------------------------------------------- normalise
                normalize = Normalizer(mask_flat, stats.reference, codec.scale, run_stats.mean, run_stats.std,
                                       background)
                if plan.identity:
                    for m0, block in _output_frames(store, plan):
                        z = normalize(block, has_nan)
                        preview.extend(z[:max(0, PREVIEW_FRAMES - len(preview))].copy())
                        store.write(m0, z)
                else:
                    with open(data_tmp, "wb") as f:
                        np.lib.format.write_array_header_1_0(
                            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                "fortran_order": False, "shape": (n_out, *MODEL_SHAPE)})
                        for _, block in _output_frames(store, plan):
                            z = normalize(block, has_nan)
                            preview.extend(z[:max(0, PREVIEW_FRAMES - len(preview))].copy())
                            f.write(z.data)
        finally:
            if not plan.identity:
                spill.unlink(missing_ok=True)

    eff_tr = plan.repetition_time
    n_constant = int(run_stats.constant.sum())
    fraction_nonfinite = run_stats.n_nonfinite / max(stats.n_frames * mask_index.size, 1)
    _save_nifti(_nifti(model_mask.astype(np.uint8)), paths["mask"])
    atomic_write_json(paths["mask_json"], {
        "Type": "Brain", "Resolution": _RESOLUTION,
        "Description": "Brain mask of the run resampled onto the model grid (trilinear, > 0.5)."})
    _save_nifti(_nifti(run_stats.voxel_mean.reshape(MODEL_SHAPE)), paths["mean"])
    frames_preview = np.stack(preview).astype(np.float32).reshape(-1, *MODEL_SHAPE).transpose(1, 2, 3, 0)
    _save_nifti(_nifti(np.ascontiguousarray(frames_preview), tr=eff_tr), paths["preview"])
    atomic_write_json(paths["preview_json"], {
        "RepetitionTime": eff_tr, "TaskName": record.task, "SkullStripped": True, "Resolution": _RESOLUTION,
        "Description": f"First {len(preview)} model-ready frames: globally z-scored inside the brain mask, "
                       f"background {background}."})
    stride = parameters["clip_stride"]
    clips = _clip_table(n_out, clip_length, stride, plan.times)
    atomic_write_text(paths["clips"], "clip\tonset_frame\tn_frames\tonset_seconds\n" + "".join(
        f"{i}\t{s}\t{n}\t{t:.6g}\n" for i, s, n, t in clips))

    source_space_note = None
    if record.space != MODEL_SPACE:
        source_space_note = (f"{record.space} was resampled onto the {MODEL_SPACE} grid by world coordinates "
                             "(no template-to-template transform); the templates differ by a few mm.")
    qc = {
        "run_id": record.run_id,
        "tsnr_median": _round(run_stats.tsnr_median()),
        "framewise_displacement": framewise_displacement_summary(confounds.framewise_displacement,
                                                                 np.flatnonzero(~dropped)),
        "mask": {"model_voxels": int(model_mask.sum()), "source_voxels": int(mask_src.sum()),
                 "share_in_model_grid": round(mask_share, 6)},
        "nonfinite": {"source_values_in_mask": source_nonfinite, "model_values_in_mask": run_stats.n_nonfinite,
                      "fraction": round(fraction_nonfinite, 8)},
        "constant_voxels": n_constant,
        "region_coverage": (region_coverage(model_mask, voxel_labels, groups)
                            if voxel_labels is not None else None),
        "warnings": warnings,
    }
    atomic_write_json(paths["qc"], qc)

    sources = {"bold": {"path": str(record.bold), "size": Path(record.bold).stat().st_size,
                        "sha256": bold_sha256},
               "mask": {"path": str(record.mask), "size": Path(record.mask).stat().st_size,
                        "sha256": sha256_file(record.mask)}}
    if record.confounds is not None:
        sources["confounds"] = {"path": str(record.confounds), "size": Path(record.confounds).stat().st_size,
                                "sha256": sha256_file(record.confounds)}
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "run_id": record.run_id,
        "entities": run_entities(record),
        "generated_by": {"name": "regionmae", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources,
        "source_space": record.space,
        "source_grid": {"shape": list(bold.shape), "affine": bold.affine.tolist(),
                        "zooms": list(bold.zooms), "dtype": str(bold.dtype)},
        "space": MODEL_SPACE,
        "resolution": MODEL_RES,
        "grid": {"shape": list(MODEL_SHAPE), "affine": MODEL_AFFINE.tolist(),
                 "layout": "(t, x, y, z) float16, C order: one frame is one contiguous block",
                 "resampling": {**resampler.describe(), "interpolation": "trilinear (exact for 'crop')",
                                "mask": "trilinear > 0.5"},
                 "note": source_space_note},
        "repetition_time": eff_tr,
        "original_repetition_time": tr,
        "frames": {"total": n_total, "dropped": np.flatnonzero(dropped).tolist(),
                   "kept": int(kept_index.size), "output": n_out,
                   "time_resampled": not plan.identity,
                   "first_frame_seconds": float(plan.times[0]) if n_out else None},
        "normalization": {"method": "global z-score inside the brain mask (mean/std over all in-mask voxels "
                                    "and frames)", "mean": run_stats.mean, "std": run_stats.std,
                          "n_values": run_stats.n_values, "background_value": background},
        "nonfinite_values": run_stats.n_nonfinite,
        "constant_voxels": n_constant,
        "clips": {"length": clip_length, "stride": stride, "count": len(clips)},
        "files": {name: paths[name].name for name in OUTPUT_FILES if name != "sidecar"},
        "parameters": parameters,
        "inputs_fingerprint": fingerprint,
        "warnings": warnings,
    }
    atomic_write_json(paths["sidecar"], sidecar)  # last: marks the run complete
    return RunResult("done", dict(paths), "; ".join(warnings))


def _check_stats(record: RunRecord, run_stats, stats: StatsAccumulator, mask_index: np.ndarray,
                 mask_flat: np.ndarray, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Refuse unusable runs; returns the mask without voxels that were never finite."""
    n_in_mask = stats.n_frames * mask_index.size
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
        mask_flat = mask_flat.copy()
        mask_flat[mask_index[run_stats.all_invalid]] = False
    return mask_flat, mask_flat.reshape(MODEL_SHAPE)


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


# ------------------------------------------------------------------ many runs
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=logging.WARNING)


def preprocess_runs(records: Iterable[RunRecord], output_dir: str | Path, *, nprocs: int = 1,
                    progress: bool = True, **kwargs: Any) -> list[RunResult]:
    """Preprocess many runs, optionally in parallel processes.

    Parameters
    ----------
    records : iterable of RunRecord
    output_dir : path
    nprocs : int
        Worker processes (spawned, so a calling script needs an
        ``if __name__ == "__main__":`` guard; each uses ``cpu_count // nprocs``
        torch threads; memory stays ~0.5 GB per worker whatever the run length).
    progress : bool
        Show a tqdm bar (only on a terminal).
    **kwargs
        Passed to :func:`preprocess_run`.

    Returns
    -------
    list of RunResult
        In the order of ``records``; a failing run (even a crashed worker)
        becomes a ``failed`` result and the others go on.

    Raises
    ------
    UsageError
        Invalid parameters (checked once, before any run starts).
    """
    from tqdm.auto import tqdm

    records = list(records)
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise UsageError(f"nprocs must be a positive integer, got {nprocs!r}")
    unknown = set(kwargs) - {"voxel_labels", "groups", "target_tr", "clip_length", "clip_stride",
                             "drop_nonsteady", "background_value", "overwrite", "resample_method"}
    if unknown:
        raise UsageError(f"unknown preprocessing parameter(s) {sorted(unknown)}")
    defaults = {"target_tr": None, "clip_length": 20, "clip_stride": None, "background_value": 0.0,
                "voxel_labels": None, "groups": None}
    _check_parameters(**{**defaults, **kwargs})
    results: list[RunResult | None] = [None] * len(records)
    bar = tqdm(total=len(records), desc="preprocess", unit="run",
               disable=not progress or not sys.stderr.isatty())

    def finished(i: int, result: RunResult) -> None:
        results[i] = result
        level = logging.WARNING if result.status == "failed" else logging.INFO
        LOGGER.log(level, "%s: %s (%.1f s) %s", result.run_id, result.status, result.seconds, result.message)
        bar.update()

    try:
        if nprocs == 1 or len(records) <= 1:
            for i, record in enumerate(records):
                finished(i, preprocess_run(record, output_dir, **kwargs))
        else:
            threads = max(1, (os.cpu_count() or 1) // nprocs)
            with ProcessPoolExecutor(max_workers=min(nprocs, len(records)),
                                     mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(threads,)) as pool:
                futures = {pool.submit(preprocess_run, record, output_dir, **kwargs): i
                           for i, record in enumerate(records)}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        result = future.result()
                    except Exception as exc:  # a worker died (e.g. killed for memory)
                        result = RunResult("failed", {}, (
                            f"{records[i].bold}: worker failed ({type(exc).__name__}: {exc}). Workers are "
                            "spawned: a script calling preprocess_runs(nprocs > 1) needs an "
                            "`if __name__ == '__main__':` guard; a killed worker may have run out of memory."),
                            records[i].run_id)
                    finished(i, result)
    finally:
        bar.close()
    return [r for r in results if r is not None]
