"""Group-level pretraining: data loading, engine pieces, the workflow's outputs, loss and seeds.

CPU only, the ``tiny`` variant (48^3 x 8 frames), a synthetic model-ready
store written directly in the store format (no preprocessing pipeline).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_regionmae.config import RunConfig, build_config, config_to_toml, read_toml
from bids_regionmae.errors import InputMissingError, UsageError
from bids_regionmae.grid import downsample_factors, downsample_labels, downsample_mask, downsample_volume
from bids_regionmae.testing.store import synthetic_labels, write_synthetic_store
from bids_regionmae.train.data import ClipDataset, split_participants
from bids_regionmae.train.engine import (
    ResumableSampler,
    TrainSettings,
    derive_seed,
    make_generator,
    warmup_cosine,
)

MODEL_NAME = "pretrain_region-cerebellum_tiny_seed-0"

#: Files every pretraining model directory holds (tensorboard/ holds one event file per invocation).
GOLDEN_FILES = sorted([
    "checkpoints/last.json",
    "checkpoints/tensors-00000024.safetensors",  # the tensors of last.json; earlier checkpoints' are deleted
    "data_manifest.json",
    "figures/loss_curves.svg",
    "figures/masked_region.png",
    "figures/reconstruction.png",
    "masks/mask_tokens.npy",
    "masks/mask_voxels.nii.gz",
    "masks/masking.json",
    "region_mse.tsv",
    "regionmae_config.toml",
    "report.html",
    "train_log.csv",
    "training_summary.json",
    "val_log.csv",
])


def make_config(bids_dir: Path, output_dir: Path, **train: object) -> RunConfig:
    """A tiny-model, CPU, cerebellum-masking pretraining configuration."""
    train_values = {"epochs": 100, "max_steps": 4, "batch_size": 2, "lr": 2e-3, "warmup_fraction": 0.1,
                    "val_fraction": 0.25, "checkpoint_every": 2, "num_workers": 0}
    train_values.update(train)
    return RunConfig(bids_dir=str(bids_dir), output_dir=str(output_dir), analysis_level="group", stage="pretrain",
                     device="cpu", seed=0, model={"variant": "tiny", "backend": "torch"},
                     masking={"strategy": "region", "regions": ["cerebellum"]}, train=train_values)


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bids_dir, output_dir): 4 participants x 16 frames -> 8 clips of 8 frames for the tiny model."""
    root = tmp_path_factory.mktemp("pretrain")
    bids_dir = root / "fmriprep"
    bids_dir.mkdir()
    output_dir = root / "derivatives"
    write_synthetic_store(output_dir, n_subjects=4, n_frames=16, clip_length=8, seed=0)
    return bids_dir, output_dir


@pytest.fixture(scope="module")
def pretrained(store: tuple[Path, Path]) -> tuple[RunConfig, Path]:
    """One real workflow run: 24 steps (8 epochs) of cerebellum-masked pretraining of the tiny model."""
    from bids_regionmae.workflows.pretrain import run

    bids_dir, output_dir = store
    config = make_config(bids_dir, output_dir, max_steps=24, checkpoint_every=10)
    assert run(config) == 0
    return config, output_dir / "models" / MODEL_NAME


# --------------------------------------------------------------------------- data


def test_store_reads_back_and_clips_have_model_shape(store):
    from bids_regionmae.preprocess.store import find_model_ready_runs

    _, output_dir = store
    runs = find_model_ready_runs(output_dir)
    assert [r.subject for r in runs] == ["01", "02", "03", "04"]
    dataset = ClipDataset(runs, (48, 48, 48, 8))
    assert len(dataset) == 8 and dataset.factors == (2, 2, 2)
    item = dataset[3]
    assert item["clip"].shape == (1, 48, 48, 48, 8) and item["clip"].dtype == torch.float32
    assert item["brain_mask"].shape == (48, 48, 48) and item["brain_mask"].dtype == torch.bool
    assert (item["subject"], item["clip_index"]) == ("02", 1)
    # average pooling of the stored float16 frames, time last
    raw = torch.from_numpy(np.array(runs[1].data[8:16])).float()
    expected = raw.reshape(8, 48, 2, 48, 2, 48, 2).mean((2, 4, 6)).permute(1, 2, 3, 0)
    torch.testing.assert_close(item["clip"][0], expected)
    # model clips longer than the stored clip table: runs are re-tiled
    assert len(ClipDataset(runs, (48, 48, 48, 16))) == 4


def test_dataset_survives_pickling_for_workers(store):
    import pickle

    from bids_regionmae.preprocess.store import find_model_ready_runs

    dataset = ClipDataset(find_model_ready_runs(store[1]), (48, 48, 48, 8))
    first = dataset[0]["clip"]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._masks == {} and all(r._data is None for r in clone.runs)
    torch.testing.assert_close(clone[0]["clip"], first)


def test_downsampling_labels_mask_and_factors():
    labels = torch.zeros(4, 4, 2, dtype=torch.long)
    labels[:2, :2, :] = 7  # one whole block
    labels[2, 2, 0] = 5  # 1 voxel of 8 in the last block: background wins
    labels[:2, 2:, 0] = 3
    labels[:2, 2:, 1] = 4  # a 4/4 tie between two labels: the first voxel's label (3)
    out = downsample_labels(labels, (2, 2, 2))
    assert out.tolist() == [[[7], [3]], [[0], [0]]]
    tie = torch.zeros(2, 2, 2, dtype=torch.long)
    tie[0] = 9  # 4 voxels brain / 4 background: the brain label wins
    assert downsample_labels(tie, (2, 2, 2)).item() == 9
    mask = np.zeros((4, 2, 2), bool)
    mask[:2] = True
    mask[2, 0, 0] = True
    assert downsample_mask(mask, (2, 2, 2)).flatten().tolist() == [True, False]
    x = torch.arange(8.0).reshape(2, 2, 2)
    assert downsample_volume(x, (2, 2, 2)).item() == pytest.approx(3.5)
    assert downsample_factors((96, 96, 96), (48, 48, 24)) == (2, 2, 4)
    with pytest.raises(UsageError, match="not an integer downsampling factor"):
        downsample_factors((96, 96, 96), (40, 48, 48))
    # synthetic atlas zones survive the tiny model's grid
    small = downsample_labels(synthetic_labels(), (2, 2, 2))
    assert {95, 96, 1, 2}.issubset(set(torch.unique(small).tolist()))


def test_participant_split_is_seeded_and_disjoint():
    subjects = [f"{i:02d}" for i in range(10)]
    train, val = split_participants(subjects + subjects[:3], 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert split_participants(subjects, 0.2, seed=0) == (train, val)
    assert any(split_participants(subjects, 0.2, seed=s)[1] != val for s in range(1, 5))
    assert split_participants(["a", "b"], 0.01, 0)[1] != []  # at least one validation participant
    assert split_participants(["a"], 0.5, 0) == (["a"], [])
    assert split_participants(subjects, 0.0, 0) == (sorted(subjects), [])


# --------------------------------------------------------------------------- engine pieces


def test_sampler_shards_reproduce_a_bigger_batch():
    single = list(ResumableSampler(10, 1, 0, seed=3))
    ranks = [list(ResumableSampler(10, 2, r, seed=3)) for r in range(2)]
    # batch 2 on two ranks == batch 4 on one, rank r taking rows r::2
    for step in range(2):
        batch = single[4 * step: 4 * step + 4]
        assert batch[0::2] == ranks[0][2 * step: 2 * step + 2]
        assert batch[1::2] == ranks[1][2 * step: 2 * step + 2]
    sampler = ResumableSampler(10, 1, 0, seed=3)
    sampler.set_epoch(1, skip=4)
    full = ResumableSampler(10, 1, 0, seed=3)
    full.set_epoch(1)
    assert list(sampler) == list(full)[4:] and len(sampler) == 6
    assert list(full) != single
    assert sorted(list(ResumableSampler(5, 2, 0, shuffle=False, drop_tail=False))
                  + list(ResumableSampler(5, 2, 1, shuffle=False, drop_tail=False))) == list(range(5))


def test_seeds_and_schedule():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 1, 3) != derive_seed(1, 1, 2)
    a = torch.rand(4, generator=make_generator(5, 1, 7))
    assert torch.equal(a, torch.rand(4, generator=make_generator(5, 1, 7)))
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and 0 < f(99) < 0.01
    assert TrainSettings.from_config(make_config(Path("."), Path(".")).train, seed=4).seed == 4


def test_model_dir_names():
    from bids_regionmae.masking import MaskingPlan
    from bids_regionmae.outputs.naming import pretrain_dir_name

    assert pretrain_dir_name(MaskingPlan("region", "cerebellum", (95,)), "tiny", 0) == MODEL_NAME
    assert pretrain_dir_name(MaskingPlan("region", "Cerebellum+Frontal", (1, 95), fraction=0.5), "neurostorm", 2) \
        == "pretrain_region-cerebellum+frontal-frac50_neurostorm_seed-2"
    assert pretrain_dir_name(MaskingPlan("random", ratio=0.75), "tiny", 1) == "pretrain_random-ratio75_tiny_seed-1"
    assert pretrain_dir_name(MaskingPlan("random-region", level="voxel"), "tiny", 0) \
        == "pretrain_randomregion-ratio50-voxel_tiny_seed-0"


# --------------------------------------------------------------------------- the workflow


def test_no_model_ready_data_asks_for_participant_level(tmp_path):
    from bids_regionmae.workflows.pretrain import run

    (tmp_path / "bids").mkdir()
    with pytest.raises(InputMissingError, match="participant level first") as info:
        run(make_config(tmp_path / "bids", tmp_path / "out"))
    assert info.value.exit_code == 66


def test_loss_falls(pretrained):
    _, model_dir = pretrained
    losses = [row["loss"] for row in read_log(model_dir / "train_log.csv")]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-6:]) < 0.75 * np.mean(losses[:3]), losses
    val = read_log(model_dir / "val_log.csv")
    assert len(val) == 8  # 3 steps per epoch: one evaluation per epoch
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert math.isfinite(val[-1]["mse_cerebellum"])


def test_model_directory_outputs(pretrained):
    config, model_dir = pretrained
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                   if p.is_file() and "tensorboard" not in p.parts)
    weights = [f for f in files if f.startswith("model")]
    assert weights, files
    assert [f for f in files if f not in weights] == GOLDEN_FILES
    assert list((model_dir / "tensorboard").glob("events.out.tfevents.*"))

    report = (model_dir / "report.html").read_text(encoding="utf-8")
    for text in ("Training curves", "Masked region", "Reconstruction example", "per lobe", "cerebellum",
                 "figures/loss_curves.svg", "figures/reconstruction.png"):
        assert text in report

    manifest = json.loads((model_dir / "data_manifest.json").read_text())
    train, val = manifest["participants"]["train"], manifest["participants"]["validation"]
    assert len(train) == 3 and len(val) == 1 and not set(train) & set(val)
    assert {r["split"] for r in manifest["runs"]} == {"train", "validation"}
    assert all(len(r["sidecar_sha256"]) == 64 and r["sources"]["bold"]["sha256"] for r in manifest["runs"])
    assert manifest["n_clips"] == {"train": 6, "validation": 2}

    masking = json.loads((model_dir / "masks" / "masking.json").read_text())
    assert masking["strategy"] == "region" and masking["labels"] == list(range(95, 121))
    assert masking["seed"] == 0 and masking["token_grid"] == [8, 8, 8, 8]
    tokens = np.load(model_dir / "masks" / "mask_tokens.npy")
    assert tokens.shape == (8, 8, 8) and tokens.sum() == masking["n_region_patches"] > 0
    import nibabel as nib

    voxels = nib.load(str(model_dir / "masks" / "mask_voxels.nii.gz"))
    assert voxels.shape == (96, 96, 96) and int(np.asarray(voxels.dataobj).sum()) == tokens.sum() * 12**3

    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 1 and summary["precision"] == "fp32"
    assert summary["backend"] == "torch" and summary["clips_per_s_median"] > 0

    # the written configuration repeats the run
    written = read_toml(model_dir / "regionmae_config.toml")
    again = build_config(written)
    assert again.model_dump() == config.model_dump()
    assert "environment" in (model_dir / "regionmae_config.toml").read_text()

    table = (model_dir / "region_mse.tsv").read_text().splitlines()
    assert table[0] == "level\tindex\tname\tmse\tn_clips" and any(r.startswith("lobe\tn/a\tcerebellum") for r in table)


def test_rerun_after_completion_keeps_the_model(pretrained):
    from bids_regionmae.workflows.pretrain import run

    config, model_dir = pretrained
    before = read_log(model_dir / "train_log.csv")
    assert run(config) == 0  # resumes from the final checkpoint: nothing left to train
    assert read_log(model_dir / "train_log.csv") == before
    changed = config.model_copy(update={"train": config.train.model_copy(update={"lr": 1e-3})})
    with pytest.raises(UsageError, match="other settings"):
        run(changed)


def test_same_seed_same_run_other_seed_differs(store):
    """Two runs with one seed give identical losses and weights (with and without loader workers);
    another seed differs."""
    from bids_regionmae.masking import build_masker
    from bids_regionmae.models.registry import create_mae, get_spec
    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.train.pretrain import MaskingSetup, pretrain

    spec = get_spec("tiny")
    runs = find_model_ready_runs(store[1])
    dataset = ClipDataset(runs, spec.img_size)
    labels = downsample_labels(synthetic_labels(), (2, 2, 2))

    def train(seed: int, out: Path, workers: int = 0) -> tuple[list[float], dict[str, torch.Tensor]]:
        masker = build_masker("random", labels, spec.patch_size, ratio=0.5, T=spec.img_size[3])
        setup = MaskingSetup(masker=masker, patch_size=spec.patch_size)
        torch.manual_seed(seed)
        model = create_mae(spec, backend="torch")
        settings = TrainSettings(epochs=1, max_steps=1, batch_size=2, lr=1e-3, seed=seed, progress=False,
                                 num_workers=workers)
        trainer, result = pretrain(model, dataset, None, setup, settings=settings, out_dir=out, voxel_labels=labels,
                                   groups={"cerebellum": (95, 96)})
        return [r["loss"] for r in result.history], trainer.model.state_dict()

    base = Path(store[1]).parent
    losses_a, weights_a = train(0, base / "seed_a")
    losses_b, weights_b = train(0, base / "seed_b", workers=1)
    losses_c, _ = train(1, base / "seed_c")
    assert losses_a == losses_b
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key]), key
    assert losses_c != losses_a


def test_config_toml_round_trip_for_subprocesses(store, tmp_path):
    """The TOML the DDP/kill tests hand to the CLI reproduces the in-process configuration."""
    config = make_config(*store)
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(config))
    assert build_config({}, path).train == config.train
