"""The model grid: 2 mm MNI152NLin6Asym, cropped/padded to 96^3.

The source grid is TemplateFlow's ``MNI152NLin6Asym`` at ``res-2`` (91x109x91,
RAS, origin -90,-126,-72), which is also the grid of fMRIPrep's
``MNI152NLin6Asym:res-2`` outputs and of the 2 mm AAL3. NeuroSTORM crops y to
indices 6:102 and pads x and z to 96; the same crop/pad is used for the atlas
and for every BOLD run, so voxel (i, j, k) of the model grid is voxel
(i - 2, j + 6, k - 2) of the source grid. Everything is expressed as affines so
that inputs on other grids are resampled through world coordinates.

A model variant may want a coarser grid (the CPU ``tiny`` variant takes
48^3): data are average-pooled by an integer factor per axis
(:func:`downsample_volume`), brain masks pooled and thresholded
(:func:`downsample_mask`) and atlas labels take the most frequent label of
each block (:func:`downsample_labels`), so that all three stay aligned.
Torch is imported only by those functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from bids_regionmae.errors import UsageError

if TYPE_CHECKING:
    import torch

SOURCE_SHAPE: tuple[int, int, int] = (91, 109, 91)
SOURCE_AFFINE: np.ndarray = np.array(
    [[2.0, 0.0, 0.0, -90.0],
     [0.0, 2.0, 0.0, -126.0],
     [0.0, 0.0, 2.0, -72.0],
     [0.0, 0.0, 0.0, 1.0]]
)
MODEL_SHAPE: tuple[int, int, int] = (96, 96, 96)
#: Offset of the model grid's first voxel in source-grid voxels (x, y, z):
#: negative means padding, positive means cropping.
MODEL_OFFSET: tuple[int, int, int] = (-2, 6, -2)
MODEL_AFFINE: np.ndarray = SOURCE_AFFINE.copy()
MODEL_AFFINE[:3, 3] = SOURCE_AFFINE[:3, 3] + SOURCE_AFFINE[:3, :3] @ np.array(MODEL_OFFSET, dtype=float)
MODEL_SPACE = "MNI152NLin6Asym"
MODEL_RES = "2"


def source_to_model(array: np.ndarray, fill: float | int = 0) -> np.ndarray:
    """Crop/pad an array on the 91x109x91 source grid to the 96^3 model grid.

    Parameters
    ----------
    array : ndarray, shape (91, 109, 91, ...)
        Data on the source grid; trailing axes (e.g. time) are kept.
    fill : scalar
        Value for padded voxels.

    Returns
    -------
    ndarray, shape (96, 96, 96, ...)
    """
    if tuple(array.shape[:3]) != SOURCE_SHAPE:
        raise ValueError(f"expected a source-grid array of shape {SOURCE_SHAPE} (+ trailing axes), "
                         f"got {array.shape}")
    out = np.full(MODEL_SHAPE + array.shape[3:], fill, dtype=array.dtype)
    src, dst = [], []
    for offset, n_src, n_dst in zip(MODEL_OFFSET, SOURCE_SHAPE, MODEL_SHAPE, strict=True):
        start_src = max(offset, 0)
        start_dst = max(-offset, 0)
        length = min(n_src - start_src, n_dst - start_dst)
        src.append(slice(start_src, start_src + length))
        dst.append(slice(start_dst, start_dst + length))
    out[tuple(dst)] = array[tuple(src)]
    return out


def model_voxel_to_world(ijk: np.ndarray) -> np.ndarray:
    """Map model-grid voxel indices (..., 3) to MNI millimetres (..., 3)."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ MODEL_AFFINE[:3, :3].T + MODEL_AFFINE[:3, 3]


def downsample_factors(source: Sequence[int], target: Sequence[int]) -> tuple[int, int, int]:
    """Integer pooling factor per axis from the store grid to the model grid.

    Parameters
    ----------
    source : sequence of 3 int
        Store grid, ``(96, 96, 96)``.
    target : sequence of 3 int
        Model grid ``(X, Y, Z)`` (``spec.img_size[:3]``).

    Returns
    -------
    tuple of 3 int

    Raises
    ------
    UsageError
        A target axis is larger than the source or does not divide it.
    """
    factors = []
    for axis, (n, m) in enumerate(zip(source, target, strict=True)):
        if m <= 0 or m > n or n % m:
            raise UsageError(f"the model expects a {tuple(target)} grid but the model-ready data are "
                             f"{tuple(source)}: axis {axis} ({n} -> {m}) is not an integer downsampling factor. "
                             f"Pick a model variant whose img_size divides {tuple(source)} (e.g. 96 or 48).")
        factors.append(n // m)
    return factors[0], factors[1], factors[2]


def downsample_volume(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Average-pool the last three axes by integer ``factors``.

    Parameters
    ----------
    x : Tensor, shape (..., X, Y, Z)
    factors : sequence of 3 int

    Returns
    -------
    Tensor, shape (..., X/fx, Y/fy, Z/fz), float32
    """
    fx, fy, fz = (int(f) for f in factors)
    x = x.float()
    if (fx, fy, fz) == (1, 1, 1):
        return x
    *lead, X, Y, Z = x.shape
    return x.reshape(*lead, X // fx, fx, Y // fy, fy, Z // fz, fz).mean(dim=(-5, -3, -1))


def downsample_mask(mask: np.ndarray | torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Pool a brain mask: a block is brain when more than half of its voxels are.

    Parameters
    ----------
    mask : array, shape (X, Y, Z)
    factors : sequence of 3 int

    Returns
    -------
    BoolTensor, shape (X/fx, Y/fy, Z/fz)
    """
    import torch

    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    return downsample_volume(m, factors) > 0.5


def downsample_labels(labels: np.ndarray | torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Pool a label map by the most frequent label of each block.

    Ties are broken towards a non-zero (brain) label, then towards the first
    voxel of the block in C order.

    Parameters
    ----------
    labels : integer array, shape (X, Y, Z)
    factors : sequence of 3 int

    Returns
    -------
    LongTensor, shape (X/fx, Y/fy, Z/fz)
    """
    import torch

    lab = torch.as_tensor(np.asarray(labels)).long()
    fx, fy, fz = (int(f) for f in factors)
    if (fx, fy, fz) == (1, 1, 1):
        return lab
    X, Y, Z = lab.shape
    blocks = lab.reshape(X // fx, fx, Y // fy, fy, Z // fz, fz).permute(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(X // fx, Y // fy, Z // fz, fx * fy * fz)
    # counts[..., i] = how many voxels of the block share voxel i's label
    counts = (blocks[..., :, None] == blocks[..., None, :]).sum(-1)
    score = counts * 2 + (blocks != 0).long()
    best = score.argmax(-1, keepdim=True)
    return blocks.gather(-1, best)[..., 0]
