"""Classical baseline: region-mean time series -> connectivity -> linear model.

The baseline sees the same model-ready arrays and the same participant
splits as the deep model:

1. :func:`region_timeseries` averages every AAL3 region per frame
   (a sparse averaging matrix applied to chunks of frames, so memory-mapped
   float16 arrays are read once, a few frames at a time);
2. :func:`connectivity_features` turns each subject's ``(T, R)`` series into
   the upper triangle of its Pearson correlation matrix, Fisher-z
   transformed (identical to nilearn's ``ConnectivityMeasure(kind=
   "correlation", cov_estimator=EmpiricalCovariance())`` followed by
   ``arctanh``); several runs of a subject are averaged in z;
3. :func:`evaluate_features` fits, per :class:`~.splits.Split`, mean
   imputation -> standardisation -> logistic regression (ridge for
   regression) on the training participants only, picks the regularisation
   strength on the validation participants, and scores the test
   participants. Results are fold-result dictionaries, so the baseline and the
   deep model share one table (:func:`~.report.write_evaluation`).

:func:`evaluate_baseline` chains 2 and 3.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputDataError, UsageError
from .labels import encode_labels
from .metrics import FoldResult, compute_metrics, log_softmax, make_fold_result
from .splits import Split

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_CS",
    "SELECTION_METRICS",
    "connectivity_features",
    "evaluate_baseline",
    "evaluate_features",
    "region_timeseries",
]

#: Inverse regularisation strengths tried for logistic regression (standardised features).
DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: Ridge penalties tried for regression.
DEFAULT_ALPHAS = (1e5, 1e4, 1e3, 1e2, 10.0, 1.0, 0.1)


# --------------------------------------------------------------------------- region time series


def region_timeseries(data: Any, voxel_labels: Any, labels: Sequence[int] | None = None, *,
                      chunk_frames: int = 16) -> np.ndarray:
    """Mean signal of each region in every frame.

    Parameters
    ----------
    data : array-like, shape (T, X, Y, Z)
        Frames (numpy array, ``np.memmap`` of float16, CPU tensor, ...).
        Only ``chunk_frames`` frames are converted to float at a time.
    voxel_labels : array-like of int, shape (X, Y, Z)
        Region label of every voxel (0 = background), on the grid of ``data``.
    labels : sequence of int, optional
        Region labels to extract, in column order (e.g. AAL3 ``1..170``).
        Default: the sorted non-zero labels present in ``voxel_labels``.
    chunk_frames : int
        Frames per chunk.

    Returns
    -------
    numpy.ndarray, shape (T, R), float64
        Mean over each region's voxels; a region without voxels on this grid
        gives a NaN column (logged), so columns keep their meaning across
        subjects.

    Raises
    ------
    InputDataError
        ``data`` is not 4D or its spatial shape differs from ``voxel_labels``.
    """
    import scipy.sparse as sp

    vl = np.asarray(voxel_labels)
    shape = tuple(getattr(data, "shape", ()))
    if len(shape) != 4:
        raise InputDataError(f"data must be 4D (T, X, Y, Z); got shape {shape}.")
    if shape[1:] != vl.shape:
        raise InputDataError(f"data frames have shape {shape[1:]} but voxel_labels has shape {vl.shape}; "
                             "resample the atlas to the model grid first.")
    if not np.issubdtype(vl.dtype, np.integer):
        if not np.all(np.isfinite(vl)) or np.any(vl != np.round(vl)):
            raise InputDataError("voxel_labels must hold integer region labels.")
        vl = vl.astype(np.int64)
    flat = vl.reshape(-1).astype(np.int64, copy=False)
    if labels is None:
        labels = [int(v) for v in np.unique(flat) if v != 0]
    labels = np.asarray([int(v) for v in labels], dtype=np.int64)
    if len(set(labels.tolist())) != len(labels):
        raise UsageError("labels repeat; give each region label once.")
    n_regions = len(labels)
    n_frames = shape[0]
    column = np.full(int(max(flat.max(initial=0), labels.max(initial=0))) + 1, -1, dtype=np.int64)
    valid = labels >= 0
    column[labels[valid]] = np.flatnonzero(valid)
    voxel_col = np.where(flat >= 0, column[np.clip(flat, 0, None)], -1)
    voxels = np.flatnonzero(voxel_col >= 0)
    cols = voxel_col[voxels]
    counts = np.bincount(cols, minlength=n_regions)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        logger.warning("%d of %d region(s) have no voxel on this grid (NaN columns): labels %s",
                       len(empty), n_regions, labels[empty].tolist()[:20])
    weights = 1.0 / counts[cols].astype(np.float64)
    avg = sp.csr_matrix((weights, (cols, voxels)), shape=(n_regions, flat.size))
    out = np.empty((n_frames, n_regions), dtype=np.float64)
    step = max(1, int(chunk_frames))
    for t0 in range(0, n_frames, step):
        t1 = min(n_frames, t0 + step)
        block = np.asarray(data[t0:t1], dtype=np.float32).reshape(t1 - t0, -1)
        out[t0:t1] = (avg @ block.T.astype(np.float64)).T
    out[:, empty] = np.nan
    return out


# --------------------------------------------------------------------------- connectivity


def _fisher_z_correlation(ts: np.ndarray, fisher_z: bool) -> np.ndarray:
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim != 2:
        raise InputDataError(f"region time series must be 2D (T, R); got shape {ts.shape}.")
    if ts.shape[0] < 3:
        raise InputDataError(f"region time series has {ts.shape[0]} frames; a correlation needs at least 3.")
    centred = ts - ts.mean(axis=0)
    sd = np.sqrt(np.mean(centred**2, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = centred / np.where(sd > 1e-12 * (1.0 + np.abs(ts).max(axis=0, initial=0.0)), sd, np.nan)
    corr = (np.nan_to_num(z).T @ np.nan_to_num(z)) / ts.shape[0]
    bad = ~np.isfinite(z).all(axis=0)
    corr[bad, :] = np.nan
    corr[:, bad] = np.nan
    corr = np.clip(corr, -1.0, 1.0)
    iu = np.triu_indices(ts.shape[1], k=1)
    vec = corr[iu]
    if fisher_z:
        vec = np.arctanh(np.clip(vec, -1 + 1e-7, 1 - 1e-7))
    return vec


def connectivity_features(timeseries: Sequence[Any], fisher_z: bool = True) -> np.ndarray:
    """Vectorised correlation connectivity per subject.

    Parameters
    ----------
    timeseries : sequence
        One entry per subject: an array ``(T_i, R)``, or a list of such
        arrays (runs), whose connectivity is averaged (in Fisher z).
        All subjects must have the same ``R``.
    fisher_z : bool
        Apply ``arctanh`` to the correlations.

    Returns
    -------
    numpy.ndarray, shape (S, R * (R - 1) / 2)
        Upper triangle (row-major, diagonal excluded). Pairs involving a
        constant or NaN region are NaN (imputed later from training data).
    """
    feats = []
    n_regions = None
    for i, entry in enumerate(timeseries):
        runs = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not runs:
            raise InputDataError(f"subject #{i}: no time series.")
        vecs = []
        for ts in runs:
            ts = np.asarray(ts)
            if n_regions is None:
                n_regions = ts.shape[-1]
            if ts.ndim != 2 or ts.shape[1] != n_regions:
                raise InputDataError(f"subject #{i}: time series of shape {ts.shape}; expected (T, {n_regions}) "
                                     "like the first subject (same atlas and label list for everyone).")
            vecs.append(_fisher_z_correlation(ts, fisher_z))
        stacked = np.vstack(vecs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pairs stay NaN
            feats.append(np.nanmean(stacked, axis=0) if len(vecs) > 1 else stacked[0])
    if not feats:
        raise UsageError("connectivity_features needs at least one subject.")
    return np.vstack(feats)


# --------------------------------------------------------------------------- fitting


def _pipeline(task_kind: str, strength: float, seed: int, class_weight: str | None) -> Any:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task_kind == "regression":
        model = Ridge(alpha=strength)
    else:
        model = LogisticRegression(C=strength, max_iter=5000, random_state=seed, class_weight=class_weight)
    return make_pipeline(SimpleImputer(strategy="mean"), StandardScaler(), model)


def _outputs(model: Any, x: np.ndarray, task_kind: str) -> np.ndarray:
    if task_kind == "regression":
        return np.asarray(model.predict(x), dtype=np.float64)
    return np.asarray(model.decision_function(x), dtype=np.float64)


def _fit(task_kind: str, strength: float, x: np.ndarray, y: np.ndarray, seed: int,
         class_weight: str | None) -> tuple[Any, int]:
    from sklearn.exceptions import ConvergenceWarning

    model = _pipeline(task_kind, strength, seed, class_weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


SELECTION_METRICS = ("log_loss", "auroc", "balanced_acc")


def _score(task_kind: str, y: np.ndarray, out: np.ndarray, n_classes: int | None, selection: str) -> float:
    """Validation score (higher is better) of the chosen selection metric.

    Regression always uses the negative MAE. ``log_loss`` (the default) is
    proper: unlike AUROC it also rewards a usable threshold at logit 0, so a
    heavily penalised model that ranks well but predicts one class is not
    chosen. AUROC falls back to balanced accuracy when the validation set lacks
    a class.
    """
    if task_kind == "regression":
        return -float(np.mean(np.abs(out - y)))
    if out.ndim == 1:
        logits = np.stack([np.zeros_like(out), out], axis=1)
    else:
        logits = out
    if selection == "log_loss":
        log_prob = log_softmax(logits, axis=1)
        return float(np.mean(log_prob[np.arange(len(y)), y]))
    if selection == "auroc" and len(np.unique(y)) == (n_classes or 2):
        return float(compute_metrics(task_kind, y, out, n_classes=n_classes)["auroc"])
    pred = logits.argmax(axis=1)  # ties (logit exactly 0) -> class 0 here; irrelevant for selection
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _select(task_kind: str, grid: Sequence[float], x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray,
            y_val: np.ndarray, seed: int, class_weight: str | None, n_classes: int | None,
            split_name: str, selection: str) -> tuple[float, dict[float, float]]:
    """Choose the regularisation strength on the validation set (inner CV on train if there is none)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    scores: dict[float, float] = {}
    if len(y_val):
        for strength in grid:
            model, _ = _fit(task_kind, strength, x_tr, y_tr, seed, class_weight)
            scores[strength] = _score(task_kind, y_val, _outputs(model, x_val, task_kind), n_classes, selection)
    else:
        logger.info("split %s has no validation set: choosing the penalty by 3-fold CV on training data.",
                    split_name)
        if task_kind == "regression":
            folds = list(KFold(3, shuffle=True, random_state=seed).split(x_tr))
        else:
            n_splits = max(2, min(3, int(np.bincount(y_tr).min())))
            folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x_tr, y_tr))
        for strength in grid:
            fold_scores = []
            for tr, va in folds:
                model, _ = _fit(task_kind, strength, x_tr[tr], y_tr[tr], seed, class_weight)
                fold_scores.append(_score(task_kind, y_tr[va], _outputs(model, x_tr[va], task_kind), n_classes,
                                          selection))
            scores[strength] = float(np.nanmean(fold_scores)) if np.any(np.isfinite(fold_scores)) else math.nan
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        best = grid[len(grid) // 2]
        logger.warning("split %s: validation scores undefined for every penalty; using %g.", split_name, best)
        return best, scores
    best = max(finite, key=lambda k: (finite[k], -list(grid).index(k)))  # ties -> strongest penalty
    return best, scores


def evaluate_features(subjects: Sequence[str], features: Any, labels: Sequence[Any], splits: Sequence[Split], *,
                      task_kind: str | None = None, class_names: Sequence[Any] | None = None,
                      grid: Sequence[float] | None = None, seed: int = 0, class_weight: str | None = None,
                      selection: str = "log_loss", model_name: str | None = None) -> list[FoldResult]:
    """Fit and score a linear model on fixed features, one fold result per split.

    Parameters
    ----------
    subjects : sequence of str
        Participant of each feature row.
    features : array-like, shape (S, F)
        One row per participant (NaN allowed: mean-imputed from training rows).
    labels : sequence
        One label per participant.
    splits : sequence of Split
        The splits used for the deep model.
    task_kind : {"binary", "multiclass", "regression"}, optional
        Inferred from ``labels`` when omitted.
    class_names : sequence, optional
        Class order (index 1 = positive class of a binary task).
    grid : sequence of float, optional
        Values of ``C`` (logistic regression, in order of increasing
        ``C``) or ``alpha`` (ridge, decreasing) to try; default
        :data:`DEFAULT_CS` / :data:`DEFAULT_ALPHAS`. Ties go to the
        strongest penalty.
    seed : int
        Seed of the solver and of the inner CV (used only without a val set).
    class_weight : {None, "balanced"}
        Passed to logistic regression.
    selection : {"log_loss", "auroc", "balanced_acc"}
        Validation metric that picks ``C`` (regression: always MAE). The
        default, log-loss, is a proper score: AUROC alone ignores the
        threshold and tends to pick a heavily penalised model whose logits
        all fall on one side of 0.
    model_name : str, optional
        Label in fold results (default ``"connectivity-logreg"`` /
        ``"connectivity-ridge"``).

    Returns
    -------
    list of dict
        Fold results (:func:`~.metrics.make_fold_result`) whose ``extra``
        holds ``penalty`` (C or alpha), ``penalty_name``,
        ``selection_metric``, ``val_score``, ``val_scores`` and
        ``n_features``. Logistic-regression outputs are decision-function
        logits, so ACC at logit 0 and AUROC on sigmoid match the deep model.

    Raises
    ------
    UsageError
        A split names a participant without features, or a training set
        lacks a class.
    """
    subjects = [str(s) for s in subjects]
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(subjects):
        raise UsageError(f"features must have shape ({len(subjects)}, F); got {x.shape}.")
    if len(set(subjects)) != len(subjects):
        raise UsageError("subjects repeat; give one feature row per participant.")
    y_all, class_names, task_kind = encode_labels(labels, class_names=class_names, task_kind=task_kind)
    n_classes = len(class_names) if class_names else None
    if grid is None:
        grid = DEFAULT_ALPHAS if task_kind == "regression" else DEFAULT_CS
    grid = [float(g) for g in grid]
    if not grid or any(g <= 0 for g in grid):
        raise UsageError(f"penalty grid must hold positive numbers; got {grid}.")
    if selection not in SELECTION_METRICS:
        raise UsageError(f"selection must be one of {', '.join(SELECTION_METRICS)}; got {selection!r}.")
    metric = "neg_mae" if task_kind == "regression" else selection
    model_name = model_name or ("connectivity-ridge" if task_kind == "regression" else "connectivity-logreg")
    row = {s: i for i, s in enumerate(subjects)}
    results = []
    for split in splits:
        split.assert_disjoint()
        missing = sorted(set(split.subjects) - set(row))
        if missing:
            raise UsageError(f"split {split.name}: {len(missing)} participant(s) have no features: {missing[:10]}. "
                             "Extract their time series or regenerate the splits without them.")
        tr = np.array([row[s] for s in split.train], dtype=np.int64)
        va = np.array([row[s] for s in split.val], dtype=np.int64)
        te = np.array([row[s] for s in split.test], dtype=np.int64)
        if task_kind != "regression":
            absent = sorted(set(range(n_classes)) - set(y_all[tr].tolist()))
            if absent:
                raise UsageError(f"split {split.name}: training set has no participant of class(es) "
                                 f"{[class_names[c] for c in absent]}; use stratified splits.")
        best, scores = _select(task_kind, grid, x[tr], y_all[tr], x[va], y_all[va], seed, class_weight,
                               n_classes, split.name, selection)
        model, n_warn = _fit(task_kind, best, x[tr], y_all[tr], seed, class_weight)
        if n_warn:
            logger.warning("split %s: solver did not fully converge (penalty %g).", split.name, best)
        out = _outputs(model, x[te], task_kind)
        penalty_name = "alpha" if task_kind == "regression" else "C"
        extra = {"penalty": best, "penalty_name": penalty_name, "selection_metric": metric,
                 "val_score": scores.get(best), "val_scores": {f"{k:g}": v for k, v in scores.items()},
                 "n_features": int(x.shape[1])}
        results.append(make_fold_result(split.name, list(split.test), y_all[te], out, task_kind,
                                        class_names=class_names, split=split, model=model_name, extra=extra))
    return results


def evaluate_baseline(subjects: Sequence[str], timeseries: Sequence[Any], labels: Sequence[Any],
                      splits: Sequence[Split], *, task_kind: str | None = None,
                      class_names: Sequence[Any] | None = None, grid: Sequence[float] | None = None,
                      seed: int = 0, fisher_z: bool = True, class_weight: str | None = None,
                      selection: str = "log_loss", model_name: str | None = None) -> list[FoldResult]:
    """Connectivity baseline evaluated on the given splits.

    Parameters
    ----------
    subjects : sequence of str
        Participants, one per entry of ``timeseries``.
    timeseries : sequence
        Per participant an array ``(T_i, R)`` of region-mean signals (see
        :func:`region_timeseries`) or a list of such arrays, one per run.
    labels : sequence
        One label per participant.
    splits : sequence of Split
        Exactly the splits of the deep model.
    task_kind, class_names, grid, seed, class_weight, selection, model_name
        See :func:`evaluate_features`.
    fisher_z : bool
        Fisher-z transform the correlations.

    Returns
    -------
    list of dict
        Fold results, as :func:`evaluate_features`.
    """
    if len(subjects) != len(timeseries):
        raise UsageError(f"got {len(subjects)} participants but {len(timeseries)} time-series entries.")
    feats = connectivity_features(timeseries, fisher_z=fisher_z)
    return evaluate_features(subjects, feats, labels, splits, task_kind=task_kind, class_names=class_names,
                             grid=grid, seed=seed, class_weight=class_weight, selection=selection,
                             model_name=model_name)

