"""Small synthetic model-ready stores and model-grid label maps for tests and benchmarks.

Nothing here is used at run time. The files follow the on-disk format that
participant level writes (documented in :mod:`bids_regionmae.preprocess.store`):
a float16 ``(T, 96, 96, 96)`` ``.npy`` per run, its brain mask and mean image
as NIfTI on the model grid, a clip index TSV and, written last, the JSON
sidecar that marks the run complete. The names are spelled out here (not
built with the output patterns) so that this inner room does not import the
outer ones; ``find_model_ready_runs`` reading these stores back is tested.

The signal is a few smooth spatial modes driven by slow sinusoids with a
per-participant phase, plus a little noise, z-scored inside an ellipsoidal
brain mask: predictable enough that a tiny model's reconstruction loss falls
within a few dozen steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE

__all__ = ["synthetic_brain_mask", "synthetic_labels", "write_synthetic_store"]

#: Store format written (must match ``bids_regionmae.preprocess.store.FORMAT``/``FORMAT_VERSION``).
STORE_FORMAT = "regionmae-modelready"
STORE_FORMAT_VERSION = 1


def _coords(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] along x, y, z, broadcastable to ``shape``."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def synthetic_brain_mask(shape: Sequence[int] = MODEL_SHAPE, scale: float = 1.0) -> np.ndarray:
    """An ellipsoidal "brain", bool array of ``shape`` (about 40% of the grid)."""
    x, y, z = _coords(shape)
    return (x / (0.72 * scale)) ** 2 + (y / (0.85 * scale)) ** 2 + (z / (0.75 * scale)) ** 2 <= 1.0


def synthetic_labels(shape: Sequence[int] = MODEL_SHAPE) -> np.ndarray:
    """AAL3-like labels on an ellipsoidal brain, int16 array of ``shape``.

    Each of the seven AAL3 lobe groups gets a zone of the ellipsoid, split
    into a left (x < 0) and a right label taken from that group's AAL3 index
    range: cerebellum (95/96) inferior-posterior, occipital (49/50) posterior,
    parietal (61/62) superior-posterior, frontal (1/2) anterior, temporal
    (83/84) lateral-inferior, limbic (37/38) medial, subcortical (75/76)
    central. Zones are big enough to hold whole 6^3 patches at 96^3 and at
    the 48^3 grid of the ``tiny`` variant.
    """
    x, y, z = _coords(shape)
    brain = synthetic_brain_mask(shape)
    full = np.broadcast_arrays(x, y, z)
    xs, ys, zs = (a.copy() for a in full)
    labels = np.zeros(tuple(shape), dtype=np.int16)
    left = xs < 0

    def put(zone: np.ndarray, pair: tuple[int, int]) -> None:
        sel = zone & brain & (labels == 0)
        labels[sel & left] = pair[0]
        labels[sel & ~left] = pair[1]

    put((np.abs(xs) < 0.25) & (np.abs(ys) < 0.3) & (np.abs(zs) < 0.25), (75, 76))  # subcortical
    put((zs < -0.25) & (ys < -0.05), (95, 96))  # cerebellum
    put((np.abs(xs) > 0.4) & (zs < 0.1), (83, 84))  # temporal
    put((ys < -0.35) & (zs < 0.45), (49, 50))  # occipital
    put((ys < 0.2) & (zs >= 0.1), (61, 62))  # parietal
    put((ys >= 0.2), (1, 2))  # frontal
    put(brain, (37, 38))  # limbic: the rest
    return labels


def _nifti(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, MODEL_AFFINE)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_synthetic_store(output_dir: str | Path, n_subjects: int = 4, n_frames: int = 16, *, clip_length: int = 8,
                          runs_per_subject: int = 1, seed: int = 0, noise: float = 0.1,
                          subject_prefix: str = "", write_mean: bool = False) -> list[Path]:
    """Write complete synthetic model-ready runs into ``output_dir``.

    Parameters
    ----------
    output_dir : path
        The app's output directory (created if needed).
    n_subjects : int
        Participants ``01``, ``02``, ... (with ``subject_prefix`` before the number).
    n_frames : int
        Frames per run (``T``).
    clip_length : int
        Frames per clip in the clip index (non-overlapping clips).
    runs_per_subject : int
        Runs ``1..runs_per_subject`` of task ``rest``.
    seed : int
    noise : float
        Standard deviation of white noise relative to the signal.
    subject_prefix : str
        Letters before the subject number (e.g. ``"S"`` -> ``sub-S01``).
    write_mean : bool
        Also write the ``desc-mean_boldref`` NIfTI (optional in the store; slow to compress).

    Returns
    -------
    list of Path
        The sidecars (``..._desc-modelready_bold.json``), sorted.
    """
    output_dir = Path(output_dir)
    rng = np.random.default_rng(seed)
    x, y, z = _coords(MODEL_SHAPE)
    n_modes = 4
    modes = np.stack([np.broadcast_to(np.cos(np.pi * (k + 1) * x / 2 + k) * np.cos(np.pi * y * (k % 2 + 1))
                                      * np.cos(np.pi * z * (k // 2 + 1) / 2), MODEL_SHAPE).reshape(-1)
                      for k in range(n_modes)]).astype(np.float32)  # (K, N)
    sidecars = []
    for s in range(1, n_subjects + 1):
        subject = f"{subject_prefix}{s:02d}"
        mask = synthetic_brain_mask(MODEL_SHAPE, scale=1.0 + 0.02 * rng.standard_normal())
        mask_flat = mask.reshape(-1)
        brain_index = np.flatnonzero(mask_flat)
        modes_in = modes[:, brain_index]
        phase = rng.uniform(0, 2 * np.pi, size=n_modes)
        for r in range(1, runs_per_subject + 1):
            prefix = f"sub-{subject}_task-rest_run-{r}_space-MNI152NLin6Asym_res-2"
            func = output_dir / f"sub-{subject}" / "func"
            func.mkdir(parents=True, exist_ok=True)
            t = np.arange(n_frames, dtype=np.float32)[:, None]
            courses = np.sin(2 * np.pi * t / (6.0 + 2 * np.arange(n_modes)) + phase + r).astype(np.float32)
            inside = courses @ modes_in  # (T, N_brain)
            inside += noise * rng.standard_normal(inside.shape, dtype=np.float32)
            mean, std = float(inside.mean()), float(inside.std())
            inside -= mean
            inside /= std
            data = np.zeros((n_frames, mask_flat.size), dtype=np.float16)
            data[:, brain_index] = inside
            files = {
                "data": f"{prefix}_desc-modelready_bold.npy",
                "mask": f"{prefix}_desc-brain_mask.nii.gz",
                "clips": f"{prefix}_desc-modelready_clips.tsv",
            }
            np.save(func / files["data"], data.reshape(n_frames, *MODEL_SHAPE))
            _nifti(func / files["mask"], mask.astype(np.uint8))
            if write_mean:
                files["mean"] = f"{prefix}_desc-mean_boldref.nii.gz"
                mean_img = np.where(mask, 1000.0 + 100.0 * modes[0].reshape(MODEL_SHAPE), 0.0)
                _nifti(func / files["mean"], mean_img.astype(np.float32))
            rows = [(i, start, clip_length, start * 2.0)
                    for i, start in enumerate(range(0, n_frames - clip_length + 1, clip_length))]
            (func / files["clips"]).write_text("clip\tonset_frame\tn_frames\tonset_seconds\n" + "".join(
                f"{i}\t{a}\t{n}\t{o:g}\n" for i, a, n, o in rows), encoding="utf-8")
            sidecar = {
                "format": STORE_FORMAT,
                "format_version": STORE_FORMAT_VERSION,
                "complete": True,
                "run_id": f"sub-{subject}_task-rest_run-{r}",
                "entities": {"subject": subject, "task": "rest", "run": str(r)},
                "sources": {"bold": {"path": f"synthetic/sub-{subject}_run-{r}_bold.nii.gz", "size": 0,
                                     "sha256": f"{rng.integers(0, 2**63):064x}"}},
                "space": "MNI152NLin6Asym",
                "resolution": "2",
                "grid": {"shape": list(MODEL_SHAPE), "affine": MODEL_AFFINE.tolist()},
                "repetition_time": 2.0,
                "frames": {"total": n_frames, "dropped": [], "kept": n_frames, "output": n_frames},
                "normalization": {"mean": mean, "std": std, "background_value": 0.0},
                "clips": {"length": clip_length, "stride": clip_length, "count": len(rows)},
                "files": files,
                "inputs_fingerprint": f"synthetic-{seed}-{subject}-{r}",
                "synthetic": True,
            }
            path = func / f"{prefix}_desc-modelready_bold.json"
            path.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            sidecars.append(path)
    return sorted(sidecars)
