"""Build a configured token-mask sampler from a region label map.

:func:`build_masker` does the voxel-to-patch work once (on the target
device); the returned :class:`Masker` then only draws random numbers per
training step::

    masker = build_masker("region", atlas_labels, (6, 6, 6, 1), labels=cerebellum, T=20,
                          brain_mask=brain)
    mask = masker(batch_size=8, generator=gen, device="cuda")  # (8, 16, 16, 16, 20)

Strategies
----------
``random``
    NeuroSTORM's random tube masking: ``round(ratio * n)`` random patches
    masked in every frame, out of ``n`` candidate patches. ``candidates="all"``
    (default, NeuroSTORM and the paper's baseline) draws from every patch of
    the grid; ``candidates="brain"`` only from brain patches. In expectation
    both mask the same share of the brain.
``region``
    The patches of the selected label(s) (their union, under ``rule``), in
    every frame. ``fraction < 1`` masks a random ``round(fraction * n)`` of
    them per sample.
``random-region``
    Whole regions drawn at random per sample until ``round(ratio * n)``
    patches are masked, where ``n`` is the number of patches the region pool
    covers (the union of its regions' patches under ``rule``: the maskable
    area, so every ratio in (0, 1] is reachable). The region that reaches the
    target is kept whole, so the ratio is exceeded by less than one region.
    The regions are the non-zero labels (of ``labels`` if given, else all
    labels present) that keep at least one patch under ``rule``, each
    region's patches judged on its own voxels. On the 96^3 AAL3 grid with
    6 mm patches the ``majority`` rule keeps 96 of 166 regions, covering 592
    of 1445 brain patches; ``any`` keeps all 166 (overlapping at borders).

Brain patches are patches with at least one brain voxel (``any`` rule), where
the brain is ``brain_mask`` if given, else ``voxel_labels > 0``; every such
patch contributes to the in-brain loss. ``describe()`` reports their number
so that ratios of different strategies can be compared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from bids_regionmae.choices import MASK_STRATEGIES

from .patches import (
    PATCH_RULES,
    PatchRule,
    apply_patch_rule,
    check_patch_size,
    label_patch_fractions,
    patch_fraction,
    region_patches,
)
from .strategies import (
    EmptyRegionError,
    _check_fraction,
    n_to_mask,
    random_region_mask,
    random_tube_mask,
    region_tube_mask,
)

logger = logging.getLogger(__name__)

__all__ = ["CANDIDATES", "STRATEGIES", "MaskStrategy", "Masker", "build_masker", "register_strategy",
           "strategy_class"]

Strategy = Literal[MASK_STRATEGIES]
#: The registered strategy names (= :data:`bids_regionmae.choices.MASK_STRATEGIES`).
STRATEGIES: tuple[str, ...] = MASK_STRATEGIES
CANDIDATES: tuple[str, ...] = ("all", "brain")


class Masker:
    """A configured token-mask sampler; build it with :func:`build_masker`.

    Attributes
    ----------
    strategy : str
        One of :data:`STRATEGIES`.
    kind : type of MaskStrategy
        The registered class of ``strategy``: it draws the masks.
    patch_size : tuple of 4 int
        ``(px, py, pz, pt)``.
    grid : tuple of 4 int
        Token grid ``(D, H, W, T)``.
    region_patch_map : BoolTensor, shape (D, H, W)
        Patches this masker can mask: the candidates (``random``), the
        selected region(s) (``region``) or the union of the region pool
        (``random-region``). For figures.
    label_patch_map : LongTensor, shape (D, H, W)
        Label whose voxels cover the largest share of each patch, 0 where that
        label does not hold the patch under ``rule``. For figures.
    region_labels : LongTensor, shape (R,)
        ``random-region`` only (else empty): the labels of ``region_maps``.
    region_maps : BoolTensor, shape (R, D, H, W)
        ``random-region`` only (else shape (0, D, H, W)): each region's patches.
    empty_labels : list of int
        Requested (or pooled) labels with no patch under ``rule``.
    """

    def __init__(self, strategy: str, patch_size: tuple[int, int, int, int], grid: tuple[int, int, int, int],
                 *, region_patch_map: torch.Tensor, label_patch_map: torch.Tensor, rule: str,
                 ratio: float | None, fraction: float | None, candidates: str | None,
                 n_candidates: int, n_brain_patches: int, labels: list[int], empty_labels: list[int],
                 region_labels: torch.Tensor, region_maps: torch.Tensor, brain_mask_given: bool):
        self.strategy = strategy
        self.kind = strategy_class(strategy)
        self.patch_size = patch_size
        self.grid = grid
        self.region_patch_map = region_patch_map
        self.label_patch_map = label_patch_map
        self.rule = rule
        self.ratio = ratio
        self.fraction = fraction
        self.candidates = candidates
        self.n_candidates = n_candidates
        self.n_brain_patches = n_brain_patches
        self.labels = labels
        self.empty_labels = empty_labels
        self.region_labels = region_labels
        self.region_maps = region_maps
        self.brain_mask_given = brain_mask_given
        self.device = region_patch_map.device
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def maps_on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """:attr:`region_patch_map` and :attr:`region_maps` on ``device`` (cached)."""
        key = str(torch.device(device))
        if key not in self._cache:
            self._cache[key] = (self.region_patch_map.to(device), self.region_maps.to(device))
        return self._cache[key]

    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Draw one batch of token masks.

        Parameters
        ----------
        batch_size : int
            ``B``.
        generator : torch.Generator, optional
            Source of randomness (any device; see
            :mod:`bids_regionmae.masking.strategies`). Deterministic given its state.
        device : torch.device or str, optional
            Device of the mask, normally the model's; default: the build device.

        Returns
        -------
        BoolTensor, shape (B, D, H, W, T)
            True = masked token; the same spatial pattern in every frame.
        """
        device = self.device if device is None else torch.device(device)
        return self.kind.draw(self, batch_size, generator, device)

    @property
    def n_region_patches(self) -> int:
        """Number of patches in :attr:`region_patch_map`."""
        return int(self.region_patch_map.sum())

    def describe(self) -> dict[str, Any]:
        """JSON/TOML-serialisable description for the run record.

        Returns
        -------
        dict
            ``strategy``, ``patch_size``, ``token_grid``, ``rule``, ``ratio``
            (random, random-region), ``fraction`` (region), ``candidates``
            (random), ``labels`` (region: selected; random-region: the
            regions drawn from), ``empty_labels``, ``n_region_patches``
            (patches of :attr:`region_patch_map`), ``n_candidate_patches``
            (denominator of ``ratio`` / ``fraction``), ``n_brain_patches``,
            ``n_masked_patches`` (per sample and frame: exact for random and
            region, the target, a lower bound, for random-region),
            ``masked_patch_ratio`` (``n_masked_patches / n_candidate_patches``)
            and ``brain_mask`` (whether one was given). Keys that do not apply
            are None.
        """
        n_masked = n_to_mask(self.fraction if self.kind.uses_regions else self.ratio, self.n_candidates)
        return {
            "strategy": self.strategy,
            "patch_size": list(self.patch_size),
            "token_grid": list(self.grid),
            "rule": self.rule,
            "ratio": self.ratio,
            "fraction": self.fraction,
            "candidates": self.candidates,
            "labels": list(self.labels),
            "empty_labels": list(self.empty_labels),
            "n_region_patches": self.n_region_patches,
            "n_candidate_patches": self.n_candidates,
            "n_brain_patches": self.n_brain_patches,
            "n_masked_patches": n_masked,
            "masked_patch_ratio": n_masked / self.n_candidates if self.n_candidates else None,
            "brain_mask": self.brain_mask_given,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return (f"Masker(strategy={d['strategy']!r}, grid={tuple(d['token_grid'])}, rule={d['rule']!r}, "
                f"ratio={d['ratio']}, fraction={d['fraction']}, n_region_patches={d['n_region_patches']})")


# --------------------------------------------------------------------------- strategies


@dataclass
class PatchContext:
    """What every strategy's build step shares: the label map reduced to patches once.

    Attributes
    ----------
    size : tuple of 4 int
        Checked patch size.
    grid : tuple of 4 int
        Token grid ``(D, H, W, T)``.
    voxel_labels : LongTensor, shape (X, Y, Z)
    brain_map : BoolTensor, shape (D, H, W)
        Patches with a brain voxel.
    present : LongTensor, shape (L,)
        Labels present (sorted).
    held : BoolTensor, shape (L, D, H, W)
        Patches each present label holds under ``rule``.
    held_labels : set of int
        Labels holding at least one patch.
    device : torch.device
    rule : str
    common : dict
        Keyword arguments of :class:`Masker` shared by every strategy.
    """

    size: tuple[int, int, int, int]
    grid: tuple[int, int, int, int]
    voxel_labels: torch.Tensor
    brain_map: torch.Tensor
    present: torch.Tensor
    held: torch.Tensor
    held_labels: set[int]
    device: torch.device
    rule: str
    common: dict[str, Any]

    def no_regions(self) -> dict[str, torch.Tensor]:
        """The empty ``region_labels`` / ``region_maps`` of strategies without a region pool."""
        return dict(region_labels=torch.zeros(0, dtype=torch.long, device=self.device),
                    region_maps=torch.zeros((0, *self.grid[:3]), dtype=torch.bool, device=self.device))


class PlanFields(Protocol):
    """The fields of a :class:`~bids_regionmae.masking.plan.MaskingPlan` that name and describe a strategy."""

    region: str | None
    labels: tuple[int, ...]
    rule: str
    ratio: float
    fraction: float


class MaskStrategy:
    """A masking strategy: what it precomputes from the label map, how it draws masks, how it is named.

    Subclasses are registered by name with :func:`register_strategy`; the
    name must be one of :data:`bids_regionmae.choices.MASK_STRATEGIES`.

    Class attributes
    ----------------
    name : str
    uses_regions : bool
        Masks the regions selected with ``--regions`` (``fraction`` applies);
        otherwise ``ratio`` applies.
    map_description : str
        What :attr:`Masker.region_patch_map` shows for this strategy.
    """

    name: ClassVar[str]
    uses_regions: ClassVar[bool] = False
    map_description: ClassVar[str] = ""

    @classmethod
    def build(cls, ctx: PatchContext, *, labels: list[int] | None, ratio: float, fraction: float,
              candidates: str) -> Masker:
        """Precompute the patch maps of this strategy (see :func:`build_masker`)."""
        raise NotImplementedError

    @staticmethod
    def draw(masker: Masker, batch_size: int, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
        """One batch of token masks, BoolTensor (B, D, H, W, T)."""
        raise NotImplementedError

    @classmethod
    def tag(cls, plan: PlanFields) -> str:
        """The masking part of a model directory name (see :func:`bids_regionmae.outputs.naming.pretrain_dir_name`)."""
        raise NotImplementedError

    @classmethod
    def text(cls, plan: PlanFields) -> str:
        """One phrase for methods text and reports."""
        raise NotImplementedError


_REGISTRY: dict[str, type[MaskStrategy]] = {}


def register_strategy(cls: type[MaskStrategy]) -> type[MaskStrategy]:
    """Class decorator: make ``cls`` the implementation of the strategy ``cls.name``.

    Raises
    ------
    ValueError
        ``cls.name`` is not in :data:`bids_regionmae.choices.MASK_STRATEGIES` (add it there first).
    """
    if cls.name not in MASK_STRATEGIES:
        raise ValueError(f"masking strategy {cls.name!r} is not in bids_regionmae.choices.MASK_STRATEGIES "
                         f"{MASK_STRATEGIES}: add its name there so the CLI and the config accept it")
    _REGISTRY[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[MaskStrategy]:
    """The registered class of strategy ``name``.

    Raises
    ------
    ValueError
        Unknown name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}") from None


def _pct(value: float) -> str:
    return f"{value * 100:g}".replace(".", "p")


@register_strategy
class RandomTube(MaskStrategy):
    """NeuroSTORM's random tube masking: ``round(ratio * n)`` of ``n`` candidate patches, in every frame."""

    name = "random"
    map_description = "candidate patches (ratio of them masked per clip)"

    @classmethod
    def build(cls, ctx: PatchContext, *, labels: list[int] | None, ratio: float, fraction: float,
              candidates: str) -> Masker:
        ratio = _check_fraction(ratio, "ratio")
        cmap = torch.ones(ctx.grid[:3], dtype=torch.bool, device=ctx.device) if candidates == "all" else ctx.brain_map
        n_cand = int(cmap.sum())
        if n_cand == 0:
            raise ValueError("candidates='brain' but the brain mask has no voxel: nothing can be masked")
        return Masker(cls.name, ctx.size, ctx.grid, region_patch_map=cmap, ratio=ratio, fraction=None,
                      candidates=candidates, n_candidates=n_cand, labels=[], empty_labels=[],
                      **ctx.no_regions(), **ctx.common)

    @staticmethod
    def draw(masker: Masker, batch_size: int, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
        pmap, _ = masker.maps_on(device)
        return random_tube_mask(pmap, batch_size, masker.grid[3], masker.ratio, generator=generator, device=device)

    @classmethod
    def tag(cls, plan: PlanFields) -> str:
        return f"random-ratio{_pct(plan.ratio)}"

    @classmethod
    def text(cls, plan: PlanFields) -> str:
        return f"random tube masking, ratio {plan.ratio}"


@register_strategy
class RegionTube(MaskStrategy):
    """Region-aware masking: the patches of the selected labels (``fraction`` of them per sample), in every frame."""

    name = "region"
    uses_regions = True
    map_description = "patches masked in every frame"

    @classmethod
    def build(cls, ctx: PatchContext, *, labels: list[int] | None, ratio: float, fraction: float,
              candidates: str) -> Masker:
        fraction = _check_fraction(fraction, "fraction")
        if not labels:
            raise ValueError("strategy 'region' needs labels: the atlas label indices of the "
                             "region(s) to mask")
        size, rule, vl = ctx.size, ctx.rule, ctx.voxel_labels
        wanted = sorted({int(v) for v in labels})
        empty = [v for v in wanted if v not in ctx.held_labels]
        rmap = region_patches(vl, wanted, size[:3], rule)
        if not bool(rmap.any()):
            raise EmptyRegionError(
                f"none of the selected labels {wanted} has a patch under the {rule!r} rule at patch size "
                f"{size[:3]}: nothing to mask. Use a larger region, rule='any', or check that the "
                f"atlas is on the model grid")
        _warn_empty(empty, rule, size, "selected labels")
        if empty:
            in_union = torch.isin(vl, torch.as_tensor(empty, device=ctx.device)) \
                & rmap.repeat_interleave(size[0], 0).repeat_interleave(size[1], 1) \
                .repeat_interleave(size[2], 2)
            never = sorted(set(empty) - set(vl[in_union].unique().tolist()))
            if never:
                logger.warning("labels %s have no voxel in the masked patches of the selection: "
                               "they are never masked", never)
        return Masker(cls.name, size, ctx.grid, region_patch_map=rmap, ratio=None, fraction=fraction,
                      candidates=None, n_candidates=int(rmap.sum()), labels=wanted, empty_labels=empty,
                      **ctx.no_regions(), **ctx.common)

    @staticmethod
    def draw(masker: Masker, batch_size: int, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
        pmap, _ = masker.maps_on(device)
        return region_tube_mask(pmap, batch_size, masker.grid[3], fraction=masker.fraction, generator=generator,
                                device=device)

    @classmethod
    def tag(cls, plan: PlanFields) -> str:
        import re

        joined = plan.region or "none"
        tag = "region-" + re.sub(r"[^a-z0-9+\-]", "", joined.lower().replace(",", "+").replace("_", "-"))
        return tag + (f"-frac{_pct(plan.fraction)}" if plan.fraction < 1.0 else "")

    @classmethod
    def text(cls, plan: PlanFields) -> str:
        region = plan.region or f"{len(plan.labels)} AAL3 labels"
        return f"region-aware masking of {region} (patch rule {plan.rule})"


@register_strategy
class RandomRegion(MaskStrategy):
    """Whole atlas regions drawn at random per sample until ``round(ratio * n)`` pooled patches are masked."""

    name = "random-region"
    map_description = "union of the candidate regions"

    @classmethod
    def build(cls, ctx: PatchContext, *, labels: list[int] | None, ratio: float, fraction: float,
              candidates: str) -> Masker:
        ratio = _check_fraction(ratio, "ratio")
        pool = sorted({int(v) for v in labels} - {0}) if labels is not None else ctx.present.tolist()
        if not pool:
            raise ValueError("strategy 'random-region' got an empty labels pool")
        keep = [v for v in pool if v in ctx.held_labels]
        empty = [v for v in pool if v not in ctx.held_labels]
        if not keep:
            raise EmptyRegionError(f"no region of the pool {pool} has a patch under the {ctx.rule!r} rule at "
                                   f"patch size {ctx.size[:3]}: nothing to mask")
        _warn_empty(empty, ctx.rule, ctx.size, "regions (never drawn by random-region)")
        region_labels = torch.as_tensor(keep, dtype=torch.long, device=ctx.device)
        region_maps = ctx.held[torch.searchsorted(ctx.present, region_labels)]
        union = region_maps.any(0)
        return Masker(cls.name, ctx.size, ctx.grid, region_patch_map=union, ratio=ratio, fraction=None,
                      candidates=None, n_candidates=int(union.sum()), labels=keep, empty_labels=empty,
                      region_labels=region_labels, region_maps=region_maps, **ctx.common)

    @staticmethod
    def draw(masker: Masker, batch_size: int, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
        _, rmaps = masker.maps_on(device)
        return random_region_mask(rmaps, batch_size, masker.grid[3], masker.ratio, n_candidates=masker.n_candidates,
                                  generator=generator, device=device)

    @classmethod
    def tag(cls, plan: PlanFields) -> str:
        return f"randomregion-ratio{_pct(plan.ratio)}"

    @classmethod
    def text(cls, plan: PlanFields) -> str:
        return f"random whole-region masking, ratio {plan.ratio}"


_unregistered = set(MASK_STRATEGIES) - set(_REGISTRY)
if _unregistered:  # pragma: no cover - a developer added a name without a class
    raise ImportError(f"masking strategies {sorted(_unregistered)} are named in bids_regionmae.choices but no "
                      "class is registered for them in bids_regionmae.masking.builder")


# --------------------------------------------------------------------------- build


def _warn_empty(empty: list[int], rule: str, patch_size: Sequence[int], what: str) -> None:
    if empty:
        logger.warning("%d %s have no patch of their own under the %r rule at patch size %s: labels %s",
                       len(empty), what, rule, tuple(patch_size[:3]), empty)


def build_masker(strategy: Strategy | type[MaskStrategy], voxel_labels: torch.Tensor, patch_size: Sequence[int], *,
                 labels: Sequence[int] | None = None, ratio: float = 0.5, fraction: float = 1.0,
                 rule: PatchRule = "majority", brain_mask: torch.Tensor | None = None, T: int,
                 candidates: Literal["all", "brain"] = "all",
                 device: torch.device | str | None = None) -> Masker:
    """Precompute patch maps for a masking strategy and return its sampler.

    Parameters
    ----------
    strategy : {'random', 'region', 'random-region'} or MaskStrategy subclass
        A registered strategy, by name or class (see the module docstring).
    voxel_labels : IntTensor, shape (X, Y, Z)
        Atlas label per voxel on the model grid (0 = background).
    patch_size : sequence of 3 or 4 int
        ``(px, py, pz[, pt])``; must divide ``(X, Y, Z, T)``.
    labels : sequence of int, optional
        ``region``: the labels to mask (required; e.g. a lobe group's labels
        or several groups' labels together). ``random-region``: the pool of
        regions to draw from (default: every non-zero label). Ignored by
        ``random``.
    ratio : float
        ``random``: masked fraction of the candidate patches; ``random-region``:
        target masked fraction of the patches the region pool covers; in (0, 1].
    fraction : float
        ``region``: fraction of the region's patches masked, in (0, 1].
    rule : {'any', 'majority', 'all'}
        How a region's voxels make a patch belong to it.
    brain_mask : BoolTensor, shape (X, Y, Z), optional
        Brain voxels; default ``voxel_labels > 0``. Defines brain patches
        (``candidates="brain"``, ``n_brain_patches`` in :meth:`Masker.describe`).
    T : int
        Number of frames of the input clip.
    candidates : {'all', 'brain'}
        ``random`` only: draw from every patch (NeuroSTORM) or brain patches.
    device : torch.device or str, optional
        Where patch maps are precomputed and kept; default: ``voxel_labels.device``.

    Returns
    -------
    Masker

    Raises
    ------
    ValueError
        Unknown strategy / rule / candidates, bad ratio or fraction, shapes
        not divisible by the patch size, or ``labels`` missing for ``region``.
    EmptyRegionError
        (a ValueError) The selected regions (``region``) or the whole pool
        (``random-region``) have no patch under ``rule``.
    """
    labels = None if labels is None else [int(v) for v in labels]
    kind = strategy if isinstance(strategy, type) else strategy_class(strategy)
    if rule not in PATCH_RULES:
        raise ValueError(f"rule must be one of {PATCH_RULES}, got {rule!r}")
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    if voxel_labels.dim() != 3:
        raise ValueError(f"voxel_labels must have shape (X, Y, Z), got {tuple(voxel_labels.shape)}")
    size = check_patch_size(patch_size, voxel_labels.shape, T)
    device = voxel_labels.device if device is None else torch.device(device)
    vl = voxel_labels.to(device)
    vl = vl.round().long() if vl.is_floating_point() else vl.long()
    X, Y, Z = vl.shape
    grid = (X // size[0], Y // size[1], Z // size[2], T // size[3])

    if brain_mask is not None:
        if tuple(brain_mask.shape) != (X, Y, Z):
            raise ValueError(f"brain_mask must have shape (X, Y, Z) = {(X, Y, Z)}, "
                             f"got {tuple(brain_mask.shape)}")
        brain = brain_mask.to(device).bool()
    else:
        brain = vl > 0
    brain_map = apply_patch_rule(patch_fraction(brain, size[:3]), "any")

    present, fractions = label_patch_fractions(vl, size[:3])  # (L,), (L, D, H, W)
    held = apply_patch_rule(fractions, rule)  # (L, D, H, W)
    if present.numel():
        best_frac, best_idx = fractions.max(0)
        best_label = present[best_idx]
        label_patch_map = torch.where(apply_patch_rule(best_frac, rule), best_label, 0)
    else:
        label_patch_map = torch.zeros(grid[:3], dtype=torch.long, device=device)
    ctx = PatchContext(size=size, grid=grid, voxel_labels=vl, brain_map=brain_map, present=present, held=held,
                       held_labels=set(present[held.flatten(1).any(1)].tolist()), device=device, rule=rule,
                       common=dict(label_patch_map=label_patch_map, rule=rule, n_brain_patches=int(brain_map.sum()),
                                   brain_mask_given=brain_mask is not None))
    return kind.build(ctx, labels=labels, ratio=ratio, fraction=fraction, candidates=candidates)
