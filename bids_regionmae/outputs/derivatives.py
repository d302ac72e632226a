"""The derivatives dataset this app writes: names, description, ignore list, citation.

Names are built from BIDS entities with pybids' ``build_path`` and the
patterns in ``bids_regionmae/data/output_patterns.json`` (patterns are data,
not code). Several participant jobs may write into one ``output_dir`` at the
same time: ``dataset_description.json`` is created exactly once (exclusive
create through a hard link) and every other file is written atomically.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from bids_regionmae import __version__
from bids_regionmae.atomic import atomic_write_text, create_exclusive
from bids_regionmae.errors import InputMissingError, OutputError, UsageError

BIDS_VERSION = "1.11.0"
PIPELINE_NAME = "regionmae"
CODE_URL = "https://github.com/bids-regionmae/bids_regionmae"

#: Files this app writes that the BIDS specification does not describe. One
#: list for every stage so that concurrent writers agree on its content. The
#: validator does not honour folder patterns with a trailing slash.
BIDSIGNORE_ENTRIES: tuple[str, ...] = (
    "logs",
    "models",
    "group",
    "*.html",
    "*.npy",
    "*.toml",
    "*_desc-modelready_*",
    "*_boldref.nii.gz",
    "*_clips.tsv",
    "*_qc.json",
    "*_qc.tsv",
    "*_embeddings.*",
    "*_predictions.*",
    "*_regionerror.*",
    "*_attribution.*",
    "figures",
)

REFERENCES: dict[str, str] = {
    "regionmae": "Region-aware masked reconstruction for fMRI foundation models. arXiv:2511.00443 (2025).",
    "neurostorm": "NeuroSTORM: Towards a general-purpose foundation model for fMRI analysis. "
                  "arXiv:2506.11167 (2025).",
    "aal3": "Rolls ET, Huang CC, Lin CP, Feng J, Joliot M. Automated anatomical labelling atlas 3. "
            "NeuroImage 206:116189 (2020). doi:10.1016/j.neuroimage.2019.116189",
    "templateflow": "Ciric R, et al. TemplateFlow: FAIR-sharing of multi-scale, multi-species brain models. "
                    "Nature Methods 19:1568-1571 (2022). doi:10.1038/s41592-022-01681-2",
    "fmriprep": "Esteban O, et al. fMRIPrep: a robust preprocessing pipeline for functional MRI. "
                "Nature Methods 16:111-116 (2019). doi:10.1038/s41592-018-0235-4",
    "mamba": "Gu A, Dao T. Mamba: Linear-time sequence modeling with selective state spaces. "
             "arXiv:2312.00752 (2023).",
}


@lru_cache(maxsize=1)
def path_patterns() -> list[str]:
    """The ``build_path`` patterns kept as package data."""
    text = resources.files("bids_regionmae.data").joinpath("output_patterns.json").read_text("utf-8")
    return list(json.loads(text)["default_path_patterns"])


def build_output_path(entities: dict[str, Any], output_dir: str | Path | None = None) -> Path:
    """Build the derivative path of a file from its BIDS entities.

    Parameters
    ----------
    entities : dict
        BIDS entities by their long names (``subject``, ``session``, ``task``,
        ``run``, ``space``, ``resolution``, ``desc``, ``atlas``...) plus
        ``suffix`` and ``extension`` (with its dot, e.g. ``".nii.gz"``).
        ``None`` values are dropped.
    output_dir : path, optional
        Prefix for the returned path.

    Returns
    -------
    Path
        Relative path (or ``output_dir / path``).

    Examples
    --------
    >>> str(build_output_path({"subject": "01", "task": "rest", "run": "1", "space": "MNI152NLin6Asym",
    ...     "resolution": "2", "desc": "mean", "suffix": "boldref", "extension": ".nii.gz"}))
    'sub-01/func/sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-mean_boldref.nii.gz'
    """
    from bids.layout.writing import build_path

    clean = {k: str(v) for k, v in entities.items() if v is not None}
    if "suffix" not in clean or "extension" not in clean:
        raise ValueError(f"entities need 'suffix' and 'extension', got {sorted(clean)}")
    path = build_path(clean, path_patterns(), strict=False)
    if path is None:
        raise ValueError(f"no output pattern fits the entities {clean}")
    return Path(output_dir) / path if output_dir is not None else Path(path)


def container_info() -> dict[str, str] | None:
    """Describe the container we run in, from variables set by our images."""
    kind = os.environ.get("REGIONMAE_CONTAINER")
    if not kind:
        return None
    return {"Type": kind, "Tag": os.environ.get("REGIONMAE_IMAGE", f"regionmae:{__version__}")}


def dataset_description(source_datasets: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The ``dataset_description.json`` content of our derivatives dataset."""
    generated_by: dict[str, Any] = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "CodeURL": CODE_URL,
        "Description": "Region-aware masked pretraining of a shifted-window Mamba 4D fMRI model "
                       "on fMRIPrep derivatives.",
    }
    container = container_info()
    if container:
        generated_by["Container"] = container
    description: dict[str, Any] = {
        "Name": "bids_regionmae derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
    }
    if source_datasets:
        description["SourceDatasets"] = source_datasets
    return description


def dataset_readme() -> str:
    """The README.md of the derivatives dataset: what is where."""
    return f"""# bids_regionmae derivatives

Written by regionmae {__version__} ({CODE_URL}).

- `sub-<label>/func/*_desc-modelready_bold.npy`: model-ready BOLD (float16, frames x 96^3, 2 mm
  MNI152NLin6Asym grid), with a JSON sidecar, a clip index (`*_clips.tsv`) and QC (`*_qc.json`);
  `*_desc-brain_mask.nii.gz`, `*_desc-mean_boldref.nii.gz` and `*_desc-preview_bold.nii.gz` can be opened
  in any NIfTI viewer.
- `atlas-AAL3/`: the AAL3 atlas on the model grid with its label table.
- `models/`: pretrained and fine-tuned models with their training curves and reports.
- `sub-<label>/sub-<label>_report.html`, `group/`: HTML reports.
- `logs/`: the resolved configuration (TOML) of every run; pass one back with `--config-file`.

Cite the references listed in CITATION.cff.
"""


def citation_cff() -> str:
    """A CITATION.cff (CFF 1.2.0) for the derivatives dataset."""
    lines = [
        "cff-version: 1.2.0",
        'message: "If you use these derivatives, please cite the software and the references below."',
        'title: "bids_regionmae derivatives"',
        "type: dataset",
        "authors:",
        '  - name: "bids_regionmae developers"',
        "license: CC0-1.0",
        "references:",
    ]
    for key, text in REFERENCES.items():
        lines += ["  - type: article", f'    title: "{text.replace(chr(34), chr(39))}"',
                  "    authors:", f'      - name: "{key}"']
    return "\n".join(lines) + "\n"


def _check_output_dir(bids_dir: Path, output_dir: Path) -> None:
    bids_dir = bids_dir.resolve()
    output_dir = output_dir.resolve()
    if output_dir == bids_dir or bids_dir in output_dir.parents:
        raise UsageError(f"output_dir {output_dir} is the input dataset or inside it ({bids_dir}). "
                         "The app never writes into its input; choose a folder outside it, "
                         "e.g. <bids_dir>/../regionmae.")


def init_derivatives(output_dir: str | Path, bids_dir: str | Path,
                     source_datasets: list[dict[str, str]] | None = None) -> Path:
    """Create the derivatives dataset skeleton in ``output_dir`` (idempotent, concurrency safe).

    Writes ``dataset_description.json`` once, and ``.bidsignore`` and
    ``CITATION.cff`` atomically.

    Raises
    ------
    UsageError
        ``output_dir`` equals ``bids_dir`` or lies inside it (exit 64).
    InputMissingError
        ``bids_dir`` does not exist (exit 66).
    OutputError
        ``output_dir`` cannot be created or written, or holds another dataset (exit 73).
    """
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    if not bids_dir.is_dir():
        raise InputMissingError(f"bids_dir {bids_dir}: no such directory. Give the path of your "
                                "fMRIPrep derivatives (or of a raw BIDS dataset with --derivatives).")
    _check_output_dir(bids_dir, output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        description = dataset_description(source_datasets or [{"URL": bids_dir.resolve().as_uri()}])
        description_path = output_dir / "dataset_description.json"
        if not create_exclusive(description_path, json.dumps(description, indent=2) + "\n"):
            _check_existing_description(description_path)
        ignore = output_dir / ".bidsignore"
        text = "\n".join(BIDSIGNORE_ENTRIES) + "\n"
        if not ignore.is_file() or ignore.read_text(encoding="utf-8") != text:
            atomic_write_text(ignore, text)
        for name, text in (("CITATION.cff", citation_cff()), ("README.md", dataset_readme())):
            if not (output_dir / name).is_file():
                atomic_write_text(output_dir / name, text)
    except PermissionError as exc:
        raise OutputError(f"output_dir {output_dir}: cannot write ({exc.strerror}). Check permissions, "
                          "or mount a writable folder (docker: -v $OUT:/out).") from exc
    except OSError as exc:
        if isinstance(exc, (UsageError, InputMissingError)):
            raise
        raise OutputError(f"output_dir {output_dir}: cannot create ({exc}). Choose a writable location.") from exc
    return output_dir


def _check_existing_description(path: Path) -> None:
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: exists but is not valid JSON ({exc}). Remove it or choose another "
                          "output_dir.") from exc
    names = [entry.get("Name") for entry in existing.get("GeneratedBy", []) if isinstance(entry, dict)]
    if existing.get("DatasetType") != "derivative" or PIPELINE_NAME not in names:
        raise OutputError(f"{path}: output_dir already holds another dataset (GeneratedBy {names}). "
                          "Choose an empty folder or one written by regionmae.")
