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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.outputs.derivatives import build_output_path
from bids_regionmae.outputs.naming import join_label
from bids_regionmae.reports.figures import center_of, draw_slice_rows, orthogonal_views
from bids_regionmae.reports.html import HtmlReport, safe_figure

LOGGER = logging.getLogger(__name__)

__all__ = [
    "draw_group_bars",
    "draw_mean_and_mask",
    "draw_reconstruction",
    "draw_region_values",
    "record_status",
    "report_path",
    "write_participant_report",
    "write_participant_reports",
]

_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")
_STATUS_DIR = ("logs", "status")


# ----------------------------------------------------------------------------- status logs


def report_path(output_dir: str | Path, subject: str) -> Path:
    """``output_dir/sub-<label>/sub-<label>_report.html``."""
    return build_output_path({"subject": subject, "suffix": "report", "extension": ".html"}, output_dir)


def _status_file(output_dir: Path, subject: str, stage: str) -> Path:
    return output_dir.joinpath(*_STATUS_DIR, f"sub-{subject}_{stage}.json")


def _subject_of(text: str) -> str | None:
    match = _SUBJECT.search(str(text))
    return match.group(1) if match else None


def record_status(output_dir: str | Path, stage: str, entries: Iterable[Mapping[str, Any]],
                  skipped_inputs: Iterable[tuple[str, str]] = ()) -> list[Path]:
    """Merge run outcomes into the per-participant status logs of a stage.

    Parameters
    ----------
    output_dir : path
    stage : str
        ``preprocess`` or ``predict-<model label>``.
    entries : iterable of mapping
        ``{"run_id", "status", "message", "seconds"}`` (``run_id`` starts with
        ``sub-<label>``); a later entry of the same run replaces the earlier one.
    skipped_inputs : iterable of (path, reason)
        Input files that discovery skipped.

    Returns
    -------
    list of Path
        The status files written.
    """
    output_dir = Path(output_dir)
    by_subject: dict[str, dict[str, Any]] = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for entry in entries:
        subject = _subject_of(entry.get("run_id", ""))
        if subject is None:
            continue
        by_subject.setdefault(subject, {"runs": {}, "skipped_inputs": []})["runs"][entry["run_id"]] = {
            "status": str(entry.get("status", "")), "message": str(entry.get("message") or ""),
            "seconds": round(float(entry.get("seconds") or 0.0), 3), "updated": now}
    for path, reason in skipped_inputs:
        subject = _subject_of(Path(str(path)).name) or _subject_of(str(path))
        if subject is not None:
            by_subject.setdefault(subject, {"runs": {}, "skipped_inputs": []})["skipped_inputs"].append(
                {"path": str(path), "reason": str(reason)})
    written = []
    for subject, new in by_subject.items():
        path = _status_file(output_dir, subject, stage)
        old = _read_json(path) or {}
        runs = {**(old.get("runs") or {}), **new["runs"]}
        skipped = new["skipped_inputs"] or old.get("skipped_inputs") or []
        try:
            written.append(atomic_write_json(path, {"subject": subject, "stage": stage, "updated": now,
                                                    "runs": runs, "skipped_inputs": skipped}))
        except OSError as exc:
            LOGGER.warning("could not write the status log %s: %s", path, exc)
    return written


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _statuses(output_dir: Path, subject: str) -> dict[str, dict[str, Any]]:
    folder = output_dir.joinpath(*_STATUS_DIR)
    out = {}
    for path in sorted(folder.glob(f"sub-{subject}_*.json")):
        content = _read_json(path)
        if content:
            out[path.stem[len(f"sub-{subject}_"):]] = content
    return out


# ----------------------------------------------------------------------------- figures


def draw_group_bars(fig: Any, series: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "",
                    errors: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Grouped bar chart: one bar group per region group, one bar per series (e.g. run).

    Parameters
    ----------
    fig : matplotlib Figure
    series : mapping of str to mapping of str to float
        Series name -> region group -> value (NaN: no bar).
    ylabel, title : str
    errors : mapping, optional
        Same layout: error-bar half-lengths (e.g. SD).
    """
    ax = fig.subplots()
    groups = list(dict.fromkeys(g for values in series.values() for g in values))
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for s, (name, values) in enumerate(series.items()):
        heights = [float(values.get(g, math.nan)) for g in groups]
        err = None
        if errors and name in errors:
            err = [float(errors[name].get(g, 0.0)) for g in groups]
            err = [0.0 if not math.isfinite(e) else e for e in err]
        ax.bar(x + (s - (n - 1) / 2) * width, heights, width=width, label=name, yerr=err, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.axhline(0, color="#444", lw=0.5)


def draw_mean_and_mask(fig: Any, mean: np.ndarray, mask: np.ndarray, title: str = "") -> None:
    """Three orthogonal slices of the mean image with the brain-mask outline.

    Parameters
    ----------
    fig : matplotlib Figure
    mean : ndarray, shape (X, Y, Z)
    mask : bool ndarray, shape (X, Y, Z)
    title : str
    """
    axes = fig.subplots(1, 3)
    center = center_of(mask)
    finite = mean[mask] if mask.any() else mean.ravel()
    lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
    views = zip(axes, orthogonal_views(mean, center), orthogonal_views(mask.astype(float), center), strict=True)
    for ax, (view, image), (_, outline) in views:
        ax.imshow(image, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if outline.any() and not outline.all():
            ax.contour(outline, levels=[0.5], colors="#e53e3e", linewidths=0.8)
        ax.set_title(view)
        ax.axis("off")
    if title:
        fig.suptitle(title)


def draw_reconstruction(fig: Any, example: Mapping[str, Any], title: str = "") -> None:
    """Original / masked input / reconstruction, three views each (frame 0).

    Parameters
    ----------
    fig : matplotlib Figure
    example : mapping
        ``original``, ``reconstruction`` : ndarray (X, Y, Z); ``voxel_mask``
        bool (X, Y, Z) (True = masked); ``brain_mask`` bool (X, Y, Z);
        optional ``group``.
    title : str
    """
    original = np.asarray(example["original"], dtype=np.float32)
    recon = np.asarray(example["reconstruction"], dtype=np.float32)
    vmask = np.asarray(example["voxel_mask"], dtype=bool)
    brain = np.asarray(example["brain_mask"], dtype=bool)
    masked = np.where(vmask, np.nan, original)
    recon = np.where(brain, recon, np.nan)
    sel = vmask & brain
    center = center_of(sel if sel.any() else brain)
    lo, hi = np.nanpercentile(original[brain], [2, 98]) if brain.any() else (-2.0, 2.0)
    rows = [("original", original), ("masked input", masked), ("reconstruction", recon)]
    draw_slice_rows(fig, rows, center, lo, hi,
                    title=title or f"masked: {example.get('group', '?')} (frame 0; masked voxels blank)")


def draw_region_values(fig: Any, background: np.ndarray | None, voxel_labels: np.ndarray,
                       values: Mapping[int, float], title: str = "", cmap: str = "hot",
                       label: str = "importance") -> None:
    """Paint a value per atlas label on its voxels over a background image (axial slices).

    Parameters
    ----------
    fig : matplotlib Figure
    background : ndarray, shape (X, Y, Z), optional
        Mean image or template; the atlas outline when None.
    voxel_labels : integer ndarray, shape (X, Y, Z)
    values : mapping of int to float
        Label -> value (e.g. its group's mean importance); labels without a
        value stay transparent.
    title, cmap, label : str
    """
    labels = np.asarray(voxel_labels).astype(np.int64)
    lut = np.full(int(labels.max()) + 1 if labels.size else 1, np.nan)
    for index, value in values.items():
        if 0 < int(index) < lut.size and value is not None and math.isfinite(float(value)):
            lut[int(index)] = float(value)
    painted = lut[labels]
    painted[labels == 0] = np.nan
    bg = (labels > 0).astype(np.float32) if background is None else np.asarray(background, dtype=np.float32)
    brain_z = np.flatnonzero((labels > 0).any(axis=(0, 1)))
    z_lo, z_hi = (int(brain_z.min()), int(brain_z.max())) if brain_z.size else (0, labels.shape[2] - 1)
    slices = np.linspace(z_lo + 0.15 * (z_hi - z_lo), z_hi - 0.15 * (z_hi - z_lo), 6).round().astype(int)
    finite = painted[np.isfinite(painted)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin < 0 < vmax:
        bound = max(abs(vmin), abs(vmax))
        vmin, vmax, cmap = -bound, bound, "RdBu_r"
    axes = fig.subplots(1, len(slices))
    lo, hi = (np.percentile(bg[bg != 0], [2, 98]) if np.any(bg != 0) else (0.0, 1.0))
    image = None
    for ax, k in zip(np.atleast_1d(axes), slices, strict=True):
        ax.imshow(bg[:, :, k].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        image = ax.imshow(np.ma.masked_invalid(painted[:, :, k].T), cmap=cmap, origin="lower", vmin=vmin,
                          vmax=vmax if vmax > vmin else vmin + 1e-9, alpha=0.8)
        ax.set_title(f"z={k}", fontsize=8)
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(np.atleast_1d(axes)), shrink=0.7, label=label)
    if title:
        fig.suptitle(title)


# ----------------------------------------------------------------------------- data helpers


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _mean_image(run: Any, max_frames: int = 50) -> np.ndarray:
    """Mean image of a run on the 96^3 grid: its mean BOLD reference, else the mean of its first frames."""
    path = run.paths.get("mean")
    if path is not None and Path(path).is_file():
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    frames = np.asarray(run.data[: min(run.n_frames, max_frames)], dtype=np.float32)
    return frames.mean(0)


def _figure_path(output_dir: Path, entities: Mapping[str, str], desc: str, ext: str) -> Path:
    base = {k: v for k, v in entities.items() if k not in ("space", "resolution", "desc", "suffix", "extension")}
    return build_output_path({**base, "datatype": "figures", "desc": desc, "suffix": "bold", "extension": ext},
                             output_dir)


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
    statuses = _statuses(output_dir, subject)
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
        qc = _read_json(run.paths["qc"]) if "qc" in run.paths else None
        qc = qc or {}
        frames = meta.get("frames") or {}
        fd = qc.get("framewise_displacement") or {}
        norm = meta.get("normalization") or {}
        mask = qc.get("mask") or {}
        rows.append({
            "run": run.run_id,
            "frames (kept/total)": f"{frames.get('output', '?')}/{frames.get('total', '?')}",
            "dropped": len(frames.get("dropped") or []),
            "TR (s)": _fmt(meta.get("repetition_time")),
            "clips": (meta.get("clips") or {}).get("count", len(run.clips)),
            "tSNR (median)": _fmt(qc.get("tsnr_median")),
            "mean FD (mm)": _fmt(fd.get("mean")),
            "max FD (mm)": _fmt(fd.get("max")),
            "norm. mean": _fmt(norm.get("mean")),
            "norm. std": _fmt(norm.get("std")),
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
        qc = _read_json(run.paths["qc"]) if "qc" in run.paths else None
        groups = ((qc or {}).get("region_coverage") or {}).get("groups") or {}
        if groups:
            series[run.run_id] = {g: (v.get("fraction") if v.get("fraction") is not None else math.nan)
                                  for g, v in groups.items()}
    if not series:
        report.paragraph("No region coverage in the QC files (participant level ran without the atlas, or no "
                         "run is ready).", kind="warn")
        return
    path = build_output_path({"subject": subject, "datatype": "figures", "desc": "coverage", "suffix": "bold",
                              "extension": ".svg"}, output_dir)
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
            mean = _mean_image(run)
            mask = np.asarray(run.mask, dtype=bool)
            figure = safe_figure(_figure_path(output_dir, run.entities, "meanmask", ".png"), draw_mean_and_mask,
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
    from bids_regionmae.outputs.tables import read_tsv

    subject_dir = output_dir / f"sub-{subject}"
    report.heading(f"Model {label}")
    meta: dict[str, Any] = {}
    for path in (_run_files(subject_dir, label, "predictions", "json") + _run_files(subject_dir, label,
                                                                                    "embeddings", "json")):
        meta = _read_json(path) or {}
        if meta:
            break
    model = meta.get("Model") or {}
    if model:
        report.table([{"item": k, "value": _fmt(v) if not isinstance(v, (list, dict)) else json.dumps(v)}
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
            summary = (_read_json(path) or {}).get("RunSummary") or {}
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
        fig_path = build_output_path({"subject": subject, "datatype": "figures",
                                      "desc": join_label("regionerror", label), "suffix": "bold",
                                      "extension": ".svg"}, output_dir)
        figure = safe_figure(fig_path, draw_group_bars, series, "masked in-brain MSE",
                             "reconstruction error when each lobe group is masked", figsize=(8, 3.5))
        report.figure(figure, "Masked in-brain MSE of each lobe group when it is masked in every frame.")
        report.table([{"run": run, **values} for run, values in series.items()])
        for run in runs:
            recon_fig = _figure_path(output_dir, run.entities, join_label("recon", label), ".png")
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
        bars = safe_figure(build_output_path({"subject": subject, "datatype": "figures",
                                              "desc": join_label("attributionbars", label), "suffix": "bold",
                                              "extension": ".svg"}, output_dir),
                           draw_group_bars, series, "importance", "occlusion importance per lobe group",
                           figsize=(8, 3.5)) if series else None
        if bars is not None:
            report.figure(bars, "Drop of the target output when each lobe group is occluded in every frame.")
        brain = _attribution_brain_figure(output_dir, subject, label, rows, runs)
        report.figure(brain, "Mean |integrated gradients| per AAL3 region over the mean image (axial slices).")
        report.paragraph("Full tables: " + ", ".join(p.name for p in [subject_attr] + _run_files(
            subject_dir, label, "attribution")))
    status = (_statuses(output_dir, subject).get(f"predict-{label}") or {}).get("runs") or {}
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
    background = _mean_image(runs[0]) if runs else None
    path = build_output_path({"subject": subject, "datatype": "figures", "desc": join_label("attribution", label),
                              "suffix": "bold", "extension": ".png"}, output_dir)
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
