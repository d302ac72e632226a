"""Citation boilerplate: a methods paragraph with software versions and references.

fMRIPrep-style: the text describes what was run, names the versions of the
software that ran it and lists the references to cite. It is written to
``output_dir/logs/CITATION.md`` and included in every HTML report, so that a
user can paste it into a manuscript.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bids_regionmae import __version__
from bids_regionmae.atomic import atomic_write_text
from bids_regionmae.outputs.derivatives import REFERENCES

__all__ = ["CITATION_NAME", "methods_html", "methods_markdown", "software_versions", "write_citation"]

#: File name of the boilerplate under ``output_dir/logs/``.
CITATION_NAME = "CITATION.md"

#: Packages whose versions are quoted (distribution names).
_PACKAGES = ("torch", "nilearn", "templateflow", "pybids", "nibabel", "numpy", "mamba-ssm")


def software_versions() -> dict[str, str]:
    """Versions of regionmae and the packages the methods text names.

    Returns
    -------
    dict of str to str
        ``{"regionmae": ..., "torch": ..., "nilearn": ..., "templateflow": ...,
        "pybids": ..., ...}``; ``"not installed"`` for a missing package.
    """
    versions = {"regionmae": __version__}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _ref(key: str, order: list[str]) -> str:
    if key not in order:
        order.append(key)
    return f"[{order.index(key) + 1}]"


def methods_markdown(*, model: Mapping[str, Any] | None = None, stages: Sequence[str] = ("preprocess",),
                     versions: Mapping[str, str] | None = None) -> str:
    """The methods boilerplate as Markdown.

    Parameters
    ----------
    model : mapping, optional
        Facts about the model used for prediction: ``label``, ``kind``
        (``pretrained``/``finetuned``), ``variant``, ``masking`` (a short
        description), ``target``, ``task_kind``. Omitted keys are left out
        of the text.
    stages : sequence of str
        Stages whose description to include: ``preprocess``, ``pretrain``,
        ``finetune``, ``predict``.
    versions : mapping, optional
        Software versions (default :func:`software_versions`).

    Returns
    -------
    str
        Markdown text: a methods paragraph per stage, the software versions
        and the numbered references.
    """
    v = dict(versions or software_versions())
    order: list[str] = []
    paragraphs = []
    paragraphs.append(
        f"Functional MRI data preprocessed with fMRIPrep {_ref('fmriprep', order)} were processed with regionmae "
        f"{v['regionmae']}, an implementation of region-aware masked pretraining {_ref('regionmae', order)} "
        f"of the NeuroSTORM shifted-window Mamba 4D fMRI foundation model {_ref('neurostorm', order)}"
        f"{_ref('mamba', order)}, based on PyTorch {v['torch']}, nilearn {v['nilearn']}, "
        f"TemplateFlow {v['templateflow']} {_ref('templateflow', order)} and PyBIDS {v['pybids']}.")
    if "preprocess" in stages:
        paragraphs.append(
            "Each BOLD run in MNI152NLin6Asym (or resampled into it by its affine) was masked with its brain "
            "mask, resampled onto a 96x96x96 grid of 2 mm voxels (the 91x109x91 MNI152NLin6Asym grid "
            "cropped in y and padded in x and z, as in NeuroSTORM), z-scored inside the brain mask and cut "
            "into non-overlapping clips of 20 frames (or the configured length). Non-steady-state frames "
            "flagged by fMRIPrep were discarded.")
    if "pretrain" in stages or (model and model.get("kind") in ("pretrained", "finetuned")):
        masking = (model or {}).get("masking")
        paragraphs.append(
            "The model was pretrained by masked reconstruction: tokens of 6x6x6-voxel patches were replaced "
            "by a learnable mask token and the mean squared error was computed over masked in-brain voxels"
            + (f" ({masking})" if masking else "") + ". Region-aware masks cover whole regions of the AAL3 atlas "
            f"{_ref('aal3', order)} (grouped into seven lobes: frontal, limbic, occipital, parietal, "
            "subcortical, temporal, cerebellum) in every frame.")
    if "finetune" in stages or (model and model.get("kind") == "finetuned"):
        target = (model or {}).get("target")
        paragraphs.append(
            "The pretrained encoder was fine-tuned" + (f" to predict `{target}`" if target else "")
            + "; clip outputs were averaged per participant, and participants were split into training, "
              "validation and test sets so that no participant appears in more than one set.")
    if "predict" in stages:
        label = (model or {}).get("label")
        paragraphs.append(
            "For prediction" + (f" with model `{label}`" if label else "")
            + ", clip-level embeddings (mean-pooled encoder tokens) and outputs were averaged per run and per "
              "participant. Per-region reconstruction error was measured by masking each AAL3 lobe group in "
              "turn and computing the masked in-brain mean squared error. Region attribution combined "
              "occlusion (change in the classifier output when a region group is masked in every frame) and "
              "integrated gradients from a zero baseline projected onto AAL3 regions (mean absolute "
              "attribution per region and lobe group).")
    lines = ["# Methods (regionmae citation boilerplate)", "",
             "*This text was generated automatically; edit it freely and cite the references below.*", ""]
    lines += [p + "\n" for p in paragraphs]
    lines += ["## Software versions", ""]
    lines += [f"- {name}: {version}" for name, version in v.items()]
    lines += ["", "## References", ""]
    for key in list(order) + [k for k in REFERENCES if k not in order]:
        if key in REFERENCES:
            _ref(key, order)
    lines += [f"{i + 1}. {REFERENCES[key]}" for i, key in enumerate(order) if key in REFERENCES]
    return "\n".join(lines) + "\n"


def methods_html(markdown: str) -> str:
    """An HTML snippet of :func:`methods_markdown` output (headings, paragraphs, lists).

    Parameters
    ----------
    markdown : str

    Returns
    -------
    str
        Escaped HTML, safe to pass to :meth:`HtmlReport.raw`.
    """
    out: list[str] = []
    in_list: str | None = None

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)

    def close() -> None:
        nonlocal in_list
        if in_list:
            out.append(f"</{in_list}>")
            in_list = None

    for line in markdown.splitlines():
        stripped = line.strip()
        if not stripped:
            close()
            continue
        if stripped.startswith("#"):
            close()
            level = min(len(stripped) - len(stripped.lstrip("#")) + 2, 4)
            out.append(f"<h{level}>{inline(stripped.lstrip('#').strip())}</h{level}>")
        elif stripped.startswith("- "):
            if in_list != "ul":
                close()
                out.append("<ul>")
                in_list = "ul"
            out.append(f"<li>{inline(stripped[2:])}</li>")
        elif re.match(r"^\d+\. ", stripped):
            if in_list != "ol":
                close()
                out.append("<ol>")
                in_list = "ol"
            out.append(f"<li>{inline(stripped.split('. ', 1)[1])}</li>")
        else:
            close()
            out.append(f"<p>{inline(stripped)}</p>")
    close()
    return '<div class="methods">' + "".join(out) + "</div>"


def write_citation(output_dir: str | Path, **kwargs: Any) -> Path:
    """Write the boilerplate to ``output_dir/logs/CITATION.md`` (atomically).

    Parameters
    ----------
    output_dir : path
    **kwargs
        Passed to :func:`methods_markdown`.

    Returns
    -------
    Path
    """
    return atomic_write_text(Path(output_dir) / "logs" / CITATION_NAME, methods_markdown(**kwargs))
