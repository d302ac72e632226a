"""Orthogonal-slice figures and mean images shared by the pretraining, participant and group reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


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


def draw_slice_rows(fig: Any, rows: Sequence[tuple[str, np.ndarray]], center: Sequence[int],
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


def mean_image(run: Any, max_frames: int = 50) -> np.ndarray:
    """Mean image of a model-ready run on the 96^3 grid: its mean BOLD reference, else the mean of its first frames.

    Parameters
    ----------
    run : ModelReadyRun
    max_frames : int
        Frames averaged when the run has no mean image file.

    Returns
    -------
    ndarray, shape (96, 96, 96), float32
    """
    from pathlib import Path

    path = run.paths.get("mean")
    if path is not None and Path(path).is_file():
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    frames = np.asarray(run.data[: min(run.n_frames, max_frames)], dtype=np.float32)
    return frames.mean(0)
