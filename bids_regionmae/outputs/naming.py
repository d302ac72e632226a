"""Names of every output: one module that every writer asks for its paths.

Model directories (``output_dir/models/``)::

    pretrain_<masking>_<variant>_seed-<seed>     :func:`pretrain_dir_name`
    finetune_<target>_from-<pretrained dir>      :func:`finetune_dir_name`

Participant reports and figures: :func:`report_path`, :func:`figure_path`,
:func:`subject_figure_path`; status logs: :func:`status_path`; the masking
comparison: :func:`compare_dir`.

Prediction outputs per run (``<prefix>`` = the run's entities + ``space-MNI152NLin6Asym_res-2``)::

    <prefix>_desc-<M>_embeddings.tsv (+ .json)     one row per clip and a mean row
    <prefix>_desc-<M>_predictions.tsv (+ .json)    fine-tuned models: one row per clip
    <prefix>_desc-<M>_regionerror.tsv (+ .json)    MAE: masked in-brain MSE per lobe group and region
    <prefix>_desc-<M>_attribution.tsv (+ .json)    fine-tuned models: occlusion + integrated gradients
    <prefix>_desc-recon<M>_bold.nii.gz (+ .json)   composite reconstruction of the first clip (4D)
    <prefix>_desc-reconerror<M>_regionerror.nii.gz (+ .json)  mean |error| of masked voxels (3D)
    <prefix>_desc-ig<M>_attribution.nii.gz (+ .json)          mean |integrated gradients| (3D)
    sub-<label>/[ses-<label>/]figures/<entities>_desc-recon<M>_bold.png   reconstruction example

and, with ``input_space`` maps, the same two maps on the run's source grid
with ``space-<source space>`` (no ``res``) and ``Input`` appended to ``desc``.
``<M>`` is the model label, capitalised after a prefix (``reconTinyModel``).

Per participant (all runs pooled)::

    sub-<label>/sub-<label>_desc-<M>_predictions.tsv (+ .json)
    sub-<label>/sub-<label>_desc-<M>_attribution.tsv (+ .json)

Per group: ``group/predictions_<M>.tsv``, ``group/attribution_<M>.tsv`` (+ .json,
.png), ``group/report_<M>.html``. ``<M>`` is :func:`model_label`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bids_regionmae.grid import MODEL_RES, MODEL_SPACE
from bids_regionmae.outputs.derivatives import build_output_path

if TYPE_CHECKING:
    from bids_regionmae.masking import MaskingPlan

__all__ = [
    "RUN_TABLES",
    "compare_dir",
    "figure_path",
    "finetune_dir_name",
    "group_paths",
    "join_label",
    "model_label",
    "pretrain_dir_name",
    "report_path",
    "run_output_paths",
    "safe_name",
    "status_path",
    "subject_figure_path",
    "subject_paths",
]

#: Per-run tables: key -> suffix (``desc-<M>``, ``.tsv`` + ``.json``).
RUN_TABLES: dict[str, str] = {
    "embeddings": "embeddings",
    "predictions": "predictions",
    "regionerror": "regionerror",
    "attribution": "attribution",
}

_MAX_LABEL = 48


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than letters and digits turned into ``-`` (for file names)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-") or "x"


def pretrain_dir_name(plan: MaskingPlan, variant: str, seed: int) -> str:
    """Name of a pretraining model directory under ``output_dir/models/``.

    Pattern: ``pretrain_<masking>_<variant>_seed-<seed>`` where ``<masking>``
    is :meth:`MaskingPlan.tag <bids_regionmae.masking.plan.MaskingPlan.tag>`:

    - ``region-<regions>`` for ``region`` (selections joined by ``+``,
      lower case, characters other than letters, digits, ``+`` and ``-``
      dropped), with ``-frac<percent>`` when ``fraction < 1``;
    - ``random-ratio<percent>`` for ``random``;
    - ``randomregion-ratio<percent>`` for ``random-region``;

    and ``-voxel`` is appended for voxel-level masking.

    Examples
    --------
    >>> from bids_regionmae.masking import MaskingPlan
    >>> pretrain_dir_name(MaskingPlan("region", "cerebellum", (95,)), "tiny", 0)
    'pretrain_region-cerebellum_tiny_seed-0'
    >>> pretrain_dir_name(MaskingPlan("region", "cerebellum+frontal", (1, 95), fraction=0.5), "neurostorm", 3)
    'pretrain_region-cerebellum+frontal-frac50_neurostorm_seed-3'
    >>> pretrain_dir_name(MaskingPlan("random", ratio=0.5), "tiny", 0)
    'pretrain_random-ratio50_tiny_seed-0'
    """
    variant = re.sub(r"[^A-Za-z0-9\-]", "", variant)
    return f"pretrain_{plan.tag()}_{variant}_seed-{int(seed)}"


def finetune_dir_name(target: str, pretrained: str | Path | None) -> str:
    """``finetune_<target>_from-<pretrained dir name>`` or ``finetune_<target>_from-scratch``."""
    source = Path(pretrained).resolve().name if pretrained else "scratch"
    return f"finetune_{safe_name(target)}_from-{source}"


def compare_dir(output_dir: str | Path, target: str) -> Path:
    """Folder of the masking comparison on ``target``: ``output_dir/group/compare_<target>``."""
    return Path(output_dir) / "group" / f"compare_{safe_name(target)}"


def report_path(output_dir: str | Path, subject: str) -> Path:
    """``output_dir/sub-<label>/sub-<label>_report.html``."""
    return build_output_path({"subject": subject, "suffix": "report", "extension": ".html"}, output_dir)


def figure_path(output_dir: str | Path, entities: Mapping[str, str], desc: str, ext: str) -> Path:
    """A run's figure: ``sub-<label>/[ses-<label>/]figures/<entities>_desc-<desc>_bold<ext>``."""
    return build_output_path({**_base(entities), "datatype": "figures", "desc": desc, "suffix": "bold",
                              "extension": ext}, output_dir)


def subject_figure_path(output_dir: str | Path, subject: str, desc: str, ext: str) -> Path:
    """A participant's figure: ``sub-<label>/figures/sub-<label>_desc-<desc>_bold<ext>``."""
    return build_output_path({"subject": subject, "datatype": "figures", "desc": desc, "suffix": "bold",
                              "extension": ext}, output_dir)


def model_label(model_dir: str | Path) -> str:
    """A short alphanumeric label of a model directory for the ``desc-`` entity.

    The directory name is split at every character that is not a letter or a
    digit and the parts are joined in camel case.

    Parameters
    ----------
    model_dir : path

    Returns
    -------
    str
        Letters and digits only, at most 48 characters.

    Examples
    --------
    >>> model_label("/out/models/pretrain_region-cerebellum_tiny_seed-0")
    'pretrainRegionCerebellumTinySeed0'
    >>> model_label("models/finetune_dx_linear-probe")
    'finetuneDxLinearProbe'
    """
    raw = str(Path(model_dir).resolve().name or "model")
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", raw) if p]
    if not parts:
        return "model"
    label = parts[0][0].lower() + parts[0][1:] + "".join(p[0].upper() + p[1:] for p in parts[1:])
    if len(label) > _MAX_LABEL:
        digest = hashlib.sha1(label.encode()).hexdigest()[:6]
        label = label[: _MAX_LABEL - 6] + digest
    return label


def join_label(prefix: str, label: str, suffix: str = "") -> str:
    """``desc`` value of a derived file: ``prefix`` + the label capitalised + ``suffix`` (e.g. ``reconTinyInput``)."""
    return prefix + (label[:1].upper() + label[1:] if prefix else label) + suffix


def _base(entities: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in entities.items() if k not in ("space", "resolution", "desc", "suffix", "extension")}


def run_output_paths(entities: Mapping[str, str], label: str, output_dir: str | Path, *,
                     source_space: str | None = None) -> dict[str, Path]:
    """Paths of every per-run prediction output.

    Parameters
    ----------
    entities : mapping
        The run's BIDS entities (``subject``, ``task``, ``run``...).
    label : str
        :func:`model_label`.
    output_dir : path
    source_space : str, optional
        Space of the run's source BOLD, for the input-space maps.

    Returns
    -------
    dict of str to Path
        Keys: ``<table>_tsv`` and ``<table>_json`` for each of
        :data:`RUN_TABLES`; ``recon_nii``/``recon_json``,
        ``errormap_nii``/``errormap_json``, ``igmap_nii``/``igmap_json``;
        with ``source_space``: ``recon_input_nii``/``_json`` and
        ``errormap_input_nii``/``_json``; ``figure_recon`` (reconstruction
        example, PNG under ``figures/``).
    """
    base = {**_base(entities), "space": MODEL_SPACE, "resolution": MODEL_RES}
    out: dict[str, Path] = {}
    for key, suffix in RUN_TABLES.items():
        for ext in (".tsv", ".json"):
            out[f"{key}_{ext[1:]}"] = build_output_path({**base, "desc": label, "suffix": suffix,
                                                         "extension": ext}, output_dir)
    maps = {"recon": (join_label("recon", label), "bold"),
            "errormap": (join_label("reconerror", label), "regionerror"),
            "igmap": (join_label("ig", label), "attribution")}
    for key, (desc, suffix) in maps.items():
        for ext in (".nii.gz", ".json"):
            out[f"{key}_{'nii' if ext == '.nii.gz' else 'json'}"] = build_output_path(
                {**base, "desc": desc, "suffix": suffix, "extension": ext}, output_dir)
    if source_space:
        src = {**_base(entities), "space": re.sub(r"[^A-Za-z0-9]", "", source_space)}
        for key, (desc, suffix) in (("recon_input", (join_label("recon", label, "Input"), "bold")),
                                    ("errormap_input", (join_label("reconerror", label, "Input"), "regionerror"))):
            for ext in (".nii.gz", ".json"):
                out[f"{key}_{'nii' if ext == '.nii.gz' else 'json'}"] = build_output_path(
                    {**src, "desc": desc, "suffix": suffix, "extension": ext}, output_dir)
    out["figure_recon"] = figure_path(output_dir, entities, join_label("recon", label), ".png")
    return out


def subject_paths(subject: str, label: str, output_dir: str | Path) -> dict[str, Path]:
    """Participant-level prediction files (all runs pooled).

    These live next to the participant's report, ``sub-<label>/``, and are
    covered by the ``*_predictions.*`` / ``*_attribution.*`` entries of
    ``.bidsignore``.

    Returns
    -------
    dict of str to Path
        ``predictions_tsv``, ``predictions_json``, ``attribution_tsv``,
        ``attribution_json``, ``figure_attribution`` (brain figure, PNG).
    """
    folder = Path(output_dir) / f"sub-{subject}"
    stem = f"sub-{subject}_desc-{label}"
    out = {f"{kind}_{ext}": folder / f"{stem}_{kind}.{ext}" for kind in ("predictions", "attribution")
           for ext in ("tsv", "json")}
    out["figure_attribution"] = subject_figure_path(output_dir, subject, join_label("attribution", label), ".png")
    return out


def group_paths(label: str, output_dir: str | Path) -> dict[str, Path]:
    """Group-level summary files under ``output_dir/group/``.

    Returns
    -------
    dict of str to Path
        ``attribution_tsv``, ``attribution_json``, ``attribution_figure``
        (brain figure, PNG), ``attribution_bars`` (SVG), ``predictions_tsv``,
        ``report``.
    """
    folder = Path(output_dir) / "group"
    return {"attribution_tsv": folder / f"attribution_{label}.tsv",
            "attribution_json": folder / f"attribution_{label}.json",
            "attribution_figure": folder / f"attribution_{label}.png",
            "attribution_bars": folder / f"attribution_{label}_groups.svg",
            "predictions_tsv": folder / f"predictions_{label}.tsv",
            "report": folder / f"report_{label}.html"}


def status_path(output_dir: str | Path, subject: str, stage: str) -> Path:
    """Per-participant status log of a stage (``logs/status/sub-<label>_<stage>.json``).

    Reports read it to list skipped and failed runs with their messages.
    """
    return Path(output_dir) / "logs" / "status" / f"sub-{subject}_{stage}.json"
