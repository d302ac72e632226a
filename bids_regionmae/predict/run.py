"""Prediction for the runs of one participant: embeddings, outputs, region error, attribution, maps.

:func:`predict_run` writes the per-run files listed in
:mod:`bids_regionmae.outputs.naming`; :func:`predict_participant` runs it for
every run of a participant (a failing run never stops the others) and writes
the participant-level tables (clip outputs averaged over all runs, as in
fine-tuning; attribution pooled over runs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bids_regionmae.atlas import ModelGridAtlas
from bids_regionmae.outputs.naming import run_output_paths, subject_paths
from bids_regionmae.outputs.tables import write_table
from bids_regionmae.predict.attribution import integrated_gradients, occlusion, project_onto_regions
from bids_regionmae.predict.inference import autocast_factory, iter_run_batches, progress
from bids_regionmae.predict.models import PredictionModel, output_names

LOGGER = logging.getLogger(__name__)

__all__ = ["PredictSettings", "RunOutcome", "predict_many", "predict_participant", "predict_run", "probabilities"]


@dataclass(frozen=True)
class PredictSettings:
    """What to compute and how.

    Attributes
    ----------
    batch_size : int
        Clips per forward pass.
    precision : {'auto', 'bf16', 'fp32'}
        ``auto``: bf16 autocast on CUDA, fp32 on CPU.
    region_error : bool
        Per-region reconstruction error with the MAE (when there is one).
    region_masking : bool
        Also mask every AAL3 region on its own (one pass per region and clip).
    attribution : bool
        Occlusion + integrated gradients (fine-tuned models).
    occlusion_mode : {'zero', 'mask-token'}
        Replace a region's voxels by the background value, or its patches by
        the model's mask token (needs a classifier that takes token masks).
    occlusion_regions : bool
        Occlude every region on its own too (else lobe groups only).
    ig_steps : int
        Integrated-gradients path points.
    ig_batch_size : int
        Path points per forward/backward pass.
    ig_max_clips : int or None
        Clips per run that get integrated gradients (None: all).
    input_space : bool
        Also write the reconstruction and error maps on the run's source grid.
    progress : bool
        tqdm bar per run (on a terminal).
    """

    batch_size: int = 2
    precision: str = "auto"
    region_error: bool = True
    region_masking: bool = False
    attribution: bool = True
    occlusion_mode: str = "zero"
    occlusion_regions: bool = False
    ig_steps: int = 16
    ig_batch_size: int = 4
    ig_max_clips: int | None = 4
    input_space: bool = False
    progress: bool = True

    @classmethod
    def from_config(cls, config: Any) -> PredictSettings:
        """Settings from a :class:`~bids_regionmae.config.RunConfig`.

        ``train.batch_size`` and ``train.precision`` are used; every field of
        an optional ``predict`` section with a matching name overrides the
        defaults.
        """
        values: dict[str, Any] = {}
        train = getattr(config, "train", None)
        if train is not None:
            values["batch_size"] = int(getattr(train, "batch_size", cls.batch_size))
            values["precision"] = str(getattr(train, "precision", cls.precision))
        section = getattr(config, "predict", None)
        if section is not None:
            names = {f.name for f in dataclasses.fields(cls)}
            dumped = section.model_dump() if hasattr(section, "model_dump") else dict(vars(section))
            values.update({k: v for k, v in dumped.items() if k in names})
        return cls(**values)


@dataclass
class RunOutcome:
    """Result of predicting one run.

    Attributes
    ----------
    run_id, subject : str
    status : {'done', 'skipped', 'failed'}
    message : str
    seconds : float
    outputs : list of Path
    clip_outputs : ndarray, shape (n_clips, K), optional
        Clip logits / regression outputs (fine-tuned models).
    attribution : list of dict
        The run's attribution rows.
    n_clips : int
    """

    run_id: str
    subject: str
    status: str
    message: str = ""
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    clip_outputs: np.ndarray | None = None
    attribution: list[dict[str, Any]] = field(default_factory=list)
    n_clips: int = 0
    n_ig_clips: int = 0


# ----------------------------------------------------------------------------- helpers


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
        p = 1.0 / (1.0 + np.exp(-outputs[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    z = outputs - outputs.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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


def _prediction_rows(model: PredictionModel, outputs: np.ndarray) -> tuple[list[dict[str, Any]], list[str],
                                                                          dict[str, str]]:
    """Columns of the output tables, for clip rows or an aggregated row."""
    k = outputs.shape[1]
    rows: list[dict[str, Any]] = [{} for _ in range(outputs.shape[0])]
    columns: list[str] = []
    desc: dict[str, str] = {}
    probs = probabilities(outputs, model.task_kind)
    if probs is None:
        names = output_names(model, k)
        for j, name in enumerate(names):
            col = _column(name) if k > 1 else "prediction"
            columns.append(col)
            desc[col] = f"Predicted {model.target or 'target'}" + (" (in the target's units)"
                                                                   if model.output_scale else "")
            for i, row in enumerate(rows):
                value = float(outputs[i, j])
                if model.output_scale:
                    value = value * model.output_scale[1] + model.output_scale[0]
                row[col] = value
        return rows, columns, desc
    out_names = output_names(model, k)
    for j, name in enumerate(out_names):
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
    return rows, columns, desc


def _relative(path: Path, output_dir: Path) -> str:
    try:
        return "bids::" + Path(path).resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _region_voxel_maps(labels_m: torch.Tensor, groups: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, labels in groups.items():
        vox = torch.isin(labels_m, torch.as_tensor(list(labels), dtype=labels_m.dtype))
        if bool(vox.any()):
            out[name] = vox
    return out


# ----------------------------------------------------------------------------- one run


def predict_run(run: Any, model: PredictionModel, atlas: ModelGridAtlas, output_dir: str | Path, *,
                settings: PredictSettings | None = None, device: torch.device | str = "cpu") -> RunOutcome:
    """Predict one model-ready run and write its outputs.

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
    from bids_regionmae.outputs.figures import draw_reconstruction, safe_figure
    from bids_regionmae.predict.maps import save_map, to_input_space, upsample_to_store
    from bids_regionmae.predict.regionerror import RegionErrorAccumulator, group_patch_maps
    from bids_regionmae.train.data import ClipDataset

    settings = settings or PredictSettings()
    started = time.perf_counter()
    output_dir = Path(output_dir)
    spec = model.spec
    dataset = ClipDataset([run], spec.img_size)
    outcome = RunOutcome(run.run_id, run.subject, "done")
    if len(dataset) == 0:
        outcome.status = "skipped"
        outcome.message = (f"{run.run_id}: {run.n_frames} frames, fewer than one clip of {spec.img_size[3]} "
                           f"frames for model {model.label}; run skipped")
        return outcome
    factors = dataset.factors
    labels_m = atlas.model_grid_labels(factors)  # (X, Y, Z) long
    source_space = run.meta.get("source_space") if settings.input_space else None
    if settings.input_space and not (run.meta.get("source_grid") or {}).get("affine"):
        LOGGER.warning("%s: no source grid in its sidecar; input-space maps skipped", run.run_id)
        source_space = None
    paths = run_output_paths(run.entities, model.label, output_dir, source_space=source_space)
    ac = autocast_factory(device, settings.precision)
    refs = dataset.clips
    common = {"Model": model.describe(), "Sources": [_relative(run.sidecar, output_dir)],
              "ModelGrid": {"img_size": list(spec.img_size), "downsampling": list(factors)}}
    written: list[Path] = []

    # ------------------------------------------------ pass 1: embeddings, outputs, region error
    acc = None
    if model.mae is not None and settings.region_error:
        acc = RegionErrorAccumulator(labels_m, atlas.groups, spec.patch_size, rule=model.patch_rule,
                                     region_masking=settings.region_masking, example_group=model.example_group)
    embeddings: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    attribute = model.classify is not None and settings.attribution
    n_ig = 0
    if attribute:
        n_ig = len(dataset) if settings.ig_max_clips is None else min(len(dataset), int(settings.ig_max_clips))
    bar = progress(len(dataset) * (2 if attribute else 1) + n_ig, run.run_id, settings.progress)
    brain_m = dataset.brain_mask(0)
    try:
        with torch.no_grad():  # not inference_mode: the pure-torch scan caches workspaces across calls
            for idx, x, brain in iter_run_batches(dataset, settings.batch_size, device):
                with ac():
                    embeddings.append(model.embed(x).float().cpu())
                    if model.classify is not None:
                        outputs.append(model.classify(x, None).float().cpu())
                if acc is not None:
                    acc.update(model.mae, x, brain, ac)
                bar.update(len(idx))
    except BaseException:
        bar.close()
        raise
    emb = torch.cat(embeddings).numpy()
    outcome.n_clips = len(refs)

    # embeddings table: one row per clip and a mean row
    columns = ["clip", "onset_frame", "n_frames"] + [f"emb_{i:04d}" for i in range(emb.shape[1])]
    rows = [{"clip": r.clip_index, "onset_frame": r.start, "n_frames": r.stop - r.start,
             **{f"emb_{i:04d}": float(v) for i, v in enumerate(emb[j])}} for j, r in enumerate(refs)]
    rows.append({"clip": "mean", "onset_frame": None, "n_frames": sum(r.stop - r.start for r in refs),
                 **{f"emb_{i:04d}": float(v) for i, v in enumerate(emb.mean(0))}})
    written += write_table(paths["embeddings_tsv"], rows, columns, json_path=paths["embeddings_json"], descriptions={
        "clip": "Clip index within the run (see the clip index of the model-ready run); 'mean': the run's "
                "mean embedding",
        "onset_frame": "First frame of the clip", "n_frames": "Frames of the clip",
        "emb_0000": "Embedding dimensions emb_0000.. : encoder output tokens mean-pooled over space and time",
    }, sidecar={**common, "Description": "Clip embeddings of the encoder and their mean over the run."})

    # predictions
    target = None
    target_name = ""
    if outputs:
        out = torch.cat(outputs).numpy().astype(np.float64)
        outcome.clip_outputs = out
        rows, cols, desc = _prediction_rows(model, out)
        for r, ref in zip(rows, refs, strict=True):
            r.update({"clip": ref.clip_index, "onset_frame": ref.start, "n_frames": ref.stop - ref.start})
        mean_out = out.mean(0, keepdims=True)
        summary_rows, _, _ = _prediction_rows(model, mean_out)
        target = target_column(model, mean_out[0])
        names = output_names(model, out.shape[1])
        target_name = names[target] if target < len(names) else str(target)
        written += write_table(paths["predictions_tsv"], rows, ["clip", "onset_frame", "n_frames"] + cols,
                               json_path=paths["predictions_json"],
                               descriptions={"clip": "Clip index within the run", "onset_frame": "First frame",
                                             "n_frames": "Frames of the clip", **desc},
                               sidecar={**common, "Description": "Model outputs per clip; RunSummary averages the "
                                                                 "clip outputs (logits) over the run.",
                                        "RunSummary": {"n_clips": len(refs), **summary_rows[0]},
                                        "AttributionTarget": target_name})

    # region error + maps
    if acc is not None:
        err_rows = acc.rows(atlas.names, brain_m)
        written += write_table(paths["regionerror_tsv"], err_rows,
                               ["region", "index", "group", "level", "masking", "n_voxels", "n_masked_values", "mse",
                                "mean_abs_error", "n_clips"], json_path=paths["regionerror_json"], descriptions={
                                   "region": "Lobe group or AAL3 region name",
                                   "index": "AAL3 label index (n/a for groups)",
                                   "group": "Lobe group of the region",
                                   "level": "group: all regions of a lobe group pooled; region: one AAL3 region",
                                   "masking": "What was masked: the region's lobe group, or the region alone",
                                   "n_voxels": "In-brain voxels of the region on the model's grid",
                                   "n_masked_values": "Voxel x frame values of the region in masked patches, "
                                                      "pooled over clips",
                                   "mse": "Mean squared reconstruction error of masked in-brain voxels (z-scored "
                                          "units)",
                                   "mean_abs_error": "Mean absolute reconstruction error of the same voxels",
                                   "n_clips": "Clips pooled"},
                               sidecar={**common, "Description": "Per-region reconstruction error of the masked "
                                                                 "autoencoder when each lobe group (and optionally "
                                                                 "each region) is masked in every frame.",
                                        "PatchRule": model.patch_rule})
        tr = float(run.repetition_time)
        grid_note = (f"computed on the model's {tuple(spec.img_size[:3])} grid (store average-pooled by "
                     f"{tuple(factors)}) and repeated back onto the 96^3 grid")
        composite = acc.composite()
        recon96 = upsample_to_store(composite, factors)
        error96 = upsample_to_store(acc.error_map(), factors)
        task = run.entities.get("task")
        written += save_map(paths["recon_nii"], recon96, {
            "Description": "Composite reconstruction of the first clip: each voxel holds the reconstruction from the "
                           "pass in which its lobe group was masked (the input elsewhere); " + grid_note,
            "RepetitionTime": tr, "TaskName": task, "SkullStripped": True,
            "Resolution": {"2": "2 mm MNI152NLin6Asym grid cropped/padded to 96x96x96"},
            "SpatialReference": "https://templateflow.s3.amazonaws.com/tpl-MNI152NLin6Asym/"
                                "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz",
            "Sources": common["Sources"], "Model": common["Model"]}, json_path=paths["recon_json"], tr=tr, int16=True)
        written += save_map(paths["errormap_nii"], error96, {
            "Description": "Mean absolute reconstruction error of masked in-brain voxels (over frames and clips) "
                           "when their lobe group is masked; 0 where never masked; " + grid_note,
            "Units": "z-scored BOLD", "Sources": common["Sources"], "Model": common["Model"]},
                            json_path=paths["errormap_json"])
        if source_space:
            grid = run.meta["source_grid"]
            for key, data, kwargs in (("recon_input", recon96, {"tr": tr, "int16": True}),
                                      ("errormap_input", error96, {})):
                resampled, affine = to_input_space(data, grid["affine"], grid["shape"])
                side = {"Description": f"{key.split('_')[0]} map resampled (trilinear, world coordinates) onto the "
                                       f"run's source grid ({source_space})", "Sources": common["Sources"],
                        "Model": common["Model"]}
                if key == "recon_input":
                    side.update({"RepetitionTime": tr, "TaskName": task, "SkullStripped": True,
                                 "SpatialReference": str(((run.meta.get("sources") or {}).get("bold") or {}).get(
                                     "path") or f"the source BOLD grid ({source_space})")})
                written += save_map(paths[f"{key}_nii"], resampled, side, json_path=paths[f"{key}_json"],
                                    affine=affine, **kwargs)
        if acc.example is not None:
            figure = safe_figure(paths["figure_recon"], draw_reconstruction, acc.example,
                                 f"{run.run_id}: {acc.example['group']} masked (frame 0; masked voxels blank)",
                                 figsize=(8, 8))
            if figure is not None:
                written.append(figure)

    # attribution
    try:
        if attribute and target is not None:
            written += _attribution(run, model, atlas, labels_m, dataset, brain_m, target, paths, settings, device,
                                    ac, common, outcome, group_patch_maps, upsample_to_store, save_map, target_name,
                                    bar)
    finally:
        bar.close()
    outcome.outputs = written
    outcome.seconds = time.perf_counter() - started
    return outcome


def _attribution(run: Any, model: PredictionModel, atlas: ModelGridAtlas, labels_m: torch.Tensor, dataset: Any,
                 brain_m: torch.Tensor, target: int, paths: Mapping[str, Path], settings: PredictSettings,
                 device: Any, ac: Any, common: Mapping[str, Any], outcome: RunOutcome, group_patch_maps: Any,
                 upsample_to_store: Any, save_map: Any, target_name: str, bar: Any) -> list[Path]:
    spec = model.spec
    mode = settings.occlusion_mode
    note = None
    if mode == "mask-token" and not model.token_masks:
        note = "the classifier takes no token masks: occlusion by zero input instead of the mask token"
        mode = "zero"
    units: dict[str, tuple[int, ...]] = dict(atlas.groups)
    if settings.occlusion_regions:
        units.update({f"label:{i}": (i,) for i in atlas.present_labels()})
    if mode == "zero":
        regions = _region_voxel_maps(labels_m, units)
    else:
        regions = group_patch_maps(labels_m, units, spec.patch_size, model.patch_rule)
    background = float((run.meta.get("normalization") or {}).get("background_value", 0.0) or 0.0)
    sums = {name: [] for name in regions}
    for _, x, brain in iter_run_batches(dataset, settings.batch_size, device):
        _, importance = occlusion(model.classify, x, regions, target=target, mode=mode,
                                  patch_size=spec.patch_size, background=background, brain=brain, autocast=ac)
        for name, value in importance.items():
            sums[name] += value.cpu().tolist()
        bar.update(x.shape[0])
    n_ig = len(dataset) if settings.ig_max_clips is None else min(len(dataset), int(settings.ig_max_clips))
    ig_label: dict[int, dict[str, list[float]]] = {}
    ig_group: dict[str, dict[str, list[float]]] = {}
    gaps, ig_abs_map = [], None
    for i in range(n_ig):
        x = dataset[i]["clip"][None].to(device)
        result = integrated_gradients(model.classify, x, target=target, steps=settings.ig_steps,
                                      batch_size=settings.ig_batch_size)
        attr = result.attribution[0]  # (X, Y, Z, T)
        per_label, per_group = project_onto_regions(attr, labels_m, atlas.groups, brain=brain_m)
        for k, v in per_label.items():
            ig_label.setdefault(k, {"mean_abs": [], "sum": []})
            ig_label[k]["mean_abs"].append(v["mean_abs"])
            ig_label[k]["sum"].append(v["sum"])
        for g, v in per_group.items():
            ig_group.setdefault(g, {"mean_abs": [], "sum": []})
            ig_group[g]["mean_abs"].append(v["mean_abs"])
            ig_group[g]["sum"].append(v["sum"])
        gaps.append({"clip": i, "output": result.output, "baseline_output": result.baseline_output,
                     "sum_of_attributions": result.total, "gap": result.completeness_gap})
        amap = attr.abs().mean(-1).numpy()
        ig_abs_map = amap if ig_abs_map is None else ig_abs_map + amap
        bar.update(1)
    outcome.n_ig_clips = n_ig

    def mean(values: Sequence[float]) -> float:
        values = [v for v in values if v is not None and math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan

    inside = torch.where(brain_m.bool(), labels_m, torch.zeros_like(labels_m)).reshape(-1).numpy()
    counts = np.bincount(inside, minlength=int(labels_m.max()) + 1)
    rows = []
    for g, labels in atlas.groups.items():
        rows.append({"region": g, "index": "n/a", "group": g, "level": "group",
                     "n_voxels": int(sum(counts[i] for i in labels if 0 < i < counts.size)),
                     "occlusion_importance": mean(sums.get(g, [])),
                     "occlusion_sd": float(np.std(sums[g], ddof=1)) if len(sums.get(g, [])) > 1 else math.nan,
                     "ig_mean_abs": mean(ig_group.get(g, {}).get("mean_abs", [])),
                     "ig_sum": mean(ig_group.get(g, {}).get("sum", [])),
                     "n_clips": len(sums.get(g, [])), "n_ig_clips": n_ig})
    for i in atlas.present_labels():
        key = f"label:{i}"
        rows.append({"region": atlas.names.get(i, str(i)), "index": i, "group": atlas.group_of(i), "level": "region",
                     "n_voxels": int(counts[i]) if i < counts.size else 0,
                     "occlusion_importance": mean(sums.get(key, [])),
                     "occlusion_sd": float(np.std(sums[key], ddof=1)) if len(sums.get(key, [])) > 1 else math.nan,
                     "ig_mean_abs": mean(ig_label.get(i, {}).get("mean_abs", [])),
                     "ig_sum": mean(ig_label.get(i, {}).get("sum", [])),
                     "n_clips": len(sums.get(key, [])), "n_ig_clips": n_ig if i in ig_label else 0})
    outcome.attribution = rows
    written = write_table(paths["attribution_tsv"], rows,
                          ["region", "index", "group", "level", "n_voxels", "occlusion_importance", "occlusion_sd",
                           "ig_mean_abs", "ig_sum", "n_clips", "n_ig_clips"],
                          json_path=paths["attribution_json"], descriptions={
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
                                   "TargetOutput": {"column": target, "name": target_name},
                                   "Occlusion": {"mode": mode, "background_value": background, "note": note,
                                                 "units": "lobe groups" + (" and regions"
                                                                           if settings.occlusion_regions else "")},
                                   "IntegratedGradients": {"steps": settings.ig_steps, "baseline": "zeros",
                                                           "rule": "midpoint Riemann sum",
                                                           "completeness": gaps}})
    if ig_abs_map is not None:
        ig96 = upsample_to_store(ig_abs_map / n_ig, dataset.factors)
        written += save_map(paths["igmap_nii"], ig96, {
            "Description": "Mean absolute integrated-gradients attribution per voxel (over frames and clips)",
            "Sources": common["Sources"], "Model": common["Model"], "TargetColumn": target},
                            json_path=paths["igmap_json"])
    return written


# ----------------------------------------------------------------------------- one participant


def predict_participant(subject: str, runs: Sequence[Any], model: PredictionModel, atlas: ModelGridAtlas,
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
        rows, cols, desc = _prediction_rows(model, allclips.mean(0, keepdims=True))
        row = {"participant_id": f"sub-{subject}", "n_runs": len(clip_outputs), "n_clips": int(allclips.shape[0]),
               **rows[0]}
        written += write_table(paths["predictions_tsv"], [row], ["participant_id", "n_runs", "n_clips"] + cols,
                               json_path=paths["predictions_json"],
                               descriptions={"participant_id": "Participant", "n_runs": "Runs pooled",
                                             "n_clips": "Clips pooled", **desc},
                               sidecar={**info, "Description": "Participant-level prediction: the clip outputs "
                                                               "(logits) of all runs averaged, as in fine-tuning."})
    with_attr = [o for o in outcomes if o.attribution]
    if with_attr:
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
        written += write_table(paths["attribution_tsv"], pooled,
                               ["region", "index", "group", "level", "n_voxels", "occlusion_importance", "ig_mean_abs",
                                "ig_sum", "n_clips", "n_ig_clips", "n_runs"], json_path=paths["attribution_json"],
                               descriptions={"occlusion_importance": "Clip-weighted mean over runs of the run "
                                                                     "attribution tables",
                                             "ig_mean_abs": "Clip-weighted mean over runs",
                                             "ig_sum": "Clip-weighted mean over runs", "n_runs": "Runs pooled"},
                               sidecar={**info, "Description": "Participant-level region attribution pooled over "
                                                               "runs."})
    return written


def predict_many(runs: Mapping[str, Sequence[Any]], model: PredictionModel, atlas: ModelGridAtlas,
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
