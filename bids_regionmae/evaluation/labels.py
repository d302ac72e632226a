"""Label handling shared by splits, metrics and the baseline.

Three task kinds exist: ``"binary"`` (two classes, one logit per subject),
``"multiclass"`` (C > 2 classes, C logits) and ``"regression"`` (one real
value). Class labels are encoded as integer indices ``0..C-1`` into a list of
class names; for binary tasks index 1 is the *positive* class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UsageError

TASK_KINDS = ("binary", "multiclass", "regression")

#: Numeric labels with more distinct values than this are treated as continuous.
MAX_NUMERIC_CLASSES = 20

__all__ = ["MAX_NUMERIC_CLASSES", "TASK_KINDS", "check_task_kind", "encode_labels", "infer_task_kind"]


def check_task_kind(task_kind: str) -> str:
    """Return ``task_kind`` if it is one of :data:`TASK_KINDS`, else raise :class:`UsageError`."""
    if task_kind not in TASK_KINDS:
        raise UsageError(f"task_kind must be one of {', '.join(TASK_KINDS)}; got {task_kind!r}.")
    return task_kind


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return isinstance(value, str) and value.strip().lower() in {"", "n/a", "na", "nan"}


def check_no_missing(subjects: Sequence[str], labels: Sequence[Any], what: str = "label") -> None:
    """Raise :class:`UsageError` naming the participants whose ``what`` is missing."""
    missing = [str(s) for s, v in zip(subjects, labels, strict=True) if _is_missing(v)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UsageError(
            f"{len(missing)} participant(s) have no {what} (n/a or empty): {shown}. "
            f"Drop them from participants.tsv or pass only participants with a {what}."
        )


def infer_task_kind(labels: Sequence[Any]) -> str:
    """Guess the task kind from label values.

    Parameters
    ----------
    labels : sequence
        One label per participant.

    Returns
    -------
    str
        ``"regression"`` for floats with non-integer values or numeric labels
        with more than :data:`MAX_NUMERIC_CLASSES` distinct values;
        otherwise ``"binary"`` (two distinct values) or ``"multiclass"``.

    Raises
    ------
    UsageError
        Fewer than two distinct labels.
    """
    values = np.asarray(list(labels), dtype=object)
    uniques = set(values.tolist())
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in uniques)
    if numeric and uniques:
        arr = np.asarray(sorted(uniques), dtype=float)
        if not np.all(np.isfinite(arr)):
            raise UsageError("labels contain NaN or infinite values; drop those participants first.")
        if np.any(arr != np.round(arr)) or len(arr) > MAX_NUMERIC_CLASSES:
            return "regression"
    if len(uniques) < 2:
        raise UsageError(
            f"labels have {len(uniques)} distinct value(s) ({sorted(map(str, uniques))}); "
            "a classifier needs at least two classes. Check the --target column."
        )
    return "binary" if len(uniques) == 2 else "multiclass"


def encode_labels(labels: Sequence[Any], class_names: Sequence[Any] | None = None,
                  task_kind: str | None = None) -> tuple[np.ndarray, list[str] | None, str]:
    """Encode labels as class indices (classification) or floats (regression).

    Parameters
    ----------
    labels : sequence
        One label per participant.
    class_names : sequence, optional
        Class order for classification; index 1 is the positive class of a
        binary task. Default: sorted distinct labels (so ``0/1`` and
        ``"ADHD"/"Control"`` sort naturally; pass the order you want).
    task_kind : str, optional
        One of :data:`TASK_KINDS`; inferred when omitted.

    Returns
    -------
    y : numpy.ndarray
        ``int64`` class indices, or ``float64`` values for regression.
    class_names : list of str or None
        Names in index order (None for regression).
    task_kind : str
        The (inferred) task kind.

    Raises
    ------
    UsageError
        A label is not in ``class_names``, or the number of classes does not
        fit ``task_kind``.
    """
    labels = list(labels)
    task_kind = check_task_kind(task_kind) if task_kind is not None else infer_task_kind(labels)
    if task_kind == "regression":
        try:
            y = np.asarray(labels, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"regression targets must be numbers: {exc}") from None
        if not np.all(np.isfinite(y)):
            raise UsageError("regression targets contain NaN or infinite values; drop those participants first.")
        return y, None, task_kind
    if class_names is None:
        uniques = set(labels)
        try:
            class_values = sorted(uniques)
        except TypeError:
            class_values = sorted(uniques, key=str)
    else:
        class_values = list(class_names)
    # Compare as strings so that 1 and "1" (TSV vs JSON) are the same class.
    index = {str(v): i for i, v in enumerate(class_values)}
    unknown = sorted({str(v) for v in labels} - set(index))
    if unknown:
        raise UsageError(f"labels {unknown} are not among class_names {list(map(str, class_values))}.")
    y = np.asarray([index[str(v)] for v in labels], dtype=np.int64)
    n_classes = len(class_values)
    if task_kind == "binary" and n_classes != 2:
        raise UsageError(f"task_kind='binary' needs exactly 2 classes; got {n_classes}: {class_values}.")
    if task_kind == "multiclass" and n_classes < 3:
        raise UsageError(f"task_kind='multiclass' needs 3 or more classes; got {n_classes}. Use 'binary'.")
    return y, [str(v) for v in class_values], task_kind
