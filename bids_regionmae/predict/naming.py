"""Names of the prediction outputs: the model label and the BIDS paths per run, participant and group.

Per run (``<prefix>`` = the run's entities + ``space-MNI152NLin6Asym_res-2``)::

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

import re
from collections.abc import Mapping
from pathlib import Path

from bids_regionmae.grid import MODEL_RES, MODEL_SPACE
from bids_regionmae.outputs.derivatives import build_output_path

__all__ = [
    "RUN_TABLES",
    "join_label",
    "group_paths",
    "model_label",
    "run_output_paths",
    "status_path",
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


def model_label(model_dir: str | Path, metadata: Mapping | None = None) -> str:
    """A short alphanumeric label of a model directory for the ``desc-`` entity.

    The directory name is split at every character that is not a letter or a
    digit and the parts are joined in camel case; a ``label`` in the model's
    metadata wins.

    Parameters
    ----------
    model_dir : path
    metadata : mapping, optional
        The model's metadata (``extra`` of the checkpoint).

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
    raw = str((metadata or {}).get("label") or Path(model_dir).resolve().name or "model")
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", raw) if p]
    if not parts:
        return "model"
    label = parts[0][0].lower() + parts[0][1:] + "".join(p[0].upper() + p[1:] for p in parts[1:])
    if len(label) > _MAX_LABEL:
        import hashlib

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
    out["figure_recon"] = build_output_path({**_base(entities), "datatype": "figures",
                                             "desc": join_label("recon", label), "suffix": "bold",
                                             "extension": ".png"}, output_dir)
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
    out["figure_attribution"] = build_output_path({"subject": subject, "datatype": "figures",
                                                   "desc": join_label("attribution", label), "suffix": "bold",
                                                   "extension": ".png"}, output_dir)
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
