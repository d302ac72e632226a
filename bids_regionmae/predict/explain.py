"""The *attribute* step of prediction: occlusion and integrated gradients of one run, per region.

:func:`attribute_run` explains the target output of a fine-tuned model on
every clip of a run (occlusion of each lobe group, optionally of each
region) and on its first clips (integrated gradients, projected onto the
atlas regions), and returns the rows of the run's attribution table
(:class:`RunAttribution`); :func:`bids_regionmae.predict.writers.write_attribution`
writes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bids_regionmae.predict.attribution import integrated_gradients, occlusion, project_onto_regions
from bids_regionmae.predict.inference import iter_run_batches

if TYPE_CHECKING:
    from tqdm import tqdm

    from bids_regionmae.predict.context import RunContext

__all__ = ["RunAttribution", "attribute_run"]


@dataclass
class RunAttribution:
    """The attribution of one run.

    Attributes
    ----------
    rows : list of dict
        One per lobe group, then one per atlas region (columns of
        :data:`bids_regionmae.predict.writers.ATTRIBUTION_COLUMNS`).
    target : int
        The explained output column; ``target_name`` its name.
    mode : {'zero', 'mask-token'}
        Occlusion actually used; ``note`` says why when it differs from the setting.
    gaps : list of dict
        Integrated gradients' completeness per clip.
    ig_abs_map : ndarray, shape (X, Y, Z), or None
        Sum over clips of the frame-averaged absolute attribution.
    n_ig_clips : int
    """

    rows: list[dict[str, Any]]
    target: int
    target_name: str
    mode: str
    note: str | None = None
    gaps: list[dict[str, Any]] = field(default_factory=list)
    ig_abs_map: np.ndarray | None = None
    n_ig_clips: int = 0


def _voxel_maps(labels: torch.Tensor, groups: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, members in groups.items():
        vox = torch.isin(labels, torch.as_tensor(list(members), dtype=labels.dtype))
        if bool(vox.any()):
            out[name] = vox
    return out


def _occlude(ctx: RunContext, target: int, bar: tqdm) -> tuple[str, str | None, dict[str, list[float]]]:
    """Occlusion importance of every unit (group, optionally region) on every clip."""
    from bids_regionmae.predict.regionerror import group_patch_maps

    model, settings, spec = ctx.model, ctx.settings, ctx.model.spec
    mode, note = settings.occlusion_mode, None
    if mode == "mask-token" and not model.token_masks:
        note = "the classifier takes no token masks: occlusion by zero input instead of the mask token"
        mode = "zero"
    units: dict[str, tuple[int, ...]] = dict(ctx.atlas.groups)
    if settings.occlusion_regions:
        units.update({f"label:{i}": (i,) for i in ctx.atlas.present_labels()})
    if mode == "zero":
        regions = _voxel_maps(ctx.labels, units)
    else:
        regions = group_patch_maps(ctx.labels, units, spec.patch_size, model.patch_rule)
    sums: dict[str, list[float]] = {name: [] for name in regions}
    for _, x, brain in iter_run_batches(ctx.dataset, settings.batch_size, ctx.device):
        _, importance = occlusion(model.classify, x, regions, target=target, mode=mode, patch_size=spec.patch_size,
                                  background=ctx.background, brain=brain, autocast=ctx.autocast)
        for name, value in importance.items():
            sums[name] += value.cpu().tolist()
        bar.update(x.shape[0])
    return mode, note, sums


def _integrate(ctx: RunContext, target: int, bar: tqdm, result: RunAttribution
               ) -> tuple[dict[int, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
    """Integrated gradients of the first clips, projected onto labels and groups (fills ``result``'s IG fields)."""
    ig_label: dict[int, dict[str, list[float]]] = {}
    ig_group: dict[str, dict[str, list[float]]] = {}
    n_ig = ctx.settings.n_ig_clips(len(ctx.dataset))
    for i in range(n_ig):
        x = ctx.dataset[i]["clip"][None].to(ctx.device)
        ig = integrated_gradients(ctx.model.classify, x, target=target, steps=ctx.settings.ig_steps,
                                  batch_size=ctx.settings.ig_batch_size)
        attr = ig.attribution[0]  # (X, Y, Z, T)
        per_label, per_group = project_onto_regions(attr, ctx.labels, ctx.atlas.groups, brain=ctx.brain)
        for key, values, store in [(k, v, ig_label) for k, v in per_label.items()] + \
                                  [(g, v, ig_group) for g, v in per_group.items()]:
            entry = store.setdefault(key, {"mean_abs": [], "sum": []})
            entry["mean_abs"].append(values["mean_abs"])
            entry["sum"].append(values["sum"])
        result.gaps.append({"clip": i, "output": ig.output, "baseline_output": ig.baseline_output,
                            "sum_of_attributions": ig.total, "gap": ig.completeness_gap})
        amap = attr.abs().mean(-1).numpy()
        result.ig_abs_map = amap if result.ig_abs_map is None else result.ig_abs_map + amap
        bar.update(1)
    result.n_ig_clips = n_ig
    return ig_label, ig_group


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _rows(ctx: RunContext, sums: Mapping[str, list[float]], ig_label: Mapping[int, Mapping[str, list[float]]],
          ig_group: Mapping[str, Mapping[str, list[float]]], n_ig: int) -> list[dict[str, Any]]:
    atlas, labels = ctx.atlas, ctx.labels
    inside = torch.where(ctx.brain.bool(), labels, torch.zeros_like(labels)).reshape(-1).numpy()
    counts = np.bincount(inside, minlength=int(labels.max()) + 1)
    rows = []
    for g, members in atlas.groups.items():
        rows.append({"region": g, "index": "n/a", "group": g, "level": "group",
                     "n_voxels": int(sum(counts[i] for i in members if 0 < i < counts.size)),
                     "occlusion_importance": _mean(sums.get(g, [])), "occlusion_sd": _sd(sums.get(g, [])),
                     "ig_mean_abs": _mean(ig_group.get(g, {}).get("mean_abs", [])),
                     "ig_sum": _mean(ig_group.get(g, {}).get("sum", [])),
                     "n_clips": len(sums.get(g, [])), "n_ig_clips": n_ig})
    for i in atlas.present_labels():
        key = f"label:{i}"
        rows.append({"region": atlas.names.get(i, str(i)), "index": i, "group": atlas.group_of(i), "level": "region",
                     "n_voxels": int(counts[i]) if i < counts.size else 0,
                     "occlusion_importance": _mean(sums.get(key, [])), "occlusion_sd": _sd(sums.get(key, [])),
                     "ig_mean_abs": _mean(ig_label.get(i, {}).get("mean_abs", [])),
                     "ig_sum": _mean(ig_label.get(i, {}).get("sum", [])),
                     "n_clips": len(sums.get(key, [])), "n_ig_clips": n_ig if i in ig_label else 0})
    return rows


def attribute_run(ctx: RunContext, target: int, target_name: str, bar: tqdm) -> RunAttribution:
    """Occlusion (every clip) and integrated gradients (the first clips) of the target output of one run.

    Parameters
    ----------
    ctx : RunContext
        Of a fine-tuned model (``ctx.model.classify``).
    target : int
        Output column to explain; ``target_name`` its name.
    bar : tqdm
        Progress bar, advanced per clip.

    Returns
    -------
    RunAttribution
    """
    mode, note, sums = _occlude(ctx, target, bar)
    result = RunAttribution(rows=[], target=target, target_name=target_name, mode=mode, note=note)
    ig_label, ig_group = _integrate(ctx, target, bar, result)
    result.rows = _rows(ctx, sums, ig_label, ig_group, result.n_ig_clips)
    return result
