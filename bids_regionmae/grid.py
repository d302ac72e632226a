"""The model grid: 2 mm MNI152NLin6Asym, cropped/padded to 96^3.

The source grid is TemplateFlow's ``MNI152NLin6Asym`` at ``res-2`` (91x109x91,
RAS, origin -90,-126,-72), which is also the grid of fMRIPrep's
``MNI152NLin6Asym:res-2`` outputs and of the 2 mm AAL3. NeuroSTORM crops y to
indices 6:102 and pads x and z to 96; the same crop/pad is used for the atlas
and for every BOLD run, so voxel (i, j, k) of the model grid is voxel
(i - 2, j + 6, k - 2) of the source grid. Everything is expressed as affines so
that inputs on other grids are resampled through world coordinates.
"""

from __future__ import annotations

import numpy as np

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
