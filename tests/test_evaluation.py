"""Evaluation room: leak-free splits, metrics, reports and the connectivity baseline."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter

import numpy as np
import pytest

from bids_regionmae.errors import InputDataError, UsageError
from bids_regionmae.evaluation import baseline, metrics
from bids_regionmae.evaluation.splits import (
    Split,
    SplitError,
    holdout_split,
    kfold_splits,
    leave_one_group_out_splits,
    load_splits,
    make_splits,
    save_splits,
)
from bids_regionmae.reports import evaluation as report
from bids_regionmae.reports import html as html_report

SITES = ["KKI", "NeuroIMAGE", "NYU", "OHSU", "Peking_1", "Peking_2", "Pittsburgh", "WashU"]


@pytest.fixture
def cohort():
    """120 participants, ~40% class 1, spread over the 8 ADHD-200 sites."""
    rng = np.random.default_rng(7)
    subjects = [f"sub-{i:04d}" for i in range(120)]
    labels = (rng.random(120) < 0.4).astype(int)
    sites = [SITES[i % 8] for i in rng.permutation(120)]
    return subjects, labels, sites


def _label_of(subjects, labels):
    return dict(zip(subjects, labels, strict=True))


def _assert_partition(split: Split, everyone: set[str]):
    split.assert_disjoint()
    parts = [set(split.train), set(split.val), set(split.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == everyone
    assert split.val and split.test and split.val != split.test


# --------------------------------------------------------------------------- splits: leakage


def test_holdout_no_leak_and_stratified(cohort):
    subjects, labels, _ = cohort
    split = holdout_split(subjects, labels, test_fraction=0.2, val_fraction=0.15, seed=3)
    _assert_partition(split, set(subjects))
    assert split.sizes() == {"train": 78, "val": 18, "test": 24}
    lab = _label_of(subjects, labels)
    overall = np.mean(labels)
    for part in ("train", "val", "test"):
        members = getattr(split, part)
        assert abs(np.mean([lab[s] for s in members]) - overall) <= 1.0 / len(members) + 1e-9, part


def test_holdout_deterministic_and_order_independent(cohort):
    subjects, labels, _ = cohort
    a = holdout_split(subjects, labels, 0.2, 0.1, seed=11)
    b = holdout_split(subjects[::-1], labels[::-1], 0.2, 0.1, seed=11)
    c = holdout_split(subjects, labels, 0.2, 0.1, seed=12)
    assert a == b
    assert a.test != c.test


def test_holdout_regression_stratifies_on_quantiles():
    rng = np.random.default_rng(0)
    subjects = [f"s{i:03d}" for i in range(100)]
    age = rng.uniform(7, 21, 100)
    split = holdout_split(subjects, age, 0.2, 0.1, seed=0)
    _assert_partition(split, set(subjects))
    by = dict(zip(subjects, age, strict=True))
    bins = np.quantile(age, [0.2, 0.4, 0.6, 0.8])
    counts = Counter(np.searchsorted(bins, [by[s] for s in split.test]).tolist())
    assert sorted(counts.values()) == [4, 4, 4, 4, 4]  # every quintile equally represented


def test_kfold_every_subject_tested_once(cohort):
    subjects, labels, _ = cohort
    folds = kfold_splits(subjects, labels, k=5, val_fraction=0.1, seed=0)
    assert [f.name for f in folds] == [f"fold-{i}" for i in range(5)]
    tested = Counter(s for f in folds for s in f.test)
    assert set(tested) == set(subjects) and set(tested.values()) == {1}
    lab = _label_of(subjects, labels)
    n_pos = int(np.sum(labels))
    for f in folds:
        _assert_partition(f, set(subjects))
        pos_test = sum(lab[s] for s in f.test)
        assert abs(pos_test - n_pos / 5) <= 1  # stratified test folds
        assert {lab[s] for s in f.val} == {0, 1}  # val stratified too
    assert kfold_splits(subjects, labels, 5, 0.1, seed=0) == folds
    assert kfold_splits(subjects, labels, 5, 0.1, seed=1) != folds


def test_kfold_groups_never_span_partitions(cohort):
    subjects, labels, _ = cohort
    families = [f"fam{i // 3}" for i in range(len(subjects))]  # trios of siblings
    fam_of = dict(zip(subjects, families, strict=True))
    folds = kfold_splits(subjects, labels, k=4, val_fraction=0.1, seed=2, groups=families)
    assert Counter(s for f in folds for s in f.test) == Counter({s: 1 for s in subjects})
    for f in folds:
        _assert_partition(f, set(subjects))
        fams = [{fam_of[s] for s in getattr(f, part)} for part in ("train", "val", "test")]
        assert not (fams[0] & fams[1]) and not (fams[0] & fams[2]) and not (fams[1] & fams[2])


def test_leave_one_site_out(cohort):
    subjects, labels, sites = cohort
    site_of = dict(zip(subjects, sites, strict=True))
    folds = leave_one_group_out_splits(subjects, labels, sites, val_fraction=0.1, seed=0, group_name="site")
    assert len(folds) == 8
    assert sorted(f.group for f in folds) == sorted(SITES)
    for f in folds:
        _assert_partition(f, set(subjects))
        assert {site_of[s] for s in f.test} == {f.group}  # test fold = exactly one site
        assert f.group not in {site_of[s] for s in f.train + f.val}  # val from other sites only
        assert set(f.test) == {s for s in subjects if site_of[s] == f.group}
        assert f.name == "site-" + f.group.replace("_", "")
    assert Counter(s for f in folds for s in f.test) == Counter({s: 1 for s in subjects})


def test_make_splits_dispatch(cohort):
    subjects, labels, sites = cohort
    assert len(make_splits("holdout", subjects, labels)) == 1
    assert len(make_splits("kfold", subjects, labels, k=3)) == 3
    assert len(make_splits("loso", subjects, labels, groups=sites, group_name="site")) == 8
    with pytest.raises(UsageError, match="holdout, kfold, loso"):
        make_splits("random", subjects, labels)


# --------------------------------------------------------------------------- splits: errors and I/O


def test_too_few_per_class_for_k_folds():
    subjects = [f"s{i}" for i in range(20)]
    labels = [1] * 3 + [0] * 17
    with pytest.raises(UsageError) as err:
        kfold_splits(subjects, labels, k=5)
    text = str(err.value)
    assert "'1': 3" in text and "'0': 17" in text and "k <= 3" in text


def test_too_few_per_class_for_holdout():
    with pytest.raises(UsageError, match="at least 3"):
        holdout_split([f"s{i}" for i in range(10)], [1, 1] + [0] * 8, 0.2, 0.1)


def test_split_input_errors(cohort):
    subjects, labels, sites = cohort
    with pytest.raises(UsageError, match="more than once"):
        holdout_split(subjects[:10] + subjects[:1], list(labels[:10]) + [0])
    with pytest.raises(UsageError, match="no label"):
        holdout_split(subjects[:12], [0, 1] * 5 + [None, "n/a"])
    with pytest.raises(UsageError, match="at least 2 groups"):
        leave_one_group_out_splits(subjects, labels, ["NYU"] * len(subjects))
    with pytest.raises(UsageError, match="test_fraction"):
        holdout_split(subjects, labels, test_fraction=1.2)


def test_split_roundtrip_and_leak_detection(cohort, tmp_path):
    subjects, labels, _ = cohort
    folds = kfold_splits(subjects, labels, k=3, seed=5)
    assert [Split.from_dict(f.to_dict()) for f in folds] == folds
    json.dumps(folds[0].to_dict())
    path = save_splits(tmp_path / "splits.json", folds, metadata={"target": "dx"})
    assert load_splits(path) == folds
    bad = folds[0].to_dict()
    bad["val"] = bad["val"] + [bad["test"][0]]
    with pytest.raises(SplitError, match="both val and test"):
        Split.from_dict(bad)
    with pytest.raises(SplitError, match="more than once"):
        Split("x", ("a", "a"), (), ("b",)).assert_disjoint()


# --------------------------------------------------------------------------- metrics


def test_binary_metrics_by_hand():
    y = [0, 0, 1, 1, 1, 0]
    logits = [-2.0, 0.5, 1.0, -0.1, 3.0, 0.0]  # logit 0 counts as positive (prob 0.5)
    m = metrics.classification_metrics(y, logits)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 2, 1)
    assert m["acc"] == pytest.approx(3 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 3)
    assert m["balanced_acc"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # positives 1, -0.1, 3 vs negatives -2, 0.5, 0: pairs won 3 + 1 + 3 = 7 of 9
    assert m["auroc"] == pytest.approx(7 / 9)
    assert m["confusion_matrix"] == [[1, 2], [1, 2]]
    two_col = np.stack([np.zeros(6), logits], axis=1) + 5.0
    assert metrics.compute_metrics("binary", y, two_col) == m


def test_metrics_match_sklearn():
    from scipy.stats import pearsonr
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    logit = rng.normal(size=200) + 1.2 * (y - 0.5)
    m = metrics.classification_metrics(y, logit)
    pred = (logit >= 0).astype(int)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, 1 / (1 + np.exp(-logit))))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()

    y3 = rng.integers(0, 3, 150)
    z = rng.normal(size=(150, 3)) + np.eye(3)[y3]
    m3 = metrics.classification_metrics(y3, z)
    p3 = z.argmax(1)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    cm = skm.confusion_matrix(y3, p3)
    assert m3["acc"] == pytest.approx(skm.accuracy_score(y3, p3))
    assert m3["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y3, p3))
    assert m3["f1"] == pytest.approx(skm.f1_score(y3, p3, average="macro"))
    assert m3["auroc"] == pytest.approx(skm.roc_auc_score(y3, prob, multi_class="ovr", average="macro"))
    spec = [(cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]) / (cm.sum() - cm[c].sum()) for c in range(3)]
    assert m3["specificity"] == pytest.approx(np.mean(spec))
    assert m3["confusion_matrix"] == cm.tolist()

    t = rng.normal(size=50)
    p = t + rng.normal(scale=0.5, size=50)
    r = metrics.regression_metrics(t, p)
    assert r["mae"] == pytest.approx(skm.mean_absolute_error(t, p))
    assert r["r2"] == pytest.approx(skm.r2_score(t, p))
    assert r["pearson_r"] == pytest.approx(pearsonr(t, p)[0])
    assert r["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(t, p)))


def test_degenerate_folds_warn_not_crash(caplog):
    with caplog.at_level(logging.WARNING, logger="bids_regionmae.evaluation"):
        m = metrics.classification_metrics([1, 1, 1], [0.3, -1.0, 2.0], context="fold-3")
        assert math.isnan(m["auroc"]) and math.isnan(m["specificity"])
        assert m["acc"] == pytest.approx(2 / 3) and m["sensitivity"] == pytest.approx(2 / 3)
        m3 = metrics.classification_metrics([0, 0, 1], np.eye(3)[[0, 1, 1]] * 2)
        assert math.isnan(m3["auroc"]) and m3["acc"] == pytest.approx(2 / 3)
        r = metrics.regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
        assert math.isnan(r["r2"]) and math.isnan(r["pearson_r"]) and r["mae"] == pytest.approx(2 / 3)
    assert "fold-3" in caplog.text and "AUROC" in caplog.text


def test_aggregate_by_subject():
    ids = ["b", "a", "b", "c", "a", "b"]
    logits = [1.0, 2.0, 3.0, -1.0, 4.0, 5.0]
    subjects, mean = metrics.aggregate_by_subject(ids, logits)
    assert subjects == ["b", "a", "c"]
    np.testing.assert_allclose(mean, [3.0, 3.0, -1.0])
    subjects, mean2 = metrics.aggregate_by_subject(ids, np.stack([logits, np.arange(6.0)], axis=1))
    np.testing.assert_allclose(mean2, [[3.0, 7 / 3], [3.0, 2.5], [-1.0, 3.0]])
    assert metrics.subject_labels(ids, [1, 0, 1, 1, 0, 1]) == (["b", "a", "c"], [1, 0, 1])
    with pytest.raises(UsageError, match="labels are per participant"):
        metrics.subject_labels(["a", "a"], [0, 1])


def test_summarise_folds_mean_sd_and_nan():
    rows, summary = metrics.summarise_folds([
        {"acc": 0.6, "auroc": 0.7, "confusion_matrix": [[1, 0], [0, 1]]},
        {"acc": 0.8, "auroc": float("nan")},
        {"acc": 0.7, "auroc": 0.9},
    ])
    assert list(rows["fold"]) == ["fold-0", "fold-1", "fold-2"]
    assert "confusion_matrix" not in rows.columns
    assert summary["acc"]["mean"] == pytest.approx(0.7) and summary["acc"]["sd"] == pytest.approx(0.1)
    assert summary["auroc"] == {"mean": pytest.approx(0.8), "sd": pytest.approx(np.std([0.7, 0.9], ddof=1)), "n": 2}


def test_fold_result_refuses_non_test_subjects(cohort):
    subjects, labels, _ = cohort
    split = holdout_split(subjects, labels, 0.2, 0.1, seed=0)
    with pytest.raises(SplitError, match="leaks"):
        metrics.make_fold_result("holdout", [split.val[0]], [0], [0.1], "binary", split=split)


# --------------------------------------------------------------------------- reports


def _binary_results(cohort, k=3, seed=0):
    subjects, labels, _ = cohort
    lab = _label_of(subjects, labels)
    rng = np.random.default_rng(seed)
    out = []
    for split in kfold_splits(subjects, labels, k=k, seed=seed):
        y = np.array([lab[s] for s in split.test])
        logit = rng.normal(size=len(y)) + 1.5 * (y - 0.5)
        out.append(metrics.make_fold_result(split.name, split.test, y, logit, "binary",
                                            class_names=["Control", "ADHD"], split=split, model="toy"))
    return out


def _read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_write_evaluation_binary(cohort, tmp_path):
    results = _binary_results(cohort)
    results[1].metrics["auroc"] = float("nan")  # an undefined fold must survive the writers
    paths = report.write_evaluation(tmp_path, "desc-toy", results, "binary", ["Control", "ADHD"])
    assert [p.name for p in paths] == ["desc-toy_metrics.tsv", "desc-toy_metrics.json", "desc-toy_report.html"]
    assert all(p.is_file() for p in paths)
    rows = _read_tsv(paths[0])
    assert [r["fold"] for r in rows] == ["fold-0", "fold-1", "fold-2", "mean", "sd"]
    accs = [r.metrics["acc"] for r in results]
    assert float(rows[0]["acc"]) == pytest.approx(accs[0], abs=1e-5)
    assert float(rows[3]["acc"]) == pytest.approx(np.mean(accs), abs=1e-5)
    assert float(rows[4]["acc"]) == pytest.approx(np.std(accs, ddof=1), abs=1e-5)
    assert rows[1]["auroc"] == "n/a" and int(rows[0]["n_test"]) == len(results[0].subjects)
    data = json.loads(paths[1].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["summary"]["acc"]["mean"] == pytest.approx(np.mean(accs))
    assert data["summary"]["auroc"]["n"] == 2
    assert len(data["splits"]) == 3 and data["pooled"]["n"] == 120
    assert data["folds"][0]["subjects"] == results[0].subjects
    page = paths[2].read_text()
    assert page.count("<svg") == 2  # ROC + confusion matrices
    assert metrics.format_mean_sd(np.mean(accs), np.std(accs, ddof=1), 2, True) in page
    assert "fold-2" in page and "could not be drawn" not in page


def test_write_evaluation_regression_and_multiclass(tmp_path):
    rng = np.random.default_rng(3)
    reg, mc = [], []
    for i in range(2):
        t = rng.uniform(8, 20, 15)
        reg.append(metrics.make_fold_result(f"fold-{i}", [f"s{i}-{j}" for j in range(15)], t,
                                            t + rng.normal(size=15), "regression"))
        y = np.arange(12) % 3
        mc.append(metrics.make_fold_result(f"fold-{i}", [f"m{i}-{j}" for j in range(12)], y,
                                           rng.normal(size=(12, 3)) + np.eye(3)[y], "multiclass",
                                           class_names=["a", "b", "c"]))
    paths = report.write_evaluation(tmp_path, "age", reg, "regression")
    rows = _read_tsv(paths[0])
    assert float(rows[2]["mae"]) == pytest.approx(np.mean([r.metrics["mae"] for r in reg]), abs=1e-5)
    page = paths[2].read_text()
    assert "Predicted vs true" in page and "<svg" in page
    paths = report.write_evaluation(tmp_path, "group3", mc, "multiclass")
    assert paths[2].read_text().count("<svg") == 2
    with pytest.raises(UsageError, match="task kind"):
        report.write_evaluation(tmp_path, "bad", mc, "binary")


def test_failed_figure_never_fails_writing(cohort, tmp_path, monkeypatch, caplog):
    def boom(*_args, **_kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(html_report, "svg_markup", boom)
    with caplog.at_level(logging.WARNING, logger="bids_regionmae.reports"):
        paths = report.write_evaluation(tmp_path, "x", _binary_results(cohort, k=2), "binary")
        cpaths = report.write_comparison(tmp_path, [{"strategy": "random", "acc_mean": 0.6}])
    assert all(p.is_file() for p in paths + cpaths)
    assert "could not be drawn" in paths[2].read_text() and "no fonts" in caplog.text


def test_write_comparison(cohort, tmp_path):
    _, toy = metrics.summarise_folds(_binary_results(cohort))
    toy_row = report.comparison_row("toy", toy, recon_mse=None)
    assert toy_row["acc_mean"] == pytest.approx(toy["acc"]["mean"]) and toy_row["n_folds"] == 3
    assert math.isnan(toy_row["recon_mse"])
    summary = {"acc": {"mean": 0.6382, "sd": 0.025, "n": 5}, "auroc": {"mean": 0.70, "sd": 0.04, "n": 5}}
    rows = [
        report.comparison_row("random", summary, recon_mse=0.0311, mask_ratio=0.5),
        {"strategy": "cerebellum", "recon_mse": 0.0452, "acc_mean": 0.6805, "acc_sd": 0.021,
         "auroc_mean": 0.741, "auroc_sd": 0.03, "mask_ratio": 0.13},
        {"strategy": "limbic", "recon_mse": 0.0420, "acc_mean": 0.6808, "acc_sd": 0.018,
         "auroc_mean": 0.752, "auroc_sd": 0.02},
    ]
    paths = report.write_comparison(tmp_path, rows)
    assert [p.suffix for p in paths] == [".tsv", ".json", ".html"]
    table = _read_tsv(paths[0])
    assert [r["strategy"] for r in table] == ["random", "cerebellum", "limbic"]
    assert float(table[1]["acc_mean"]) == pytest.approx(0.6805)
    assert table[2]["mask_ratio"] == "n/a" and float(table[0]["recon_mse"]) == pytest.approx(0.0311)
    assert json.loads(paths[1].read_text())["rows"][2]["auroc_mean"] == pytest.approx(0.752)
    page = paths[2].read_text()
    assert "<svg" in page and '<span class="best">68.08% ± 1.80%</span>' in page
    assert '<span class="best">0.752 ± 0.020</span>' in page and '<span class="best">0.0311</span>' in page
    with pytest.raises(UsageError, match="repeat"):
        report.write_comparison(tmp_path, rows + rows[:1])


# --------------------------------------------------------------------------- baseline


def test_region_timeseries_equals_naive_loop(tmp_path, caplog):
    rng = np.random.default_rng(0)
    shape = (7, 5, 6)  # unequal axes catch axis mix-ups
    vl = rng.integers(0, 5, size=shape)
    vl[vl == 3] = 0  # label 3 requested below but absent -> NaN column
    data = rng.normal(size=(11,) + shape).astype(np.float16)
    mm = np.lib.format.open_memmap(tmp_path / "bold.npy", mode="w+", dtype=np.float16, shape=data.shape)
    mm[:] = data
    mm.flush()
    labels = [4, 1, 3, 2]
    with caplog.at_level(logging.WARNING, logger="bids_regionmae.evaluation"):
        got = baseline.region_timeseries(np.load(tmp_path / "bold.npy", mmap_mode="r"), vl, labels, chunk_frames=4)
    naive = np.full((11, 4), np.nan)
    for t in range(11):
        for j, lab in enumerate(labels):
            if (vl == lab).any():
                naive[t, j] = data[t][vl == lab].astype(np.float64).mean()
    np.testing.assert_allclose(got, naive, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert "no voxel" in caplog.text
    default = baseline.region_timeseries(data, vl)
    np.testing.assert_allclose(default, naive[:, [1, 3, 0]], rtol=1e-6, atol=1e-6)
    with pytest.raises(InputDataError, match="voxel_labels has shape"):
        baseline.region_timeseries(data, vl[:, :, :5])


def test_connectivity_features_match_corrcoef():
    rng = np.random.default_rng(2)
    ts = rng.normal(size=(50, 6))
    ts[:, 1] += ts[:, 0]
    feats = baseline.connectivity_features([ts, [ts, ts]])
    iu = np.triu_indices(6, k=1)
    expected = np.arctanh(np.corrcoef(ts.T)[iu])
    np.testing.assert_allclose(feats, np.vstack([expected, expected]), atol=1e-10)
    const = ts.copy()
    const[:, 2] = 1.0
    row = baseline.connectivity_features([const])[0]
    assert np.isnan(row[[1, 5]]).all() and np.isfinite(row[0])  # pairs (0,2) and (1,2) undefined


def _synthetic_cohort(n=80, regions=8, frames=90, seed=0):
    """Label 1 couples regions 0-2 through a shared signal; label 0 leaves them independent."""
    rng = np.random.default_rng(seed)
    subjects = [f"sub-{i:03d}" for i in range(n)]
    labels = np.array([i % 2 for i in range(n)])
    series = []
    for lab in labels:
        x = rng.normal(size=(frames, regions))
        if lab:
            x[:, :3] += 0.8 * rng.normal(size=(frames, 1))
        series.append(x)
    return subjects, labels, series


def test_baseline_above_chance_on_shared_splits():
    subjects, labels, series = _synthetic_cohort()
    folds = kfold_splits(subjects, labels, k=4, val_fraction=0.15, seed=0)
    results = baseline.evaluate_baseline(subjects, series, labels, folds, grid=(0.01, 0.1, 1.0),
                                         class_names=[0, 1])
    assert [r.name for r in results] == [f.name for f in folds]
    for r, f in zip(results, folds, strict=True):
        assert r.subjects == list(f.test) and r.split["val"] == list(f.val)
        assert r.model == "connectivity-logreg" and r.extra["penalty"] in (0.01, 0.1, 1.0)
    _, summary = metrics.summarise_folds(results)
    assert summary["acc"]["mean"] > 0.8 and summary["auroc"]["mean"] > 0.85


def test_baseline_without_val_and_regression():
    subjects, labels, series = _synthetic_cohort(n=48, seed=1)
    split = holdout_split(subjects, labels, test_fraction=0.25, val_fraction=0.0, seed=0)
    assert split.val == ()
    (res,) = baseline.evaluate_baseline(subjects, series, labels, [split], grid=(0.1, 1.0))
    assert res.metrics["acc"] > 0.7

    rng = np.random.default_rng(4)
    strength = rng.uniform(0, 1.2, 48)
    series = []
    for s in strength:
        x = rng.normal(size=(90, 5))
        x[:, :2] += s * rng.normal(size=(90, 1))
        series.append(x)
    split = holdout_split(subjects, strength, 0.25, 0.15, seed=0)
    (reg,) = baseline.evaluate_baseline(subjects, series, strength, [split], grid=(10.0, 1.0))
    assert reg.model == "connectivity-ridge" and reg.metrics["pearson_r"] > 0.6
    with pytest.raises(UsageError, match="no features"):
        baseline.evaluate_features(subjects[:-1], np.zeros((47, 3)), strength[:-1], [split])
