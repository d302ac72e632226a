"""The *write* step of prediction: every table, map and figure of a run and of a participant.

Names come from :mod:`bids_regionmae.outputs.naming` (through
:attr:`RunContext.paths <bids_regionmae.predict.context.RunContext.paths>`),
TSVs go through :func:`bids_regionmae.outputs.tables.write_table`, NIfTI
maps through :func:`bids_regionmae.predict.maps.save_map`, figures through
:func:`bids_regionmae.outputs.figures.safe_figure`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from bids_regionmae.evaluation.metrics import sigmoid, softmax
from bids_regionmae.outputs.naming import subject_paths
from bids_regionmae.outputs.tables import write_table
from bids_regionmae.predict.models import PredictionModel, output_names

if TYPE_CHECKING:
    from bids_regionmae.predict.context import RunContext, RunOutcome
    from bids_regionmae.predict.explain import RunAttribution
    from bids_regionmae.predict.regionerror import RegionErrorAccumulator

__all__ = ["PredictionTable", "prediction_table", "probabilities", "target_column", "write_attribution",
           "write_embeddings", "write_predictions", "write_region_error", "write_subject_tables"]

ATTRIBUTION_COLUMNS = ["region", "index", "group", "level", "n_voxels", "occlusion_importance", "occlusion_sd",
                       "ig_mean_abs", "ig_sum", "n_clips", "n_ig_clips"]
REGION_ERROR_COLUMNS = ["region", "index", "group", "level", "masking", "n_voxels", "n_masked_values", "mse",
                        "mean_abs_error", "n_clips"]


class PredictionTable(NamedTuple):
    """Rows of an output table (one per clip, run or participant) with their columns and descriptions."""

    rows: list[dict[str, Any]]
    columns: list[str]
    descriptions: dict[str, str]


# ----------------------------------------------------------------------------- outputs -> rows


def _column(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(name)).strip("_") or "x"


def probabilities(outputs: np.ndarray, task_kind: str | None) -> np.ndarray | None:
    """Class probabilities from logits.

    Parameters
    ----------
    outputs : ndarray, shape (N, K)
    task_kind : str or None

    Returns
    -------
    ndarray, shape (N, K) or (N, 2) for one binary logit; None for regression.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if task_kind == "regression" or (task_kind is None and outputs.shape[1] == 1):
        return None
    if outputs.shape[1] == 1:
        p = sigmoid(outputs[:, 0])
        return np.stack([1.0 - p, p], axis=1)
    return softmax(outputs, axis=1)


def _class_names(model: PredictionModel, n_outputs: int) -> list[str]:
    if n_outputs == 1:
        names = model.class_names or []
        return [str(c) for c in names] if len(names) == 2 else ["negative", "positive"]
    return output_names(model, n_outputs)


def target_column(model: PredictionModel, mean_outputs: np.ndarray) -> int:
    """Output column that attribution explains.

    One output (binary logit or regression): 0; two-class logits: 1 (the
    positive class); more classes: the run's predicted class.
    """
    k = int(mean_outputs.shape[-1])
    if k == 1:
        return 0
    if k == 2 and model.task_kind in (None, "binary"):
        return 1
    return int(np.argmax(mean_outputs))


def prediction_table(model: PredictionModel, outputs: np.ndarray) -> PredictionTable:
    """Output columns for rows of ``outputs`` (N, K): logits, probabilities and predicted class, or values."""
    k = outputs.shape[1]
    rows: list[dict[str, Any]] = [{} for _ in range(outputs.shape[0])]
    columns: list[str] = []
    desc: dict[str, str] = {}
    probs = probabilities(outputs, model.task_kind)
    if probs is None:
        for j, name in enumerate(output_names(model, k)):
            col = _column(name) if k > 1 else "prediction"
            columns.append(col)
            desc[col] = f"Predicted {model.target or 'target'}" + (" (in the target's units)"
                                                                   if model.output_scale else "")
            for i, row in enumerate(rows):
                value = float(outputs[i, j])
                if model.output_scale:
                    value = value * model.output_scale[1] + model.output_scale[0]
                row[col] = value
        return PredictionTable(rows, columns, desc)
    for j, name in enumerate(output_names(model, k)):
        col = f"logit_{_column(name)}"
        columns.append(col)
        desc[col] = f"Model output (logit) for {name}"
        for i, row in enumerate(rows):
            row[col] = float(outputs[i, j])
    classes = _class_names(model, k)
    for j, name in enumerate(classes):
        col = f"prob_{_column(name)}"
        columns.append(col)
        desc[col] = f"Probability of class {name} (softmax of the logits; sigmoid for one logit)"
        for i, row in enumerate(rows):
            row[col] = float(probs[i, j])
    columns.append("predicted")
    desc["predicted"] = "Class with the highest probability"
    for i, row in enumerate(rows):
        row["predicted"] = classes[int(np.argmax(probs[i]))]
    return PredictionTable(rows, columns, desc)


# ----------------------------------------------------------------------------- one run


def write_embeddings(ctx: RunContext, emb: np.ndarray) -> list[Path]:
    """``*_embeddings.tsv``: one row per clip and a mean row (``emb`` (n_clips, C))."""
    refs = ctx.dataset.clips
    columns = ["clip", "onset_frame", "n_frames"] + [f"emb_{i:04d}" for i in range(emb.shape[1])]
    rows = [{"clip": r.clip_index, "onset_frame": r.start, "n_frames": r.stop - r.start,
             **{f"emb_{i:04d}": float(v) for i, v in enumerate(emb[j])}} for j, r in enumerate(refs)]
    rows.append({"clip": "mean", "onset_frame": None, "n_frames": sum(r.stop - r.start for r in refs),
                 **{f"emb_{i:04d}": float(v) for i, v in enumerate(emb.mean(0))}})
    return write_table(ctx.paths["embeddings_tsv"], rows, columns, json_path=ctx.paths["embeddings_json"],
                       descriptions={
                           "clip": "Clip index within the run (see the clip index of the model-ready run); 'mean': "
                                   "the run's mean embedding",
                           "onset_frame": "First frame of the clip", "n_frames": "Frames of the clip",
                           "emb_0000": "Embedding dimensions emb_0000.. : encoder output tokens mean-pooled over "
                                       "space and time"},
                       sidecar={**ctx.common, "Description": "Clip embeddings of the encoder and their mean over the "
                                                             "run."})


def write_predictions(ctx: RunContext, out: np.ndarray) -> tuple[list[Path], int, str]:
    """``*_predictions.tsv``: outputs per clip (``out`` (n_clips, K)); returns the files and the attribution target.

    Returns
    -------
    written : list of Path
    target : int
        Output column attribution explains (:func:`target_column` of the run's mean output).
    target_name : str
    """
    model, refs = ctx.model, ctx.dataset.clips
    table = prediction_table(model, out)
    for r, ref in zip(table.rows, refs, strict=True):
        r.update({"clip": ref.clip_index, "onset_frame": ref.start, "n_frames": ref.stop - ref.start})
    mean_out = out.mean(0, keepdims=True)
    summary = prediction_table(model, mean_out).rows[0]
    target = target_column(model, mean_out[0])
    names = output_names(model, out.shape[1])
    target_name = names[target] if target < len(names) else str(target)
    written = write_table(ctx.paths["predictions_tsv"], table.rows, ["clip", "onset_frame", "n_frames"] + table.columns,
                          json_path=ctx.paths["predictions_json"],
                          descriptions={"clip": "Clip index within the run", "onset_frame": "First frame",
                                        "n_frames": "Frames of the clip", **table.descriptions},
                          sidecar={**ctx.common, "Description": "Model outputs per clip; RunSummary averages the "
                                                                "clip outputs (logits) over the run.",
                                   "RunSummary": {"n_clips": len(refs), **summary}, "AttributionTarget": target_name})
    return written, target, target_name


def _region_error_table(ctx: RunContext, acc: RegionErrorAccumulator) -> list[Path]:
    return write_table(ctx.paths["regionerror_tsv"], acc.rows(ctx.atlas.names, ctx.brain), REGION_ERROR_COLUMNS,
                       json_path=ctx.paths["regionerror_json"], descriptions={
                           "region": "Lobe group or AAL3 region name",
                           "index": "AAL3 label index (n/a for groups)",
                           "group": "Lobe group of the region",
                           "level": "group: all regions of a lobe group pooled; region: one AAL3 region",
                           "masking": "What was masked: the region's lobe group, or the region alone",
                           "n_voxels": "In-brain voxels of the region on the model's grid",
                           "n_masked_values": "Voxel x frame values of the region in masked patches, pooled over "
                                              "clips",
                           "mse": "Mean squared reconstruction error of masked in-brain voxels (z-scored units)",
                           "mean_abs_error": "Mean absolute reconstruction error of the same voxels",
                           "n_clips": "Clips pooled"},
                       sidecar={**ctx.common, "Description": "Per-region reconstruction error of the masked "
                                                             "autoencoder when each lobe group (and optionally each "
                                                             "region) is masked in every frame.",
                                "PatchRule": ctx.model.patch_rule})


def _input_space_maps(ctx: RunContext, recon96: np.ndarray, error96: np.ndarray, tr: float) -> list[Path]:
    """The reconstruction and error maps resampled onto the run's source grid."""
    from bids_regionmae.predict.maps import save_map, to_input_space

    run, grid, written = ctx.run, ctx.run.meta["source_grid"], []
    for key, data, kwargs in (("recon_input", recon96, {"tr": tr, "int16": True}), ("errormap_input", error96, {})):
        resampled, affine = to_input_space(data, grid["affine"], grid["shape"])
        side = {"Description": f"{key.split('_')[0]} map resampled (trilinear, world coordinates) onto the run's "
                               f"source grid ({ctx.source_space})", "Sources": ctx.common["Sources"],
                "Model": ctx.common["Model"]}
        if key == "recon_input":
            side.update({"RepetitionTime": tr, "TaskName": run.entities.get("task"), "SkullStripped": True,
                         "SpatialReference": str(((run.meta.get("sources") or {}).get("bold") or {}).get("path")
                                                 or f"the source BOLD grid ({ctx.source_space})")})
        written += save_map(ctx.paths[f"{key}_nii"], resampled, side, json_path=ctx.paths[f"{key}_json"],
                            affine=affine, **kwargs)
    return written


def write_region_error(ctx: RunContext, acc: RegionErrorAccumulator) -> list[Path]:
    """``*_regionerror.tsv``, the composite reconstruction and error maps (model grid, optionally source grid)
    and the reconstruction figure."""
    from bids_regionmae.outputs.figures import draw_reconstruction, safe_figure
    from bids_regionmae.predict.maps import save_map, upsample_to_store

    run, common, factors = ctx.run, ctx.common, ctx.factors
    written = _region_error_table(ctx, acc)
    tr = float(run.repetition_time)
    grid_note = (f"computed on the model's {tuple(ctx.model.spec.img_size[:3])} grid (store average-pooled by "
                 f"{tuple(factors)}) and repeated back onto the 96^3 grid")
    recon96 = upsample_to_store(acc.composite(), factors)
    error96 = upsample_to_store(acc.error_map(), factors)
    written += save_map(ctx.paths["recon_nii"], recon96, {
        "Description": "Composite reconstruction of the first clip: each voxel holds the reconstruction from the "
                       "pass in which its lobe group was masked (the input elsewhere); " + grid_note,
        "RepetitionTime": tr, "TaskName": run.entities.get("task"), "SkullStripped": True,
        "Resolution": {"2": "2 mm MNI152NLin6Asym grid cropped/padded to 96x96x96"},
        "SpatialReference": "https://templateflow.s3.amazonaws.com/tpl-MNI152NLin6Asym/"
                            "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz",
        "Sources": common["Sources"], "Model": common["Model"]}, json_path=ctx.paths["recon_json"], tr=tr, int16=True)
    written += save_map(ctx.paths["errormap_nii"], error96, {
        "Description": "Mean absolute reconstruction error of masked in-brain voxels (over frames and clips) when "
                       "their lobe group is masked; 0 where never masked; " + grid_note,
        "Units": "z-scored BOLD", "Sources": common["Sources"], "Model": common["Model"]},
                        json_path=ctx.paths["errormap_json"])
    if ctx.source_space:
        written += _input_space_maps(ctx, recon96, error96, tr)
    if acc.example is not None:
        figure = safe_figure(ctx.paths["figure_recon"], draw_reconstruction, acc.example,
                             f"{run.run_id}: {acc.example['group']} masked (frame 0; masked voxels blank)",
                             figsize=(8, 8))
        if figure is not None:
            written.append(figure)
    return written


def write_attribution(ctx: RunContext, result: RunAttribution) -> list[Path]:
    """``*_attribution.tsv`` (occlusion + integrated gradients per group and region) and the IG map."""
    from bids_regionmae.predict.maps import save_map, upsample_to_store

    settings, common = ctx.settings, ctx.common
    written = write_table(ctx.paths["attribution_tsv"], result.rows, ATTRIBUTION_COLUMNS,
                          json_path=ctx.paths["attribution_json"], descriptions={
                              "region": "Lobe group or AAL3 region name",
                              "index": "AAL3 label index (n/a for groups)",
                              "group": "Lobe group", "level": "group or region",
                              "n_voxels": "In-brain voxels on the model's grid",
                              "occlusion_importance": "Mean over clips of f(x) - f(x with the region occluded in every "
                                                      "frame), f the target output (logit): positive = evidence for "
                                                      "the target",
                              "occlusion_sd": "Standard deviation of the occlusion importance over clips",
                              "ig_mean_abs": "Integrated gradients: mean over voxels of the frame-averaged absolute "
                                             "attribution, averaged over clips",
                              "ig_sum": "Integrated gradients: signed sum over the region's voxels and frames, "
                                        "averaged over clips",
                              "n_clips": "Clips with occlusion", "n_ig_clips": "Clips with integrated gradients"},
                          sidecar={**common, "Description": "Region attribution of the fine-tuned model's output.",
                                   "TargetOutput": {"column": result.target, "name": result.target_name},
                                   "Occlusion": {"mode": result.mode, "background_value": ctx.background,
                                                 "note": result.note,
                                                 "units": "lobe groups" + (" and regions"
                                                                           if settings.occlusion_regions else "")},
                                   "IntegratedGradients": {"steps": settings.ig_steps, "baseline": "zeros",
                                                           "rule": "midpoint Riemann sum",
                                                           "completeness": result.gaps}})
    if result.ig_abs_map is not None:
        ig96 = upsample_to_store(result.ig_abs_map / result.n_ig_clips, ctx.factors)
        written += save_map(ctx.paths["igmap_nii"], ig96, {
            "Description": "Mean absolute integrated-gradients attribution per voxel (over frames and clips)",
            "Sources": common["Sources"], "Model": common["Model"], "TargetColumn": result.target},
                            json_path=ctx.paths["igmap_json"])
    return written


# ----------------------------------------------------------------------------- one participant


def _pool_attribution(outcomes: Sequence[RunOutcome]) -> list[dict[str, Any]]:
    """Attribution rows pooled over runs (clip-weighted means)."""
    with_attr = [o for o in outcomes if o.attribution]
    keys = [(r["level"], r["region"]) for r in with_attr[0].attribution]
    pooled = []
    for key in keys:
        matches = [(o, r) for o in with_attr for r in o.attribution if (r["level"], r["region"]) == key]
        base = dict(matches[0][1])
        for column, weight in (("occlusion_importance", "n_clips"), ("ig_mean_abs", "n_ig_clips"),
                               ("ig_sum", "n_ig_clips")):
            values = [(float(r[column]), float(r[weight])) for _, r in matches
                      if isinstance(r[column], float) and math.isfinite(r[column]) and r[weight]]
            total = sum(w for _, w in values)
            base[column] = sum(v * w for v, w in values) / total if total else math.nan
        base["n_clips"] = int(sum(r["n_clips"] for _, r in matches))
        base["n_ig_clips"] = int(sum(r["n_ig_clips"] for _, r in matches))
        base["n_runs"] = len(matches)
        base.pop("occlusion_sd", None)
        pooled.append(base)
    return pooled


def write_subject_tables(subject: str, outcomes: Sequence[RunOutcome], model: PredictionModel,
                         output_dir: str | Path) -> list[Path]:
    """Participant-level predictions (clip outputs averaged over all runs) and attribution (pooled over runs).

    Returns
    -------
    list of Path
    """
    paths = subject_paths(subject, model.label, output_dir)
    written: list[Path] = []
    info = {"Model": model.describe(), "Runs": [o.run_id for o in outcomes]}
    clip_outputs = [o.clip_outputs for o in outcomes if o.clip_outputs is not None and len(o.clip_outputs)]
    if clip_outputs:
        allclips = np.concatenate(clip_outputs)
        table = prediction_table(model, allclips.mean(0, keepdims=True))
        row = {"participant_id": f"sub-{subject}", "n_runs": len(clip_outputs), "n_clips": int(allclips.shape[0]),
               **table.rows[0]}
        written += write_table(paths["predictions_tsv"], [row], ["participant_id", "n_runs", "n_clips"] + table.columns,
                               json_path=paths["predictions_json"],
                               descriptions={"participant_id": "Participant", "n_runs": "Runs pooled",
                                             "n_clips": "Clips pooled", **table.descriptions},
                               sidecar={**info, "Description": "Participant-level prediction: the clip outputs "
                                                               "(logits) of all runs averaged, as in fine-tuning."})
    if any(o.attribution for o in outcomes):
        written += write_table(paths["attribution_tsv"], _pool_attribution(outcomes),
                               ["region", "index", "group", "level", "n_voxels", "occlusion_importance", "ig_mean_abs",
                                "ig_sum", "n_clips", "n_ig_clips", "n_runs"], json_path=paths["attribution_json"],
                               descriptions={"occlusion_importance": "Clip-weighted mean over runs of the run "
                                                                     "attribution tables",
                                             "ig_mean_abs": "Clip-weighted mean over runs",
                                             "ig_sum": "Clip-weighted mean over runs", "n_runs": "Runs pooled"},
                               sidecar={**info, "Description": "Participant-level region attribution pooled over "
                                                               "runs."})
    return written
