"""Labelled clips, cached embeddings and sharded inference for fine-tuning.

- :class:`LabelledClips` wraps a :class:`~bids_regionmae.train.data.ClipDataset`
  of every labelled participant and adds the target of each clip. Clips on the
  model grid are kept in memory after their first read when the whole set
  fits in ``cache_bytes`` (the CPU test models: a 24^3 x 4 clip is 55 kB),
  so cross-validation folds do not re-read and re-pool the 96^3 store.
- :func:`subset` selects the clips of some participants (one split's train,
  val or test set): participants, never clips, are the unit of a split.
- :class:`EmbeddingSet` holds pre-computed encoder embeddings for the linear
  probe (the encoder is frozen and deterministic, so every clip is encoded
  once for all folds).
- :func:`infer` runs a module over a dataset, sharded over the processes of
  a distributed job and gathered on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from bids_regionmae.errors import UsageError

if TYPE_CHECKING:
    from bids_regionmae.train.data import ClipDataset

__all__ = ["EmbeddingSet", "LabelledClips", "clip_subjects", "infer", "subset"]

#: Default memory budget for caching pooled clips.
DEFAULT_CACHE_BYTES = 2 * 1024**3


class LabelledClips(Dataset):
    """Clips of labelled participants with their targets.

    Parameters
    ----------
    clips : ClipDataset
        Clips on the model grid (``clip`` (1, X, Y, Z, T) per item).
    targets : mapping of str to float
        Participant -> class index or value; participants without a target
        are dropped.
    cache_bytes : int
        Keep pooled clips in memory when all of them fit in this budget
        (0 disables the cache).

    Notes
    -----
    Items are dicts with ``clip`` (FloatTensor (1, X, Y, Z, T)), ``target``
    (float32 scalar tensor), ``subject`` (str) and ``index`` (int, position
    in this dataset).
    """

    def __init__(self, clips: ClipDataset, targets: Mapping[str, float], *, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.base = clips
        self.targets = {str(k): float(v) for k, v in targets.items()}
        self.indices = [i for i, ref in enumerate(clips.clips) if ref.subject in self.targets]
        self.refs = [clips.clips[i] for i in self.indices]
        item_bytes = 4 * int(np.prod(clips.img_size))
        self.cache_enabled = cache_bytes > 0 and item_bytes * len(self.indices) <= cache_bytes
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def subjects(self) -> list[str]:
        """Subject of every clip, in dataset order."""
        return [ref.subject for ref in self.refs]

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self._cache.get(index)
        if clip is None:
            clip = self.base.read_clip(self.refs[index])
            if self.cache_enabled:
                self._cache[index] = clip
        ref = self.refs[index]
        return {"clip": clip, "target": torch.tensor(self.targets[ref.subject], dtype=torch.float32),
                "subject": ref.subject, "index": index}


class EmbeddingSet(Dataset):
    """Pre-computed clip embeddings with targets (linear probe).

    Parameters
    ----------
    embeddings : Tensor, shape (N, C)
    targets : Tensor, shape (N,)
    subjects : sequence of str, length N
    """

    def __init__(self, embeddings: torch.Tensor, targets: torch.Tensor, subjects: Sequence[str]):
        if not len(embeddings) == len(targets) == len(subjects):
            raise ValueError(f"{len(embeddings)} embeddings, {len(targets)} targets and {len(subjects)} subjects")
        self.embeddings = embeddings.float().cpu()
        self.targets = targets.float().cpu()
        self.subject_list = [str(s) for s in subjects]

    def __len__(self) -> int:
        return len(self.subject_list)

    @property
    def subjects(self) -> list[str]:
        return list(self.subject_list)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"embedding": self.embeddings[index], "target": self.targets[index],
                "subject": self.subject_list[index], "index": index}


def clip_subjects(dataset: Dataset) -> list[str]:
    """Subject of every item of a :class:`LabelledClips`, :class:`EmbeddingSet` or a ``Subset`` of one."""
    if isinstance(dataset, Subset):
        parent = clip_subjects(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return list(dataset.subjects)  # type: ignore[attr-defined]


def subset(dataset: Dataset, subjects: Sequence[str]) -> Subset:
    """The clips of ``subjects`` (all their runs), as a ``Subset`` in dataset order."""
    keep = set(subjects)
    return Subset(dataset, [i for i, s in enumerate(clip_subjects(dataset)) if s in keep])


def _gather(values: list[Any], world_size: int) -> list[Any]:
    if world_size <= 1 or not dist.is_initialized():
        return values
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


@torch.no_grad()
def infer(module: nn.Module, dataset: Dataset, *, input_key: str, device: torch.device | str, batch_size: int = 8,
          rank: int = 0, world_size: int = 1, autocast: Callable[[], Any] | None = None,
          num_workers: int = 0) -> tuple[list[str], torch.Tensor]:
    """Outputs of ``module`` for every item of ``dataset``, in dataset order, on every rank.

    Parameters
    ----------
    module : nn.Module
        ``module(batch[input_key]) -> Tensor (B, K)``; run in eval mode.
    dataset : Dataset
        Items with ``input_key``, ``subject`` and ``index``.
    input_key : {'clip', 'embedding'}
    device : torch.device or str
    batch_size : int
    rank, world_size : int
        Items ``rank::world_size`` are computed here, then all ranks gather all.
    autocast : callable, optional
        Context-manager factory for the forward pass (training precision).
    num_workers : int

    Returns
    -------
    subjects : list of str, length N
    outputs : FloatTensor, shape (N, K), on CPU
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise UsageError("nothing to run the model on: the dataset is empty")
    mine = list(range(rank, n, world_size))
    was_training = module.training
    module.eval()
    rows: list[tuple[int, str, list[float]]] = []
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    done = 0
    for batch in loader:
        x = batch[input_key].to(device)
        with (autocast() if autocast else contextlib.nullcontext()):
            out = module(x)
        out = out.float().reshape(x.shape[0], -1).cpu()
        for subject, row in zip(batch["subject"], out.tolist(), strict=True):
            rows.append((mine[done], str(subject), row))  # position in ``dataset``
            done += 1
    module.train(was_training)
    rows = sorted(_gather(rows, world_size))
    return [r[1] for r in rows], torch.tensor([r[2] for r in rows], dtype=torch.float32)
