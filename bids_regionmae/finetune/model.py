"""Starting encoders and fine-tuning models.

- a pretrained encoder comes from its model directory
  (:meth:`bids_regionmae.models.model_dir.ModelDir.load_encoder`);
- :func:`random_encoder`: a seeded, randomly initialised encoder of a variant
  (the "no pretraining" control);
- :func:`build_finetune_model`: a :class:`~bids_regionmae.models.heads.FinetuneModel`
  in one of the modes ``linear-probe`` (frozen encoder, trained head),
  ``prompt`` (frozen encoder, trained prompt tokens and head) or ``full``;
- :class:`EncoderEmbedding`: ``x -> model.embed(x)`` as a module (for
  :func:`bids_regionmae.finetune.data.infer`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from bids_regionmae.finetune.task import Task

LOGGER = logging.getLogger(__name__)

__all__ = ["EncoderEmbedding", "build_finetune_model", "random_encoder", "trainable_parameter_names"]

#: Stream key of the random-encoder seed (see :func:`bids_regionmae.train.engine.derive_seed`).
STREAM_ENCODER = 23


def random_encoder(variant: str, backend: str = "auto", seed: int = 0) -> tuple[nn.Module, Any]:
    """A randomly initialised encoder of ``variant`` (seeded), and its spec."""
    from bids_regionmae.models.registry import create_encoder, get_spec
    from bids_regionmae.train.engine import derive_seed

    spec = get_spec(variant)
    torch.manual_seed(derive_seed(seed, STREAM_ENCODER))
    return create_encoder(spec, backend=backend), spec


def build_finetune_model(encoder: nn.Module, task: Task, mode: str) -> nn.Module:
    """A fine-tuning model around ``encoder`` (seed the global RNG first for a reproducible head).

    Parameters
    ----------
    encoder : NeuroSTORMEncoder
        Used as is (the caller copies it when it must stay untouched).
    task : Task
        ``task.num_outputs`` outputs: a ``classification`` head of ``len(class_names)``
        classes (one logit for two) or a one-value ``regression`` head.
    mode : {'linear-probe', 'prompt', 'full'}

    Returns
    -------
    FinetuneModel
        ``model(x (B, 1, X, Y, Z, T)) -> (B, K)``; ``model.embed(x) -> (B, C_last)``;
        ``model.head(embedding) -> (B, K)``.
    """
    from bids_regionmae.models.heads import FinetuneModel

    if task.kind == "regression":
        return FinetuneModel(encoder, "regression", 1, mode=mode)
    return FinetuneModel(encoder, "classification", len(task.class_names), mode=mode)


class EncoderEmbedding(nn.Module):
    """``forward(x) = model.embed(x)``: the embedding a fine-tuning model's head sees.

    Parameters
    ----------
    model : FinetuneModel
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings, shape (B, C_last), of clips (B, 1, X, Y, Z, T)."""
        return self.model.embed(x)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
