"""Input validation of fMRIPrep derivatives: what is checked, by which tool, how bad it is.

Checks run by :func:`bids_regionmae.bids.discover.discover_runs` unless
``skip_bids_validation`` is set. Every message names the file, the problem
and the fix.

Whole-dataset problems (raise :class:`~bids_regionmae.errors.ValidationError`,
exit 16):

* ``dataset_description.json`` of the fMRIPrep dataset missing, not valid
  JSON, or not a JSON object (:func:`check_dataset_description`); the raw
  dataset's description when one is given. Missing ``Name``/``BIDSVersion``
  is only a warning.
* every run that matched the filters was rejected by the per-run checks.

Per-run problems (the run is skipped and listed in the
:class:`~bids_regionmae.bids.discover.DiscoveryReport`, other runs go on):

* file-name parsing: pybids' own entity regexes (``bids/layout/config``),
  see :mod:`bids_regionmae.bids.entities`; a name with an unknown entity or an
  invalid label is not a candidate;
* duplicated runs: two files that map to the same entities (``run-1`` and
  ``run-01``, or ``.nii`` next to ``.nii.gz``);
* symbolic links are followed; a broken link (e.g. DataLad/git-annex content
  not retrieved) is reported;
* empty files (0 bytes), files that hold only a header or are truncated
  (data shorter than the header promises: file size for ``.nii``, the gzip
  trailer ISIZE for ``.nii.gz``), unreadable or non-NIfTI headers;
* the BOLD series is not 4D (or has a single volume);
* the brain mask's shape or affine differs from the BOLD's (header-only
  read with nibabel, never the data);
* no usable repetition time (sidecar ``RepetitionTime``, raw sidecar, or
  ``pixdim[4]`` with its ``xyzt_units``).

Not checked here: the full BIDS specification. The official validator
(``bids-validator-deno``, installed with the ``test`` extra) understands
derivative datasets too; :func:`run_bids_validator` runs it on demand (it
takes seconds to minutes on large datasets, so discovery never calls it).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_regionmae.errors import InputDataError, ValidationError

_TIME_UNITS = {8: 1.0, 16: 1e-3, 24: 1e-6}  # NIfTI xyzt_units time codes -> seconds


@dataclass(frozen=True)
class HeaderInfo:
    """What discovery needs from a NIfTI header (JSON-serialisable via :meth:`to_dict`).

    Attributes
    ----------
    shape : tuple of int
        Image shape.
    affine : tuple of tuple of float
        Best affine (sform, else qform) as nibabel chooses it.
    zooms : tuple of float
        ``pixdim[1:ndim+1]``.
    time_unit_s : float or None
        Seconds per unit of ``pixdim[4]``; None when the header says "unknown".
    """

    shape: tuple[int, ...]
    affine: tuple[tuple[float, ...], ...]
    zooms: tuple[float, ...]
    time_unit_s: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for the discovery cache)."""
        return {"shape": list(self.shape), "affine": [list(r) for r in self.affine],
                "zooms": list(self.zooms), "time_unit_s": self.time_unit_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeaderInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["shape"]), tuple(tuple(r) for r in data["affine"]),
                   tuple(data["zooms"]), data["time_unit_s"])

    @property
    def repetition_time(self) -> float | None:
        """``pixdim[4]`` in seconds for 4D images, None if absent or non-positive."""
        if len(self.zooms) < 4 or self.zooms[3] <= 0:
            return None
        unit = self.time_unit_s
        if unit is None:  # unknown units: fMRIPrep writes seconds; > 100 must be ms
            unit = 1e-3 if self.zooms[3] > 100 else 1.0
        return float(self.zooms[3]) * unit


def check_dataset_description(root: str | Path, what: str = "fMRIPrep derivatives",
                              required: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Read and check ``dataset_description.json``.

    Parameters
    ----------
    root : path
        Dataset root.
    what : str
        Dataset role for messages.
    required : bool
        If False (``--skip-bids-validation``), problems become warnings.

    Returns
    -------
    description : dict
        The parsed description ({} when missing or invalid and not required).
    warnings : list of str
        Non-fatal findings.

    Raises
    ------
    ValidationError
        Missing, invalid JSON or not a JSON object (only when ``required``).
    """
    path = Path(root) / "dataset_description.json"
    warnings: list[str] = []
    problem = None
    data: Any = {}
    if not path.is_file():
        problem = (f"{path}: missing. A BIDS ({what}) dataset needs a dataset_description.json; "
                   "fMRIPrep >= 1.2 writes one. Point to the right directory, add the file "
                   '({"Name": ..., "BIDSVersion": ..., "DatasetType": "derivative"}), '
                   "or pass --skip-bids-validation.")
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = (f"{path}: not valid JSON ({exc}). Fix the file (e.g. check it with "
                       "`python -m json.tool`) or pass --skip-bids-validation.")
            data = {}
        else:
            if not isinstance(data, dict):
                problem = f"{path}: must hold a JSON object, found {type(data).__name__}."
                data = {}
    if problem is not None:
        if required:
            raise ValidationError(problem)
        warnings.append(problem)
        return {}, warnings
    for key in ("Name", "BIDSVersion"):
        if key not in data:
            warnings.append(f"{path}: required field {key!r} missing (continuing).")
    return data, warnings


def is_derivative_description(description: dict[str, Any]) -> bool:
    """True when a dataset description declares a derivative dataset."""
    return (str(description.get("DatasetType", "")).lower() == "derivative"
            or "GeneratedBy" in description or "PipelineDescription" in description)


def check_file(path: str | Path, st: os.stat_result | None = None) -> str | None:
    """Existence checks that need no header: broken symlink, not a file, empty.

    Parameters
    ----------
    path : path
        File to check.
    st : os.stat_result, optional
        Result of ``os.stat(path)`` when the caller already has it.

    Returns
    -------
    str or None
        A problem description, or None when the file looks present.
    """
    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
    if st is None:
        if os.path.islink(path):
            target = os.readlink(path)
            hint = (" It looks like DataLad/git-annex content that was not retrieved; run "
                    "`datalad get` on it." if "annex/objects" in target
                    else " Restore the target or replace the link by the file.")
            return f"{path}: broken symbolic link to {target!r}.{hint}"
        return f"{path}: file does not exist (was it removed during discovery?)."
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file."
    if st.st_size == 0:
        return (f"{path}: empty file (0 bytes). The fMRIPrep run that wrote it probably "
                "failed or was copied incompletely; re-run or re-copy this participant.")
    return None


def _gunzip_head(path: str, raw: bytes, size: int) -> bytes:
    """First ``size`` decompressed bytes of a gzip file whose first bytes are ``raw``."""
    if raw[:2] != b"\x1f\x8b":
        raise OSError("not a gzip file")
    try:
        return zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(raw, size)
    except zlib.error:
        with gzip.open(path, "rb") as fobj:  # unusual gzip layout: let the gzip module cope
            return fobj.read(size)


def read_header(path: str | Path, st: os.stat_result | None = None) -> HeaderInfo:
    """Read a NIfTI-1/2 header with nibabel, and check the data is all there.

    Only the first few kilobytes and (for ``.nii.gz``) the 4-byte gzip
    trailer are read; the image data is never decompressed except when the
    trailer disagrees with the header (truncated or multi-member gzip), in
    which case the stream is decompressed once to count its bytes.

    Parameters
    ----------
    path : path
        NIfTI file (``.nii`` or ``.nii.gz``).
    st : os.stat_result, optional
        ``os.stat(path)`` when already known.

    Raises
    ------
    InputDataError
        The file is missing, empty, not NIfTI, header-only or truncated.
    """
    import nibabel as nib

    path = os.fspath(path)
    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
    problem = check_file(path, st)
    if problem:
        raise InputDataError(problem)
    assert st is not None
    gz = path.endswith(".gz")
    try:
        with open(path, "rb") as fobj:
            raw = fobj.read(8192 if gz else 544)
            isize = None
            if gz and st.st_size >= 18:
                fobj.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", fobj.read(4))[0]
        block = _gunzip_head(path, raw, 544) if gz else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise InputDataError(f"{path}: cannot be read as {'gzip' if gz else 'a file'} ({exc}). "
                             "The file is corrupt or truncated; re-copy it or re-run fMRIPrep.") from exc
    header_class = None
    if len(block) >= 4:
        for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
            if len(block) >= size and size in (struct.unpack("<i", block[:4])[0],
                                               struct.unpack(">i", block[:4])[0]):
                header_class = klass
                break
    if header_class is None:
        raise InputDataError(f"{path}: not a NIfTI file (header size field is not 348 or 540, "
                             f"{len(block)} bytes read). Check that this is the image fMRIPrep wrote.")
    try:
        hdr = header_class(block[:size], check=False)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        affine = hdr.get_best_affine()
        zooms = tuple(float(z) for z in hdr.get_zooms())
        offset = int(hdr.get_data_offset())
        itemsize = hdr.get_data_dtype().itemsize
        time_code = int(hdr["xyzt_units"]) & 0x38
    except Exception as exc:  # nibabel raises many kinds of errors on garbage
        raise InputDataError(f"{path}: unreadable NIfTI header ({exc}). Re-copy the file or "
                             "re-run fMRIPrep for this participant.") from exc
    expected = offset + itemsize * _prod(shape)
    if not gz:
        actual = st.st_size
    elif isize == expected % (1 << 32):  # ISIZE is the length modulo 2**32
        actual = expected
    else:
        actual = _gzip_size(path)
    if actual < expected:
        kind = "holds only a header" if actual <= max(offset, 352) else "is truncated"
        raise InputDataError(
            f"{path}: {kind} ({actual} of {expected} bytes for shape {shape}). The file was "
            "written or copied incompletely; re-copy it or re-run fMRIPrep for this participant.")
    return HeaderInfo(shape, tuple(map(tuple, affine.tolist())), zooms,
                      _TIME_UNITS.get(time_code))


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= max(s, 0)
    return out


def _gzip_size(path: str) -> int:
    """Decompressed size by streaming (slow path: truncated or multi-member gzip)."""
    total = 0
    try:
        with gzip.open(path, "rb") as fobj:
            while chunk := fobj.read(1 << 20):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass  # truncated stream: what was read is what there is
    return total


def check_bold_header(path: str | Path, info: HeaderInfo) -> str | None:
    """Problem with a BOLD header (not 4D, single volume), or None."""
    shape = info.shape
    if len(shape) < 4 or (len(shape) > 4 and any(s > 1 for s in shape[4:])):
        return (f"{path}: {len(shape)}D image of shape {shape}, expected 4D (x, y, z, t). "
                "Check that it is a desc-preproc_bold series, not a boldref or a mask.")
    if shape[3] < 2:
        return (f"{path}: only {shape[3]} volume(s); a BOLD series needs at least 2. "
                "Check that it is a desc-preproc_bold series, not a boldref.")
    return None


def check_mask_header(mask_path: str | Path, mask: HeaderInfo, bold_path: str | Path,
                      bold: HeaderInfo, atol: float = 1e-3) -> str | None:
    """Problem when a brain mask does not lie on its BOLD's voxel grid, or None."""
    mshape = mask.shape[:3] if len(mask.shape) == 3 or all(s == 1 for s in mask.shape[3:]) else None
    if mshape is None:
        return (f"{mask_path}: mask has shape {mask.shape}, expected a 3D image. Use the "
                "desc-brain_mask fMRIPrep wrote for this run.")
    if mshape != bold.shape[:3]:
        return (f"{mask_path}: mask shape {mshape} does not match BOLD {Path(bold_path).name} "
                f"shape {bold.shape[:3]}. Both must come from the same space/resolution; "
                "use the mask with the same space- and res- entities.")
    diff = max(abs(a - b) for ra, rb in zip(mask.affine, bold.affine, strict=True)
               for a, b in zip(ra, rb, strict=True))
    if diff > atol:
        return (f"{mask_path}: mask affine differs from BOLD {Path(bold_path).name} affine "
                f"(max difference {diff:.4g}). Both must come from the same space/resolution; "
                "use the mask with the same space- and res- entities.")
    return None


def read_sidecar_tr(path: str | Path) -> tuple[float | None, str | None]:
    """Read ``RepetitionTime`` (seconds) from a JSON sidecar.

    Returns
    -------
    tr : float or None
        The value, or None when absent/invalid.
    problem : str or None
        Why the value could not be used (invalid JSON, non-positive ...).
    """
    try:
        with open(path, "rb") as fobj:
            data = json.loads(fobj.read())  # bytes: json detects UTF-8/16/32 and a UTF-8 BOM
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: unreadable JSON sidecar ({exc})."
    if not isinstance(data, dict) or "RepetitionTime" not in data:
        return None, None
    value = data["RepetitionTime"]
    try:
        tr = float(value)
    except (TypeError, ValueError):
        return None, f"{path}: RepetitionTime {value!r} is not a number."
    if not tr > 0:
        return None, f"{path}: RepetitionTime {value!r} must be positive."
    return tr, None


def find_bids_validator() -> str | None:
    """Path of the ``bids-validator-deno`` executable (venv first, then PATH), or None."""
    local = Path(sys.prefix) / "bin" / "bids-validator-deno"
    if local.exists():
        return str(local)
    return shutil.which("bids-validator-deno") or shutil.which("bids-validator")


def run_bids_validator(dataset: str | Path, timeout: float = 600.0,
                       extra_args: tuple[str, ...] = ()) -> tuple[bool, dict[str, Any] | str]:
    """Run the official BIDS validator (``bids-validator-deno``) on a dataset.

    Optional and slow; discovery does not call it. It validates raw and
    derivative datasets offline.

    Parameters
    ----------
    dataset : path
        Dataset root.
    timeout : float
        Seconds before giving up.
    extra_args : tuple of str
        More command-line options (e.g. ``("--ignoreWarnings",)``).

    Returns
    -------
    ok : bool
        True when the validator reported no error.
    result : dict or str
        The validator's JSON report, or its text output if it was not JSON.

    Raises
    ------
    ValidationError
        The validator is not installed.
    """
    exe = find_bids_validator()
    if exe is None:
        raise ValidationError("bids-validator-deno is not installed: `pip install bids-validator-deno` "
                              "or pass --skip-bids-validation.")
    proc = subprocess.run([exe, "--format", "json", *extra_args, str(dataset)], capture_output=True,
                          text=True, timeout=timeout, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return proc.returncode == 0, proc.stdout + proc.stderr
    return proc.returncode == 0, report
