"""Tables, curves and the summary page of a fine-tuned model directory.

- ``labels.tsv``: participant, target value, class index, group, the split
  that tested it and its use in the final model (:func:`write_labels_table`);
- ``predictions.tsv``: every fold's test participants with their outputs,
  probabilities and predicted class (:func:`write_predictions_table`);
- ``figures/training_curves.svg``: training and validation loss of every split (:func:`draw_training_curves`);
- ``report.html``: cross-validated performance next to the baseline (:func:`write_finetune_report`).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.evaluation.metrics import format_mean_sd, sigmoid, softmax
from bids_regionmae.outputs.figures import safe_figure
from bids_regionmae.outputs.tables import write_table
from bids_regionmae.reports.html import HtmlReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bids_regionmae.evaluation.metrics import FoldResult
    from bids_regionmae.evaluation.splits import Split
    from bids_regionmae.finetune.cohort import Cohort
    from bids_regionmae.finetune.task import Task

LOGGER = logging.getLogger(__name__)

__all__ = ["draw_training_curves", "write_finetune_report", "write_labels_table", "write_predictions_table"]


def write_labels_table(path: Path, cohort: Cohort, splits: Sequence[Split], final: Split) -> None:
    """``labels.tsv``: every participant's label, encoding, group and use (excluded ones with the reason)."""
    target = cohort.task.target
    rows: list[dict[str, Any]] = []
    for s in cohort.subjects:
        tested = [sp.name for sp in splits if s in sp.test]
        use = "train" if s in final.train else ("val" if s in final.val else "unused")
        rows.append({"participant_id": f"sub-{s}", target: cohort.values[s], "encoded": cohort.targets[s],
                     "group": (cohort.groups or {}).get(s), "test_split": ",".join(tested) or None,
                     "final_model": use})
    for s, why in sorted(cohort.excluded.items()):
        rows.append({"participant_id": f"sub-{s}", "final_model": f"excluded: {why}"})
    write_table(path, rows, ["participant_id", target, "encoded", "group", "test_split", "final_model"], digits=6)


def write_predictions_table(path: Path, fold_results: Sequence[FoldResult], task: Task) -> None:
    """``predictions.tsv``: fold, participant, true label, outputs, probabilities and predicted class."""
    names = list(task.class_names)
    columns = ["fold", "participant_id", "true"]
    if task.kind == "binary":
        columns += ["logit", f"probability_{names[1]}", "predicted"]
    elif task.kind == "multiclass":
        columns += [f"logit_{c}" for c in names] + [f"probability_{c}" for c in names] + ["predicted"]
    else:
        columns += ["predicted"]
    rows = []
    for result in fold_results:
        for subject, y, out in zip(result.subjects, result.y_true, result.outputs, strict=True):
            row: dict[str, Any] = {"fold": result.name, "participant_id": f"sub-{subject}"}
            if task.kind == "binary":
                row.update({"true": names[int(y)], "logit": float(out), columns[4]: float(sigmoid(float(out))),
                            "predicted": names[int(float(out) >= 0)]})
            elif task.kind == "multiclass":
                z = np.asarray(out, dtype=np.float64)
                p = softmax(z)
                row.update({"true": names[int(y)], "predicted": names[int(z.argmax())]})
                row.update({f"logit_{c}": float(v) for c, v in zip(names, z, strict=True)})
                row.update({f"probability_{c}": float(v) for c, v in zip(names, p, strict=True)})
            else:
                row.update({"true": float(y), "predicted": float(out)})
            rows.append(row)
    write_table(path, rows, columns, digits=6)


def _read_log(path: Path) -> list[dict[str, float]]:
    """Rows of an engine CSV log with every value as float (NaN when not a number); [] when absent."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        out = []
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    parsed[k] = math.nan
            out.append(parsed)
        return out


def draw_training_curves(model_dir: Path, split_names: Sequence[str]) -> Path | None:
    """``figures/training_curves.svg``: training loss per step and validation loss per epoch, every split."""
    logs = {name: (_read_log(model_dir / "folds" / name / "train_log.csv"),
                   _read_log(model_dir / "folds" / name / "val_log.csv")) for name in split_names}
    logs["final"] = (_read_log(model_dir / "final" / "train_log.csv"), _read_log(model_dir / "final" / "val_log.csv"))

    def draw(fig: Figure) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for i, (name, (train, val)) in enumerate(logs.items()):
            color = "black" if name == "final" else f"C{i % 10}"
            if train:
                ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, color=color, label=name)
            if val:
                ax2.plot([r["epoch"] + 1 for r in val], [r.get("val_loss", math.nan) for r in val], "o-", ms=3,
                         color=color, label=name)
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("training loss (clips)")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("validation loss (participants)")
        for ax in (ax1, ax2):
            if ax.lines:
                ax.legend(fontsize=7)

    return safe_figure(model_dir / "figures" / "training_curves.svg", draw, figsize=(11, 4))


def _performance_rows(task: Task, summary: Mapping[str, Any], baseline: Mapping[str, Any] | None
                      ) -> list[dict[str, Any]]:
    metrics = ("acc", "balanced_acc", "auroc", "f1") if task.is_classification else ("mae", "rmse", "pearson_r", "r2")
    rows = []
    for label, summ in (("fine-tuned", summary), ("connectivity baseline", baseline)):
        if not summ:
            continue
        row: dict[str, Any] = {"model": label}
        for m in metrics:
            v = summ.get(m) or {}
            pct = m in ("acc", "balanced_acc", "f1")
            row[m] = format_mean_sd(v.get("mean") if v.get("mean") is not None else math.nan,
                                    v.get("sd") if v.get("sd") is not None else math.nan, 2 if pct else 3, pct)
        rows.append(row)
    return rows


def write_finetune_report(model_dir: Path, name: str, task: Task, summary: Mapping[str, Any],
                          baseline: Mapping[str, Any] | None, splits: Sequence[Split], mode: str,
                          refit: Mapping[str, Any] | None) -> Path | None:
    """``report.html`` of a fine-tuned model directory; a failure is logged, never raised."""
    try:
        report = HtmlReport(f"Fine-tuning: {name}", model_dir / "report.html")
        report.heading("Cross-validated performance (mean ± sd over folds, test participants only)")
        report.table(_performance_rows(task, summary, baseline))
        report.paragraph(f"Target {task.target!r} ({task.kind}"
                         + (f"; classes {', '.join(task.class_names)}" if task.class_names else "") + f"); mode "
                         f"{mode}; {len(splits)} split(s) ({splits[0].scheme if splits else '-'}), "
                         "each with its own validation participants (early stopping) distinct from its test "
                         "participants. Clip logits are averaged per participant; ACC at logit 0, AUROC on the "
                         "sigmoid.")
        report.heading("Training curves")
        report.figure(model_dir / "figures" / "training_curves.svg",
                      "Training loss per step and subject-level validation loss per epoch, every split "
                      "(black: the final model).")
        if refit:
            report.heading("Final model")
            report.table([{"item": k, "value": v} for k, v in refit.items()])
        report.paragraph("Details: finetune_report.html, baseline_report.html, model_vs_baseline.html, "
                         "predictions.tsv, splits.json, labels.tsv, regionmae_config.toml.")
        return report.write()
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        LOGGER.warning("could not write the fine-tuning report: %s", exc)
        return None
