"""The synthetic fMRIPrep dataset: layout, grids, determinism, balance, planted signal, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bids_regionmae.atlas import LOBE_GROUPS, atlas_on_grid, load_offline_atlas
from bids_regionmae.errors import UsageError
from bids_regionmae.grid import SOURCE_AFFINE, SOURCE_SHAPE
from bids_regionmae.synthetic import SPACES, generate_dataset, main

RUN_SUFFIXES = ("space-{space}_res-2_desc-preproc_bold.nii.gz", "space-{space}_res-2_desc-preproc_bold.json",
                "space-{space}_res-2_desc-brain_mask.nii.gz", "space-{space}_res-2_desc-brain_mask.json",
                "space-{space}_res-2_boldref.nii.gz", "desc-confounds_timeseries.tsv",
                "desc-confounds_timeseries.json")


def _golden(subjects, sessions, runs, space="MNI152NLin6Asym", task="rest"):
    files = {"dataset_description.json", "participants.tsv", "participants.json", "README.md"}
    for sub in subjects:
        for ses in sessions:
            for run in runs:
                folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "func/"
                prefix = (f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_task-{task}"
                          + (f"_run-{run}" if run else ""))
                files |= {folder + f"{prefix}_" + s.format(space=space) for s in RUN_SUFFIXES}
    return files


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _bold(root: Path, sub: str, space: str = "MNI152NLin6Asym", extra: str = "") -> Path:
    return root / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest{extra}_space-{space}_res-2_desc-preproc_bold.nii.gz"


def test_tree_layout(synthetic_dataset):
    assert _tree(synthetic_dataset) == _golden(["01", "02", "03", "04"], [None], [None])
    desc = json.loads((synthetic_dataset / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert "fmriprep" in desc["GeneratedBy"][0]["Name"].lower()
    assert "SYNTHETIC" in desc["GeneratedBy"][0]["Description"]


def test_participants_balanced(synthetic_dataset):
    table = pd.read_csv(synthetic_dataset / "participants.tsv", sep="\t")
    assert list(table.columns) == ["participant_id", "diagnosis", "age", "sex", "site"]
    assert list(table["participant_id"]) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert sorted(table["diagnosis"]) == ["ADHD", "ADHD", "control", "control"]
    assert table["age"].between(7, 21).all() and set(table["sex"]) <= {"M", "F"}
    meta = json.loads((synthetic_dataset / "participants.json").read_text())
    assert set(meta["diagnosis"]["Levels"]) == {"ADHD", "control"}


def test_odd_number_of_subjects_is_balanced():
    from bids_regionmae.synthetic import _participants

    rows = _participants(9, seed=3)
    counts = pd.Series([r["diagnosis"] for r in rows]).value_counts()
    assert counts["ADHD"] == 4 and counts["control"] == 5


def test_images_sidecars_confounds(synthetic_dataset):
    bold_path = _bold(synthetic_dataset, "01")
    bold = nib.load(bold_path)
    assert bold.shape == SOURCE_SHAPE + (24,)
    assert np.allclose(bold.affine, SOURCE_AFFINE) and nib.aff2axcodes(bold.affine) == ("R", "A", "S")
    assert bold.header.get_data_dtype() == np.int16 and bold.dataobj.slope > 0
    assert bold.header.get_zooms()[3] == pytest.approx(2.0)
    assert bold_path.stat().st_size < 15e6
    sidecar = json.loads(bold_path.with_name(bold_path.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["RepetitionTime"] == 2.0 and sidecar["SkullStripped"] is False

    mask_path = Path(str(bold_path).replace("desc-preproc_bold", "desc-brain_mask"))
    mask = np.asarray(nib.load(mask_path).dataobj) > 0
    assert 200_000 < mask.sum() < 260_000  # like TemplateFlow's 228,483-voxel res-2 brain mask
    data = np.asarray(bold.dataobj, dtype=np.float32)
    brain_mean = data[mask][:, 3:].mean()
    assert 800 < brain_mean < 1200
    outside = data[~mask][:, 3:].mean(axis=1)
    assert (outside > 50).sum() > 50_000  # not skull-stripped: head signal outside the brain mask
    ref = nib.load(str(bold_path).replace("desc-preproc_bold", "boldref"))
    assert ref.shape == SOURCE_SHAPE

    conf_path = bold_path.parent / "sub-01_task-rest_desc-confounds_timeseries.tsv"
    conf = pd.read_csv(conf_path, sep="\t", na_values="n/a")
    assert len(conf) == 24
    for col in ("global_signal", "csf", "white_matter", "framewise_displacement", "dvars", "std_dvars",
                "trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "a_comp_cor_00",
                "non_steady_state_outlier00"):
        assert col in conf.columns, col
    assert np.isnan(conf["framewise_displacement"][0]) and conf["framewise_displacement"][1:].notna().all()
    assert conf["non_steady_state_outlier00"].tolist()[:2] == [1, 0]
    n_dummy = sum(c.startswith("non_steady_state_outlier") for c in conf.columns)
    assert n_dummy in (1, 2)
    # the flagged volumes are brighter, as in real data
    gs = conf["global_signal"].to_numpy()
    assert gs[:n_dummy].min() > gs[n_dummy:].max()
    meta = json.loads(conf_path.with_suffix(".json").read_text())
    assert meta["a_comp_cor_00"]["Method"] == "aCompCor"


def _mean_group_corr(data: np.ndarray, labels: np.ndarray, group: str, skip: int = 2) -> float:
    series = np.array([data[labels == k][:, skip:].mean(axis=0) for k in LOBE_GROUPS[group]
                       if (labels == k).sum() >= 20])
    corr = np.corrcoef(series)
    return float(corr[np.triu_indices(len(corr), 1)].mean())


def test_planted_signal_is_measurable(synthetic_dataset):
    labels = atlas_on_grid(load_offline_atlas(), SOURCE_AFFINE, SOURCE_SHAPE)
    table = pd.read_csv(synthetic_dataset / "participants.tsv", sep="\t")
    corr = {"cerebellum": {"ADHD": [], "control": []}, "frontal": {"ADHD": [], "control": []}}
    for pid, dx in zip(table["participant_id"], table["diagnosis"], strict=True):
        data = np.asarray(nib.load(_bold(synthetic_dataset, pid[4:])).dataobj, dtype=np.float32)
        for group in corr:
            corr[group][dx].append(_mean_group_corr(data, labels, group))
    cb = np.mean(corr["cerebellum"]["ADHD"]) - np.mean(corr["cerebellum"]["control"])
    fr = np.mean(corr["frontal"]["ADHD"]) - np.mean(corr["frontal"]["control"])
    assert cb > 0.25, corr
    assert abs(fr) < 0.1, corr
    assert min(corr["cerebellum"]["ADHD"]) > max(corr["cerebellum"]["control"]), corr


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for rel in sorted(_tree(root)):
        path = root / rel
        if rel.endswith(".nii.gz"):
            img = nib.load(path)
            payload = np.asarray(img.dataobj).tobytes() + img.affine.tobytes()
        else:
            payload = path.read_bytes()
        out[rel] = hashlib.sha256(payload).hexdigest()
    return out


def test_deterministic_with_seed(tmp_path):
    kwargs = {"n_subjects": 1, "n_frames": 8}
    a = _digest(generate_dataset(tmp_path / "a", seed=5, **kwargs))
    b = _digest(generate_dataset(tmp_path / "b", seed=5, **kwargs))
    c = _digest(generate_dataset(tmp_path / "c", seed=6, **kwargs))
    assert a == b
    bold = "sub-01/func/sub-01_task-rest_space-MNI152NLin6Asym_res-2_desc-preproc_bold.nii.gz"
    assert a[bold] != c[bold]


def test_sessions_runs_and_2009c_grid(tmp_path):
    space = "MNI152NLin2009cAsym"
    root = generate_dataset(tmp_path / "ds", n_subjects=2, n_sessions=2, n_runs=2, n_frames=8, space=space,
                            seed=1, tr=1.5, task="movie")
    assert _tree(root) == _golden(["01", "02"], ["1", "2"], [1, 2], space=space, task="movie")
    bold_path = (root / "sub-02" / "ses-2" / "func"
                 / f"sub-02_ses-2_task-movie_run-2_space-{space}_res-2_desc-preproc_bold.nii.gz")
    img = nib.load(bold_path)
    shape, affine = SPACES[space]
    assert img.shape == (97, 115, 97, 8) and shape == (97, 115, 97)
    assert np.allclose(img.affine, affine) and np.allclose(affine[:3, 3], (-96, -132, -78))
    assert img.header.get_zooms()[3] == pytest.approx(1.5)
    assert json.loads(bold_path.with_name(bold_path.name.replace(".nii.gz", ".json")).read_text())[
        "RepetitionTime"] == 1.5
    # same anatomy in world coordinates: the 2009c mask is the 6Asym mask shifted by 3 voxels
    mask9 = np.asarray(nib.load(str(bold_path).replace("desc-preproc_bold", "desc-brain_mask")).dataobj)
    from bids_regionmae.synthetic import _anatomy

    brain6 = _anatomy("MNI152NLin6Asym").brain
    assert np.array_equal(mask9[3:94, 3:112, 3:94] > 0, brain6)


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="space"):
        generate_dataset(tmp_path / "x", space="MNI305")
    with pytest.raises(UsageError, match="did you mean"):
        generate_dataset(tmp_path / "x", signal_region="cerebelum")
    with pytest.raises(UsageError, match="signal_strength"):
        generate_dataset(tmp_path / "x", signal_strength=1.5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        generate_dataset(tmp_path / "full")


def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(main, [str(out), "--subjects", "2", "--frames", "8", "--seed", "3",
                                  "--signal-region", "limbic", "--signal-strength", "0.7"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 participants" in result.output
    assert _tree(out) == _golden(["01", "02"], [None], [None])
    desc = json.loads((out / "dataset_description.json").read_text())
    assert "limbic" in desc["GeneratedBy"][0]["Description"]
    again = runner.invoke(main, [str(out), "--subjects", "2", "--frames", "8"])
    assert again.exit_code == 2 and "not empty" in again.output
    bad = runner.invoke(main, [str(tmp_path / "bad"), "--space", "MNI305"])
    assert bad.exit_code == 2
    assert runner.invoke(main, ["--help"]).exit_code == 0
