"""Synthetic fMRIPrep derivative trees for tests and benchmarks.

The images are tiny but real NIfTI files with the affines of the 2 mm
MNI152NLin6Asym / MNI152NLin2009cAsym grids and deliberately unequal axis
lengths, so axis mix-ups show. Clutter (anatomical outputs, figures,
surfaces, transforms, CIFTI, AROMA, reports, logs) mirrors real fMRIPrep
output so discovery is exercised on realistic directory contents.

Nothing here is used at run time; it lives in the package so that tests and
benchmarks build the same trees.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from bids_regionmae.grid import SOURCE_AFFINE
from bids_regionmae.synthetic import SPACES

#: Real 2 mm template affines (RAS, origin as in TemplateFlow).
AFFINES = {
    "MNI152NLin6Asym": SOURCE_AFFINE,
    "MNI152NLin2009cAsym": SPACES["MNI152NLin2009cAsym"][1],
    "T1w": np.array([[-3.0, 0, 0, 100], [0, 3, 0, -110], [0, 0, 3.3, -60], [0, 0, 0, 1]]),
}
#: Tiny spatial shapes per space (x != y != z to catch axis mix-ups).
SHAPES = {"MNI152NLin6Asym": (4, 5, 6), "MNI152NLin2009cAsym": (5, 6, 4), "T1w": (6, 4, 5)}

DATASET_DESCRIPTION = {
    "Name": "fMRIPrep - fMRI PREProcessing workflow",
    "BIDSVersion": "1.9.0",
    "DatasetType": "derivative",
    "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.1"}],
}


def write_nifti(path: str | Path, shape: Sequence[int], affine: np.ndarray | None = None,
                tr: float | None = 2.0, dtype: str = "float32", time_units: str = "sec") -> Path:
    """Write a small NIfTI image filled with a seeded pattern.

    Parameters
    ----------
    path : path
        Destination (``.nii`` or ``.nii.gz``); parent directories are created.
    shape : sequence of int
        Image shape (3D or 4D).
    affine : array, optional
        4x4 affine; defaults to the MNI152NLin6Asym 2 mm affine.
    tr : float or None
        Repetition time written to ``pixdim[4]`` for 4D images.
    dtype : str
        Data type on disk.
    time_units : str
        nibabel time unit name (``"sec"``, ``"msec"``, ``"unknown"``).
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(shape) * 7 + int(np.prod(shape)))
    data = rng.standard_normal(tuple(shape)).astype(dtype) if dtype.startswith("float") else \
        np.ones(tuple(shape), dtype=dtype)
    img = nib.Nifti1Image(data, AFFINES["MNI152NLin6Asym"] if affine is None else affine)
    img.header.set_xyzt_units("mm", time_units)
    if len(shape) == 4 and tr is not None:
        zooms = list(img.header.get_zooms()[:3]) + [tr]
        img.header.set_zooms(zooms)
    img.header.set_qform(img.affine, 1)
    img.header.set_sform(img.affine, 4)
    nib.save(img, str(path))
    return path


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as JSON, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


class _Writer:
    """Write each distinct file content once, then hard-link (or copy) it."""

    def __init__(self, root: Path, link: bool):
        self.root = root
        self.link = link
        self.cache: dict[tuple, Path] = {}
        self.template_dir = root / ".templates" if link else None

    def nifti(self, path: Path, shape, affine, tr=2.0) -> None:
        key = ("nii", tuple(shape), tuple(np.asarray(affine).ravel()), tr, path.name.endswith(".gz"))
        self._put(path, key, lambda p: write_nifti(p, shape, affine, tr))

    def text(self, path: Path, text: str) -> None:
        self._put(path, ("txt", text), lambda p: p.write_text(text, encoding="utf-8"))

    def _put(self, path: Path, key, make) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.link:
            make(path)
            return
        src = self.cache.get(key)
        if src is None:
            assert self.template_dir is not None
            self.template_dir.mkdir(parents=True, exist_ok=True)
            src = self.template_dir / f"t{len(self.cache)}{''.join(path.suffixes)}"
            make(src)
            self.cache[key] = src
        try:
            os.link(src, path)
        except OSError:
            shutil.copyfile(src, path)

    def finish(self) -> None:
        if self.template_dir is not None and self.template_dir.exists():
            shutil.rmtree(self.template_dir)


def _parse_space(spec: str) -> tuple[str, str | None]:
    name, _, res = spec.partition(":")
    return name, (res.split("-", 1)[1] if res.startswith("res-") else (res or None))


def make_fmriprep_tree(
    root: str | Path,
    subjects: Iterable[str] = ("01",),
    sessions: Sequence[str | None] = (None,),
    tasks: Sequence[str] = ("rest",),
    runs: Sequence[str | None] = ("1",),
    spaces: Sequence[str] = ("MNI152NLin6Asym:res-2", "MNI152NLin2009cAsym"),
    style: str = "modern",
    n_vols: int = 10,
    tr: float = 2.0,
    sidecars: bool = True,
    clutter: bool = True,
    masks: bool = True,
    boldrefs: bool = True,
    confounds: bool = True,
    dataset_description: dict | None | bool = True,
    link: bool = False,
    version: str = "23.2.1",
) -> Path:
    """Create an fMRIPrep-like derivatives tree.

    Parameters
    ----------
    root : path
        Output directory (the fMRIPrep dataset root).
    subjects, sessions, tasks, runs : sequences
        Labels without prefixes; ``None`` in ``sessions``/``runs`` leaves the
        entity out.
    spaces : sequence of str
        fMRIPrep ``--output-spaces`` style specs (``"MNI152NLin6Asym:res-2"``,
        ``"T1w"``).
    style : {"modern", "1.4", "legacy", "minimal"}
        ``modern``: fMRIPrep >= 20.2 (``desc-confounds_timeseries``);
        ``1.4``: fMRIPrep 1.4-20.1 (``desc-confounds_regressors``);
        ``legacy``: fMRIPrep 1.0-1.3 (``_bold_space-X_preproc``);
        ``minimal``: ``--level minimal`` (boldrefs and transforms only).
    n_vols, tr : int, float
        Number of volumes and repetition time of each BOLD series.
    sidecars : bool
        Write JSON sidecars with ``RepetitionTime`` next to preprocessed BOLD.
    clutter : bool
        Also write anat/figures/surfaces/transforms/CIFTI/AROMA/report files.
    masks, boldrefs, confounds : bool
        Whether to write these companions.
    dataset_description : dict, bool or None
        True writes a standard derivative description, a dict writes that,
        False/None writes none.
    link : bool
        Hard-link identical files instead of writing each one (fast; used by
        the benchmark).
    version : str
        fMRIPrep version recorded in ``GeneratedBy``.

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    w = _Writer(root, link)
    if dataset_description is True:
        desc = dict(DATASET_DESCRIPTION)
        desc["GeneratedBy"] = [{"Name": "fMRIPrep", "Version": version}]
        write_json(root / "dataset_description.json", desc)
    elif isinstance(dataset_description, dict):
        write_json(root / "dataset_description.json", dataset_description)
    if clutter:
        (root / "logs").mkdir(exist_ok=True)
        (root / "logs" / "CITATION.md").write_text("fMRIPrep citation boilerplate\n")
        (root / "desc-aseg_dseg.tsv").write_text("index\tname\n0\tUnknown\n")
        (root / ".bidsignore").write_text("*.html\nlogs/\nfigures/\n")
    parsed_spaces = [_parse_space(s) for s in spaces]
    for sub in subjects:
        sdir = root / f"sub-{sub}"
        if clutter:
            w.text(root / f"sub-{sub}.html", "<html>report</html>")
            _anat_clutter(w, sdir, sub)
        for ses in sessions:
            func = sdir / (f"ses-{ses}" if ses else "") / "func"
            func.mkdir(parents=True, exist_ok=True)
            for task in tasks:
                for run in runs:
                    ents = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_task-{task}" + \
                        (f"_run-{run}" if run else "")
                    _write_run(w, func, ents, parsed_spaces, style, n_vols, tr, sidecars, clutter,
                               masks, boldrefs, confounds)
    w.finish()
    return root


def _anat_clutter(w: _Writer, sdir: Path, sub: str) -> None:
    anat = sdir / "anat"
    for name in (f"sub-{sub}_desc-preproc_T1w.nii.gz", f"sub-{sub}_desc-brain_mask.nii.gz",
                 f"sub-{sub}_dseg.nii.gz", f"sub-{sub}_label-GM_probseg.nii.gz",
                 f"sub-{sub}_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz",
                 f"sub-{sub}_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5",
                 f"sub-{sub}_from-MNI152NLin6Asym_to-T1w_mode-image_xfm.h5",
                 f"sub-{sub}_hemi-L_pial.surf.gii", f"sub-{sub}_hemi-R_pial.surf.gii",
                 f"sub-{sub}_hemi-L_white.surf.gii", f"sub-{sub}_hemi-R_midthickness.surf.gii"):
        w.text(anat / name, "x")
    figures = sdir / "figures"
    for name in ("desc-summary_T1w.html", "desc-reconall_T1w.svg", "task-rest_desc-carpetplot_bold.svg",
                 "task-rest_desc-rois_bold.svg", "task-rest_desc-coreg_bold.svg"):
        w.text(figures / f"sub-{sub}_{name}", "<svg/>")
    w.text(sdir / "log" / "20240101-000000_abc" / "fmriprep.toml", "[environment]\n")


def _write_run(w, func, ents, spaces, style, n_vols, tr, sidecars, clutter, masks, boldrefs,
               confounds) -> None:
    sidecar = json.dumps({"RepetitionTime": tr, "SkullStripped": False, "TaskName": "rest"})
    for space, res in spaces:
        shape = SHAPES.get(space, (4, 5, 6))
        affine = AFFINES.get(space, AFFINES["MNI152NLin6Asym"])
        if style == "legacy":
            base = f"{ents}_bold_space-{space}"
            w.nifti(func / f"{base}_preproc.nii.gz", (*shape, n_vols), affine, tr)
            if masks:
                w.nifti(func / f"{base}_brainmask.nii.gz", shape, affine, None)
            if boldrefs:
                w.nifti(func / f"{base}_boldref.nii.gz", shape, affine, None)
            if clutter:
                w.nifti(func / f"{base}_variant-smoothAROMAnonaggr_preproc.nii.gz",
                        (*shape, n_vols), affine, tr)
            continue
        base = f"{ents}_space-{space}" + (f"_res-{res}" if res else "")
        if style != "minimal":
            w.nifti(func / f"{base}_desc-preproc_bold.nii.gz", (*shape, n_vols), affine, tr)
            if sidecars:
                w.text(func / f"{base}_desc-preproc_bold.json", sidecar)
        if masks and style != "minimal":
            w.nifti(func / f"{base}_desc-brain_mask.nii.gz", shape, affine, None)
            w.text(func / f"{base}_desc-brain_mask.json", '{"Type": "Brain"}')
        if boldrefs:
            w.nifti(func / f"{base}_boldref.nii.gz", shape, affine, None)
        if clutter and style != "minimal":
            w.text(func / f"{base}_desc-aparcaseg_dseg.nii.gz", "x")
            if space == "MNI152NLin6Asym":
                w.text(func / f"{base}_desc-smoothAROMAnonaggr_bold.nii.gz", "x")
    if confounds and style != "minimal":
        if style == "legacy":
            w.text(func / f"{ents}_bold_confounds.tsv", "global_signal\tcsf\n1\t2\n")
        else:
            suffix = "timeseries" if style == "modern" else "regressors"
            w.text(func / f"{ents}_desc-confounds_{suffix}.tsv", "global_signal\tcsf\n1\t2\n")
            w.text(func / f"{ents}_desc-confounds_{suffix}.json", "{}")
    if clutter:
        for name in ("from-scanner_to-T1w_mode-image_xfm.txt",
                     "from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt",
                     "from-orig_to-boldref_mode-image_desc-hmc_xfm.txt",
                     "desc-coreg_boldref.nii.gz", "desc-hmc_boldref.nii.gz",
                     "space-fsLR_den-91k_bold.dtseries.nii",
                     "hemi-L_space-fsaverage5_bold.func.gii", "hemi-R_space-fsaverage5_bold.func.gii",
                     "AROMAnoiseICs.csv", "desc-MELODIC_mixing.tsv"):
            w.text(func / f"{ents}_{name}", "x")


def make_raw_dataset(
    root: str | Path,
    subjects: Iterable[str] = ("01",),
    tasks: Sequence[str] = ("rest",),
    tr: float | None = 2.0,
    participants: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Create a minimal raw BIDS dataset (description, participants.tsv, one BOLD per task).

    Parameters
    ----------
    root : path
        Dataset root.
    subjects, tasks : sequences
        Labels without prefixes.
    tr : float or None
        ``RepetitionTime`` written to top-level ``task-<task>_bold.json``
        sidecars (None: no sidecar).
    participants : dict, optional
        ``{"01": {"dx": "1", "site": "A"}, ...}`` rows for participants.tsv.
    """
    root = Path(root)
    write_json(root / "dataset_description.json",
               {"Name": "synthetic", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    subjects = list(subjects)
    if participants:
        columns = sorted({c for row in participants.values() for c in row})
        lines = ["\t".join(["participant_id", *columns])]
        for sub, row in participants.items():
            lines.append("\t".join([f"sub-{sub}", *(row.get(c, "n/a") for c in columns)]))
        (root / "participants.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for task in tasks:
        if tr is not None:
            write_json(root / f"task-{task}_bold.json", {"RepetitionTime": tr, "TaskName": task})
    for sub in subjects:
        for task in tasks:
            write_nifti(root / f"sub-{sub}" / "func" / f"sub-{sub}_task-{task}_bold.nii.gz",
                        (3, 4, 5, 6), AFFINES["T1w"], tr or 2.0)
    return root
