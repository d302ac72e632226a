"""Fine-tuning on the shared engine: step and evaluation functions, early stopping, one fit.

The training loop is :class:`bids_regionmae.train.engine.Trainer` (AdamW,
warm-up + cosine, checkpoints and resume, DDP); this module only supplies

- :func:`make_step_fn`: the class-weighted loss of a batch of clips (or of
  cached embeddings for the linear probe), one sample per clip;
- :func:`make_eval_fn`: *subject-level* validation metrics: clip outputs are
  averaged per participant (mean of logits, as NeuroSTORM) before the loss,
  ACC (logit 0) and AUROC (sigmoid) are computed; under DDP every rank
  gathers all clip outputs first, so the numbers do not depend on how the
  clips were sharded;
- :class:`EarlyStopping`: stops when the monitored validation metric has
  not improved for ``patience`` evaluations (one per epoch) and keeps the best
  weights; its state travels in the engine checkpoint (``extra``), so a
  resumed run stops at the same point with the same best weights;
- :func:`fit`: one training run into a folder, returning the model with its
  best weights restored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bids_regionmae.finetune.task import LossSpec
from bids_regionmae.train.engine import (
    DistInfo,
    EvalContext,
    StepContext,
    StepOutput,
    Trainer,
    TrainResult,
    TrainSettings,
    load_checkpoint,
    unwrap,
)

LOGGER = logging.getLogger(__name__)

__all__ = ["MONITORS", "EarlyStopping", "FitOutcome", "fit", "make_eval_fn", "make_step_fn", "subject_metrics"]

#: Validation metrics early stopping can monitor, with the better direction.
MONITORS = {"val_loss": "min", "val_auroc": "max", "val_acc": "max", "val_mae": "min"}


def make_step_fn(loss: LossSpec, input_key: str = "clip") -> Callable[[nn.Module, Any, StepContext], StepOutput]:
    """Engine step: mean per-clip loss of the batch.

    The returned function takes a batch with ``input_key`` (``clip`` (B, 1, X,
    Y, Z, T) or ``embedding`` (B, C)) and ``target`` (B,), runs
    ``model(batch[input_key]) -> (B, K)`` and returns the mean of
    :meth:`LossSpec.per_sample`.
    """
    def step_fn(model: nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> StepOutput:
        out = model(batch[input_key])
        value = loss.mean(out.reshape(out.shape[0], -1), batch["target"])
        return StepOutput(loss=value, batch_size=int(batch["target"].shape[0]))

    return step_fn


def subject_metrics(loss: LossSpec, subjects: list[str], outputs: np.ndarray,
                    targets: Mapping[str, float]) -> dict[str, float]:
    """Subject-level validation metrics from clip outputs.

    Parameters
    ----------
    loss : LossSpec
    subjects : list of str
        Subject of each clip, length N.
    outputs : ndarray, shape (N, K)
        Clip outputs in model units.
    targets : mapping of str to float
        Subject -> target.

    Returns
    -------
    dict
        ``val_loss`` (loss of the per-subject mean outputs, class-weighted as
        in training), ``val_clip_loss``; classification: ``val_acc`` and
        ``val_auroc`` (NaN when the validation set has one class);
        regression: ``val_mae`` in the target's units.
    """
    from bids_regionmae.evaluation.metrics import aggregate_by_subject, compute_metrics

    if not subjects:
        return {"val_loss": math.nan}
    outputs = np.asarray(outputs, dtype=np.float64).reshape(len(subjects), -1)
    clip_targets = np.asarray([targets[s] for s in subjects], dtype=np.float64)
    names, means = aggregate_by_subject(subjects, outputs)
    y = np.asarray([targets[s] for s in names], dtype=np.float64)
    out = {"val_loss": loss.subject_loss(means, y), "val_clip_loss": loss.subject_loss(outputs, clip_targets)}
    task = loss.task
    scores = loss.to_target_units(means)
    if task.kind == "regression":
        out["val_mae"] = float(np.mean(np.abs(scores - y)))
        return out
    yi = y.astype(np.int64)
    if len(np.unique(yi)) < (len(task.class_names)):
        pred = (scores >= 0).astype(np.int64) if task.kind == "binary" else scores.argmax(1)
        out["val_acc"] = float(np.mean(pred == yi))
        out["val_auroc"] = math.nan
        return out
    metrics = compute_metrics(task.kind, yi, scores, n_classes=len(task.class_names))
    out["val_acc"] = float(metrics["acc"])
    out["val_auroc"] = float(metrics["auroc"])
    return out


def make_eval_fn(loss: LossSpec, targets: Mapping[str, float],
                 input_key: str = "clip") -> Callable[[nn.Module, DataLoader, EvalContext], dict]:
    """Engine evaluation: subject-level metrics of the validation set (see :func:`subject_metrics`).

    Every rank runs its shard of clips, all ranks gather every (subject,
    output) pair, and rank 0 reports the metrics (other ranks report empty
    sums), so the engine's pooled ``sum / count`` is exactly rank 0's value.
    """
    def eval_fn(model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, tuple[float, float]]:
        rows: list[tuple[str, list[float]]] = []
        for batch in loader:
            x = batch[input_key].to(ctx.device)
            with ctx.autocast():
                out = model(x)
            out = out.float().reshape(x.shape[0], -1).cpu()
            rows.extend(zip((str(s) for s in batch["subject"]), out.tolist(), strict=True))
        if ctx.world_size > 1 and dist.is_initialized():
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        metrics = subject_metrics(loss, [r[0] for r in rows], np.asarray([r[1] for r in rows]), targets)
        weight = 1.0 if ctx.rank == 0 else 0.0
        return {k: (v * weight if weight else 0.0, weight) for k, v in metrics.items()}

    return eval_fn


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved for ``patience`` evaluations; keep the best weights.

    Use as the engine's ``on_eval`` callback. The tracked state (best value,
    step, evaluations without improvement, best weights of the trainable
    parameters) is stored in ``trainer.extra_state["early_stopping"]`` and so
    in every checkpoint; :meth:`load` restores it before a resumed run.

    Parameters
    ----------
    monitor : str
        A key of :data:`MONITORS`; when its value is NaN (e.g. AUROC of a
        one-class validation set) ``val_loss`` decides instead.
    patience : int
        Evaluations without improvement before stopping.
    keys : set of str, optional
        State-dict keys to remember (default: all).
    min_delta : float
        Smallest change that counts as an improvement.
    """

    monitor: str = "val_loss"
    patience: int = 5
    keys: set[str] | None = None
    min_delta: float = 0.0
    best: float = math.nan
    best_step: int = -1
    best_epoch: int = -1
    bad_evals: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {sorted(MONITORS)}, got {self.monitor!r}")

    def _improved(self, value: float, mode: str) -> bool:
        if math.isnan(self.best):
            return True
        return value < self.best - self.min_delta if mode == "min" else value > self.best + self.min_delta

    def __call__(self, trainer: Trainer, metrics: Mapping[str, float]) -> bool:
        monitor = self.monitor
        value = float(metrics.get(monitor, math.nan))
        if math.isnan(value) and monitor != "val_loss":
            monitor, value = "val_loss", float(metrics.get("val_loss", math.nan))
        if not math.isnan(value) and self._improved(value, MONITORS[monitor]):
            self.best, self.best_step, self.best_epoch, self.bad_evals = value, trainer.step, trainer.epoch, 0
            state = unwrap(trainer.model).state_dict()
            self.best_state = {k: v.detach().cpu().clone() for k, v in state.items()
                               if self.keys is None or k in self.keys}
        else:
            self.bad_evals += 1
        trainer.extra_state["early_stopping"] = self.state_dict()
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "patience": self.patience, "best": self.best, "best_step": self.best_step,
                "best_epoch": self.best_epoch, "bad_evals": self.bad_evals, "best_state": self.best_state}

    def load(self, state: Mapping[str, Any] | None) -> None:
        """Restore from :meth:`state_dict` (None: nothing to restore)."""
        if not state:
            return
        self.best = float(state.get("best", math.nan))
        self.best_step = int(state.get("best_step", -1))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.bad_evals = int(state.get("bad_evals", 0))
        self.best_state = state.get("best_state")

    def restore(self, model: nn.Module) -> bool:
        """Load the best weights into ``model``; False when there are none (no evaluation ran)."""
        if not self.best_state:
            return False
        missing = set(self.best_state) - set(model.state_dict())
        if missing:
            raise RuntimeError(f"best weights have keys the model lacks: {sorted(missing)[:5]}")
        model.load_state_dict(self.best_state, strict=False)
        return True


@dataclass
class FitOutcome:
    """Result of :func:`fit`.

    Attributes
    ----------
    module : nn.Module
        The trained module (best validation weights restored), on the training device.
    result : TrainResult
    stopper : EarlyStopping
    trainer : Trainer
    """

    module: nn.Module
    result: TrainResult
    stopper: EarlyStopping
    trainer: Trainer

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts about the run."""
        history, val = self.result.history, self.result.val_history
        return {
            "steps": len(history) and history[-1]["step"],
            "total_steps": self.result.total_steps,
            "steps_per_epoch": self.result.steps_per_epoch,
            "stopped_early": self.result.stopped_early,
            "best_step": self.stopper.best_step,
            "best_epoch": self.stopper.best_epoch,
            "monitor": self.stopper.monitor,
            "best_value": None if math.isnan(self.stopper.best) else self.stopper.best,
            "final_train_loss": history[-1]["loss"] if history else None,
            "final_val_loss": val[-1].get("val_loss") if val else None,
            "precision": self.result.precision,
            "world_size": self.result.world_size,
        }


def fit(module: nn.Module, train_set: Dataset, val_set: Dataset | None, *, loss: LossSpec,
        targets: Mapping[str, float], settings: TrainSettings, out_dir: str | Path, input_key: str = "clip",
        patience: int = 5, monitor: str = "val_loss", dist_info: DistInfo | None = None,
        fingerprint: Mapping[str, Any] | None = None, extra_state: Mapping[str, Any] | None = None) -> FitOutcome:
    """Train ``module`` with early stopping on subject-level validation metrics.

    Parameters
    ----------
    module : nn.Module
        ``module(batch[input_key]) -> (B, K)``: a :class:`FinetuneModel` on
        clips, or its head on cached embeddings. Frozen parameters
        (``requires_grad=False``) are not optimised.
    train_set, val_set : Dataset
        Items with ``input_key``, ``target``, ``subject``; disjoint participants.
        Without a validation set (or an empty one) training runs all steps.
    loss : LossSpec
        Built from the training participants only.
    targets : mapping of str to float
        Subject -> target of the validation participants (at least).
    settings : TrainSettings
    out_dir : path
        Checkpoints and CSV logs (``train_log.csv``, ``val_log.csv``).
    input_key : {'clip', 'embedding'}
    patience : int
        Epochs without improvement of ``monitor`` before stopping.
    monitor : str
        See :data:`MONITORS`.
    dist_info : DistInfo, optional
    fingerprint, extra_state : mapping, optional
        Passed to the engine (a resumed checkpoint must match the fingerprint).

    Returns
    -------
    FitOutcome
    """
    val = val_set if val_set is not None and len(val_set) else None  # type: ignore[arg-type]
    keys = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}
    stopper = EarlyStopping(monitor=monitor, patience=patience, keys=keys)
    trainer = Trainer(module, train_set, step_fn=make_step_fn(loss, input_key), settings=settings, out_dir=out_dir,
                      eval_fn=make_eval_fn(loss, targets, input_key) if val is not None else None, val_dataset=val,
                      dist_info=dist_info, fingerprint=fingerprint, extra_state=extra_state,
                      find_unused_parameters=any(not p.requires_grad for p in module.parameters()),
                      on_eval=stopper if val is not None else None)
    if settings.resume and trainer.checkpoint_path.is_file():
        state = load_checkpoint(trainer.checkpoint_path)
        stopper.load((state.get("extra") or {}).get("early_stopping"))
        if stopper.best_state is not None:
            trainer.extra_state["early_stopping"] = stopper.state_dict()
    result = trainer.fit()
    trained = unwrap(trainer.model)
    if stopper.restore(trained):
        LOGGER.info("restored the best weights (%s %.4f at step %d)", stopper.monitor, stopper.best,
                    stopper.best_step)
    return FitOutcome(module=trained, result=result, stopper=stopper, trainer=trainer)
