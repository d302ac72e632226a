"""Small synthetic model-ready stores and model-grid label maps for tests and benchmarks.

Nothing here is used at run time. The runs are written through the store's
own code (:mod:`bids_regionmae.preprocess.store`: names from
:func:`model_ready_paths`, the brain mask, clip index and sidecar writers),
so they are exactly what participant level writes: a float16
``(T, 96, 96, 96)`` ``.npy`` per run, its brain mask (and optionally mean
image) as NIfTI on the model grid, a clip index TSV and, written last, the
JSON sidecar that marks the run complete.

The signal is a few smooth spatial modes driven by slow sinusoids with a
per-participant phase, plus a little noise, z-scored inside an ellipsoidal
brain mask: predictable enough that a tiny model's reconstruction loss falls
within a few dozen steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bids_regionmae.grid import MODEL_AFFINE, MODEL_RES, MODEL_SHAPE, MODEL_SPACE
from bids_regionmae.preprocess.store import (
    model_ready_paths,
    save_model_grid_image,
    write_brain_mask,
    write_clip_index,
    write_sidecar,
)

__all__ = ["synthetic_brain_mask", "synthetic_labels", "write_synthetic_store"]

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
    modes = _modes()
    sidecars = []
    for s in range(1, n_subjects + 1):
        subject = f"{subject_prefix}{s:02d}"
        mask = synthetic_brain_mask(MODEL_SHAPE, scale=1.0 + 0.02 * rng.standard_normal())
        phase = rng.uniform(0, 2 * np.pi, size=len(modes))
        for r in range(1, runs_per_subject + 1):
            data, mean, std = _run_data(modes, mask, phase, r, n_frames, noise, rng)
            entities = {"subject": subject, "task": "rest", "run": str(r)}
            paths = model_ready_paths(entities, output_dir)
            paths["data"].parent.mkdir(parents=True, exist_ok=True)
            np.save(paths["data"], data)
            write_brain_mask(paths, mask)
            files = {name: paths[name].name for name in ("data", "mask", "clips")}
            if write_mean:
                files["mean"] = paths["mean"].name
                mean_img = np.where(mask, 1000.0 + 100.0 * modes[0].reshape(MODEL_SHAPE), 0.0)
                save_model_grid_image(mean_img.astype(np.float32), paths["mean"])
            n_clips = write_clip_index(paths["clips"], n_frames, clip_length, clip_length, np.arange(n_frames) * 2.0)
            write_sidecar(paths["sidecar"], {
                "run_id": f"sub-{subject}_task-rest_run-{r}",
                "entities": entities,
                "sources": {"bold": {"path": f"synthetic/sub-{subject}_run-{r}_bold.nii.gz", "size": 0,
                                     "sha256": f"{rng.integers(0, 2**63):064x}"}},
                "space": MODEL_SPACE, "resolution": MODEL_RES,
                "grid": {"shape": list(MODEL_SHAPE), "affine": MODEL_AFFINE.tolist()},
                "repetition_time": 2.0,
                "frames": {"total": n_frames, "dropped": [], "kept": n_frames, "output": n_frames},
                "normalization": {"mean": mean, "std": std, "background_value": 0.0},
                "clips": {"length": clip_length, "stride": clip_length, "count": n_clips},
                "files": files,
                "inputs_fingerprint": f"synthetic-{seed}-{subject}-{r}",
                "synthetic": True,
            })
            sidecars.append(paths["sidecar"])
    return sorted(sidecars)


def _modes(n_modes: int = 4) -> np.ndarray:
    """Smooth spatial modes on the model grid, float32 (K, N)."""
    x, y, z = _coords(MODEL_SHAPE)
    return np.stack([np.broadcast_to(np.cos(np.pi * (k + 1) * x / 2 + k) * np.cos(np.pi * y * (k % 2 + 1))
                                     * np.cos(np.pi * z * (k // 2 + 1) / 2), MODEL_SHAPE).reshape(-1)
                     for k in range(n_modes)]).astype(np.float32)


def _run_data(modes: np.ndarray, mask: np.ndarray, phase: np.ndarray, run: int, n_frames: int, noise: float,
              rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """One run: the modes driven by slow sinusoids plus noise, z-scored in the brain; float16 (T, 96, 96, 96)."""
    mask_flat = mask.reshape(-1)
    brain_index = np.flatnonzero(mask_flat)
    t = np.arange(n_frames, dtype=np.float32)[:, None]
    courses = np.sin(2 * np.pi * t / (6.0 + 2 * np.arange(len(modes))) + phase + run).astype(np.float32)
    inside = courses @ modes[:, brain_index]  # (T, N_brain)
    inside += noise * rng.standard_normal(inside.shape, dtype=np.float32)
    mean, std = float(inside.mean()), float(inside.std())
    inside -= mean
    inside /= std
    data = np.zeros((n_frames, mask_flat.size), dtype=np.float16)
    data[:, brain_index] = inside
    return data.reshape(n_frames, *MODEL_SHAPE), mean, std
