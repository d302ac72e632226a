"""Participant level: fMRIPrep BOLD runs -> model-ready arrays, QC and a report per participant."""

from __future__ import annotations

import logging

from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_ERROR, EXIT_OK
from bids_regionmae.workflows.common import prepare_run

LOGGER = logging.getLogger(__name__)


def run(config: RunConfig) -> int:
    """Preprocess every selected run; one failing run never stops the others.

    Returns
    -------
    int
        0 when every run was processed (or skipped as complete or too short),
        1 when at least one run failed.
    """
    ctx = prepare_run(config)
    from bids_regionmae.atlas import model_grid_atlas
    from bids_regionmae.bids import discover_runs
    from bids_regionmae.preprocess import preprocess_runs
    from bids_regionmae.reports.participant import write_participant_reports

    discovery = discover_runs(config.bids_dir, config.inputs, work_dir=ctx.work_dir)
    LOGGER.info("found %d runs of %d participants (%d files skipped)", len(discovery.runs),
                len({r.subject for r in discovery.runs}), len(discovery.skipped))
    for item in discovery.skipped:
        LOGGER.warning("skipped %s: %s", item.path, item.reason)
    for warning in discovery.report.warnings:
        LOGGER.warning("%s", warning)
    atlas = model_grid_atlas(ctx.output_dir, atlas_file=config.atlas.atlas_file,
                             atlas_labels=config.atlas.atlas_labels)
    results = preprocess_runs(
        discovery.runs, ctx.output_dir, nprocs=config.nprocs, voxel_labels=atlas.voxel_labels,
        groups=atlas.groups, target_tr=config.preprocess.target_tr, clip_length=config.preprocess.clip_length,
        clip_stride=config.preprocess.clip_stride, drop_nonsteady=config.preprocess.drop_nonsteady,
        background_value=config.preprocess.background_value,
    )
    failed = [r for r in results if r.status == "failed"]
    for result in failed:
        LOGGER.error("%s", result.message)
    write_participant_reports(ctx.output_dir, sorted({r.subject for r in discovery.runs}), results,
                              discovery=discovery)
    LOGGER.info("participant level done: %d runs ok, %d failed", len(results) - len(failed), len(failed))
    return EXIT_ERROR if failed else EXIT_OK
