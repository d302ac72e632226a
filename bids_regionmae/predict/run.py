"""Prediction for the runs of one participant: embeddings, outputs, region error, attribution, maps.

:func:`predict_run` goes through four named steps for one run:

1. *load* (:func:`bids_regionmae.predict.context.load_run`): the run's clips
   on the model's grid, atlas labels, output paths;
2. *infer* (:func:`infer`): embeddings, outputs (fine-tuned models) and the
   per-region reconstruction error (models with a masked autoencoder);
3. *attribute* (:func:`bids_regionmae.predict.explain.attribute_run`):
   occlusion and integrated gradients of the target output;
4. *write* (:mod:`bids_regionmae.predict.writers`): the per-run files listed
   in :mod:`bids_regionmae.outputs.naming`.

:func:`predict_participant` runs it for every run of a participant (a
failing run never stops the others) and writes the participant-level tables
(clip outputs averaged over all runs, as in fine-tuning; attribution pooled
over runs); :func:`predict_many` does so for several participants and
records their status logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bids_regionmae.predict.context import PredictSettings, RunContext, RunOutcome, load_run
from bids_regionmae.predict.inference import iter_run_batches, progress
from bids_regionmae.predict.writers import (
    write_attribution,
    write_embeddings,
    write_predictions,
    write_region_error,
    write_subject_tables,
)

if TYPE_CHECKING:
    from tqdm import tqdm

    from bids_regionmae.atlas import ModelGridAtlas
    from bids_regionmae.predict.models import PredictionModel
    from bids_regionmae.predict.regionerror import RegionErrorAccumulator
    from bids_regionmae.preprocess.store import ModelReadyRun

LOGGER = logging.getLogger(__name__)

__all__ = ["Inference", "PredictSettings", "RunOutcome", "infer", "predict_many", "predict_participant",
           "predict_run"]


@dataclass
class Inference:
    """What one pass over a run's clips gives.

    Attributes
    ----------
    embeddings : ndarray, shape (n_clips, C)
    outputs : ndarray, shape (n_clips, K), or None
        Fine-tuned models' clip outputs (float64).
    region_error : RegionErrorAccumulator or None
        Masked autoencoders' per-region reconstruction error.
    """

    embeddings: np.ndarray
    outputs: np.ndarray | None
    region_error: RegionErrorAccumulator | None


def infer(ctx: RunContext, bar: tqdm) -> Inference:
    """Embeddings, outputs and the per-region reconstruction error of every clip of the run."""
    from bids_regionmae.predict.regionerror import RegionErrorAccumulator

    model, settings = ctx.model, ctx.settings
    acc = None
    if model.mae is not None and settings.region_error:
        acc = RegionErrorAccumulator(ctx.labels, ctx.atlas.groups, model.spec.patch_size, rule=model.patch_rule,
                                     region_masking=settings.region_masking, example_group=model.example_group)
    embeddings: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    with torch.no_grad():  # not inference_mode: the pure-torch scan caches workspaces across calls
        for idx, x, brain in iter_run_batches(ctx.dataset, settings.batch_size, ctx.device):
            with ctx.autocast():
                embeddings.append(model.embed(x).float().cpu())
                if model.classify is not None:
                    outputs.append(model.classify(x, None).float().cpu())
            if acc is not None:
                acc.update(model.mae, x, brain, ctx.autocast)
            bar.update(len(idx))
    out = torch.cat(outputs).numpy().astype(np.float64) if outputs else None
    return Inference(torch.cat(embeddings).numpy(), out, acc)


def predict_run(run: ModelReadyRun, model: PredictionModel, atlas: ModelGridAtlas, output_dir: str | Path, *,
                settings: PredictSettings | None = None, device: torch.device | str = "cpu") -> RunOutcome:
    """Predict one model-ready run and write its outputs (load -> infer -> attribute -> write).

    Parameters
    ----------
    run : ModelReadyRun
    model : PredictionModel
        Already on ``device`` (:meth:`PredictionModel.to`).
    atlas : ModelGridAtlas
        Labels on the 96^3 store grid.
    output_dir : path
    settings : PredictSettings, optional
    device : torch.device or str

    Returns
    -------
    RunOutcome
        ``skipped`` when the run is shorter than one clip of the model; errors
        propagate (the caller records them).
    """
    from bids_regionmae.predict.explain import attribute_run

    settings = settings or PredictSettings()
    started = time.perf_counter()
    outcome = RunOutcome(run.run_id, run.subject, "done")
    ctx = load_run(run, model, atlas, Path(output_dir), settings, device)
    if ctx is None:
        outcome.status = "skipped"
        outcome.message = (f"{run.run_id}: {run.n_frames} frames, fewer than one clip of {model.spec.img_size[3]} "
                           f"frames for model {model.label}; run skipped")
        return outcome
    n = len(ctx.dataset)
    attribute = model.classify is not None and settings.attribution
    bar = progress(n * (2 if attribute else 1) + (settings.n_ig_clips(n) if attribute else 0), run.run_id,
                   settings.progress)
    try:
        result = infer(ctx, bar)
        outcome.n_clips = n
        written = write_embeddings(ctx, result.embeddings)
        target: int | None = None
        target_name = ""
        if result.outputs is not None:
            outcome.clip_outputs = result.outputs
            files, target, target_name = write_predictions(ctx, result.outputs)
            written += files
        if result.region_error is not None:
            written += write_region_error(ctx, result.region_error)
        if attribute and target is not None:
            explained = attribute_run(ctx, target, target_name, bar)
            outcome.attribution, outcome.n_ig_clips = explained.rows, explained.n_ig_clips
            written += write_attribution(ctx, explained)
    finally:
        bar.close()
    outcome.outputs = written
    outcome.seconds = time.perf_counter() - started
    return outcome


def predict_participant(subject: str, runs: Sequence[ModelReadyRun], model: PredictionModel, atlas: ModelGridAtlas,
                        output_dir: str | Path, *, settings: PredictSettings | None = None,
                        device: torch.device | str = "cpu") -> list[RunOutcome]:
    """Predict every run of a participant, then write the participant-level tables.

    Parameters
    ----------
    subject : str
    runs : sequence of ModelReadyRun
    model : PredictionModel
        On ``device``.
    atlas : ModelGridAtlas
    output_dir : path
    settings : PredictSettings, optional
    device : torch.device or str

    Returns
    -------
    list of RunOutcome
        One per run; a run that raised is ``failed`` with the error message.
    """
    settings = settings or PredictSettings()
    output_dir = Path(output_dir)
    outcomes = []
    for run in runs:
        started = time.perf_counter()
        try:
            outcome = predict_run(run, model, atlas, output_dir, settings=settings, device=device)
        except Exception as exc:  # one failing run never stops the others
            LOGGER.debug("prediction of %s failed", run.run_id, exc_info=True)
            outcome = RunOutcome(run.run_id, run.subject, "failed",
                                 f"{run.run_id}: prediction failed ({type(exc).__name__}: {exc})",
                                 time.perf_counter() - started)
        level = logging.WARNING if outcome.status == "failed" else logging.INFO
        LOGGER.log(level, "%s: %s (%.1f s) %s", outcome.run_id, outcome.status, outcome.seconds, outcome.message)
        outcomes.append(outcome)
    done = [o for o in outcomes if o.status == "done"]
    if done:
        write_subject_tables(subject, done, model, output_dir)
    return outcomes


def predict_many(runs: Mapping[str, Sequence[ModelReadyRun]], model: PredictionModel, atlas: ModelGridAtlas,
                 output_dir: str | Path, *, settings: PredictSettings | None = None,
                 device: torch.device | str = "cpu") -> dict[str, list[RunOutcome]]:
    """Predict several participants; a failing participant never stops the others.

    Every participant's outcomes are also merged into its status log
    (``logs/status/sub-<label>_predict-<M>.json``) for the reports.

    Parameters
    ----------
    runs : mapping of str to sequence of ModelReadyRun
        Participant label -> its runs.
    model, atlas, output_dir, settings, device
        As :func:`predict_participant`.

    Returns
    -------
    dict of str to list of RunOutcome
    """
    from bids_regionmae.outputs.status import record_status

    results: dict[str, list[RunOutcome]] = {}
    for subject, subject_runs in sorted(runs.items()):
        try:
            outcomes = predict_participant(subject, subject_runs, model, atlas, output_dir, settings=settings,
                                           device=device)
        except Exception as exc:  # a failing participant never stops the others
            LOGGER.exception("sub-%s: prediction failed", subject)
            outcomes = [RunOutcome(r.run_id, subject, "failed", f"sub-{subject}: {type(exc).__name__}: {exc}")
                        for r in subject_runs]
        results[subject] = outcomes
        try:
            record_status(output_dir, f"predict-{model.label}",
                          [{"run_id": o.run_id, "status": o.status, "message": o.message, "seconds": o.seconds}
                           for o in outcomes])
        except Exception as exc:  # noqa: BLE001 - a status log never fails the prediction
            LOGGER.warning("could not record the prediction status of sub-%s: %s", subject, exc)
    return results
