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

PatchRule = Literal["any", "majority", "all"]
PATCH_RULES: tuple[str, ...] = ("any", "majority", "all")


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
    for axis, (n, p) in enumerate(zip(vol.shape[1:], patch_size)):
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
