"""Clips from the model-ready store as a torch Dataset, and the participant split.

The store (:mod:`bids_regionmae.preprocess.store`) holds each run as a float16
``(T, 96, 96, 96)`` array on the 2 mm model grid. A model variant may want a
coarser grid (the CPU ``tiny`` variant takes 48^3): the data are then
average-pooled by an integer factor per axis, the brain mask is pooled and
thresholded (``mean > 0.5``) and the atlas labels take the most frequent label
of each block (:func:`downsample_labels`), so that all three stay aligned.

Runs are opened lazily as memory maps in whichever process reads them, so
the dataset can be sent to DataLoader workers (``fork`` or ``spawn``) without
copying any voxel data.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bids_regionmae.errors import UsageError
from bids_regionmae.grid import downsample_factors, downsample_mask

LOGGER = logging.getLogger(__name__)

__all__ = [
    "ClipDataset",
    "ClipRef",
    "run_clips",
    "split_participants",
]


# --------------------------------------------------------------------------- clips and split


@dataclass(frozen=True)
class ClipRef:
    """One clip of one run.

    Attributes
    ----------
    run : int
        Index into the dataset's run list.
    clip_index : int
        Index of the clip within its run.
    start, stop : int
        Frame range (stop exclusive).
    subject, run_id : str
    """

    run: int
    clip_index: int
    start: int
    stop: int
    subject: str
    run_id: str


def run_clips(run: Any, n_frames: int) -> list[tuple[int, int]]:
    """Clip frame ranges of ``n_frames`` for a model-ready run.

    The run's clip table is used when its clips have ``n_frames`` frames;
    otherwise (the model takes shorter or longer clips than participant level
    cut) the run is tiled with non-overlapping windows of ``n_frames``.

    Parameters
    ----------
    run : ModelReadyRun
    n_frames : int
        The model's ``T``.

    Returns
    -------
    list of (start, stop)
    """
    stored = [c for c in run.clips if c[1] - c[0] == n_frames]
    if stored:
        return stored
    total = run.n_frames
    return [(s, s + n_frames) for s in range(0, total - n_frames + 1, n_frames)]


def split_participants(subjects: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded participant-level train/validation split (no participant in both).

    Parameters
    ----------
    subjects : sequence of str
        Participant labels (duplicates are ignored).
    val_fraction : float
        In [0, 1). ``round(val_fraction * n)`` participants go to validation,
        at least 1 when ``val_fraction > 0`` and there are 2 or more
        participants, and never all of them.
    seed : int

    Returns
    -------
    (train, val) : two sorted lists of str
    """
    unique = sorted(set(subjects))
    n = len(unique)
    if not 0 <= val_fraction < 1:
        raise UsageError(f"train.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1) if n else 0
    if val_fraction > 0 and n_val == 0:
        LOGGER.warning("only %d participant(s): no validation set (train.val_fraction=%s ignored)", n,
                       val_fraction)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1])).permutation(n)
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return train, val


# --------------------------------------------------------------------------- dataset


class ClipDataset(Dataset):
    """Clips of model-ready runs, on the model's grid.

    Parameters
    ----------
    runs : sequence of ModelReadyRun
        From :func:`bids_regionmae.preprocess.store.find_model_ready_runs`.
    img_size : sequence of 4 int
        The model's ``(X, Y, Z, T)``.
    subjects : collection of str, optional
        Keep only these participants' runs.
    clips : sequence of ClipRef, optional
        Precomputed clip list (default: every clip of every run, see :func:`run_clips`).

    Notes
    -----
    Each item is a dict:

    ``clip`` : FloatTensor, shape (1, X, Y, Z, T)
        float32, average-pooled to the model grid.
    ``brain_mask`` : BoolTensor, shape (X, Y, Z)
        The run's brain mask on the model grid.
    ``index`` : int
        Position in the dataset (seeds per-sample evaluation masks).
    ``subject``, ``run_id`` : str
    ``clip_index`` : int
        Clip number within the run.

    Memory maps are opened on first access in the process that reads them
    (DataLoader workers included); copies sent to workers leave them behind.
    """

    def __init__(self, runs: Sequence[Any], img_size: Sequence[int], *, subjects: Sequence[str] | None = None,
                 clips: Sequence[ClipRef] | None = None):
        if len(img_size) != 4:
            raise ValueError(f"img_size must be (X, Y, Z, T), got {tuple(img_size)}")
        self.img_size = tuple(int(v) for v in img_size)
        keep = None if subjects is None else set(subjects)
        self.runs = [r for r in runs if keep is None or r.subject in keep]
        if self.runs:
            store_shape = tuple(int(v) for v in self.runs[0].meta.get("grid", {}).get("shape", (96, 96, 96)))
        else:
            store_shape = (96, 96, 96)
        self.store_shape = store_shape
        self.factors = downsample_factors(store_shape, self.img_size[:3])
        if clips is None:
            refs = []
            for i, run in enumerate(self.runs):
                for j, (start, stop) in enumerate(run_clips(run, self.img_size[3])):
                    refs.append(ClipRef(i, j, start, stop, run.subject, run.run_id))
            clips = refs
        self.clips: list[ClipRef] = list(clips)
        self._masks: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_masks"] = {}
        return state

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def subjects(self) -> list[str]:
        """Participants with at least one clip, sorted."""
        return sorted({c.subject for c in self.clips})

    def brain_mask(self, run: int) -> torch.Tensor:
        """Brain mask of run ``run`` on the model grid, BoolTensor (X, Y, Z) (cached)."""
        if run not in self._masks:
            self._masks[run] = downsample_mask(self.runs[run].mask, self.factors)
        return self._masks[run]

    def read_clip(self, ref: ClipRef) -> torch.Tensor:
        """Frames of ``ref`` on the model grid, FloatTensor (1, X, Y, Z, T).

        One pass over the memory-mapped float16 frames: the pooling (or, at
        factor 1, the copy) converts to float32 and moves time last.
        """
        with warnings.catch_warnings():  # a read-only view of the memory map; it is never written
            warnings.simplefilter("ignore", UserWarning)
            frames = torch.from_numpy(self.runs[ref.run].data[ref.start:ref.stop])  # (T, 96, 96, 96) float16
        T, X, Y, Z = frames.shape
        fx, fy, fz = self.factors
        if (fx, fy, fz) == (1, 1, 1):
            out = torch.empty((X, Y, Z, T), dtype=torch.float32)
            out.copy_(frames.permute(1, 2, 3, 0))
        else:
            pooled = torch.mean(frames.reshape(T, X // fx, fx, Y // fy, fy, Z // fz, fz), dim=(2, 4, 6),
                                dtype=torch.float32)
            out = pooled.permute(1, 2, 3, 0).contiguous()
        return out.unsqueeze(0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref = self.clips[index]
        return {"clip": self.read_clip(ref), "brain_mask": self.brain_mask(ref.run), "index": index,
                "subject": ref.subject, "run_id": ref.run_id, "clip_index": ref.clip_index}
