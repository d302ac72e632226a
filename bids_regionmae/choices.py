"""The names a user chooses from: one tuple per choice.

Each tuple feeds the command line (``click.Choice``), the configuration
(a pydantic ``Literal``, see :mod:`bids_regionmae.config`) and the code that
implements the choice, so a name is spelled in one place. Adding a masking
strategy: add its name to :data:`MASK_STRATEGIES` and register a class under
that name in :mod:`bids_regionmae.masking.builder` (importing the masking
package fails when the two disagree).

This module imports nothing, so the command line stays fast.
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "DEFAULT_INPUT_CONVENTION",
    "DEVICES",
    "FINETUNE_MODES",
    "INPUT_CONVENTIONS",
    "MASK_LEVELS",
    "MASK_STRATEGIES",
    "OCCLUSION_MODES",
    "PATCH_RULES",
    "PRECISIONS",
]

#: Pretraining masking strategies (classes registered under these names in ``masking.builder``).
MASK_STRATEGIES: tuple[str, ...] = ("random", "region", "random-region")
#: When a patch belongs to a region: any voxel, more than half, every voxel.
PATCH_RULES: tuple[str, ...] = ("any", "majority", "all")
#: Where masking happens: masked tokens replaced by the mask token, or masked voxels set to the background.
MASK_LEVELS: tuple[str, ...] = ("token", "voxel")
#: Compute devices.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Mamba kernels (see ``bids_regionmae.models.mamba``).
BACKENDS: tuple[str, ...] = ("auto", "mamba-ssm", "torch")
#: Training precision.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: Which weights fine-tuning trains.
FINETUNE_MODES: tuple[str, ...] = ("linear-probe", "prompt", "full")
#: How prediction occludes a region for attribution.
OCCLUSION_MODES: tuple[str, ...] = ("zero", "mask-token")
#: How a model expects its input clips: ``regionmae-global`` is this package's model-ready store
#: (one z-score over the in-mask voxels and frames of a run, background 0, x in RAS order).
INPUT_CONVENTIONS: tuple[str, ...] = ("regionmae-global",)
#: The convention of every model this package trains.
DEFAULT_INPUT_CONVENTION = "regionmae-global"
