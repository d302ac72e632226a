"""Batched inference helpers: precision, progress bars and clip batches of one run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from bids_regionmae.train.data import ClipDataset

__all__ = ["autocast_factory", "iter_run_batches", "progress"]


def autocast_factory(device: torch.device | str, precision: str = "auto") -> Callable[[], Any]:
    """A context-manager factory for forward passes.

    Parameters
    ----------
    device : torch.device or str
    precision : {'auto', 'bf16', 'fp32'}
        ``auto``: bf16 autocast on CUDA, fp32 on CPU.

    Returns
    -------
    callable
        ``with factory(): ...``
    """
    device = torch.device(device)
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def progress(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr (silent when stderr is not a terminal or ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="clip", leave=False, disable=not enabled or not sys.stderr.isatty())


def iter_run_batches(dataset: ClipDataset, batch_size: int, device: torch.device | str
                     ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Batches of the clips of a :class:`~bids_regionmae.train.data.ClipDataset`, in order.

    Parameters
    ----------
    dataset : ClipDataset
    batch_size : int
    device : torch.device or str

    Yields
    ------
    indices : list of int
        Dataset indices of the batch.
    x : FloatTensor, shape (B, 1, X, Y, Z, T)
        On ``device``.
    brain : BoolTensor, shape (B, X, Y, Z)
        On ``device``.
    """
    n = len(dataset)
    for start in range(0, n, max(1, int(batch_size))):
        idx = list(range(start, min(n, start + batch_size)))
        items = [dataset[i] for i in idx]
        x = torch.stack([it["clip"] for it in items]).to(device)
        brain = torch.stack([it["brain_mask"] for it in items]).to(device)
        yield idx, x, brain
