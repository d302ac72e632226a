"""Group level, ``--stage finetune``: cross-validated fine-tuning on a phenotype, plus a classical baseline.

Reads the model-ready runs participant level wrote into ``output_dir`` and a
target column (``--target``) of ``participants.tsv`` (the raw dataset's, then
the fMRIPrep dataset's) or of a ``--phenotype`` file, then

1. makes leak-free participant splits: stratified, seeded k-fold
   cross-validation (``--folds``, default 5), or leave-one-group-out when
   ``--group-column`` is given (e.g. ``site``); every split has its own
   validation participants, distinct from its test participants
   (``train.val_fraction`` of the non-test participants);
2. fine-tunes one model per split (:class:`bids_regionmae.finetune.cv.Finetuner`)
   from the pretrained encoder of ``--model DIR`` (a pretraining model
   directory) or, without ``--model``, from a seeded random encoder (the "no
   pretraining" control; a warning is logged), in mode ``--finetune-mode``
   (``linear-probe``: frozen encoder; ``prompt``: prompt tokens + head;
   ``full``); clip logits are averaged per participant; the loss is class
   weighted from the training participants; training stops early when the
   validation participants' loss has not improved for ``finetune.patience``
   epochs and the best weights are kept;
3. scores each split's test participants (ACC at logit 0, AUROC on the
   sigmoid, ...) and reports mean ± sd over folds;
4. runs the classical baseline (AAL3 region-mean time series of the same
   model-ready arrays -> Fisher-z correlation connectivity -> logistic or
   ridge regression) on exactly the same splits;
5. refits the deliverable model on all labelled participants (a seeded,
   stratified train/validation split for early stopping) and saves it.

Output: ``output_dir/models/finetune_<target>_from-<pretrained-dir-name>/``
(``_from-scratch`` without ``--model``)::

    model.*                         the deliverable (models.checkpoint.save_model; metadata below)
    regionmae_config.toml           resolved configuration + environment
    finetune_fingerprint.json       settings a rerun must share to resume (written first)
    labels.tsv                      participant_id, target value, class index, group, split use
    splits.json                     the cross-validation splits and the final train/val split
    finetune_metrics.tsv            per-fold metrics, then mean and sd rows (evaluation.report)
    finetune_metrics.json           folds with per-subject outputs, summary, pooled metrics, splits
    finetune_report.html            tables, ROC curves, confusion matrices
    baseline_metrics.tsv/.json, baseline_report.html   the connectivity baseline, same splits
    baseline_folds.json             the baseline's fold results (reused on rerun)
    model_vs_baseline.tsv/.json/.html   classification: one row each, ACC and AUROC mean ± sd
    predictions.tsv                 every fold's test participants: fold, participant_id, true label,
                                    output(s), probability, predicted label
    folds/<split>/train_log.csv, val_log.csv, fold_result.json   per split (fold_result.json = done)
    final/train_log.csv, val_log.csv                             the refit
    (folds/<split>/checkpoints/ and final/checkpoints/ hold the engine state while training; removed when done)
    figures/training_curves.svg     training (per step) and validation (per epoch) loss of every split
    report.html                     summary page linking the above
    finetune_summary.json           summary of the run (written last: completion marker)

Metadata saved with the model (``extra`` of :func:`bids_regionmae.models.checkpoint.save_model`),
which participant-level prediction reads:

``stage`` ``"finetune"``; ``task_kind`` ``"binary" | "multiclass" | "regression"``;
``target`` (column name); ``class_names`` (index order; ``[]`` for regression);
``positive_class`` (binary: ``class_names[1]``, else null); ``num_outputs``;
``output`` (``"logit"`` binary: P(positive) = sigmoid(output), predicted
positive when output >= ``decision_threshold`` = 0; ``"logits"`` multiclass:
softmax / argmax; ``"standardized_value"`` regression: value =
output * ``target_sd`` + ``target_mean``); ``aggregation``
(``"mean_clip_logits"``: average the clip outputs of a participant, then
apply the rule above); ``mode``; ``pretrained_dir`` (absolute path or null);
``pretrained_name`` (directory name or ``"scratch"``); ``variant``;
``img_size`` ``[X, Y, Z, T]``; ``clip_length`` (= T); ``seed``;
``train_participants`` / ``val_participants`` of the refit;
``class_counts``; ``cv`` (scheme, folds and mean/sd of the metrics);
``labels_source``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_OK, InputDataError, InputMissingError, UsageError

LOGGER = logging.getLogger(__name__)

__all__ = [
    "Cohort",
    "FinetuneResult",
    "baseline_results",
    "cv_splits",
    "final_split",
    "finetune_dir_name",
    "load_cohort",
    "run",
    "run_finetune",
]

SUMMARY_FILE = "finetune_summary.json"
FINGERPRINT_FILE = "finetune_fingerprint.json"
BASELINE_FILE = "baseline_folds.json"
#: seed stream of the final refit's train/validation split
STREAM_FINAL = 31


def run(config: RunConfig) -> int:
    """Cross-validate fine-tuning on ``config.finetune.target``, run the baseline, save the refit model.

    Returns
    -------
    int
        0 on success (also on ranks other than 0 under ``torchrun``).

    Raises
    ------
    UsageError
        No ``--target``, unusable labels (one class, too few participants per
        class for the folds), a fine-tuned model directory written with other
        settings, ...
    InputMissingError
        No model-ready data, no participants table, or ``--model`` missing.
    """
    from bids_regionmae.train.engine import cleanup_distributed, init_distributed

    info = init_distributed(config.device)
    try:
        from bids_regionmae.workflows.common import prepare_run

        ctx = prepare_run(config, write_config=info.is_main)
        cohort = load_cohort(config, ctx.output_dir)
        splits = cv_splits(cohort, config)
        run_finetune(ctx, config, cohort, splits, info=info, pretrained=config.model_dir)
        return EXIT_OK
    finally:
        cleanup_distributed(info)


# --------------------------------------------------------------------------- cohort


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

    runs: list[Any]
    subjects: list[str]
    task: Any
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


def label_candidates(config: RunConfig) -> list[Path]:
    """Tables that may hold the target: ``--phenotype``, the raw then the fMRIPrep ``participants.tsv``."""
    from bids_regionmae.bids.discover import locate_fmriprep
    from bids_regionmae.bids.labels import participants_file_candidates
    from bids_regionmae.errors import ValidationError

    try:
        fmriprep_dir, raw_dir = locate_fmriprep(config.bids_dir, config.inputs.derivatives or None,
                                                skip_validation=config.inputs.skip_bids_validation)
    except (InputMissingError, ValidationError) as exc:
        LOGGER.debug("no fMRIPrep dataset located (%s): looking for participants.tsv in bids_dir", exc)
        fmriprep_dir, raw_dir = Path(config.bids_dir), None
    candidates = participants_file_candidates(fmriprep_dir, raw_dir, config.inputs.phenotype)
    bids_table = Path(config.bids_dir) / "participants.tsv"
    if bids_table not in candidates:
        candidates.append(bids_table)
    return candidates


def load_cohort(config: RunConfig, output_dir: str | Path) -> Cohort:
    """Model-ready runs and labels of the participants to fine-tune on.

    Raises
    ------
    UsageError
        No ``--target``; fewer than two classes (or values) remain.
    InputMissingError
        No model-ready runs; no participants table.
    """
    from bids_regionmae.bids.labels import load_labels
    from bids_regionmae.finetune.task import task_from_labels
    from bids_regionmae.train.data import run_clips
    from bids_regionmae.workflows.pretrain import select_runs

    target = config.finetune.target
    if not target:
        raise UsageError("--stage finetune needs --target COLUMN (a column of participants.tsv or of the "
                         "--phenotype file, e.g. --target diagnosis)")
    output_dir = Path(output_dir)
    runs = select_runs(output_dir, config)
    clip_length = _model_clip_length(config)
    with_clips = sorted({r.subject for r in runs if run_clips(r, clip_length)})
    no_clips = sorted({r.subject for r in runs} - set(with_clips))
    labels = load_labels(*label_candidates(config), target=target, group_column=config.finetune.group_column,
                         participants=sorted({r.subject for r in runs}))
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


def _model_clip_length(config: RunConfig) -> int:
    """Frames per clip of the model that will be fine-tuned (``--model``'s spec, else ``--variant``'s)."""
    if config.model_dir:
        from bids_regionmae.models.checkpoint import read_model_metadata

        try:
            return int(read_model_metadata(config.model_dir)["spec"]["img_size"][3])
        except (InputMissingError, InputDataError, KeyError, ValueError, TypeError, IndexError) as exc:
            LOGGER.debug("cannot read the clip length of %s (%s)", config.model_dir, exc)
    from bids_regionmae.models.registry import get_spec

    return int(get_spec(config.model.variant).img_size[3])


def _weights_sha256(model_dir: str | Path | None) -> str | None:
    if not model_dir:
        return None
    from bids_regionmae.models.checkpoint import read_model_metadata

    try:
        return (read_model_metadata(model_dir).get("weights") or {}).get("sha256")
    except Exception:  # noqa: BLE001 - only a fingerprint detail; loading reports real problems
        return None


# --------------------------------------------------------------------------- splits


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-") or "x"


def cv_splits(cohort: Cohort, config: RunConfig) -> list[Any]:
    """Leak-free evaluation splits: leave-one-group-out with ``--group-column``, else stratified k-fold.

    Every split has train, validation and test participants, pairwise
    disjoint; the validation share is ``train.val_fraction`` of the non-test
    participants. Seeded by ``config.seed``.
    """
    from bids_regionmae.evaluation.splits import kfold_splits, leave_one_group_out_splits

    kind = cohort.task.kind
    if config.finetune.group_column:
        assert cohort.groups is not None
        groups = [cohort.groups[s] for s in cohort.subjects]
        splits = leave_one_group_out_splits(cohort.subjects, cohort.labels(), groups,
                                            val_fraction=config.train.val_fraction, seed=config.seed, task_kind=kind,
                                            group_name=_safe(config.finetune.group_column))
    else:
        splits = kfold_splits(cohort.subjects, cohort.labels(), k=config.finetune.folds,
                              val_fraction=config.train.val_fraction, seed=config.seed, task_kind=kind)
    for split in splits:
        split.assert_disjoint()
    return splits


def final_split(cohort: Cohort, config: RunConfig) -> Any:
    """Train/validation split of every labelled participant for the deliverable model (no test set)."""
    from bids_regionmae.evaluation.splits import Split, holdout_split
    from bids_regionmae.train.engine import derive_seed

    fraction = config.train.val_fraction
    if fraction <= 0:
        return Split(name="final", train=tuple(cohort.subjects), val=(), test=(), scheme="final", seed=config.seed)
    seed = derive_seed(config.seed, STREAM_FINAL) % 2**32
    try:
        held = holdout_split(cohort.subjects, cohort.labels(), test_fraction=fraction, val_fraction=0.0, seed=seed,
                             task_kind=cohort.task.kind)
    except UsageError as exc:
        LOGGER.warning("no validation set for the final model (%s): training for all steps", exc)
        return Split(name="final", train=tuple(cohort.subjects), val=(), test=(), scheme="final", seed=seed)
    return Split(name="final", train=held.train, val=held.test, test=(), scheme="final", seed=seed)


# --------------------------------------------------------------------------- baseline


def baseline_results(cohort: Cohort, splits: Sequence[Any], config: RunConfig, output_dir: str | Path,
                     cache: str | Path | None = None) -> list[dict[str, Any]]:
    """The connectivity baseline's fold results on ``splits`` (AAL3 region means of the model-ready arrays).

    Parameters
    ----------
    cohort : Cohort
    splits : sequence of Split
    config : RunConfig
    output_dir : path
        Where the atlas on the model grid is found (or made).
    cache : path, optional
        JSON file of earlier results: reused when its splits equal ``splits``;
        (re)written otherwise.
    """
    from bids_regionmae.atomic import atomic_write_json
    from bids_regionmae.evaluation.baseline import evaluate_baseline, region_timeseries
    from bids_regionmae.workflows.pretrain import load_model_grid_atlas

    wanted = [s.to_dict() for s in splits]
    if cache is not None and Path(cache).is_file():
        try:
            cached = json.loads(Path(cache).read_text(encoding="utf-8"))
            if [r.get("split") for r in cached] == wanted:
                LOGGER.info("baseline: reusing %s", cache)
                return cached
        except (OSError, json.JSONDecodeError):
            pass
    voxel_labels, label_names, _, _ = load_model_grid_atlas(Path(output_dir), config)
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
                                task_kind=cohort.task.kind,
                                class_names=list(cohort.task.class_names) or None, seed=config.seed,
                                class_weight="balanced" if cohort.task.is_classification else None,
                                model_name="connectivity-baseline")
    if cache is not None:
        atomic_write_json(cache, json.loads(json.dumps(results)))
    return results


# --------------------------------------------------------------------------- the run


def finetune_dir_name(target: str, pretrained: str | Path | None) -> str:
    """``finetune_<target>_from-<pretrained dir name>`` or ``finetune_<target>_from-scratch``."""
    source = Path(pretrained).resolve().name if pretrained else "scratch"
    return f"finetune_{_safe(target)}_from-{source}"


@dataclass
class FinetuneResult:
    """What :func:`run_finetune` produced.

    Attributes
    ----------
    model_dir : Path
    fold_results : list of dict
        One per split (fold results of :func:`make_fold_result`).
    baseline : list of dict or None
    summary : dict
        Mean/sd over folds per metric.
    """

    model_dir: Path
    fold_results: list[dict[str, Any]]
    baseline: list[dict[str, Any]] | None
    summary: dict[str, Any]


def _fingerprint(cohort: Cohort, config: RunConfig, splits: Sequence[Any], pretrained: str | Path | None,
                 variant: str) -> dict[str, Any]:
    t = config.train
    return {
        "target": cohort.task.target, "task": cohort.task.to_dict(), "mode": config.finetune.mode,
        "pretrained": str(Path(pretrained).resolve()) if pretrained else None,
        "pretrained_sha256": _weights_sha256(pretrained), "variant": variant,
        "seed": config.seed, "participants": cohort.digest(),
        "splits": hashlib.sha256(json.dumps([s.to_dict() for s in splits]).encode()).hexdigest(),
        "epochs": t.epochs, "max_steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "lr": config.finetune.learning_rate(t.lr), "weight_decay": t.weight_decay,
        "warmup_fraction": t.warmup_fraction,
        "val_fraction": t.val_fraction, "patience": config.finetune.patience,
    }


def _check_fingerprint(model_dir: Path, fingerprint: Mapping[str, Any], resume: bool, is_main: bool) -> None:
    from bids_regionmae.atomic import atomic_write_json

    path = model_dir / FINGERPRINT_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in sorted(set(old) | set(fingerprint))
                if old.get(k) != fingerprint.get(k)]
        if diff and resume:
            raise UsageError(f"{model_dir} holds a fine-tuning run with other settings ({'; '.join(diff)}). "
                             "Rerun with --no-resume to replace it, or use another output_dir.")
        if diff and is_main:
            LOGGER.warning("--no-resume: replacing the fine-tuning run in %s", model_dir)
            for name in ("folds", "final"):
                shutil.rmtree(model_dir / name, ignore_errors=True)
            for name in (SUMMARY_FILE, BASELINE_FILE):
                (model_dir / name).unlink(missing_ok=True)
    if is_main:
        atomic_write_json(path, dict(fingerprint))


def run_finetune(ctx: Any, config: RunConfig, cohort: Cohort, splits: Sequence[Any], *, info: Any,
                 pretrained: str | Path | None, baseline: list[dict[str, Any]] | None = None,
                 with_baseline: bool = True) -> FinetuneResult:
    """Cross-validate, run the baseline, refit and save one fine-tuned model directory.

    Parameters
    ----------
    ctx : RunContext
        From :func:`bids_regionmae.workflows.common.prepare_run`.
    config : RunConfig
    cohort : Cohort
    splits : sequence of Split
        Evaluation splits (the same for every pretrained model compared).
    info : DistInfo
    pretrained : path or None
        Pretraining model directory; None starts from a seeded random encoder.
    baseline : list of dict, optional
        Precomputed baseline fold results on ``splits`` (else computed here
        when ``with_baseline``).
    with_baseline : bool

    Returns
    -------
    FinetuneResult
    """
    from bids_regionmae.atomic import atomic_write_json
    from bids_regionmae.evaluation.report import comparison_row, write_comparison, write_evaluation
    from bids_regionmae.evaluation.splits import save_splits
    from bids_regionmae.finetune.cv import Finetuner, check_scored_subjects, pooled_summary
    from bids_regionmae.finetune.data import LabelledClips
    from bids_regionmae.finetune.model import load_pretrained_encoder, random_encoder
    from bids_regionmae.models.mamba import resolve_backend
    from bids_regionmae.train.data import ClipDataset
    from bids_regionmae.train.engine import TrainSettings, resolve_precision

    device = info.device
    backend = resolve_backend(config.model.backend, device)
    if pretrained:
        encoder, spec, source_meta = load_pretrained_encoder(pretrained, backend=backend)
        if spec is not None and spec.name != config.model.variant:
            LOGGER.info("using the pretrained model's variant %r (not --variant %r)", spec.name, config.model.variant)
    else:
        LOGGER.warning("no --model given: fine-tuning from a randomly initialised %r encoder (no pretraining). "
                       "Pass --model output_dir/models/pretrain_... to start from a pretrained encoder.",
                       config.model.variant)
        encoder, spec = random_encoder(config.model.variant, backend=backend, seed=config.seed)
        source_meta = {}
    task = cohort.task
    name = finetune_dir_name(task.target, pretrained)
    model_dir = Path(ctx.output_dir) / "models" / name
    fingerprint = _fingerprint(cohort, config, splits, pretrained, spec.name)
    precision = resolve_precision(config.train.precision, device)
    fin = final_split(cohort, config)
    if info.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(model_dir, fingerprint, config.train.resume, info.is_main)
    if info.is_main:
        ctx.write_config(model_dir, backend=backend, precision=precision, world_size=info.world_size,
                         model_dir=str(model_dir), pretrained_dir=str(pretrained) if pretrained else "scratch")
        save_splits(model_dir / "splits.json", splits,
                    metadata={"target": task.target, "task_kind": task.kind, "seed": config.seed,
                              "scheme": splits[0].scheme if splits else None,
                              "group_column": config.finetune.group_column,
                              "val_fraction": config.train.val_fraction, "final": fin.to_dict()})
        _write_labels(model_dir / "labels.tsv", cohort, splits, fin)
    _barrier(info)  # other ranks look for finished splits only after rank 0 has checked the directory

    clips = ClipDataset(cohort.runs, spec.img_size, subjects=cohort.subjects)
    data = LabelledClips(clips, cohort.targets)
    settings = TrainSettings.from_config(config.train, seed=config.seed,
                                         lr=config.finetune.learning_rate(config.train.lr),
                                         progress=info.is_main and config.verbose > 0)
    tuner = Finetuner(data, task, cohort.targets, encoder, mode=config.finetune.mode, settings=settings,
                      out_dir=model_dir, seed=config.seed, patience=config.finetune.patience, dist_info=info,
                      model_label=name, fingerprint={"run": fingerprint})
    LOGGER.info("fine-tuning %s: %d participants, %d clips, %d split(s) (%s), mode %s", name,
                len(cohort.subjects), len(data), len(splits), splits[0].scheme if splits else "-",
                config.finetune.mode)
    fold_results = tuner.cross_validate(splits)
    check_scored_subjects(fold_results)
    summary = pooled_summary(fold_results)

    if with_baseline and baseline is None:
        try:
            baseline = baseline_results(cohort, splits, config, ctx.output_dir,
                                        cache=model_dir / BASELINE_FILE if info.is_main else None)
        except Exception as exc:  # noqa: BLE001 - the fine-tuned model and its metrics still stand
            LOGGER.error("the connectivity baseline failed (%s: %s); results are written without it",
                         type(exc).__name__, exc)
            baseline = None

    class_names = list(task.class_names) or None
    if info.is_main:
        write_evaluation(model_dir, "finetune", fold_results, task.kind, class_names)
        _write_predictions(model_dir / "predictions.tsv", fold_results, task)
        rows = [comparison_row(name, summary_floats(summary), model="fine-tuned", mode=config.finetune.mode)]
        if baseline:
            write_evaluation(model_dir, "baseline", baseline, task.kind, class_names)
            rows.append(comparison_row("connectivity-baseline", summary_floats(pooled_summary(baseline)),
                                       model="baseline", mode="logistic" if task.is_classification else "ridge"))
        if task.is_classification:
            write_comparison(model_dir, rows, name="model_vs_baseline")

    done = model_dir / SUMMARY_FILE
    refit_summary: dict[str, Any] | None = None
    if done.is_file() and config.train.resume and _model_saved(model_dir):
        LOGGER.info("final model already saved in %s", model_dir)
        refit_summary = json.loads(done.read_text(encoding="utf-8")).get("final")
    else:
        outcome = tuner.refit(fin)
        refit_summary = {**outcome.fit.summary(), "train_participants": len(fin.train),
                         "val_participants": len(fin.val)}
        if info.is_main:
            from bids_regionmae.models.checkpoint import save_model

            metadata = _model_metadata(cohort, config, spec, pretrained, source_meta, fin, outcome.loss, summary,
                                       splits)
            save_model(directory_or_path=model_dir, model=outcome.model, extra=metadata)
            shutil.rmtree(model_dir / "final" / "checkpoints", ignore_errors=True)
    if info.is_main:
        _draw_curves(model_dir, [s.name for s in splits])
        _write_report(model_dir, name, task, summary, pooled_summary(baseline) if baseline else None, splits,
                      config, refit_summary)
        atomic_write_json(done, {"name": name, "target": task.target, "task": task.to_dict(),
                                 "mode": config.finetune.mode, "pretrained": str(pretrained) if pretrained else None,
                                 "n_participants": len(cohort.subjects), "n_clips": len(data),
                                 "scheme": splits[0].scheme if splits else None, "n_splits": len(splits),
                                 "summary": summary,
                                 "baseline_summary": pooled_summary(baseline) if baseline else None,
                                 "final": refit_summary, "excluded": cohort.excluded})
    return FinetuneResult(model_dir=model_dir, fold_results=fold_results, baseline=baseline, summary=summary)


def _barrier(info: Any) -> None:
    import torch.distributed as dist

    if getattr(info, "world_size", 1) > 1 and dist.is_initialized():
        dist.barrier()


def summary_floats(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """A :func:`pooled_summary` with None turned back into NaN (for :func:`comparison_row`)."""
    return {k: {kk: (math.nan if vv is None else vv) for kk, vv in v.items()} for k, v in summary.items()}


def _model_saved(model_dir: Path) -> bool:
    return any(p.name.startswith("model.") for p in model_dir.iterdir())


def _model_metadata(cohort: Cohort, config: RunConfig, spec: Any, pretrained: str | Path | None,
                    source_meta: Mapping[str, Any], fin: Any, loss: Any, summary: Mapping[str, Any],
                    splits: Sequence[Any]) -> dict[str, Any]:
    task = cohort.task
    output = {"binary": "logit", "multiclass": "logits", "regression": "standardized_value"}[task.kind]
    balance = dict(loss.balance)
    meta: dict[str, Any] = {
        "stage": "finetune",
        "task_kind": task.kind,
        "target": task.target,
        "class_names": list(task.class_names),
        "positive_class": task.class_names[1] if task.kind == "binary" else None,
        "num_outputs": task.num_outputs,
        "output": output,
        "decision_threshold": 0.0 if task.kind == "binary" else None,
        "aggregation": "mean_clip_logits",
        "target_mean": balance.get("mean") if task.kind == "regression" else None,
        "target_sd": balance.get("sd") if task.kind == "regression" else None,
        "mode": config.finetune.mode,
        "pretrained_dir": str(Path(pretrained).resolve()) if pretrained else None,
        "pretrained_name": Path(pretrained).resolve().name if pretrained else "scratch",
        "pretrained_stage": source_meta.get("stage"),
        "variant": spec.name,
        "img_size": list(spec.img_size),
        "clip_length": int(spec.img_size[3]),
        "seed": config.seed,
        "train_participants": list(fin.train),
        "val_participants": list(fin.val),
        "class_counts": balance.get("counts"),
        "cv": {"scheme": splits[0].scheme if splits else None, "n_splits": len(splits),
               "group_column": config.finetune.group_column,
               "summary": {k: v for k, v in summary.items() if k in ("acc", "auroc", "balanced_acc", "mae", "r2")}},
        "labels_source": str(cohort.source) if cohort.source else None,
    }
    return meta


# --------------------------------------------------------------------------- files


def _write_tsv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from bids_regionmae.atomic import atomic_write_text

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([fmt(v) for v in row])
    atomic_write_text(path, buffer.getvalue())


def _write_labels(path: Path, cohort: Cohort, splits: Sequence[Any], fin: Any) -> None:
    rows = []
    for s in cohort.subjects:
        tested = [sp.name for sp in splits if s in sp.test]
        final = "train" if s in fin.train else ("val" if s in fin.val else "unused")
        rows.append([f"sub-{s}", cohort.values[s], cohort.targets[s], (cohort.groups or {}).get(s),
                     ",".join(tested) or None, final])
    for s, why in sorted(cohort.excluded.items()):
        rows.append([f"sub-{s}", None, None, None, None, f"excluded: {why}"])
    _write_tsv(path, ["participant_id", cohort.task.target, "encoded", "group", "test_split", "final_model"], rows)


def _write_predictions(path: Path, fold_results: Sequence[Mapping[str, Any]], task: Any) -> None:
    header = ["fold", "participant_id", "true"]
    if task.kind == "binary":
        header += ["logit", f"probability_{task.class_names[1]}", "predicted"]
    elif task.kind == "multiclass":
        header += [f"logit_{c}" for c in task.class_names] + [f"probability_{c}" for c in task.class_names]
        header += ["predicted"]
    else:
        header += ["predicted"]
    rows = []
    for result in fold_results:
        for subject, y, out in zip(result["subjects"], result["y_true"], result["outputs"], strict=True):
            if task.kind == "binary":
                prob = 1.0 / (1.0 + math.exp(-float(out)))
                rows.append([result["name"], f"sub-{subject}", task.class_names[int(y)], float(out), prob,
                             task.class_names[int(float(out) >= 0)]])
            elif task.kind == "multiclass":
                z = np.asarray(out, dtype=np.float64)
                p = np.exp(z - z.max())
                p /= p.sum()
                rows.append([result["name"], f"sub-{subject}", task.class_names[int(y)], *z.tolist(), *p.tolist(),
                             task.class_names[int(z.argmax())]])
            else:
                rows.append([result["name"], f"sub-{subject}", float(y), float(out)])
    _write_tsv(path, header, rows)


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        out = []
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    parsed[k] = math.nan
            out.append(parsed)
        return out


def _draw_curves(model_dir: Path, split_names: Sequence[str]) -> Path | None:
    from bids_regionmae.reports.html import safe_figure

    logs = {name: (_read_csv(model_dir / "folds" / name / "train_log.csv"),
                   _read_csv(model_dir / "folds" / name / "val_log.csv")) for name in split_names}
    logs["final"] = (_read_csv(model_dir / "final" / "train_log.csv"), _read_csv(model_dir / "final" / "val_log.csv"))

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for i, (name, (train, val)) in enumerate(logs.items()):
            color = "black" if name == "final" else f"C{i % 10}"
            if train:
                ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, color=color, label=name)
            if val:
                ax2.plot([r["epoch"] + 1 for r in val], [r.get("val_loss", math.nan) for r in val], "o-", ms=3,
                         color=color, label=name)
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("training loss (clips)")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("validation loss (participants)")
        for ax in (ax1, ax2):
            if ax.lines:
                ax.legend(fontsize=7)

    return safe_figure(model_dir / "figures" / "training_curves.svg", draw, figsize=(11, 4))


def _write_report(model_dir: Path, name: str, task: Any, summary: Mapping[str, Any],
                  baseline: Mapping[str, Any] | None, splits: Sequence[Any], config: RunConfig,
                  refit: Mapping[str, Any] | None) -> Path | None:
    try:
        from bids_regionmae.evaluation.metrics import format_mean_sd
        from bids_regionmae.reports.html import HtmlReport

        report = HtmlReport(f"Fine-tuning: {name}", model_dir / "report.html")
        metrics = ("acc", "balanced_acc", "auroc", "f1") if task.is_classification else ("mae", "rmse", "pearson_r",
                                                                                        "r2")
        rows = []
        for label, summ in (("fine-tuned", summary), ("connectivity baseline", baseline)):
            if not summ:
                continue
            row: dict[str, Any] = {"model": label}
            for m in metrics:
                v = summ.get(m) or {}
                pct = m in ("acc", "balanced_acc", "f1")
                row[m] = format_mean_sd(v.get("mean") if v.get("mean") is not None else math.nan,
                                        v.get("sd") if v.get("sd") is not None else math.nan, 2 if pct else 3, pct)
            rows.append(row)
        report.heading("Cross-validated performance (mean ± sd over folds, test participants only)")
        report.table(rows)
        report.paragraph(f"Target {task.target!r} ({task.kind}"
                         + (f"; classes {', '.join(task.class_names)}" if task.class_names else "") + f"); mode "
                         f"{config.finetune.mode}; {len(splits)} split(s) ({splits[0].scheme if splits else '-'}), "
                         "each with its own validation participants (early stopping) distinct from its test "
                         "participants. Clip logits are averaged per participant; ACC at logit 0, AUROC on the "
                         "sigmoid.")
        report.heading("Training curves")
        report.figure(model_dir / "figures" / "training_curves.svg",
                      "Training loss per step and subject-level validation loss per epoch, every split "
                      "(black: the final model).")
        if refit:
            report.heading("Final model")
            report.table([{"item": k, "value": v} for k, v in refit.items()])
        report.paragraph("Details: finetune_report.html, baseline_report.html, model_vs_baseline.html, "
                         "predictions.tsv, splits.json, labels.tsv, regionmae_config.toml.")
        return report.write()
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        LOGGER.warning("could not write the fine-tuning report: %s", exc)
        return None
