"""The model a prediction runs with, built from an opened model directory.

:func:`load_prediction_model` takes a :class:`~bids_regionmae.models.model_dir.ModelDir`
(``--model``, opened once by the session) and wraps what prediction needs
into a :class:`PredictionModel`:

- ``embed``: clips -> pooled encoder embeddings;
- ``classify``: clips (and optional token masks) -> logits / regression outputs
  (fine-tuned models; how to read them comes from the directory's task head);
- ``mae``: the masked autoencoder for the per-region reconstruction error (a
  pretraining directory, or the pretrained parent a fine-tuned directory
  records, :attr:`ModelDir.parent <bids_regionmae.models.model_dir.ModelDir.parent>`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bids_regionmae.errors import InputDataError, UsageError
from bids_regionmae.outputs.naming import model_label

if TYPE_CHECKING:
    from bids_regionmae.masking import MaskingPlan
    from bids_regionmae.models.model_dir import ModelDir
    from bids_regionmae.models.spec import ModelSpec

LOGGER = logging.getLogger(__name__)

__all__ = ["PredictionModel", "load_prediction_model", "output_names"]


@dataclass
class PredictionModel:
    """Everything prediction needs from a model directory.

    Attributes
    ----------
    label : str
        Alphanumeric model label for the ``desc-`` entity.
    kind : {'pretrained', 'finetuned'}
    spec : ModelSpec
        Input size ``img_size`` (X, Y, Z, T) and ``patch_size``.
    embed : callable
        ``embed(x (B, 1, X, Y, Z, T)) -> (B, C)``.
    classify : callable or None
        ``classify(x (B, 1, X, Y, Z, T), token_mask (B, D, H, W, T) or None) -> (B, K)``.
    mae : nn.Module or None
        ``mae(x, token_mask) -> (B, 1, X, Y, Z, T)``.
    task_kind : {'binary', 'multiclass', 'regression'} or None
    class_names : list of str or None
        For classification; for binary tasks index 1 is the positive class.
    target : str or None
        Phenotype column the model predicts.
    token_masks : bool
        ``classify`` accepts token masks (mask-token occlusion possible).
    patch_rule : str
        Patch rule of region membership used in pretraining.
    model_dir, mae_dir : Path or None
    modules : list of nn.Module
        Modules to move to a device / put in eval mode.
    output_scale : tuple of float or None
        ``(mean, std)`` to map regression outputs back to the target's units.
    example_group : str or None
        Lobe group shown in reconstruction figures (the pretraining region's).
    masking : MaskingPlan or None
        The plan the encoder was pretrained with.
    """

    label: str
    kind: str
    spec: ModelSpec
    embed: Callable[[torch.Tensor], torch.Tensor]
    classify: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    mae: nn.Module | None = None
    task_kind: str | None = None
    class_names: list[str] | None = None
    target: str | None = None
    token_masks: bool = False
    patch_rule: str = "majority"
    model_dir: Path | None = None
    mae_dir: Path | None = None
    modules: list[nn.Module] = field(default_factory=list)
    output_scale: tuple[float, float] | None = None
    example_group: str | None = None
    masking: MaskingPlan | None = None

    def masking_text(self) -> str | None:
        """A short description of the MAE's pretraining masks, for the methods text."""
        return self.masking.text() if self.masking is not None else None

    def to(self, device: torch.device | str) -> PredictionModel:
        """Move the modules to ``device`` and put them in eval mode."""
        for module in self.modules:
            module.to(device)
            module.eval()
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for sidecars and reports."""
        return {
            "Label": self.label,
            "Kind": self.kind,
            "Directory": str(self.model_dir) if self.model_dir else None,
            "Variant": getattr(self.spec, "name", None),
            "InputSize": list(getattr(self.spec, "img_size", []) or []),
            "Target": self.target,
            "TaskKind": self.task_kind,
            "ClassNames": self.class_names,
            "ReconstructionModel": str(self.mae_dir) if self.mae_dir else None,
            "PatchRule": self.patch_rule,
            "Masking": self.masking_text(),
        }


def output_names(model: PredictionModel, n_outputs: int) -> list[str]:
    """Names of the output columns: class names, or ``prediction`` for regression.

    Binary models with one logit get the positive class name (or ``positive``).
    """
    if model.task_kind == "regression" or (model.task_kind is None and n_outputs == 1 and not model.class_names):
        return ["prediction"] if n_outputs == 1 else [f"output{i}" for i in range(n_outputs)]
    names = [str(c) for c in (model.class_names or [])]
    if n_outputs == 1:
        return [names[1] if len(names) == 2 else "positive"]
    if len(names) == n_outputs:
        return names
    return [f"class{i}" for i in range(n_outputs)]


# ----------------------------------------------------------------------------- loading


def _example_group(plan: MaskingPlan | None) -> str | None:
    from bids_regionmae.atlas.regions import LOBE_GROUPS

    return plan.main_group(LOBE_GROUPS) if plan is not None else None


def _parent_mae(model_dir: ModelDir, backend: str) -> tuple[nn.Module | None, Path | None]:
    """The pretrained parent's masked autoencoder (for the reconstruction error), or None (logged)."""
    parent = model_dir.parent
    if parent is None:
        return None, None
    try:
        mae = parent.load_mae(backend)
    except (InputDataError, UsageError) as exc:
        LOGGER.warning("%s: could not load the pretrained MAE %s for the reconstruction error: %s",
                       model_dir.path, parent.path, exc)
        return None, None
    return mae.eval(), parent.path


def load_prediction_model(model_dir: ModelDir, *, backend: str = "auto") -> PredictionModel:
    """The prediction view of an opened pretraining or fine-tuned model directory.

    Parameters
    ----------
    model_dir : ModelDir
        ``--model``, opened by :meth:`bids_regionmae.models.model_dir.ModelDir.open`.
    backend : {'auto', 'mamba-ssm', 'torch'}

    Returns
    -------
    PredictionModel
        On the CPU, in eval mode.

    Raises
    ------
    ModelDirCorruptError
        The weights cannot be loaded.
    """
    model = model_dir.load(backend)
    plan = model_dir.masking
    common: dict[str, Any] = dict(label=model_label(model_dir.path), spec=model_dir.spec,
                                  patch_rule=plan.rule if plan else "majority", model_dir=model_dir.path,
                                  example_group=_example_group(plan), masking=plan)
    task = model_dir.task
    if task is None:
        mae = model if hasattr(model, "forward_decoder") else None
        embed = model.encoder.embed if mae is not None else model.embed
        return PredictionModel(kind="pretrained", embed=embed, mae=mae, mae_dir=model_dir.path if mae else None,
                               modules=[model], **common)
    mae, mae_dir = _parent_mae(model_dir, backend)
    classify, token_masks = _classifier(model, mae)
    return PredictionModel(kind="finetuned", embed=model.embed, classify=classify, mae=mae, task_kind=task.kind,
                           class_names=list(task.class_names) or None, target=task.target, token_masks=token_masks,
                           mae_dir=mae_dir, modules=[model] + ([mae] if mae is not None else []),
                           output_scale=task.output_scale, **common)


def _classifier(model: nn.Module, mae: nn.Module | None
                ) -> tuple[Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], bool]:
    """``classify(x, token_mask)`` of a fine-tuned model, and whether it honours token masks.

    The :class:`~bids_regionmae.models.heads.FinetuneModel` is run as
    ``head(mean_pool(encoder.forward_tokens(x, token_mask, mask_token)))``:
    gradients reach the input whatever the fine-tuning mode (its ``embed``
    runs a linear-probe encoder without autograd), and masked tokens are
    replaced by the pretrained MAE's mask token when that MAE is loaded.
    """
    from bids_regionmae.models.heads import mean_pool

    encoder, head = model.encoder, model.head
    mask_token = getattr(mae, "mask_token", None) if mae is not None else None

    def classify(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if token_mask is not None and mask_token is None:
            raise UsageError("mask-token occlusion needs the pretrained MAE's mask token; use zero occlusion")
        tokens = encoder.forward_tokens(x, token_mask, mask_token if token_mask is not None else None)
        out = head(mean_pool(tokens))
        return out if out.dim() == 2 else out.reshape(out.shape[0], -1)

    return classify, mask_token is not None
