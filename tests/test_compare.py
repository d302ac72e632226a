"""``group --stage compare``: pretrain + fine-tune per masking strategy, one table, resumable.

A tiny end-to-end configuration: 8 synthetic participants (8 frames: two
4-frame clips each), a 24^3 x 4 test variant, two strategies (random tube
masking and cerebellum region masking), 2 optimizer steps per training and
2-fold cross-validation. Only the plumbing is checked (rows, columns, shared
splits, resume), not the science.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from bids_regionmae.config import RunConfig
from bids_regionmae.models.spec import ModelSpec
from bids_regionmae.testing.cohort import write_labelled_cohort

VARIANT = "ft-micro"
MICRO = ModelSpec(name=VARIANT, img_size=(24, 24, 24, 4), embed_dim=8, depths=(1, 1), window_size=(2, 2, 2, 4),
                  first_window_size=(2, 2, 2, 4), d_state=4)
PRETRAINED = {"random": "pretrain_random-ratio50_ft-micro_seed-0",
              "cerebellum": "pretrain_region-cerebellum_ft-micro_seed-0"}
COLUMNS = ["strategy", "recon_mse", "acc_mean", "acc_sd", "auroc_mean", "auroc_sd", "balanced_acc_mean",
           "balanced_acc_sd", "n_folds", "common_recon_mse", "masking", "pretrained_dir", "finetuned_dir"]


@pytest.fixture(scope="module", autouse=True)
def micro_variant():
    from bids_regionmae.models.registry import register_variant

    register_variant(MICRO, overwrite=True)
    yield


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory):
    """One compare run over two strategies; returns (config, output_dir)."""
    from bids_regionmae.workflows.compare import run

    cohort = write_labelled_cohort(tmp_path_factory.mktemp("compare"), n_subjects=8, n_frames=8, clip_length=4)
    config = RunConfig(
        bids_dir=str(cohort.bids_dir), output_dir=str(cohort.output_dir), analysis_level="group", stage="compare",
        device="cpu", seed=0, model={"variant": VARIANT, "backend": "torch"},
        atlas={"atlas_file": str(cohort.atlas_file), "patch_rule": "any"},
        train={"epochs": 1, "max_steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_fraction": 0.0,
               "val_fraction": 0.25, "checkpoint_every": 100, "num_workers": 0},
        finetune={"target": "diagnosis", "mode": "linear-probe", "folds": 2, "patience": 2, "lr": 1e-2,
                  "strategies": "random,cerebellum"})
    assert run(config) == 0
    return config, cohort.output_dir


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_compare_writes_the_table_with_every_strategy_and_reference_row(compared):
    _, output_dir = compared
    folder = output_dir / "group" / "compare_diagnosis"
    for name in ("masking_comparison.tsv", "masking_comparison.json", "masking_comparison.html", "splits.json",
                 "baseline_folds.json", "common_mse.json", "regionmae_config.toml"):
        assert (folder / name).is_file(), name
    with open(folder / "masking_comparison.tsv", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    assert header == COLUMNS
    rows = {r["strategy"]: r for r in read_tsv(folder / "masking_comparison.tsv")}
    assert list(rows) == ["random", "cerebellum", "no-pretraining", "connectivity-baseline"]
    for strategy, pretrained in PRETRAINED.items():
        row = rows[strategy]
        assert row["pretrained_dir"] == pretrained
        assert row["finetuned_dir"] == f"finetune_diagnosis_from-{pretrained}"
        assert math.isfinite(float(row["recon_mse"])) and float(row["recon_mse"]) > 0
        assert math.isfinite(float(row["common_recon_mse"])) and float(row["common_recon_mse"]) > 0
        assert 0 <= float(row["acc_mean"]) <= 1 and row["n_folds"] == "2"
        assert (output_dir / "models" / pretrained / "model.safetensors").is_file()
        assert (output_dir / "models" / row["finetuned_dir"] / "model.safetensors").is_file()
    assert rows["random"]["masking"] == "random" and rows["cerebellum"]["masking"] == "region"
    # random masking's own validation MSE is the common MSE (same masker, same clips, same per-clip masks)
    assert float(rows["random"]["common_recon_mse"]) == pytest.approx(float(rows["random"]["recon_mse"]), rel=1e-4)
    assert rows["no-pretraining"]["finetuned_dir"] == "finetune_diagnosis_from-scratch"
    assert rows["no-pretraining"]["recon_mse"] == "n/a" and rows["connectivity-baseline"]["recon_mse"] == "n/a"
    assert 0 <= float(rows["connectivity-baseline"]["acc_mean"]) <= 1
    assert "<svg" in (folder / "masking_comparison.html").read_text(encoding="utf-8")
    # the common MSE uses the same clips and masks for every strategy
    common = json.loads((folder / "common_mse.json").read_text(encoding="utf-8"))
    assert common[PRETRAINED["random"]]["participants"] == common[PRETRAINED["cerebellum"]]["participants"]
    assert common[PRETRAINED["random"]]["n_clips"] == common[PRETRAINED["cerebellum"]]["n_clips"] > 0


def test_every_strategy_is_fine_tuned_on_the_same_splits(compared):
    _, output_dir = compared
    shared = json.loads((output_dir / "group" / "compare_diagnosis" / "splits.json").read_text())["splits"]
    assert [s["name"] for s in shared] == ["fold-0", "fold-1"]
    names = [f"finetune_diagnosis_from-{p}" for p in PRETRAINED.values()] + ["finetune_diagnosis_from-scratch"]
    for name in names:
        model_dir = output_dir / "models" / name
        assert json.loads((model_dir / "splits.json").read_text())["splits"] == shared
        folds = json.loads((model_dir / "finetune_metrics.json").read_text())["folds"]
        for fold, split in zip(folds, shared, strict=True):
            assert sorted(fold["subjects"]) == sorted(split["test"])
    from bids_regionmae.models.model_dir import ModelDir

    opened = {n: ModelDir.open(output_dir / "models" / n) for n in names}
    assert {m.meta.provenance.seed for m in opened.values()} == {0}
    for strategy, pretrained in PRETRAINED.items():
        tuned = opened[f"finetune_diagnosis_from-{pretrained}"]
        parent = tuned.meta.provenance.parent
        source = ModelDir.open(output_dir / "models" / pretrained)
        assert parent.path == str(source.path.resolve()) and parent.name == pretrained
        assert parent.stage == "pretrain" and parent.sha256 == source.weights_sha256
        assert tuned.parent.path == source.path.resolve() and tuned.masking == source.masking
        assert source.masking.strategy == ("random" if strategy == "random" else "region")
    assert opened["finetune_diagnosis_from-scratch"].meta.provenance.parent is None
    # linear probe: the deliverable's encoder is the pretrained encoder, unchanged
    mae = ModelDir.open(output_dir / "models" / PRETRAINED["cerebellum"]).load_mae()
    tuned = opened[f"finetune_diagnosis_from-{PRETRAINED['cerebellum']}"].load()
    for key, value in mae.encoder.state_dict().items():
        assert torch.equal(value, tuned.encoder.state_dict()[key]), key


def test_compare_rerun_skips_finished_strategies(compared):
    from bids_regionmae.workflows.compare import run

    config, output_dir = compared
    watched = [output_dir / "models" / p / "model.safetensors" for p in PRETRAINED.values()]
    watched += [output_dir / "models" / f"finetune_diagnosis_from-{p}" / "model.safetensors"
                for p in PRETRAINED.values()]
    stamps = [p.stat().st_mtime_ns for p in watched]
    table = (output_dir / "group" / "compare_diagnosis" / "masking_comparison.tsv").read_text(encoding="utf-8")
    assert run(config) == 0
    assert [p.stat().st_mtime_ns for p in watched] == stamps
    assert (output_dir / "group" / "compare_diagnosis" / "masking_comparison.tsv").read_text(
        encoding="utf-8") == table


def test_unknown_region_fails_before_any_training(compared, tmp_path):
    from bids_regionmae.errors import UsageError
    from bids_regionmae.workflows.compare import run

    config, output_dir = compared
    bad = config.model_copy(update={"finetune": config.finetune.model_copy(update={"strategies": ("random",
                                                                                                   "cerebelum")})})
    before = sorted(p.name for p in (output_dir / "models").iterdir())
    with pytest.raises(UsageError, match="cerebelum"):
        run(bad)
    assert sorted(p.name for p in (output_dir / "models").iterdir()) == before


def test_strategies_are_entries_of_the_mask_strategy_vocabulary():
    from bids_regionmae.config import MaskingConfig
    from bids_regionmae.workflows.compare import entry_masking

    masking = MaskingConfig(regions=("limbic",), mask_ratio=0.3)
    assert entry_masking(masking, "random") == masking.model_copy(update={"strategy": "random"})
    assert entry_masking(masking, "random-region").strategy == "random-region"
    region = entry_masking(masking, "region")  # the name of a strategy keeps --regions
    assert (region.strategy, region.regions) == ("region", ("limbic",))
    selection = entry_masking(masking, "cerebellum+frontal")  # anything else is a region selection
    assert (selection.strategy, selection.regions, selection.mask_ratio) == ("region", ("cerebellum+frontal",), 0.3)
