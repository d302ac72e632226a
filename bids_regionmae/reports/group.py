"""The group page of a model's predictions: ``group/report_<M>.html``.

Shows the model (its description and the pages, figures and summaries of its
model directory), the participant-level predictions, the attribution
summary written by :func:`bids_regionmae.predict.group.write_group_outputs`,
and the methods text.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_regionmae.outputs.naming import group_paths
from bids_regionmae.reports.html import HtmlReport
from bids_regionmae.reports.methods import methods_html, methods_markdown

if TYPE_CHECKING:
    from bids_regionmae.models.model_dir import ModelDir

LOGGER = logging.getLogger(__name__)

__all__ = ["write_group_report"]


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

    Parameters
    ----------
    output_dir : path
    label : str
        Model label.
    rows, participants, predictions
        :class:`~bids_regionmae.predict.group.GroupSummary` fields.
    model : mapping, optional
        :meth:`PredictionModel.describe` output.
    model_dir : ModelDir, optional
        Its pages, figures and summaries are linked.

    Returns
    -------
    Path or None
        None when the page could not be written (logged, never raised).
    """
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
                report.link("Model directory page:", path, name)
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
