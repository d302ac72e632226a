"""The pretraining masks of a model directory: ``masks/mask_tokens.npy``, ``mask_voxels.nii.gz``, ``masking.json``.

``mask_tokens.npy`` is the bool (D, H, W) map of the patches the masker can
mask (region: masked in every frame; random: the candidates; random-region:
the union of the pooled regions); ``mask_voxels.nii.gz`` is the same map on
the 96^3 model grid (MNI152NLin6Asym 2 mm); ``masking.json`` is the masking
record (plan, patch counts, atlas provenance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.atomic import atomic_path, atomic_write_json
from bids_regionmae.grid import MODEL_AFFINE

if TYPE_CHECKING:
    import torch

    from bids_regionmae.masking import Masker

__all__ = ["never_masked_labels", "write_mask_files"]


def _voxel_map(token_map: np.ndarray, patch_size: Sequence[int], factors: Sequence[int]) -> np.ndarray:
    """A token map repeated back onto the 96^3 store grid, uint8 (X, Y, Z)."""
    out = token_map
    for axis in range(3):
        out = np.repeat(out, int(patch_size[axis]) * int(factors[axis]), axis=axis)
    return out.astype(np.uint8)


def write_mask_files(folder: Path, masker: Masker, record: Mapping[str, Any], patch_size: Sequence[int],
                     factors: Sequence[int]) -> dict[str, Any]:
    """Write the three mask files into ``folder``; returns the masking record as written.

    Parameters
    ----------
    folder : Path
        ``<model dir>/masks``.
    masker : Masker
    record : mapping
        Everything ``masking.json`` holds besides the file descriptions.
    patch_size : sequence of int
        The model's patch size.
    factors : sequence of 3 int
        Pooling factors from the store grid to the model grid.
    """
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    token_map = masker.region_patch_map.detach().cpu().numpy().astype(bool)  # (D, H, W)
    with atomic_path(folder / "mask_tokens.npy") as tmp:
        np.save(tmp, token_map)
    img = nib.Nifti1Image(_voxel_map(token_map, patch_size, factors), MODEL_AFFINE)
    img.header.set_xyzt_units("mm")
    img.header.set_sform(MODEL_AFFINE, code=4)
    img.header.set_qform(MODEL_AFFINE, code=4)
    with atomic_path(folder / "mask_voxels.nii.gz") as tmp:
        nib.save(img, str(tmp))
    written = {**record, "files": {"mask_tokens.npy": "bool (D, H, W): " + masker.kind.map_description,
                                   "mask_voxels.nii.gz": "the same map on the 96^3 model grid"}}
    atomic_write_json(folder / "masking.json", written)
    return written


def never_masked_labels(masker: Masker, voxel_labels: torch.Tensor, labels: Sequence[int]) -> list[int]:
    """Labels of the selected region with no voxel in any patch that gets masked (region strategies only)."""
    if not masker.kind.uses_regions or not labels:
        return []
    import torch

    px, py, pz = masker.patch_size[:3]
    covered = masker.region_patch_map.cpu().repeat_interleave(px, 0).repeat_interleave(py, 1)
    covered = covered.repeat_interleave(pz, 2)
    present = set(torch.unique(voxel_labels[covered]).tolist())
    return sorted(int(i) for i in labels if int(i) not in present)
