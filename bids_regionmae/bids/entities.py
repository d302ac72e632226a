"""BIDS file-name parsing with pybids' own entity definitions.

The fast indexer (:mod:`bids_regionmae.bids.index`) never builds a
:class:`bids.layout.BIDSLayout`; it parses each candidate file name with the
compiled regular expressions of the entities declared in pybids' ``bids`` and
``derivatives`` configurations (``bids/layout/config/*.json``, loaded through
:meth:`bids.layout.models.Config.load`). The results are therefore the same
entity values :func:`bids.layout.parse_file_entities` returns (checked in the
tests), at a fraction of the cost, because

* the name is first split into ``key-value`` tokens and only the regexes of
  the keys present are run;
* names that cannot be a BOLD series, brain mask, BOLD reference or confounds
  table are rejected from their suffix before any regex runs.

Two kinds of fMRIPrep naming are classified:

``modern`` (fMRIPrep >= 1.4, including 20.x-24.x)
    ``sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-preproc_bold.nii.gz``,
    ``..._desc-brain_mask.nii.gz``, ``..._boldref.nii.gz``,
    ``..._desc-confounds_timeseries.tsv`` (>= 20.2) or
    ``..._desc-confounds_regressors.tsv`` (1.4-20.1).
``legacy`` (fMRIPrep 1.0-1.3)
    ``sub-01_task-rest_bold_space-MNI152NLin2009cAsym_preproc.nii.gz``,
    ``..._bold_space-MNI152NLin2009cAsym_brainmask.nii.gz``,
    ``..._bold_space-MNI152NLin2009cAsym_boldref.nii.gz`` and
    ``sub-01_task-rest_bold_confounds.tsv``. Files carrying an entity pybids
    does not know (``variant-smoothAROMAnonaggr``) are not candidates.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import NamedTuple

#: Entities (pybids long names) that identify one acquisition ("run"), in
#: BIDS file-name order. ``subject``/``session``/``task``/``run`` have their
#: own :class:`~bids_regionmae.bids.records.RunRecord` fields; the others go
#: into ``RunRecord.extra``/``acquisition``.
RUN_ENTITIES: tuple[str, ...] = (
    "subject", "session", "task", "acquisition", "ceagent", "reconstruction",
    "direction", "run", "echo", "part", "chunk",
)
#: Run entities other than subject/session/task/run, in BIDS order.
EXTRA_ENTITIES: tuple[str, ...] = ("acquisition", "ceagent", "reconstruction", "direction",
                                   "echo", "part", "chunk")
#: Entities describing the output space of a derivative file.
SPACE_ENTITIES: tuple[str, ...] = ("space", "res", "den")

KIND_BOLD = "bold"
KIND_MASK = "mask"
KIND_BOLDREF = "boldref"
KIND_CONFOUNDS = "confounds"

NIFTI_EXTENSIONS = (".nii.gz", ".nii")

# Suffix tokens worth parsing further (cheap pre-filter before any regex).
_CANDIDATE_SUFFIXES = frozenset({"bold", "mask", "boldref", "timeseries", "regressors",
                                 "preproc", "brainmask", "confounds"})
_KEY_RE = re.compile(r"([a-zA-Z]+)-\(")


class ParsedName(NamedTuple):
    """A classified fMRIPrep file name.

    Attributes
    ----------
    kind : str
        ``"bold"``, ``"mask"``, ``"boldref"`` or ``"confounds"``.
    entities : dict
        pybids long entity names to label strings (``run`` keeps its padding,
        e.g. ``"01"``), plus ``suffix`` and ``extension``.
    legacy : bool
        True for fMRIPrep 1.0-1.3 names (``_bold_space-X_preproc``).
    rank : int
        Preference among alternatives of the same kind (lower is better);
        used for confounds (``timeseries`` < ``regressors`` < ``confounds``).
    """

    kind: str
    entities: dict[str, str]
    legacy: bool = False
    rank: int = 0


def pybids_config_paths() -> list[Path]:
    """Paths of pybids' ``bids.json`` and ``derivatives.json`` entity configurations.

    Located through the installed package's import spec, so that reading them
    does not import pybids (whose import pulls in SQLAlchemy and costs about a
    second).
    """
    spec = importlib.util.find_spec("bids")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pybids is not installed: pip install pybids")
    base = Path(next(iter(spec.submodule_search_locations))) / "layout" / "config"
    return [base / "bids.json", base / "derivatives.json"]


@functools.lru_cache(maxsize=1)
def pybids_entities() -> dict[str, tuple[str, re.Pattern[str]]]:
    """Map short file-name keys (``ses``) to pybids entity names and regexes.

    The patterns are those of pybids' ``bids`` and ``derivatives``
    configurations (the files :meth:`bids.layout.models.Config.load` reads),
    compiled the same way pybids compiles them.

    Returns
    -------
    dict
        ``{"ses": ("session", re.compile(...)), ...}``, plus the special keys
        ``"__suffix__"`` and ``"__extension__"``.
    """
    table: dict[str, tuple[str, re.Pattern[str]]] = {}
    for path in pybids_config_paths():
        config = json.loads(path.read_text(encoding="utf-8"))
        for entity in config["entities"]:
            name, pattern = entity["name"], entity.get("pattern")
            if pattern is None:
                continue
            if name in ("suffix", "extension"):
                table[f"__{name}__"] = (name, re.compile(pattern))
                continue
            match = _KEY_RE.search(pattern)
            if match is None:
                continue  # datatype, fmap, scans: not file-name key-value entities
            table[match.group(1)] = (name, re.compile(pattern))
    return table


def short_keys() -> dict[str, str]:
    """Map pybids long entity names to their file-name keys (``session`` -> ``ses``)."""
    return {name: key for key, (name, _) in pybids_entities().items() if not key.startswith("__")}


def split_extension(name: str) -> tuple[str, str]:
    """Split a file name into stem and (multi-dot) extension.

    ``"x_bold.nii.gz"`` -> ``("x_bold", ".nii.gz")``; ``"x.dtseries.nii"`` ->
    ``("x", ".dtseries.nii")``.
    """
    idx = name.find(".")
    if idx <= 0:
        return name, ""
    return name[:idx], name[idx:]


def quick_candidate(name: str) -> bool:
    """Cheap string test: can ``name`` be a BOLD/mask/boldref/confounds file?

    Rejects most of an fMRIPrep ``func`` folder (AROMA and CIFTI outputs,
    transforms, ``desc-coreg``/``desc-hmc`` references) before any regex runs.
    """
    stem, ext = split_extension(name)
    if ext not in (".nii.gz", ".nii", ".tsv") or not stem.startswith("sub-"):
        return False
    suffix = stem[stem.rfind("_") + 1:]
    if suffix == "bold":
        return "_desc-preproc_" in name
    if suffix == "mask":
        return "_desc-brain_" in name
    if suffix == "boldref":
        return "_desc-" not in stem
    if suffix in ("timeseries", "regressors"):
        return "_desc-confounds_" in name
    return suffix in _CANDIDATE_SUFFIXES


def parse_entities(name: str) -> dict[str, str] | None:
    """Parse a BIDS file name into pybids entities.

    Parameters
    ----------
    name : str
        File name without directories.

    Returns
    -------
    dict or None
        Long entity names to values, plus ``suffix`` and ``extension`` (as
        pybids reports them). A ``"__bare__"`` key lists bare tokens between
        entities (``bold`` in legacy names) and ``"__unknown__"`` the keys
        pybids does not define. None when the name is not BIDS-like: a
        ``key-value`` token whose value pybids' regex rejects (for instance a
        non-alphanumeric label) or a repeated key.
    """
    table = pybids_entities()
    stem, ext = split_extension(name)
    tokens = stem.split("_")
    probe = "/" + name
    out: dict[str, str] = {}
    bare: list[str] = []
    unknown: list[str] = []
    for token in tokens[:-1]:
        key, sep, value = token.partition("-")
        if not sep:
            bare.append(token)
            continue
        entry = table.get(key)
        if entry is None:
            unknown.append(key)
            continue
        long_name, regex = entry
        if long_name in out:
            return None
        match = regex.search(probe)
        if match is None or match.group(1) != value:
            return None
        out[long_name] = value
    suffix_match = table["__suffix__"][1].search(probe)
    ext_match = table["__extension__"][1].search(probe)
    if suffix_match is None or ext_match is None or "-" in tokens[-1]:
        return None
    out["suffix"] = suffix_match.group(1)
    out["extension"] = ext_match.group(1)
    if bare:
        out["__bare__"] = ",".join(bare)
    if unknown:
        out["__unknown__"] = ",".join(unknown)
    return out


def classify(name: str) -> ParsedName | None:
    """Classify an fMRIPrep file name (see the module docstring).

    Parameters
    ----------
    name : str
        File name without directories.

    Returns
    -------
    ParsedName or None
        None for files discovery does not use (reports, transforms, CIFTI,
        AROMA/variant outputs, names pybids cannot parse).
    """
    if not quick_candidate(name):
        return None
    ents = parse_entities(name)
    if ents is None or "__unknown__" in ents or "subject" not in ents or "task" not in ents:
        return None
    bare = ents.pop("__bare__", "")
    suffix = ents["suffix"]
    ext = ents["extension"]
    desc = ents.get("desc")
    is_nifti = ext in NIFTI_EXTENSIONS
    if not bare:
        if suffix == "bold" and desc == "preproc" and is_nifti:
            return ParsedName(KIND_BOLD, ents)
        if suffix == "mask" and desc == "brain" and is_nifti:
            return ParsedName(KIND_MASK, ents)
        if suffix == "boldref" and desc is None and is_nifti:
            return ParsedName(KIND_BOLDREF, ents)
        if desc == "confounds" and ext == ".tsv" and suffix in ("timeseries", "regressors"):
            return ParsedName(KIND_CONFOUNDS, ents, rank=0 if suffix == "timeseries" else 1)
        return None
    if bare != "bold" or desc is not None:
        return None
    # fMRIPrep 1.0-1.3: "_bold" sits before the space entity.
    if suffix == "preproc" and is_nifti:
        return ParsedName(KIND_BOLD, ents, legacy=True)
    if suffix == "brainmask" and is_nifti:
        return ParsedName(KIND_MASK, ents, legacy=True)
    if suffix == "boldref" and is_nifti:
        return ParsedName(KIND_BOLDREF, ents, legacy=True)
    if suffix == "confounds" and ext == ".tsv" and "space" not in ents:
        return ParsedName(KIND_CONFOUNDS, ents, legacy=True, rank=2)
    return None


def run_key(entities: dict[str, str]) -> tuple[str | int | None, ...]:
    """Key identifying an acquisition: :data:`RUN_ENTITIES`, numbers compared as ints.

    ``run-1`` and ``run-01`` give the same key (pybids also compares runs as
    integers), which is how duplicated runs are detected.
    """
    return tuple(_norm(name, entities.get(name)) for name in RUN_ENTITIES)


def _norm(name: str, value: str | None) -> str | int | None:
    if value is not None and name in ("run", "echo", "chunk") and value.isdigit():
        return int(value)
    return value


def format_extra(entities: dict[str, str]) -> str | None:
    """Format the non-core run entities as ``acq-x_rec-y`` (None when there are none)."""
    keys = short_keys()
    parts = [f"{keys[name]}-{entities[name]}" for name in EXTRA_ENTITIES if entities.get(name)]
    return "_".join(parts) or None
