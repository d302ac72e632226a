"""Group-level summaries of a model's predictions: attribution across participants and a group report.

Everything is read back from the participant-level files in ``output_dir``
(``sub-*/sub-*_desc-<M>_attribution.tsv`` and ``_predictions.tsv``), so
participant jobs that ran separately (SLURM arrays) are all included; the
last job to finish writes the complete summary. Files (``<M>`` = model label)::

    group/attribution_<M>.tsv (+ .json)   mean, sd and n per lobe group and region
    group/attribution_<M>.png             group importance painted on the AAL3 regions
    group/attribution_<M>_groups.svg      bars with sd
    group/predictions_<M>.tsv             one row per participant
    group/report_<M>.html                 training curves/metrics of the model, the above, methods
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.outputs.naming import group_paths
from bids_regionmae.outputs.tables import read_tsv, write_table

if TYPE_CHECKING:
    from bids_regionmae.models.model_dir import ModelDir

LOGGER = logging.getLogger(__name__)

__all__ = ["summarise_attribution", "write_group_outputs", "write_group_report"]

_SUMMARY_COLUMNS = ("occlusion_importance", "ig_mean_abs", "ig_sum")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]


def summarise_attribution(output_dir: str | Path, label: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Mean, SD and count over participants of every region's attribution.

    Parameters
    ----------
    output_dir : path
    label : str
        Model label.

    Returns
    -------
    rows : list of dict
        Groups first, then regions: ``region``, ``index``, ``group``,
        ``level``, ``n_participants`` and ``<column>_mean``/``<column>_sd``
        for occlusion importance and integrated gradients.
    participants : list of str
        Participants found (``sub-<label>``).
    """
    output_dir = Path(output_dir)
    files = sorted(output_dir.glob(f"sub-*/sub-*_desc-{label}_attribution.tsv"))
    collected: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[tuple[str, str]] = []
    participants = []
    for path in files:
        rows = read_tsv(path)
        if not rows:
            continue
        participants.append(path.name.split("_")[0])
        for row in rows:
            key = (str(row.get("level")), str(row.get("region")))
            if key not in collected:
                order.append(key)
                collected[key] = {"region": row.get("region"), "index": row.get("index"), "group": row.get("group"),
                                  "level": row.get("level"), "values": {c: [] for c in _SUMMARY_COLUMNS}}
            for column in _SUMMARY_COLUMNS:
                collected[key]["values"][column].append(row.get(column))
    order.sort(key=lambda k: (k[0] != "group",))
    out = []
    for key in order:
        entry = collected[key]
        row = {k: entry[k] for k in ("region", "index", "group", "level")}
        n = 0
        for column, values in entry["values"].items():
            finite = _finite(values)
            n = max(n, len(finite))
            row[f"{column}_mean"] = float(np.mean(finite)) if finite else math.nan
            row[f"{column}_sd"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        row["n_participants"] = n
        out.append(row)
    return out, participants


def _background(output_dir: Path, participants: Sequence[str]) -> np.ndarray | None:
    """Mean image of the first participant's first run (background of the brain figure)."""
    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.reports.participant import _mean_image

    runs = find_model_ready_runs(output_dir, list(participants[:1]) or None)
    if not runs:
        return None
    try:
        return _mean_image(runs[0])
    except Exception:  # noqa: BLE001 - the figure falls back to the atlas outline
        return None


def write_group_outputs(output_dir: str | Path, label: str, *, model: Mapping[str, Any] | None = None,
                        model_dir: ModelDir | None = None) -> list[Path]:
    """Write the group attribution summary, the group predictions table, figures and the group report.

    Parameters
    ----------
    output_dir : path
    label : str
        Model label.
    model : mapping, optional
        :meth:`PredictionModel.describe` output (for the report).
    model_dir : ModelDir, optional
        The model directory (training curves and metrics are linked from it).

    Returns
    -------
    list of Path
        Files written (figures that could not be drawn are left out).
    """
    from bids_regionmae.atlas import read_atlas_derivative
    from bids_regionmae.reports.html import safe_figure
    from bids_regionmae.reports.participant import draw_group_bars, draw_region_values

    output_dir = Path(output_dir)
    paths = group_paths(label, output_dir)
    written: list[Path] = []
    rows, participants = summarise_attribution(output_dir, label)
    if rows:
        columns = ["region", "index", "group", "level", "n_participants"] + [
            f"{c}_{s}" for c in _SUMMARY_COLUMNS for s in ("mean", "sd")]
        written += write_table(paths["attribution_tsv"], rows, columns, json_path=paths["attribution_json"],
                               descriptions={"n_participants": "Participants with a finite value",
                                             **{f"{c}_mean": f"Mean over participants of {c}"
                                                for c in _SUMMARY_COLUMNS},
                                             **{f"{c}_sd": f"Standard deviation over participants of {c}"
                                                for c in _SUMMARY_COLUMNS}},
                               sidecar={"Description": "Group summary of the participant-level region attribution "
                                                       f"of model {label}.", "Participants": participants,
                                        "Model": dict(model or {})})
        groups = [r for r in rows if r["level"] == "group"]
        series = {"occlusion importance": {r["region"]: r["occlusion_importance_mean"] for r in groups}}
        errors = {"occlusion importance": {r["region"]: r["occlusion_importance_sd"] for r in groups}}
        bars = safe_figure(paths["attribution_bars"], draw_group_bars, series, "drop in target output",
                           f"occlusion importance per lobe group (mean ± sd, n={len(participants)})", errors,
                           figsize=(8, 3.5))
        if bars is not None:
            written.append(bars)
        atlas = read_atlas_derivative(output_dir)
        if atlas is not None:
            group_values = {r["region"]: r["occlusion_importance_mean"] for r in groups}
            per_label = {i: group_values.get(atlas.group_of(i), math.nan) for i in atlas.present_labels()}
            if not any(math.isfinite(v) for v in per_label.values()):
                per_label = {int(r["index"]): r["ig_mean_abs_mean"] for r in rows
                             if r["level"] == "region" and isinstance(r["index"], int)}
            brain = safe_figure(paths["attribution_figure"], draw_region_values, _background(output_dir, participants),
                                atlas.voxel_labels, per_label,
                                f"group occlusion importance per lobe group ({label}, n={len(participants)})",
                                label="importance", figsize=(12, 2.8))
            if brain is not None:
                written.append(brain)
    pred_files = sorted(output_dir.glob(f"sub-*/sub-*_desc-{label}_predictions.tsv"))
    pred_rows = [row for path in pred_files for row in read_tsv(path)]
    if pred_rows:
        columns = list(dict.fromkeys(c for row in pred_rows for c in row))
        written += write_table(paths["predictions_tsv"], pred_rows, columns)
    report = write_group_report(output_dir, label, rows, participants, pred_rows, model=model, model_dir=model_dir)
    if report is not None:
        written.append(report)
    return written


def _flatten(data: Any, prefix: str = "") -> list[dict[str, Any]]:
    rows = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                rows += _flatten(value, name + ".")
            elif not isinstance(value, list):
                rows.append({"name": name, "value": value})
    return rows


def write_group_report(output_dir: str | Path, label: str, rows: Sequence[Mapping[str, Any]],
                       participants: Sequence[str], predictions: Sequence[Mapping[str, Any]], *,
                       model: Mapping[str, Any] | None = None, model_dir: ModelDir | None = None) -> Path | None:
    """``group/report_<M>.html``: the model's training record, predictions and the attribution summary.

    Returns
    -------
    Path or None
        None when the page could not be written (logged, never raised).
    """
    from bids_regionmae.reports.html import HtmlReport
    from bids_regionmae.reports.methods import methods_html, methods_markdown

    output_dir = Path(output_dir)
    paths = group_paths(label, output_dir)
    report = HtmlReport(f"regionmae group report: {label}", paths["report"])
    model = dict(model or {})
    try:
        report.heading("Model")
        report.table([{"item": k, "value": json.dumps(v) if isinstance(v, (list, dict)) else v}
                      for k, v in model.items() if v is not None] or [{"item": "label", "value": label}])
        files = model_dir.report_files() if model_dir is not None else {}
        report.heading("Training record")
        if not files:
            report.paragraph("The model directory is not available: no training curves or metrics.", kind="warn")
        for name, path in files.items():
            if path.suffix == ".html":
                rel = html.escape(os.path.relpath(path, paths["report"].parent))
                report.raw(f'<p>Model directory page: <a href="{rel}">{html.escape(name)}</a></p>')
        for name, path in files.items():
            if path.suffix in (".svg", ".png"):
                report.figure(path, f"{name} (from the model directory)")
        for name, path in files.items():
            if path.suffix == ".json":
                try:
                    content = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                flat = _flatten(content)
                if flat:
                    report.paragraph(f"{name}:")
                    report.table(flat[:60])
        report.heading("Predictions")
        if predictions:
            report.table(list(predictions))
        else:
            report.paragraph("No participant-level predictions (a pretrained model gives embeddings and "
                             "reconstruction error only).")
        report.heading("Region attribution")
        if rows:
            report.paragraph(f"Mean ± sd over {len(participants)} participant(s): " + ", ".join(participants))
            group_rows = [{"group": r["region"], "n": r["n_participants"],
                           "occlusion importance": _pm(r["occlusion_importance_mean"], r["occlusion_importance_sd"]),
                           "IG mean |attr|": _pm(r["ig_mean_abs_mean"], r["ig_mean_abs_sd"])}
                          for r in rows if r["level"] == "group"]
            report.table(group_rows)
            report.figure(paths["attribution_bars"], "Occlusion importance per lobe group (mean ± sd over "
                                                     "participants).")
            report.figure(paths["attribution_figure"], "Group occlusion importance painted on the AAL3 regions of "
                                                       "each lobe group over a mean image (axial slices).")
            report.paragraph(f"Table: {paths['attribution_tsv'].name} (per lobe group and AAL3 region).")
        else:
            report.paragraph("No participant-level attribution found.")
        report.heading("Methods and citations")
        report.raw(methods_html(methods_markdown(stages=("preprocess", "predict"),
                                                 model={"label": label, "kind": model.get("Kind"),
                                                        "target": model.get("Target"),
                                                        "masking": model.get("Masking")})))
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        LOGGER.warning("group report %s incomplete: %s", label, exc)
        report.paragraph(f"Report incomplete ({type(exc).__name__}: {exc}).", kind="err")
    return report.write()


def _pm(mean: float, sd: float) -> str:
    if not isinstance(mean, (int, float)) or not math.isfinite(mean):
        return "n/a"
    if isinstance(sd, (int, float)) and math.isfinite(sd):
        return f"{mean:.4g} ± {sd:.3g}"
    return f"{mean:.4g}"
