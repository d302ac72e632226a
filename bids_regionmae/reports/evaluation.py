"""Evaluation results as files: TSV, JSON and an HTML page with inline SVG figures.

:func:`write_evaluation` writes one model's cross-validated results;
:func:`write_comparison` writes the masking-strategy comparison table (one row
per pretraining strategy). Every file is written atomically; TSVs through the
one table writer (:func:`bids_regionmae.outputs.tables.write_table`, ``n/a``
for missing values), pages through the one report builder
(:class:`bids_regionmae.reports.html.HtmlReport`). Figures are drawn with
matplotlib's object API and embedded as inline SVG; a figure that fails is
replaced by a warning in the page and a logged warning, never an exception.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.errors import OutputError, UsageError
from bids_regionmae.evaluation.labels import check_task_kind
from bids_regionmae.evaluation.metrics import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    FoldResult,
    binary_logits,
    format_mean_sd,
    pooled_metrics,
    softmax,
    summarise_folds,
)
from bids_regionmae.outputs.tables import write_table
from bids_regionmae.reports.html import HtmlReport, Markup, format_number

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["comparison_row", "write_comparison", "write_evaluation"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PERCENT = {"acc", "balanced_acc", "f1", "sensitivity", "specificity", "precision"}
_LABELS = {
    "acc": "ACC", "balanced_acc": "Balanced ACC", "auroc": "AUROC", "f1": "F1", "sensitivity": "Sensitivity",
    "specificity": "Specificity", "precision": "Precision", "mae": "MAE", "rmse": "RMSE",
    "pearson_r": "Pearson r", "r2": "R²", "recon_mse": "Recon. MSE",
}


# --------------------------------------------------------------------------- helpers


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(f"report name must be a plain file-name stem (letters, digits, '_', '-', '.'); got {name!r}.")
    return name


def _clean(obj: Any) -> Any:
    """Make ``obj`` strict JSON: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _write_tsv(path: Path, frame: pd.DataFrame) -> Path:
    try:
        write_table(path, frame.to_dict("records"), list(frame.columns), digits=6)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc}).") from None
    return path


def _guard(write: Callable[[], Path]) -> Path:
    try:
        return write()
    except OSError as exc:
        raise OutputError(f"cannot write evaluation output: {exc}") from None


# --------------------------------------------------------------------------- figures


def _draw_roc(fold_results: Sequence[FoldResult], class_names: Sequence[str] | None) -> Callable[[Figure], None]:
    from sklearn.metrics import roc_curve

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot(1, 1, 1)
        grid = np.linspace(0, 1, 101)
        tprs = []
        for res in fold_results:
            y = np.asarray(res.y_true, dtype=np.int64)
            if len(np.unique(y)) < 2:
                continue
            score = binary_logits(res.outputs)
            fpr, tpr, _ = roc_curve(y, score)
            auc = res.metrics.get("auroc")
            ax.plot(fpr, tpr, lw=0.8, alpha=0.5, label=f"{res.name} (AUROC {format_number(auc, 3)})")
            interp = np.interp(grid, fpr, tpr)
            interp[0] = 0.0
            tprs.append(interp)
        if tprs:
            mean = np.mean(tprs, axis=0)
            mean[-1] = 1.0
            aucs = [r.metrics.get("auroc") for r in fold_results]
            aucs = [a for a in aucs if a is not None and math.isfinite(a)]
            ax.plot(grid, mean, color="k", lw=2, label=f"mean (AUROC {np.mean(aucs):.3f})")
            if len(tprs) > 1:
                sd = np.std(tprs, axis=0, ddof=1)
                ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color="grey",
                                alpha=0.2, label="± 1 sd")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        positive = class_names[1] if class_names and len(class_names) > 1 else "1"
        ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC (positive class: {positive})")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7)

    return draw


def _draw_roc_multiclass(fold_results: Sequence[FoldResult],
                         class_names: Sequence[str]) -> Callable[[Figure], None]:
    from sklearn.metrics import roc_auc_score, roc_curve

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot(1, 1, 1)
        y = np.concatenate([np.asarray(r.y_true, dtype=np.int64) for r in fold_results])
        prob = softmax(np.concatenate([np.asarray(r.outputs, dtype=np.float64) for r in fold_results]), axis=1)
        for c, name in enumerate(class_names):
            target = (y == c).astype(int)
            if target.min() == target.max():
                continue
            fpr, tpr, _ = roc_curve(target, prob[:, c])
            ax.plot(fpr, tpr, lw=1.2, label=f"{name} vs rest (AUROC {roc_auc_score(target, prob[:, c]):.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title="One-vs-rest ROC (all folds' test subjects)")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7)

    return draw


def _draw_confusion(fold_results: Sequence[FoldResult], class_names: Sequence[str]) -> Callable[[Figure], None]:
    def draw(fig: Figure) -> None:
        mats = [("all folds", np.sum([np.asarray(r.metrics["confusion_matrix"]) for r in fold_results], axis=0))]
        if len(fold_results) > 1:
            mats += [(r.name, np.asarray(r.metrics["confusion_matrix"])) for r in fold_results]
        ncols = min(5, len(mats))
        nrows = math.ceil(len(mats) / ncols)
        for i, (title, cm) in enumerate(mats):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            ax.imshow(cm, cmap="Blues", vmin=0)
            top = cm.max() if cm.size else 0
            for (r, c), v in np.ndenumerate(cm):
                ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=8,
                        color="white" if top and v > top / 2 else "black")
            ticks = range(len(class_names))
            ax.set_xticks(list(ticks), labels=list(class_names), fontsize=7, rotation=30)
            ax.set_yticks(list(ticks), labels=list(class_names), fontsize=7)
            ax.set_title(title, fontsize=8)
            if i % ncols == 0:
                ax.set_ylabel("true")
            ax.set_xlabel("predicted", fontsize=7)

    return draw


def _draw_scatter(fold_results: Sequence[FoldResult]) -> Callable[[Figure], None]:
    def draw(fig: Figure) -> None:
        ax = fig.add_subplot(1, 1, 1)
        lo, hi = math.inf, -math.inf
        for res in fold_results:
            y = np.asarray(res.y_true, dtype=np.float64)
            p = np.asarray(res.outputs, dtype=np.float64).ravel()
            ax.scatter(y, p, s=12, alpha=0.7, label=res.name)
            if len(y):
                lo, hi = min(lo, y.min(), p.min()), max(hi, y.max(), p.max())
        if math.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=0.8, label="identity")
        ax.set(xlabel="true", ylabel="predicted", title="Predicted vs true (test subjects)")
        ax.legend(fontsize=7)

    return draw


# --------------------------------------------------------------------------- one model


def write_evaluation(out_dir: str | Path, name: str, fold_results: Sequence[FoldResult], task_kind: str,
                     class_names: Sequence[str] | None = None) -> list[Path]:
    """Write one model's fold results as TSV, JSON and HTML.

    Parameters
    ----------
    out_dir : path
        Folder to write into (created if needed).
    name : str
        File-name stem, e.g. ``"desc-cerebellum_finetune"``.
    fold_results : sequence of dict
        Results from :func:`~bids_regionmae.evaluation.metrics.make_fold_result`
        (or :func:`~bids_regionmae.evaluation.baseline.evaluate_baseline`).
    task_kind : {"binary", "multiclass", "regression"}
        The task.
    class_names : sequence of str, optional
        Class names in index order (default: from the fold results).

    Returns
    -------
    list of Path
        ``<name>_metrics.tsv`` (one row per fold, then ``mean`` and ``sd``
        rows), ``<name>_metrics.json`` (folds with per-subject predictions,
        summary, pooled metrics, splits) and ``<name>_report.html`` (tables,
        ROC curves per fold + mean, confusion matrices, or a predicted-vs-true
        scatter for regression).

    Raises
    ------
    UsageError
        No fold results, a bad name, or folds of another task kind.
    OutputError
        A file cannot be written.
    """
    import pandas as pd

    check_task_kind(task_kind)
    _check_name(name)
    fold_results = list(fold_results)
    if not fold_results:
        raise UsageError("write_evaluation needs at least one fold result.")
    kinds = {r.task_kind for r in fold_results}
    if kinds != {task_kind}:
        raise UsageError(f"fold results are of task kind(s) {sorted(kinds)} but task_kind={task_kind!r}.")
    if class_names is None:
        class_names = fold_results[0].class_names
    if task_kind != "regression" and not class_names:
        n_classes = len(fold_results[0].metrics["confusion_matrix"])
        class_names = [str(i) for i in range(n_classes)]
    out_dir = Path(out_dir)

    rows, summary = summarise_folds(fold_results)
    pooled = pooled_metrics(fold_results)
    for part in ("train", "val", "test"):
        rows.insert(1 + ("train", "val", "test").index(part), f"n_{part}",
                    [r.sizes.get(part, math.nan) for r in fold_results])
    models = {r.model for r in fold_results} - {None}
    metric_cols = [c for c in rows.columns if c not in ("fold", "n_train", "n_val", "n_test")]
    mean_row = {"fold": "mean", **{c: summary[c]["mean"] for c in metric_cols}}
    sd_row = {"fold": "sd", **{c: summary[c]["sd"] for c in metric_cols}}
    table = pd.concat([rows, pd.DataFrame([mean_row, sd_row])], ignore_index=True)

    paths = []
    paths.append(_write_tsv(out_dir / f"{name}_metrics.tsv", table))
    splits = [r.split for r in fold_results if r.split]
    payload = {
        "name": name,
        "task_kind": task_kind,
        "class_names": list(class_names) if class_names else None,
        "model": sorted(models)[0] if len(models) == 1 else sorted(models) or None,
        "n_folds": len(fold_results),
        "summary": summary,
        "pooled": pooled,
        "folds": [{k: v for k, v in r.to_dict().items() if k != "split"} for r in fold_results],
        "splits": splits,
    }
    paths.append(_guard(lambda: atomic_write_json(out_dir / f"{name}_metrics.json", _clean(payload))))

    report = _evaluation_page(out_dir / f"{name}_report.html", name, fold_results, task_kind, class_names, models,
                              table, len(rows), summary, pooled, splits)
    paths.append(_guard(lambda: report.write(strict=True)))
    return paths


def _evaluation_page(path: Path, name: str, fold_results: Sequence[FoldResult], task_kind: str,
                     class_names: Sequence[str] | None, models: set[str], table: pd.DataFrame, n_folds: int,
                     summary: Mapping[str, Any], pooled: Mapping[str, Any] | None,
                     splits: Sequence[Mapping[str, Any]]) -> HtmlReport:
    """The page of :func:`write_evaluation`: summary, per-fold table, figures, splits."""
    report = HtmlReport(f"Evaluation: {name}", path)
    main = CLASSIFICATION_METRICS if task_kind != "regression" else REGRESSION_METRICS
    summary_rows = []
    for m in main:
        if m not in summary:
            continue
        pct = m in _PERCENT
        pooled_txt = format_mean_sd(pooled.get(m), None, 2 if pct else 3, pct) if pooled else "n/a"
        summary_rows.append([_LABELS.get(m, m), format_mean_sd(summary[m]["mean"], summary[m]["sd"],
                                                               2 if pct else 3, pct),
                             str(summary[m]["n"]), pooled_txt])
    report.heading("Summary")
    report.paragraph(f"{len(fold_results)} fold(s); task: {task_kind}"
                     + (f"; classes: {', '.join(map(str, class_names))}" if class_names else "")
                     + (f"; model: {', '.join(sorted(models))}" if models else "") + ".")
    report.cells(["metric", "mean ± sd over folds", "folds", "pooled test subjects"], summary_rows)
    report.paragraph("Metrics are computed on test participants only, from subject-level outputs (mean of clip "
                     "logits). Binary: predicted positive when logit ≥ 0 (probability ≥ 0.5); AUROC on "
                     "sigmoid(logit). Multiclass: argmax; one-vs-rest macro AUROC on softmax. Folds where a metric "
                     "is undefined (e.g. a single class in the test set) are left out of its mean; sd is the "
                     "sample sd.", kind="note")
    report.heading("Per fold")
    report.cells(list(table.columns), [[format_number(v) for v in rec] for rec in table.itertuples(index=False)],
                 [""] * n_folds + ["summary", "summary"])
    report.heading("Figures")
    if task_kind == "binary":
        report.svg_figure("ROC curves (per fold and mean)", _draw_roc(fold_results, class_names), (5.2, 5.0))
    elif task_kind == "multiclass":
        report.svg_figure("ROC curves (one-vs-rest)", _draw_roc_multiclass(fold_results, class_names), (5.2, 5.0))
    if task_kind == "regression":
        report.svg_figure("Predicted vs true", _draw_scatter(fold_results), (5.2, 5.0))
    else:
        n_panels = 1 + (len(fold_results) if len(fold_results) > 1 else 0)
        ncols = min(5, n_panels)
        size = (2.3 * ncols + 0.4, 2.3 * math.ceil(n_panels / ncols) + 0.3)
        report.svg_figure("Confusion matrices", _draw_confusion(fold_results, class_names), size)
    if splits:
        report.heading("Splits")
        report.cells(["split", "scheme", "group", "train", "val", "test"],
                     [[str(s["name"]), str(s.get("scheme")), str(s.get("group") or ""), str(len(s["train"])),
                       str(len(s["val"])), str(len(s["test"]))] for s in splits])
        report.paragraph("Splits are by participant; validation and test sets are disjoint. Participant lists "
                         "are in the JSON file.", kind="note")
    return report


# --------------------------------------------------------------------------- comparison

_COMPARISON_COLUMNS = ("strategy", "recon_mse", "acc_mean", "acc_sd", "auroc_mean", "auroc_sd")


def comparison_row(strategy: str, summary: Mapping[str, Mapping[str, float]], recon_mse: float | None = None,
                   **extra: Any) -> dict[str, Any]:
    """One comparison-table row from a :func:`summarise_folds` summary.

    Parameters
    ----------
    strategy : str
        Masking strategy label (``"random"``, ``"cerebellum"``, ...).
    summary : dict
        ``{metric: {"mean", "sd", "n"}}`` from
        :func:`~bids_regionmae.evaluation.metrics.summarise_folds`.
    recon_mse : float, optional
        Masked-voxel reconstruction MSE of the pretrained model.
    **extra
        Further columns (e.g. ``mask_ratio=0.5``).

    Returns
    -------
    dict
        ``strategy, recon_mse, acc_mean, acc_sd, auroc_mean, auroc_sd,
        balanced_acc_mean, balanced_acc_sd, n_folds`` plus ``extra``.
    """
    def get(metric: str, stat: str) -> float:
        return float(summary.get(metric, {}).get(stat, math.nan))

    row: dict[str, Any] = {"strategy": str(strategy),
                           "recon_mse": math.nan if recon_mse is None else float(recon_mse)}
    for metric in ("acc", "auroc", "balanced_acc"):
        row[f"{metric}_mean"] = get(metric, "mean")
        row[f"{metric}_sd"] = get(metric, "sd")
    row["n_folds"] = int(summary.get("acc", {}).get("n", 0)) if summary else 0
    row.update(extra)
    return row


def _draw_comparison(frame: pd.DataFrame) -> Callable[[Figure], None]:
    def draw(fig: Figure) -> None:
        x = np.arange(len(frame))
        labels = frame["strategy"].astype(str).tolist()
        panels = [("acc", "ACC", True), ("auroc", "AUROC", True), ("recon_mse", "Recon. MSE (masked voxels)", False)]
        for i, (key, title, with_sd) in enumerate(panels):
            ax = fig.add_subplot(1, 3, i + 1)
            col = f"{key}_mean" if with_sd else key
            values = frame[col].to_numpy(dtype=float) if col in frame else np.full(len(frame), np.nan)
            err = None
            if with_sd and f"{key}_sd" in frame:
                err = np.nan_to_num(frame[f"{key}_sd"].to_numpy(dtype=float))
            ax.bar(x, np.nan_to_num(values), yerr=err, capsize=3, color=f"C{i}")
            finite = values[np.isfinite(values)]
            if with_sd and len(finite):
                low = max(0.0, float(finite.min() - (err.max() if err is not None else 0) - 0.05))
                ax.set_ylim(low, min(1.0, float(finite.max() + (err.max() if err is not None else 0) + 0.05)))
            ax.set_xticks(x, labels=labels, rotation=40, ha="right", fontsize=7)
            ax.set_title(title, fontsize=9)

    return draw


def write_comparison(out_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                     name: str = "masking_comparison") -> list[Path]:
    """Write the masking-strategy comparison table as TSV, JSON and HTML.

    Parameters
    ----------
    out_dir : path
        Folder to write into.
    rows : sequence of dict
        One per strategy, with ``strategy`` and any of ``recon_mse``,
        ``acc_mean``, ``acc_sd``, ``auroc_mean``, ``auroc_sd`` (fractions,
        not percent) plus extra columns (see :func:`comparison_row`).
    name : str
        File-name stem.

    Returns
    -------
    list of Path
        ``<name>.tsv``, ``<name>.json`` and ``<name>.html`` (table with the
        best value per column in bold, and a bar figure of ACC and AUROC
        with sd error bars and reconstruction MSE).

    Raises
    ------
    UsageError
        No rows, a row without ``strategy``, or repeated strategies.
    """
    import pandas as pd

    _check_name(name)
    rows = [dict(r) for r in rows]
    if not rows:
        raise UsageError("write_comparison needs at least one row.")
    missing = [i for i, r in enumerate(rows) if not r.get("strategy")]
    if missing:
        raise UsageError(f"comparison rows {missing} have no 'strategy'.")
    strategies = [str(r["strategy"]) for r in rows]
    if len(set(strategies)) != len(strategies):
        raise UsageError(f"strategies repeat in the comparison: {strategies}.")
    extra_cols: list[str] = []
    for r in rows:
        extra_cols += [k for k in r if k not in _COMPARISON_COLUMNS and k not in extra_cols]
    columns = list(_COMPARISON_COLUMNS) + extra_cols
    frame = pd.DataFrame([{c: r.get(c, math.nan) for c in columns} for r in rows], columns=columns)
    out_dir = Path(out_dir)
    paths = [_write_tsv(out_dir / f"{name}.tsv", frame)]
    paths.append(_guard(lambda: atomic_write_json(out_dir / f"{name}.json",
                                                  _clean({"name": name, "rows": frame.to_dict("records")}))))

    def best(col: str, lower: bool) -> float | None:
        if col not in frame:
            return None
        v = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        return (v.min() if lower else v.max()) if len(v) else None

    best_acc, best_auc, best_mse = best("acc_mean", False), best("auroc_mean", False), best("recon_mse", True)

    def cell(value: Any, text: str, target: float | None) -> str | Markup:
        is_best = target is not None and isinstance(value, (int, float)) and math.isfinite(value) and value == target
        return Markup('<span class="best">{}</span>').format(text) if is_best else text

    body = []
    shown_extra = [c for c in extra_cols if c not in ("acc_mean", "acc_sd", "auroc_mean", "auroc_sd")]
    for r in frame.to_dict("records"):
        line = [str(r["strategy"]),
                cell(r["recon_mse"], format_number(r["recon_mse"]), best_mse),
                cell(r["acc_mean"], format_mean_sd(r["acc_mean"], r["acc_sd"], 2, True), best_acc),
                cell(r["auroc_mean"], format_mean_sd(r["auroc_mean"], r["auroc_sd"], 3), best_auc)]
        line += [format_number(r[c]) for c in shown_extra]
        body.append(line)
    report = HtmlReport("Masking-strategy comparison", out_dir / f"{name}.html")
    report.heading("Masking strategies")
    report.cells(["strategy", "recon MSE", "ACC (mean ± sd)", "AUROC (mean ± sd)"] + shown_extra, body)
    report.paragraph("ACC and AUROC: mean ± sd over cross-validation folds of the fine-tuned model (test "
                     "participants only). Recon. MSE: masked-voxel reconstruction error of the pretrained model; "
                     "lower MSE does not imply better downstream accuracy (random masking reconstructs easy "
                     "voxels). Best value per column in bold.", kind="note")
    report.svg_figure("ACC, AUROC and reconstruction MSE by strategy", _draw_comparison(frame),
                      (max(7.5, 0.9 * len(frame) * 3), 3.4))
    paths.append(_guard(lambda: report.write(strict=True)))
    return paths
