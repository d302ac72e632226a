"""Group level, ``--stage finetune``: cross-validated fine-tuning on a phenotype, plus a classical baseline.

Reads the model-ready runs participant level wrote into ``output_dir`` and a
target column (``--target``) of ``participants.tsv`` (the raw dataset's, then
the fMRIPrep dataset's) or of a ``--phenotype`` file, then

1. makes leak-free participant splits (:mod:`bids_regionmae.finetune.cohort`):
   stratified, seeded k-fold cross-validation (``--folds``, default 5), or
   leave-one-group-out with ``--group-column`` (e.g. ``site``); every split
   has its own validation participants, distinct from its test participants;
2. fine-tunes one model per split (:class:`bids_regionmae.finetune.cv.Finetuner`)
   from the encoder of ``--model DIR`` or, without ``--model``, from a seeded
   random encoder (the "no pretraining" control; a warning is logged), in
   mode ``--finetune-mode`` (``linear-probe``, ``prompt``, ``full``); clip
   logits are averaged per participant; training stops early on the
   validation participants' loss and the best weights are kept;
3. scores each split's test participants (ACC at logit 0, AUROC on the
   sigmoid, ...) and reports mean ± sd over folds;
4. runs the connectivity baseline on exactly the same splits;
5. refits the deliverable model on all labelled participants (a seeded,
   stratified train/validation split for early stopping) and saves it with
   :meth:`bids_regionmae.models.model_dir.ModelDir.save` (its ``task``
   section says how to read the outputs).

Output: ``output_dir/models/finetune_<target>_from-<pretrained-dir-name>/``
(``_from-scratch`` without ``--model``)::

    model.safetensors, model.json   the deliverable and its typed metadata (task head, provenance, data)
    regionmae_config.toml           resolved configuration + environment
    finetune_fingerprint.json       settings a rerun must share to resume (written first)
    labels.tsv                      participant_id, target value, class index, group, split use
    splits.json                     the cross-validation splits and the final train/val split
    finetune_metrics.tsv/.json, finetune_report.html   per-fold metrics, mean and sd (reports.evaluation)
    baseline_metrics.tsv/.json, baseline_report.html   the connectivity baseline, same splits
    baseline_folds.json             the baseline's fold results (reused on rerun)
    model_vs_baseline.tsv/.json/.html   classification: one row each, ACC and AUROC mean ± sd
    predictions.tsv                 every fold's test participants: outputs, probability, predicted label
    folds/<split>/train_log.csv, val_log.csv, fold_result.json   per split (fold_result.json = done)
    final/train_log.csv, val_log.csv                             the refit
    figures/training_curves.svg, report.html
    finetune_summary.json           summary of the run (written last: completion marker)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.bids.labels import label_tables, load_labels
from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_OK, UsageError
from bids_regionmae.evaluation.splits import save_splits
from bids_regionmae.finetune.cohort import baseline_results, build_cohort, cv_splits, final_split
from bids_regionmae.finetune.cv import Finetuner, check_scored_subjects, pooled_summary, summary_floats
from bids_regionmae.finetune.data import LabelledClips
from bids_regionmae.finetune.model import random_encoder
from bids_regionmae.models.mamba import resolve_backend
from bids_regionmae.models.model_dir import ModelDir
from bids_regionmae.models.model_record import DataRecord, Provenance, TaskHead
from bids_regionmae.models.registry import get_spec
from bids_regionmae.outputs.naming import finetune_dir_name
from bids_regionmae.reports.evaluation import comparison_row, write_comparison, write_evaluation
from bids_regionmae.reports.finetune import (
    draw_training_curves,
    write_finetune_report,
    write_labels_table,
    write_predictions_table,
)
from bids_regionmae.train.data import ClipDataset
from bids_regionmae.train.engine import TrainSettings, resolve_precision
from bids_regionmae.workflows.session import Session, open_session

if TYPE_CHECKING:
    from torch import nn

    from bids_regionmae.evaluation.metrics import FoldResult
    from bids_regionmae.evaluation.splits import Split
    from bids_regionmae.finetune.cohort import Cohort
    from bids_regionmae.finetune.cv import SplitOutcome
    from bids_regionmae.models.spec import ModelSpec

LOGGER = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "baseline_for", "evaluation_splits", "load_cohort", "run", "run_finetune"]

SUMMARY_FILE = "finetune_summary.json"
FINGERPRINT_FILE = "finetune_fingerprint.json"
BASELINE_FILE = "baseline_folds.json"


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
    with open_session(config) as session:
        cohort = load_cohort(session)
        run_finetune(session, cohort, evaluation_splits(session, cohort), pretrained=session.model)
    return EXIT_OK


# --------------------------------------------------------------------------- inputs


def load_cohort(session: Session) -> Cohort:
    """Model-ready runs and labels of the participants to fine-tune on.

    Raises
    ------
    UsageError
        No ``--target``; fewer than two classes (or values) remain.
    InputMissingError
        No model-ready runs; no participants table.
    """
    config = session.config
    target = config.finetune.target
    if not target:
        raise UsageError("--stage finetune needs --target COLUMN (a column of participants.tsv or of the "
                         "--phenotype file, e.g. --target diagnosis)")
    runs = session.model_ready_runs()
    spec = session.model.spec if session.model is not None else get_spec(config.model.variant)
    inputs = config.inputs
    tables = label_tables(config.bids_dir, derivatives=inputs.derivatives, phenotype=inputs.phenotype,
                          skip_validation=inputs.skip_bids_validation)
    labels = load_labels(*tables, target=target, group_column=config.finetune.group_column,
                         participants=sorted({r.subject for r in runs}))
    return build_cohort(runs, labels, int(spec.img_size[3]))


def evaluation_splits(session: Session, cohort: Cohort) -> list[Split]:
    """The cross-validation splits of the session's settings (see :func:`bids_regionmae.finetune.cohort.cv_splits`)."""
    config = session.config
    return cv_splits(cohort, folds=config.finetune.folds, val_fraction=config.train.val_fraction, seed=config.seed,
                     group_column=config.finetune.group_column)


def baseline_for(session: Session, cohort: Cohort, splits: Sequence[Split], cache: Path | None
                 ) -> list[FoldResult] | None:
    """The connectivity baseline on ``splits`` (None, logged, when it fails: the models still stand)."""
    atlas = session.atlas
    try:
        return baseline_results(cohort, splits, voxel_labels=atlas.voxel_labels, label_names=atlas.names,
                                seed=session.config.seed, cache=cache if session.is_main else None)
    except Exception as exc:  # noqa: BLE001 - the fine-tuned models and their metrics still stand
        LOGGER.error("the connectivity baseline failed (%s: %s); results are written without it",
                     type(exc).__name__, exc)
        return None


# --------------------------------------------------------------------------- the run


@dataclass
class FinetuneResult:
    """What :func:`run_finetune` produced.

    Attributes
    ----------
    model_dir : Path
    fold_results : list of FoldResult
        One per split.
    baseline : list of FoldResult or None
    summary : dict
        Mean/sd over folds per metric.
    """
    model_dir: Path
    fold_results: list[FoldResult]
    baseline: list[FoldResult] | None
    summary: dict[str, Any]


def _starting_encoder(session: Session, pretrained: ModelDir | None, backend: str) -> tuple[nn.Module, ModelSpec]:

    config = session.config
    if pretrained is not None:
        if pretrained.spec.name != config.model.variant:
            LOGGER.info("using the pretrained model's variant %r (not --variant %r)", pretrained.spec.name,
                        config.model.variant)
        return pretrained.load_encoder(backend), pretrained.spec
    LOGGER.warning("no --model given: fine-tuning from a randomly initialised %r encoder (no pretraining). "
                   "Pass --model output_dir/models/pretrain_... to start from a pretrained encoder.",
                   config.model.variant)
    return random_encoder(config.model.variant, backend=backend, seed=config.seed)


def _fingerprint(session: Session, cohort: Cohort, splits: Sequence[Split], pretrained: ModelDir | None,
                 variant: str) -> dict[str, Any]:
    config = session.config
    t = config.train
    return {
        "target": cohort.task.target, "task": cohort.task.to_dict(), "mode": config.finetune.mode,
        "pretrained": str(pretrained.path.resolve()) if pretrained else None,
        "pretrained_sha256": pretrained.weights_sha256 if pretrained else None, "variant": variant,
        "seed": config.seed, "participants": cohort.digest(),
        "splits": hashlib.sha256(json.dumps([s.to_dict() for s in splits]).encode()).hexdigest(),
        "epochs": t.epochs, "max_steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "lr": config.finetune.learning_rate(t.lr), "weight_decay": t.weight_decay,
        "warmup_fraction": t.warmup_fraction,
        "val_fraction": t.val_fraction, "patience": config.finetune.patience,
    }


def _check_fingerprint(model_dir: Path, fingerprint: Mapping[str, Any], resume: bool, is_main: bool) -> None:

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


def _prepare_dir(session: Session, cohort: Cohort, splits: Sequence[Split], final: Split, model_dir: Path,
                 fingerprint: Mapping[str, Any], env: Mapping[str, Any]) -> None:
    """Check the fingerprint, record the configuration, splits and labels (rank 0); then wait for every rank."""
    config = session.config
    if session.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(model_dir, fingerprint, config.train.resume, session.is_main)
    if session.is_main:
        session.write_config(model_dir, **env)
        save_splits(model_dir / "splits.json", splits,
                    metadata={"target": cohort.task.target, "task_kind": cohort.task.kind, "seed": config.seed,
                              "scheme": splits[0].scheme if splits else None,
                              "group_column": config.finetune.group_column,
                              "val_fraction": config.train.val_fraction, "final": final.to_dict()})
        write_labels_table(model_dir / "labels.tsv", cohort, splits, final)
    session.barrier()  # other ranks look for finished splits only after rank 0 has checked the directory


def _write_evaluation(model_dir: Path, name: str, cohort: Cohort, fold_results: list[FoldResult],
                      baseline: list[FoldResult] | None, mode: str) -> None:
    """Rank 0: metrics, predictions and the model-vs-baseline table."""
    task = cohort.task
    class_names = list(task.class_names) or None
    write_evaluation(model_dir, "finetune", fold_results, task.kind, class_names)
    write_predictions_table(model_dir / "predictions.tsv", fold_results, task)
    rows = [comparison_row(name, summary_floats(pooled_summary(fold_results)), model="fine-tuned", mode=mode)]
    if baseline:
        write_evaluation(model_dir, "baseline", baseline, task.kind, class_names)
        rows.append(comparison_row("connectivity-baseline", summary_floats(pooled_summary(baseline)),
                                   model="baseline", mode="logistic" if task.is_classification else "ridge"))
    if task.is_classification:
        write_comparison(model_dir, rows, name="model_vs_baseline")


def _refit(session: Session, tuner: Finetuner, final: Split, cohort: Cohort, pretrained: ModelDir | None,
           summary: Mapping[str, Any], splits: Sequence[Split], model_dir: Path) -> dict[str, Any] | None:
    """The deliverable model: reused when a finished run saved it, else trained on ``final`` and saved."""
    done = model_dir / SUMMARY_FILE
    if done.is_file() and session.config.train.resume and ModelDir.is_saved(model_dir):
        LOGGER.info("final model already saved in %s", model_dir)
        return json.loads(done.read_text(encoding="utf-8")).get("final")
    outcome = tuner.refit(final)
    refit_summary = {**outcome.fit.summary(), "train_participants": len(final.train),
                     "val_participants": len(final.val)}
    if session.is_main:
        _save_model(model_dir, outcome, cohort, session.config, pretrained, final, summary, splits)
        shutil.rmtree(model_dir / "final" / "checkpoints", ignore_errors=True)
    return refit_summary


def _save_model(model_dir: Path, outcome: SplitOutcome, cohort: Cohort, config: RunConfig,
                pretrained: ModelDir | None, final: Split, summary: Mapping[str, Any], splits: Sequence[Split]) -> None:

    task = cohort.task
    balance = dict(outcome.loss.balance)
    regression = task.kind == "regression"
    head = TaskHead(kind=task.kind, target=task.target, class_names=tuple(task.class_names), mode=config.finetune.mode,
                    target_mean=balance.get("mean") if regression else None,
                    target_sd=balance.get("sd") if regression else None)
    ModelDir.save(
        model_dir, outcome.model, stage="finetune", task=head,
        masking=pretrained.masking if pretrained else None,
        provenance=Provenance(source="finetuned-here", parent=pretrained.parent_ref() if pretrained else None,
                              seed=config.seed, steps=outcome.fit.result.total_steps),
        data=DataRecord(train_participants=tuple(final.train), val_participants=tuple(final.val),
                        labels_source=str(cohort.source) if cohort.source else None),
        extra={"class_counts": balance.get("counts"),
               "cv": {"scheme": splits[0].scheme if splits else None, "n_splits": len(splits),
                      "group_column": config.finetune.group_column,
                      "summary": {k: v for k, v in summary.items()
                                  if k in ("acc", "auroc", "balanced_acc", "mae", "r2")}}})


def run_finetune(session: Session, cohort: Cohort, splits: Sequence[Split], *, pretrained: ModelDir | None,
                 baseline: list[FoldResult] | None = None, with_baseline: bool = True) -> FinetuneResult:
    """Cross-validate, run the baseline, refit and save one fine-tuned model directory.

    Parameters
    ----------
    session : Session
    cohort : Cohort
    splits : sequence of Split
        Evaluation splits (the same for every pretrained model compared).
    pretrained : ModelDir or None
        The model whose encoder is fine-tuned; None starts from a seeded random encoder.
    baseline : list of FoldResult, optional
        Precomputed baseline fold results on ``splits`` (else computed here when ``with_baseline``).
    with_baseline : bool

    Returns
    -------
    FinetuneResult
    """
    config, task = session.config, cohort.task
    backend = resolve_backend(config.model.backend, session.device)
    encoder, spec = _starting_encoder(session, pretrained, backend)
    name = finetune_dir_name(task.target, pretrained.path if pretrained else None)
    model_dir = session.output_dir / "models" / name
    final = final_split(cohort, val_fraction=config.train.val_fraction, seed=config.seed)
    env = {"backend": backend, "precision": resolve_precision(config.train.precision, session.device),
           "world_size": session.dist.world_size, "model_dir": str(model_dir),
           "pretrained_dir": str(pretrained.path) if pretrained else "scratch"}
    fingerprint = _fingerprint(session, cohort, splits, pretrained, spec.name)
    _prepare_dir(session, cohort, splits, final, model_dir, fingerprint, env)
    data = LabelledClips(ClipDataset(cohort.runs, spec.img_size, subjects=cohort.subjects), cohort.targets)
    settings = TrainSettings.from_config(config.train, seed=config.seed,
                                         lr=config.finetune.learning_rate(config.train.lr),
                                         progress=session.is_main and config.verbose > 0)
    tuner = Finetuner(data, task, cohort.targets, encoder, mode=config.finetune.mode, settings=settings,
                      out_dir=model_dir, seed=config.seed, patience=config.finetune.patience, dist_info=session.dist,
                      model_label=name, fingerprint={"run": fingerprint})
    LOGGER.info("fine-tuning %s: %d participants, %d clips, %d split(s) (%s), mode %s", name,
                len(cohort.subjects), len(data), len(splits), splits[0].scheme if splits else "-",
                config.finetune.mode)
    fold_results = tuner.cross_validate(splits)
    check_scored_subjects(fold_results)
    summary = pooled_summary(fold_results)
    if with_baseline and baseline is None:
        baseline = baseline_for(session, cohort, splits, model_dir / BASELINE_FILE)
    if session.is_main:
        _write_evaluation(model_dir, name, cohort, fold_results, baseline, config.finetune.mode)
    refit_summary = _refit(session, tuner, final, cohort, pretrained, summary, splits, model_dir)
    if session.is_main:
        draw_training_curves(model_dir, [s.name for s in splits])
        base_summary = pooled_summary(baseline) if baseline else None
        write_finetune_report(model_dir, name, task, summary, base_summary, splits, config.finetune.mode,
                              refit_summary)
        atomic_write_json(model_dir / SUMMARY_FILE, {
            "name": name, "target": task.target, "task": task.to_dict(), "mode": config.finetune.mode,
            "pretrained": str(pretrained.path) if pretrained else None, "n_participants": len(cohort.subjects),
            "n_clips": len(data), "scheme": splits[0].scheme if splits else None, "n_splits": len(splits),
            "summary": summary, "baseline_summary": base_summary, "final": refit_summary,
            "excluded": cohort.excluded})
    return FinetuneResult(model_dir=model_dir, fold_results=fold_results, baseline=baseline, summary=summary)
