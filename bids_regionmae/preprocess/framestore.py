"""Model-grid frames between the passes of a run, in float16 on disk, and the output frames read back.

A run is read once; its resampled frames must wait until the run's global
mean and standard deviation are known. Holding them in memory as float32
would cost 708 MB for 200 frames (4.2 GB for an HCP-length run), so they are
stored in float16 in a file instead, as *deviations from the run's first
frame* scaled by a power of two:

    stored = (x - first_frame) * 2**k

Deviations are small next to BOLD intensities, so float16's relative
precision (2**-11) applies to the temporal signal rather than to the
baseline: the error is below 5e-4 of the deviation, the same order as the
float16 rounding of the final z-scores. When no time resampling is asked for,
the store *is* the output ``.npy`` file (its temporary name), normalised in
place at the end; the file lives in the page cache, not in the process's
resident memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bids_regionmae.grid import MODEL_SHAPE

if TYPE_CHECKING:
    from bids_regionmae.preprocess.resample import TimePlan

#: Largest stored magnitude (float16 max is 65504).
FLOAT16_LIMIT = 65000.0
N_VOXELS = int(np.prod(MODEL_SHAPE))
#: Model-grid frames per chunk in the passes after reading (14 MB in float32).
OUT_CHUNK = 4


class DeltaCodec:
    """Scale deviations from the reference frame into float16 and back.

    Parameters
    ----------
    reference : ndarray, shape (V,), float32
        The run's first model-grid frame (NaN read as 0).
    mask_index : ndarray, shape (V_mask,), int
        In-mask voxels; their median intensity sets the scale.

    Attributes
    ----------
    scale : float
        Power of two so that the median in-mask intensity maps to ~256:
        deviations up to ~250x the median intensity fit float16.
    clipped : int
        In-mask values whose deviation did not fit and was clipped.
    """

    def __init__(self, reference: np.ndarray, mask_index: np.ndarray):
        ref = np.where(np.isfinite(reference), reference, np.float32(0.0))
        self.mask_index = mask_index
        level = float(np.median(np.abs(ref[mask_index]))) if mask_index.size else 0.0
        self.scale = float(2.0 ** np.round(np.log2(256.0 / level))) if level > 0 and np.isfinite(level) else 1.0
        self.clipped = 0
        self._out = torch.empty(0, dtype=torch.float16)

    def encode(self, deviations: np.ndarray, sum_of_squares: np.ndarray | None = None) -> np.ndarray:
        """Deviations (n, V) float32 -> stored (n, V) float16, valid until the next call.

        ``deviations`` is overwritten. ``sum_of_squares`` (V,), the per-voxel
        sum of the chunk's squared deviations, bounds the largest one and
        spares a pass over the data when nothing can overflow.
        """
        block = np.multiply(deviations, np.float32(self.scale), out=deviations)
        limit = FLOAT16_LIMIT / self.scale
        if sum_of_squares is None or not float(np.max(sum_of_squares)) <= limit * limit:
            flat = block.reshape(-1)
            lo, hi = np.fmin.reduce(flat), np.fmax.reduce(flat)  # NaN markers ignored
            if lo < -FLOAT16_LIMIT or hi > FLOAT16_LIMIT:
                inside = np.abs(block[:, self.mask_index])
                self.clipped += int(np.count_nonzero(inside > FLOAT16_LIMIT))
                np.clip(block, -FLOAT16_LIMIT, FLOAT16_LIMIT, out=block)
        if self._out.numel() < block.size:  # reused: fresh large buffers cost page faults
            self._out = torch.empty(block.size, dtype=torch.float16)
        out = self._out[:block.size].view(block.shape)
        out.copy_(torch.from_numpy(block))  # vectorised cast (numpy's float16 cast is slow)
        return out.numpy()

    @staticmethod
    def widen(stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored (n, V) float16 -> the same scaled deviations in float32."""
        if out is None:
            out = np.empty(stored.shape, np.float32)
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(stored)))
        return out


class Float16FrameStore:
    """A file of (n_frames, V) float16 rows, written and read by frame ranges.

    Parameters
    ----------
    path : Path
        File to create (a temporary name).
    n_frames : int
    npy_shape : tuple of int, optional
        When given, the file starts with a ``.npy`` header for an array of this
        shape (float16, C order), so that the store can become the output.
    """

    def __init__(self, path: Path, n_frames: int, npy_shape: tuple[int, ...] | None = None):
        self.path = Path(path)
        self.n_frames = n_frames
        self.row_bytes = N_VOXELS * 2
        self.file = open(self.path, "w+b")  # noqa: SIM115 - closed in close()
        if npy_shape is not None:
            np.lib.format.write_array_header_1_0(
                self.file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                            "fortran_order": False, "shape": tuple(npy_shape)})
        self.offset = self.file.tell()

    def write(self, k0: int, rows: np.ndarray) -> None:
        """Write rows (n, V) float16 at frame k0."""
        self.file.seek(self.offset + k0 * self.row_bytes)
        self.file.write(np.ascontiguousarray(rows, dtype=np.float16).data)

    def read(self, k0: int, k1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows k0:k1, shape (k1 - k0, V), float16 (into ``out`` when given)."""
        if out is None:
            out = np.empty((k1 - k0, N_VOXELS), np.float16)
        self.file.seek(self.offset + k0 * self.row_bytes)
        if self.file.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise OSError(f"{self.path}: short read")
        return out

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            self.file.close()

    def __enter__(self) -> Float16FrameStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def output_frames(store: Float16FrameStore, plan: TimePlan,
                  chunk: int = OUT_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(m0, deviations)``: the output frames as stored (scaled deviations), (n, V) float32.

    With time resampling each output frame is ``(1 - w) * a + w * b`` of two
    stored frames (linear, so it commutes with the scaling); NaN markers
    propagate where ``w > 0``. The yielded array is reused: use it before
    asking for the next chunk.
    """
    n_out = len(plan)
    raw = np.empty(0, np.float16)
    wide = np.empty(0, np.float32)
    interpolated = np.empty((chunk, N_VOXELS), np.float32)
    for m0 in range(0, n_out, chunk):
        m1 = min(n_out, m0 + chunk)
        lo, hi = int(plan.index0[m0:m1].min()), int(plan.index1[m0:m1].max()) + 1
        size = (hi - lo) * N_VOXELS
        if raw.size < size:  # buffers are reused: fresh large arrays cost page faults
            raw, wide = np.empty(size, np.float16), np.empty(size, np.float32)
        source = DeltaCodec.widen(store.read(lo, hi, out=raw[:size].reshape(hi - lo, -1)),
                                  out=wide[:size].reshape(hi - lo, -1))
        if plan.identity:
            yield m0, source
            continue
        out = interpolated[:m1 - m0]
        for m in range(m0, m1):
            a = source[plan.index0[m] - lo]
            w = float(plan.weight1[m])
            if w == 0.0:
                out[m - m0] = a
            else:
                np.multiply(a, np.float32(1.0 - w), out=out[m - m0])
                out[m - m0] += np.float32(w) * source[plan.index1[m] - lo]
        yield m0, out
