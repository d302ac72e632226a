"""Cross-validated fine-tuning and the final refit, one participant split at a time.

:class:`Finetuner` holds what every split shares (the labelled clips, the
starting encoder, the task, the optimisation settings) and trains one model
per :class:`~bids_regionmae.evaluation.splits.Split`:

1. a fresh :class:`~bids_regionmae.models.heads.FinetuneModel` on a copy of the
   starting encoder (the pretrained one, or a seeded random one), head and
   prompts initialised from ``(seed, split index)``;
2. class weights (or the regression standardisation) from the split's
   *training* participants only;
3. training with :func:`bids_regionmae.finetune.train.fit` on the training
   participants' clips, early stopping on the *validation* participants
   (subject-level loss of mean clip logits), best weights restored;
4. clip outputs of the *test* participants averaged per participant and scored
   with :func:`bids_regionmae.evaluation.metrics.make_fold_result`, which
   refuses any scored participant outside the split's test set.

Linear probe: the encoder is frozen and deterministic, so every clip is
encoded once (:meth:`Finetuner.embeddings`) and only the head is trained, on
the cached embeddings, through the same engine. Prompt tuning and full
fine-tuning run the whole model on clips.

Files, per split (``out_dir/folds/<split>/``, rank 0 only)::

    train_log.csv, val_log.csv     engine logs (per step / per epoch)
    fold_result.json               the scored fold (written last: completion marker)
    checkpoints/                   engine state while the split trains (removed when it is done)

A rerun skips splits whose ``fold_result.json`` exists and resumes an
interrupted split from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.evaluation.metrics import FoldResult
from bids_regionmae.evaluation.splits import Split
from bids_regionmae.finetune.data import EmbeddingSet, LabelledClips, clip_subjects, infer, subset
from bids_regionmae.finetune.task import LossSpec, Task, class_balance
from bids_regionmae.finetune.train import FitOutcome, fit
from bids_regionmae.train.engine import DistInfo, TrainSettings, derive_seed, resolve_precision

LOGGER = logging.getLogger(__name__)

__all__ = ["FOLD_RESULT", "MODES", "STREAM_HEAD", "STREAM_SPLIT", "Finetuner", "SplitOutcome"]

MODES = ("linear-probe", "prompt", "full")
#: seed streams (see :func:`bids_regionmae.train.engine.derive_seed`)
STREAM_HEAD = 21
STREAM_SPLIT = 22
FOLD_RESULT = "fold_result.json"


@dataclasses.dataclass
class SplitOutcome:
    """One trained split.

    Attributes
    ----------
    model : nn.Module
        The fine-tuned model (best validation weights), on CPU.
    fit : FitOutcome
    loss : LossSpec
        With the training participants' class weights / standardisation.
    """

    model: nn.Module
    fit: FitOutcome
    loss: LossSpec


def _clean_json(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


class Finetuner:
    """Fine-tune and score one model per participant split.

    Parameters
    ----------
    clips : LabelledClips
        Clips of every labelled participant used (any split's participants).
    task : Task
    targets : mapping of str to float
        Participant -> class index or value.
    encoder : nn.Module
        Starting encoder (pretrained or random); never modified (copied per split,
        except in linear-probe mode where it is frozen and shared).
    mode : {'linear-probe', 'prompt', 'full'}
    settings : TrainSettings
        Base settings; each split trains with its own seed derived from ``seed``.
    out_dir : path
        Folder of the fine-tuned model directory (``folds/`` and ``final/`` go there).
    seed : int
    patience : int
        Early-stopping patience (evaluations, i.e. epochs).
    monitor : str
        Early-stopping metric (see :data:`bids_regionmae.finetune.train.MONITORS`).
    dist_info : DistInfo, optional
    model_label : str
        Name of the model in fold results and tables.
    fingerprint : mapping, optional
        Added to every split's engine fingerprint (a resumed checkpoint must match).
    weighted : bool
        Class-weighted loss.
    cache_embeddings : bool
        Linear probe on cached embeddings (True) or on clips every epoch (False).
    """

    def __init__(self, clips: LabelledClips, task: Task, targets: Mapping[str, float], encoder: nn.Module, *,
                 mode: str, settings: TrainSettings, out_dir: str | Path, seed: int = 0, patience: int = 5,
                 monitor: str = "val_loss", dist_info: DistInfo | None = None, model_label: str = "regionmae",
                 fingerprint: Mapping[str, Any] | None = None, weighted: bool = True,
                 cache_embeddings: bool = True):
        from bids_regionmae.errors import UsageError

        if mode not in MODES:
            raise UsageError(f"finetune.mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.clips = clips
        self.task = task
        self.targets = {str(k): float(v) for k, v in targets.items()}
        self.encoder = encoder
        self.mode = mode
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.seed = int(seed)
        self.patience = int(patience)
        self.monitor = monitor
        self.info = dist_info or DistInfo()
        self.model_label = model_label
        self.fingerprint = dict(fingerprint or {})
        self.weighted = weighted
        self.cache_embeddings = cache_embeddings and mode == "linear-probe"
        self._embeddings: EmbeddingSet | None = None
        self.precision = resolve_precision(settings.precision, self.info.device)

    # ------------------------------------------------------------------ pieces

    @property
    def input_key(self) -> str:
        """``embedding`` for the cached linear probe, else ``clip``."""
        return "embedding" if self.cache_embeddings else "clip"

    def _autocast(self) -> Any:
        import contextlib

        if self.precision == "bf16":
            return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def embeddings(self) -> EmbeddingSet:
        """Embeddings of every clip by the frozen starting encoder, computed once (sharded over ranks).

        Returns
        -------
        EmbeddingSet
            ``embedding`` (C_last,) per clip, in the order of :attr:`clips`.
        """
        if self._embeddings is None:
            from bids_regionmae.finetune.model import EncoderEmbedding

            probe = EncoderEmbedding(self.build_model(0)).to(self.info.device)
            LOGGER.info("linear probe: encoding %d clips once with the frozen encoder", len(self.clips))
            subjects, emb = infer(probe, self.clips, input_key="clip", device=self.info.device,
                                  batch_size=self.settings.batch_size, rank=self.info.rank,
                                  world_size=self.info.world_size, autocast=self._autocast,
                                  num_workers=self.settings.num_workers)
            targets = torch.tensor([self.targets[s] for s in subjects], dtype=torch.float32)
            self._embeddings = EmbeddingSet(emb, targets, subjects)
        return self._embeddings

    def _data(self) -> Any:
        return self.embeddings() if self.cache_embeddings else self.clips

    def build_model(self, index: int) -> nn.Module:
        """A fresh fine-tuning model for split ``index`` (head/prompts seeded by ``(seed, index)``)."""
        from bids_regionmae.finetune.model import build_finetune_model

        encoder = self.encoder if self.mode == "linear-probe" else copy.deepcopy(self.encoder)
        torch.manual_seed(derive_seed(self.seed, STREAM_HEAD, index))
        return build_finetune_model(encoder, self.task, self.mode)

    def loss_for(self, train_subjects: Sequence[str]) -> LossSpec:
        """Loss with class weights (or standardisation) of ``train_subjects`` only."""
        balance = class_balance(self.task, [self.targets[s] for s in train_subjects])
        return LossSpec(self.task, balance, weighted=self.weighted)

    # ------------------------------------------------------------------ training

    def train_split(self, split: Split, index: int, folder: str | Path) -> SplitOutcome:
        """Train on ``split.train`` with early stopping on ``split.val``.

        Parameters
        ----------
        split : Split
            Its ``test`` participants are not touched here.
        index : int
            Seeds the head and the engine.
        folder : path
            Engine output folder (checkpoints, CSV logs).

        Returns
        -------
        SplitOutcome
        """
        _check_disjoint(split)
        model = self.build_model(index)
        module = model.head if self.cache_embeddings else model
        data = self._data()
        train_set = subset(data, split.train)
        val_set = subset(data, split.val) if split.val else None
        loss = self.loss_for(split.train)
        settings = dataclasses.replace(self.settings, seed=derive_seed(self.seed, STREAM_SPLIT, index))
        fingerprint = {**self.fingerprint, "split": split.name, "mode": self.mode, "task": self.task.to_dict(),
                       "train": list(split.train), "val": list(split.val), "input": self.input_key,
                       "balance": json.loads(json.dumps(_clean_json(loss.balance)))}
        LOGGER.info("split %s: training on %d participants (%d clips), validating on %d (%d clips); %s",
                    split.name, len(split.train), len(train_set), len(split.val), len(val_set or []),
                    ", ".join(f"{k} {v}" for k, v in loss.balance.items()))
        outcome = fit(module, train_set, val_set, loss=loss, targets=self.targets, settings=settings,
                      out_dir=folder, input_key=self.input_key, patience=self.patience, monitor=self.monitor,
                      dist_info=self.info, fingerprint=fingerprint)
        model = model.cpu()
        return SplitOutcome(model=model, fit=outcome, loss=loss)

    def predict(self, model: nn.Module, subjects: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Clip outputs of ``subjects`` (model units), in dataset order.

        Returns
        -------
        clip_subjects : list of str, length N
        outputs : ndarray, shape (N, K)
        """
        module = model.head if self.cache_embeddings else model
        module = module.to(self.info.device)
        names, out = infer(module, subset(self._data(), subjects), input_key=self.input_key,
                           device=self.info.device, batch_size=self.settings.batch_size, rank=self.info.rank,
                           world_size=self.info.world_size, autocast=self._autocast,
                           num_workers=self.settings.num_workers)
        model.cpu()
        return names, out.numpy()

    def score(self, outcome: SplitOutcome, split: Split) -> FoldResult:
        """Fold result of the split's test participants (subject-level, :func:`make_fold_result`)."""
        from bids_regionmae.evaluation.metrics import aggregate_by_subject, make_fold_result

        names, outputs = self.predict(outcome.model, split.test)
        subjects, means = aggregate_by_subject(names, outputs)
        scores = outcome.loss.to_target_units(means)
        y = np.asarray([self.targets[s] for s in subjects])
        if self.task.is_classification:
            y = y.astype(np.int64)
        extra = {"training": outcome.fit.summary(), "balance": _clean_json(dict(outcome.loss.balance)),
                 "mode": self.mode, "n_test_clips": len(names)}
        return make_fold_result(split.name, subjects, y, scores, self.task.kind,
                                class_names=list(self.task.class_names) or None, split=split,
                                model=self.model_label, extra=extra)

    # ------------------------------------------------------------------ schemes

    def fold_folder(self, split: Split) -> Path:
        return self.out_dir / "folds" / split.name

    def evaluate_split(self, split: Split, index: int) -> FoldResult:
        """Train and score one split, or load its result when a previous run finished it."""
        folder = self.fold_folder(split)
        marker = folder / FOLD_RESULT
        if marker.is_file() and self.settings.resume:
            record = json.loads(marker.read_text(encoding="utf-8"))
            if record.get("split") == split.to_dict():
                LOGGER.info("split %s: already done (%s)", split.name, marker)
                return FoldResult.from_dict(record)
            LOGGER.warning("split %s: %s belongs to another split; training again", split.name, marker)
        outcome = self.train_split(split, index, folder)
        result = self.score(outcome, split)
        if self.info.is_main:
            atomic_write_json(marker, _clean_json(result.to_dict()))
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return result

    def cross_validate(self, splits: Sequence[Split]) -> list[FoldResult]:
        """Fold results of every split (see :meth:`evaluate_split`), in order."""
        results = []
        for index, split in enumerate(splits):
            results.append(self.evaluate_split(split, index))
            shown = {k: v for k, v in results[-1].metrics.items() if k in ("acc", "auroc", "mae", "r2")}
            LOGGER.info("split %s done: %s", split.name, ", ".join(f"{k} {float(v):.3f}" for k, v in shown.items()))
        return results

    def refit(self, split: Split, index: int = 10_000) -> SplitOutcome:
        """The deliverable model: train on ``split.train``, early-stop on ``split.val`` (no test set)."""
        return self.train_split(split, index, self.out_dir / "final")


def _check_disjoint(split: Split) -> None:
    """A split's partitions share no participant (an empty test set is allowed: the final refit)."""
    if split.test:
        split.assert_disjoint()
        return
    from bids_regionmae.evaluation.splits import SplitError

    both = sorted(set(split.train) & set(split.val))
    if both or not split.train:
        raise SplitError(f"split {split.name!r}: " + (f"participants in both train and val: {both[:5]}" if both
                                                      else "no training participant"))


def check_scored_subjects(fold_results: Sequence[FoldResult]) -> None:
    """Raise when a fold scored a participant outside its test set (a leak).

    Raises
    ------
    bids_regionmae.evaluation.splits.SplitError
    """
    from bids_regionmae.evaluation.splits import Split, SplitError

    for result in fold_results:
        split = Split.from_dict(result.split)
        if set(result.subjects) - set(split.test):
            raise SplitError(f"fold {result.name}: scored participants outside its test set")


def pooled_summary(fold_results: Sequence[FoldResult]) -> dict[str, Any]:
    """Mean and sd over folds of every scalar metric (:func:`summarise_folds`)."""
    from bids_regionmae.evaluation.metrics import summarise_folds

    _, summary = summarise_folds(fold_results)
    return {k: {kk: (None if isinstance(vv, float) and math.isnan(vv) else vv) for kk, vv in v.items()}
            for k, v in summary.items()}


def summary_floats(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """A :func:`pooled_summary` with None turned back into NaN (for comparison tables)."""
    return {k: {kk: (math.nan if vv is None else vv) for kk, vv in v.items()} for k, v in summary.items()}


def fold_clip_counts(data: LabelledClips, splits: Sequence[Split]) -> dict[str, dict[str, int]]:
    """Clips per partition of every split (for logs and manifests)."""
    subjects = clip_subjects(data)
    out = {}
    for split in splits:
        out[split.name] = {part: sum(1 for s in subjects if s in set(getattr(split, part)))
                           for part in ("train", "val", "test")}
    return out
