"""Per-run statistics and the global in-mask z-score.

Normalisation follows NeuroSTORM: one mean and one standard deviation per
run, over all in-mask voxels and all frames (a *global* z-score), so that
regional amplitude differences survive; voxels outside the brain mask are set
to a constant background. Statistics are accumulated chunk by chunk (shifted
sums in float64, per voxel, then pooled), so a run never has to be in memory
in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: A run fails when more than this share of its in-mask values are NaN/Inf.
MAX_NONFINITE_FRACTION = 0.5
#: float16 range used when storing (values beyond would become inf).
FLOAT16_MAX = 65000.0


@dataclass
class RunStats:
    """Pooled statistics of one run on the model grid (before normalisation).

    Attributes
    ----------
    mean, std : float
        Global mean and standard deviation over in-mask, finite values.
    n_values : int
        In-mask finite values pooled.
    voxel_mean : ndarray, shape (V,), float32
        Temporal mean per voxel (all model-grid voxels; NaN-free).
    voxel_std : ndarray, shape (V_mask,), float64
        Temporal standard deviation of in-mask voxels.
    voxel_mean_mask : ndarray, shape (V_mask,), float64
        Temporal mean of in-mask voxels.
    constant : ndarray, shape (V_mask,), bool
        In-mask voxels whose value never changes.
    all_invalid : ndarray, shape (V_mask,), bool
        In-mask voxels that are NaN/Inf in every frame.
    n_nonfinite : int
        In-mask values that were NaN/Inf.
    all_zero : bool
        Every finite in-mask value is 0.
    """

    mean: float
    std: float
    n_values: int
    voxel_mean: np.ndarray
    voxel_std: np.ndarray
    voxel_mean_mask: np.ndarray
    constant: np.ndarray
    all_invalid: np.ndarray
    n_nonfinite: int
    all_zero: bool

    def tsnr_median(self) -> float | None:
        """Median temporal SNR (mean / std) over in-mask voxels that vary."""
        ok = (self.voxel_std > 0) & ~self.all_invalid
        if not ok.any():
            return None
        return float(np.median(self.voxel_mean_mask[ok] / self.voxel_std[ok]))


class StatsAccumulator:
    """Per-voxel sums of the deviations of model-grid frames from a reference frame.

    Parameters
    ----------
    reference : ndarray, shape (V,), float32
        The run's first model-grid frame (NaN markers read as 0). The same
        reference is used to store frames (:class:`~.framestore.DeltaCodec`),
        so one subtraction (fused into resampling) serves both.
    mask_index : ndarray, shape (V_mask,), int
        Flat indices of in-mask voxels.

    Notes
    -----
    Shifting by a value of the voxel itself keeps the float64 variance
    exact enough for any BOLD scale, and makes a constant voxel sum to
    exactly 0. NaN marks a value that was not finite in the input; it is
    left out of the sums.
    """

    def __init__(self, reference: np.ndarray, mask_index: np.ndarray):
        self.reference = np.where(np.isfinite(reference), reference, np.float32(0.0)).astype(np.float32)
        self.index = np.asarray(mask_index)
        n_voxels = self.reference.size
        self.s1 = np.zeros(n_voxels, np.float64)
        self.s2 = np.zeros(n_voxels, np.float64)
        self.count: np.ndarray | None = None  # per voxel, only once NaN markers were seen
        self.n_frames = 0
        self.any_nan = False
        #: Per-voxel sum of squared deviations of the last chunk (bounds its largest deviation).
        self.last_sq: np.ndarray | None = None

    def add(self, deviations: np.ndarray, may_have_nan: bool = False) -> None:
        """Add deviations from the reference, shape (n, V), float32."""
        n = deviations.shape[0]
        valid = ~np.isnan(deviations) if may_have_nan else None
        if valid is not None and not valid.all():
            if self.count is None:
                self.count = np.full(self.reference.size, self.n_frames, np.int64)
            self.any_nan = True
            self.count += valid.sum(0)
            d = np.where(valid, deviations, np.float32(0.0))
        else:
            if self.count is not None:
                self.count += n
            d = deviations
        self.s1 += d.sum(0)
        self.last_sq = np.einsum("ij,ij->j", d, d)
        self.s2 += self.last_sq
        self.n_frames += n

    def finish(self) -> RunStats:
        """Pool the sums into :class:`RunStats`."""
        idx = self.index
        count_all = self.count if self.count is not None else np.full(self.reference.size, self.n_frames)
        count = count_all[idx]
        ok = count > 0
        safe = np.maximum(count, 1)
        s1, s2, ref = self.s1[idx], self.s2[idx], self.reference[idx]
        mean_v = ref + s1 / safe
        m2_v = np.maximum(s2 - s1**2 / safe, 0.0)  # sum of squared deviations per voxel
        n_total = int(count.sum())
        if n_total:
            g_mean = float((mean_v[ok] * count[ok]).sum() / n_total)
            ss = float(m2_v[ok].sum() + (count[ok] * (mean_v[ok] - g_mean) ** 2).sum())
            g_std = float(np.sqrt(ss / n_total))
        else:
            g_mean, g_std = float("nan"), float("nan")
        voxel_mean = (self.reference + self.s1 / np.maximum(count_all, 1)).astype(np.float32)
        voxel_mean[idx] = np.where(ok, mean_v, 0.0)
        constant = ok & (s2 == 0) & (s1 == 0)
        all_zero = bool(ok.any() and np.all(constant[ok]) and np.all(ref[ok] == 0))
        return RunStats(
            mean=g_mean, std=g_std, n_values=n_total, voxel_mean=voxel_mean,
            voxel_std=np.sqrt(m2_v / safe), voxel_mean_mask=mean_v, constant=constant,
            all_invalid=~ok, n_nonfinite=int(self.n_frames * idx.size - n_total), all_zero=all_zero,
        )


class Normalizer:
    """Global z-score of stored deviations: ``z = stored * a + b`` per voxel.

    Parameters
    ----------
    mask_flat : ndarray, shape (V,), bool
        Brain mask on the model grid.
    reference : ndarray, shape (V,), float32
        Reference frame the deviations are taken from.
    deviation_scale : float
        Factor the stored deviations carry (``stored = (x - reference) * scale``).
    mean, std : float
        Global in-mask statistics of the run.
    background : float
        Value outside the mask and where the input was not finite.

    Notes
    -----
    Inside the mask ``a = 1 / (std * scale)`` and ``b = (reference - mean) / std``,
    so ``z = (x - mean) / std``; outside ``a = 0`` and ``b = background``.
    """

    def __init__(self, mask_flat: np.ndarray, reference: np.ndarray, deviation_scale: float, mean: float,
                 std: float, background: float):
        inv = 1.0 / std
        self.a = np.where(mask_flat, inv / deviation_scale, 0.0).astype(np.float32)
        self.b = np.where(mask_flat, (reference.astype(np.float64) - mean) * inv, background).astype(np.float32)
        self.background = np.float32(background)
        # |stored| <= FLOAT16_MAX, so |z| is bounded: clip only if the bound can exceed float16.
        self.needs_clip = bool(np.abs(self.a).max() * FLOAT16_MAX + np.abs(self.b).max() > FLOAT16_MAX)

    def __call__(self, stored: np.ndarray, may_have_nan: bool = True) -> np.ndarray:
        """Stored deviations (n, V) float32 -> z-scores (n, V) float16; ``stored`` is overwritten."""
        import torch

        np.multiply(stored, self.a, out=stored)
        np.add(stored, self.b, out=stored)
        if may_have_nan:
            np.copyto(stored, self.background, where=np.isnan(stored))
        if self.needs_clip:
            np.clip(stored, -FLOAT16_MAX, FLOAT16_MAX, out=stored)
        out = torch.empty(stored.shape, dtype=torch.float16)
        out.copy_(torch.from_numpy(stored))  # vectorised float16 cast (numpy's is slow)
        return out.numpy()
