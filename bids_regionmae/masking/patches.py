"""Voxel-to-patch reductions of region label maps (pure PyTorch).

A patch belongs to a region under one of three rules:

- ``any``: at least one voxel of the patch is in the region;
- ``majority``: more than half of the patch's voxels are in the region;
- ``all``: every voxel of the patch is in the region.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from bids_regionmae.choices import PATCH_RULES

PatchRule = Literal[PATCH_RULES]


def patch_fraction(voxel_mask: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Fraction of each patch's voxels that are True.

    Parameters
    ----------
    voxel_mask : BoolTensor, shape (X, Y, Z) or (B, X, Y, Z)
        Voxel membership, e.g. ``labels == k``.
    patch_size : sequence of 3 int
        Patch edge lengths in voxels; must divide the spatial shape.

    Returns
    -------
    FloatTensor, shape (X/px, Y/py, Z/pz) or (B, X/px, Y/py, Z/pz)
    """
    squeeze = voxel_mask.dim() == 3
    vol = voxel_mask[None] if squeeze else voxel_mask
    for axis, (n, p) in enumerate(zip(vol.shape[1:], patch_size, strict=False)):
        if n % p:
            raise ValueError(f"patch_size {tuple(patch_size)} does not divide the grid "
                             f"{tuple(vol.shape[1:])} along axis {axis}")
    frac = F.avg_pool3d(vol[:, None].float(), kernel_size=tuple(patch_size), stride=tuple(patch_size))[:, 0]
    return frac[0] if squeeze else frac


def apply_patch_rule(fraction: torch.Tensor, rule: PatchRule) -> torch.Tensor:
    """Turn per-patch voxel fractions into patch membership under ``rule``.

    Parameters
    ----------
    fraction : FloatTensor, any shape
        Output of :func:`patch_fraction`.
    rule : {'any', 'majority', 'all'}

    Returns
    -------
    BoolTensor, same shape as ``fraction``
    """
    if rule == "any":
        return fraction > 0
    if rule == "majority":
        return fraction > 0.5
    if rule == "all":
        return fraction >= 1.0 - 1e-6
    raise ValueError(f"rule must be one of {PATCH_RULES}, got {rule!r}")


def region_patches(voxel_labels: torch.Tensor, labels: Iterable[int], patch_size: Sequence[int],
                   rule: PatchRule = "majority") -> torch.Tensor:
    """Patches that belong to the union of ``labels`` under ``rule``.

    Parameters
    ----------
    voxel_labels : IntTensor, shape (X, Y, Z)
        Atlas label per voxel (0 = background).
    labels : iterable of int
        Atlas label indices forming the region (e.g. a lobe group).
    patch_size : sequence of 3 int
    rule : {'any', 'majority', 'all'}

    Returns
    -------
    BoolTensor, shape (X/px, Y/py, Z/pz)
    """
    wanted = torch.as_tensor(sorted(set(int(v) for v in labels)), dtype=voxel_labels.dtype,
                             device=voxel_labels.device)
    member = torch.isin(voxel_labels, wanted)
    return apply_patch_rule(patch_fraction(member, patch_size), rule)


def check_patch_size(patch_size: Sequence[int], spatial_shape: Sequence[int] | None = None,
                     n_frames: int | None = None) -> tuple[int, int, int, int]:
    """Validate a patch size and return it as 4 ints ``(px, py, pz, pt)``.

    Parameters
    ----------
    patch_size : sequence of 3 or 4 int
        Patch edge lengths in voxels (and frames); a 3-sequence means ``pt = 1``.
    spatial_shape : sequence of 3 int, optional
        Voxel grid ``(X, Y, Z)`` the patch size must divide.
    n_frames : int, optional
        Number of frames ``T`` that ``pt`` must divide.

    Returns
    -------
    tuple of 4 int
    """
    size = tuple(int(p) for p in patch_size)
    if len(size) == 3:
        size = size + (1,)
    if len(size) != 4 or any(p < 1 for p in size):
        raise ValueError(f"patch_size must be 3 or 4 positive ints (px, py, pz[, pt]), "
                         f"got {tuple(patch_size)}")
    if spatial_shape is not None:
        for axis, (n, p) in enumerate(zip(spatial_shape, size[:3], strict=True)):
            if n % p:
                raise ValueError(f"patch_size {size} does not divide the voxel grid "
                                 f"{tuple(spatial_shape)} along axis {axis}")
    if n_frames is not None and n_frames % size[3]:
        raise ValueError(f"temporal patch size {size[3]} does not divide the number of frames {n_frames}")
    return size  # type: ignore[return-value]


def label_patch_fractions(voxel_labels: torch.Tensor,
                          patch_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of each patch covered by each non-zero label, in one pass.

    Equivalent to calling :func:`patch_fraction` on ``voxel_labels == k`` for
    every label ``k`` but costs one ``bincount`` over the voxels instead of one
    pooling per label (166 for AAL3).

    Parameters
    ----------
    voxel_labels : IntTensor, shape (X, Y, Z)
        Atlas label per voxel (0 = background).
    patch_size : sequence of 3 (or 4) int
        Spatial patch size; a 4th (temporal) entry is ignored.

    Returns
    -------
    labels : LongTensor, shape (L,)
        Sorted non-zero labels present in ``voxel_labels``.
    fractions : FloatTensor, shape (L, X/px, Y/py, Z/pz)
        ``fractions[i]`` is the fraction of each patch's voxels labelled ``labels[i]``.
    """
    if voxel_labels.dim() != 3:
        raise ValueError(f"voxel_labels must be 3D (X, Y, Z), got shape {tuple(voxel_labels.shape)}")
    px, py, pz, _ = check_patch_size(patch_size, voxel_labels.shape)
    X, Y, Z = voxel_labels.shape
    D, H, W = X // px, Y // py, Z // pz
    dev = voxel_labels.device
    uniq, inverse = torch.unique(voxel_labels, return_inverse=True)
    ix = torch.arange(X, device=dev) // px
    iy = torch.arange(Y, device=dev) // py
    iz = torch.arange(Z, device=dev) // pz
    patch_id = (ix[:, None, None] * H + iy[None, :, None]) * W + iz[None, None, :]
    n_patches = D * H * W
    counts = torch.bincount((inverse * n_patches + patch_id).reshape(-1),
                            minlength=uniq.numel() * n_patches)
    fractions = counts.view(uniq.numel(), D, H, W).float() / float(px * py * pz)
    keep = uniq != 0
    return uniq[keep].long(), fractions[keep]
