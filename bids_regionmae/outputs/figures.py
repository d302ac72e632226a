"""Figures saved next to the outputs (matplotlib, Agg): one place for every drawing that several rooms use.

:func:`safe_figure` draws and saves one figure atomically and never raises
(a failed figure never fails a run). The drawings: orthogonal slices
(:func:`orthogonal_views`, :func:`draw_slice_rows`), original / masked /
reconstructed clips (:func:`draw_reconstruction`), the mean image with the
brain mask (:func:`draw_mean_and_mask`), grouped bars per region group
(:func:`draw_group_bars`) and values painted on atlas regions
(:func:`draw_region_values`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOGGER = logging.getLogger(__name__)


def center_of(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre of mass (voxel indices) of a 3D boolean mask; the volume centre when it is empty."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return tuple(s // 2 for s in mask.shape)  # type: ignore[return-value]
    return tuple(int(round(v)) for v in idx.mean(0))  # type: ignore[return-value]


def orthogonal_views(volume: np.ndarray, center: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal and sagittal slices of ``volume`` (X, Y, Z) through ``center``, ready for imshow."""
    i, j, k = center
    return [("axial", volume[:, :, k].T), ("coronal", volume[:, j, :].T), ("sagittal", volume[i, :, :].T)]


def draw_slice_rows(fig: Figure, rows: Sequence[tuple[str, np.ndarray]], center: Sequence[int],
                    vmin: float, vmax: float, title: str = "") -> None:
    """One row of three orthogonal slices per ``(label, volume)``, on a shared grey scale.

    Used for original / masked input / reconstruction panels; NaN voxels
    (masked ones) are drawn blank.
    """
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    for r, (label, volume) in enumerate(rows):
        for c, (view, image) in enumerate(orthogonal_views(volume, center)):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
            if r == 0:
                ax.set_title(view)
            if c == 0:
                ax.set_ylabel(label)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)


def draw_group_bars(fig: Figure, series: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "",
                    errors: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Grouped bar chart: one bar group per region group, one bar per series (e.g. run).

    Parameters
    ----------
    fig : matplotlib Figure
    series : mapping of str to mapping of str to float
        Series name -> region group -> value (NaN: no bar).
    ylabel, title : str
    errors : mapping, optional
        Same layout: error-bar half-lengths (e.g. SD).
    """
    ax = fig.subplots()
    groups = list(dict.fromkeys(g for values in series.values() for g in values))
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for s, (name, values) in enumerate(series.items()):
        heights = [float(values.get(g, math.nan)) for g in groups]
        err = None
        if errors and name in errors:
            err = [float(errors[name].get(g, 0.0)) for g in groups]
            err = [0.0 if not math.isfinite(e) else e for e in err]
        ax.bar(x + (s - (n - 1) / 2) * width, heights, width=width, label=name, yerr=err, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.axhline(0, color="#444", lw=0.5)


def draw_mean_and_mask(fig: Figure, mean: np.ndarray, mask: np.ndarray, title: str = "") -> None:
    """Three orthogonal slices of the mean image with the brain-mask outline.

    Parameters
    ----------
    fig : matplotlib Figure
    mean : ndarray, shape (X, Y, Z)
    mask : bool ndarray, shape (X, Y, Z)
    title : str
    """
    axes = fig.subplots(1, 3)
    center = center_of(mask)
    finite = mean[mask] if mask.any() else mean.ravel()
    lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
    views = zip(axes, orthogonal_views(mean, center), orthogonal_views(mask.astype(float), center), strict=True)
    for ax, (view, image), (_, outline) in views:
        ax.imshow(image, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if outline.any() and not outline.all():
            ax.contour(outline, levels=[0.5], colors="#e53e3e", linewidths=0.8)
        ax.set_title(view)
        ax.axis("off")
    if title:
        fig.suptitle(title)


def draw_reconstruction(fig: Figure, example: Mapping[str, Any], title: str = "") -> None:
    """Original / masked input / reconstruction, three views each (frame 0).

    Parameters
    ----------
    fig : matplotlib Figure
    example : mapping
        ``original``, ``reconstruction`` : ndarray (X, Y, Z); ``voxel_mask``
        bool (X, Y, Z) (True = masked); ``brain_mask`` bool (X, Y, Z);
        optional ``group``.
    title : str
    """
    original = np.asarray(example["original"], dtype=np.float32)
    recon = np.asarray(example["reconstruction"], dtype=np.float32)
    vmask = np.asarray(example["voxel_mask"], dtype=bool)
    brain = np.asarray(example["brain_mask"], dtype=bool)
    masked = np.where(vmask, np.nan, original)
    recon = np.where(brain, recon, np.nan)
    sel = vmask & brain
    center = center_of(sel if sel.any() else brain)
    lo, hi = np.nanpercentile(original[brain], [2, 98]) if brain.any() else (-2.0, 2.0)
    rows = [("original", original), ("masked input", masked), ("reconstruction", recon)]
    draw_slice_rows(fig, rows, center, lo, hi,
                    title=title or f"masked: {example.get('group', '?')} (frame 0; masked voxels blank)")


def draw_region_values(fig: Figure, background: np.ndarray | None, voxel_labels: np.ndarray,
                       values: Mapping[int, float], title: str = "", cmap: str = "hot",
                       label: str = "importance") -> None:
    """Paint a value per atlas label on its voxels over a background image (axial slices).

    Parameters
    ----------
    fig : matplotlib Figure
    background : ndarray, shape (X, Y, Z), optional
        Mean image or template; the atlas outline when None.
    voxel_labels : integer ndarray, shape (X, Y, Z)
    values : mapping of int to float
        Label -> value (e.g. its group's mean importance); labels without a
        value stay transparent.
    title, cmap, label : str
    """
    labels = np.asarray(voxel_labels).astype(np.int64)
    lut = np.full(int(labels.max()) + 1 if labels.size else 1, np.nan)
    for index, value in values.items():
        if 0 < int(index) < lut.size and value is not None and math.isfinite(float(value)):
            lut[int(index)] = float(value)
    painted = lut[labels]
    painted[labels == 0] = np.nan
    bg = (labels > 0).astype(np.float32) if background is None else np.asarray(background, dtype=np.float32)
    brain_z = np.flatnonzero((labels > 0).any(axis=(0, 1)))
    z_lo, z_hi = (int(brain_z.min()), int(brain_z.max())) if brain_z.size else (0, labels.shape[2] - 1)
    slices = np.linspace(z_lo + 0.15 * (z_hi - z_lo), z_hi - 0.15 * (z_hi - z_lo), 6).round().astype(int)
    finite = painted[np.isfinite(painted)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin < 0 < vmax:
        bound = max(abs(vmin), abs(vmax))
        vmin, vmax, cmap = -bound, bound, "RdBu_r"
    axes = fig.subplots(1, len(slices))
    lo, hi = (np.percentile(bg[bg != 0], [2, 98]) if np.any(bg != 0) else (0.0, 1.0))
    image = None
    for ax, k in zip(np.atleast_1d(axes), slices, strict=True):
        ax.imshow(bg[:, :, k].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        image = ax.imshow(np.ma.masked_invalid(painted[:, :, k].T), cmap=cmap, origin="lower", vmin=vmin,
                          vmax=vmax if vmax > vmin else vmin + 1e-9, alpha=0.8)
        ax.set_title(f"z={k}", fontsize=8)
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(np.atleast_1d(axes)), shrink=0.7, label=label)
    if title:
        fig.suptitle(title)


def safe_figure(path: str | Path, draw: Callable[..., Any], *args: Any, **kwargs: Any) -> Path | None:
    """Draw a matplotlib figure with ``draw(fig, *args, **kwargs)`` and save it to ``path``.

    The format follows the extension (``.svg`` or ``.png``). Any exception is
    logged and ``None`` returned: a failed figure never fails the run.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=kwargs.pop("figsize", (8, 4)))
        try:
            draw(fig, *args, **kwargs)
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=path.suffix.lstrip("."), bbox_inches="tight", dpi=110)
        finally:
            plt.close(fig)
        return path
    except Exception as exc:  # noqa: BLE001 - a figure never fails a run
        LOGGER.warning("could not draw figure %s: %s", path, exc)
        return None
