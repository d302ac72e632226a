"""Task heads and the fine-tuning wrapper (linear probe, prompt tuning, full).

Heads read the mean over all tokens (space and time) of the encoder output,
(B, C_last), and return (B, out_dim):

- ``classification``: ``num_outputs`` classes; 2 classes (or 1) give a single
  logit (use ``BCEWithLogitsLoss``, probability ``sigmoid``), K > 2 classes
  give K logits (``CrossEntropyLoss``);
- ``regression``: ``num_outputs`` values;
- ``embedding``: an L2-normalised ``num_outputs``-dimensional vector from a
  two-layer projection.

:class:`FinetuneModel` modes:

- ``"full"``: everything trains;
- ``"linear-probe"``: the encoder is frozen (and run without autograd), only
  the head trains;
- ``"prompt"``: the encoder is frozen; learnable prompt tokens are prepended
  to every window's Mamba sequence in every block of every stage
  (NeuroSTORM's task-specific prompt tuning); prompts and head train.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bids_regionmae.errors import UsageError
from bids_regionmae.models.neurostorm import NeuroSTORMEncoder

TASKS: tuple[str, ...] = ("classification", "regression", "embedding")
MODES: tuple[str, ...] = ("linear-probe", "prompt", "full")
DEFAULT_PROMPT_LENGTH = 4


def head_output_dim(task: str, num_outputs: int) -> int:
    """Width of the head output for ``task`` with ``num_outputs`` classes/targets/dimensions.

    Raises
    ------
    UsageError
        Unknown task or a non-positive ``num_outputs``.
    """
    if task not in TASKS:
        raise UsageError(f"task: expected one of {', '.join(TASKS)}; got {task!r}")
    if int(num_outputs) != num_outputs or num_outputs < 1:
        raise UsageError(f"num_outputs: expected a positive integer for task {task!r}; got {num_outputs!r}")
    if task == "classification":
        return 1 if num_outputs <= 2 else int(num_outputs)
    return int(num_outputs)


def mean_pool(tokens: torch.Tensor) -> torch.Tensor:
    """Mean over every token of channels-last features.

    Parameters
    ----------
    tokens : Tensor, shape (B, d, h, w, T, C)

    Returns
    -------
    Tensor, shape (B, C)
    """
    return tokens.mean(dim=tuple(range(1, tokens.dim() - 1)))


class LinearHead(nn.Module):
    """``LayerNorm`` + dropout + ``Linear`` on pooled features (classification/regression).

    Parameters
    ----------
    in_dim : int
        C_last.
    out_dim : int
    dropout : float
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, out_dim)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.fc(self.dropout(self.norm(x)))


class ClassificationHead(LinearHead):
    """Logits: 1 for binary problems, K for K > 2 classes."""


class RegressionHead(LinearHead):
    """Real-valued outputs (standardise the targets)."""


class EmbeddingHead(nn.Module):
    """Two-layer projection to an L2-normalised embedding.

    Parameters
    ----------
    in_dim : int
    out_dim : int
    dropout : float
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim), unit L2 norm."""
        x = self.fc2(self.dropout(self.act(self.fc1(self.norm(x)))))
        return F.normalize(x, dim=-1)


def build_head(task: str, in_dim: int, num_outputs: int, dropout: float = 0.0) -> nn.Module:
    """Head for ``task`` (see the module docstring); output width :func:`head_output_dim`."""
    out_dim = head_output_dim(task, num_outputs)
    if task == "classification":
        return ClassificationHead(in_dim, out_dim, dropout)
    if task == "regression":
        return RegressionHead(in_dim, out_dim, dropout)
    return EmbeddingHead(in_dim, out_dim, dropout)


class FinetuneModel(nn.Module):
    """Pretrained encoder + task head.

    Parameters
    ----------
    encoder : NeuroSTORMEncoder
        Usually ``mae.encoder`` of a pretrained MAE (or ``create_encoder``).
    task : {"classification", "regression", "embedding"}
    num_outputs : int
        Classes (classification), targets (regression) or dimensions (embedding).
    mode : {"full", "linear-probe", "prompt"}
        What trains; see the module docstring.
    prompt_length : int, optional
        Prompt tokens per block in ``"prompt"`` mode (default 4; ignored
        when the encoder already has prompts).
    dropout : float
        Dropout before the head's linear layer.

    Attributes
    ----------
    encoder : NeuroSTORMEncoder
    head : nn.Module
    out_dim : int
        Width of ``forward``'s output (1 for binary classification).
    """

    def __init__(self, encoder: NeuroSTORMEncoder, task: str, num_outputs: int, mode: str = "full",
                 prompt_length: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if mode not in MODES:
            raise UsageError(f"finetune mode: expected one of {', '.join(MODES)}; got {mode!r}")
        if not isinstance(encoder, NeuroSTORMEncoder):
            raise TypeError(f"encoder: expected a NeuroSTORMEncoder; got {type(encoder).__name__}")
        self.task = task
        self.num_outputs = int(num_outputs)
        self.mode = mode
        self.dropout = float(dropout)
        self.out_dim = head_output_dim(task, num_outputs)
        self.encoder = encoder
        if mode == "prompt" and not encoder.prompt_parameters():
            length = DEFAULT_PROMPT_LENGTH if prompt_length is None else int(prompt_length)
            encoder.add_prompts(length)
        self.head = build_head(task, encoder.num_features, num_outputs, dropout)
        if mode in ("linear-probe", "prompt"):
            for p in encoder.parameters():
                p.requires_grad_(False)
            for p in encoder.prompt_parameters() if mode == "prompt" else ():
                p.requires_grad_(True)
        self.train()

    @property
    def spec(self):
        """The encoder's :class:`ModelSpec`."""
        return self.encoder.spec

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) to rebuild this model around a fresh encoder."""
        return {"task": self.task, "num_outputs": self.num_outputs, "mode": self.mode,
                "prompt_length": self.encoder.prompt_length, "dropout": self.dropout}

    def train(self, mode: bool = True) -> FinetuneModel:
        """Set training mode; a frozen encoder always stays in eval mode (no drop-path)."""
        super().train(mode)
        if self.mode != "full":
            self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should update in this mode."""
        return [p for p in self.parameters() if p.requires_grad]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder features.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, X, Y, Z, T)

        Returns
        -------
        Tensor, shape (B, C_last)
        """
        ctx = torch.no_grad() if self.mode == "linear-probe" else contextlib.nullcontext()
        with ctx:
            return mean_pool(self.encoder.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Task outputs.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, X, Y, Z, T)

        Returns
        -------
        Tensor, shape (B, out_dim)
            Logits (classification), values (regression) or unit vectors (embedding).
        """
        return self.head(self.embed(x))


__all__ = [
    "DEFAULT_PROMPT_LENGTH", "MODES", "TASKS", "ClassificationHead", "EmbeddingHead", "FinetuneModel",
    "LinearHead", "RegressionHead", "build_head", "head_output_dim", "mean_pool",
]
