"""Participant-level preprocessing: resampling, normalisation, outputs, resuming, reader.

Inputs are small synthetic fMRIPrep-like runs written in tmp_path on real grids:
MNI152NLin6Asym res-2 (91x109x91), MNI152NLin2009cAsym res-2 (97x115x97,
origin -96,-132,-78) and a coarse 3x3x3.3 mm MNI-aligned grid.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_regionmae.bids.records import RunRecord
from bids_regionmae.errors import UsageError
from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE, SOURCE_AFFINE, SOURCE_SHAPE, source_to_model
from bids_regionmae.outputs.derivatives import init_derivatives
from bids_regionmae.preprocess import find_model_ready_runs, preprocess_run, preprocess_runs
from bids_regionmae.preprocess.resample import SpatialResampler, time_plan
from bids_regionmae.preprocess.source import FrameReader, open_bold
from bids_regionmae.preprocess.store import OUTPUT_FILES, load_model_ready_run

# ----------------------------------------------------------------------------- grids
GRIDS: dict[str, tuple[tuple[int, int, int], np.ndarray, str]] = {
    "nlin6": (SOURCE_SHAPE, SOURCE_AFFINE, "MNI152NLin6Asym"),
    "nlin2009c": ((97, 115, 97), np.array([[2.0, 0, 0, -96], [0, 2, 0, -132], [0, 0, 2, -78], [0, 0, 0, 1]]),
                  "MNI152NLin2009cAsym"),
    # native-like resolution in MNI space; world (20, -30, 30) is a voxel centre
    "coarse": ((66, 72, 56), np.array([[3.0, 0, 0, -97], [0, 3, 0, -132], [0, 0, 3.3, -78.9], [0, 0, 0, 1]]),
               "MNI152NLin2009cAsym"),
}
BLOB_WORLD = np.array([20.0, -30.0, 30.0])
BLOB_MODEL_VOXEL = (57, 42, 53)  # (BLOB_WORLD - MODEL_AFFINE origin) / 2
BRAIN_CENTRE, BRAIN_RADII = np.array([0.0, -20.0, 10.0]), np.array([60.0, 80.0, 60.0])


def world_coords(shape, affine) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float64)
    return np.einsum("ab,bxyz->axyz", affine[:3, :3], ijk) + affine[:3, 3, None, None, None]


def brain(xyz: np.ndarray) -> np.ndarray:
    return (((xyz - BRAIN_CENTRE[:, None, None, None]) / BRAIN_RADII[:, None, None, None]) ** 2).sum(0) <= 1


def blob(xyz: np.ndarray, centre=BLOB_WORLD, sigma=6.0) -> np.ndarray:
    return np.exp(-((xyz - centre[:, None, None, None]) ** 2).sum(0) / (2 * sigma**2))


def write_run(root: Path, subject: str, grid: str = "nlin6", n_frames: int = 8, *, data: np.ndarray | None = None,
              gz: bool = False, seed: int = 0, confounds: dict[str, list] | None = None, tr: float = 2.0,
              space: str | None = None, mask: np.ndarray | None = None, affine: np.ndarray | None = None,
              dtype=np.float32, run: str = "1") -> RunRecord:
    """Write a fMRIPrep-like run (BOLD, brain mask, optional confounds) and return its record."""
    shape, grid_affine, grid_space = GRIDS[grid]
    affine = grid_affine if affine is None else affine
    func = root / f"sub-{subject}" / "func"
    func.mkdir(parents=True, exist_ok=True)
    space = space or grid_space
    xyz = world_coords(shape, affine)
    if mask is None:
        mask = brain(xyz)
    if data is None:
        rng = np.random.default_rng(seed)
        static = np.where(mask, 1000.0, 100.0) + 500.0 * blob(xyz)
        data = np.empty((*shape, n_frames), np.float32)
        for t in range(n_frames):
            data[..., t] = static + 10.0 * rng.standard_normal(shape)
    prefix = f"sub-{subject}_task-rest_run-{run}_space-{space}"
    ext = ".nii.gz" if gz else ".nii"
    bold = func / f"{prefix}_desc-preproc_bold{ext}"
    img = nib.Nifti1Image(np.asarray(data, dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], tr))
    nib.save(img, str(bold))
    mask_path = func / f"{prefix}_desc-brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(mask, np.uint8), affine), str(mask_path))
    conf_path = None
    if confounds is not None:
        conf_path = func / f"sub-{subject}_task-rest_run-{run}_desc-confounds_timeseries.tsv"
        cols = list(confounds)
        rows = zip(*(confounds[c] for c in cols), strict=True)
        conf_path.write_text("\t".join(cols) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return RunRecord(subject=subject, task="rest", space=space, bold=bold, mask=mask_path,
                     repetition_time=tr, run=run, confounds=conf_path)


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    path = tmp_path / "fmriprep"
    path.mkdir()
    return path


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


# ----------------------------------------------------------------------- resampling
@pytest.mark.parametrize("grid", ["nlin6", "nlin2009c"])
def test_exact_crop_path_equals_resampling(grid):
    shape, affine, _ = GRIDS[grid]
    frames = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    crop = SpatialResampler(affine, shape)
    assert crop.method == "crop"
    a = crop(frames)
    b = SpatialResampler(affine, shape, method="separable")(frames)
    c = SpatialResampler(affine, shape, method="grid_sample")(frames)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=3e-4)  # grid_sample un-normalises in float32
    reference = np.random.default_rng(3).standard_normal(MODEL_SHAPE).astype(np.float32)
    assert np.array_equal(crop(frames, subtract=reference), a - reference)
    if grid == "nlin6":  # the model's own source grid: the same crop/pad as the atlas
        expected = source_to_model(np.moveaxis(frames, 0, -1))
        assert np.array_equal(a, np.moveaxis(expected, -1, 0))


def test_separable_and_grid_sample_match_scipy():
    shape, affine, _ = GRIDS["coarse"]
    frames = np.random.default_rng(2).standard_normal((1, *shape)).astype(np.float32)
    resampler = SpatialResampler(affine, shape)
    assert resampler.method == "separable"
    ours = resampler(frames)[0]
    coords = np.einsum("ab,bxyz->axyz", resampler.voxel_map[:3, :3], np.indices(MODEL_SHAPE, dtype=float))
    coords += resampler.voxel_map[:3, 3, None, None, None]
    ref = ndimage.map_coordinates(frames[0].astype(np.float64), coords, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # an oblique grid goes through grid_sample, same semantics
    theta = np.radians(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    oblique = affine.copy()
    oblique[:3, :3] = rot @ affine[:3, :3]
    resampler = SpatialResampler(oblique, shape)
    assert resampler.method == "grid_sample"
    coords = np.einsum("ab,bxyz->axyz", resampler.voxel_map[:3, :3], np.indices(MODEL_SHAPE, dtype=float))
    coords += resampler.voxel_map[:3, 3, None, None, None]
    ref = ndimage.map_coordinates(frames[0].astype(np.float64), coords, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(resampler(frames)[0], ref, atol=1e-3)


@pytest.mark.parametrize("grid", ["nlin6", "nlin2009c", "coarse"])
def test_blob_lands_on_the_right_model_voxel(inputs, out, grid):
    record = write_run(inputs, f"blob{grid}", grid, n_frames=4)
    result = preprocess_run(record, out, clip_length=4)
    assert result.status == "done", result.message
    mean = np.asanyarray(nib.load(result.outputs["mean"]).dataobj)
    assert mean.shape == MODEL_SHAPE
    peak = np.unravel_index(np.argmax(mean), MODEL_SHAPE)
    assert tuple(int(i) for i in peak) == BLOB_MODEL_VOXEL
    # the model-grid mean matches the analytic image where the world is sampled
    xyz = world_coords(MODEL_SHAPE, MODEL_AFFINE)
    expected = 1000.0 + 500.0 * blob(xyz)
    near = blob(xyz) > 0.5
    tol = 30.0 if grid != "coarse" else 90.0  # noise; trilinear on a 3 mm grid smooths the 6 mm blob
    np.testing.assert_allclose(mean[near], expected[near], atol=tol)
    run = find_model_ready_runs(out)[0]
    assert run.meta["grid"]["resampling"]["method"] == ("separable" if grid == "coarse" else "crop")
    if grid != "nlin6":
        assert "world coordinates" in run.meta["grid"]["note"]


# ----------------------------------------------------------------------------- time
def test_time_plan():
    plan = time_plan(np.arange(10) * 2.0, 2.0, 1.5)
    assert len(plan) == 13  # floor(18 / 1.5) + 1
    np.testing.assert_allclose(plan.times, np.arange(13) * 1.5)
    values = np.arange(10) * 2.0  # a signal equal to its time
    interp = (1 - plan.weight1) * values[plan.index0] + plan.weight1 * values[plan.index1]
    np.testing.assert_allclose(interp, plan.times)
    assert time_plan(np.arange(5) * 2.0, 2.0, None).identity
    assert time_plan(np.arange(5) * 2.0, 2.0, 2.0).identity


def test_time_resampling_and_nonsteady_dropping(inputs, out):
    shape, affine, _ = GRIDS["nlin6"]
    mask = brain(world_coords(shape, affine))
    n = 12
    data = np.zeros((*shape, n), np.float32)
    for t in range(n):
        data[..., t] = np.where(mask, 1000.0 + 10.0 * t, 0.0)
    data[..., :2] = np.where(mask, 9000.0, 0.0)[..., None]  # non-steady-state spike
    conf = {"non_steady_state_outlier00": [1] + [0] * (n - 1), "non_steady_state_outlier01": [0, 1] + [0] * (n - 2),
            "framewise_displacement": ["n/a"] + [0.1, 0.3] * 5 + [0.2]}
    record = write_run(inputs, "time", data=data, confounds=conf, mask=mask, tr=2.0)
    result = preprocess_run(record, out, target_tr=1.5, clip_length=4)
    assert result.status == "done", result.message
    run = find_model_ready_runs(out)[0]
    frames = run.meta["frames"]
    assert frames["total"] == n and frames["dropped"] == [0, 1] and frames["kept"] == n - 2
    # kept frames span 4 s .. 22 s -> 13 output frames every 1.5 s
    assert frames["output"] == 13 and run.meta["repetition_time"] == 1.5
    assert run.meta["original_repetition_time"] == 2.0
    norm = run.meta["normalization"]
    values = run.data[:, run.mask].astype(np.float64) * norm["std"] + norm["mean"]
    expected = 1000.0 + 10.0 * (4.0 + 1.5 * np.arange(13)) / 2.0
    np.testing.assert_allclose(values.mean(1), expected, atol=0.05)
    assert values.max() < 1200  # the dropped spike is gone
    qc = json.loads(run.paths["qc"].read_text())
    assert qc["framewise_displacement"]["mean"] == pytest.approx(np.mean([0.3] + [0.1, 0.3] * 4 + [0.2]))
    clips = run.paths["clips"].read_text().splitlines()
    assert clips[0] == "clip\tonset_frame\tn_frames\tonset_seconds"
    assert clips[1:] == ["0\t0\t4\t4", "1\t4\t4\t10", "2\t8\t4\t16"]
    assert run.clips == [(0, 4), (4, 8), (8, 12)]


# -------------------------------------------------------------------- normalisation
def test_global_zscore_background_and_stats(inputs, out):
    record = write_run(inputs, "z", "nlin6", n_frames=6, seed=3)
    result = preprocess_run(record, out, clip_length=3, clip_stride=2, background_value=-1.0)
    assert result.status == "done", result.message
    run = find_model_ready_runs(out)[0]
    data = np.asarray(run.data, dtype=np.float64)
    assert data.shape == (6, *MODEL_SHAPE) and run.data.dtype == np.float16
    inside = data[:, run.mask]
    assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1.0) < 1e-3
    assert np.all(data[:, ~run.mask] == -1.0)
    # the recorded stats are those of the source voxels on the model grid
    src = np.asanyarray(nib.load(record.bold).dataobj)
    src_mask = np.asanyarray(nib.load(record.mask).dataobj) > 0
    model = source_to_model(src)[run.mask].astype(np.float64)
    assert np.array_equal(source_to_model(src_mask.astype(np.uint8)) > 0, run.mask)
    norm = run.meta["normalization"]
    assert norm["mean"] == pytest.approx(model.mean(), rel=1e-6)
    assert norm["std"] == pytest.approx(model.std(), rel=1e-5)
    assert norm["n_values"] == model.size
    qc = json.loads(run.paths["qc"].read_text())
    tsnr = np.median(model.mean(1) / model.std(1))
    assert qc["tsnr_median"] == pytest.approx(tsnr, rel=1e-3)
    assert run.clips == [(0, 3), (2, 5)]


def test_nan_and_inf_are_counted_and_set_to_background(inputs, out):
    shape, affine, _ = GRIDS["nlin6"]
    record = write_run(inputs, "nan", "nlin6", n_frames=5)
    data = np.asanyarray(nib.load(record.bold).dataobj).copy()
    data[40:44, 50:54, 40:44, 2] = np.nan  # 64 in-mask values in one frame
    data[45, 60, 45, :] = np.inf  # one voxel in every frame
    nib.save(nib.Nifti1Image(data, affine), str(record.bold))
    result = preprocess_run(record, out, clip_length=5)
    assert result.status == "done", result.message
    assert "NaN/Inf" in result.message
    run = find_model_ready_runs(out)[0]
    stored = np.asarray(run.data, np.float32)
    assert np.isfinite(stored).all()
    assert run.meta["nonfinite_values"] >= 64 + 5
    qc = json.loads(run.paths["qc"].read_text())
    assert qc["nonfinite"]["source_values_in_mask"] == 64 + 5
    # the source voxel (40, 50, 40) is model voxel (42, 44, 42): background in frame 2 only
    assert stored[2, 42, 44, 42] == 0.0 and stored[1, 42, 44, 42] != 0.0
    assert not run.mask[47, 54, 47]  # the always-Inf voxel left the mask
    inside = stored[:, run.mask]
    assert abs(inside[inside != 0].mean()) < 0.01


def test_partially_constant_voxels_warn(inputs, out):
    record = write_run(inputs, "const", "nlin6", n_frames=4)
    data = np.asanyarray(nib.load(record.bold).dataobj).copy()
    data[40:42, 50:52, 40:42, :] = 1234.0
    nib.save(nib.Nifti1Image(data, GRIDS["nlin6"][1]), str(record.bold))
    result = preprocess_run(record, out, clip_length=4)
    assert result.status == "done" and "8 in-mask voxels are constant" in result.message


# ---------------------------------------------------------------------- bad inputs
def bad_inputs(root: Path) -> dict[str, tuple[RunRecord, str]]:
    """One record per kind of broken input -> the words its failure message must hold."""
    shape, affine, _ = GRIDS["nlin6"]

    def write_run(*args, **kwargs):  # 4 frames each
        return globals()["write_run"](*args, **{"n_frames": 4, **kwargs})

    mask = brain(world_coords(shape, affine))
    cases: dict[str, tuple[RunRecord, str]] = {}
    cases["allnan"] = (write_run(root, "allnan", data=np.full((*shape, 4), np.nan, np.float32)), "NaN")
    mostly = np.asanyarray(nib.load(write_run(root, "mostly").bold).dataobj).copy()
    mostly[..., :3] = np.nan
    cases["mostlynan"] = (write_run(root, "mostlynan", data=mostly), "NaN/Inf")
    cases["zero"] = (write_run(root, "zero", data=np.zeros((*shape, 4), np.float32)), "all-zero")
    cases["constant"] = (write_run(root, "constant", data=np.full((*shape, 4), 700, np.float32)), "never changes")
    three_d = write_run(root, "threed", data=np.ones(shape, np.float32))
    cases["threed"] = (three_d, "3D image")
    other = write_run(root, "mismatch")
    small = other.mask.with_name("small_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((90, 109, 91), np.uint8), affine), str(small))
    cases["mismatch"] = (RunRecord(**{**other.__dict__, "mask": small}), "does not match")
    corrupt = write_run(root, "corrupt", gz=True)
    raw = bytearray(corrupt.bold.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    corrupt.bold.write_bytes(bytes(raw))
    cases["corrupt"] = (corrupt, "corrupted")
    truncated = write_run(root, "truncated", gz=True)
    truncated.bold.write_bytes(truncated.bold.read_bytes()[: truncated.bold.stat().st_size // 2])
    cases["truncated"] = (truncated, "truncated")
    garbage = write_run(root, "garbage", gz=True)
    garbage.bold.write_bytes(b"not a gzip file at all" * 10)
    cases["garbage"] = (garbage, "not a readable NIfTI")
    cases["t1w"] = (write_run(root, "tone", space="T1w"), "space-T1w is not supported")
    native = affine.copy()
    native[:3, 3] = (0.0, 0.0, 0.0)  # scanner-like field of view
    cases["fov"] = (write_run(root, "fov", affine=native, mask=mask), "field of view")
    oblique = affine.copy()
    c, s = np.cos(np.radians(8)), np.sin(np.radians(8))
    oblique[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    cases["oblique"] = (write_run(root, "oblique", affine=oblique, mask=mask), "rotated")
    cases["emptymask"] = (write_run(root, "emptymask", mask=np.zeros(shape, bool)), "brain mask is empty")
    cases["confrows"] = (write_run(root, "confrows", confounds={"framewise_displacement": [0.1] * 3}), "3 rows")
    entity = write_run(root, "entity")
    cases["entity"] = (RunRecord(**{**entity.__dict__, "acquisition": "acq-mb4_ce-gd"}), "cannot be written")
    return cases


def test_bad_inputs_fail_alone(inputs, out):
    cases = bad_inputs(inputs)
    good = write_run(inputs, "good", "nlin2009c", n_frames=4, gz=True)
    short = write_run(inputs, "short", n_frames=3)
    records = [good, short] + [record for record, _ in cases.values()]
    results = preprocess_runs(records, out, clip_length=4, progress=False)
    assert [r.run_id for r in results] == [r.run_id for r in records]
    assert results[0].status == "done", results[0].message
    assert results[1].status == "skipped-short" and "fewer than one clip of 4" in results[1].message
    for (name, (record, words)), result in zip(cases.items(), results[2:], strict=True):
        assert result.status == "failed", (name, result)
        assert words in result.message, (name, result.message)
        named = [str(p) for p in (record.bold, record.mask, record.confounds) if p is not None]
        assert any(p in result.message for p in named), (name, result.message)  # names the file
        assert "unexpected" not in result.message, (name, result.message)
    assert [r.subject for r in find_model_ready_runs(out)] == ["good"]
    assert not temporaries(out)


def test_parameters_are_checked_up_front(inputs, out):
    record = write_run(inputs, "params", n_frames=4)
    with pytest.raises(UsageError, match="clip_length"):
        preprocess_run(record, out, clip_length=0)
    with pytest.raises(UsageError, match="target_tr"):
        preprocess_runs([record], out, target_tr=-1.0, progress=False)
    with pytest.raises(UsageError, match="voxel_labels"):
        preprocess_run(record, out, voxel_labels=np.zeros((91, 109, 91), int))
    with pytest.raises(UsageError, match="unknown"):
        preprocess_runs([record], out, clip_lenght=4, progress=False)


# ------------------------------------------------------------ outputs and resuming
def test_outputs_complete_resume_and_change(inputs, out):
    record = write_run(inputs, "01", "nlin2009c", n_frames=5, gz=True,
                       confounds={"framewise_displacement": ["n/a", 0.1, 0.2, 0.3, 0.4]})
    first = preprocess_run(record, out, clip_length=5)
    assert first.status == "done", first.message
    assert set(first.outputs) == set(OUTPUT_FILES)
    names = sorted(p.name for p in (out / "sub-01" / "func").iterdir())
    prefix = "sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_"
    assert names == sorted(prefix + s for s in (
        "desc-brain_mask.json", "desc-brain_mask.nii.gz", "desc-mean_boldref.nii.gz", "desc-modelready_bold.json",
        "desc-modelready_bold.npy", "desc-modelready_clips.tsv", "desc-modelready_qc.json",
        "desc-preview_bold.json", "desc-preview_bold.nii.gz"))
    meta = json.loads(first.outputs["sidecar"].read_text())
    assert meta["complete"] is True and meta["inputs_fingerprint"]
    assert meta["sources"]["bold"]["sha256"] == __import__("hashlib").sha256(record.bold.read_bytes()).hexdigest()
    assert meta["sources"]["confounds"]["sha256"]
    assert meta["grid"]["shape"] == [96, 96, 96] and np.allclose(meta["grid"]["affine"], MODEL_AFFINE)
    preview = nib.load(first.outputs["preview"])
    assert preview.shape == (*MODEL_SHAPE, 5) and preview.header.get_zooms()[3] == 2.0
    assert json.loads(first.outputs["preview_json"].read_text())["RepetitionTime"] == 2.0
    np.testing.assert_allclose(np.asanyarray(preview.dataobj)[..., 0],
                               np.asarray(find_model_ready_runs(out)[0].data[0], np.float32))
    stamp = first.outputs["data"].stat().st_mtime_ns

    again = preprocess_run(record, out, clip_length=5)
    assert again.status == "skipped-complete"
    assert first.outputs["data"].stat().st_mtime_ns == stamp
    changed_params = preprocess_run(record, out, clip_length=4)
    assert changed_params.status == "done"
    os.utime(record.bold, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert preprocess_run(record, out, clip_length=4).status == "done"
    assert preprocess_run(record, out, clip_length=4).status == "skipped-complete"
    assert preprocess_run(record, out, clip_length=4, overwrite=True).status == "done"
    # a later change that makes the run too short withdraws the old result
    assert preprocess_run(record, out, clip_length=50).status == "skipped-short"
    assert find_model_ready_runs(out) == []
    assert not temporaries(out)


def test_crop_and_trilinear_engines_give_the_same_outputs(inputs, out, tmp_path):
    record = write_run(inputs, "engines", "nlin2009c", n_frames=4)
    a = preprocess_run(record, out, clip_length=2)
    b = preprocess_run(record, tmp_path / "out2", clip_length=2, resample_method="separable")
    assert a.status == b.status == "done"
    assert json.loads(b.outputs["sidecar"].read_text())["grid"]["resampling"]["method"] == "separable"
    assert np.array_equal(np.load(a.outputs["data"]), np.load(b.outputs["data"]))
    with pytest.raises(UsageError, match="resample_method"):
        preprocess_run(record, out, resample_method="cubic")


_INTERRUPT_SCRIPT = """
import sys
from pathlib import Path
from bids_regionmae.bids.records import RunRecord
from bids_regionmae.preprocess import preprocess_run
record = RunRecord(subject="big", task="rest", space="MNI152NLin6Asym", bold=Path(sys.argv[1]),
                   mask=Path(sys.argv[2]), repetition_time=2.0, run="1")
print(preprocess_run(record, sys.argv[3], clip_length=4).status)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_partial_files(inputs, out, sig):
    mask = brain(world_coords(SOURCE_SHAPE, SOURCE_AFFINE))
    data = np.random.default_rng(5).integers(900, 1100, (*SOURCE_SHAPE, 32), dtype=np.int16) * mask[..., None]
    record = write_run(inputs, "big", "nlin6", data=data, dtype=np.int16, mask=mask)
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPT_SCRIPT, str(record.bold), str(record.mask), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not temporaries(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(sig)
    proc.wait(timeout=60)
    sidecar = out / "sub-big/func/sub-big_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-modelready_bold.json"
    assert not sidecar.exists()
    assert find_model_ready_runs(out) == []
    if sig == signal.SIGINT:  # Python unwinds: temporaries removed on the way out
        assert not temporaries(out)
    # a rerun cleans what a killed process left and completes
    result = preprocess_run(record, out, clip_length=4)
    assert result.status == "done", result.message
    assert not temporaries(out)


def test_parallel_runs(inputs, out):
    records = [write_run(inputs, "p0", "nlin6", n_frames=4),
               write_run(inputs, "pbad", data=np.zeros((*SOURCE_SHAPE, 4), np.float32))]
    results = preprocess_runs(records, out, nprocs=2, clip_length=4, progress=False)
    assert [r.status for r in results] == ["done", "failed"]
    assert "all-zero" in results[1].message
    assert [r.subject for r in find_model_ready_runs(out)] == ["p0"]


# --------------------------------------------------------------------- reader / QC
def test_reader_round_trip(inputs, out):
    for subject, session in (("02", None), ("01", "a"), ("01", "b")):
        record = write_run(inputs, subject, "nlin6", n_frames=4, seed=int(subject))
        if session:
            record = RunRecord(**{**record.__dict__, "session": session})
        else:
            record = RunRecord(**{**record.__dict__, "acquisition": "acq-mb4"})
        assert preprocess_run(record, out, clip_length=2).status == "done"
    runs = find_model_ready_runs(out)
    assert [(r.subject, r.entities.get("session")) for r in runs] == [("01", "a"), ("01", "b"), ("02", None)]
    assert [r.subject for r in find_model_ready_runs(out, subjects=["sub-02"])] == ["02"]
    assert runs[2].entities["acquisition"] == "mb4" and "_acq-mb4_" in runs[2].paths["data"].name
    assert len(find_model_ready_runs(out, subjects=["01"])) == 2
    run = runs[0]
    assert isinstance(run.data, np.memmap) and run.data.shape == (4, *MODEL_SHAPE) and run.data.dtype == np.float16
    assert run.data[0:2].flags["C_CONTIGUOUS"]
    assert run.mask.dtype == bool and run.mask.shape == MODEL_SHAPE
    assert run.clips == [(0, 2), (2, 4)] and run.clip(1).shape == (2, *MODEL_SHAPE)
    assert run.n_frames == 4 and run.repetition_time == 2.0 and run.run_id == "sub-01_ses-a_task-rest_run-1"
    clone = pickle.loads(pickle.dumps(run))
    assert clone._data is None and np.array_equal(clone.data, run.data)
    # incomplete or damaged runs are left out
    runs[1].sidecar.unlink()
    runs[2].sidecar.write_text("{not json")
    assert [r.run_id for r in find_model_ready_runs(out)] == ["sub-01_ses-a_task-rest_run-1"]
    with pytest.raises(ValueError):
        load_model_ready_run(runs[2].sidecar)


def test_region_coverage_qc(inputs, out):
    record = write_run(inputs, "qc", "nlin6", n_frames=4)
    labels = np.zeros(MODEL_SHAPE, np.int16)
    labels[40:50, 40:50, 40:50] = 1  # deep inside the brain
    labels[0:4, 0:4, 0:4] = 3  # outside
    labels[44:48, 44:48, 0:8] = 2  # below the brain mask: partly covered at most
    groups = {"inner": [1], "outer": [3], "both": [1, 3], "missing": [7]}
    result = preprocess_run(record, out, clip_length=4, voxel_labels=labels, groups=groups)
    assert result.status == "done", result.message
    coverage = json.loads(result.outputs["qc"].read_text())["region_coverage"]
    assert coverage["labels"]["1"] == {"voxels": 1000, "covered": 1000, "fraction": 1.0}
    assert coverage["labels"]["3"]["fraction"] == 0.0
    assert coverage["groups"]["both"] == {"voxels": 1064, "covered": 1000, "fraction": round(1000 / 1064, 6)}
    assert coverage["groups"]["missing"]["fraction"] is None
    assert coverage["atlas"]["voxels"] == 1000 + 64 + 128


AAL3 = (Path(__file__).resolve().parents[2] / "shared" / "data" / "aal3"
        / "tpl-MNI152NLin6Asym_res-02_atlas-AAL3_dseg.nii.gz")


@pytest.mark.realdata
@pytest.mark.skipif(not AAL3.is_file(), reason="shared AAL3 not available")
def test_region_coverage_with_real_aal3(inputs, out):
    labels = source_to_model(np.asanyarray(nib.load(AAL3).dataobj).astype(np.int16))
    groups = {"cerebellum": list(range(95, 121)), "frontal": list(range(1, 33))}
    record = write_run(inputs, "aal", "nlin6", n_frames=2)
    result = preprocess_run(record, out, clip_length=2, voxel_labels=labels, groups=groups)
    coverage = json.loads(result.outputs["qc"].read_text())["region_coverage"]
    assert len(coverage["labels"]) >= 160
    assert 0 < coverage["groups"]["frontal"]["fraction"] <= 1


def test_delta_codec_precision_and_clipping():
    from bids_regionmae.preprocess.framestore import DeltaCodec

    rng = np.random.default_rng(6)
    n_vox = 5000
    frames = (1000 + 300 * rng.random(n_vox) + 20 * rng.standard_normal((4, n_vox))).astype(np.float32)
    codec = DeltaCodec(frames[0], np.arange(n_vox))
    assert codec.scale == 0.25  # median intensity ~1150 -> 2**round(log2(256 / 1150))
    deviations = frames - frames[0]
    stored = codec.encode(deviations.copy())
    assert stored.dtype == np.float16
    decoded = codec.widen(stored) / codec.scale + frames[0]
    assert np.all(np.abs(decoded - frames) <= np.abs(deviations) * 2**-11 + 1e-3)
    deviations[2, 7] = 1e9  # far beyond float16 after scaling
    codec.encode(deviations.copy(), sum_of_squares=(deviations**2).sum(0))
    assert codec.clipped == 1


# ------------------------------------------------------------------------- reading
def test_streamed_reader_matches_nibabel_and_handles_scaling(tmp_path):
    shape = (7, 6, 5, 9)
    data = np.random.default_rng(4).integers(-300, 300, shape).astype(np.int16)
    img = nib.Nifti1Image(data, SOURCE_AFFINE)
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    bold = open_bold(path)
    with FrameReader(bold, chunk_frames=2) as reader:
        chunks = [(t0, f.copy()) for t0, f in reader]
        digest = reader.sha256
    assert [t0 for t0, _ in chunks] == [0, 2, 4, 6, 8]
    streamed = np.concatenate([f for _, f in chunks]).transpose(1, 2, 3, 0)
    np.testing.assert_allclose(streamed, nib.load(str(path)).get_fdata(), rtol=1e-6)
    assert digest == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    # a multi-member gzip (e.g. written by a parallel compressor) reads the same
    raw = gzip.decompress(path.read_bytes())
    half = len(raw) // 2
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    with FrameReader(open_bold(multi), chunk_frames=4) as reader:
        again = np.concatenate([f.copy() for _, f in reader]).transpose(1, 2, 3, 0)
    np.testing.assert_array_equal(again, streamed)


# ----------------------------------------------------------------------- validator
def test_bids_validator_accepts_outputs(inputs, out):
    from validation import assert_valid_bids

    init_derivatives(out, inputs)
    for subject, grid in (("01", "nlin6"), ("02", "nlin2009c")):
        record = write_run(inputs, subject, grid, n_frames=5)
        assert preprocess_run(record, out, clip_length=5).status == "done"
    assert_valid_bids(out)
