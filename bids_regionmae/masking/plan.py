"""The masking plan: every masking choice of a pretraining run, resolved and checked once.

A :class:`MaskingPlan` is made once per run from the configuration (the
strategy name, the regions already resolved to atlas labels and a name, the
patch rule, ratio and fraction, the masking level and loss options); every
later room (the masker, the loss, model directory names, the model
directory's metadata, prediction, reports) receives the plan, never the
strings it came from. The plan is plain data (JSON round trip with
:meth:`to_dict` / :meth:`from_dict`); :meth:`build_masker` turns it into a
:class:`~bids_regionmae.masking.builder.Masker` for a label map on the model
grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from bids_regionmae.choices import MASK_LEVELS, PATCH_RULES
from bids_regionmae.errors import UsageError

from .builder import Masker, MaskStrategy, build_masker, strategy_class

__all__ = ["MaskingPlan"]


@dataclass(frozen=True)
class MaskingPlan:
    """What is masked in pretraining and how the loss treats it.

    Attributes
    ----------
    strategy : str
        A registered strategy name (:data:`bids_regionmae.choices.MASK_STRATEGIES`).
    region : str or None
        Name of the masked selection (``cerebellum``, ``cerebellum+limbic``)
        for strategies that use regions; None otherwise.
    labels : tuple of int
        Atlas labels of ``region`` (sorted); empty for other strategies.
    rule : {'any', 'majority', 'all'}
        When a patch belongs to a region.
    ratio : float
        Masked share of the candidate patches (``random``, ``random-region``), in (0, 1].
    fraction : float
        Share of the region's patches masked (``region``), in (0, 1].
    level : {'token', 'voxel'}
        Masked tokens replaced by the model's mask token, or masked voxels set to the background.
    include_background : bool
        Loss over every voxel of masked tokens instead of brain voxels only.
    norm_patch_loss : bool
        MAE's normalised-patch target.

    Raises
    ------
    UsageError
        On construction: an unknown strategy, rule or level, a ratio or
        fraction outside (0, 1], or a region strategy without labels.
    """

    strategy: str
    region: str | None = None
    labels: tuple[int, ...] = ()
    rule: str = "majority"
    ratio: float = 0.5
    fraction: float = 1.0
    level: str = "token"
    include_background: bool = False
    norm_patch_loss: bool = False

    def __post_init__(self) -> None:
        try:
            kind = strategy_class(self.strategy)
        except ValueError as exc:
            raise UsageError(f"--mask-strategy: {exc}") from None
        if self.rule not in PATCH_RULES:
            raise UsageError(f"--patch-rule must be one of {PATCH_RULES}, got {self.rule!r}")
        if self.level not in MASK_LEVELS:
            raise UsageError(f"--mask-level must be one of {MASK_LEVELS}, got {self.level!r}")
        for option, value in (("--mask-ratio", self.ratio), ("--mask-fraction", self.fraction)):
            if not 0.0 < float(value) <= 1.0:
                raise UsageError(f"{option} must be in (0, 1], got {value}")
        object.__setattr__(self, "labels", tuple(sorted({int(i) for i in self.labels})))
        if kind.uses_regions and not self.labels:
            raise UsageError(f"--mask-strategy {self.strategy} needs --regions (e.g. cerebellum, limbic, "
                             "cerebellum+frontal)")
        if not kind.uses_regions and (self.labels or self.region):
            object.__setattr__(self, "labels", ())
            object.__setattr__(self, "region", None)

    # ------------------------------------------------------------------ behaviour

    @property
    def kind(self) -> type[MaskStrategy]:
        """The registered strategy class."""
        return strategy_class(self.strategy)

    @property
    def uses_regions(self) -> bool:
        """The strategy masks the selected region (``fraction`` applies), not a share of candidates."""
        return self.kind.uses_regions

    def build_masker(self, voxel_labels: torch.Tensor, patch_size: Sequence[int], *, T: int,
                     brain_mask: torch.Tensor | None = None, device: torch.device | str | None = None) -> Masker:
        """The token-mask sampler of this plan on a label map.

        Parameters
        ----------
        voxel_labels : IntTensor, shape (X, Y, Z)
            Atlas labels on the model's grid.
        patch_size : sequence of 3 or 4 int
        T : int
            Frames per clip.
        brain_mask : BoolTensor, shape (X, Y, Z), optional
        device : torch.device or str, optional

        Returns
        -------
        Masker
        """
        return build_masker(self.kind, voxel_labels, patch_size, labels=self.labels or None, ratio=self.ratio,
                            fraction=self.fraction, rule=self.rule, brain_mask=brain_mask, T=T, device=device)

    def tag(self) -> str:
        """Masking part of the model directory name: ``region-cerebellum``, ``random-ratio50`` ...

        ``-voxel`` is appended for voxel-level masking.
        """
        return self.kind.tag(self) + ("-voxel" if self.level == "voxel" else "")

    def text(self) -> str:
        """One phrase for methods text and reports, e.g. ``region-aware masking of cerebellum (patch rule ...)``."""
        return self.kind.text(self)

    def main_group(self, groups: Mapping[str, Sequence[int]]) -> str | None:
        """The group (e.g. lobe) of the masked region: its name when it is a group, else the group sharing most labels.

        None without labels (strategies that do not mask a selected region).
        """
        if self.region in groups:
            return self.region
        labels = set(self.labels)
        if not labels or not groups:
            return None
        best = max(groups, key=lambda g: len(labels & set(groups[g])))
        return best if labels & set(groups[best]) else None

    # ------------------------------------------------------------------ records

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (labels as a list)."""
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskingPlan:
        """Inverse of :meth:`to_dict` (unknown keys are ignored).

        Raises
        ------
        UsageError
            The record does not describe a valid plan.
        """
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["labels"] = tuple(int(i) for i in values.get("labels") or ())
        return cls(**values)
