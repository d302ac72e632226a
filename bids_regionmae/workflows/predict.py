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
from typing import Any

from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_ERROR, EXIT_OK, InputMissingError

LOGGER = logging.getLogger(__name__)

__all__ = ["run", "select_participants"]


def select_participants(output_dir: Path, config: RunConfig) -> tuple[dict[str, list[Any]], list[str]]:
    """Model-ready runs per selected participant, and the selected participants without any.

    Parameters
    ----------
    output_dir : Path
    config : RunConfig
        ``inputs.participant_label`` (default: every participant with model-ready
        data) and the session/task/run filters.

    Returns
    -------
    runs : dict of str to list of ModelReadyRun
    missing : list of str
        Selected participants with no (matching) model-ready run.
    """
    from bids_regionmae.preprocess.store import find_model_ready_runs

    inputs = config.inputs
    wanted = list(inputs.participant_label) or None
    runs = find_model_ready_runs(output_dir, subjects=wanted)
    for entity, values in (("session", inputs.session_label), ("task", inputs.task), ("run", inputs.run)):
        if values:
            runs = [r for r in runs if r.entities.get(entity) in set(values)]
    by_subject: dict[str, list[Any]] = {}
    for r in runs:
        by_subject.setdefault(r.subject, []).append(r)
    missing = [s for s in (wanted or []) if s not in by_subject]
    return by_subject, missing


def _preprocess_missing(config: RunConfig, missing: list[str]) -> str | None:
    """Run participant level (preprocessing) for ``missing``; the error text if it failed."""
    from bids_regionmae.workflows import participant

    inputs = config.inputs.model_copy(update={"participant_label": tuple(missing)})
    pre_config = config.model_copy(update={"stage": "preprocess", "model_dir": None, "inputs": inputs})
    try:
        code = participant.run(pre_config)
    except Exception as exc:  # noqa: BLE001 - reported per participant
        return f"{type(exc).__name__}: {exc}"
    return None if code == EXIT_OK else f"participant level exited with {code}"


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
        No ``--model`` given, or it holds no loadable model (exit 64).
    InputMissingError
        The model directory does not exist, or no participant has model-ready
        data (exit 66).
    """
    from bids_regionmae.atlas import model_grid_atlas
    from bids_regionmae.errors import UsageError
    from bids_regionmae.predict.group import write_group_outputs
    from bids_regionmae.predict.models import load_prediction_model
    from bids_regionmae.predict.run import PredictSettings, predict_many
    from bids_regionmae.reports.methods import write_citation
    from bids_regionmae.reports.participant import record_status, write_participant_reports
    from bids_regionmae.workflows.common import prepare_run

    if not config.model_dir:
        raise UsageError("--stage predict needs --model DIR (a model directory written by group level)")
    ctx = prepare_run(config)
    output_dir = ctx.output_dir
    model = load_prediction_model(config.model_dir, backend=config.model.backend)
    settings = PredictSettings.from_config(config)
    runs, missing = select_participants(output_dir, config)
    failures: dict[str, str] = {}
    if missing:
        LOGGER.info("no model-ready data for %s: running participant level for them first",
                    ", ".join(f"sub-{s}" for s in missing))
        error = _preprocess_missing(config, missing) if Path(config.bids_dir).is_dir() else "bids_dir not found"
        runs, still_missing = select_participants(output_dir, config)
        for subject in still_missing:
            failures[subject] = (f"sub-{subject}: no model-ready data in {output_dir}"
                                 + (f" and preprocessing it failed ({error})" if error else "")
                                 + ". Run participant level without --model first: regionmae "
                                   f"{config.bids_dir} {output_dir} participant --participant-label {subject}")
    if not runs and not failures:
        raise InputMissingError(f"{output_dir}: no model-ready data. Run participant level without --model first: "
                                f"regionmae {config.bids_dir} {output_dir} participant")
    ctx.write_config(model_dir=str(model.model_dir), model_label=model.label)
    atlas = model_grid_atlas(output_dir, config.atlas.atlas_file, config.atlas.atlas_labels)
    model.to(ctx.device)
    LOGGER.info("predicting %d participant(s) with %s (%s) on %s", len(runs), model.label, model.kind, ctx.device)

    stage = f"predict-{model.label}"
    any_failed = bool(failures)
    for subject, message in failures.items():
        LOGGER.error("%s", message)
        record_status(output_dir, stage, [{"run_id": f"sub-{subject}", "status": "failed", "message": message}])
    results = predict_many(runs, model, atlas, output_dir, settings=settings, device=ctx.device)
    any_failed |= any(o.status == "failed" for outcomes in results.values() for o in outcomes)
    try:
        write_citation(output_dir, stages=("preprocess", "predict"),
                       model={"label": model.label, "kind": model.kind, "target": model.target,
                              "masking": model.masking_text()})
    except OSError as exc:
        LOGGER.warning("could not write the citation boilerplate: %s", exc)
    write_participant_reports(output_dir, sorted(set(runs) | set(failures)), stage=stage)
    try:
        write_group_outputs(output_dir, model.label, model=model.describe(), model_dir=model.model_dir)
    except Exception as exc:  # noqa: BLE001 - the summary never fails the participants' results
        LOGGER.warning("group summary of %s failed: %s", model.label, exc)
    LOGGER.info("prediction with %s done: %d participant(s)%s", model.label, len(runs) + len(failures),
                ", some failed" if any_failed else "")
    return EXIT_ERROR if any_failed else EXIT_OK
