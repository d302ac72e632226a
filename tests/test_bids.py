"""Tests of fMRIPrep input discovery (bids_regionmae.bids), on tiny synthetic trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_regionmae.bids import DiscoveryResult, discover_runs, list_participants, locate_fmriprep
from bids_regionmae.bids.entities import classify, parse_entities, run_key
from bids_regionmae.bids.index import build_index, fingerprint
from bids_regionmae.bids.validate import read_header, run_bids_validator
from bids_regionmae.config import InputConfig
from bids_regionmae.errors import (
    EXIT_INPUT_MISSING,
    EXIT_NO_MATCH,
    EXIT_USAGE,
    EXIT_VALIDATION,
    InputDataError,
    InputMissingError,
    NoMatchError,
    UsageError,
    ValidationError,
)
from bids_regionmae.testing.fmriprep import AFFINES, make_fmriprep_tree, make_raw_dataset, write_nifti

MNI6 = "MNI152NLin6Asym"
MNI09 = "MNI152NLin2009cAsym"


def cfg(**kwargs) -> InputConfig:
    return InputConfig(**kwargs)


@pytest.fixture
def fmriprep(tmp_path: Path) -> Path:
    """2 participants x 2 sessions x 2 runs, three spaces, full clutter."""
    return make_fmriprep_tree(tmp_path / "fmriprep", subjects=["01", "02"], sessions=["1", "2"],
                              runs=["1", "2"], spaces=[f"{MNI6}:res-2", MNI09, "T1w"])


def func_dir(root: Path, sub: str = "01", ses: str | None = None) -> Path:
    return root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"


def bold_name(ents: str, space: str = MNI6, res: str | None = "2", kind: str = "desc-preproc_bold") -> str:
    return f"{ents}_space-{space}" + (f"_res-{res}" if res else "") + f"_{kind}.nii.gz"


# --------------------------------------------------------------------------- entity parsing


NAMES = [
    "sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-preproc_bold.nii.gz",
    "sub-01_ses-2_task-nback_acq-mb4_run-03_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
    "sub-01_task-rest_echo-2_space-MNI152NLin6Asym_res-2_boldref.nii.gz",
    "sub-01_task-rest_run-1_desc-confounds_timeseries.tsv",
    "sub-01_task-rest_bold_space-MNI152NLin2009cAsym_preproc.nii.gz",
    "sub-01_task-rest_rec-mag_dir-AP_space-fsLR_den-91k_bold.dtseries.nii",
]


@pytest.mark.parametrize("name", NAMES)
def test_parse_entities_agrees_with_pybids(name):
    from bids.layout import parse_file_entities

    ours = parse_entities(name)
    theirs = parse_file_entities(f"/sub-01/func/{name}", config=["bids", "derivatives"])
    for key, value in ours.items():
        if key.startswith("__"):
            continue
        assert str(theirs[key]) == value, key  # pybids keeps run padding (PaddedInt)
    for key in ("subject", "session", "task", "run", "space", "res", "desc", "suffix", "extension"):
        assert (key in theirs) == (key in ours), key


def test_classify_kinds_and_clutter():
    assert classify(NAMES[0]).kind == "bold"
    assert classify(NAMES[1]).kind == "mask"
    assert classify(NAMES[2]).kind == "boldref"
    assert classify(NAMES[3]).kind == "confounds"
    legacy = classify(NAMES[4])
    assert legacy.kind == "bold" and legacy.legacy and legacy.entities["space"] == MNI09
    assert classify("sub-01_task-rest_desc-confounds_regressors.tsv").rank == 1
    assert classify("sub-01_task-rest_bold_confounds.tsv").rank == 2
    for clutter in (NAMES[5], "sub-01_task-rest_space-MNI152NLin6Asym_desc-smoothAROMAnonaggr_bold.nii.gz",
                    "sub-01_task-rest_bold_space-MNI152NLin2009cAsym_variant-smoothAROMAnonaggr_preproc.nii.gz",
                    "sub-01_task-rest_desc-coreg_boldref.nii.gz",
                    "sub-01_task-rest_hemi-L_space-fsaverage5_bold.func.gii",
                    "sub-01_task-rest_from-scanner_to-T1w_mode-image_xfm.txt", "sub-01_desc-preproc_T1w.nii.gz",
                    "sub-01_task-rest_run-1a_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz"):
        assert classify(clutter) is None, clutter
    padded, plain = parse_entities("sub-1_task-a_run-01_bold.nii"), parse_entities("sub-1_task-a_run-1_bold.nii")
    assert run_key(padded) == run_key(plain)


# --------------------------------------------------------------------------- locating the dataset


def test_locate_derivative_raw_and_mapping(tmp_path, monkeypatch):
    raw = make_raw_dataset(tmp_path / "raw")
    nested = make_fmriprep_tree(raw / "derivatives" / "fmriprep", clutter=False)
    assert locate_fmriprep(nested) == (nested, raw)  # derivative given directly: raw found above it
    assert locate_fmriprep(raw) == (nested, raw)
    elsewhere = make_fmriprep_tree(tmp_path / "out" / "fmriprep", clutter=False)
    monkeypatch.chdir(tmp_path)
    assert locate_fmriprep(raw, {"fmriprep": "out/fmriprep"}) == (elsewhere, raw)
    assert locate_fmriprep(elsewhere) == (elsewhere, None)


def test_locate_errors(tmp_path):
    with pytest.raises(InputMissingError) as exc:
        locate_fmriprep(tmp_path / "nope")
    assert exc.value.exit_code == EXIT_INPUT_MISSING
    raw = make_raw_dataset(tmp_path / "raw")
    with pytest.raises(InputMissingError, match="--derivatives fmriprep=PATH"):
        locate_fmriprep(raw)
    with pytest.raises(InputMissingError, match="no such directory"):
        locate_fmriprep(raw, {"fmriprep": str(tmp_path / "missing")})
    with pytest.raises(UsageError):
        locate_fmriprep(raw, {"a": str(raw), "b": str(raw)})
    (raw / "dataset_description.json").write_text("{not json")
    with pytest.raises(ValidationError) as exc:
        locate_fmriprep(raw)
    assert exc.value.exit_code == EXIT_VALIDATION


# --------------------------------------------------------------------------- discovery


def test_discover_modern_tree(fmriprep, tmp_path):
    res = discover_runs(fmriprep, cfg(), work_dir=tmp_path / "work")
    assert isinstance(res, DiscoveryResult)
    assert res.fmriprep_dir == fmriprep and res.raw_dir is None
    assert res.participants == ["01", "02"]
    assert [r.run_id for r in res.runs[:4]] == [
        "sub-01_ses-1_task-rest_run-1", "sub-01_ses-1_task-rest_run-2",
        "sub-01_ses-2_task-rest_run-1", "sub-01_ses-2_task-rest_run-2"]
    assert len(res.runs) == 8 and res.skipped == []
    rec = res.runs[0]
    assert rec.space == MNI6 and rec.res == "2" and rec.repetition_time == 2.0
    assert rec.bold.name == "sub-01_ses-1_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-preproc_bold.nii.gz"
    assert rec.mask.name == "sub-01_ses-1_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz"
    assert rec.boldref.name == "sub-01_ses-1_task-rest_run-1_space-MNI152NLin6Asym_res-2_boldref.nii.gz"
    assert rec.confounds.name == "sub-01_ses-1_task-rest_run-1_desc-confounds_timeseries.tsv"
    assert all(p.is_absolute() and p.exists() for p in (rec.bold, rec.mask, rec.boldref, rec.confounds))
    assert rec.entities == {"subject": "01", "session": "1", "task": "rest", "run": "1"}
    report = res.report
    assert report.n_runs == 8 and report.available["spaces"] == [MNI09, MNI6, "T1w"]
    json.dumps(report.to_dict())
    assert "8 run(s) found" in report.summary()


def test_space_and_resolution_preference(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", spaces=[f"{MNI6}:res-1", f"{MNI6}:res-2", MNI09], clutter=False)
    assert discover_runs(root, cfg()).runs[0].res == "2"
    assert discover_runs(root, cfg(space=[f"{MNI6}:res-1"])).runs[0].res == "1"
    rec = discover_runs(root, cfg(space=[MNI09, MNI6])).runs[0]
    assert (rec.space, rec.res) == (MNI09, None)
    assert rec.mask.name.startswith("sub-01_task-rest_run-1_space-MNI152NLin2009cAsym_desc-brain")
    with pytest.raises(UsageError) as exc:
        discover_runs(root, cfg(space=["T1w"]))
    assert exc.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError):
        discover_runs(root, cfg(space=[f"{MNI6}:2mm"]))


def test_fmriprep_14_naming(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", style="1.4", spaces=[MNI09], version="1.5.8")
    rec = discover_runs(root, cfg()).runs[0]
    assert rec.space == MNI09 and rec.confounds.name.endswith("_desc-confounds_regressors.tsv")


def test_fmriprep_legacy_naming(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", style="legacy", spaces=[MNI09, "T1w"], sidecars=False,
                              runs=["1", "2"], version="1.1.8")
    res = discover_runs(root, cfg())
    assert len(res.runs) == 2
    rec = res.runs[0]
    assert rec.bold.name == "sub-01_task-rest_run-1_bold_space-MNI152NLin2009cAsym_preproc.nii.gz"
    assert rec.mask.name == "sub-01_task-rest_run-1_bold_space-MNI152NLin2009cAsym_brainmask.nii.gz"
    assert rec.boldref.name.endswith("_bold_space-MNI152NLin2009cAsym_boldref.nii.gz")
    assert rec.confounds.name == "sub-01_task-rest_run-1_bold_confounds.tsv"
    assert rec.repetition_time == 2.0  # from the header: 1.x wrote no sidecars


def test_unsupported_space_and_missing_mask_are_skipped(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", subjects=["01", "02", "03"], clutter=False)
    for f in func_dir(root, "02").glob("*space-MNI*"):
        f.unlink()
    write_nifti(func_dir(root, "02") / bold_name("sub-02_task-rest_run-1", "T1w", None), (6, 4, 5, 10),
                AFFINES["T1w"])
    write_nifti(func_dir(root, "02") / bold_name("sub-02_task-rest_run-1", "MNIPediatricAsym", "1"),
                (4, 5, 6, 10))
    (func_dir(root, "03") / bold_name("sub-03_task-rest_run-1", kind="desc-brain_mask")).unlink()
    res = discover_runs(root, cfg())
    assert [r.subject for r in res.runs] == ["01"]
    assert res.participants == ["01"]
    reasons = dict((Path(p).name.split("_")[0], r) for p, r in res.skipped)
    assert "found MNIPediatricAsym, T1w" in reasons["sub-02"] and "--output-spaces" in reasons["sub-02"]
    assert "no desc-brain_mask" in reasons["sub-03"]
    assert "sub-02" in res.report.summary()


def test_only_unsupported_spaces_is_no_match(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", spaces=["T1w"], clutter=False)
    with pytest.raises(NoMatchError, match="spaces: T1w") as exc:
        discover_runs(root, cfg())
    assert exc.value.exit_code == EXIT_NO_MATCH


def test_level_minimal_and_anat_only(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", style="minimal")
    with pytest.raises(InputMissingError, match="--level minimal"):
        discover_runs(root, cfg())
    anat = make_fmriprep_tree(tmp_path / "anat", tasks=[])
    with pytest.raises(InputMissingError, match="--anat-only"):
        discover_runs(anat, cfg())


def test_raw_dataset_with_nested_derivatives_and_raw_tr(tmp_path):
    raw = make_raw_dataset(tmp_path / "raw", tr=1.5)
    root = make_fmriprep_tree(raw / "derivatives" / "fmriprep", sidecars=False, clutter=False)
    res = discover_runs(raw, cfg())
    assert res.raw_dir == raw and res.fmriprep_dir == root
    assert res.runs[0].repetition_time == 1.5  # raw top-level task-rest_bold.json wins over the header
    assert any("differs from the header" in w for w in res.report.warnings)


def test_tr_from_header_units(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", sidecars=False, clutter=False, spaces=[f"{MNI6}:res-2"])
    write_nifti(func_dir(root) / bold_name("sub-01_task-rest_run-1"), (4, 5, 6, 10), tr=800.0,
                time_units="msec")
    assert discover_runs(root, cfg()).runs[0].repetition_time == pytest.approx(0.8)


def test_multi_echo_and_extra_entities(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", runs=[None], clutter=False, spaces=[f"{MNI6}:res-2"])
    func = func_dir(root)
    for echo in ("1", "2"):
        write_nifti(func / bold_name(f"sub-01_task-rest_echo-{echo}"), (4, 5, 6, 10))
        write_nifti(func / bold_name(f"sub-01_task-rest_echo-{echo}", kind="desc-brain_mask"), (4, 5, 6))
    write_nifti(func / bold_name("sub-01_task-rest_acq-mb"), (4, 5, 6, 10))
    write_nifti(func / bold_name("sub-01_task-rest_acq-mb", kind="desc-brain_mask"), (4, 5, 6))
    res = discover_runs(root, cfg())
    assert [r.run_id for r in res.runs] == ["sub-01_task-rest", "sub-01_task-rest_acq-mb"]
    assert res.runs[1].extra == {"acquisition": "mb"} and res.runs[1].acquisition == "acq-mb"
    assert res.runs[1].entities["acquisition"] == "mb"
    assert any("per-echo" in w for w in res.report.warnings)


def test_pybids_backend_agrees(fmriprep, tmp_path):
    fast = discover_runs(fmriprep, cfg(), work_dir=tmp_path / "w1")
    slow = discover_runs(fmriprep, cfg(), work_dir=tmp_path / "w2", backend="pybids")
    assert slow.runs == fast.runs and slow.report.backend == "pybids"
    assert list((tmp_path / "w2" / "bids_index").glob("*.sqlite"))  # pybids database_path
    again = discover_runs(fmriprep, cfg(), work_dir=tmp_path / "w2", backend="pybids")
    assert again.report.cache == "hit" and again.runs == fast.runs


# --------------------------------------------------------------------------- filters


def test_label_filters(fmriprep):
    assert {r.subject for r in discover_runs(fmriprep, cfg(participant_label=["sub-02"])).runs} == {"02"}
    res = discover_runs(fmriprep, cfg(session_label=["2"], run=["01"]))
    assert [r.run_id for r in res.runs] == ["sub-01_ses-2_task-rest_run-1", "sub-02_ses-2_task-rest_run-1"]
    with pytest.raises(NoMatchError) as exc:
        discover_runs(fmriprep, cfg(participant_label=["01", "07"]))
    assert "07" in str(exc.value) and "participants (2): 01, 02" in str(exc.value)
    with pytest.raises(NoMatchError) as exc:
        discover_runs(fmriprep, cfg(task=["nback"]))
    message = str(exc.value)
    for expected in ("task=['nback']", "sessions: 1, 2", "tasks: rest", "runs: 1, 2",
                     "spaces: MNI152NLin2009cAsym, MNI152NLin6Asym, T1w"):
        assert expected in message
    assert exc.value.exit_code == EXIT_NO_MATCH


def test_bids_filters_semantics(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", sessions=[None], runs=["1", None], clutter=False,
                              spaces=[f"{MNI6}:res-2"])
    make_fmriprep_tree(root, subjects=["02"], sessions=["a", "b"], runs=["1"], clutter=False,
                       spaces=[f"{MNI6}:res-2"])
    ids = lambda flt: [r.run_id for r in discover_runs(root, cfg(bids_filters=flt)).runs]  # noqa: E731
    assert ids({"bold": {"session": None}}) == ["sub-01_task-rest", "sub-01_task-rest_run-1"]
    assert ids({"bold": {"session": "*"}}) == ["sub-02_ses-a_task-rest_run-1", "sub-02_ses-b_task-rest_run-1"]
    assert ids({"bold": {"session": ["b", None], "run": 1}}) == ["sub-01_task-rest_run-1",
                                                                 "sub-02_ses-b_task-rest_run-1"]
    assert ids({"bold": {"run": None}}) == ["sub-01_task-rest"]
    assert ids({"bold": {"ses": "a", "datatype": "func", "suffix": "bold"}}) == ["sub-02_ses-a_task-rest_run-1"]
    assert len(ids({"t1w": {"session": "x"}})) == 4  # other queries are fMRIPrep's business
    with pytest.raises(NoMatchError):
        ids({"bold": {"space": MNI09}})
    with pytest.raises(UsageError, match="unknown or unsupported entity 'colour'"):
        ids({"bold": {"colour": "red"}})


# --------------------------------------------------------------------------- validation


def _one_run(tmp_path: Path, **kwargs) -> tuple[Path, Path, Path]:
    root = make_fmriprep_tree(tmp_path / "fp", subjects=["01", "02"], clutter=False, spaces=[f"{MNI6}:res-2"],
                              **kwargs)
    func = func_dir(root)
    return root, func / bold_name("sub-01_task-rest_run-1"), func / bold_name("sub-01_task-rest_run-1",
                                                                              kind="desc-brain_mask")


def _skip_reason(root: Path, **kwargs) -> str:
    res = discover_runs(root, cfg(**kwargs))
    assert [r.subject for r in res.runs] == ["02"]
    assert len(res.skipped) == 1
    return res.skipped[0].reason


def test_empty_header_only_and_truncated_files(tmp_path):
    import gzip

    root, bold, mask = _one_run(tmp_path)
    good = bold.read_bytes()
    header = nib.load(str(bold)).header
    bold.write_bytes(b"")
    assert "empty file (0 bytes)" in _skip_reason(root)
    with gzip.open(bold, "wb") as fobj:
        fobj.write(header.binaryblock + b"\0" * 4)
    reason = _skip_reason(root)
    assert "holds only a header" in reason and str(bold) in reason and "re-run fMRIPrep" in reason
    bold.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    reason = _skip_reason(root)
    assert any(text in reason for text in ("truncated", "only a header", "cannot be read")), reason
    bold.write_bytes(b"x" * 400)
    assert "cannot be read as gzip" in _skip_reason(root)


def test_uncompressed_truncated_nifti(tmp_path):
    root, bold, mask = _one_run(tmp_path)
    plain = bold.with_name(bold.name[:-3])
    write_nifti(plain, (4, 5, 6, 10))
    bold.unlink()
    plain.write_bytes(plain.read_bytes()[:-100])
    assert "is truncated" in _skip_reason(root)


def test_3d_bold_and_mask_mismatches(tmp_path):
    root, bold, mask = _one_run(tmp_path)
    write_nifti(bold, (4, 5, 6))
    assert "3D image" in _skip_reason(root) and "expected 4D" in _skip_reason(root)
    write_nifti(bold, (4, 5, 6, 10))
    write_nifti(mask, (5, 4, 6))
    assert "mask shape (5, 4, 6) does not match" in _skip_reason(root)
    write_nifti(mask, (4, 5, 6), affine=AFFINES[MNI09])
    assert "mask affine differs" in _skip_reason(root)
    # validation off: headers are not checked
    assert len(discover_runs(root, cfg(skip_bids_validation=True)).runs) == 2


def test_duplicated_runs(tmp_path):
    root, bold, mask = _one_run(tmp_path)
    (bold.parent / bold.name.replace("run-1", "run-01")).write_bytes(bold.read_bytes())
    assert "duplicated run" in _skip_reason(root)


def test_symlinks_followed_and_broken_links_reported(tmp_path):
    root, bold, mask = _one_run(tmp_path)
    store = tmp_path / "annex" / "objects"
    store.mkdir(parents=True)
    target = store / "bold.nii.gz"
    bold.rename(target)
    bold.symlink_to(target)
    res = discover_runs(root, cfg())
    assert len(res.runs) == 2 and res.runs[0].bold == bold
    target.unlink()
    reason = _skip_reason(root)
    assert "broken symbolic link" in reason and "datalad get" in reason
    assert "broken symbolic link" in _skip_reason(root, skip_bids_validation=True)


def test_all_runs_bad_is_validation_error(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", clutter=False, spaces=[f"{MNI6}:res-2"])
    write_nifti(func_dir(root) / bold_name("sub-01_task-rest_run-1"), (4, 5, 6))
    with pytest.raises(ValidationError, match="none of the 1 selected run") as exc:
        discover_runs(root, cfg())
    assert exc.value.exit_code == EXIT_VALIDATION


def test_dataset_description_problems(tmp_path):
    root = make_fmriprep_tree(tmp_path / "fp", clutter=True, dataset_description=False)
    with pytest.raises(ValidationError, match="dataset_description.json: missing"):
        discover_runs(root, cfg())  # found through its sub-*.html reports (fMRIPrep 1.0/1.1)
    res = discover_runs(root, cfg(skip_bids_validation=True))
    assert len(res.runs) == 1 and any("missing" in w for w in res.report.warnings)
    (root / "dataset_description.json").write_text('{"Name": "x", ')
    with pytest.raises(ValidationError, match="not valid JSON"):
        discover_runs(root, cfg())
    (root / "dataset_description.json").write_text('["not", "an", "object"]')
    with pytest.raises(ValidationError, match="JSON object"):
        discover_runs(root, cfg())
    (root / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "qsiprep"}]}')
    assert any("not fMRIPrep" in w for w in discover_runs(root, cfg()).report.warnings)


def test_invalid_sidecar_and_tr(tmp_path):
    root, bold, mask = _one_run(tmp_path)
    sidecar = bold.with_name(bold.name.replace(".nii.gz", ".json"))
    sidecar.write_text('{"RepetitionTime": -1}')
    res = discover_runs(root, cfg())
    assert res.runs[0].repetition_time == 2.0  # falls back to the header
    assert any("must be positive" in w for w in res.report.warnings)


def test_read_header_direct(tmp_path):
    path = write_nifti(tmp_path / "x.nii.gz", (4, 5, 6, 7), tr=1.25)
    info = read_header(path)
    assert info.shape == (4, 5, 6, 7) and info.repetition_time == 1.25
    assert np.allclose(info.affine, AFFINES[MNI6])
    with pytest.raises(InputDataError, match="not a NIfTI"):
        (tmp_path / "y.nii").write_bytes(b"\0" * 600)
        read_header(tmp_path / "y.nii")


def test_paths_with_spaces_and_non_ascii(tmp_path):
    root = make_fmriprep_tree(tmp_path / "my data" / "études fMRIPrep ü", subjects=["01"], clutter=True)
    work = tmp_path / "wörk dir"
    res = discover_runs(root, cfg(), work_dir=work)
    assert len(res.runs) == 1 and res.runs[0].bold.exists()
    assert discover_runs(root, cfg(), work_dir=work).report.cache == "hit"


# --------------------------------------------------------------------------- cache


def test_cache_hit_and_rebuild(fmriprep, tmp_path):
    work = tmp_path / "work"
    first = discover_runs(fmriprep, cfg(), work_dir=work)
    assert first.report.cache == "miss"
    second = discover_runs(fmriprep, cfg(), work_dir=work)
    assert second.report.cache == "hit" and second.runs == first.runs
    assert discover_runs(fmriprep, cfg()).report.cache == "off"
    # another option set reuses the index
    assert discover_runs(fmriprep, cfg(space=[MNI09]), work_dir=work).report.cache == "hit"
    # a new participant changes the tree fingerprint
    make_fmriprep_tree(fmriprep, subjects=["03"], clutter=False)
    third = discover_runs(fmriprep, cfg(), work_dir=work)
    assert third.report.cache == "rebuilt" and third.participants == ["01", "02", "03"]
    # a file rewritten in place (same directory entries) is noticed too
    bold = third.runs[0].bold
    st = os.stat(bold)
    write_nifti(bold, (4, 5, 6))
    os.utime(bold, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fourth = discover_runs(fmriprep, cfg(), work_dir=work)
    assert fourth.report.cache == "rebuilt" and len(fourth.runs) == len(third.runs) - 1
    assert "expected 4D" in fourth.skipped[0].reason
    # removing a session
    import shutil

    shutil.rmtree(fmriprep / "sub-02" / "ses-2")
    assert len(discover_runs(fmriprep, cfg(), work_dir=work).runs) == len(fourth.runs) - 2


def test_fingerprint_and_index(fmriprep, tmp_path):
    fp = fingerprint(fmriprep)
    assert {".", "sub-01", "sub-01/ses-1", "sub-01/ses-1/func"} <= set(fp)
    index = build_index(fmriprep)
    assert index.subjects == ["01", "02"] == list_participants(fmriprep) and index.cache_status == "off"
    assert all(not f.relpath.startswith(("sub-01/anat", "sub-01/figures")) for f in index.files)


@pytest.mark.slow
def test_bids_validator_runs_on_raw(tmp_path):
    from bids_regionmae.bids.validate import find_bids_validator

    if find_bids_validator() is None:
        pytest.skip("bids-validator-deno not installed")
    raw = make_raw_dataset(tmp_path / "raw")
    ok, report = run_bids_validator(raw, timeout=120)
    assert isinstance(report, (dict, str))
