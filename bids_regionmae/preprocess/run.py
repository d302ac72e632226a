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

import numpy as np

from bids_regionmae.atomic import temporary_sibling
from bids_regionmae.bids.records import RunRecord
from bids_regionmae.errors import InputDataError, UsageError
from bids_regionmae.preprocess.qc import check_atlas
from bids_regionmae.preprocess.steps import map_mask, read_inputs, stream_frames, write_outputs
from bids_regionmae.preprocess.store import FORMAT_VERSION, load_model_ready_run, model_ready_paths

LOGGER = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = ("done", "skipped-complete", "skipped-short", "failed")


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
    """Read -> normalise -> write one run (see :mod:`bids_regionmae.preprocess.steps`)."""
    inputs = read_inputs(record, parameters)
    if isinstance(inputs, str):
        return RunResult("skipped-short", {}, inputs)
    grid = map_mask(record, inputs, parameters["resample_method"])
    frames = stream_frames(record, inputs, grid, paths["data"], parameters["background_value"])
    write_outputs(record, run_entities(record), paths, parameters, fingerprint, inputs, grid, frames, voxel_labels,
                  groups)
    return RunResult("done", dict(paths), "; ".join(inputs.warnings))


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
