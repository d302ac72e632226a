"""Participant-level prediction: outputs per run, tables, attribution, region error, failures, validator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE, SOURCE_AFFINE

#: A micro NeuroSTORM (48^3 x 4 frames, one block per stage): a forward pass of two clips takes ~0.2 s on one core.
SPEC_OVERRIDES = {"img_size": (48, 48, 48, 4), "depths": (1, 1), "embed_dim": 8}
LABEL = "finetuneTest"
RUN_FILES = [
    "sub-{s}/figures/sub-{s}_task-rest_run-1_desc-reconFinetuneTest_bold.png",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-igFinetuneTest_attribution.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-igFinetuneTest_attribution.nii.gz",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-reconFinetuneTest_bold.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-reconFinetuneTest_bold.nii.gz",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-reconerrorFinetuneTest_regionerror.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-reconerrorFinetuneTest_regionerror.nii.gz",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_attribution.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_attribution.tsv",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_embeddings.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_embeddings.tsv",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_predictions.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_predictions.tsv",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_regionerror.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest_regionerror.tsv",
]
SUBJECT_FILES = [
    "sub-{s}/sub-{s}_desc-finetuneTest_attribution.json",
    "sub-{s}/sub-{s}_desc-finetuneTest_attribution.tsv",
    "sub-{s}/sub-{s}_desc-finetuneTest_predictions.json",
    "sub-{s}/sub-{s}_desc-finetuneTest_predictions.tsv",
]
INPUT_SPACE_FILES = [
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_desc-reconFinetuneTestInput_bold.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_desc-reconFinetuneTestInput_bold.nii.gz",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_desc-reconerrorFinetuneTestInput_regionerror.json",
    "sub-{s}/func/sub-{s}_task-rest_run-1_space-MNI152NLin6Asym_desc-reconerrorFinetuneTestInput_regionerror.nii.gz",
]
GROUPS = ("frontal", "limbic", "occipital", "parietal", "subcortical", "temporal", "cerebellum")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def make_store(root: Path, n_subjects: int = 3) -> Path:
    """A derivatives dataset with synthetic model-ready runs (8 frames, clips of 4) and the atlas derivative."""
    from bids_regionmae.atlas.aal3 import Atlas
    from bids_regionmae.atlas.derivative import write_atlas_derivative
    from bids_regionmae.atlas.regions import aal3_label_names
    from bids_regionmae.outputs.derivatives import init_derivatives
    from bids_regionmae.testing.store import synthetic_labels, write_synthetic_store

    bids = root / "bids"
    bids.mkdir(parents=True, exist_ok=True)
    out = init_derivatives(root / "out", bids)
    sidecars = write_synthetic_store(out, n_subjects=n_subjects, n_frames=8, clip_length=4, seed=1)
    for sidecar in sidecars:  # what participant level adds: mask sidecars, the source grid
        meta = json.loads(sidecar.read_text())
        meta["source_space"] = "MNI152NLin6Asym"
        meta["source_grid"] = {"shape": [91, 109, 91, 8], "affine": SOURCE_AFFINE.tolist()}
        sidecar.write_text(json.dumps(meta))
        mask_json = sidecar.parent / meta["files"]["mask"].replace(".nii.gz", ".json")
        mask_json.write_text(json.dumps({"Type": "Brain", "Resolution": {"2": "model grid"}}))
    labels = synthetic_labels(MODEL_SHAPE)
    names = aal3_label_names()
    present = sorted(int(v) for v in np.unique(labels) if v)
    atlas = Atlas(image=nib.Nifti1Image(labels, MODEL_AFFINE), labels={i: names[i] for i in present},
                  source="user", version="synthetic", sha256="0" * 64)
    write_atlas_derivative(atlas, labels, out)
    return out


def save_micro_models(out: Path, n_classes: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """A micro MAE (pretraining directory) and a fine-tuned classifier on its encoder, saved as model directories."""
    import copy

    from bids_regionmae.atlas.regions import LOBE_GROUPS
    from bids_regionmae.masking import MaskingPlan
    from bids_regionmae.models.heads import FinetuneModel
    from bids_regionmae.models.model_dir import ModelDir
    from bids_regionmae.models.model_record import DataRecord, Provenance, TaskHead
    from bids_regionmae.models.registry import create_mae, get_spec

    spec = get_spec("tiny", **SPEC_OVERRIDES)
    torch.manual_seed(seed)
    mae = create_mae(spec, backend="torch")
    plan = MaskingPlan("region", "cerebellum", LOBE_GROUPS["cerebellum"], rule="majority")
    pretrain = ModelDir.save(out / "models" / "pretrain_region-cerebellum_tiny_seed-0", mae, stage="pretrain",
                             masking=plan, provenance=Provenance("pretrained-here", seed=seed), data=DataRecord())
    classifier = FinetuneModel(copy.deepcopy(mae.encoder), "classification", n_classes, mode="linear-probe")
    with torch.no_grad():
        classifier.head.fc.weight.normal_(0.0, 2.0)  # outputs that differ between classes
    task = TaskHead("multiclass", "dx", ("A", "B", "C")[:n_classes])
    finetune = ModelDir.save(out / "models" / "finetune_test", classifier, stage="finetune", task=task, masking=plan,
                             provenance=Provenance("finetuned-here", parent=pretrain.parent_ref()), data=DataRecord())
    return pretrain.path, finetune.path


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """Three participants predicted with the micro model; sub-03 has a broken brain mask."""
    from bids_regionmae.atlas import model_grid_atlas
    from bids_regionmae.models.model_dir import ModelDir
    from bids_regionmae.predict.group import write_group_outputs
    from bids_regionmae.predict.models import load_prediction_model
    from bids_regionmae.predict.run import PredictSettings, predict_many
    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.reports.group import write_group_report

    out = make_store(tmp_path_factory.mktemp("predict"))
    broken = next(out.glob("sub-03/func/*_desc-brain_mask.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), MODEL_AFFINE), str(broken))
    pretrain_dir, finetune_dir = save_micro_models(out)
    model = load_prediction_model(ModelDir.open(finetune_dir), backend="torch")
    atlas = model_grid_atlas(out)
    runs: dict[str, list] = {}
    for run in find_model_ready_runs(out):
        runs.setdefault(run.subject, []).append(run)
    settings = PredictSettings(batch_size=2, ig_steps=8, ig_batch_size=4, ig_max_clips=1, input_space=True,
                               progress=False)
    before = {p for p in out.rglob("*") if p.is_file()}
    results = predict_many(runs, model, atlas, out, settings=settings)
    created = {p for p in out.rglob("*") if p.is_file()} - before
    group = write_group_outputs(out, LABEL, model=model.describe())
    write_group_report(out, LABEL, group.attribution, group.participants, group.predictions, model=model.describe())
    return {"out": out, "results": results, "created": created, "model": model, "atlas": atlas,
            "pretrain_dir": pretrain_dir, "finetune_dir": finetune_dir}


# ----------------------------------------------------------------------------- names


def test_model_label():
    from bids_regionmae.outputs.naming import join_label, model_label

    assert model_label("/x/models/pretrain_region-cerebellum_tiny_seed-0") == "pretrainRegionCerebellumTinySeed0"
    assert model_label("models/finetune_dx_linear-probe") == "finetuneDxLinearProbe"
    long = model_label("a" * 30 + "_" + "b" * 30)
    assert len(long) <= 48 and long.isalnum()
    assert join_label("recon", "tiny", "Input") == "reconTinyInput"


def test_golden_output_files(predicted):
    out = predicted["out"]
    created = sorted(p.relative_to(out).as_posix() for p in predicted["created"]
                     if not p.relative_to(out).as_posix().startswith("logs/"))
    expected = sorted(name.format(s=s) for s in ("01", "02") for name in RUN_FILES + SUBJECT_FILES
                      + INPUT_SPACE_FILES)
    assert created == expected
    assert sorted(p.name for p in (out / "logs" / "status").iterdir()) == [
        f"sub-0{i}_predict-{LABEL}.json" for i in (1, 2, 3)]


def test_failing_participant_does_not_stop_others(predicted):
    results = predicted["results"]
    assert [o.status for o in results["01"]] == ["done"]
    assert [o.status for o in results["02"]] == ["done"]
    assert [o.status for o in results["03"]] == ["failed"]
    assert "sub-03_task-rest_run-1" in results["03"][0].message
    status = json.loads((predicted["out"] / "logs" / "status" / f"sub-03_predict-{LABEL}.json").read_text())
    assert status["runs"]["sub-03_task-rest_run-1"]["status"] == "failed"


def test_tables(predicted):
    out = predicted["out"]
    prefix = out / "sub-01" / "func" / "sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-finetuneTest"
    emb = _tsv(Path(f"{prefix}_embeddings.tsv"))
    assert [r["clip"] for r in emb] == ["0", "1", "mean"]
    dims = [c for c in emb[0] if c.startswith("emb_")]
    assert len(dims) == predicted["model"].spec.num_features
    mean = np.array([[float(r[c]) for c in dims] for r in emb[:2]]).mean(0)
    np.testing.assert_allclose([float(emb[2][c]) for c in dims], mean, rtol=1e-5, atol=1e-6)

    pred = _tsv(Path(f"{prefix}_predictions.tsv"))
    assert list(pred[0]) == ["clip", "onset_frame", "n_frames", "logit_A", "logit_B", "logit_C", "prob_A", "prob_B",
                             "prob_C", "predicted"]
    assert len(pred) == 2
    for row in pred:
        probs = np.array([float(row[f"prob_{c}"]) for c in "ABC"])
        assert np.all((probs >= 0) & (probs <= 1))
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == "ABC"[int(np.argmax(probs))]
    side = json.loads(Path(f"{prefix}_predictions.json").read_text())
    assert side["Model"]["Label"] == LABEL and side["RunSummary"]["n_clips"] == 2

    subject = _tsv(out / "sub-01" / "sub-01_desc-finetuneTest_predictions.tsv")
    assert len(subject) == 1 and subject[0]["participant_id"] == "sub-01" and subject[0]["n_clips"] == "2"
    logits = np.array([[float(r[f"logit_{c}"]) for c in "ABC"] for r in pred]).mean(0)  # mean of clip logits
    np.testing.assert_allclose([float(subject[0][f"logit_{c}"]) for c in "ABC"], logits, rtol=1e-5)


def test_region_error_table_has_every_group(predicted):
    path = next(predicted["out"].glob("sub-01/func/*_desc-finetuneTest_regionerror.tsv"))
    rows = _tsv(path)
    assert list(rows[0]) == ["region", "index", "group", "level", "masking", "n_voxels", "n_masked_values", "mse",
                             "mean_abs_error", "n_clips"]
    groups = {r["region"]: r for r in rows if r["level"] == "group"}
    assert set(groups) == set(GROUPS)
    for row in groups.values():
        assert float(row["mse"]) > 0 and int(row["n_masked_values"]) > 0 and row["n_clips"] == "2"
    regions = [r for r in rows if r["level"] == "region"]
    assert {r["group"] for r in regions} == set(GROUPS) and all(r["index"].isdigit() for r in regions)
    errmap = nib.load(str(next(predicted["out"].glob("sub-01/func/*_desc-reconerrorFinetuneTest_regionerror.nii.gz"))))
    assert errmap.shape == MODEL_SHAPE and np.asarray(errmap.dataobj).max() > 0
    recon = nib.load(str(next(predicted["out"].glob("sub-01/func/*res-2_desc-reconFinetuneTest_bold.nii.gz"))))
    assert recon.shape == (*MODEL_SHAPE, 4) and recon.header.get_zooms()[3] == pytest.approx(2.0)
    np.testing.assert_allclose(recon.affine, MODEL_AFFINE)
    source = nib.load(str(next(predicted["out"].glob("sub-01/func/*_desc-reconFinetuneTestInput_bold.nii.gz"))))
    assert source.shape == (91, 109, 91, 4)
    np.testing.assert_allclose(source.affine, SOURCE_AFFINE)


def test_attribution_tables(predicted):
    out = predicted["out"]
    rows = _tsv(next(out.glob("sub-01/func/*_desc-finetuneTest_attribution.tsv")))
    groups = [r for r in rows if r["level"] == "group"]
    assert [r["region"] for r in groups] == list(GROUPS)
    assert all(math.isfinite(float(r["occlusion_importance"])) and float(r["ig_mean_abs"]) > 0 for r in groups)
    side = json.loads(next(out.glob("sub-01/func/*_desc-finetuneTest_attribution.json")).read_text())
    assert side["IntegratedGradients"]["steps"] == 8 and side["Occlusion"]["mode"] == "zero"
    group_tsv = _tsv(out / "group" / f"attribution_{LABEL}.tsv")
    by_group = {r["region"]: r for r in group_tsv if r["level"] == "group"}
    assert set(by_group) == set(GROUPS)
    for name in GROUPS:
        values = [float(r["occlusion_importance"]) for s in ("01", "02")
                  for r in _tsv(out / f"sub-{s}" / f"sub-{s}_desc-finetuneTest_attribution.tsv") if r["region"] == name]
        assert float(by_group[name]["occlusion_importance_mean"]) == pytest.approx(np.mean(values), rel=1e-4)
        assert float(by_group[name]["occlusion_importance_sd"]) == pytest.approx(np.std(values, ddof=1), rel=1e-3,
                                                                                 abs=1e-6)
        assert by_group[name]["n_participants"] == "2"
    assert (out / "group" / f"attribution_{LABEL}.png").is_file()
    assert (out / "group" / f"report_{LABEL}.html").is_file()
    assert len(_tsv(out / "group" / f"predictions_{LABEL}.tsv")) == 2


def test_output_tree_is_valid_bids(predicted):
    from validation import assert_valid_bids

    assert_valid_bids(predicted["out"])


# ----------------------------------------------------------------------------- attribution methods


class PlantedLinear(nn.Module):
    """f(x) = sum of x * w over voxels and frames; with token masks, masked voxels are zeroed first."""

    def __init__(self, weight: torch.Tensor, patch_size=(6, 6, 6, 1)):
        super().__init__()
        self.register_buffer("w", weight.float())
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        from bids_regionmae.masking import apply_voxel_mask

        if token_mask is not None:
            x = apply_voxel_mask(x, token_mask, self.patch_size, 0.0)
        return (x[:, 0] * self.w[..., None]).sum(dim=(1, 2, 3, 4))[:, None]


@pytest.mark.parametrize("mode", ["zero", "mask-token"])
def test_occlusion_finds_the_planted_region(mode):
    from bids_regionmae.atlas.regions import LOBE_GROUPS
    from bids_regionmae.grid import downsample_labels, downsample_mask
    from bids_regionmae.predict.attribution import occlusion
    from bids_regionmae.predict.regionerror import group_patch_maps
    from bids_regionmae.testing.store import synthetic_brain_mask, synthetic_labels

    labels = downsample_labels(synthetic_labels(MODEL_SHAPE), (2, 2, 2))  # (48, 48, 48)
    brain = downsample_mask(synthetic_brain_mask(MODEL_SHAPE), (2, 2, 2))
    gen = torch.Generator().manual_seed(0)
    weight = 0.02 * torch.rand(labels.shape, generator=gen)
    weight[torch.isin(labels, torch.tensor([95, 96]))] = 1.0  # cerebellum carries the evidence
    model = PlantedLinear(weight)
    x = torch.where(brain, 1.0, 0.0)[None, None, ..., None].expand(2, 1, 48, 48, 48, 4).contiguous()
    groups = {g: v for g, v in LOBE_GROUPS.items()}
    if mode == "zero":
        regions = {g: torch.isin(labels, torch.tensor(v)) for g, v in groups.items()}
    else:
        regions = group_patch_maps(labels, groups, (6, 6, 6, 1), "majority")
    base, importance = occlusion(model, x, regions, target=None, mode=mode, patch_size=(6, 6, 6, 1), brain=brain)
    ranked = sorted(importance, key=lambda g: float(importance[g][0]), reverse=True)
    assert ranked[0] == "cerebellum"
    assert float(importance["cerebellum"][0]) > 5 * max(float(importance[g][0]) for g in ranked[1:])
    if mode == "zero":  # linear model: the drop is exactly the region's share of the output
        region = torch.isin(labels, torch.tensor([95, 96])) & brain
        assert float(importance["cerebellum"][0]) == pytest.approx(float((weight * region).sum() * 4), rel=1e-4)


class SmoothNet(nn.Module):
    """A small nonlinear function of the whole clip (two outputs)."""

    def __init__(self, shape, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(shape, generator=gen))
        self.register_buffer("v", torch.randn(shape, generator=gen))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        a = (x[:, 0] * self.w).mean(dim=(1, 2, 3, 4))
        b = (torch.tanh(x[:, 0]) * self.v).mean(dim=(1, 2, 3, 4))
        return torch.stack([torch.tanh(3 * a) + b ** 2, a * b], dim=1)


def test_integrated_gradients_completeness():
    from bids_regionmae.predict.attribution import integrated_gradients

    shape = (12, 12, 12, 4)
    net = SmoothNet(shape)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1)) * 2
    for target in (0, 1):
        result = integrated_gradients(net, x, target=target, steps=32, batch_size=8)
        expected = result.output - result.baseline_output
        assert result.total == pytest.approx(expected, rel=0.02, abs=1e-4)
        assert result.attribution.shape == (1, *shape)


def test_integrated_gradients_on_the_finetuned_model(predicted):
    """IG of the (linear-probe) micro NeuroSTORM classifier: sum of attributions ~ f(x) - f(0)."""
    from bids_regionmae.predict.attribution import integrated_gradients
    from bids_regionmae.testing.store import synthetic_brain_mask

    model = predicted["model"]
    brain = torch.as_tensor(synthetic_brain_mask((48, 48, 48)))
    x = torch.randn(1, 1, 48, 48, 48, 4, generator=torch.Generator().manual_seed(2)) * brain[..., None]
    result = integrated_gradients(model.classify, x, target=None, steps=16, batch_size=8)
    expected = result.output - result.baseline_output
    assert abs(expected) > 1e-3
    assert result.total == pytest.approx(expected, rel=0.1, abs=1e-3)


def test_loaded_models(predicted):
    from bids_regionmae.models.model_dir import ModelDir
    from bids_regionmae.predict.models import load_prediction_model

    model = predicted["model"]
    assert (model.kind, model.label, model.task_kind, model.class_names) == (
        "finetuned", LABEL, "multiclass", ["A", "B", "C"])
    assert model.mae is not None and model.mae_dir == predicted["pretrain_dir"].resolve()
    assert model.token_masks and model.example_group == "cerebellum"
    pretrained = load_prediction_model(ModelDir.open(predicted["pretrain_dir"]), backend="torch")
    assert pretrained.kind == "pretrained" and pretrained.classify is None and pretrained.mae is not None
    assert pretrained.label == "pretrainRegionCerebellumTinySeed0" and pretrained.patch_rule == "majority"
    x = torch.zeros(1, 1, 48, 48, 48, 4)
    with torch.no_grad():
        assert pretrained.embed(x).shape == (1, model.spec.num_features)
        tm = torch.zeros(1, 8, 8, 8, 4, dtype=torch.bool)
        tm[:, :4] = True
        assert not torch.allclose(model.classify(x, tm), model.classify(x, None))  # the mask token is used


def test_missing_model_dir_is_a_clear_error(tmp_path):
    from bids_regionmae.errors import InputMissingError
    from bids_regionmae.models.model_dir import ModelDir

    with pytest.raises(InputMissingError, match="no such directory"):
        ModelDir.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputMissingError, match="no saved model"):
        ModelDir.open(tmp_path / "empty")


def test_project_onto_regions():
    from bids_regionmae.predict.attribution import project_onto_regions

    labels = np.zeros((4, 4, 4), int)
    labels[:2] = 1
    labels[2:] = 2
    values = np.zeros((4, 4, 4, 2))
    values[:2] = 1.0
    values[2:, ..., 0] = -3.0
    per_label, per_group = project_onto_regions(values, labels, {"a": (1,), "ab": (1, 2), "none": (9,)})
    assert per_label[1] == {"mean_abs": 1.0, "sum": 64.0, "n_voxels": 32}
    assert per_label[2]["mean_abs"] == pytest.approx(1.5) and per_label[2]["sum"] == pytest.approx(-96.0)
    assert per_group["ab"]["mean_abs"] == pytest.approx(1.25) and per_group["ab"]["n_voxels"] == 64
    assert per_group["none"]["n_voxels"] == 0 and math.isnan(per_group["none"]["mean_abs"])


def test_probabilities():
    from bids_regionmae.predict.writers import probabilities

    p = probabilities(np.array([[0.0], [2.0]]), "binary")
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-np.array([0.0, 2.0]))))
    np.testing.assert_allclose(p.sum(1), 1.0)
    q = probabilities(np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]]), "multiclass")
    np.testing.assert_allclose(q.sum(1), 1.0)
    assert np.all((q >= 0) & (q <= 1)) and q[1, 0] == pytest.approx(1.0)
    assert probabilities(np.array([[1.5]]), "regression") is None


def test_workflow_predicts_and_reports_missing_participants(tmp_path):
    """``participant --model``: sub-01 is predicted; sub-09 has no model-ready data and fails clearly (exit 1)."""
    from bids_regionmae.config import build_config
    from bids_regionmae.workflows.predict import run

    out = make_store(tmp_path, n_subjects=1)
    _, finetune_dir = save_micro_models(out)
    config = build_config({"bids_dir": str(tmp_path / "bids"), "output_dir": str(out),
                           "analysis_level": "participant", "model_dir": str(finetune_dir), "device": "cpu",
                           "model": {"backend": "torch"}, "train": {"batch_size": 2},
                           "inputs": {"participant_label": ["01", "sub-09"]}})
    assert run(config) == 1
    status = json.loads((out / "logs" / "status" / f"sub-09_predict-{LABEL}.json").read_text())
    message = next(iter(status["runs"].values()))["message"]
    assert "no model-ready data" in message and "without --model first" in message
    for name in RUN_FILES + SUBJECT_FILES:
        assert (out / name.format(s="01")).is_file(), name
    page = (out / "sub-01" / "sub-01_report.html").read_text()
    assert f"<h2>Predictions ({LABEL})</h2>" in page and f"<h2>Region attribution ({LABEL})</h2>" in page
    assert "without --model first" in (out / "sub-09" / "sub-09_report.html").read_text()
    assert (out / "group" / f"report_{LABEL}.html").is_file()
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "NeuroSTORM" in citation and "finetuneTest" in citation
    side = json.loads(next(out.glob("sub-01/func/*_desc-finetuneTest_attribution.json")).read_text())
    assert side["IntegratedGradients"]["steps"] == 16


def test_pretrained_model_gives_embeddings_and_region_error(predicted):
    from bids_regionmae.models.model_dir import ModelDir
    from bids_regionmae.predict.models import load_prediction_model
    from bids_regionmae.predict.run import PredictSettings, predict_participant
    from bids_regionmae.preprocess.store import find_model_ready_runs

    out = predicted["out"]
    model = load_prediction_model(ModelDir.open(predicted["pretrain_dir"]), backend="torch")
    runs = find_model_ready_runs(out, ["01"])
    outcomes = predict_participant("01", runs, model, predicted["atlas"], out,
                                   settings=PredictSettings(progress=False, region_masking=True))
    assert [o.status for o in outcomes] == ["done"]
    label = model.label
    names = sorted(p.name for p in outcomes[0].outputs)
    prefix = "sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-"
    assert names == sorted([f"{prefix}{label}_embeddings.tsv", f"{prefix}{label}_embeddings.json",
                            f"{prefix}{label}_regionerror.tsv", f"{prefix}{label}_regionerror.json",
                            f"{prefix}recon{label[0].upper()}{label[1:]}_bold.nii.gz",
                            f"{prefix}recon{label[0].upper()}{label[1:]}_bold.json",
                            f"{prefix}reconerror{label[0].upper()}{label[1:]}_regionerror.nii.gz",
                            f"{prefix}reconerror{label[0].upper()}{label[1:]}_regionerror.json",
                            f"sub-01_task-rest_run-1_desc-recon{label[0].upper()}{label[1:]}_bold.png"])
    rows = _tsv(next(out.glob(f"sub-01/func/*_desc-{label}_regionerror.tsv")))
    alone = [r for r in rows if r["masking"] == "region"]
    assert {r["group"] for r in alone} == set(GROUPS)  # every region masked on its own as well
    assert not list(out.glob(f"sub-01/*_desc-{label}_predictions.tsv"))
