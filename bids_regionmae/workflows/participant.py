"""Participant level: fMRIPrep BOLD runs -> model-ready arrays, QC and a report per participant."""

from __future__ import annotations

import logging

from bids_regionmae.bids import discover_runs
from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_ERROR, EXIT_OK
from bids_regionmae.preprocess import preprocess_runs
from bids_regionmae.reports.participant import write_participant_reports
from bids_regionmae.workflows.session import Session, open_session

LOGGER = logging.getLogger(__name__)

__all__ = ["preprocess", "run"]


def run(config: RunConfig) -> int:
    """Preprocess every selected run; one failing run never stops the others.

    Returns
    -------
    int
        0 when every run was processed (or skipped as complete or too short),
        1 when at least one run failed.
    """
    with open_session(config, distributed=False) as session:
        return preprocess(session)


def preprocess(session: Session) -> int:
    """Discover, preprocess and report the runs selected by ``session.config`` (see :func:`run`)."""
    config = session.config
    discovery = discover_runs(config.bids_dir, config.inputs, work_dir=session.work_dir)
    LOGGER.info("found %d runs of %d participants (%d files skipped)", len(discovery.runs),
                len({r.subject for r in discovery.runs}), len(discovery.skipped))
    for item in discovery.skipped:
        LOGGER.warning("skipped %s: %s", item.path, item.reason)
    for warning in discovery.report.warnings:
        LOGGER.warning("%s", warning)
    atlas = session.atlas
    p = config.preprocess
    results = preprocess_runs(
        discovery.runs, session.output_dir, nprocs=config.nprocs, voxel_labels=atlas.voxel_labels,
        groups=atlas.groups, target_tr=p.target_tr, clip_length=p.clip_length, clip_stride=p.clip_stride,
        drop_nonsteady=p.drop_nonsteady, background_value=p.background_value,
    )
    failed = [r for r in results if r.status == "failed"]
    for result in failed:
        LOGGER.error("%s", result.message)
    write_participant_reports(session.output_dir, sorted({r.subject for r in discovery.runs}), results,
                              discovery=discovery)
    LOGGER.info("participant level done: %d runs ok, %d failed", len(results) - len(failed), len(failed))
    return EXIT_ERROR if failed else EXIT_OK
