"""Evaluation room: leak-free participant splits, metrics and a classical baseline.

Everything here is numpy / scikit-learn; no torch. The files and pages of
evaluation results are written by :mod:`bids_regionmae.reports.evaluation`.

- :mod:`.splits` -- hold-out, k-fold and leave-one-group-out splits *by
  participant*, each with its own train / val / test (val never equals test).
- :mod:`.metrics` -- classification and regression metrics on per-subject
  outputs (clip logits averaged per subject), fold results and summaries.
- :mod:`.baseline` -- AAL3 region-mean time series -> Fisher-z correlation
  connectivity -> logistic / ridge regression, scored on the same splits.

Submodules are imported lazily so that ``import bids_regionmae.evaluation``
stays cheap (scikit-learn loads only when used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Split": "splits",
    "holdout_split": "splits",
    "kfold_splits": "splits",
    "leave_one_group_out_splits": "splits",
    "make_splits": "splits",
    "save_splits": "splits",
    "load_splits": "splits",
    "infer_task_kind": "labels",
    "encode_labels": "labels",
    "aggregate_by_subject": "metrics",
    "compute_metrics": "metrics",
    "classification_metrics": "metrics",
    "regression_metrics": "metrics",
    "make_fold_result": "metrics",
    "summarise_folds": "metrics",
    "region_timeseries": "baseline",
    "connectivity_features": "baseline",
    "evaluate_baseline": "baseline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
