"""Region-aware token masking and masked reconstruction losses (pure PyTorch).

Takes tensors and a region-label tensor only (no file I/O): region names are
resolved to atlas label indices elsewhere, once per run, into a
:class:`~.plan.MaskingPlan` that every later room receives.

Shapes: model input ``(B, 1, X, Y, Z, T)``, patch ``(px, py, pz, pt)``,
token grid ``(D, H, W, T') = (X/px, Y/py, Z/pz, T/pt)``; a token mask is a
BoolTensor ``(B, D, H, W, T')`` with True = masked.
"""

from .builder import CANDIDATES, STRATEGIES, Masker, MaskStrategy, build_masker, register_strategy, strategy_class
from .loss import masked_mse, per_region_mse
from .patches import (
    PATCH_RULES,
    apply_patch_rule,
    check_patch_size,
    label_patch_fractions,
    patch_fraction,
    region_patches,
)
from .plan import MaskingPlan
from .strategies import EmptyRegionError, n_to_mask, random_region_mask, random_tube_mask, region_tube_mask
from .voxel import apply_voxel_mask, token_to_voxel_mask

__all__ = [
    "CANDIDATES",
    "PATCH_RULES",
    "STRATEGIES",
    "EmptyRegionError",
    "MaskStrategy",
    "Masker",
    "MaskingPlan",
    "apply_patch_rule",
    "apply_voxel_mask",
    "build_masker",
    "check_patch_size",
    "label_patch_fractions",
    "masked_mse",
    "n_to_mask",
    "patch_fraction",
    "per_region_mse",
    "random_region_mask",
    "random_tube_mask",
    "region_patches",
    "region_tube_mask",
    "register_strategy",
    "strategy_class",
    "token_to_voxel_mask",
]
