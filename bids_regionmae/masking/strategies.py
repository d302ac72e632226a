"""Token-mask sampling strategies (pure PyTorch).

Every strategy is a pure function of a patch-level map, the token grid and a
``torch.Generator``; it returns a boolean token mask of shape
``(B, D, H, W, T)`` (True = masked) on the requested device. All strategies
are *tube* masks: the same spatial patches are masked in every frame.

Randomness is drawn on the generator's device and then moved to ``device``,
so a seeded CPU generator gives the same masks whatever device the model runs
on (CPU and CUDA generators produce different streams: use a CPU generator
for masks that must match across machines). Sampling is vectorised over the
batch; the only per-call work is one ``rand`` + ``argsort`` over the patches
(or regions).

Counts use Python's :func:`round` (half to even), clamped to at least one
patch, so ``ratio=0.5`` of 4096 candidates masks exactly 2048 patches.
"""

from __future__ import annotations

import logging

import torch

from ..errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "EmptyRegionError",
    "n_to_mask",
    "random_region_mask",
    "random_tube_mask",
    "region_tube_mask",
]


class EmptyRegionError(UsageError, ValueError):
    """The selected regions have no patch under the patch rule (exit 64)."""


def n_to_mask(fraction: float, n: int) -> int:
    """Number of items masked out of ``n`` at ``fraction``.

    Parameters
    ----------
    fraction : float
        In (0, 1].
    n : int
        Number of candidates.

    Returns
    -------
    int
        ``round(fraction * n)`` clamped to ``[1, n]`` (0 when ``n == 0``).
    """
    if n <= 0:
        return 0
    return int(min(max(round(fraction * n), 1), n))


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device | str | None) -> torch.Tensor:
    """Uniform noise drawn on the generator's device, returned on ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _select_k(candidates: torch.Tensor, k: int, batch_size: int, generator: torch.Generator | None,
              device: torch.device | str | None) -> torch.Tensor:
    """Per sample, a uniformly random subset of exactly ``k`` candidate positions.

    Parameters
    ----------
    candidates : BoolTensor, shape (P,)
    k : int
        ``0 <= k <= candidates.sum()``.

    Returns
    -------
    BoolTensor, shape (B, P)
    """
    n_pos = candidates.numel()
    noise = _uniform((batch_size, n_pos), generator, device)
    cand = candidates.to(device)
    # Non-candidates sort last: uniform noise is < 1.
    noise = torch.where(cand, noise, torch.full_like(noise, 2.0))
    idx = torch.argsort(noise, dim=1)[:, :k]
    out = torch.zeros(batch_size, n_pos, dtype=torch.bool, device=device)
    return out.scatter_(1, idx, True)


def _tube(spatial: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(B, D, H, W) -> (B, D, H, W, T), contiguous."""
    return spatial[..., None].expand(*spatial.shape, n_frames).contiguous()


def _check_map(patch_map: torch.Tensor, name: str, dim: int = 3) -> torch.Tensor:
    if patch_map.dim() != dim:
        raise ValueError(f"{name} must be a {dim}D tensor, got shape {tuple(patch_map.shape)}")
    return patch_map.bool()


def random_tube_mask(candidates: torch.Tensor, batch_size: int, n_frames: int, ratio: float, *,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """NeuroSTORM's random tube baseline: random spatial patches masked in every frame.

    Parameters
    ----------
    candidates : BoolTensor, shape (D, H, W)
        Patches that may be masked: ``torch.ones(D, H, W, dtype=bool)`` for
        all patches (NeuroSTORM), or a brain patch map to mask brain patches only.
    batch_size : int
        ``B``.
    n_frames : int
        Number of temporal tokens ``T``.
    ratio : float
        Masking ratio in (0, 1]; exactly ``n_to_mask(ratio, candidates.sum())``
        patches are masked per sample.
    generator : torch.Generator, optional
        Source of randomness; masks are deterministic given its state.
    device : torch.device or str, optional
        Device of the returned mask (default: the device of ``candidates``).

    Returns
    -------
    BoolTensor, shape (B, D, H, W, T)
        True = masked; identical in every frame.
    """
    cand = _check_map(candidates, "candidates")
    ratio = _check_fraction(ratio, "ratio")
    device = cand.device if device is None else device
    n_cand = int(cand.sum())
    if n_cand == 0:
        raise ValueError("candidates has no True patch: nothing can be masked")
    k = n_to_mask(ratio, n_cand)
    mask = _select_k(cand.reshape(-1), k, batch_size, generator, device)
    return _tube(mask.view(batch_size, *cand.shape), n_frames)


def region_tube_mask(region_map: torch.Tensor, batch_size: int, n_frames: int, *, fraction: float = 1.0,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Mask the patches of a region (or union of regions) in every frame.

    Parameters
    ----------
    region_map : BoolTensor, shape (D, H, W)
        Patches of the selected region(s), e.g. from
        :func:`bids_regionmae.masking.patches.region_patches`.
    batch_size : int
    n_frames : int
        Number of temporal tokens ``T``.
    fraction : float
        In (0, 1]. 1 masks the whole region (the same mask for every sample,
        no randomness used); below 1 masks a random subset of exactly
        ``n_to_mask(fraction, n_region_patches)`` region patches per sample.
    generator : torch.Generator, optional
    device : torch.device or str, optional
        Default: the device of ``region_map``.

    Returns
    -------
    BoolTensor, shape (B, D, H, W, T)

    Raises
    ------
    EmptyRegionError
        If ``region_map`` has no True patch.
    """
    rmap = _check_map(region_map, "region_map")
    fraction = _check_fraction(fraction, "fraction")
    device = rmap.device if device is None else device
    n = int(rmap.sum())
    if n == 0:
        raise EmptyRegionError("region_map has no patch: the selected regions are empty at patch level")
    if fraction >= 1.0:
        spatial = rmap.to(device)[None].expand(batch_size, *rmap.shape)
    else:
        k = n_to_mask(fraction, n)
        spatial = _select_k(rmap.reshape(-1), k, batch_size, generator, device).view(batch_size, *rmap.shape)
    return _tube(spatial, n_frames)


def random_region_mask(region_maps: torch.Tensor, batch_size: int, n_frames: int, ratio: float, *,
                       n_candidates: int | None = None, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Mask a random subset of whole regions per sample, in every frame.

    Regions are drawn in a random order per sample and added until the
    number of masked patches (the union of the drawn regions) reaches
    ``target = n_to_mask(ratio, n_candidates)``. The region that reaches the
    target is kept whole, so the masked count is ``>= target`` and exceeds it
    by less than the size of that last region (the ratio is never exceeded by
    more than one region). If all regions together do not reach the target,
    every region is masked.

    Parameters
    ----------
    region_maps : BoolTensor, shape (R, D, H, W)
        Patch map of each candidate region (non-empty regions only; regions
        may overlap, e.g. under the ``any`` rule: the union is counted).
    batch_size : int
    n_frames : int
        Number of temporal tokens ``T``.
    ratio : float
        Target masked fraction of ``n_candidates``, in (0, 1].
    n_candidates : int, optional
        Denominator of the ratio, e.g. the number of brain patches. Default:
        the number of patches in the union of all regions.
    generator : torch.Generator, optional
    device : torch.device or str, optional
        Default: the device of ``region_maps``.

    Returns
    -------
    BoolTensor, shape (B, D, H, W, T)
    """
    maps = _check_map(region_maps, "region_maps", dim=4)
    ratio = _check_fraction(ratio, "ratio")
    device = maps.device if device is None else device
    n_regions = maps.shape[0]
    if n_regions == 0:
        raise EmptyRegionError("random_region_mask got no region")
    flat = maps.reshape(n_regions, -1).to(device)
    if n_candidates is None:
        n_candidates = int(flat.any(0).sum())
    target = n_to_mask(ratio, int(n_candidates))
    order = torch.argsort(_uniform((batch_size, n_regions), generator, device), dim=1)
    ordered = flat[order].to(torch.uint8)  # (B, R, P)
    union = ordered.cummax(dim=1).values  # union of the first r+1 regions
    counts = union.sum(dim=2)  # (B, R), non-decreasing
    reached = counts >= target
    # index of the first region that reaches the target, or the last region
    stop = torch.where(reached.any(1), reached.int().argmax(1), torch.full_like(counts[:, 0], n_regions - 1))
    spatial = union[torch.arange(batch_size, device=device), stop].bool()
    return _tube(spatial.view(batch_size, *maps.shape[1:]), n_frames)
