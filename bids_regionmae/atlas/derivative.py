"""Write the atlas on the model grid as a BIDS 1.11 atlas derivative.

Layout (accepted by ``bids-validator-deno`` in a derivative dataset)::

    <out_dir>/atlas-AAL3_description.json
    <out_dir>/tpl-MNI152NLin6Asym/anat/tpl-MNI152NLin6Asym_atlas-AAL3_res-2_desc-model_dseg.nii.gz
    <out_dir>/tpl-MNI152NLin6Asym/anat/tpl-MNI152NLin6Asym_atlas-AAL3_res-2_desc-model_dseg.tsv
    <out_dir>/tpl-MNI152NLin6Asym/anat/tpl-MNI152NLin6Asym_atlas-AAL3_res-2_desc-model_dseg.json

``res-2`` is TemplateFlow's 2 mm resolution; ``desc-model`` marks the 96^3
field of view of the model grid (the 91x109x91 template grid cropped in y
and padded in x and z, see :mod:`bids_regionmae.grid`). The atlas files
carry the ``tpl-`` entity because BIDS 1.11 requires it for atlas files
(the validator rejects ``atlas-*/`` folders at the dataset root). Every
file is written under a temporary name and renamed, so concurrent
participant jobs may write the same atlas into one ``out_dir``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from bids_regionmae.atomic import atomic_path, atomic_write_json, atomic_write_text
from bids_regionmae.errors import OutputError
from bids_regionmae.grid import MODEL_AFFINE, MODEL_OFFSET, MODEL_RES, MODEL_SHAPE, MODEL_SPACE
from bids_regionmae.outputs.derivatives import build_output_path

from .aal3 import Atlas
from .regions import LOBE_GROUPS, group_table

SPATIAL_REFERENCE = (f"https://templateflow.s3.amazonaws.com/tpl-{MODEL_SPACE}/"
                     f"tpl-{MODEL_SPACE}_res-02_T1w.nii.gz")


def atlas_derivative_paths(out_dir: str | Path, atlas_name: str = "AAL3") -> dict[str, Path]:
    """Where :func:`write_atlas_derivative` puts each file.

    Returns
    -------
    dict
        Keys ``description``, ``dseg``, ``tsv``, ``json``.
    """
    dseg = {"template": MODEL_SPACE, "atlas": atlas_name, "resolution": MODEL_RES, "desc": "model",
            "suffix": "dseg"}
    paths = {key: build_output_path({**dseg, "extension": ext}, out_dir)
             for key, ext in (("dseg", ".nii.gz"), ("tsv", ".tsv"), ("json", ".json"))}
    paths["description"] = build_output_path({"atlas": atlas_name, "suffix": "description", "extension": ".json"},
                                             out_dir)
    return paths


def write_atlas_derivative(atlas: Atlas, voxel_labels: np.ndarray, out_dir: str | Path) -> list[Path]:
    """Write the model-grid atlas, its label table and descriptions into ``out_dir``.

    Parameters
    ----------
    atlas : Atlas
        Provides names, provenance, citation and license.
    voxel_labels : ndarray of int, shape (96, 96, 96)
        The atlas on the model grid (:func:`atlas_on_model_grid`).
    out_dir : path
        Root of a derivative dataset (its ``dataset_description.json`` is
        the caller's business).

    Returns
    -------
    list of Path
        The four files written.

    Raises
    ------
    ValueError
        ``voxel_labels`` is not on the model grid.
    OutputError
        ``out_dir`` cannot be written.
    """
    voxel_labels = np.asarray(voxel_labels)
    if voxel_labels.shape != MODEL_SHAPE:
        raise ValueError(f"voxel_labels must be on the model grid {MODEL_SHAPE}, got {voxel_labels.shape}")
    paths = atlas_derivative_paths(out_dir, atlas.name)
    try:
        paths["dseg"].parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {paths['dseg'].parent}: {exc}") from exc

    present = set(np.unique(voxel_labels).tolist()) - {0}
    rows = group_table(atlas.labels)
    groups_used = sorted({g for _, _, g in rows})

    description = {
        "AtlasName": atlas.name,
        "License": atlas.license,
        "Description": (f"{atlas.name} atlas [{atlas.version}], {len(atlas.labels)} regions, resampled by nearest "
                        f"neighbour onto the {MODEL_SHAPE[0]}x{MODEL_SHAPE[1]}x{MODEL_SHAPE[2]} model grid "
                        f"({MODEL_SPACE}, 2 mm). Regions are grouped into lobes for region-aware masking."),
        "Authors": ["Edmund T. Rolls", "Chu-Chung Huang", "Ching-Po Lin", "Jianfeng Feng", "Marc Joliot"],
        "ReferencesAndLinks": [atlas.citation, "https://doi.org/10.1016/j.neuroimage.2019.116189",
                               "https://www.gin.cnrs.fr/en/tools/aal/"],
        "Species": "Homo sapiens",
        "Citation": atlas.citation,
        "Source": atlas.source,
        "SourceFile": str(atlas.path) if atlas.path else None,
        "Version": atlas.version,
        "SHA256": atlas.sha256,
    }
    description = {k: v for k, v in description.items() if v is not None}

    sidecar = {
        "Description": f"{atlas.name} label image on the model grid (0 = background).",
        "Resolution": (f"2 mm isotropic; {MODEL_SHAPE[0]}x{MODEL_SHAPE[1]}x{MODEL_SHAPE[2]} field of view: the "
                       f"91x109x91 res-2 template grid offset by {MODEL_OFFSET} voxels (x, y, z; negative = "
                       f"padding, positive = cropping)"),
        "SpatialReference": SPATIAL_REFERENCE,
        "Sources": [f"bids::atlas-{atlas.name}_description.json"],
        "AtlasSHA256": atlas.sha256,
        "RegionsOnGrid": len(present & set(atlas.labels)),
        "RegionsInAtlas": len(atlas.labels),
        "group": {"Description": "Lobe group used for region-aware masking",
                  "Levels": {g: (f"AAL3 labels {_ranges_text(LOBE_GROUPS[g])}" if g in LOBE_GROUPS
                                 else "labels outside AAL3's 1..170") for g in groups_used}},
    }

    tsv = "index\tname\tgroup\n" + "".join(f"{i}\t{n}\t{g}\n" for i, n, g in rows)

    img = nib.Nifti1Image(voxel_labels.astype(np.int16), MODEL_AFFINE)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(MODEL_AFFINE, code=4)  # 4 = MNI152
    img.header.set_sform(MODEL_AFFINE, code=4)
    img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    try:
        with atomic_path(paths["dseg"]) as tmp:
            nib.save(img, str(tmp))
        atomic_write_text(paths["tsv"], tsv)
        atomic_write_json(paths["json"], sidecar)
        atomic_write_json(paths["description"], description)
    except OSError as exc:
        raise OutputError(f"cannot write the atlas derivative into {out_dir}: {exc}") from exc
    return [paths["dseg"], paths["tsv"], paths["json"], paths["description"]]


def _ranges_text(labels: tuple[int, ...]) -> str:
    spans, start, prev = [], labels[0], labels[0]
    for i in labels[1:]:
        if i != prev + 1:
            spans.append((start, prev))
            start = i
        prev = i
    spans.append((start, prev))
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
