"""Participant and group reports, and the citation boilerplate: views on the files in output_dir."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE

LABEL = "fakeModel"
GROUPS = ("frontal", "limbic", "occipital", "parietal", "subcortical", "temporal", "cerebellum")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_store(root: Path) -> Path:
    """Two participants of synthetic model-ready runs with QC files, mask sidecars and the atlas derivative."""
    from bids_regionmae.atlas.aal3 import Atlas
    from bids_regionmae.atlas.derivative import write_atlas_derivative
    from bids_regionmae.atlas.regions import LOBE_GROUPS, aal3_label_names
    from bids_regionmae.outputs.derivatives import init_derivatives
    from bids_regionmae.preprocess.qc import region_coverage
    from bids_regionmae.testing.store import synthetic_labels, write_synthetic_store

    bids = root / "bids"
    bids.mkdir(parents=True, exist_ok=True)
    out = init_derivatives(root / "out", bids)
    sidecars = write_synthetic_store(out, n_subjects=2, n_frames=8, clip_length=4, seed=3)
    labels = synthetic_labels(MODEL_SHAPE)
    for sidecar in sidecars:
        meta = json.loads(sidecar.read_text())
        mask = np.asarray(nib.load(str(sidecar.parent / meta["files"]["mask"])).dataobj) > 0
        qc_name = meta["files"]["data"].replace("_bold.npy", "_qc.json")
        meta["files"]["qc"] = qc_name
        sidecar.write_text(json.dumps(meta))
        qc = {"run_id": meta["run_id"], "tsnr_median": 42.5, "framewise_displacement": {"mean": 0.12, "max": 0.5},
              "mask": {"model_voxels": int(mask.sum())},
              "region_coverage": region_coverage(mask, labels, LOBE_GROUPS), "warnings": ["a planted warning"]}
        (sidecar.parent / qc_name).write_text(json.dumps(qc))
        (sidecar.parent / meta["files"]["mask"].replace(".nii.gz", ".json")).write_text(
            json.dumps({"Type": "Brain", "Resolution": {"2": "model grid"}}))
    names = aal3_label_names()
    present = sorted(int(v) for v in np.unique(labels) if v)
    atlas = Atlas(image=nib.Nifti1Image(labels, MODEL_AFFINE), labels={i: names[i] for i in present},
                  source="user", version="synthetic", sha256="0" * 64)
    write_atlas_derivative(atlas, labels, out)
    return out


class Shrink(nn.Module):
    """A fake masked autoencoder: the reconstruction is half the input (no learning needed)."""

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return 0.5 * x


class MeanLogit(nn.Module):
    """A fake binary classifier: one logit, the mean of the clip."""

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return 10 * x.mean(dim=(1, 2, 3, 4, 5))[:, None]


def fake_model():
    from bids_regionmae.models.registry import get_spec
    from bids_regionmae.predict.models import PredictionModel

    spec = get_spec("tiny", img_size=(48, 48, 48, 4), depths=(1, 1), embed_dim=8)
    classifier = MeanLogit()
    return PredictionModel(label=LABEL, kind="finetuned", spec=spec,
                           embed=lambda x: torch.stack([x.mean(dim=(1, 2, 3, 4, 5)), x.std(dim=(1, 2, 3, 4, 5))], 1),
                           classify=classifier, mae=Shrink(), task_kind="binary", class_names=["Control", "ADHD"],
                           target="diagnosis", patch_rule="majority", token_masks=True, modules=[classifier])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("reports"))


def _preprocess_results():
    from bids_regionmae.preprocess.run import RunResult

    return [RunResult("done", run_id="sub-01_task-rest_run-1", seconds=1.0),
            RunResult("failed", message="sub-01_task-rest_run-2_bold.nii.gz: 3D image, expected 4D",
                      run_id="sub-01_task-rest_run-2"),
            RunResult("skipped-short", message="sub-02_task-rest_run-2: 5 frames, fewer than one clip of 20",
                      run_id="sub-02_task-rest_run-2")]


def test_participant_report_after_preprocessing(store):
    from bids_regionmae.outputs.naming import report_path
    from bids_regionmae.reports.participant import write_participant_reports

    discovery = SimpleNamespace(skipped=[("sub-02/func/sub-02_task-nback_bold.nii.gz", "no brain mask")])
    written = write_participant_reports(store, ["01", "sub-02"], _preprocess_results(), discovery=discovery)
    assert written == [report_path(store, "01"), report_path(store, "02")]
    assert written[0] == store / "sub-01" / "sub-01_report.html"
    page = written[0].read_text()
    for section in ("Summary", "Input quality control", "Atlas coverage per region group", "Mean image and brain mask",
                    "Skipped and failed runs", "Methods and citations"):
        assert f"<h2>{section}</h2>" in page
    assert "3D image, expected 4D" in page and "a planted warning" in page and "42.5" in page
    assert "Predictions" not in page
    assert "no brain mask" in written[1].read_text() and "fewer than one clip" in written[1].read_text()
    figures = sorted(p.name for p in (store / "sub-01" / "figures").iterdir())
    assert figures == ["sub-01_desc-coverage_bold.svg", "sub-01_task-rest_run-1_desc-meanmask_bold.png"]
    assert 'src="figures/sub-01_desc-coverage_bold.svg"' in page
    status = json.loads((store / "logs" / "status" / "sub-01_preprocess.json").read_text())
    assert status["runs"]["sub-01_task-rest_run-2"]["status"] == "failed"
    assert (store / "logs" / "CITATION.md").is_file()


def test_report_includes_predictions_when_rerun(store):
    from bids_regionmae.atlas import model_grid_atlas
    from bids_regionmae.predict.group import write_group_outputs
    from bids_regionmae.predict.run import PredictSettings, predict_many
    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.reports.group import write_group_report
    from bids_regionmae.reports.participant import write_participant_reports

    write_participant_reports(store, ["01", "02"], _preprocess_results())
    model = fake_model()
    runs: dict[str, list] = {}
    for run in find_model_ready_runs(store):
        runs.setdefault(run.subject, []).append(run)
    settings = PredictSettings(ig_steps=4, ig_max_clips=1, occlusion_mode="mask-token", progress=False)
    results = predict_many(runs, model, model_grid_atlas(store), store, settings=settings)
    assert all(o.status == "done" for outcomes in results.values() for o in outcomes)
    group = write_group_outputs(store, LABEL, model=model.describe())
    write_group_report(store, LABEL, group.attribution, group.participants, group.predictions, model=model.describe())
    page_path = write_participant_reports(store, ["01"], stage=f"predict-{LABEL}")[0]
    page = page_path.read_text()
    for section in (f"Model {LABEL}", f"Predictions ({LABEL})", f"Reconstruction error per region group ({LABEL})",
                    f"Region attribution ({LABEL})", "Input quality control", "Skipped and failed runs"):
        assert f"<h2>{section}</h2>" in page
    assert "3D image, expected 4D" in page  # preprocessing failures still listed
    assert "prob_ADHD" in page and "cerebellum" in page
    figures = sorted(p.name for p in (store / "sub-01" / "figures").iterdir())
    assert "sub-01_desc-regionerrorFakeModel_bold.svg" in figures
    assert "sub-01_desc-attributionFakeModel_bold.png" in figures
    assert "sub-01_task-rest_run-1_desc-reconFakeModel_bold.png" in figures
    side = json.loads(next(store.glob("sub-01/func/*_desc-fakeModel_attribution.json")).read_text())
    assert side["Occlusion"]["mode"] == "mask-token"

    group = (store / "group" / f"report_{LABEL}.html").read_text()
    for section in ("Model", "Training record", "Predictions", "Region attribution", "Methods and citations"):
        assert f"<h2>{section}</h2>" in group
    assert "attribution_fakeModel.png" in group and "sub-01" in group


def test_failing_figure_does_not_fail_the_report(tmp_path):
    from bids_regionmae.outputs.figures import safe_figure
    from bids_regionmae.reports.participant import write_participant_report

    out = make_store(tmp_path)
    qc_path = next(out.glob("sub-01/func/*_qc.json"))
    qc = json.loads(qc_path.read_text())
    for entry in qc["region_coverage"]["groups"].values():
        entry["fraction"] = "not a number"  # the coverage bars cannot be drawn
    qc_path.write_text(json.dumps(qc))
    mean = next(out.glob("sub-01/func/*_desc-brain_mask.nii.gz")).with_name(
        qc_path.name.replace("desc-modelready_qc.json", "desc-mean_boldref.nii.gz"))
    sidecar = next(out.glob("sub-01/func/*_desc-modelready_bold.json"))
    meta = json.loads(sidecar.read_text())
    meta["files"]["mean"] = mean.name
    sidecar.write_text(json.dumps(meta))
    mean.write_bytes(b"this is not a NIfTI file")  # the mean-image figure cannot be drawn

    def broken(fig):
        raise RuntimeError("boom")

    assert safe_figure(tmp_path / "x.svg", broken) is None and not (tmp_path / "x.svg").exists()
    page_path = write_participant_report(out, "01")
    assert page_path is not None and page_path.is_file()
    page = page_path.read_text()
    assert page.count('class="warn">Figure not available') >= 2
    assert "<h2>Methods and citations</h2>" in page


def test_citation_boilerplate(tmp_path):
    from bids_regionmae.outputs.derivatives import REFERENCES
    from bids_regionmae.reports.methods import methods_html, methods_markdown, software_versions, write_citation

    versions = software_versions()
    assert {"regionmae", "torch", "nilearn", "templateflow", "pybids"} <= set(versions)
    path = write_citation(tmp_path, stages=("preprocess", "predict"), model={"label": "m1", "kind": "finetuned",
                                                                             "target": "dx"})
    assert path == tmp_path / "logs" / "CITATION.md"
    text = path.read_text()
    for key in ("neurostorm", "regionmae", "aal3", "templateflow", "fmriprep"):
        assert REFERENCES[key] in text
    assert f"torch: {versions['torch']}" in text and "`m1`" in text and "`dx`" in text
    snippet = methods_html(methods_markdown())
    assert snippet.startswith('<div class="methods">') and "<ol>" in snippet and "<ul>" in snippet
    assert "<script" not in methods_html("# a <script>alert(1)</script>")
