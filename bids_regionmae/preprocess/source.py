"""Reading one fMRIPrep run: entry checks, streamed frames, confounds, hashes.

Every problem with a file becomes an :class:`~bids_regionmae.errors.InputDataError`
that names the file, the problem and the fix, so that one broken run fails
alone.

Frames are streamed: the NIfTI voxel data is stored with x fastest and time
slowest, so a block of frames is one contiguous byte range. A reader thread
reads the file once from the start (hashing the raw bytes with sha256 on the
way) and inflates ``.nii.gz`` with zlib into chunks of whole frames; the
consumer gets ``(n, X, Y, Z)`` float32 chunks and never holds the whole run.
Reading ``img.dataobj[..., t0:t1]`` instead would re-inflate the file from
its start for every chunk of a ``.nii.gz`` (quadratic), and ``get_fdata``
would hold the whole run in float64 (1.7 GB for 97x115x97x200).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_regionmae.errors import InputDataError
from bids_regionmae.grid import SOURCE_AFFINE

try:  # ISA-L inflates 2-3x faster than zlib; optional, same API.
    from isal import isal_zlib as _zlib  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _zlib = zlib

#: Template spaces accepted as input (TemplateFlow identifiers). All are MNI152
#: variants whose world coordinates agree within a few mm; runs in them are
#: resampled by world coordinates onto the MNI152NLin6Asym model grid.
SUPPORTED_SPACES: tuple[str, ...] = (
    "MNI152NLin6Asym", "MNI152NLin6Sym", "MNI152NLin2009cAsym", "MNI152NLin2009cSym",
    "MNI152NLin2009aAsym", "MNI152NLin2009aSym", "MNI152NLin2009bAsym", "MNI152NLin2009bSym",
    "MNI152Lin",
)
#: Centre of mass (mm) and bounding box of the TemplateFlow MNI152NLin6Asym res-02
#: brain mask; used to recognise runs that are not in an MNI space.
MNI_BRAIN_CENTROID = np.array([0.6, -21.5, 9.8])
MNI_BRAIN_BOX = np.array([[-70.0, -106.0, -72.0], [72.0, 72.0, 80.0]])
#: A run's field of view must cover this share of the MNI brain box...
MIN_BOX_COVERAGE = 0.9
#: ...and its brain mask's centre must lie this close (mm) to the MNI one.
MAX_CENTROID_DISTANCE = 40.0
#: Largest rotation (degrees) of the voxel axes against the MNI axes.
MAX_OBLIQUITY_DEG = 1.0
#: Bytes of float32 frames per streamed chunk.
CHUNK_BYTES = 16 * 2**20  # 4 frames of 97x115x97 float32
_READ_BLOCK = 4 * 2**20

_GZIP_ERRORS = (zlib.error, EOFError, OSError)
if _zlib is not zlib:  # pragma: no cover
    _GZIP_ERRORS = (*_GZIP_ERRORS, _zlib.error)

_FIX_CORRUPT = ("Re-run fMRIPrep for this run or copy the file again (check it with `gzip -t`); "
                "or exclude the run with --bids-filter-file.")


@dataclass
class BoldSource:
    """A checked 4-D BOLD image, ready to stream.

    Attributes
    ----------
    path : Path
    shape : tuple of int, length 4
        ``(X, Y, Z, T)``.
    affine : ndarray, shape (4, 4)
    zooms : tuple of float
        Voxel sizes (mm) and the header's TR.
    dtype : numpy dtype
        On-disk dtype (with byte order).
    offset : int
        Byte offset of the voxel data in the uncompressed stream.
    slope, inter : float
        NIfTI scaling (``1, 0`` when unscaled).
    compressed : bool
        The voxel data is gzip-compressed.
    data_path : Path
        File holding the voxels (``path``, or the ``.img`` of a NIfTI pair).
    """

    path: Path
    shape: tuple[int, int, int, int]
    affine: np.ndarray
    zooms: tuple[float, ...]
    dtype: np.dtype
    offset: int
    slope: float
    inter: float
    compressed: bool
    header_tr: float | None = None
    image: nib.Nifti1Image | None = field(default=None, repr=False)
    data_path: Path | None = None

    def __post_init__(self) -> None:
        if self.data_path is None:
            self.data_path = self.path

    @property
    def n_frames(self) -> int:
        return self.shape[3]

    @property
    def frame_bytes(self) -> int:
        return int(np.prod(self.shape[:3])) * self.dtype.itemsize


def _load_nifti(path: Path, what: str) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: {what} not found. Re-run discovery, or check that fMRIPrep finished "
                             "for this run.")
    try:
        img = nib.load(str(path))
    except _GZIP_ERRORS as exc:
        raise InputDataError(f"{path}: cannot read the {what}: corrupted file ({type(exc).__name__}: {exc}). "
                             + _FIX_CORRUPT) from exc
    except Exception as exc:  # nibabel raises ImageFileError, ValueError, HeaderDataError...
        raise InputDataError(f"{path}: not a readable NIfTI {what} ({type(exc).__name__}: {exc}). "
                             + _FIX_CORRUPT) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputDataError(f"{path}: {what} is a {type(img).__name__}, expected NIfTI (.nii or .nii.gz). "
                             "Point at fMRIPrep's NIfTI outputs.")
    return img


def open_bold(path: str | Path) -> BoldSource:
    """Open and check a BOLD run without reading its voxels.

    Parameters
    ----------
    path : path
        ``desc-preproc_bold`` NIfTI.

    Returns
    -------
    BoldSource

    Raises
    ------
    InputDataError
        Unreadable or corrupted header, not 4-D, a single frame, an
        unsupported data type, or a non-finite affine.
    """
    path = Path(path)
    img = _load_nifti(path, "BOLD image")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        raise InputDataError(f"{path}: 3D image {shape}, expected 4D (x, y, z, t). Check that you pointed at "
                             "desc-preproc_bold, not boldref or a mask.")
    if len(shape) != 4:
        raise InputDataError(f"{path}: {len(shape)}D image {shape}, expected 4D (x, y, z, t). "
                             "Give a single-echo preprocessed BOLD series.")
    if min(shape) < 1:
        raise InputDataError(f"{path}: empty image {shape}. Re-run fMRIPrep for this run.")
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputDataError(f"{path}: invalid affine (sform/qform) {affine.tolist()}. Fix the header or "
                             "re-run fMRIPrep.")
    proxy = img.dataobj
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise InputDataError(f"{path}: voxel type {dtype} is not supported (need integer or float). "
                             "Convert the image to float32.")
    data_path = Path(img.file_map["image"].filename or path)
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    zooms = tuple(float(z) for z in img.header.get_zooms())
    header_tr = None
    if len(zooms) > 3 and zooms[3] > 0:
        units = img.header.get_xyzt_units()[1]
        header_tr = zooms[3] / 1000.0 if units == "msec" else zooms[3] / 1e6 if units == "usec" else zooms[3]
    return BoldSource(
        path=path, shape=shape, affine=affine, zooms=zooms, dtype=dtype,
        offset=int(getattr(proxy, "offset", img.header.get_data_offset())),
        slope=float(slope if slope is not None and np.isfinite(slope) else 1.0),
        inter=float(inter if inter is not None and np.isfinite(inter) else 0.0),
        compressed=str(data_path).endswith(".gz"), header_tr=header_tr, image=img, data_path=data_path,
    )


def load_mask(path: str | Path, bold: BoldSource) -> np.ndarray:
    """Read the brain mask and check that it lies on the BOLD grid.

    Parameters
    ----------
    path : path
        ``desc-brain_mask`` NIfTI, 3-D.
    bold : BoldSource

    Returns
    -------
    ndarray, shape (X, Y, Z), bool

    Raises
    ------
    InputDataError
        Unreadable, not 3-D, not on the BOLD grid, or empty.
    """
    path = Path(path)
    img = _load_nifti(path, "brain mask")
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputDataError(f"{path}: brain mask is {len(shape)}D {tuple(img.shape)}, expected 3D. "
                             "Give fMRIPrep's desc-brain_mask of the same run and space.")
    if shape != bold.shape[:3] or not np.allclose(img.affine, bold.affine, atol=1e-3):
        raise InputDataError(
            f"{path}: brain mask does not match the BOLD grid (mask {shape}, affine origin "
            f"{np.round(img.affine[:3, 3], 2).tolist()}; BOLD {bold.shape[:3]}, origin "
            f"{np.round(bold.affine[:3, 3], 2).tolist()}). Use the desc-brain_mask with the same space-/res- "
            "entities as the BOLD run.")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except _GZIP_ERRORS as exc:
        raise InputDataError(f"{path}: cannot read the brain mask: corrupted file ({type(exc).__name__}: {exc}). "
                             + _FIX_CORRUPT) from exc
    mask = data >= 0.5 if data.dtype.kind == "f" else data > 0
    if not mask.any():
        raise InputDataError(f"{path}: brain mask is empty. Re-run fMRIPrep for this run.")
    return mask


def check_mni(bold: BoldSource, mask: np.ndarray, space: str) -> None:
    """Refuse runs that are not in a supported MNI space.

    Checks the ``space-`` entity, then the image itself: axes parallel to
    MNI's (template outputs are never oblique), a field of view that covers
    the MNI brain, and a brain mask centred where the MNI brain is. A
    native-space run labelled as MNI fails the last two.

    Raises
    ------
    InputDataError
    """
    fix = ("Run fMRIPrep with --output-spaces MNI152NLin6Asym:res-2 (the model's grid, fastest) or "
           "MNI152NLin2009cAsym, and select that space.")
    if space not in SUPPORTED_SPACES:
        raise InputDataError(f"{bold.path}: space-{space} is not supported (supported: "
                             f"{', '.join(SUPPORTED_SPACES)}). {fix}")
    linear = bold.affine[:3, :3]
    cosines = np.abs(linear / np.linalg.norm(linear, axis=0))
    angle = float(np.degrees(np.arccos(np.clip(cosines.max(axis=0).min(), -1.0, 1.0))))
    if angle > MAX_OBLIQUITY_DEG:
        raise InputDataError(f"{bold.path}: labelled space-{space} but its voxel axes are rotated by "
                             f"{angle:.1f} degrees against MNI axes (a native-space image?). {fix}")
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in bold.shape[:3]], indexing="ij")).reshape(3, -1).T
    world = corners @ linear.T + bold.affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    overlap = np.clip(np.minimum(hi, MNI_BRAIN_BOX[1]) - np.maximum(lo, MNI_BRAIN_BOX[0]), 0, None)
    coverage = float(np.prod(overlap) / np.prod(MNI_BRAIN_BOX[1] - MNI_BRAIN_BOX[0]))
    if coverage < MIN_BOX_COVERAGE:
        raise InputDataError(f"{bold.path}: labelled space-{space} but its field of view (x {lo[0]:.0f}..{hi[0]:.0f},"
                             f" y {lo[1]:.0f}..{hi[1]:.0f}, z {lo[2]:.0f}..{hi[2]:.0f} mm) covers "
                             f"{coverage:.0%} of the MNI brain box. {fix}")
    centroid = np.argwhere(mask).mean(0) @ linear.T + bold.affine[:3, 3]
    distance = float(np.linalg.norm(centroid - MNI_BRAIN_CENTROID))
    if distance > MAX_CENTROID_DISTANCE:
        raise InputDataError(f"{bold.path}: labelled space-{space} but its brain mask is centred at "
                             f"{np.round(centroid, 1).tolist()} mm, {distance:.0f} mm from the MNI brain centre. "
                             f"{fix}")


def is_model_source_grid(bold: BoldSource) -> bool:
    """The run is on fMRIPrep's MNI152NLin6Asym res-2 grid (91x109x91, 2 mm)."""
    return bold.shape[:3] == (91, 109, 91) and np.allclose(bold.affine, SOURCE_AFFINE, atol=1e-4)


# ------------------------------------------------------------------ streaming
class _Stop(Exception):
    pass


class FrameReader:
    """Stream float32 frame chunks of a BOLD file from a background thread.

    The thread reads the file once from the start, feeds every raw byte to
    sha256 and inflates ``.nii.gz`` on the fly; at most ``prefetch`` chunks
    wait in the queue, so memory stays at a few chunks.

    Parameters
    ----------
    bold : BoldSource
    chunk_frames : int, optional
        Frames per chunk (default: about :data:`CHUNK_BYTES` of float32).
    prefetch : int
        Chunks read ahead.

    Examples
    --------
    >>> with FrameReader(bold) as reader:  # doctest: +SKIP
    ...     for t0, frames in reader:       # frames: (n, X, Y, Z) float32
    ...         ...
    ...     digest = reader.sha256          # of the whole file, once read
    """

    def __init__(self, bold: BoldSource, chunk_frames: int | None = None, prefetch: int = 2):
        self.bold = bold
        n_vox = int(np.prod(bold.shape[:3]))
        self.chunk_frames = int(chunk_frames or max(1, CHUNK_BYTES // (4 * n_vox)))
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        # Recycled chunk buffers: fresh large allocations cost page faults every time.
        self._free: queue.Queue = queue.Queue()
        for _ in range(max(1, prefetch) + 2):
            self._free.put(np.empty(self.chunk_frames * bold.frame_bytes, np.uint8))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sha256: str | None = None

    def __enter__(self) -> FrameReader:
        self._thread = threading.Thread(target=self._run, name="bold-reader", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while self._thread is not None and self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        if self._thread is not None:
            self._thread.join()

    def _take_buffer(self) -> np.ndarray:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stop

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def _run(self) -> None:
        try:
            hasher = hashlib.sha256()
            with open(self.bold.data_path, "rb") as raw:
                stream = _Inflater(raw, hasher) if self.bold.compressed else _Plain(raw, hasher)
                stream.skip(self.bold.offset)
                frame_bytes = self.bold.frame_bytes
                t, total = 0, self.bold.n_frames
                while t < total:
                    n = min(self.chunk_frames, total - t)
                    buf = self._take_buffer()
                    got = stream.readinto(memoryview(buf)[:n * frame_bytes])
                    if got < n * frame_bytes:
                        raise InputDataError(
                            f"{self.bold.path}: file is truncated: the header promises {total} frames but the "
                            f"data ends within frame {t + got // frame_bytes}. " + _FIX_CORRUPT)
                    self._put((t, n, buf))
                    t += n
                stream.drain()
            self.sha256 = hasher.hexdigest()
            self._put(None)
        except _Stop:
            return
        except InputDataError as exc:
            self._safe_put(exc)
        except _GZIP_ERRORS as exc:
            self._safe_put(InputDataError(f"{self.bold.path}: corrupted data ({type(exc).__name__}: {exc}). "
                                          + _FIX_CORRUPT))
        except BaseException as exc:  # pragma: no cover - unexpected
            self._safe_put(exc)

    def _safe_put(self, item) -> None:
        try:
            self._put(item)
        except _Stop:
            pass

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(t0, frames)`` with frames of shape (n, X, Y, Z), float32.

        A chunk may share memory with a recycled buffer: use it before asking
        for the next one (copy what must outlive the loop step).
        """
        if self._thread is None:
            raise RuntimeError("use FrameReader inside a 'with' block")
        X, Y, Z, _ = self.bold.shape
        scaled = self.bold.slope != 1.0 or self.bold.inter != 0.0
        as_is = self.bold.dtype == np.dtype(np.float32) and not scaled
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            t0, n, buf = item
            raw = buf[:n * X * Y * Z * self.bold.dtype.itemsize].view(self.bold.dtype)
            frames = raw.reshape(n, Z, Y, X).transpose(0, 3, 2, 1)
            if not as_is:
                frames = frames.astype(np.float32)  # keeps the memory layout (order="K")
                if scaled:
                    frames *= np.float32(self.bold.slope)
                    frames += np.float32(self.bold.inter)
            try:
                yield t0, frames
            finally:
                # The chunk may be a view of the buffer: recycle it only once the consumer moved on.
                del frames, raw
                self._free.put(buf)


class _Plain:
    def __init__(self, raw, hasher):
        self.raw, self.hasher = raw, hasher

    def skip(self, n: int) -> None:
        self.hasher.update(self.raw.read(n))

    def readinto(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            k = self.raw.readinto(view[got:])
            if not k:
                break
            self.hasher.update(view[got:got + k])
            got += k
        return got

    def drain(self) -> None:
        while block := self.raw.read(_READ_BLOCK):
            self.hasher.update(block)


class _Inflater:
    """Sequential gzip inflation (multi-member aware) that hashes the raw bytes."""

    def __init__(self, raw, hasher):
        self.raw, self.hasher = raw, hasher
        self.dec = _zlib.decompressobj(31)
        self.pending = b""

    def _feed(self) -> bool:
        block = self.raw.read(_READ_BLOCK)
        if not block:
            return False
        self.hasher.update(block)
        self.pending = block
        return True

    def readinto(self, view: memoryview) -> int:
        """Fill ``view``; returns fewer bytes only at the end of the file."""
        got = 0
        while got < len(view):
            if self.dec.eof:  # end of a gzip member: another may follow
                rest = self.dec.unused_data
                self.dec = _zlib.decompressobj(31)
                self.pending = rest if rest.strip(b"\0") else b""
            if not self.pending and not self._feed():
                break
            out = self.dec.decompress(self.pending, len(view) - got)
            self.pending = self.dec.unconsumed_tail
            view[got:got + len(out)] = out
            got += len(out)
        return got

    def skip(self, n: int) -> None:
        buf = bytearray(n)
        if self.readinto(memoryview(buf)) < n:
            raise EOFError("compressed stream ended inside the NIfTI header")

    def drain(self) -> None:
        """Inflate what is left (normally the stream's end) so that zlib checks the CRC."""
        sink = memoryview(bytearray(1 << 20))
        while self.readinto(sink) == len(sink):
            pass


# ------------------------------------------------------------------ confounds
@dataclass
class Confounds:
    """What preprocessing uses from fMRIPrep's confounds table.

    Attributes
    ----------
    nonsteady : ndarray, shape (T,), bool
        Frames flagged by a ``non_steady_state_outlier*`` column.
    framewise_displacement : ndarray, shape (T,), float or None
        ``framewise_displacement`` (NaN where ``n/a``).
    """

    nonsteady: np.ndarray
    framewise_displacement: np.ndarray | None


def read_confounds(path: str | Path | None, n_frames: int) -> Confounds:
    """Read the non-steady-state flags and FD of a run.

    Parameters
    ----------
    path : path or None
        ``desc-confounds_timeseries.tsv`` (or the older ``_regressors.tsv``).
    n_frames : int
        Frames of the BOLD run; the table must have one row per frame.

    Returns
    -------
    Confounds

    Raises
    ------
    InputDataError
        Unreadable table, or a row count that does not match the run.
    """
    if path is None:
        return Confounds(np.zeros(n_frames, bool), None)
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", "NaN", ""], low_memory=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{path}: cannot read the confounds table ({type(exc).__name__}: {exc}). "
                             "Give fMRIPrep's desc-confounds_timeseries.tsv of this run.") from exc
    if len(table) != n_frames:
        raise InputDataError(f"{path}: confounds table has {len(table)} rows but the BOLD run has {n_frames} "
                             "frames. Use the confounds file of the same run.")
    flags = np.zeros(n_frames, bool)
    for column in table.columns:
        name = str(column).lower().replace("_", "")
        if name.startswith("nonsteadystateoutlier"):
            flags |= table[column].fillna(0).to_numpy(dtype=float) > 0.5
    fd = None
    for column in ("framewise_displacement", "FramewiseDisplacement"):
        if column in table.columns:
            fd = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
            break
    return Confounds(flags, fd)
