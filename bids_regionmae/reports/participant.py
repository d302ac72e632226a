"""One HTML report per participant: a view on the files in ``output_dir``.

The report is rebuilt from what participant level and prediction wrote:
model-ready sidecars and QC JSON, the stage status logs
(``logs/status/sub-<label>_<stage>.json``), the prediction tables and maps.
So the same function is called after preprocessing and again after
``participant --model``, and then also shows the prediction sections.

Sections: summary; input quality control (frames, TR, tSNR, framewise
displacement, normalisation); atlas coverage per region group (bar figure);
mean image with the brain mask; skipped and failed runs with their messages;
per model: predictions, reconstruction error per region group (bars),
reconstruction example, region attribution (bars and a brain figure); methods
and citations. Figures are written under ``sub-<label>/figures/`` with BIDS
names; a figure or report that cannot be made is logged, never raised.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae.outputs.figures import (
    draw_group_bars,
    draw_mean_and_mask,
    draw_region_values,
    safe_figure,
)
from bids_regionmae.outputs.naming import figure_path, join_label, report_path, subject_figure_path
from bids_regionmae.outputs.status import read_json, read_statuses, record_status
from bids_regionmae.outputs.tables import read_tsv
from bids_regionmae.reports.html import HtmlReport, format_number

LOGGER = logging.getLogger(__name__)

__all__ = ["write_participant_report", "write_participant_reports"]

_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")
_STATUS_DIR = ("logs", "status")


# ----------------------------------------------------------------------------- data helpers


def _model_labels(subject_dir: Path) -> list[str]:
    """Labels of the models whose prediction files exist for this participant."""
    labels = set()
    for path in subject_dir.rglob("*_desc-*_*.tsv"):
        match = re.search(r"_desc-([A-Za-z0-9]+)_(embeddings|predictions|regionerror|attribution)\.tsv$", path.name)
        if match:
            labels.add(match.group(1))
    return sorted(labels)


def _run_files(subject_dir: Path, label: str, suffix: str, ext: str = "tsv") -> list[Path]:
    return sorted(p for p in subject_dir.rglob(f"*_desc-{label}_{suffix}.{ext}") if "_task-" in p.name)


def _run_name(path: Path) -> str:
    return path.name.split("_space-")[0]


# ----------------------------------------------------------------------------- report


def write_participant_reports(output_dir: str | Path, subjects: Sequence[str], results: Sequence[Any] | None = None,
                              *, discovery: Any | None = None, stage: str = "preprocess") -> list[Path]:
    """Record this invocation's run outcomes and write a report for every participant.

    Parameters
    ----------
    output_dir : path
    subjects : sequence of str
        Participant labels (with or without ``sub-``).
    results : sequence, optional
        Run outcomes with ``run_id``, ``status``, ``message``, ``seconds``
        (e.g. :class:`bids_regionmae.preprocess.run.RunResult`), merged into
        ``logs/status/sub-<label>_<stage>.json``.
    discovery : optional
        The discovery result; its ``skipped`` list of ``(path, reason)`` is recorded too.
    stage : str
        Status log the results belong to.

    Returns
    -------
    list of Path
        Reports written (a report that could not be written is left out, with a warning).
    """
    output_dir = Path(output_dir)
    entries = [{"run_id": getattr(r, "run_id", ""), "status": getattr(r, "status", ""),
                "message": getattr(r, "message", ""), "seconds": getattr(r, "seconds", 0.0)}
               for r in (results or [])]
    skipped = list(getattr(discovery, "skipped", None) or [])
    try:
        record_status(output_dir, stage, entries, skipped)
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        LOGGER.warning("could not record run statuses: %s", exc)
    try:
        from bids_regionmae.reports.methods import CITATION_NAME, write_citation

        if not (output_dir / "logs" / CITATION_NAME).is_file():
            write_citation(output_dir, stages=("preprocess",))
    except Exception as exc:  # noqa: BLE001
        LOGGER.warning("could not write the citation boilerplate: %s", exc)
    written = []
    for subject in subjects:
        subject = subject[4:] if str(subject).startswith("sub-") else str(subject)
        try:
            path = write_participant_report(output_dir, subject)
        except Exception as exc:  # noqa: BLE001 - a report never fails a run
            LOGGER.warning("could not write the report of sub-%s: %s", subject, exc)
            path = None
        if path is not None:
            written.append(path)
    return written


def write_participant_report(output_dir: str | Path, subject: str) -> Path | None:
    """Build ``sub-<label>/sub-<label>_report.html`` from the files in ``output_dir``.

    Parameters
    ----------
    output_dir : path
    subject : str
        Label without ``sub-``.

    Returns
    -------
    Path or None
        None when the page could not be written (logged).
    """
    from bids_regionmae.preprocess.store import find_model_ready_runs

    output_dir = Path(output_dir)
    subject_dir = output_dir / f"sub-{subject}"
    report = HtmlReport(f"regionmae report: sub-{subject}", report_path(output_dir, subject))
    runs = find_model_ready_runs(output_dir, [subject])
    statuses = read_statuses(output_dir, subject)
    labels = _model_labels(subject_dir) if subject_dir.is_dir() else []
    sections = [
        ("summary", lambda: _summary(report, subject, runs, statuses, labels)),
        ("quality control", lambda: _qc_section(report, runs)),
        ("coverage", lambda: _coverage_section(report, output_dir, subject, runs)),
        ("mean image", lambda: _mean_section(report, output_dir, runs)),
        ("problems", lambda: _problems_section(report, statuses)),
    ]
    sections += [(f"model {label}", lambda label=label: _model_section(report, output_dir, subject, label, runs))
                 for label in labels]
    sections.append(("methods", lambda: _methods_section(report, output_dir, labels)))
    for name, build in sections:
        try:
            build()
        except Exception as exc:  # noqa: BLE001 - one broken section never loses the report
            LOGGER.warning("sub-%s report: section %r failed: %s", subject, name, exc)
            report.paragraph(f"This section could not be built ({type(exc).__name__}: {exc}).", kind="err")
    return report.write()


def _summary(report: HtmlReport, subject: str, runs: Sequence[Any], statuses: Mapping[str, Any],
             labels: Sequence[str]) -> None:
    report.heading("Summary")
    pre = (statuses.get("preprocess") or {}).get("runs") or {}
    failed = [r for r, v in pre.items() if v.get("status") == "failed"]
    skipped = [r for r, v in pre.items() if str(v.get("status", "")).startswith("skipped-short")]
    report.table([
        {"item": "participant", "value": f"sub-{subject}"},
        {"item": "model-ready runs", "value": str(len(runs))},
        {"item": "runs failed / skipped (preprocessing)", "value": f"{len(failed)} / {len(skipped)}"},
        {"item": "models with predictions", "value": ", ".join(labels) or "none"},
        {"item": "report built", "value": time.strftime("%Y-%m-%d %H:%M:%S")},
    ])


def _qc_section(report: HtmlReport, runs: Sequence[Any]) -> None:
    report.heading("Input quality control")
    if not runs:
        report.paragraph("No model-ready run for this participant.", kind="warn")
        return
    rows = []
    warnings = []
    for run in runs:
        meta = run.meta
        qc = read_json(run.paths["qc"]) if "qc" in run.paths else None
        qc = qc or {}
        frames = meta.get("frames") or {}
        fd = qc.get("framewise_displacement") or {}
        norm = meta.get("normalization") or {}
        mask = qc.get("mask") or {}
        rows.append({
            "run": run.run_id,
            "frames (kept/total)": f"{frames.get('output', '?')}/{frames.get('total', '?')}",
            "dropped": len(frames.get("dropped") or []),
            "TR (s)": format_number(meta.get("repetition_time")),
            "clips": (meta.get("clips") or {}).get("count", len(run.clips)),
            "tSNR (median)": format_number(qc.get("tsnr_median")),
            "mean FD (mm)": format_number(fd.get("mean")),
            "max FD (mm)": format_number(fd.get("max")),
            "norm. mean": format_number(norm.get("mean")),
            "norm. std": format_number(norm.get("std")),
            "mask voxels": mask.get("model_voxels", "n/a"),
            "source space": meta.get("source_space", meta.get("space", "n/a")),
        })
        warnings += [f"{run.run_id}: {w}" for w in (qc.get("warnings") or meta.get("warnings") or [])]
    report.table(rows)
    report.paragraph("Normalisation: each run was z-scored with one mean and standard deviation over all "
                     "in-mask voxels and frames; the background was set to a constant. FD: framewise "
                     "displacement from the fMRIPrep confounds (n/a when absent).")
    for text in warnings:
        report.paragraph(text, kind="warn")


def _coverage_section(report: HtmlReport, output_dir: Path, subject: str, runs: Sequence[Any]) -> None:
    report.heading("Atlas coverage per region group")
    series: dict[str, dict[str, float]] = {}
    for run in runs:
        qc = read_json(run.paths["qc"]) if "qc" in run.paths else None
        groups = ((qc or {}).get("region_coverage") or {}).get("groups") or {}
        if groups:
            series[run.run_id] = {g: (v.get("fraction") if v.get("fraction") is not None else math.nan)
                                  for g, v in groups.items()}
    if not series:
        report.paragraph("No region coverage in the QC files (participant level ran without the atlas, or no "
                         "run is ready).", kind="warn")
        return
    path = subject_figure_path(output_dir, subject, "coverage", ".svg")
    figure = safe_figure(path, draw_group_bars, series, "share of atlas voxels in the brain mask",
                         "AAL3 coverage per lobe group", figsize=(8, 3.5))
    report.figure(figure, "Share of each lobe group's atlas voxels inside the run's brain mask on the model grid.")
    report.table([{"run": run, **{g: v for g, v in values.items()}} for run, values in series.items()])


def _mean_section(report: HtmlReport, output_dir: Path, runs: Sequence[Any]) -> None:
    report.heading("Mean image and brain mask")
    if not runs:
        report.paragraph("No model-ready run.", kind="warn")
        return
    for run in runs:
        figure = None
        try:
            mean = run.mean_image()
            mask = np.asarray(run.mask, dtype=bool)
            figure = safe_figure(figure_path(output_dir, run.entities, "meanmask", ".png"), draw_mean_and_mask,
                                 mean, mask, run.run_id, figsize=(9, 3.3))
        except Exception as exc:  # noqa: BLE001 - a figure never fails the report
            LOGGER.warning("mean image of %s: %s", run.run_id, exc)
        report.figure(figure, f"{run.run_id}: mean image on the model grid with the brain-mask outline (red).")


def _problems_section(report: HtmlReport, statuses: Mapping[str, Mapping[str, Any]]) -> None:
    report.heading("Skipped and failed runs")
    rows = []
    for stage, content in statuses.items():
        for run_id, entry in (content.get("runs") or {}).items():
            if entry.get("status") not in ("done", "skipped-complete", "ok"):
                rows.append({"stage": stage, "run": run_id, "status": entry.get("status", ""),
                             "message": entry.get("message", "")})
        for item in content.get("skipped_inputs") or []:
            rows.append({"stage": stage, "run": Path(item.get("path", "")).name, "status": "skipped-input",
                         "message": item.get("reason", "")})
    if not rows:
        report.paragraph("None.")
        return
    report.table(rows, columns=["stage", "run", "status", "message"])
    for row in rows:
        if row["status"] == "failed":
            report.paragraph(f"{row['stage']} {row['run']}: {row['message']}", kind="err")


def _model_section(report: HtmlReport, output_dir: Path, subject: str, label: str, runs: Sequence[Any]) -> None:
    subject_dir = output_dir / f"sub-{subject}"
    report.heading(f"Model {label}")
    meta: dict[str, Any] = {}
    for path in (_run_files(subject_dir, label, "predictions", "json") + _run_files(subject_dir, label,
                                                                                    "embeddings", "json")):
        meta = read_json(path) or {}
        if meta:
            break
    model = meta.get("Model") or {}
    if model:
        report.table([{"item": k, "value": format_number(v) if not isinstance(v, (list, dict)) else json.dumps(v)}
                      for k, v in model.items()])

    # predictions
    subject_pred = subject_dir / f"sub-{subject}_desc-{label}_predictions.tsv"
    run_pred_json = _run_files(subject_dir, label, "predictions", "json")
    if subject_pred.is_file() or run_pred_json:
        report.heading(f"Predictions ({label})")
        rows = read_tsv(subject_pred)
        if rows:
            report.paragraph("Participant level (clip outputs averaged over all runs):")
            report.table(rows)
        run_rows = []
        for path in run_pred_json:
            summary = (read_json(path) or {}).get("RunSummary") or {}
            if summary:
                run_rows.append({"run": _run_name(path), **{k: v for k, v in summary.items()
                                                            if not isinstance(v, (list, dict))}})
        if run_rows:
            report.paragraph("Per run:")
            report.table(run_rows)

    # region error
    error_files = _run_files(subject_dir, label, "regionerror")
    if error_files:
        report.heading(f"Reconstruction error per region group ({label})")
        series = {}
        for path in error_files:
            rows = [r for r in read_tsv(path) if r.get("level") == "group"]
            series[_run_name(path)] = {str(r["region"]): float(r["mse"]) for r in rows}
        fig_path = subject_figure_path(output_dir, subject, join_label("regionerror", label), ".svg")
        figure = safe_figure(fig_path, draw_group_bars, series, "masked in-brain MSE",
                             "reconstruction error when each lobe group is masked", figsize=(8, 3.5))
        report.figure(figure, "Masked in-brain MSE of each lobe group when it is masked in every frame.")
        report.table([{"run": run, **values} for run, values in series.items()])
        for run in runs:
            recon_fig = figure_path(output_dir, run.entities, join_label("recon", label), ".png")
            if recon_fig.is_file():
                report.figure(recon_fig, f"{run.run_id}: original / masked / reconstructed slices.")

    # attribution
    subject_attr = subject_dir / f"sub-{subject}_desc-{label}_attribution.tsv"
    rows = read_tsv(subject_attr)
    if rows:
        report.heading(f"Region attribution ({label})")
        group_rows = [r for r in rows if r.get("level") == "group"]
        columns = [c for c in ("region", "occlusion_importance", "ig_mean_abs", "ig_sum", "n_voxels", "n_runs")
                   if group_rows and c in group_rows[0]]
        report.table(group_rows, columns=columns)
        series = {}
        if group_rows and "occlusion_importance" in group_rows[0]:
            series["occlusion (drop in target logit)"] = {str(r["region"]): float(r["occlusion_importance"])
                                                          for r in group_rows}
        bars = safe_figure(subject_figure_path(output_dir, subject, join_label("attributionbars", label), ".svg"),
                           draw_group_bars, series, "importance", "occlusion importance per lobe group",
                           figsize=(8, 3.5)) if series else None
        if bars is not None:
            report.figure(bars, "Drop of the target output when each lobe group is occluded in every frame.")
        brain = _attribution_brain_figure(output_dir, subject, label, rows, runs)
        report.figure(brain, "Mean |integrated gradients| per AAL3 region over the mean image (axial slices).")
        report.paragraph("Full tables: " + ", ".join(p.name for p in [subject_attr] + _run_files(
            subject_dir, label, "attribution")))
    status = (read_statuses(output_dir, subject).get(f"predict-{label}") or {}).get("runs") or {}
    failed = {r: v for r, v in status.items() if v.get("status") == "failed"}
    for run_id, entry in failed.items():
        report.paragraph(f"prediction failed for {run_id}: {entry.get('message', '')}", kind="err")


def _attribution_brain_figure(output_dir: Path, subject: str, label: str, rows: Sequence[Mapping[str, Any]],
                              runs: Sequence[Any]) -> Path | None:
    from bids_regionmae.atlas import read_atlas_derivative

    atlas = read_atlas_derivative(output_dir)
    if atlas is None:
        return None
    values = {int(r["index"]): float(r["ig_mean_abs"]) for r in rows
              if r.get("level") == "region" and isinstance(r.get("index"), int) and "ig_mean_abs" in r}
    if not values:
        return None
    background = runs[0].mean_image() if runs else None
    path = subject_figure_path(output_dir, subject, join_label("attribution", label), ".png")
    return safe_figure(path, draw_region_values, background, atlas.voxel_labels, values,
                       f"sub-{subject}: integrated gradients per region ({label})", label="mean |IG|",
                       figsize=(12, 2.8))


def _methods_section(report: HtmlReport, output_dir: Path, labels: Sequence[str]) -> None:
    from bids_regionmae.reports.methods import methods_html, methods_markdown

    report.heading("Methods and citations")
    stages = ["preprocess", "predict"] if labels else ["preprocess"]
    text = methods_markdown(stages=stages, model={"label": ", ".join(labels)} if labels else None)
    report.raw(methods_html(text))
    citation = output_dir / "logs" / "CITATION.md"
    if citation.is_file():
        report.paragraph(f"This text is also in {citation.relative_to(output_dir)}.")
