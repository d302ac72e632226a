"""What is predicted and how it is scored: task kinds, class weighting, clip and subject losses.

Task kinds follow :mod:`bids_regionmae.evaluation.labels`: ``binary`` (one
logit per clip, index 1 of ``class_names`` is the positive class),
``multiclass`` (``C`` logits) and ``regression`` (one value; the model is
trained on the target standardised with the *training* participants' mean and
standard deviation, and its outputs are mapped back before scoring).

Class weighting (imbalance) is computed from the training participants only
(never validation or test): binary tasks use ``pos_weight = n_neg / n_pos``
in the logistic loss, multiclass tasks the "balanced" weights
``n / (C * n_c)`` in the cross-entropy. Counts are participants, not clips,
so a participant with more runs does not tilt the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from bids_regionmae.errors import UsageError

if TYPE_CHECKING:
    from bids_regionmae.bids.labels import Labels

__all__ = ["TASK_KINDS", "LossSpec", "Task", "class_balance", "task_from_labels"]

TASK_KINDS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class Task:
    """The prediction target.

    Attributes
    ----------
    kind : {'binary', 'multiclass', 'regression'}
    target : str
        Column of the participants table.
    class_names : tuple of str
        Class names in index order (empty for regression); for ``binary`` the
        second one is the positive class (logit > 0 means that class).
    """

    kind: str
    target: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise UsageError(f"task kind must be one of {', '.join(TASK_KINDS)}; got {self.kind!r}")
        if self.kind == "binary" and len(self.class_names) != 2:
            raise UsageError(f"a binary task needs 2 class names; got {list(self.class_names)}")
        if self.kind == "multiclass" and len(self.class_names) < 3:
            raise UsageError(f"a multiclass task needs 3 or more class names; got {list(self.class_names)}")

    @property
    def num_outputs(self) -> int:
        """Outputs of the head: 1 (binary, regression) or ``C`` (multiclass)."""
        return len(self.class_names) if self.kind == "multiclass" else 1

    @property
    def is_classification(self) -> bool:
        return self.kind != "regression"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "class_names": list(self.class_names)}


def task_from_labels(labels: Labels) -> tuple[Task, dict[str, float]]:
    """Task and encoded targets from :class:`bids_regionmae.bids.labels.Labels`.

    Returns
    -------
    task : Task
        ``continuous`` columns become ``regression``.
    targets : dict of str to float
        Participant -> class index (as float) or value.
    """
    kind = "regression" if labels.kind == "continuous" else labels.kind
    names = tuple(str(c) for c in labels.classes) if kind != "regression" else ()
    return Task(kind=kind, target=str(labels.target), class_names=names), dict(labels.encoded())


def class_balance(task: Task, targets: Sequence[float]) -> dict[str, Any]:
    """Loss weights from the *training* participants' targets.

    Parameters
    ----------
    task : Task
    targets : sequence of float
        One target per training participant (class indices or values).

    Returns
    -------
    dict
        ``counts`` (participants per class), and ``pos_weight`` (binary) or
        ``class_weights`` (multiclass); for regression ``mean`` and ``sd`` of
        the target (the standardisation).

    Raises
    ------
    UsageError
        A class has no training participant, or no training participant.
    """
    y = np.asarray(list(targets), dtype=np.float64)
    if y.size == 0:
        raise UsageError("no training participant: cannot fine-tune")
    if task.kind == "regression":
        sd = float(y.std())
        return {"mean": float(y.mean()), "sd": sd if sd > 0 else 1.0}
    n_classes = len(task.class_names)
    counts = np.bincount(y.astype(np.int64), minlength=n_classes)
    absent = [task.class_names[c] for c in range(n_classes) if counts[c] == 0]
    if absent:
        raise UsageError(f"the training participants have no member of class(es) {absent}; use stratified "
                         "splits or add participants")
    out: dict[str, Any] = {"counts": {task.class_names[c]: int(counts[c]) for c in range(n_classes)}}
    if task.kind == "binary":
        out["pos_weight"] = float(counts[0] / counts[1])
    else:
        out["class_weights"] = [float(len(y) / (n_classes * c)) for c in counts]
    return out


@dataclass(frozen=True)
class LossSpec:
    """Per-sample loss of a task, with the class weights / standardisation of one training set.

    Attributes
    ----------
    task : Task
    balance : dict
        From :func:`class_balance`.
    weighted : bool
        Use the class weights (False: plain loss, e.g. for a balanced cohort).
    """

    task: Task
    balance: Mapping[str, Any] = field(default_factory=dict)
    weighted: bool = True

    def standardise(self, values: torch.Tensor) -> torch.Tensor:
        """Regression targets in model units ``(y - mean) / sd``; classes unchanged."""
        if self.task.kind != "regression":
            return values
        return (values - float(self.balance.get("mean", 0.0))) / float(self.balance.get("sd", 1.0))

    def to_target_units(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs in the target's units (regression), logits unchanged.

        Parameters
        ----------
        outputs : ndarray, shape (N, K)

        Returns
        -------
        ndarray, shape (N,) for binary and regression, (N, C) for multiclass
        """
        outputs = np.asarray(outputs, dtype=np.float64)
        if self.task.kind == "multiclass":
            return outputs
        flat = outputs.reshape(len(outputs), -1)[:, 0]
        if self.task.kind == "regression":
            return flat * float(self.balance.get("sd", 1.0)) + float(self.balance.get("mean", 0.0))
        return flat

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of every sample.

        Parameters
        ----------
        outputs : Tensor, shape (B, K)
            Logits (``K = 1`` binary, ``C`` multiclass) or standardised predictions (``K = 1``).
        targets : Tensor, shape (B,)
            Class indices (as float or int) or target values in the target's units.

        Returns
        -------
        Tensor, shape (B,), float32
        """
        outputs = outputs.float()
        if self.task.kind == "binary":
            pos_weight = None
            if self.weighted and "pos_weight" in self.balance:
                pos_weight = torch.tensor(float(self.balance["pos_weight"]), device=outputs.device)
            return F.binary_cross_entropy_with_logits(outputs[:, 0], targets.float(), pos_weight=pos_weight,
                                                      reduction="none")
        if self.task.kind == "multiclass":
            weight = None
            if self.weighted and "class_weights" in self.balance:
                weight = torch.tensor(list(self.balance["class_weights"]), dtype=torch.float32,
                                      device=outputs.device)
            return F.cross_entropy(outputs, targets.long(), weight=weight, reduction="none")
        return (outputs[:, 0] - self.standardise(targets.float())) ** 2

    def mean(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of :meth:`per_sample`, shape ()."""
        return self.per_sample(outputs, targets).mean()

    def subject_loss(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        """Loss of per-subject mean outputs (NumPy in, float out; NaN when empty).

        Parameters
        ----------
        outputs : ndarray, shape (S, K)
            Mean clip outputs per subject, in model units.
        targets : ndarray, shape (S,)
        """
        if len(targets) == 0:
            return math.nan
        with torch.no_grad():
            loss = self.per_sample(torch.as_tensor(np.asarray(outputs, dtype=np.float32)),
                                   torch.as_tensor(np.asarray(targets, dtype=np.float32)))
        return float(loss.mean())
