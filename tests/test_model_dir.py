"""The model directory: typed metadata, one error per way a directory is wrong, and format-1 directories.

Format-1 directories are written here exactly as the code before the typed
sections wrote them (``save_model`` with the stage facts in ``extra``, the
masking record in ``masks/masking.json``, the data manifest next to it), so
the migration is tested against the real old layout.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
import torch

from bids_regionmae.atlas.regions import LOBE_GROUPS
from bids_regionmae.errors import EXIT_INPUT_MISSING, EXIT_USAGE
from bids_regionmae.masking import MaskingPlan
from bids_regionmae.models.heads import FinetuneModel
from bids_regionmae.models.model_dir import ModelDir
from bids_regionmae.models.model_record import (
    DataRecord,
    ModelDirCorruptError,
    ModelDirMissingError,
    ModelDirTooNewError,
    ModelDirTooOldError,
    NotAModelDirError,
    Provenance,
    TaskHead,
    WrongModelKindError,
)
from bids_regionmae.models.registry import create_mae, get_spec

SPEC = get_spec("tiny", img_size=(24, 24, 24, 4), depths=(1, 1), embed_dim=8, window_size=(2, 2, 2, 4),
                first_window_size=(2, 2, 2, 4), d_state=4)
CEREBELLUM = list(LOBE_GROUPS["cerebellum"])


def micro_mae(seed: int = 0):
    torch.manual_seed(seed)
    return create_mae(SPEC, backend="torch")


# --------------------------------------------------------------------------- format 1, as it was written


def write_v1(directory: Path, model: torch.nn.Module, extra: dict) -> None:
    """``model.safetensors`` + ``model.json`` exactly as format 1's ``save_model`` wrote them."""
    import safetensors
    from safetensors.torch import save_file

    from bids_regionmae.atomic import sha256_file
    from bids_regionmae.models.checkpoint import describe_model

    kind, config = describe_model(model)
    meta = {"format": "bids_regionmae.model", "format_version": 1, "kind": kind, "model_config": config,
            "spec": model.spec.to_dict(), "num_parameters": sum(p.numel() for p in model.parameters()),
            "versions": {"bids_regionmae": "0.1.0", "torch": torch.__version__,
                         "safetensors": safetensors.__version__, "python": "3.11"},
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "extra": extra}
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"),
              metadata={"format": "bids_regionmae.model", "meta": json.dumps(meta)})
    meta["weights"] = {"file": "model.safetensors", "sha256": sha256_file(directory / "model.safetensors")}
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def write_v1_pretrain(directory: Path) -> torch.nn.Module:
    """A format-1 pretraining directory (cerebellum masking) with its masking record and data manifest."""
    mae = micro_mae()
    masker = {"strategy": "region", "patch_size": [6, 6, 6, 1], "token_grid": [4, 4, 4, 4], "rule": "any",
              "ratio": None, "fraction": 1.0, "candidates": None, "labels": CEREBELLUM, "empty_labels": [],
              "n_region_patches": 5, "n_candidate_patches": 5, "n_brain_patches": 40, "n_masked_patches": 5,
              "masked_patch_ratio": 1.0, "brain_mask": True}
    write_v1(directory, mae, {"stage": "pretrain", "model_dir_name": directory.name, "masking": masker, "seed": 3,
                              "steps": 24})
    (directory / "masks").mkdir()
    (directory / "masks" / "masking.json").write_text(json.dumps({
        **masker, "seed": 3, "region": "cerebellum", "level": "token", "include_background": False,
        "norm_patch_loss": False, "model_grid": [24, 24, 24], "downsampling": [4, 4, 4]}))
    (directory / "data_manifest.json").write_text(json.dumps({
        "participants": {"train": ["01", "02", "03"], "validation": ["04"]}, "runs": []}))
    return mae


def write_v1_finetune(directory: Path, pretrained: Path | None) -> torch.nn.Module:
    """A format-1 fine-tuned directory with the metadata fine-tuning wrote into ``extra``."""
    model = FinetuneModel(copy.deepcopy(micro_mae().encoder), "classification", 2, mode="linear-probe")
    write_v1(directory, model, {
        "stage": "finetune", "task_kind": "binary", "target": "diagnosis", "class_names": ["Control", "ADHD"],
        "positive_class": "ADHD", "num_outputs": 1, "output": "logit", "decision_threshold": 0.0,
        "aggregation": "mean_clip_logits", "target_mean": None, "target_sd": None, "mode": "linear-probe",
        "pretrained_dir": str(pretrained.resolve()) if pretrained else None,
        "pretrained_name": pretrained.name if pretrained else "scratch",
        "pretrained_stage": "pretrain" if pretrained else None, "variant": SPEC.name,
        "img_size": list(SPEC.img_size), "clip_length": 4, "seed": 3, "train_participants": ["01", "02"],
        "val_participants": ["03"], "class_counts": {"Control": 1, "ADHD": 1},
        "cv": {"scheme": "kfold", "n_splits": 2}, "labels_source": "/data/participants.tsv"})
    return model


def test_format_1_pretraining_directory_opens_through_the_migration(tmp_path):
    directory = tmp_path / "models" / "pretrain_region-cerebellum_tiny_seed-3"
    mae = write_v1_pretrain(directory)
    opened = ModelDir.open(directory)
    meta = opened.meta
    assert meta.format_version == 1 and meta.stage == "pretrain" and meta.kind == "mae"
    assert meta.input_convention == "regionmae-global" and meta.spec == SPEC
    assert meta.masking == MaskingPlan("region", "cerebellum", tuple(CEREBELLUM), rule="any")
    assert meta.provenance == Provenance("pretrained-here", seed=3, steps=24)
    assert meta.data.train_participants == ("01", "02", "03") and meta.data.val_participants == ("04",)
    loaded = opened.load_mae()
    for key, value in mae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_format_1_fine_tuned_directory_opens_and_finds_its_parent(tmp_path):
    from bids_regionmae.predict.models import load_prediction_model

    pretrain = tmp_path / "out" / "models" / "pretrain_region-cerebellum_tiny_seed-3"
    write_v1_pretrain(pretrain)
    tuned = tmp_path / "out" / "models" / "finetune_diagnosis_from-pretrain_region-cerebellum_tiny_seed-3"
    write_v1_finetune(tuned, pretrain)
    opened = ModelDir.open(tuned)
    assert opened.meta.format_version == 1 and opened.stage == "finetune"
    assert opened.task == TaskHead("binary", "diagnosis", ("Control", "ADHD"), mode="linear-probe")
    assert opened.meta.provenance.parent.name == pretrain.name
    assert opened.parent.path == pretrain.resolve() and opened.masking.region == "cerebellum"
    assert opened.meta.data.labels_source == "/data/participants.tsv"
    model = load_prediction_model(opened, backend="torch")
    assert model.kind == "finetuned" and model.mae is not None and model.class_names == ["Control", "ADHD"]
    assert model.patch_rule == "any" and model.example_group == "cerebellum"

    moved = tmp_path / "moved"  # an output folder moved elsewhere: the parent is found next to the child
    shutil.move(str(tmp_path / "out"), str(moved))
    again = ModelDir.open(moved / "models" / tuned.name)
    assert again.parent is not None and again.parent.path == moved / "models" / pretrain.name


def test_format_1_directory_without_a_stage_is_too_old(tmp_path):
    write_v1(tmp_path / "old", micro_mae(), {"note": "saved with save_model only"})
    with pytest.raises(ModelDirTooOldError, match="older version of bids_regionmae") as info:
        ModelDir.open(tmp_path / "old")
    assert "Re-run group level" in str(info.value)
    write_v1(tmp_path / "tuned", micro_mae(), {"stage": "finetune"})
    with pytest.raises(ModelDirTooOldError, match="without its task record"):
        ModelDir.open(tmp_path / "tuned")


# --------------------------------------------------------------------------- the current format


def test_save_and_open_round_trip(tmp_path):
    plan = MaskingPlan("region", "cerebellum", tuple(CEREBELLUM), fraction=0.5, level="voxel")
    saved = ModelDir.save(tmp_path / "pre", micro_mae(), stage="pretrain", masking=plan,
                          provenance=Provenance("pretrained-here", seed=1, steps=7),
                          data=DataRecord(("01",), ("02",)), manifest={"participants": {"train": ["01"]}},
                          extra={"masker": {"n_region_patches": 3}})
    opened = ModelDir.open(tmp_path / "pre")
    assert opened.meta == saved.meta and opened.meta.format_version == 2 and opened.masking == plan
    assert opened.meta.data.manifest == "data_manifest.json" and opened.layout.manifest.is_file()
    assert opened.meta.extra == {"masker": {"n_region_patches": 3}}
    assert len(opened.weights_sha256) == 64 and ModelDir.is_saved(tmp_path / "pre")
    tuned = FinetuneModel(copy.deepcopy(opened.load_mae().encoder), "regression", 1, mode="full")
    ModelDir.save(tmp_path / "ft", tuned, stage="finetune", data=DataRecord(),
                  task=TaskHead("regression", "age", target_mean=30.0, target_sd=5.0),
                  provenance=Provenance("finetuned-here", parent=opened.parent_ref()))
    tuned_dir = ModelDir.open(tmp_path / "ft")
    with pytest.raises(WrongModelKindError, match="not a masked autoencoder"):
        tuned_dir.load_mae()
    assert tuned_dir.task.output_scale == (30.0, 5.0) and tuned_dir.parent.path == (tmp_path / "pre").resolve()
    assert tuned_dir.masking == plan  # a fine-tuned model's masking is its parent's


def test_every_way_a_directory_is_wrong_has_its_own_error(tmp_path):
    with pytest.raises(ModelDirMissingError, match="no such directory") as info:
        ModelDir.open(tmp_path / "nope")
    assert info.value.exit_code == EXIT_INPUT_MISSING
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirMissingError, match="no saved model"):
        ModelDir.open(tmp_path / "empty")
    ckpt = tmp_path / "weights.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(NotAModelDirError, match="a file") as info:
        ModelDir.open(ckpt)
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(NotAModelDirError, match="hf://"):
        ModelDir.open("hf://zxcvb20001/NeuroSTORM")

    saved = ModelDir.save(tmp_path / "ok", micro_mae(), stage="pretrain", provenance=Provenance("pretrained-here"),
                          data=DataRecord())
    meta_path = saved.layout.metadata
    record = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**record, "format_version": 3}))
    with pytest.raises(ModelDirTooNewError, match="newer"):
        ModelDir.open(saved.path)
    meta_path.write_text(json.dumps({**record, "stage": "distill"}))
    with pytest.raises(ModelDirCorruptError, match="stage"):
        ModelDir.open(saved.path)
    meta_path.write_text(json.dumps({**record, "input_convention": "unknown"}))
    with pytest.raises(ModelDirCorruptError, match="input convention"):
        ModelDir.open(saved.path)
    meta_path.write_text("{ not json")
    with pytest.raises(ModelDirCorruptError, match="unreadable"):
        ModelDir.open(saved.path)
    meta_path.write_text(json.dumps(record))
    with open(saved.layout.weights, "r+b") as f:  # weights changed since the metadata was written
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    with pytest.raises(ModelDirCorruptError, match="sha256"):
        ModelDir.open(saved.path).load()
