"""Group-level summaries of a model's predictions: attribution across participants, predictions table, figures.

Everything is read back from the participant-level files in ``output_dir``
(``sub-*/sub-*_desc-<M>_attribution.tsv`` and ``_predictions.tsv``), so
participant jobs that ran separately (SLURM arrays) are all included; the
last job to finish writes the complete summary. Files (``<M>`` = model label)::

    group/attribution_<M>.tsv (+ .json)   mean, sd and n per lobe group and region
    group/attribution_<M>.png             group importance painted on the AAL3 regions
    group/attribution_<M>_groups.svg      bars with sd
    group/predictions_<M>.tsv             one row per participant

The group page (``group/report_<M>.html``) is :func:`bids_regionmae.reports.group.write_group_report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bids_regionmae.outputs.figures import draw_group_bars, draw_region_values, safe_figure
from bids_regionmae.outputs.naming import group_paths
from bids_regionmae.outputs.tables import read_tsv, write_table

LOGGER = logging.getLogger(__name__)

__all__ = ["GroupSummary", "summarise_attribution", "write_group_outputs"]

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


class GroupSummary(NamedTuple):
    """What :func:`write_group_outputs` found and wrote.

    Attributes
    ----------
    attribution : list of dict
        Per lobe group, then per region: mean/sd/n over participants (see :func:`summarise_attribution`).
    participants : list of str
        Participants with attribution (``sub-<label>``).
    predictions : list of dict
        One row per participant with predictions.
    written : list of Path
    """

    attribution: list[dict[str, Any]]
    participants: list[str]
    predictions: list[dict[str, Any]]
    written: list[Path]


def _background(output_dir: Path, participants: Sequence[str]) -> np.ndarray | None:
    """Mean image of the first participant's first run (background of the brain figure)."""
    from bids_regionmae.preprocess.store import find_model_ready_runs

    runs = find_model_ready_runs(output_dir, list(participants[:1]) or None)
    if not runs:
        return None
    try:
        return runs[0].mean_image()
    except Exception:  # noqa: BLE001 - the figure falls back to the atlas outline
        return None


def _attribution_figures(output_dir: Path, label: str, rows: list[dict[str, Any]], participants: list[str]
                         ) -> list[Path]:
    """Bars of the group occlusion importance (with sd) and the importance painted on the atlas regions."""
    from bids_regionmae.atlas import read_atlas_derivative

    paths = group_paths(label, output_dir)
    written: list[Path] = []
    groups = [r for r in rows if r["level"] == "group"]
    series = {"occlusion importance": {r["region"]: r["occlusion_importance_mean"] for r in groups}}
    errors = {"occlusion importance": {r["region"]: r["occlusion_importance_sd"] for r in groups}}
    bars = safe_figure(paths["attribution_bars"], draw_group_bars, series, "drop in target output",
                       f"occlusion importance per lobe group (mean ± sd, n={len(participants)})", errors,
                       figsize=(8, 3.5))
    if bars is not None:
        written.append(bars)
    atlas = read_atlas_derivative(output_dir)
    if atlas is None:
        return written
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
    return written


def write_group_outputs(output_dir: str | Path, label: str, *, model: Mapping[str, Any] | None = None
                        ) -> GroupSummary:
    """Write the group attribution summary (TSV, JSON, figures) and the group predictions table.

    Parameters
    ----------
    output_dir : path
    label : str
        Model label.
    model : mapping, optional
        :meth:`PredictionModel.describe` output (recorded in the sidecar).

    Returns
    -------
    GroupSummary
        The tables' rows and the files written (figures that could not be drawn are left out).
    """
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
        written += _attribution_figures(output_dir, label, rows, participants)
    pred_files = sorted(output_dir.glob(f"sub-*/sub-*_desc-{label}_predictions.tsv"))
    pred_rows = [row for path in pred_files for row in read_tsv(path)]
    if pred_rows:
        columns = list(dict.fromkeys(c for row in pred_rows for c in row))
        written += write_table(paths["predictions_tsv"], pred_rows, columns)
    return GroupSummary(rows, participants, pred_rows, written)
