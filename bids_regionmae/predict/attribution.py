"""Region attribution of a classifier: occlusion and integrated gradients, projected onto AAL3 regions.

Both methods take a *forward function* ``forward(x, token_mask) -> outputs``
with ``x`` of shape (B, 1, X, Y, Z, T), ``token_mask`` a BoolTensor
(B, D, H, W, T) or None, and outputs of shape (B, K) (logits, or a
regression output with K = 1), so that they work with any model: the
fine-tuned NeuroSTORM classifier or a handcrafted module.

Occlusion
    A region (group) is removed in every frame, either by setting its
    in-brain voxels to the background value of the store (``mode="zero"``,
    voxel-exact) or by replacing its patches with the model's mask token
    (``mode="mask-token"``, as in region-aware pretraining). The importance
    is the drop of the target output, ``f(x) - f(x_occluded)``: positive
    when the region carries evidence for the target class.
Integrated gradients (Sundararajan et al. 2017)
    ``(x - x0) * mean_k grad f(x0 + a_k (x - x0))`` over ``steps`` points
    ``a_k = (k + 0.5) / steps`` (midpoint rule) from a zero baseline
    ``x0``; the points are evaluated in batches. Completeness: the sum of
    the attributions approximates ``f(x) - f(x0)``; the gap is reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "ForwardFn",
    "IGResult",
    "OCCLUSION_MODES",
    "integrated_gradients",
    "occlusion",
    "project_onto_regions",
    "select_target",
]

ForwardFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
OCCLUSION_MODES: tuple[str, ...] = ("zero", "mask-token")


def select_target(outputs: torch.Tensor, target: int | None) -> torch.Tensor:
    """The target output of each sample.

    Parameters
    ----------
    outputs : Tensor, shape (B, K)
    target : int or None
        Column; None takes column 0 when K == 1, else each sample's argmax.

    Returns
    -------
    Tensor, shape (B,)
    """
    if outputs.dim() == 1:
        outputs = outputs[:, None]
    if target is None:
        if outputs.shape[1] == 1:
            return outputs[:, 0]
        return outputs.gather(1, outputs.argmax(1, keepdim=True))[:, 0]
    return outputs[:, int(target)]


def occlusion(forward: ForwardFn, x: torch.Tensor, regions: Mapping[str, torch.Tensor], *, target: int | None,
              mode: str = "zero", patch_size: Sequence[int] | None = None, background: float = 0.0,
              brain: torch.Tensor | None = None, autocast: Callable[[], Any] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Change of the target output when each region is occluded in every frame.

    Parameters
    ----------
    forward : callable
        ``forward(x (B, 1, X, Y, Z, T), token_mask (B, D, H, W, T) or None) -> (B, K)``.
    x : Tensor, shape (B, 1, X, Y, Z, T)
    regions : mapping of str to BoolTensor
        ``mode="zero"``: voxel maps, shape (X, Y, Z); ``mode="mask-token"``:
        patch maps, shape (D, H, W).
    target : int or None
        Output column (see :func:`select_target`).
    mode : {'zero', 'mask-token'}
    patch_size : sequence of 4 int, optional
        Needed for ``mask-token`` (token grid size).
    background : float
        Value written into occluded voxels (``zero``).
    brain : BoolTensor, shape (B, X, Y, Z) or (X, Y, Z), optional
        ``zero``: only in-brain voxels of the region are occluded.
    autocast : callable, optional
        Context-manager factory for the forward passes.

    Returns
    -------
    base : Tensor, shape (B,)
        Target output of the intact input (float32).
    importance : dict of str to Tensor, shape (B,)
        ``base - f(occluded)`` per region (float32).
    """
    if mode not in OCCLUSION_MODES:
        raise ValueError(f"occlusion mode must be one of {OCCLUSION_MODES}, got {mode!r}")
    ctx = autocast or contextlib.nullcontext
    B, _, X, Y, Z, T = x.shape
    with torch.no_grad():
        with ctx():
            out = forward(x, None)
        out = out.float() if out.dim() == 2 else out.float()[:, None]
        if target is not None:
            columns = torch.full((B,), int(target), dtype=torch.long, device=out.device)
        elif out.shape[1] == 1:
            columns = torch.zeros(B, dtype=torch.long, device=out.device)
        else:  # each sample's predicted class at the intact input
            columns = out.argmax(1)
        base = out.gather(1, columns[:, None])[:, 0]
        importance: dict[str, torch.Tensor] = {}
        for name, region in regions.items():
            region = region.to(x.device)
            if mode == "zero":
                vox = region.bool()[None].expand(B, X, Y, Z)
                if brain is not None:
                    vox = vox & (brain.to(x.device).bool() if brain.dim() == 4 else brain.to(x.device).bool()[None])
                xo = x.masked_fill(vox[:, None, :, :, :, None], float(background))
                with ctx():
                    occ = forward(xo, None).float()
            else:
                if patch_size is None:
                    raise ValueError("occlusion mode 'mask-token' needs patch_size")
                pt = int(patch_size[3]) if len(patch_size) > 3 else 1
                tm = region.bool()[None, :, :, :, None].expand(B, *region.shape, T // pt).contiguous()
                with ctx():
                    occ = forward(x, tm).float()
            occ = occ if occ.dim() == 2 else occ[:, None]
            importance[name] = base - occ.gather(1, columns[:, None])[:, 0]
    return base, importance


@dataclass
class IGResult:
    """Integrated gradients of one input.

    Attributes
    ----------
    attribution : Tensor, shape (1, X, Y, Z, T)
        Per-voxel, per-frame attribution (float32, CPU).
    output : float
        ``f(x)``, the target output of the input.
    baseline_output : float
        ``f(x0)``.
    total : float
        Sum of the attributions.
    completeness_gap : float
        ``total - (output - baseline_output)``.
    steps : int
    """

    attribution: torch.Tensor
    output: float
    baseline_output: float
    total: float
    completeness_gap: float
    steps: int


def integrated_gradients(forward: ForwardFn, x: torch.Tensor, *, target: int | None, steps: int = 16,
                         baseline: torch.Tensor | None = None, batch_size: int = 4,
                         autocast: Callable[[], Any] | None = None) -> IGResult:
    """Integrated gradients of the target output of one clip.

    Parameters
    ----------
    forward : callable
        ``forward(x (B, 1, X, Y, Z, T), None) -> (B, K)``; must be differentiable.
    x : Tensor, shape (1, 1, X, Y, Z, T)
    target : int or None
        Output column; None: column 0 for one output, else the argmax at ``x``.
    steps : int
        Points on the straight path (midpoint rule); 16-32 keep the
        completeness gap small for smooth models.
    baseline : Tensor, shape like ``x``, optional
        Default zeros (the store's background after z-scoring).
    batch_size : int
        Path points per forward/backward pass.
    autocast : callable, optional
        Context-manager factory (bf16 on GPU); fp32 gives the smallest gap.

    Returns
    -------
    IGResult
    """
    if x.shape[0] != 1:
        raise ValueError(f"integrated_gradients takes one clip, shape (1, 1, X, Y, Z, T); got {tuple(x.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ctx = autocast or contextlib.nullcontext
    x = x.detach().float()
    x0 = torch.zeros_like(x) if baseline is None else baseline.detach().to(x.device, torch.float32)
    with torch.no_grad(), ctx():
        out = forward(torch.cat([x, x0]), None).float()
    if target is None:
        target = 0 if out.shape[-1] == 1 else int(out[0].argmax())
    fx, fb = float(out[0, target]), float(out[1, target])
    alphas = (torch.arange(steps, dtype=torch.float32, device=x.device) + 0.5) / steps
    grad_sum = torch.zeros_like(x[0])
    delta = x - x0
    for start in range(0, steps, max(1, int(batch_size))):
        a = alphas[start:start + batch_size].view(-1, 1, 1, 1, 1, 1)
        points = (x0 + a * delta).requires_grad_(True)
        with torch.enable_grad(), ctx():
            y = forward(points, None).float()[:, target].sum()
        (grad,) = torch.autograd.grad(y, points)
        grad_sum += grad.float().sum(0)
    attribution = (delta[0] * grad_sum / steps).detach()
    total = float(attribution.sum())
    return IGResult(attribution.cpu(), fx, fb, total, total - (fx - fb), steps)


def project_onto_regions(values: torch.Tensor | np.ndarray, voxel_labels: torch.Tensor | np.ndarray,
                         groups: Mapping[str, Sequence[int]], brain: torch.Tensor | np.ndarray | None = None
                         ) -> tuple[dict[int, dict[str, float]], dict[str, dict[str, float]]]:
    """Summarise a voxel-wise attribution per atlas region and per group.

    Parameters
    ----------
    values : array, shape (X, Y, Z, T) or (X, Y, Z)
        Attribution per voxel (and frame).
    voxel_labels : integer array, shape (X, Y, Z)
    groups : mapping of str to sequence of int
    brain : bool array, shape (X, Y, Z), optional
        Only in-brain voxels count.

    Returns
    -------
    per_label : dict of int to dict
        ``{"mean_abs": mean over voxels of the frame-averaged |attribution|,
        "sum": signed sum over voxels and frames, "n_voxels": int}``.
    per_group : dict of str to dict
        The same over the union of each group's labels.
    """
    v = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).float().cpu()
    if v.dim() == 4:
        abs_mean = v.abs().mean(-1)
        signed = v.sum(-1)
    else:
        abs_mean, signed = v.abs(), v
    lab = torch.as_tensor(np.asarray(voxel_labels) if not isinstance(voxel_labels, torch.Tensor)
                          else voxel_labels).long().cpu()
    if brain is not None:
        keep = torch.as_tensor(np.asarray(brain) if not isinstance(brain, torch.Tensor) else brain).bool().cpu()
        lab = torch.where(keep, lab, torch.zeros_like(lab))
    n = int(lab.max()) + 1 if lab.numel() else 1
    flat = lab.reshape(-1).numpy()
    abs_sum = np.bincount(flat, weights=abs_mean.reshape(-1).double().numpy(), minlength=n)
    sig_sum = np.bincount(flat, weights=signed.reshape(-1).double().numpy(), minlength=n)
    count = np.bincount(flat, minlength=n)
    per_label = {int(i): {"mean_abs": float(abs_sum[i] / count[i]), "sum": float(sig_sum[i]),
                          "n_voxels": int(count[i])} for i in range(1, n) if count[i]}
    per_group = {}
    for g, labels in groups.items():
        idx = [i for i in labels if 0 < i < n]
        c = int(count[idx].sum()) if idx else 0
        per_group[g] = {"mean_abs": float(abs_sum[idx].sum() / c) if c else float("nan"),
                        "sum": float(sig_sum[idx].sum()) if c else float("nan"), "n_voxels": c}
    return per_label, per_group
