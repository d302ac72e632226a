"""Token masks at voxel level (the ``voxel`` masking-level option)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .patches import check_patch_size

__all__ = ["apply_voxel_mask", "token_to_voxel_mask"]


def token_to_voxel_mask(token_mask: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Upsample a token mask to the voxel grid.

    Parameters
    ----------
    token_mask : BoolTensor, shape (B, D, H, W, T)
        True = masked token.
    patch_size : sequence of 3 or 4 int
        ``(px, py, pz[, pt])``.

    Returns
    -------
    BoolTensor, shape (B, 1, D*px, H*py, W*pz, T*pt)
    """
    if token_mask.dim() != 5:
        raise ValueError(f"token_mask must have shape (B, D, H, W, T), got {tuple(token_mask.shape)}")
    px, py, pz, pt = check_patch_size(patch_size)
    B, D, H, W, T = token_mask.shape
    up = token_mask.bool()[:, :, None, :, None, :, None, :, None]
    up = up.expand(B, D, px, H, py, W, pz, T, pt)
    return up.reshape(B, 1, D * px, H * py, W * pz, T * pt)


def apply_voxel_mask(x: torch.Tensor, token_mask: torch.Tensor, patch_size: Sequence[int],
                     mask_value: float = 0.0) -> torch.Tensor:
    """Set the voxels of masked tokens to ``mask_value`` in the model input.

    Used for voxel-level masking, where the input itself is masked (instead
    of, or before, replacing masked tokens by a learnable mask token).

    Parameters
    ----------
    x : Tensor, shape (B, C, X, Y, Z, T)
        Model input.
    token_mask : BoolTensor, shape (B, X/px, Y/py, Z/pz, T/pt)
    patch_size : sequence of 3 or 4 int
    mask_value : float
        Value written into masked voxels; use the background constant of the
        preprocessing (0 after in-mask z-scoring) so masked voxels look like
        background.

    Returns
    -------
    Tensor, shape (B, C, X, Y, Z, T)
        A new tensor; ``x`` is not modified. Differentiable w.r.t. ``x``.
    """
    vmask = token_to_voxel_mask(token_mask.to(x.device), patch_size)
    if vmask.shape[0] != x.shape[0] or vmask.shape[2:] != x.shape[2:]:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} with patch_size {tuple(patch_size)} "
                         f"does not match input of shape {tuple(x.shape)}")
    return x.masked_fill(vmask, mask_value)
