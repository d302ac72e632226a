"""Participant-level train / validation / test splits that cannot leak.

Every split is made over *participants* (never clips or runs), so all clips
and runs of a participant land in the same partition. Each split has its own
validation set, distinct from its test set (NeuroSTORM's public split reuses
the test set for validation; model selection on it inflates test scores).

Three schemes are provided:

- :func:`holdout_split` -- one seeded, stratified train / val / test split;
  ``test_fraction`` and ``val_fraction`` are fractions of *all* participants.
- :func:`kfold_splits` -- stratified k-fold cross-validation: the test set of
  fold *i* is the *i*-th fold; the validation set is carved (stratified) from
  the remaining participants, ``val_fraction`` being a fraction of those.
  Optional ``groups`` (e.g. family) keep each group inside one fold and one
  partition.
- :func:`leave_one_group_out_splits` -- one split per group (e.g. site): the
  test set is every participant of that group; the validation set is carved
  from the other groups' participants.

Stratification uses class labels for classification and quantile bins of the
target for regression. All randomness comes from ``seed``; the result does
not depend on the order in which participants are given.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_json
from ..errors import InputMissingError, UsageError
from .labels import check_no_missing, encode_labels

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMES",
    "Split",
    "SplitError",
    "holdout_split",
    "kfold_splits",
    "leave_one_group_out_splits",
    "load_splits",
    "make_splits",
    "save_splits",
]

SCHEMES = ("holdout", "kfold", "loso")
_PARTS = ("train", "val", "test")


class SplitError(UsageError):
    """A split puts one participant in two partitions or is otherwise unusable (exit 64)."""


@dataclass(frozen=True)
class Split:
    """One train / validation / test partition of participants.

    Attributes
    ----------
    name : str
        Unique name used in tables and file names (``"holdout"``,
        ``"fold-0"``, ``"site-NYU"``).
    train, val, test : tuple of str
        Participant ids of each partition, sorted.
    fold : int
        Index of the split within its scheme (0 for hold-out).
    scheme : str
        ``"holdout"``, ``"kfold"`` or ``"loso"``.
    group : str or None
        The held-out group for leave-one-group-out splits.
    seed : int or None
        Seed the split was drawn with.
    """

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    fold: int = 0
    scheme: str = "holdout"
    group: str | None = None
    seed: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for part in _PARTS:
            object.__setattr__(self, part, tuple(str(s) for s in getattr(self, part)))

    @property
    def subjects(self) -> tuple[str, ...]:
        """All participants of the split (train, then val, then test)."""
        return self.train + self.val + self.test

    def sizes(self) -> dict[str, int]:
        """Number of participants per partition."""
        return {part: len(getattr(self, part)) for part in _PARTS}

    def assert_disjoint(self) -> None:
        """Check that no participant is in two partitions (or twice in one).

        Raises
        ------
        SplitError
            Naming the split, the partitions and the participants that overlap,
            or an empty train or test partition.
        """
        problems = []
        for part in _PARTS:
            dups = sorted(s for s, c in Counter(getattr(self, part)).items() if c > 1)
            if dups:
                problems.append(f"{part} lists {dups[:5]} more than once")
        for i, a in enumerate(_PARTS):
            for b in _PARTS[i + 1:]:
                both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
                if both:
                    more = f" and {len(both) - 5} more" if len(both) > 5 else ""
                    problems.append(f"{len(both)} participant(s) in both {a} and {b}: {both[:5]}{more}")
        for part in ("train", "test"):
            if not getattr(self, part):
                problems.append(f"{part} is empty")
        if problems:
            raise SplitError(f"split {self.name!r} leaks or is unusable: " + "; ".join(problems)
                             + ". Regenerate the splits instead of editing them by hand.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (lists instead of tuples)."""
        out: dict[str, Any] = {"name": self.name, "scheme": self.scheme, "fold": self.fold,
                               "group": self.group, "seed": self.seed}
        out.update({part: list(getattr(self, part)) for part in _PARTS})
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Split:
        """Rebuild a split from :meth:`to_dict` output and check it is disjoint.

        Raises
        ------
        SplitError
            Missing keys, or overlapping partitions.
        """
        missing = [k for k in ("name", *_PARTS) if k not in data]
        if missing:
            raise SplitError(f"split entry lacks {missing}; expected keys name, train, val, test "
                             f"(and optionally fold, scheme, group, seed). Got {sorted(data)}.")
        split = cls(name=str(data["name"]), train=tuple(data["train"]), val=tuple(data["val"]),
                    test=tuple(data["test"]), fold=int(data.get("fold", 0)),
                    scheme=str(data.get("scheme", "holdout")), group=data.get("group"),
                    seed=data.get("seed"), meta=dict(data.get("meta") or {}))
        split.assert_disjoint()
        return split


# --------------------------------------------------------------------------- helpers


def _prepare(subjects: Sequence[str], labels: Sequence[Any], task_kind: str | None,
             groups: Sequence[Any] | None = None):
    """Sort participants, check for duplicates / missing labels, encode labels."""
    subjects = [str(s) for s in subjects]
    labels = list(labels)
    if len(subjects) != len(labels):
        raise UsageError(f"got {len(subjects)} participants but {len(labels)} labels; they must pair up.")
    if groups is not None:
        groups = list(groups)
        if len(groups) != len(subjects):
            raise UsageError(f"got {len(subjects)} participants but {len(groups)} group values.")
        check_no_missing(subjects, groups, what="group value")
    dups = sorted(s for s, c in Counter(subjects).items() if c > 1)
    if dups:
        raise UsageError(f"participants listed more than once: {dups[:10]}. Splits are made per participant: "
                         "pass each participant once (aggregate clips and runs first).")
    check_no_missing(subjects, labels)
    order = np.argsort(np.asarray(subjects, dtype=object), kind="stable")
    subjects = [subjects[i] for i in order]
    labels = [labels[i] for i in order]
    y, class_names, task_kind = encode_labels(labels, task_kind=task_kind)
    g = None if groups is None else np.asarray([str(groups[i]) for i in order], dtype=object)
    return np.asarray(subjects, dtype=object), y, class_names, task_kind, g


def _quantile_bins(y: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin continuous values into ``n_bins`` equal-count bins by rank."""
    n_bins = max(1, min(int(n_bins), len(y)))
    ranks = np.empty(len(y), dtype=np.int64)
    ranks[np.argsort(y, kind="stable")] = np.arange(len(y))
    return (ranks * n_bins) // max(len(y), 1)


def _strata(y: np.ndarray, task_kind: str, n_bins: int) -> np.ndarray:
    return _quantile_bins(y, n_bins) if task_kind == "regression" else y.astype(np.int64)


def _allocate(counts: np.ndarray, fraction: float, rng: np.random.Generator, *,
              min_one: bool, keep: int) -> np.ndarray:
    """How many of each stratum to take so that the total is ``round(fraction * n)``.

    Largest-remainder allocation with random tie-breaks. With ``min_one`` each
    stratum that has more than ``keep`` members gives at least one; no stratum
    gives so many that fewer than ``keep`` remain (where it has that many).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if fraction <= 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    cap = np.maximum(counts - keep, 0)
    if min_one:
        take = np.where((counts > keep) & (take < 1), 1, take)
    take = np.minimum(take, cap)
    remaining = int(round(fraction * counts.sum())) - int(take.sum())
    order = np.lexsort((rng.random(len(counts)), -(quota - np.floor(quota))))
    while remaining > 0 and np.any(take < cap):
        for i in order:
            if remaining == 0:
                break
            if take[i] < cap[i]:
                take[i] += 1
                remaining -= 1
    return take


def _stratified_take(idx: np.ndarray, strata: np.ndarray, fraction: float, rng: np.random.Generator, *,
                     min_one: bool, keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``idx`` into (taken, rest), stratified on ``strata[idx]``."""
    idx = np.asarray(idx, dtype=np.int64)
    values = np.unique(strata[idx])
    members = [idx[strata[idx] == v] for v in values]
    take_n = _allocate(np.array([len(m) for m in members]), fraction, rng, min_one=min_one, keep=keep)
    taken = [rng.permutation(m)[:k] for m, k in zip(members, take_n, strict=True)]
    taken_idx = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(idx, taken_idx)
    return taken_idx, rest


def _stratified_take_groups(idx: np.ndarray, strata: np.ndarray, groups: np.ndarray, fraction: float,
                            rng: np.random.Generator, *, min_one: bool) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_stratified_take` but moves whole groups (stratum = group's majority stratum)."""
    idx = np.asarray(idx, dtype=np.int64)
    unit_names = np.unique(groups[idx])
    unit_strata = np.array([Counter(strata[idx[groups[idx] == u]].tolist()).most_common(1)[0][0]
                            for u in unit_names])
    units = np.arange(len(unit_names))
    # Groups are coarse units: forcing one per stratum would overshoot, so only guarantee one group in all
    # (``min_one`` is accepted for symmetry with _stratified_take).
    del min_one
    taken_units, _ = _stratified_take(units, unit_strata, fraction, rng, min_one=False)
    if len(taken_units) == 0 and len(units) > 1 and fraction > 0:
        taken_units = rng.choice(units, size=1)
    chosen = set(unit_names[taken_units].tolist())
    mask = np.array([g in chosen for g in groups[idx]], dtype=bool)
    return np.sort(idx[mask]), np.sort(idx[~mask])


def _check_fraction(value: float, name: str, *, allow_zero: bool) -> float:
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise UsageError(f"{name} must be in {interval}; got {value}.")
    return value


def _class_counts_message(y: np.ndarray, class_names: Sequence[str]) -> str:
    counts = np.bincount(y, minlength=len(class_names))
    return ", ".join(f"{name!r}: {c}" for name, c in zip(class_names, counts, strict=True))


def _warn_missing_classes(split: Split, y_of: Mapping[str, int], class_names: Sequence[str] | None) -> None:
    if class_names is None:
        return
    for part in ("val", "test"):
        members = getattr(split, part)
        if not members:
            continue
        present = {y_of[s] for s in members}
        absent = [class_names[c] for c in range(len(class_names)) if c not in present]
        if absent:
            logger.warning("split %s: %s set (%d participants) has no participant of class(es) %s; "
                           "AUROC%s on it is undefined.", split.name, part, len(members), absent,
                           " (and model selection)" if part == "val" else "")


def _make_split(subjects: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray, **kwargs) -> Split:
    split = Split(train=tuple(sorted(subjects[train])), val=tuple(sorted(subjects[val])),
                  test=tuple(sorted(subjects[test])), **kwargs)
    split.assert_disjoint()
    return split


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise UsageError(f"seed must be an integer in [0, 2**32); got {seed}.")
    return seed


# --------------------------------------------------------------------------- schemes


def holdout_split(subjects: Sequence[str], labels: Sequence[Any], test_fraction: float = 0.2,
                  val_fraction: float = 0.1, seed: int = 0, *, task_kind: str | None = None,
                  n_bins: int = 5) -> Split:
    """One stratified, seeded train / validation / test split by participant.

    Parameters
    ----------
    subjects : sequence of str
        Participant ids, each once.
    labels : sequence
        One label per participant (class or continuous target).
    test_fraction : float
        Fraction of all participants in the test set, in (0, 1).
    val_fraction : float
        Fraction of all participants in the validation set, in [0, 1);
        ``test_fraction + val_fraction`` must be below 1.
    seed : int
        Seed of the random draw.
    task_kind : {"binary", "multiclass", "regression"}, optional
        Inferred from ``labels`` when omitted.
    n_bins : int
        Quantile bins used to stratify a continuous target.

    Returns
    -------
    Split
        Named ``"holdout"``. Each class with at least three participants has
        at least one in each of train, val and test.

    Raises
    ------
    UsageError
        Bad fractions, or too few participants (overall or per class).
    """
    test_fraction = _check_fraction(test_fraction, "test_fraction", allow_zero=False)
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    seed = _check_seed(seed)
    if test_fraction + val_fraction >= 1:
        raise UsageError(f"test_fraction + val_fraction must be below 1 (leaving a training set); "
                         f"got {test_fraction} + {val_fraction}.")
    subj, y, class_names, task_kind, _ = _prepare(subjects, labels, task_kind)
    n = len(subj)
    n_parts = 3 if val_fraction > 0 else 2
    if n < n_parts:
        raise UsageError(f"a train/val/test split needs at least {n_parts} participants; got {n}.")
    classification = task_kind != "regression"
    if classification:
        counts = np.bincount(y, minlength=len(class_names))
        if counts.min() < n_parts:
            raise UsageError(
                f"too few participants per class for a stratified {'train/val/test' if n_parts == 3 else 'train/test'}"
                f" split ({_class_counts_message(y, class_names)}); each class needs at least {n_parts}. "
                "Add participants, merge rare classes, or set val_fraction=0 and select on training loss.")
    strata = _strata(y, task_kind, n_bins)
    rng = np.random.default_rng(seed)
    everyone = np.arange(n)
    test, rest = _stratified_take(everyone, strata, test_fraction, rng, min_one=classification,
                                  keep=2 if val_fraction > 0 else 1)
    val = np.zeros(0, dtype=np.int64)
    if val_fraction > 0:
        val, rest = _stratified_take(rest, strata, min(1.0, val_fraction * n / len(rest)), rng, min_one=classification)
    for part, members in (("test", test), ("train", rest)) + ((("val", val),) if val_fraction > 0 else ()):
        if len(members) == 0:
            raise UsageError(f"the {part} set would be empty with {n} participants, test_fraction={test_fraction}"
                             f" and val_fraction={val_fraction}; add participants or change the fractions.")
    split = _make_split(subj, rest, val, test, name="holdout", fold=0, scheme="holdout", seed=seed)
    _warn_missing_classes(split, dict(zip(subj, y, strict=True)), class_names)
    return split


def kfold_splits(subjects: Sequence[str], labels: Sequence[Any], k: int = 5, val_fraction: float = 0.1,
                 seed: int = 0, groups: Sequence[Any] | None = None, *, task_kind: str | None = None,
                 n_bins: int = 5) -> list[Split]:
    """Stratified k-fold cross-validation, each fold with its own validation set.

    Parameters
    ----------
    subjects : sequence of str
        Participant ids, each once.
    labels : sequence
        One label per participant.
    k : int
        Number of folds (>= 2). Every participant is in exactly one test set.
    val_fraction : float
        Fraction of each fold's non-test participants moved to its
        validation set (stratified), in [0, 1).
    seed : int
        Seed for fold assignment and validation draws.
    groups : sequence, optional
        One group value per participant (e.g. family id). A group never
        spans two folds or two partitions (scikit-learn
        ``StratifiedGroupKFold``; validation takes whole groups).
    task_kind : {"binary", "multiclass", "regression"}, optional
        Inferred from ``labels`` when omitted.
    n_bins : int
        Quantile bins used to stratify a continuous target (reduced so that
        every bin has at least ``k`` participants).

    Returns
    -------
    list of Split
        Named ``"fold-0"`` .. ``"fold-{k-1}"``.

    Raises
    ------
    UsageError
        ``k`` larger than the number of participants (or groups), or a
        class with fewer than ``k`` participants.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k = int(k)
    if k < 2:
        raise UsageError(f"k (number of folds) must be at least 2; got {k}. For one split use holdout_split.")
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    seed = _check_seed(seed)
    subj, y, class_names, task_kind, g = _prepare(subjects, labels, task_kind, groups)
    n = len(subj)
    if n < k:
        raise UsageError(f"k={k} folds need at least {k} participants; got {n}. Lower k.")
    classification = task_kind != "regression"
    if classification:
        counts = np.bincount(y, minlength=len(class_names))
        if counts.min() < k:
            raise UsageError(
                f"too few participants per class for k={k} stratified folds ({_class_counts_message(y, class_names)});"
                f" every class needs at least k participants so that each test fold contains it. "
                f"Use k <= {int(counts.min())} (if >= 2), a hold-out split, or add participants.")
    if g is not None and len(np.unique(g)) < k:
        raise UsageError(f"k={k} folds need at least {k} distinct groups; got {len(np.unique(g))}. Lower k.")
    strata = _strata(y, task_kind, min(n_bins, max(1, n // k)))
    if g is None:
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n), strata)
    else:
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n), strata, g)
    y_of = dict(zip(subj, y, strict=True))
    splits = []
    for fold, (rest, test) in enumerate(folds):
        rng = np.random.default_rng([seed, fold])
        if val_fraction > 0 and g is None:
            val, train = _stratified_take(rest, strata, val_fraction, rng, min_one=classification)
        elif val_fraction > 0:
            val, train = _stratified_take_groups(rest, strata, g, val_fraction, rng, min_one=classification)
        else:
            val, train = np.zeros(0, dtype=np.int64), rest
        if len(train) == 0 or (val_fraction > 0 and len(val) == 0):
            raise UsageError(f"fold {fold}: {len(rest)} non-test participants cannot give both a training and a "
                             f"validation set with val_fraction={val_fraction}; add participants or lower k.")
        split = _make_split(subj, train, val, test, name=f"fold-{fold}", fold=fold, scheme="kfold", seed=seed)
        _warn_missing_classes(split, y_of, class_names)
        splits.append(split)
    return splits


def leave_one_group_out_splits(subjects: Sequence[str], labels: Sequence[Any], groups: Sequence[Any],
                               val_fraction: float = 0.1, seed: int = 0, *, task_kind: str | None = None,
                               group_name: str = "group", n_bins: int = 5) -> list[Split]:
    """One split per group (e.g. site): test on that group, train and validate on the others.

    Parameters
    ----------
    subjects : sequence of str
        Participant ids, each once.
    labels : sequence
        One label per participant.
    groups : sequence
        One group value per participant (the ``--group-column``, e.g. site).
    val_fraction : float
        Fraction of the other groups' participants moved to validation
        (stratified on the label), in [0, 1).
    seed : int
        Seed of the validation draws.
    task_kind : {"binary", "multiclass", "regression"}, optional
        Inferred from ``labels`` when omitted.
    group_name : str
        Prefix of split names (``"site"`` gives ``"site-NYU"``).
    n_bins : int
        Quantile bins used to stratify a continuous target.

    Returns
    -------
    list of Split
        One per distinct group, in sorted group order, with ``group`` set.
        A test group with a single class gets a logged warning (its AUROC
        will be undefined).

    Raises
    ------
    UsageError
        Fewer than two groups, or a missing group value.
    """
    val_fraction = _check_fraction(val_fraction, "val_fraction", allow_zero=True)
    seed = _check_seed(seed)
    if groups is None:
        raise UsageError("leave-one-group-out needs a group per participant (e.g. --group-column site).")
    subj, y, class_names, task_kind, g = _prepare(subjects, labels, task_kind, groups)
    names = sorted(np.unique(g).tolist())
    if len(names) < 2:
        raise UsageError(f"leave-one-group-out needs at least 2 groups; column {group_name!r} has {len(names)} "
                         f"({names}). Use k-fold instead.")
    classification = task_kind != "regression"
    strata = _strata(y, task_kind, n_bins)
    y_of = dict(zip(subj, y, strict=True))
    splits = []
    for fold, name in enumerate(names):
        test = np.flatnonzero(g == name)
        rest = np.flatnonzero(g != name)
        rng = np.random.default_rng([seed, fold])
        if val_fraction > 0:
            val, train = _stratified_take(rest, strata, val_fraction, rng, min_one=classification)
        else:
            val, train = np.zeros(0, dtype=np.int64), rest
        if len(train) == 0 or (val_fraction > 0 and len(val) == 0):
            raise UsageError(f"{group_name} {name!r}: the other groups' {len(rest)} participants cannot give both a "
                             f"training and a validation set with val_fraction={val_fraction}.")
        safe = "".join(c if c.isalnum() else "" for c in str(name)) or str(fold)
        split = _make_split(subj, train, val, test, name=f"{group_name}-{safe}", fold=fold, scheme="loso",
                            group=str(name), seed=seed)
        _warn_missing_classes(split, y_of, class_names)
        splits.append(split)
    if len({s.name for s in splits}) != len(splits):
        raise UsageError(f"{group_name} values {names} collide once reduced to letters and digits; rename them.")
    return splits


def make_splits(scheme: str, subjects: Sequence[str], labels: Sequence[Any], *, k: int = 5,
                test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0,
                groups: Sequence[Any] | None = None, task_kind: str | None = None,
                group_name: str = "group") -> list[Split]:
    """Dispatch to a split scheme by name (for the CLI and config files).

    Parameters
    ----------
    scheme : {"holdout", "kfold", "loso"}
        Which scheme.
    subjects, labels : sequence
        Participants and their labels.
    k, test_fraction, val_fraction, seed, groups, task_kind, group_name
        Passed to the scheme (``groups`` is required for ``"loso"``).

    Returns
    -------
    list of Split
    """
    if scheme == "holdout":
        return [holdout_split(subjects, labels, test_fraction, val_fraction, seed, task_kind=task_kind)]
    if scheme == "kfold":
        return kfold_splits(subjects, labels, k, val_fraction, seed, groups, task_kind=task_kind)
    if scheme == "loso":
        return leave_one_group_out_splits(subjects, labels, groups, val_fraction, seed, task_kind=task_kind,
                                          group_name=group_name)
    raise UsageError(f"split scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}.")


def save_splits(path: str | Path, splits: Iterable[Split], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write splits (and optional metadata such as the label column) to JSON atomically."""
    splits = list(splits)
    for split in splits:
        split.assert_disjoint()
    return atomic_write_json(path, {**dict(metadata or {}), "splits": [s.to_dict() for s in splits]})


def load_splits(path: str | Path) -> list[Split]:
    """Read splits written by :func:`save_splits` (or a JSON list of split dicts).

    Raises
    ------
    InputMissingError
        The file does not exist.
    SplitError
        An entry is malformed or leaks.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"{path}: splits file not found.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SplitError(f"{path}: not valid JSON ({exc}).") from None
    entries = data["splits"] if isinstance(data, dict) and "splits" in data else data
    if not isinstance(entries, list):
        raise SplitError(f"{path}: expected a list of splits or an object with a 'splits' list.")
    splits = [Split.from_dict(e) for e in entries]
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise SplitError(f"{path}: split names repeat: {names}.")
    return splits
