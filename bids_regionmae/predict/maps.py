"""NIfTI maps of the prediction: on the 96^3 model grid, and back in a run's input space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bids_regionmae.atomic import atomic_path, atomic_write_json
from bids_regionmae.grid import MODEL_AFFINE, MODEL_RES, MODEL_SHAPE, MODEL_SPACE

__all__ = ["model_grid_image", "save_map", "to_input_space", "upsample_to_store"]

SPATIAL_REFERENCE = (f"https://templateflow.s3.amazonaws.com/tpl-{MODEL_SPACE}/"
                     f"tpl-{MODEL_SPACE}_res-02_T1w.nii.gz")
RESOLUTION = {MODEL_RES: "2 mm isotropic MNI152NLin6Asym grid cropped/padded to 96x96x96 (NeuroSTORM input grid)"}


def upsample_to_store(volume: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Repeat each voxel of the model's grid over its block of the 96^3 store grid.

    Parameters
    ----------
    volume : ndarray, shape (X, Y, Z) or (X, Y, Z, T)
        On the model's grid (the store grid average-pooled by ``factors``).
    factors : sequence of 3 int

    Returns
    -------
    ndarray, shape (96, 96, 96) or (96, 96, 96, T)
    """
    out = np.asarray(volume)
    for axis, f in enumerate(factors):
        if int(f) > 1:
            out = np.repeat(out, int(f), axis=axis)
    return out


def model_grid_image(data: np.ndarray, tr: float | None = None, int16: bool = False) -> nib.Nifti1Image:
    """A NIfTI image on the 96^3 model grid (MNI152NLin6Asym 2 mm; sform/qform code 4).

    Parameters
    ----------
    data : ndarray, shape (96, 96, 96) or (96, 96, 96, T)
    tr : float, optional
        Repetition time (s) for 4-D data.
    int16 : bool
        Store as scaled int16 (smaller files for 4-D data).
    """
    return _image(np.asarray(data, dtype=np.float32), MODEL_AFFINE, tr, int16)


def _image(data: np.ndarray, affine: np.ndarray, tr: float | None, int16: bool) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=4)
    img.header.set_qform(affine, code=4)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None and data.ndim == 4:
        zooms = list(img.header.get_zooms())
        zooms[3] = float(tr)
        img.header.set_zooms(zooms)
    if int16:
        img.set_data_dtype(np.int16)
    return img


def to_input_space(data: np.ndarray, source_affine: Sequence[Sequence[float]], source_shape: Sequence[int],
                   order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample a model-grid map onto a run's source grid by world coordinates.

    Parameters
    ----------
    data : ndarray, shape (96, 96, 96) or (96, 96, 96, T)
        On the model grid (:data:`bids_regionmae.grid.MODEL_AFFINE`).
    source_affine : 4x4 array
        Affine of the source BOLD (from the model-ready sidecar's ``source_grid``).
    source_shape : sequence of int
        Its shape (the first three entries are used).
    order : int
        Spline order (1 = trilinear, 0 = nearest).

    Returns
    -------
    data : ndarray, shape source_shape[:3] (+ (T,))
        float32; 0 outside the model grid.
    affine : ndarray, shape (4, 4)
    """
    affine = np.asarray(source_affine, dtype=float)
    shape = tuple(int(s) for s in source_shape[:3])
    vox2vox = np.linalg.inv(MODEL_AFFINE) @ affine  # source voxel -> model voxel
    data = np.asarray(data, dtype=np.float32)
    frames = data[..., None] if data.ndim == 3 else data
    out = np.zeros(shape + (frames.shape[3],), dtype=np.float32)
    shift = vox2vox[:3, 3]
    if np.allclose(vox2vox[:3, :3], np.eye(3)) and np.allclose(shift, np.round(shift), atol=1e-4):
        # same voxel size and axes, integer offset (e.g. the 2 mm MNI152NLin6Asym grid): a crop/pad, exact
        src, dst = [], []
        for offset, n_src, n_dst in zip(np.round(shift).astype(int), frames.shape[:3], shape, strict=True):
            start_dst, start_src = max(-offset, 0), max(offset, 0)
            length = max(0, min(n_dst - start_dst, n_src - start_src))
            src.append(slice(start_src, start_src + length))
            dst.append(slice(start_dst, start_dst + length))
        out[tuple(dst)] = frames[tuple(src)]
        return (out[..., 0] if data.ndim == 3 else out), affine
    from scipy.ndimage import map_coordinates

    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = vox2vox[:3, :3] @ grid + vox2vox[:3, 3:4]
    for t in range(frames.shape[3]):
        out[..., t] = map_coordinates(frames[..., t], coords, order=order, mode="constant", cval=0.0,
                                      prefilter=False).reshape(shape)
    return (out[..., 0] if data.ndim == 3 else out), affine


def save_map(path: str | Path, data: np.ndarray, sidecar: Mapping[str, Any], *, json_path: str | Path,
             affine: np.ndarray | None = None, tr: float | None = None, int16: bool = False) -> list[Path]:
    """Write a map and its JSON sidecar atomically.

    Parameters
    ----------
    path : path
        ``.nii.gz`` target.
    data : ndarray, shape (X, Y, Z) or (X, Y, Z, T)
    sidecar : mapping
        JSON content.
    json_path : path
    affine : ndarray, shape (4, 4), optional
        Default: the model grid's.
    tr : float, optional
    int16 : bool

    Returns
    -------
    list of Path
        The image and the sidecar.
    """
    if affine is None:
        if tuple(np.shape(data)[:3]) != MODEL_SHAPE:
            raise ValueError(f"a map without affine must be on the model grid {MODEL_SHAPE}, got {np.shape(data)}")
        img = model_grid_image(data, tr, int16)
    else:
        img = _image(np.asarray(data, dtype=np.float32), affine, tr, int16)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    atomic_write_json(json_path, dict(sidecar))
    return [Path(path), Path(json_path)]
