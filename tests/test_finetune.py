"""Group-level fine-tuning: labels, leak-free splits, class weighting, modes, the workflow and its model dir.

CPU only. A tiny test variant (24^3 x 4 frames, one block per stage) is
registered here; the cohort is a synthetic model-ready store of 12
participants (16 frames each: 4 clips of 4 frames) written directly in the
store format, with a label-dependent signal planted in the synthetic
cerebellum of the ``ADHD`` participants (:mod:`bids_regionmae.testing.cohort`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_regionmae.config import RunConfig
from bids_regionmae.evaluation.splits import Split, SplitError
from bids_regionmae.finetune.task import LossSpec, Task, class_balance
from bids_regionmae.models.spec import ModelSpec
from bids_regionmae.testing.cohort import write_labelled_cohort
from bids_regionmae.train.engine import TrainSettings

VARIANT = "ft-micro"
MICRO = ModelSpec(name=VARIANT, img_size=(24, 24, 24, 4), embed_dim=8, depths=(1, 1), window_size=(2, 2, 2, 4),
                  first_window_size=(2, 2, 2, 4), d_state=4)
FT_NAME = "finetune_diagnosis_from-scratch"

#: Files of a fine-tuned model directory (3 folds; model.* and tensorboard/ checked separately).
GOLDEN_FILES = sorted([
    "baseline_folds.json", "baseline_metrics.json", "baseline_metrics.tsv", "baseline_report.html",
    "figures/training_curves.svg", "final/train_log.csv", "final/val_log.csv", "finetune_fingerprint.json",
    "finetune_metrics.json", "finetune_metrics.tsv", "finetune_report.html", "finetune_summary.json",
    *[f"folds/fold-{i}/{name}" for i in range(3) for name in ("fold_result.json", "train_log.csv", "val_log.csv")],
    "labels.tsv", "model_vs_baseline.html", "model_vs_baseline.json", "model_vs_baseline.tsv", "predictions.tsv",
    "regionmae_config.toml", "report.html", "splits.json",
])


@pytest.fixture(scope="module", autouse=True)
def micro_variant():
    from bids_regionmae.models.registry import register_variant

    register_variant(MICRO, overwrite=True)
    yield


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return write_labelled_cohort(tmp_path_factory.mktemp("ftcohort"), n_subjects=12, n_frames=16, clip_length=4,
                                 amplitude=3.0, offset=2.0)


def fresh_output(cohort, path: Path) -> Path:
    """A new output_dir whose model-ready runs are the cohort's (symlinked participant folders)."""
    path.mkdir(parents=True)
    for sub in sorted(cohort.output_dir.glob("sub-*")):
        (path / sub.name).symlink_to(sub, target_is_directory=True)
    return path


def make_config(cohort, output_dir: Path, *, finetune: dict | None = None, **train: object) -> RunConfig:
    train_values = {"epochs": 15, "batch_size": 8, "lr": 0.1, "warmup_fraction": 0.0, "weight_decay": 0.0,
                    "val_fraction": 0.25, "checkpoint_every": 50, "num_workers": 0}
    train_values.update(train)
    finetune_values = {"target": "diagnosis", "mode": "linear-probe", "folds": 3, "patience": 5,
                       "lr": train_values.pop("lr")}
    finetune_values.update(finetune or {})
    return RunConfig(bids_dir=str(cohort.bids_dir), output_dir=str(output_dir), analysis_level="group",
                     stage="finetune", device="cpu", seed=0, model={"variant": VARIANT, "backend": "torch"},
                     atlas={"atlas_file": str(cohort.atlas_file)}, train=train_values, finetune=finetune_values)


@pytest.fixture(scope="module")
def finetuned(cohort, tmp_path_factory: pytest.TempPathFactory):
    """One real workflow run: linear probe from a random encoder, 3-fold CV + baseline + final refit."""
    from bids_regionmae.workflows.finetune import run

    out = fresh_output(cohort, tmp_path_factory.mktemp("ft") / "out")
    config = make_config(cohort, out)
    assert run(config) == 0
    return config, out / "models" / FT_NAME


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# --------------------------------------------------------------------------- labels, splits, weights


def test_cohort_labels_and_splits_are_leak_free(cohort, tmp_path):
    from bids_regionmae.finetune.cohort import final_split
    from bids_regionmae.workflows.finetune import evaluation_splits, load_cohort
    from bids_regionmae.workflows.session import open_session

    out = fresh_output(cohort, tmp_path / "out")
    config = make_config(cohort, out)
    with open_session(config) as session:
        data = load_cohort(session)
        splits = evaluation_splits(session, data)
        assert evaluation_splits(session, data) == splits  # seeded
    assert data.subjects == sorted(cohort.labels) and data.task.kind == "binary"
    assert data.task.class_names == ("Control", "ADHD")  # the control group is the negative class
    assert all(data.targets[s] == (1.0 if cohort.labels[s] == "ADHD" else 0.0) for s in data.subjects)
    assert [s.name for s in splits] == ["fold-0", "fold-1", "fold-2"]
    tested = []
    for split in splits:
        split.assert_disjoint()
        assert split.val and not set(split.val) & set(split.test)  # val is never the test set
        assert sorted(split.subjects) == data.subjects
        assert {data.targets[s] for s in split.test} == {0.0, 1.0}  # stratified
        tested += list(split.test)
    assert sorted(tested) == data.subjects  # every participant tested exactly once
    final = final_split(data, val_fraction=config.train.val_fraction, seed=config.seed)
    assert not final.test and sorted(final.train + final.val) == data.subjects and final.val
    assert not set(final.train) & set(final.val)

    site_config = make_config(cohort, out, finetune={"group_column": "site"})
    with open_session(site_config) as session:
        site_data = load_cohort(session)
        site_splits = evaluation_splits(session, site_data)
    assert [s.name for s in site_splits] == ["site-A", "site-B"]
    for split in site_splits:
        split.assert_disjoint()
        assert set(split.test) == {s for s, site in cohort.sites.items() if site == split.group}
        assert not {cohort.sites[s] for s in split.train + split.val} & {split.group}


def test_missing_target_column_is_a_usage_error(cohort, tmp_path):
    from bids_regionmae.errors import UsageError
    from bids_regionmae.workflows.finetune import load_cohort
    from bids_regionmae.workflows.session import open_session

    out = fresh_output(cohort, tmp_path / "out")
    with open_session(make_config(cohort, out, finetune={"target": "nope"})) as session:
        with pytest.raises(UsageError, match="not found"):
            load_cohort(session)


def test_class_weights_come_from_the_training_participants_only():
    task = Task("binary", "dx", ("control", "adhd"))
    balance = class_balance(task, [0, 0, 0, 0, 0, 0, 1, 1])
    assert balance["pos_weight"] == pytest.approx(3.0) and balance["counts"] == {"control": 6, "adhd": 2}
    logits = torch.tensor([[0.3], [0.3]])
    y = torch.tensor([1.0, 0.0])
    weighted = LossSpec(task, balance).per_sample(logits, y)
    plain = LossSpec(task, balance, weighted=False).per_sample(logits, y)
    assert weighted[0] == pytest.approx(3 * plain[0]) and weighted[1] == pytest.approx(plain[1])
    multi = Task("multiclass", "dx", ("a", "b", "c"))
    weights = class_balance(multi, [0, 0, 0, 0, 1, 1, 2, 2])["class_weights"]
    assert weights == pytest.approx([8 / 12, 8 / 6, 8 / 6])
    regression = class_balance(Task("regression", "age"), [10.0, 20.0, 30.0])
    assert regression["mean"] == pytest.approx(20.0) and regression["sd"] == pytest.approx(math.sqrt(200 / 3))
    with pytest.raises(Exception, match="no member of class"):
        class_balance(task, [0, 0, 0])

    # the Finetuner weights by the split's training participants, whatever the other partitions hold
    from bids_regionmae.finetune.cv import Finetuner
    from bids_regionmae.finetune.data import EmbeddingSet

    targets = {f"{i:02d}": float(i >= 6) for i in range(12)}  # balanced overall
    data = EmbeddingSet(torch.zeros(12, 4), torch.tensor(list(targets.values())), list(targets))
    tuner = Finetuner(data, task, targets, torch.nn.Identity(), mode="linear-probe", settings=TrainSettings(),
                      out_dir="unused")
    train = ["00", "01", "02", "03", "04", "05", "06", "07"]  # 6 negatives, 2 positives
    assert tuner.loss_for(train).balance["pos_weight"] == pytest.approx(3.0)


def test_subject_level_validation_metrics_average_clip_logits():
    from bids_regionmae.finetune.train import subject_metrics

    task = Task("binary", "dx", ("control", "adhd"))
    loss = LossSpec(task, {"pos_weight": 1.0})
    subjects = ["a", "a", "b", "b", "c"]
    outputs = np.array([[2.0], [-1.0], [-3.0], [1.0], [0.5]])
    targets = {"a": 1.0, "b": 0.0, "c": 0.0}
    m = subject_metrics(loss, subjects, outputs, targets)
    means = np.array([0.5, -1.0, 0.5])  # per subject: a, b, c
    y = np.array([1.0, 0.0, 0.0])
    bce = np.mean(np.log1p(np.exp(-means)) * y + np.log1p(np.exp(means)) * (1 - y))
    assert m["val_loss"] == pytest.approx(bce, rel=1e-5)
    assert m["val_acc"] == pytest.approx(2 / 3) and m["val_auroc"] == pytest.approx(0.75)


def test_early_stopping_keeps_the_best_weights_and_its_state_round_trips():
    from bids_regionmae.finetune.train import EarlyStopping

    class FakeTrainer:  # the attributes on_eval reads; a real Trainer is exercised by the workflow tests
        def __init__(self):
            self.model = torch.nn.Linear(2, 1)
            self.step = 0
            self.epoch = 0
            self.extra_state = {}

    trainer = FakeTrainer()
    stopper = EarlyStopping(patience=2)
    stops = []
    for epoch, value in enumerate([1.0, 0.5, 0.7, 0.6, 0.4]):
        trainer.step, trainer.epoch = 10 * (epoch + 1), epoch
        with torch.no_grad():
            trainer.model.weight.fill_(value)
        stops.append(stopper(trainer, {"val_loss": value}))
    assert stops == [False, False, False, True, False]
    assert stopper.best == 0.4 and stopper.best_step == 50
    clone = EarlyStopping(patience=2)
    clone.load(trainer.extra_state["early_stopping"])
    model = torch.nn.Linear(2, 1)
    assert clone.restore(model) and torch.all(model.weight == 0.4)
    nan_monitor = EarlyStopping(monitor="val_auroc", patience=1)
    assert not nan_monitor(trainer, {"val_auroc": math.nan, "val_loss": 0.3})  # falls back on val_loss
    assert nan_monitor.best == 0.3


def test_scored_subjects_outside_the_test_set_are_refused():
    from bids_regionmae.evaluation.metrics import make_fold_result
    from bids_regionmae.finetune.cv import check_scored_subjects

    split = Split("fold-0", train=("01", "02", "03"), val=("04",), test=("05", "06"))
    good = make_fold_result("fold-0", ["05", "06"], [0, 1], [-1.0, 1.0], "binary", split=split)
    check_scored_subjects([good])
    bad = dataclasses.replace(good, subjects=["04", "06"])
    with pytest.raises(SplitError):
        check_scored_subjects([bad])
    with pytest.raises(SplitError):
        make_fold_result("fold-0", ["04", "06"], [0, 1], [-1.0, 1.0], "binary", split=split)


# --------------------------------------------------------------------------- modes


@pytest.fixture(scope="module")
def small_clips(cohort):
    """Clips of participants 01-06 (3 per class), read once for the mode tests (kept in memory)."""
    from bids_regionmae.finetune.data import LabelledClips
    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.train.data import ClipDataset

    subjects = ["01", "02", "03", "04", "05", "06"]
    runs = find_model_ready_runs(cohort.output_dir, subjects=subjects)
    targets = {s: float(cohort.labels[s] == "ADHD") for s in subjects}
    return LabelledClips(ClipDataset(runs, MICRO.img_size), targets)


def _tuner(small_clips, tmp_path: Path, mode: str, **settings: object):
    from bids_regionmae.finetune.cv import Finetuner
    from bids_regionmae.finetune.model import random_encoder

    encoder, _ = random_encoder(VARIANT, backend="torch", seed=0)
    values = {"epochs": 1, "max_steps": 2, "batch_size": 4, "lr": 0.05, "warmup_fraction": 0.0,
              "progress": False, "checkpoint_every": 100}
    values.update(settings)
    task = Task("binary", "diagnosis", ("Control", "ADHD"))
    tuner = Finetuner(small_clips, task, small_clips.targets, encoder, mode=mode, settings=TrainSettings(**values),
                      out_dir=tmp_path / mode, patience=3)
    split = Split("s", train=("01", "02", "03", "04"), val=("05", "06"), test=())
    return tuner, encoder, split


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_linear_probe_leaves_the_encoder_unchanged_and_matches_the_full_forward(small_clips, tmp_path):
    tuner, encoder, split = _tuner(small_clips, tmp_path, "linear-probe", epochs=8, max_steps=None, lr=0.2)
    before = copy.deepcopy(encoder.state_dict())
    outcome = tuner.train_split(split, 0, tmp_path / "lp")
    model = outcome.model
    assert not _changed(before, encoder.state_dict())
    assert len(outcome.fit.result.val_history) >= 2 and outcome.fit.stopper.best_step > 0
    # a rerun finds the finished checkpoint and returns the same best weights, without training
    again = tuner.train_split(split, 0, tmp_path / "lp")
    assert again.fit.result.start_step == outcome.fit.result.history[-1]["step"]
    assert not _changed(model.head.state_dict(), again.model.head.state_dict())
    assert all(not p.requires_grad for p in model.encoder.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    # the cached-embedding path is exactly the model's forward on clips
    clip = tuner.clips[0]["clip"][None]
    with torch.no_grad():
        direct = model.eval()(clip)
        cached = model.head(tuner.embeddings().embeddings[:1])
    torch.testing.assert_close(direct, cached, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["prompt", "full"])
def test_prompt_mode_trains_only_prompts_and_head_full_trains_all(small_clips, tmp_path, mode):
    tuner, encoder, split = _tuner(small_clips, tmp_path, mode)
    before = copy.deepcopy(encoder.state_dict())
    fresh = tuner.build_model(0)
    initial = copy.deepcopy(fresh.state_dict())
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    outcome = tuner.train_split(split, 0, tmp_path / mode)
    assert not _changed(before, encoder.state_dict())  # the starting encoder is copied, never trained
    changed = _changed(initial, outcome.model.state_dict())
    if mode == "prompt":
        assert trainable and all(n.startswith("head.") or "prompt" in n for n in trainable)
        assert any("prompt" in n for n in changed) and any(n.startswith("head.") for n in changed)
        assert all(n.startswith("head.") or "prompt" in n for n in changed)
    else:
        assert any(n.startswith("encoder.") and "prompt" not in n for n in changed)


# --------------------------------------------------------------------------- the workflow


def test_finetune_workflow_writes_the_model_directory(finetuned):
    _, model_dir = finetuned
    files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
                   if p.is_file() and not p.name.startswith("model.") and "tensorboard" not in p.parts)
    assert files == GOLDEN_FILES
    assert any(p.name.startswith("model.") for p in model_dir.iterdir())
    assert not (model_dir / "folds" / "fold-0" / "checkpoints").exists()  # removed once a fold is done

    from bids_regionmae.models.model_dir import ModelDir

    opened = ModelDir.open(model_dir)
    meta, task = opened.meta, opened.task
    model = opened.load()
    assert meta.spec.name == VARIANT and list(meta.spec.img_size) == [24, 24, 24, 4]
    assert meta.stage == "finetune" and meta.input_convention == "regionmae-global"
    assert task.kind == "binary" and task.target == "diagnosis" and task.mode == "linear-probe"
    assert task.class_names == ("Control", "ADHD") and task.positive_class == "ADHD" and task.num_outputs == 1
    record = json.loads((model_dir / "model.json").read_text())["task"]  # how the outputs are read
    assert record["output"] == "logit" and record["decision_threshold"] == 0.0
    assert record["aggregation"] == "mean_clip_logits"
    assert meta.provenance.source == "finetuned-here" and meta.provenance.parent is None and meta.masking is None
    assert sorted(meta.data.train_participants + meta.data.val_participants) == [f"{i:02d}" for i in range(1, 13)]
    assert meta.data.labels_source and meta.weights_sha256 and len(meta.weights_sha256) == 64
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 24, 24, 24, 4)).shape == (2, 1)
    toml = (model_dir / "regionmae_config.toml").read_text(encoding="utf-8")
    assert 'target = "diagnosis"' in toml and 'mode = "linear-probe"' in toml


def test_finetune_scores_only_each_folds_test_set_and_beats_chance(finetuned):
    _, model_dir = finetuned
    payload = json.loads((model_dir / "finetune_metrics.json").read_text(encoding="utf-8"))
    splits = {s["name"]: Split.from_dict(s) for s in json.loads((model_dir / "splits.json").read_text())["splits"]}
    assert len(payload["folds"]) == 3
    for fold in payload["folds"]:
        split = splits[fold["name"]]
        split.assert_disjoint()
        assert sorted(fold["subjects"]) == sorted(split.test)  # exactly that fold's test participants
    predictions = read_tsv(model_dir / "predictions.tsv")
    assert sorted(r["participant_id"] for r in predictions) == [f"sub-{i:02d}" for i in range(1, 13)]
    for row in predictions:
        assert f"{row['participant_id'][4:]}" in splits[row["fold"]].test
        assert row["predicted"] == ("ADHD" if float(row["logit"]) >= 0 else "Control")
    pooled_acc = float(np.mean([r["true"] == r["predicted"] for r in predictions]))
    summary = payload["summary"]
    assert pooled_acc >= 0.8 and summary["acc"]["mean"] >= 0.75
    assert summary["auroc"]["mean"] >= 0.8
    baseline = json.loads((model_dir / "baseline_metrics.json").read_text(encoding="utf-8"))
    assert [f["name"] for f in baseline["folds"]] == ["fold-0", "fold-1", "fold-2"]
    for fold in baseline["folds"]:
        assert sorted(fold["subjects"]) == sorted(splits[fold["name"]].test)  # same splits as the deep model
    assert baseline["pooled"]["acc"] >= 0.7
    table = read_tsv(model_dir / "finetune_metrics.tsv")
    assert [r["fold"] for r in table] == ["fold-0", "fold-1", "fold-2", "mean", "sd"]
    rows = read_tsv(model_dir / "model_vs_baseline.tsv")
    assert [r["strategy"] for r in rows] == [FT_NAME, "connectivity-baseline"]


def test_finetune_rerun_resumes_without_training(finetuned):
    from bids_regionmae.workflows.finetune import run

    config, model_dir = finetuned
    model_file = next(p for p in model_dir.iterdir() if p.name.startswith("model."))
    stamp = model_file.stat().st_mtime_ns
    before = json.loads((model_dir / "finetune_metrics.json").read_text(encoding="utf-8"))["summary"]
    assert run(config) == 0
    assert model_file.stat().st_mtime_ns == stamp
    after = json.loads((model_dir / "finetune_metrics.json").read_text(encoding="utf-8"))["summary"]
    assert after == before
    from bids_regionmae.errors import UsageError

    with pytest.raises(UsageError, match="other settings"):
        run(config.model_copy(update={"finetune": config.finetune.model_copy(update={"mode": "full"})}))
