"""Per-subject metrics, fold results and cross-fold summaries.

Conventions (as NeuroSTORM, on per-subject outputs):

- clip outputs are averaged per subject first (:func:`aggregate_by_subject`:
  mean of clip *logits*, not of probabilities);
- binary tasks have one logit per subject (positive class = index 1); a
  two-column logit array is reduced to ``logit_1 - logit_0`` (the same
  softmax probability). The predicted class is positive when the logit is
  ``>= 0`` (probability ``>= 0.5``); AUROC is computed on ``sigmoid(logit)``;
- multiclass tasks have ``C`` logits per subject; prediction is the argmax;
  AUROC is one-vs-rest macro on ``softmax(logits)``; F1, sensitivity
  (recall) and specificity are macro averages over classes;
- regression: MAE, RMSE, Pearson r and R^2 of predicted vs true values.

Degenerate inputs (a single class in a test fold, a constant target) give
NaN for the undefined metrics and a logged warning, never an exception.

A *fold result* is a :class:`FoldResult` made by :func:`make_fold_result`;
its JSON form (:meth:`FoldResult.to_dict`, read back with
:meth:`FoldResult.from_dict`) is::

    {"name": "fold-0", "task_kind": "binary", "class_names": ["Control", "ADHD"],
     "model": "regionmae-cerebellum", "subjects": [...], "y_true": [...],
     "outputs": [...], "metrics": {"acc": ..., "auroc": ..., ...},
     "split": Split.to_dict() | None, "sizes": {"train": .., "val": .., "test": ..},
     "extra": {...}}

``y_true`` holds class indices (or floats for regression) and ``outputs``
per-subject logits (a float, or a list of C floats) or predicted values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import UsageError
from .labels import check_task_kind
from .splits import Split, SplitError

logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """One fold's scored test participants: what every report and table of results reads.

    Attributes
    ----------
    name : str
        Fold (split) name.
    task_kind : {'binary', 'multiclass', 'regression'}
    subjects : list of str
        Test participants, one per output.
    y_true : list
        Class indices (or values for regression) per participant.
    outputs : list
        Per-participant logit (binary), list of C logits (multiclass) or prediction (regression).
    metrics : dict
        :func:`compute_metrics` output (JSON-ready; NaN where undefined).
    class_names : list of str or None
    model : str or None
        Model label in comparison tables.
    split : dict or None
        :meth:`Split.to_dict` of the split the fold was trained on.
    sizes : dict of str to int
        Participants per partition.
    extra : dict
        Anything else kept with the fold (training summary, chosen hyper-parameters...).
    """

    name: str
    task_kind: str
    subjects: list[str]
    y_true: list[Any]
    outputs: list[Any]
    metrics: dict[str, Any]
    class_names: list[str] | None = None
    model: str | None = None
    split: dict[str, Any] | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (keys in the documented order)."""
        return {"name": self.name, "task_kind": self.task_kind, "class_names": self.class_names,
                "model": self.model, "subjects": self.subjects, "y_true": self.y_true, "outputs": self.outputs,
                "metrics": self.metrics, "split": self.split, "sizes": self.sizes, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FoldResult:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["sizes"] = dict(values.get("sizes") or {})
        values["extra"] = dict(values.get("extra") or {})
        return cls(**values)

__all__ = [
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "FoldResult",
    "aggregate_by_subject",
    "binary_logits",
    "classification_metrics",
    "compute_metrics",
    "format_mean_sd",
    "log_softmax",
    "make_fold_result",
    "pooled_metrics",
    "regression_metrics",
    "sigmoid",
    "softmax",
    "subject_labels",
    "summarise_folds",
]

#: Scalar classification metrics, in table order.
CLASSIFICATION_METRICS = ("acc", "balanced_acc", "auroc", "f1", "sensitivity", "specificity", "precision")
#: Scalar regression metrics, in table order.
REGRESSION_METRICS = ("mae", "rmse", "pearson_r", "r2")


def _where(context: str) -> str:
    return f"{context}: " if context else ""


# --------------------------------------------------------------------------- aggregation


def aggregate_by_subject(subject_ids: Sequence[str], outputs: Any) -> tuple[list[str], np.ndarray]:
    """Average per-clip outputs (logits or predictions) per subject.

    Parameters
    ----------
    subject_ids : sequence of str
        Subject of each clip, length N.
    outputs : array-like, shape (N,) or (N, C)
        Clip logits (or regression outputs).

    Returns
    -------
    subjects : list of str
        Distinct subjects in order of first appearance.
    mean_outputs : numpy.ndarray, shape (S,) or (S, C)
        Mean output per subject (float64).
    """
    ids = np.asarray([str(s) for s in subject_ids], dtype=object)
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim not in (1, 2) or out.shape[0] != len(ids):
        raise UsageError(f"outputs must have shape (N,) or (N, C) with N={len(ids)} clips; got {out.shape}.")
    if len(ids) == 0:
        return [], out.copy()
    uniques, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    sums = np.zeros((len(uniques),) + out.shape[1:], dtype=np.float64)
    np.add.at(sums, inverse, out)
    counts = np.bincount(inverse, minlength=len(uniques)).astype(np.float64)
    means = sums / counts.reshape((-1,) + (1,) * (out.ndim - 1))
    order = np.argsort(first, kind="stable")
    return [str(s) for s in uniques[order]], means[order]


def subject_labels(subject_ids: Sequence[str], labels: Sequence[Any]) -> tuple[list[str], list[Any]]:
    """One label per subject (first-appearance order), checking clips agree.

    Raises
    ------
    UsageError
        Two clips of one subject carry different labels.
    """
    seen: dict[str, Any] = {}
    for sid, lab in zip((str(s) for s in subject_ids), labels, strict=True):
        if sid in seen and seen[sid] != lab:
            raise UsageError(f"subject {sid} has clips labelled {seen[sid]!r} and {lab!r}; "
                             "labels are per participant.")
        seen.setdefault(sid, lab)
    return list(seen), list(seen.values())


# --------------------------------------------------------------------------- metrics


def binary_logits(outputs: Any) -> np.ndarray:
    """One logit per subject from shape (N,), (N, 1) or (N, 2) outputs."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 2 and out.shape[1] == 1:
        return out[:, 0]
    if out.ndim == 2 and out.shape[1] == 2:
        return out[:, 1] - out[:, 0]
    if out.ndim != 1:
        raise UsageError(f"binary outputs must have shape (N,), (N, 1) or (N, 2); got {out.shape}.")
    return out


def sigmoid(x: Any) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float64: the probability of the positive class from one logit."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def softmax(z: Any, axis: int = -1) -> np.ndarray:
    """Class probabilities from logits along ``axis`` (max-shifted), float64."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: Any, axis: int = -1) -> np.ndarray:
    """Log class probabilities from logits along ``axis`` (max-shifted), float64."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(y_true: Any, outputs: Any, n_classes: int | None = None,
                           context: str = "") -> dict[str, Any]:
    """Classification metrics from per-subject logits.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        Class indices ``0..C-1`` (1 = positive for binary).
    outputs : array-like, shape (N,), (N, 1) or (N, C)
        Logits. One column (or a vector) means binary.
    n_classes : int, optional
        Number of classes; default 2 for one-logit outputs, else ``C``.
    context : str
        Prefix of logged warnings (e.g. the fold name).

    Returns
    -------
    dict
        ``n``, ``acc``, ``balanced_acc``, ``auroc``, ``f1``, ``sensitivity``,
        ``specificity``, ``precision`` (floats, NaN where undefined),
        ``confusion_matrix`` (list of lists, rows = true, columns =
        predicted), and for binary ``n_pos``, ``n_neg``, ``tp``, ``fp``,
        ``tn``, ``fn``; for multiclass ``n_per_class``.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(np.int64).ravel()
    out = np.asarray(outputs, dtype=np.float64)
    binary = out.ndim == 1 or (out.ndim == 2 and out.shape[1] <= 2 and (n_classes in (None, 2)))
    if len(y) != out.shape[0]:
        raise UsageError(f"{len(y)} labels but {out.shape[0]} outputs; they must pair up.")
    if len(y) == 0:
        raise UsageError(f"{_where(context)}no subjects to score.")
    if binary:
        logit = binary_logits(out)
        if np.any((y < 0) | (y > 1)):
            raise UsageError(f"binary labels must be 0 or 1; got {sorted(set(y.tolist()))}.")
        pred = (logit >= 0).astype(np.int64)
        cm = _confusion(y, pred, 2)
        tn, fp, fn, tp = (int(v) for v in cm.ravel())
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        if tp + fn and tn + fp:
            auroc = float(roc_auc_score(y, sigmoid(logit)))
        else:
            auroc = math.nan
            logger.warning("%sall %d test subjects are of class %d: AUROC, %s are undefined (NaN).",
                           _where(context), len(y), int(y[0]), "sensitivity" if not tp + fn else "specificity")
        return {
            "n": len(y), "n_pos": tp + fn, "n_neg": tn + fp,
            "acc": (tp + tn) / len(y),
            "balanced_acc": float(np.nanmean([sens, spec])),
            "auroc": auroc,
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "sensitivity": sens, "specificity": spec,
            "precision": _ratio(tp, tp + fp),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "confusion_matrix": cm.tolist(),
        }
    if out.ndim != 2:
        raise UsageError(f"multiclass outputs must have shape (N, C); got {out.shape}.")
    c = out.shape[1] if n_classes is None else int(n_classes)
    if out.shape[1] != c:
        raise UsageError(f"outputs have {out.shape[1]} columns but n_classes={c}.")
    if np.any((y < 0) | (y >= c)):
        raise UsageError(f"class indices must be in 0..{c - 1}; got {sorted(set(y.tolist()))}.")
    prob = softmax(out, axis=1)
    pred = out.argmax(axis=1)
    cm = _confusion(y, pred, c)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    negatives = len(y) - support
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        tn = negatives - (predicted - tp)
        spec = np.where(negatives > 0, tn / negatives, np.nan)
        prec = np.where(predicted > 0, tp / predicted, np.nan)
        f1_den = 2 * tp + (predicted - tp) + (support - tp)
        f1 = np.where(f1_den > 0, 2 * tp / f1_den, np.nan)
    if np.all(support > 0):
        auroc = float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(c))))
    else:
        auroc = math.nan
        logger.warning("%sclass(es) %s absent from the %d test subjects: one-vs-rest AUROC is undefined (NaN); "
                       "macro recall uses the classes present.", _where(context),
                       np.flatnonzero(support == 0).tolist(), len(y))

    def _mean(v: np.ndarray) -> float:
        return float(np.nanmean(v)) if np.any(np.isfinite(v)) else math.nan

    return {
        "n": len(y),
        "acc": float(tp.sum() / len(y)),
        "balanced_acc": _mean(recall),
        "auroc": auroc,
        "f1": _mean(f1),
        "sensitivity": _mean(recall),
        "specificity": _mean(spec),
        "precision": _mean(prec),
        "n_per_class": support.astype(int).tolist(),
        "confusion_matrix": cm.tolist(),
    }


def regression_metrics(y_true: Any, y_pred: Any, context: str = "") -> dict[str, Any]:
    """Regression metrics: MAE, RMSE, Pearson r, R^2.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (N,)
        True and predicted values per subject.
    context : str
        Prefix of logged warnings.

    Returns
    -------
    dict
        ``n``, ``mae``, ``rmse``, ``pearson_r`` and ``r2``; Pearson r is NaN
        when either side is constant (or N < 2), R^2 when ``y_true`` is.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.shape != y.shape:
        raise UsageError(f"regression outputs must have shape ({len(y)},); got {p.shape}.")
    if len(y) == 0:
        raise UsageError(f"{_where(context)}no subjects to score.")
    err = p - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    yc, pc = y - y.mean(), p - p.mean()
    den = math.sqrt(float(np.sum(yc**2)) * float(np.sum(pc**2)))
    if den > 0 and len(y) > 1:
        r = float(np.clip(np.sum(yc * pc) / den, -1.0, 1.0))
    else:
        r = math.nan
        logger.warning("%sPearson r is undefined (NaN): %s.", _where(context),
                       "fewer than 2 subjects" if len(y) < 2 else "true or predicted values are constant")
    if ss_tot > 0:
        r2 = 1.0 - float(np.sum(err**2)) / ss_tot
    else:
        r2 = math.nan
        logger.warning("%sR^2 is undefined (NaN): the true values are constant.", _where(context))
    return {"n": len(y), "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))),
            "pearson_r": r, "r2": r2}


def compute_metrics(task_kind: str, y_true: Any, outputs: Any, n_classes: int | None = None,
                    context: str = "") -> dict[str, Any]:
    """Metrics for ``task_kind`` (``"binary"``, ``"multiclass"`` or ``"regression"``)."""
    check_task_kind(task_kind)
    if task_kind == "regression":
        return regression_metrics(y_true, outputs, context=context)
    if task_kind == "binary":
        return classification_metrics(y_true, binary_logits(outputs), n_classes=2, context=context)
    return classification_metrics(y_true, outputs, n_classes=n_classes, context=context)


# --------------------------------------------------------------------------- fold results


def _json_number(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def make_fold_result(name: str, subjects: Sequence[str], y_true: Any, outputs: Any, task_kind: str, *,
                     class_names: Sequence[str] | None = None, split: Split | None = None,
                     model: str | None = None, extra: Mapping[str, Any] | None = None) -> FoldResult:
    """Score one fold's test subjects and package everything a report needs.

    Parameters
    ----------
    name : str
        Fold name (usually ``split.name``).
    subjects : sequence of str
        Test subjects, one per row of ``outputs`` (aggregate clips first).
    y_true : array-like
        Class indices (or floats for regression) per subject.
    outputs : array-like
        Per-subject logits (binary: (N,); multiclass: (N, C)) or predictions.
    task_kind : {"binary", "multiclass", "regression"}
        The task.
    class_names : sequence of str, optional
        Class names in index order.
    split : Split, optional
        The split the fold was trained on; every scored subject must be in
        its test set (else :class:`SplitError`: a validation or training
        subject was scored).
    model : str, optional
        Model label used in comparison tables.
    extra : mapping, optional
        Anything else to keep (chosen hyper-parameters, validation scores).

    Returns
    -------
    FoldResult
    """
    check_task_kind(task_kind)
    subjects = [str(s) for s in subjects]
    if len(set(subjects)) != len(subjects):
        raise UsageError(f"fold {name}: subjects repeat; aggregate clip outputs per subject first "
                         "(aggregate_by_subject).")
    if split is not None:
        outside = sorted(set(subjects) - set(split.test))
        if outside:
            raise SplitError(f"fold {name}: {len(outside)} scored subject(s) are not in the test set of split "
                             f"{split.name!r}: {outside[:5]}. Scoring training or validation subjects leaks.")
        unscored = sorted(set(split.test) - set(subjects))
        if unscored:
            logger.warning("fold %s: %d test subject(s) have no output and are not scored: %s",
                           name, len(unscored), unscored[:5])
    n_classes = len(class_names) if class_names is not None else None
    if task_kind == "binary":
        out = binary_logits(outputs)
    else:
        out = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(y_true)
    y = y.astype(np.float64) if task_kind == "regression" else y.astype(np.int64)
    if len(subjects) != len(y) or len(y) != out.shape[0]:
        raise UsageError(f"fold {name}: {len(subjects)} subjects, {len(y)} labels and {out.shape[0]} outputs; "
                         "they must pair up.")
    metrics = compute_metrics(task_kind, y, out, n_classes=n_classes, context=f"fold {name}")
    return FoldResult(name=str(name), task_kind=task_kind,
                      class_names=list(class_names) if class_names is not None else None, model=model,
                      subjects=subjects, y_true=[_json_number(v) for v in y.tolist()], outputs=out.tolist(),
                      metrics={k: _json_number(v) for k, v in metrics.items()},
                      split=split.to_dict() if split is not None else None,
                      sizes=split.sizes() if split is not None else {"test": len(subjects)}, extra=dict(extra or {}))


def pooled_metrics(fold_results: Sequence[FoldResult]) -> dict[str, Any] | None:
    """Metrics over the concatenated test predictions of all folds.

    Meaningful when each subject is tested once (k-fold, leave-one-group-out).
    Returns None when ``fold_results`` is empty or subjects repeat across folds.
    """
    if not fold_results:
        return None
    subjects = [s for r in fold_results for s in r.subjects]
    if len(set(subjects)) != len(subjects):
        return None
    task_kind = fold_results[0].task_kind
    class_names = fold_results[0].class_names
    y = np.concatenate([np.asarray(r.y_true) for r in fold_results])
    out = np.concatenate([np.asarray(r.outputs, dtype=np.float64) for r in fold_results])
    n_classes = len(class_names) if class_names else None
    metrics = compute_metrics(task_kind, y, out, n_classes=n_classes, context="pooled")
    return {k: _json_number(v) for k, v in metrics.items()}


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def summarise_folds(fold_metrics: Sequence[FoldResult | Mapping[str, Any]]
                    ) -> tuple[Any, dict[str, dict[str, float]]]:
    """Per-fold table and mean +/- sd of every scalar metric.

    Parameters
    ----------
    fold_metrics : sequence of FoldResult or dict
        Fold results, or plain metric dictionaries (named by their ``fold`` key).

    Returns
    -------
    rows : pandas.DataFrame
        One row per fold: ``fold`` then the scalar metrics (non-scalar
        entries such as the confusion matrix are left out).
    summary : dict
        ``{metric: {"mean": m, "sd": s, "n": k}}`` over folds where the
        metric is finite (NaN folds, e.g. an undefined AUROC, are skipped
        and ``n`` says how many remained); ``sd`` is the sample standard
        deviation (ddof=1), NaN with fewer than two finite folds.
    """
    import pandas as pd

    rows = []
    for i, entry in enumerate(fold_metrics):
        if isinstance(entry, FoldResult):
            metrics, name = entry.metrics, entry.name
        else:
            metrics, name = entry, entry.get("fold", f"fold-{i}")
        row: dict[str, Any] = {"fold": str(name)}
        row.update({k: float(v) if isinstance(v, (float, np.floating)) else v
                    for k, v in metrics.items() if _scalar(v)})
        rows.append(row)
    frame = pd.DataFrame(rows)
    summary: dict[str, dict[str, float]] = {}
    for col in frame.columns:
        if col == "fold":
            continue
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[col] = {
            "mean": float(finite.mean()) if len(finite) else math.nan,
            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
            "n": len(finite),
        }
    return frame, summary


def format_mean_sd(mean: float, sd: float, digits: int = 3, percent: bool = False) -> str:
    """Format ``mean ± sd`` (``"n/a"`` for NaN; sd left out when NaN)."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    scale = 100.0 if percent else 1.0
    suffix = "%" if percent else ""
    text = f"{mean * scale:.{digits}f}{suffix}"
    if sd is not None and np.isfinite(sd):
        text += f" ± {sd * scale:.{digits}f}{suffix}"
    return text
