"""Derivative names, the dataset skeleton, concurrent writers and the real validator."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
from validation import assert_valid_bids, validation_errors

from bids_regionmae.atomic import atomic_path, atomic_write_json, create_exclusive
from bids_regionmae.errors import OutputError
from bids_regionmae.outputs.derivatives import build_output_path, dataset_description, init_derivatives

GOLDEN_NAMES = [
    ({"subject": "01", "task": "rest", "run": "1", "space": "MNI152NLin6Asym", "resolution": "2",
      "desc": "mean", "suffix": "boldref", "extension": ".nii.gz"},
     "sub-01/func/sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-mean_boldref.nii.gz"),
    ({"subject": "01", "session": "A", "task": "rest", "space": "MNI152NLin6Asym", "resolution": "2",
      "desc": "modelready", "suffix": "bold", "extension": ".npy"},
     "sub-01/ses-A/func/sub-01_ses-A_task-rest_space-MNI152NLin6Asym_res-2_desc-modelready_bold.npy"),
    ({"subject": "02", "task": "nback", "acquisition": "mb4", "run": "3", "desc": "brain", "suffix": "mask",
      "space": "MNI152NLin6Asym", "resolution": "2", "extension": ".nii.gz"},
     "sub-02/func/sub-02_task-nback_acq-mb4_run-3_space-MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz"),
    ({"subject": "01", "datatype": "figures", "desc": "coverage", "suffix": "bold", "extension": ".svg"},
     "sub-01/figures/sub-01_desc-coverage_bold.svg"),
    ({"subject": "01", "suffix": "report", "extension": ".html"}, "sub-01/sub-01_report.html"),
    ({"template": "MNI152NLin6Asym", "atlas": "AAL3", "resolution": "2", "desc": "model", "suffix": "dseg",
      "extension": ".nii.gz"},
     "tpl-MNI152NLin6Asym/anat/tpl-MNI152NLin6Asym_atlas-AAL3_res-2_desc-model_dseg.nii.gz"),
    ({"atlas": "AAL3", "suffix": "description", "extension": ".json"}, "atlas-AAL3_description.json"),
]


@pytest.mark.parametrize(("entities", "expected"), GOLDEN_NAMES)
def test_golden_derivative_names(entities, expected):
    assert build_output_path(entities).as_posix() == expected


def test_name_needs_suffix_and_extension():
    with pytest.raises(ValueError, match="suffix"):
        build_output_path({"subject": "01", "task": "rest"})


def test_dataset_description_fields():
    desc = dataset_description([{"URL": "file:///data"}])
    assert desc["DatasetType"] == "derivative"
    major, minor, _ = (int(x) for x in desc["BIDSVersion"].split("."))
    assert (major, minor) >= (1, 11)
    assert desc["GeneratedBy"][0]["Name"] == "regionmae"
    assert desc["SourceDatasets"] == [{"URL": "file:///data"}]


def test_container_is_recorded(monkeypatch):
    monkeypatch.setenv("REGIONMAE_CONTAINER", "docker")
    monkeypatch.setenv("REGIONMAE_IMAGE", "regionmae:test")
    assert dataset_description()["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "regionmae:test"}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(target.with_suffix(".json"), {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.json"]


def test_create_exclusive_only_once(tmp_path):
    assert create_exclusive(tmp_path / "a.txt", "first")
    assert not create_exclusive(tmp_path / "a.txt", "second")
    assert (tmp_path / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _init_worker(args):
    out, bids = args
    init_derivatives(out, bids)
    return (Path(out) / "dataset_description.json").read_text()


def test_concurrent_writers_share_one_description(tmp_path):
    bids = tmp_path / "in"
    bids.mkdir()
    out = tmp_path / "out"
    with mp.get_context("fork").Pool(6) as pool:
        texts = pool.map(_init_worker, [(str(out), str(bids))] * 24)
    assert len(set(texts)) == 1
    assert json.loads(texts[0])["DatasetType"] == "derivative"
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert sorted(p.name for p in out.iterdir()) == [".bidsignore", "CITATION.cff", "README.md",
                                                      "dataset_description.json"]


def test_refuses_foreign_dataset(tmp_path):
    bids = tmp_path / "in"
    bids.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.8.0"}))
    with pytest.raises(OutputError, match="another dataset"):
        init_derivatives(out, bids)


def test_skeleton_passes_bids_validator(tmp_path):
    bids = tmp_path / "in"
    bids.mkdir()
    out = init_derivatives(tmp_path / "out", bids)
    (out / "logs").mkdir()
    (out / "logs" / "regionmae_participant.toml").write_text("seed = 0\n")
    assert_valid_bids(out)
    assert sorted(p.name for p in out.iterdir()) == [".bidsignore", "CITATION.cff", "README.md",
                                                      "dataset_description.json", "logs"]


def test_validator_catches_errors(tmp_path):
    """The validation helper used across the tests can fail: a stray file is an error."""
    bids = tmp_path / "in"
    bids.mkdir()
    out = init_derivatives(tmp_path / "out", bids)
    (out / "sub-01_garbage.xyz").write_text("x")
    codes = {e["code"] for e in validation_errors(out)}
    assert "NOT_INCLUDED" in codes
