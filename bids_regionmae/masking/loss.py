"""Reconstruction losses restricted to masked tokens (and to the brain).

Both functions work on patch views of the volumes (a reshape, no copy) and
contract the within-patch axes with ``einsum``: no voxel-level mask tensor is
built and there is no Python loop over voxels, patches or samples. Sums are
taken in float32 whatever the input dtype (e.g. bf16 under autocast).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .patches import check_patch_size

__all__ = ["masked_mse", "per_region_mse"]

_PATCH_AXES = (1, 3, 5, 7, 9)  # c, px, py, pz, pt of a patchified volume


def _check_volumes(recon: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor,
                   patch_size: Sequence[int]) -> tuple[int, int, int, int]:
    if recon.dim() != 6:
        raise ValueError(f"recon must have shape (B, C, X, Y, Z, T), got {tuple(recon.shape)}")
    if recon.shape != target.shape:
        raise ValueError(f"recon {tuple(recon.shape)} and target {tuple(target.shape)} differ in shape")
    size = check_patch_size(patch_size, recon.shape[2:5], recon.shape[5])
    B, _, X, Y, Z, T = recon.shape
    grid = (B, X // size[0], Y // size[1], Z // size[2], T // size[3])
    if tuple(token_mask.shape) != grid:
        raise ValueError(f"token_mask must have shape (B, D, H, W, T) = {grid} for input "
                         f"{tuple(recon.shape)} and patch_size {size}, got {tuple(token_mask.shape)}")
    return size


def _patchify(x: torch.Tensor, size: tuple[int, int, int, int]) -> torch.Tensor:
    """(B, C, X, Y, Z, T) -> (B, C, D, px, H, py, W, pz, T', pt), a view when possible."""
    B, C, X, Y, Z, T = x.shape
    px, py, pz, pt = size
    return x.reshape(B, C, X // px, px, Y // py, py, Z // pz, pz, T // pt, pt)


def _brain_patches(brain_mask: torch.Tensor, batch_size: int, size: tuple[int, int, int, int],
                   spatial: Sequence[int], device: torch.device) -> torch.Tensor:
    """Brain mask as float32 (Bb, D, px, H, py, W, pz), Bb in {1, B}."""
    if brain_mask.dim() == 3:
        brain_mask = brain_mask[None]
    if brain_mask.dim() != 4 or tuple(brain_mask.shape[1:]) != tuple(spatial) \
            or brain_mask.shape[0] not in (1, batch_size):
        raise ValueError(f"brain_mask must have shape (X, Y, Z) or (B, X, Y, Z) = "
                         f"{tuple(spatial)} / ({batch_size}, ...), got {tuple(brain_mask.shape)}")
    X, Y, Z = spatial
    px, py, pz, _ = size
    w = brain_mask.to(device=device, dtype=torch.float32)
    return w.reshape(w.shape[0], X // px, px, Y // py, py, Z // pz, pz)


def masked_mse(recon: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor,
               patch_size: Sequence[int], brain_mask: torch.Tensor | None = None,
               include_background: bool = False, norm_patch: bool = False) -> torch.Tensor:
    """Mean squared error over the voxels of masked tokens (inside the brain).

    Parameters
    ----------
    recon : Tensor, shape (B, C, X, Y, Z, T)
        Model reconstruction (``C = 1`` for fMRI).
    target : Tensor, shape (B, C, X, Y, Z, T)
        The unmasked input.
    token_mask : BoolTensor, shape (B, X/px, Y/py, Z/pz, T/pt)
        True = masked token; only masked tokens contribute.
    patch_size : sequence of 3 or 4 int
        ``(px, py, pz[, pt])``.
    brain_mask : BoolTensor, shape (X, Y, Z) or (B, X, Y, Z), optional
        Voxels inside the brain. With ``include_background=False`` only these
        voxels of masked tokens count. ``None`` means every voxel counts.
    include_background : bool
        If True, every voxel of a masked token counts, ``brain_mask`` is
        ignored (NeuroSTORM parity).
    norm_patch : bool
        MAE's ``norm_pix_loss``: normalise each patch of the target by its
        mean and (biased) variance, ``(t - mean) / sqrt(var + 1e-6)``, before
        the loss; the statistics are taken over the voxels that count (brain
        voxels of the patch, or all of them) and over channels. The model then
        learns to predict normalised patches.

    Returns
    -------
    Tensor, shape ()
        Float32 scalar, differentiable w.r.t. ``recon``. 0 (still attached to
        the graph) when no voxel counts, e.g. every masked patch is background.
    """
    size = _check_volumes(recon, target, token_mask, patch_size)
    B, C = recon.shape[:2]
    pt = size[3]
    r = _patchify(recon.float(), size)
    t = _patchify(target.to(device=recon.device, dtype=torch.float32), size)
    tok = token_mask.to(device=recon.device, dtype=torch.float32)  # (B, D, H, W, T')
    w = None
    if brain_mask is not None and not include_background:
        w = _brain_patches(brain_mask, B, size, recon.shape[2:5], recon.device)

    if norm_patch:
        with torch.no_grad():
            if w is None:
                mean = t.mean(dim=_PATCH_AXES, keepdim=True)
                var = ((t - mean) ** 2).mean(dim=_PATCH_AXES, keepdim=True)
            else:
                wv = w[:, None, ..., None, None]  # (Bb, 1, D, px, H, py, W, pz, 1, 1)
                n = (wv.sum(dim=_PATCH_AXES, keepdim=True) * C * pt).clamp_min(1.0)
                mean = (t * wv).sum(dim=_PATCH_AXES, keepdim=True) / n
                var = (((t - mean) ** 2) * wv).sum(dim=_PATCH_AXES, keepdim=True) / n
            t = (t - mean) / torch.sqrt(var + 1e-6)

    sq = F.mse_loss(r, t, reduction="none")  # one fused elementwise pass
    if w is None:
        patch_sum = sq.sum(dim=_PATCH_AXES)  # (B, D, H, W, T')
        n_per_patch = torch.full((1, 1, 1, 1), float(C * size[0] * size[1] * size[2] * pt),
                                 device=recon.device)
    else:
        if w.shape[0] == 1:
            patch_sum = torch.einsum("bcdihjwktl,dihjwk->bdhwt", sq, w[0])
        else:
            patch_sum = torch.einsum("bcdihjwktl,bdihjwk->bdhwt", sq, w)
        n_per_patch = w.sum(dim=(2, 4, 6)) * float(C * pt)  # (Bb, D, H, W)
    num = (patch_sum * tok).sum()
    den = (tok * n_per_patch[..., None]).sum()
    return num / den.clamp_min(1.0)


@torch.no_grad()
def per_region_mse(recon: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor,
                   voxel_labels: torch.Tensor, groups: Mapping[str, Sequence[int]],
                   patch_size: Sequence[int], brain_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Reconstruction MSE over masked voxels, per region group (for logging).

    Pools the whole batch: for each group, the mean of the squared error over
    every (sample, channel, voxel, frame) whose voxel carries one of the
    group's labels, lies inside the brain (when ``brain_mask`` is given) and
    belongs to a masked token. Cost is one pass over the volume plus a
    ``scatter_add`` over labels, whatever the number of groups.

    Parameters
    ----------
    recon, target : Tensor, shape (B, C, X, Y, Z, T)
    token_mask : BoolTensor, shape (B, X/px, Y/py, Z/pz, T/pt)
    voxel_labels : IntTensor, shape (X, Y, Z)
        Atlas label per voxel (0 = background).
    groups : mapping of str to sequence of int
        Group name -> atlas labels, e.g. the 7 AAL3 lobes, or one entry per
        region. A label may belong to several groups; label 0 (background)
        is never counted.
    patch_size : sequence of 3 or 4 int
    brain_mask : BoolTensor, shape (X, Y, Z) or (B, X, Y, Z), optional

    Returns
    -------
    dict of str to float
        One entry per group, in the order of ``groups``; ``float('nan')`` for
        a group with no masked (in-brain) voxel in this batch (use
        ``math.isnan`` / nan-aware means when aggregating).
    """
    size = _check_volumes(recon, target, token_mask, patch_size)
    B, C = recon.shape[:2]
    X, Y, Z = recon.shape[2:5]
    if tuple(voxel_labels.shape) != (X, Y, Z):
        raise ValueError(f"voxel_labels must have shape (X, Y, Z) = {(X, Y, Z)}, "
                         f"got {tuple(voxel_labels.shape)}")
    dev = recon.device
    sq = F.mse_loss(_patchify(recon.float(), size), _patchify(target.to(dev, torch.float32), size),
                    reduction="none")
    tok = token_mask.to(device=dev, dtype=torch.float32)
    # per voxel: squared error summed over channels and masked frames, and the number of such values
    err = torch.einsum("bcdihjwktl,bdhwt->bdihjwk", sq, tok).reshape(B, X, Y, Z)
    n_tok = tok.sum(-1) * float(C * size[3])  # (B, D, H, W)
    cnt = n_tok[:, :, None, :, None, :, None].expand(B, X // size[0], size[0], Y // size[1], size[1],
                                                    Z // size[2], size[2]).reshape(B, X, Y, Z)
    if brain_mask is not None:
        w = _brain_patches(brain_mask, B, size, (X, Y, Z), dev).reshape(-1, X, Y, Z)
        err = err * w
        cnt = cnt * w
    labels, inverse = torch.unique(voxel_labels.to(dev), return_inverse=True)
    inverse = inverse.reshape(-1)
    err_l = torch.zeros(labels.numel(), device=dev, dtype=torch.float64)
    cnt_l = torch.zeros_like(err_l)
    err_l.scatter_add_(0, inverse, err.sum(0).reshape(-1).double())
    cnt_l.scatter_add_(0, inverse, cnt.sum(0).reshape(-1).double())
    labels, err_l, cnt_l = labels.cpu(), err_l.cpu(), cnt_l.cpu()
    out: dict[str, float] = {}
    for name, labs in groups.items():
        sel = torch.isin(labels, torch.as_tensor(list(labs), dtype=labels.dtype))
        sel &= labels != 0
        n = float(cnt_l[sel].sum())
        out[name] = float(err_l[sel].sum()) / n if n > 0 else float("nan")
    return out
