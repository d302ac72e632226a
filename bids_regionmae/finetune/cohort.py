"""The labelled cohort of a fine-tuning run, its leak-free splits and the connectivity baseline on them.

- :func:`build_cohort`: the participants that have both model-ready clips and
  a target value, with the task and encoded targets;
- :func:`cv_splits`: stratified, seeded k-fold cross-validation, or
  leave-one-group-out (e.g. site), each split with its own validation
  participants distinct from its test participants;
- :func:`final_split`: train/validation split of every participant for the
  deliverable model;
- :func:`baseline_results`: AAL3 region-mean time series -> Fisher-z
  connectivity -> logistic or ridge regression, on exactly the same splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.errors import UsageError
from bids_regionmae.evaluation.metrics import FoldResult
from bids_regionmae.finetune.task import Task, task_from_labels

if TYPE_CHECKING:
    from bids_regionmae.bids.labels import Labels
    from bids_regionmae.evaluation.splits import Split
    from bids_regionmae.preprocess.store import ModelReadyRun

LOGGER = logging.getLogger(__name__)

__all__ = ["STREAM_FINAL", "Cohort", "baseline_results", "build_cohort", "cv_splits", "final_split"]

#: seed stream of the final refit's train/validation split
STREAM_FINAL = 31


@dataclass
class Cohort:
    """Labelled participants with model-ready clips.

    Attributes
    ----------
    runs : list of ModelReadyRun
        Runs of the participants in :attr:`subjects`.
    subjects : list of str
        Sorted participants that have a label and at least one clip.
    task : Task
    targets : dict of str to float
        Participant -> class index or value.
    values : dict of str to object
        Participant -> the label as written in the table.
    groups : dict of str to str or None
        Participant -> ``--group-column`` value.
    excluded : dict of str to str
        Participant with model-ready data -> why it is not used.
    source : Path or None
        The table the labels came from.
    """

    runs: list[ModelReadyRun]
    subjects: list[str]
    task: Task
    targets: dict[str, float]
    values: dict[str, Any]
    groups: dict[str, str] | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    def labels(self) -> list[Any]:
        """Label per participant of :attr:`subjects` for split stratification (class index or value)."""
        if self.task.kind == "regression":
            return [self.targets[s] for s in self.subjects]
        return [int(self.targets[s]) for s in self.subjects]

    def class_labels(self) -> list[Any]:
        """Class name (classification) or value (regression) per participant of :attr:`subjects`."""
        if self.task.kind == "regression":
            return [self.targets[s] for s in self.subjects]
        return [self.task.class_names[int(self.targets[s])] for s in self.subjects]

    def digest(self) -> str:
        """SHA-256 of the participants, their targets and groups (part of the run fingerprint)."""
        text = json.dumps([[s, self.targets[s], (self.groups or {}).get(s)] for s in self.subjects])
        return hashlib.sha256(text.encode()).hexdigest()


def build_cohort(runs: Sequence[ModelReadyRun], labels: Labels, clip_length: int) -> Cohort:
    """The participants of ``runs`` with at least one clip of ``clip_length`` frames and a label.

    Raises
    ------
    UsageError
        Fewer than two participants remain, or a class has no participant with model-ready data.
    """
    from bids_regionmae.train.data import run_clips

    target = labels.target
    with_clips = sorted({r.subject for r in runs if run_clips(r, clip_length)})
    no_clips = sorted({r.subject for r in runs} - set(with_clips))
    excluded = dict(labels.excluded)
    for s in no_clips:
        excluded.setdefault(s, f"runs shorter than the model's {clip_length}-frame clips")
    subjects = sorted(s for s in labels.values if s in set(with_clips))
    LOGGER.info("%s", labels.summary())
    for s, why in sorted(excluded.items()):
        LOGGER.warning("sub-%s not used for fine-tuning: %s", s, why)
    if len(subjects) < 2:
        raise UsageError(f"only {len(subjects)} participant(s) have both model-ready clips and a {target!r} "
                         "value; fine-tuning needs more")
    values = {s: labels.values[s] for s in subjects}
    kept = type(labels)(values=values, kind=labels.kind, classes=labels.classes, groups=labels.groups,
                        excluded=excluded, source=labels.source, target=labels.target)
    task, targets = task_from_labels(kept)
    present = {int(targets[s]) for s in subjects} if task.is_classification else set()
    if task.is_classification and len(present) < len(task.class_names):
        missing = [task.class_names[c] for c in range(len(task.class_names)) if c not in present]
        raise UsageError(f"target {target!r}: no participant with model-ready data is of class(es) {missing}")
    groups = {s: labels.groups[s] for s in subjects} if labels.groups is not None else None
    return Cohort(runs=[r for r in runs if r.subject in set(subjects)], subjects=subjects, task=task,
                  targets=targets, values=values, groups=groups, excluded=excluded, source=labels.source)


def cv_splits(cohort: Cohort, *, folds: int, val_fraction: float, seed: int,
              group_column: str | None = None) -> list[Split]:
    """Leak-free evaluation splits: leave-one-group-out with ``group_column``, else stratified k-fold.

    Every split has train, validation and test participants, pairwise
    disjoint; the validation share is ``val_fraction`` of the non-test
    participants.
    """
    from bids_regionmae.evaluation.splits import kfold_splits, leave_one_group_out_splits
    from bids_regionmae.outputs.naming import safe_name

    kind = cohort.task.kind
    if group_column:
        if cohort.groups is None:
            raise UsageError(f"--group-column {group_column}: the cohort has no group values")
        groups = [cohort.groups[s] for s in cohort.subjects]
        splits = leave_one_group_out_splits(cohort.subjects, cohort.labels(), groups, val_fraction=val_fraction,
                                            seed=seed, task_kind=kind, group_name=safe_name(group_column))
    else:
        splits = kfold_splits(cohort.subjects, cohort.labels(), k=folds, val_fraction=val_fraction, seed=seed,
                              task_kind=kind)
    for split in splits:
        split.assert_disjoint()
    return splits


def final_split(cohort: Cohort, *, val_fraction: float, seed: int) -> Split:
    """Train/validation split of every labelled participant for the deliverable model (no test set)."""
    from bids_regionmae.evaluation.splits import Split, holdout_split
    from bids_regionmae.train.engine import derive_seed

    if val_fraction <= 0:
        return Split(name="final", train=tuple(cohort.subjects), val=(), test=(), scheme="final", seed=seed)
    split_seed = derive_seed(seed, STREAM_FINAL) % 2**32
    try:
        held = holdout_split(cohort.subjects, cohort.labels(), test_fraction=val_fraction, val_fraction=0.0,
                             seed=split_seed, task_kind=cohort.task.kind)
    except UsageError as exc:
        LOGGER.warning("no validation set for the final model (%s): training for all steps", exc)
        return Split(name="final", train=tuple(cohort.subjects), val=(), test=(), scheme="final", seed=split_seed)
    return Split(name="final", train=held.train, val=held.test, test=(), scheme="final", seed=split_seed)


def baseline_results(cohort: Cohort, splits: Sequence[Split], *, voxel_labels: np.ndarray,
                     label_names: Mapping[int, str], seed: int,
                     cache: str | Path | None = None) -> list[FoldResult]:
    """The connectivity baseline's fold results on ``splits`` (AAL3 region means of the model-ready arrays).

    Parameters
    ----------
    cohort : Cohort
    splits : sequence of Split
    voxel_labels : ndarray, shape (96, 96, 96)
        The atlas on the store grid.
    label_names : mapping of int to str
    seed : int
    cache : path, optional
        JSON file of earlier results: reused when its splits equal ``splits``;
        (re)written otherwise.
    """
    from bids_regionmae.atomic import atomic_write_json
    from bids_regionmae.evaluation.baseline import evaluate_baseline, region_timeseries

    wanted = [s.to_dict() for s in splits]
    if cache is not None and Path(cache).is_file():
        try:
            cached = json.loads(Path(cache).read_text(encoding="utf-8"))
            if [r.get("split") for r in cached] == wanted:
                LOGGER.info("baseline: reusing %s", cache)
                return [FoldResult.from_dict(r) for r in cached]
        except (OSError, json.JSONDecodeError):
            pass
    present = set(np.unique(voxel_labels).tolist()) - {0}
    regions = sorted(int(i) for i in (label_names or present) if int(i) in present)
    LOGGER.info("baseline: region-mean time series of %d regions for %d participants", len(regions),
                len(cohort.subjects))
    series: dict[str, list[np.ndarray]] = {}
    for run in cohort.runs:
        series.setdefault(run.subject, []).append(region_timeseries(run.data, voxel_labels, regions))
    subjects = [s for s in cohort.subjects if s in series]
    label_of = dict(zip(cohort.subjects, cohort.class_labels(), strict=True))
    results = evaluate_baseline(subjects, [series[s] for s in subjects], [label_of[s] for s in subjects], splits,
                                task_kind=cohort.task.kind, class_names=list(cohort.task.class_names) or None,
                                seed=seed, class_weight="balanced" if cohort.task.is_classification else None,
                                model_name="connectivity-baseline")
    if cache is not None:
        atomic_write_json(cache, json.loads(json.dumps([r.to_dict() for r in results])))
    return results
