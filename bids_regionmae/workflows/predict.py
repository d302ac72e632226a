"""Participant level with ``--model``: predict with a pretrained or fine-tuned model.

For every selected participant and run (model-ready data written by
participant level), writes clip and run embeddings, class probabilities or
regression outputs (fine-tuned models), the per-region reconstruction error
of the masked autoencoder (a pretrained model, or the pretrained source of a
fine-tuned one), region attribution (occlusion + integrated gradients) and
maps, then the participant-level tables, the participant reports and the
group summary of the model (see :mod:`bids_regionmae.predict`).

Participants selected with ``--participant-label`` that have no model-ready
data yet are preprocessed first (participant level without ``--model``);
if that fails they are reported as failed. A failing participant or run
never stops the others; the exit code is 1 when any failed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_ERROR, EXIT_OK, InputMissingError, UsageError
from bids_regionmae.outputs.status import record_status
from bids_regionmae.predict.group import write_group_outputs
from bids_regionmae.predict.models import load_prediction_model
from bids_regionmae.predict.run import PredictSettings, predict_many
from bids_regionmae.reports.group import write_group_report
from bids_regionmae.reports.methods import write_citation
from bids_regionmae.reports.participant import write_participant_reports
from bids_regionmae.workflows.participant import preprocess
from bids_regionmae.workflows.session import Session, open_session

if TYPE_CHECKING:
    from bids_regionmae.preprocess.store import ModelReadyRun

LOGGER = logging.getLogger(__name__)

__all__ = ["predict", "run", "select_participants"]


def run(config: RunConfig) -> int:
    """Predict every selected participant with the model in ``config.model_dir``.

    Returns
    -------
    int
        0 when every participant and run was predicted (runs shorter than one
        clip are skipped, not failed), 1 otherwise.

    Raises
    ------
    UsageError
        No ``--model`` given, or it is not a model directory (exit 64).
    InputMissingError
        The model directory does not exist, or no participant has model-ready
        data (exit 66).
    """
    if not config.model_dir:
        raise UsageError("--stage predict needs --model DIR (a model directory written by group level)")
    with open_session(config, distributed=False) as session:
        return predict(session)


def select_participants(session: Session) -> tuple[dict[str, list[ModelReadyRun]], list[str]]:
    """Model-ready runs per selected participant, and the selected participants without any.

    Returns
    -------
    runs : dict of str to list of ModelReadyRun
    missing : list of str
        Participants selected with ``--participant-label`` that have no (matching) model-ready run.
    """
    by_subject: dict[str, list[ModelReadyRun]] = {}
    for r in session.model_ready_runs(required=False):
        by_subject.setdefault(r.subject, []).append(r)
    missing = [s for s in session.config.inputs.participant_label if s not in by_subject]
    return by_subject, missing


def _preprocess_missing(session: Session, missing: list[str]) -> str | None:
    """Run participant level (preprocessing) for ``missing``; the error text if it failed."""
    config = session.config
    inputs = config.inputs.model_copy(update={"participant_label": tuple(missing)})
    pre_config = config.model_copy(update={"stage": "preprocess", "model_dir": None, "inputs": inputs})
    try:
        code = preprocess(session.derive(pre_config, write_config=True))
    except Exception as exc:  # noqa: BLE001 - reported per participant
        return f"{type(exc).__name__}: {exc}"
    return None if code == EXIT_OK else f"participant level exited with {code}"


def _runs_and_failures(session: Session) -> tuple[dict[str, list[ModelReadyRun]], dict[str, str]]:
    """The runs to predict, preprocessing selected participants that have none; failures per participant."""
    config, output_dir = session.config, session.output_dir
    runs, missing = select_participants(session)
    failures: dict[str, str] = {}
    if missing:
        LOGGER.info("no model-ready data for %s: running participant level for them first",
                    ", ".join(f"sub-{s}" for s in missing))
        error = _preprocess_missing(session, missing) if Path(config.bids_dir).is_dir() else "bids_dir not found"
        runs, still_missing = select_participants(session)
        for subject in still_missing:
            failures[subject] = (f"sub-{subject}: no model-ready data in {output_dir}"
                                 + (f" and preprocessing it failed ({error})" if error else "")
                                 + ". Run participant level without --model first: regionmae "
                                   f"{config.bids_dir} {output_dir} participant --participant-label {subject}")
    if not runs and not failures:
        raise InputMissingError(f"{output_dir}: no model-ready data. Run participant level without --model first: "
                                f"regionmae {config.bids_dir} {output_dir} participant")
    return runs, failures


def predict(session: Session) -> int:
    """Predict the selected participants with ``--model`` (see :func:`run`)."""
    config, output_dir = session.config, session.output_dir
    model = load_prediction_model(session.model, backend=config.model.backend)
    runs, failures = _runs_and_failures(session)
    session.write_config(model_dir=str(model.model_dir), model_label=model.label)
    atlas = session.atlas
    model.to(session.device)
    LOGGER.info("predicting %d participant(s) with %s (%s) on %s", len(runs), model.label, model.kind,
                session.device)
    stage = f"predict-{model.label}"
    for subject, message in failures.items():
        LOGGER.error("%s", message)
        record_status(output_dir, stage, [{"run_id": f"sub-{subject}", "status": "failed", "message": message}])
    results = predict_many(runs, model, atlas, output_dir, settings=PredictSettings.from_config(config),
                           device=session.device)
    any_failed = bool(failures) or any(o.status == "failed" for outcomes in results.values() for o in outcomes)
    try:
        write_citation(output_dir, stages=("preprocess", "predict"),
                       model={"label": model.label, "kind": model.kind, "target": model.target,
                              "masking": model.masking_text()})
    except OSError as exc:
        LOGGER.warning("could not write the citation boilerplate: %s", exc)
    write_participant_reports(output_dir, sorted(set(runs) | set(failures)), stage=stage)
    try:
        group = write_group_outputs(output_dir, model.label, model=model.describe())
        write_group_report(output_dir, model.label, group.attribution, group.participants, group.predictions,
                           model=model.describe(), model_dir=session.model)
    except Exception as exc:  # noqa: BLE001 - the summary never fails the participants' results
        LOGGER.warning("group summary of %s failed: %s", model.label, exc)
    LOGGER.info("prediction with %s done: %d participant(s)%s", model.label, len(runs) + len(failures),
                ", some failed" if any_failed else "")
    return EXIT_ERROR if any_failed else EXIT_OK
