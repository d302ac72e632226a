"""Resampling of BOLD frames onto the model grid, in space and in time.

Space
-----
Every input grid is mapped onto the model grid (:data:`bids_regionmae.grid.MODEL_AFFINE`,
96^3 at 2 mm) through world coordinates: model voxel ``(i, j, k)`` is sent to
millimetres with ``MODEL_AFFINE`` and back to continuous source voxel
coordinates with the inverse of the source affine. Values are trilinear
interpolations of the eight neighbouring source voxels; neighbours outside the
source field of view count as 0 (``padding_mode="zeros"`` in torch,
``mode="grid-constant"`` in scipy). Three equivalent engines are chosen from the
affines alone:

``"crop"``
    the mapping is a whole-voxel shift (same voxel size, same axes, possibly
    flipped or permuted). Trilinear interpolation then reads exactly one source
    voxel, so a crop/pad is bitwise what resampling gives. This is the path of
    fMRIPrep's ``MNI152NLin6Asym:res-2`` outputs (the model's own source grid,
    identical to :func:`bids_regionmae.grid.source_to_model`), and also of
    ``MNI152NLin2009cAsym`` at 2 mm (97x115x97, origin (-96, -132, -78)), which
    happens to sit on the same lattice, shifted by (1, 9, 1) voxels.
``"separable"``
    the axes are parallel (any voxel size, e.g. native-resolution 3x3x3.3 mm
    runs in MNI space): trilinear interpolation is three 1-D linear
    interpolations, each a matrix product with a (96, n) matrix that has two
    non-zero weights per row (BLAS is ~15x faster here than gathers, and the
    products leave the result directly in model axis order).
``"grid_sample"``
    anything else (oblique affines): ``torch.nn.functional.grid_sample``
    (trilinear, ``align_corners=True``).

Resampling an ``MNI152NLin2009cAsym`` run by world coordinates puts it on the
``MNI152NLin6Asym`` grid without a template-to-template warp. The two templates
differ by a few millimetres; the design accepts this (``DESIGN.md``: inputs in
other spaces are "resampled by their affines"), and the sidecar records the
source space. Run fMRIPrep with ``--output-spaces MNI152NLin6Asym:res-2`` to
avoid it.

Time
----
:func:`time_plan` gives, for each output frame, two input frames and a weight
(linear interpolation along time, used when a target TR is requested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE

#: Largest deviation (in source voxels) from a whole-voxel shift that still
#: takes the exact crop path.
EXACT_TOLERANCE = 1e-4
#: Largest off-axis component of the voxel mapping that still counts as
#: axis-parallel (separable interpolation).
AXIS_TOLERANCE = 1e-6


class SpatialResampler:
    """Trilinear resampling of frames from one source grid onto the model grid.

    Parameters
    ----------
    source_affine : ndarray, shape (4, 4)
        Voxel-to-world (mm) affine of the source image.
    source_shape : tuple of int, length 3
        Spatial shape ``(X, Y, Z)`` of the source image.
    method : {"auto", "crop", "separable", "grid_sample"}
        Engine; ``"auto"`` picks the fastest exact one for the affines.
        ``"crop"`` is refused when the mapping is not a whole-voxel shift,
        ``"separable"`` when the axes are not parallel.

    Attributes
    ----------
    method : str
        The engine in use.
    voxel_map : ndarray, shape (4, 4)
        Model voxel -> source voxel affine (``inv(source_affine) @ MODEL_AFFINE``).
    """

    def __init__(self, source_affine: np.ndarray, source_shape: tuple[int, ...], method: str = "auto"):
        source_affine = np.asarray(source_affine, dtype=float)
        if source_affine.shape != (4, 4) or not np.all(np.isfinite(source_affine)):
            raise ValueError(f"source_affine must be a finite 4x4 matrix, got {source_affine!r}")
        if len(source_shape) != 3 or min(source_shape) < 1:
            raise ValueError(f"source_shape must be 3 positive ints, got {source_shape}")
        self.source_shape = tuple(int(n) for n in source_shape)
        self.voxel_map = np.linalg.inv(source_affine) @ MODEL_AFFINE
        linear = self.voxel_map[:3, :3]
        # For each source axis, the model axis it varies with (None if oblique).
        pairing = _axis_pairing(linear)
        shift_ok = pairing is not None and all(
            abs(abs(linear[a, m]) - 1.0) <= EXACT_TOLERANCE
            and abs(self.voxel_map[a, 3] - round(self.voxel_map[a, 3])) <= EXACT_TOLERANCE
            for a, m in enumerate(pairing))
        if method == "auto":
            method = "crop" if shift_ok else ("separable" if pairing is not None else "grid_sample")
        if method not in {"crop", "separable", "grid_sample"}:
            raise ValueError(f"method must be 'auto', 'crop', 'separable' or 'grid_sample', got {method!r}")
        if method == "crop" and not shift_ok:
            raise ValueError("method='crop' needs a whole-voxel shift between the grids; use 'auto'")
        if method == "separable" and pairing is None:
            raise ValueError("method='separable' needs axis-parallel grids; use 'auto'")
        self.method = method
        self._pairing = pairing
        if method == "crop":
            self._crop = [self._crop_axis(a, m) for a, m in enumerate(pairing)]
        elif method == "separable":
            self._weights = [torch.from_numpy(self._axis_weights(a, m)) for a, m in enumerate(pairing)]
        else:
            self._grid = self._sampling_grid()

    # ------------------------------------------------------------------ plans
    def _crop_axis(self, a: int, m: int) -> tuple[slice, slice, bool]:
        step = int(round(self.voxel_map[a, m]))
        offset = int(round(self.voxel_map[a, 3]))
        n_src, n_out = self.source_shape[a], MODEL_SHAPE[m]
        idx = offset + step * np.arange(n_out)
        valid = np.flatnonzero((idx >= 0) & (idx < n_src))
        if valid.size == 0:
            return slice(0, 0), slice(0, 0), False
        dst = slice(int(valid[0]), int(valid[-1]) + 1)
        lo, hi = int(idx[valid].min()), int(idx[valid].max())
        return dst, slice(lo, hi + 1), step < 0

    def _axis_weights(self, a: int, m: int) -> np.ndarray:
        """(96, n_a) float32 matrix of 1-D linear interpolation from source axis a to model axis m."""
        n_src = self.source_shape[a]
        coord = self.voxel_map[a, m] * np.arange(MODEL_SHAPE[m]) + self.voxel_map[a, 3]
        # Snap coordinates within rounding error of a voxel centre.
        near = np.abs(coord - np.round(coord)) <= EXACT_TOLERANCE
        coord = np.where(near, np.round(coord), coord)
        i0 = np.floor(coord).astype(np.int64)
        w1 = coord - i0
        weights = np.zeros((MODEL_SHAPE[m], n_src), np.float64)
        for neighbour, w in ((i0, 1.0 - w1), (i0 + 1, w1)):
            ok = (neighbour >= 0) & (neighbour < n_src) & (w > 0)  # outside the field of view counts as 0
            weights[np.flatnonzero(ok), neighbour[ok]] += w[ok]
        return weights.astype(np.float32)

    def _sampling_grid(self) -> torch.Tensor:
        ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in MODEL_SHAPE], indexing="ij"), -1)
        src = ijk @ self.voxel_map[:3, :3].T + self.voxel_map[:3, 3]  # (96, 96, 96, 3) x, y, z
        size = np.array(self.source_shape, dtype=np.float64)
        norm = np.where(size > 1, 2.0 * src / np.maximum(size - 1, 1) - 1.0, 0.0)
        return torch.from_numpy(norm.astype(np.float32)).unsqueeze(0)  # (1, 96, 96, 96, 3)

    # ------------------------------------------------------------- resampling
    def __call__(self, frames: np.ndarray, out: np.ndarray | None = None,
                 subtract: np.ndarray | None = None) -> np.ndarray:
        """Resample a chunk of frames.

        Parameters
        ----------
        frames : ndarray, shape (n, X, Y, Z), float32
            Source frames (any strides; the natural view of a NIfTI frame
            chunk is ``raw.reshape(n, Z, Y, X).transpose(0, 3, 2, 1)``). Must
            be finite: replace NaN/Inf first (they would leak into neighbours).
        out : ndarray, shape (n, 96, 96, 96), float32, optional
            C-contiguous destination.
        subtract : ndarray, shape (96, 96, 96), float32, optional
            Subtracted from every resampled frame.

        Returns
        -------
        ndarray, shape (n, 96, 96, 96), float32
            Frames on the model grid (minus ``subtract``), axes ``(t, x, y, z)``.
        """
        if frames.ndim != 4 or tuple(frames.shape[1:]) != self.source_shape:
            raise ValueError(f"frames must have shape (n, {', '.join(map(str, self.source_shape))}), "
                             f"got {frames.shape}")
        n = frames.shape[0]
        if out is None:
            out = np.empty((n, *MODEL_SHAPE), dtype=np.float32)
        if self.method == "crop":
            self._apply_crop(frames, out, subtract)
            return out
        if self.method == "separable":
            self._apply_separable(frames, out)
        else:
            self._apply_grid_sample(frames, out)
        if subtract is not None:
            np.subtract(out, subtract, out=out)
        return out

    def _apply_crop(self, frames: np.ndarray, out: np.ndarray, subtract: np.ndarray | None = None) -> None:
        src = [slice(None)]
        dst_by_model: list[slice] = [slice(0, 0)] * 3
        for a, (dst, s, flip) in enumerate(self._crop):
            src.append(slice(s.stop - 1, s.start - 1 if s.start > 0 else None, -1) if flip else s)
            dst_by_model[self._pairing[a]] = dst
        block = frames[tuple(src)]
        # Source axis a holds model axis pairing[a]; reorder to model axes.
        order = [0] + [1 + self._pairing.index(m) for m in range(3)]
        block = block.transpose(order)
        if any(d.stop - d.start != MODEL_SHAPE[m] for m, d in enumerate(dst_by_model)):
            out[...] = 0.0
        # A plain (transposing) copy, then a contiguous subtraction: numpy's strided copy is
        # about twice as fast as a ufunc reading the transposed source.
        out[(slice(None), *dst_by_model)] = block
        if subtract is not None:
            np.subtract(out, subtract, out=out)

    def _apply_separable(self, frames: np.ndarray, out: np.ndarray) -> None:
        # (n, X, Y, Z) view -> the (n, Z, Y, X) memory order of a NIfTI chunk (x fastest)
        x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 2, 1)))
        n, nz = x.shape[0], x.shape[1]
        w_x, w_y, w_z = self._weights  # per source axis: (96, n_axis)
        t = torch.matmul(x, w_x.T)  # (n, Z, Y, Mx)
        t = torch.matmul(t.transpose(-1, -2), w_y.T)  # (n, Z, Mx, My)
        t = torch.matmul(t.reshape(n, nz, -1).transpose(1, 2), w_z.T)  # (n, Mx * My, Mz)
        # Mx/My/Mz are the model axes that source x/y/z run along: reorder to (t, x, y, z).
        t = t.reshape(n, *(MODEL_SHAPE[m] for m in self._pairing))
        order = [0] + [1 + self._pairing.index(m) for m in range(3)]
        torch.from_numpy(out).copy_(t.permute(order))

    def _apply_grid_sample(self, frames: np.ndarray, out: np.ndarray) -> None:
        x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 2, 1)))  # (n, Z, Y, X)
        res = torch.nn.functional.grid_sample(x.unsqueeze(0), self._grid, mode="bilinear",
                                              padding_mode="zeros", align_corners=True)
        torch.from_numpy(out).copy_(res[0])

    def resample_mask(self, mask: np.ndarray) -> np.ndarray:
        """Resample a 3-D brain mask: trilinear interpolation of 0/1, kept where > 0.5.

        Parameters
        ----------
        mask : ndarray, shape (X, Y, Z), bool

        Returns
        -------
        ndarray, shape (96, 96, 96), bool
        """
        values = self(np.asarray(mask, dtype=np.float32)[None])[0]
        return values > 0.5

    def describe(self) -> dict:
        """A JSON-able summary (engine and voxel mapping) for the sidecar."""
        return {"method": self.method, "model_voxel_to_source_voxel": self.voxel_map.round(6).tolist()}


def _axis_pairing(linear: np.ndarray) -> list[int] | None:
    """For each source axis, the only model axis it depends on; None if oblique."""
    pairing = []
    for a in range(3):
        row = np.abs(linear[a])
        m = int(np.argmax(row))
        if row[m] == 0 or np.any(np.delete(row, m) > AXIS_TOLERANCE * row[m]):
            return None
        pairing.append(m)
    return pairing if sorted(pairing) == [0, 1, 2] else None


# ---------------------------------------------------------------------- time
@dataclass(frozen=True)
class TimePlan:
    """Which input frames make each output frame.

    Attributes
    ----------
    times : ndarray, shape (T_out,)
        Acquisition time of each output frame (s, from the start of the run).
    index0, index1 : ndarray, shape (T_out,), int
        Positions among the kept input frames.
    weight1 : ndarray, shape (T_out,), float
        Output = (1 - weight1) * frame[index0] + weight1 * frame[index1].
    repetition_time : float
        Spacing of the output frames (s).
    """

    times: np.ndarray
    index0: np.ndarray
    index1: np.ndarray
    weight1: np.ndarray
    repetition_time: float

    @property
    def identity(self) -> bool:
        """Output frames are the kept input frames, unchanged."""
        return bool(np.all(self.weight1 == 0) and np.array_equal(self.index0, np.arange(self.index0.size)))

    def __len__(self) -> int:
        return int(self.times.size)


def time_plan(kept_times: np.ndarray, repetition_time: float, target_tr: float | None = None) -> TimePlan:
    """Plan linear interpolation along time.

    Parameters
    ----------
    kept_times : ndarray, shape (T_kept,)
        Acquisition times (s) of the frames kept after dropping, increasing.
    repetition_time : float
        Original TR (s).
    target_tr : float, optional
        Output TR (s). None keeps the kept frames as they are.

    Returns
    -------
    TimePlan
        With ``T_out = floor((t_last - t_first) / target_tr) + 1`` frames
        starting at the first kept frame when ``target_tr`` is given.
    """
    kept_times = np.asarray(kept_times, dtype=float)
    n = kept_times.size
    if target_tr is None or n == 0 or abs(target_tr - repetition_time) <= 1e-9 * repetition_time and \
            np.allclose(np.diff(kept_times), repetition_time):
        idx = np.arange(n)
        return TimePlan(kept_times.copy(), idx, idx.copy(), np.zeros(n), float(repetition_time))
    span = kept_times[-1] - kept_times[0]
    n_out = int(np.floor(span / target_tr + 1e-9)) + 1
    times = kept_times[0] + target_tr * np.arange(n_out)
    i1 = np.searchsorted(kept_times, times, side="right")
    i1 = np.clip(i1, 1, max(n - 1, 1))
    i0 = i1 - 1
    if n == 1:
        return TimePlan(times, np.zeros(n_out, int), np.zeros(n_out, int), np.zeros(n_out), float(target_tr))
    w1 = (times - kept_times[i0]) / (kept_times[i1] - kept_times[i0])
    w1 = np.clip(w1, 0.0, 1.0)
    # Exact hits on an input frame read that frame alone.
    exact = np.isclose(w1, 1.0, atol=1e-9)
    i0 = np.where(exact, i1, i0)
    w1 = np.where(exact | np.isclose(w1, 0.0, atol=1e-9), 0.0, w1)
    i1 = np.where(w1 == 0.0, i0, i1)
    return TimePlan(times, i0.astype(int), i1.astype(int), w1, float(target_tr))
