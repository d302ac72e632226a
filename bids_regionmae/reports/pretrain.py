"""The pretraining report of a model directory: loss curves, the masked region, a reconstruction, per-region MSE.

Writes ``figures/loss_curves.svg``, ``figures/masked_region.png``,
``figures/reconstruction.png`` and ``report.html`` into the model directory.
A figure or report that cannot be made is logged, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.outputs.figures import center_of, draw_reconstruction, orthogonal_views, safe_figure
from bids_regionmae.reports.html import HtmlReport, format_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bids_regionmae.masking import Masker, MaskingPlan
    from bids_regionmae.models.model_record import ModelDirLayout
    from bids_regionmae.preprocess.store import ModelReadyRun

LOGGER = logging.getLogger(__name__)

__all__ = ["PretrainRecord", "write_pretrain_report"]


@dataclass
class PretrainRecord:
    """What the pretraining report shows.

    Attributes
    ----------
    name : str
        Model directory name.
    plan : MaskingPlan
    masker : Masker
    masking_record : mapping
        ``masks/masking.json``.
    summary : mapping
        ``training_summary.json``.
    history, val_history : sequence of mapping
        Training (per step) and validation (per epoch) logs.
    batch_size, grad_accum, seed : int
    train_subjects, val_subjects : sequence of str
    group_mse : mapping of str to mapping
        Per lobe: ``mse`` and ``n_clips``.
    region_mse : mapping of int to mapping
        Per atlas label: ``mse`` and ``n_clips``.
    example : mapping, optional
        A held-out clip's original, reconstruction and masks (frame 0 shown).
    """

    name: str
    plan: MaskingPlan
    masker: Masker
    masking_record: Mapping[str, Any]
    summary: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]]
    val_history: Sequence[Mapping[str, Any]]
    batch_size: int
    grad_accum: int
    seed: int
    train_subjects: Sequence[str]
    val_subjects: Sequence[str]
    group_mse: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    region_mse: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    example: Mapping[str, Any] | None = None


# --------------------------------------------------------------------------- figures


def draw_curves(fig: Figure, history: Sequence[Mapping[str, Any]], val_history: Sequence[Mapping[str, Any]]) -> None:
    """Training loss per step (raw and smoothed) with validation loss; validation MSE per lobe."""
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    ax1.plot(steps, losses, lw=0.8, color="#9ab", label="train (per step)")
    if len(losses) >= 5:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax1.plot(steps[k - 1:], smooth, color="#2b6cb0", label=f"train ({k}-step mean)")
    if val_history:
        ax1.plot([r["step"] for r in val_history], [r.get("val_loss", np.nan) for r in val_history], "o-",
                 color="#c53030", label="validation")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("masked MSE")
    ax1.set_title("loss")
    ax1.legend(fontsize=8)
    names = sorted({k for r in val_history for k in r if k.startswith("mse_")})
    for name in names:
        ys = [r.get(name, np.nan) for r in val_history]
        if np.isfinite(np.asarray(ys, dtype=float)).any():
            ax2.plot([r["step"] for r in val_history], ys, "o-", label=name[4:])
    ax2.set_xlabel("optimizer step")
    ax2.set_title("validation MSE per lobe (masked voxels)")
    if ax2.lines:
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax2.transAxes)


def draw_mask(fig: Figure, background: np.ndarray, region: np.ndarray, title: str) -> None:
    """The masked region over a background image, three views through its centre."""
    axes = fig.subplots(1, 3)
    center = center_of(region)
    views = zip(axes, orthogonal_views(background, center), orthogonal_views(region.astype(float), center),
                strict=True)
    for ax, (view, bg), (_, rg) in views:
        ax.imshow(bg, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_where(rg < 0.5, rg), cmap="autumn", alpha=0.55, origin="lower", vmin=0, vmax=1)
        ax.set_title(view)
        ax.axis("off")
    fig.suptitle(title)


# --------------------------------------------------------------------------- report


def _figures(layout: ModelDirLayout, record: PretrainRecord, runs: Sequence[ModelReadyRun]
             ) -> tuple[Path | None, Path | None, Path | None]:
    figures = layout.figures
    curves = safe_figure(figures / "loss_curves.svg", draw_curves, record.history, record.val_history,
                         figsize=(11, 4))
    mask_fig = None
    try:
        import nibabel as nib

        region_voxels = np.asarray(nib.load(str(layout.masks / "mask_voxels.nii.gz")).dataobj) > 0
        plan = record.plan
        title = (f"masked region: {plan.region}" if plan.uses_regions
                 else f"{plan.strategy}: candidate patches (ratio {record.masker.ratio})")
        mask_fig = safe_figure(figures / "masked_region.png", draw_mask, runs[0].mean_image(max_frames=10),
                               region_voxels, title, figsize=(11, 4))
    except Exception as exc:  # noqa: BLE001 - a figure never fails a run
        LOGGER.warning("could not draw the masked-region figure: %s", exc)
    recon_fig = None
    if record.example is not None:
        ex = record.example
        frame0 = {"original": ex["original"].numpy()[..., 0], "reconstruction": ex["reconstruction"].numpy()[..., 0],
                  "voxel_mask": ex["voxel_mask"].numpy()[..., 0], "brain_mask": ex["brain_mask"].numpy()}
        recon_fig = safe_figure(figures / "reconstruction.png", draw_reconstruction, frame0,
                                f"{ex['run_id']} clip {ex['clip_index']}, frame 0 (masked voxels blank)",
                                figsize=(9, 9))
    return curves, mask_fig, recon_fig


def _summary_rows(record: PretrainRecord) -> list[dict[str, str]]:
    s, m, plan = record.summary, record.masker, record.plan
    masking = (f"region: {plan.region}" if plan.region else plan.strategy) \
        + (f", fraction {m.fraction}" if plan.uses_regions and m.fraction != 1 else "") \
        + (f", ratio {m.ratio}" if m.ratio is not None else "")
    return [
        {"item": "masking", "value": masking},
        {"item": "masked patches / clip", "value": f"{record.masking_record['n_masked_patches']} of "
                                                   f"{int(np.prod(m.grid[:3]))} (rule {m.rule})"},
        {"item": "model", "value": f"{s['variant']} {tuple(s['img_size'])}, backend {s['backend']}, "
                                   f"{s['precision']}"},
        {"item": "device", "value": f"{s['device']} x {s['world_size']} process(es)"},
        {"item": "steps", "value": f"{s['steps']} ({s['epochs']} epoch(s), {s['steps_per_epoch']} steps/epoch)"},
        {"item": "batch", "value": f"{record.batch_size} per process x {record.grad_accum} accumulation x "
                                   f"{s['world_size']}"},
        {"item": "train loss (first -> last)", "value": f"{format_number(s['first_train_loss'], 6)} -> "
                                                        f"{format_number(s['final_train_loss'], 6)}"},
        {"item": "final validation loss", "value": format_number(s["final_val_loss"], 6)},
        {"item": "throughput", "value": f"{format_number(s['clips_per_s_median'], 6)} clips/s (median)"},
        {"item": "participants", "value": f"{len(record.train_subjects)} train, {len(record.val_subjects)} "
                                          f"validation ({s['n_train_clips']} / {s['n_val_clips']} clips)"},
        {"item": "seed", "value": str(record.seed)},
    ]


def write_pretrain_report(layout: ModelDirLayout, record: PretrainRecord, runs: Sequence[ModelReadyRun],
                          label_names: Mapping[int, str]) -> Path | None:
    """Figures and ``report.html`` of a pretraining model directory; every failure is logged, never raised.

    Parameters
    ----------
    layout : ModelDirLayout
    record : PretrainRecord
    runs : sequence of ModelReadyRun
        The first run's mean image is the background of the mask figure.
    label_names : mapping of int to str
        Atlas region names.

    Returns
    -------
    Path or None
    """
    curves, mask_fig, recon_fig = _figures(layout, record, runs)
    report = HtmlReport(f"Pretraining: {record.name}", layout.report)
    try:
        report.heading("Summary")
        report.table(_summary_rows(record))
        never = record.masking_record.get("never_masked_labels") or []
        if never:
            names = ", ".join(f"{i} {label_names.get(i, '')}".strip() for i in never)
            report.paragraph(f"{len(never)} label(s) of the region have no voxel in any masked patch (patch rule "
                             f"'{record.masker.rule}' on the model grid) and are never masked: {names}", kind="warn")
        report.heading("Training curves")
        report.figure(curves, "Masked in-brain MSE per step (train) and per epoch (validation); right: "
                              "validation MSE per lobe.")
        report.heading("Masked region")
        report.figure(mask_fig, "Token-level mask on the model grid over the mean image (slices through its centre).")
        report.heading("Reconstruction example")
        report.figure(recon_fig, "A held-out clip: original, input with masked voxels blank, reconstruction.")
        report.heading("Reconstruction error per lobe")
        report.table([{"lobe": g, "MSE (masked voxels)": v["mse"], "clips": v["n_clips"]}
                      for g, v in record.group_mse.items()])
        region_rows = [{"index": i, "region": label_names.get(i, ""), "MSE": v["mse"], "clips": v["n_clips"]}
                       for i, v in record.region_mse.items() if v["n_clips"]]
        if region_rows:
            report.heading("Reconstruction error per region (masked regions only)")
            report.table(region_rows)
        report.paragraph("Full tables: region_mse.tsv, train_log.csv, val_log.csv; data: data_manifest.json; "
                         "masks: masks/; configuration: regionmae_config.toml.")
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        LOGGER.warning("report content incomplete: %s", exc)
    return report.write()
