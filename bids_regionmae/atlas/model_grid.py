"""The atlas of a run on the 96^3 model grid: labels, names, lobe groups and provenance.

Participant level resolves the atlas (user file, nilearn's AAL3, or the
offline copy), maps it onto the model grid and writes it as a derivative
into ``output_dir``; every later stage (pretraining, fine-tuning,
prediction, reports) reads that derivative back, so group level uses exactly
the atlas that participant level used.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae.grid import MODEL_SHAPE, downsample_labels

LOGGER = logging.getLogger(__name__)

__all__ = ["ModelGridAtlas", "model_grid_atlas", "read_atlas_derivative", "region_rows"]


@dataclass
class ModelGridAtlas:
    """Atlas labels on the model grid with region names and groups.

    Attributes
    ----------
    voxel_labels : ndarray of int, shape (96, 96, 96)
        Label per voxel of the store grid (0 = background).
    names : dict of int to str
        Region index -> name.
    groups : dict of str to tuple of int
        Lobe group -> labels (only labels of the atlas).
    provenance : dict
        Where the atlas came from (file, source, version, sha256).
    """

    voxel_labels: np.ndarray
    names: dict[int, str]
    groups: dict[str, tuple[int, ...]]
    provenance: dict[str, Any] = field(default_factory=dict)
    _pooled: dict[tuple[int, ...], Any] = field(default_factory=dict, repr=False, compare=False)

    def group_of(self, label: int) -> str:
        """Group of a label (``"other"`` when it is in none)."""
        for name, labels in self.groups.items():
            if label in labels:
                return name
        return "other"

    def model_grid_labels(self, factors: Sequence[int]) -> Any:
        """Labels pooled onto a model's grid (most frequent label per block), LongTensor (X, Y, Z); cached."""
        key = tuple(int(f) for f in factors)
        if key not in self._pooled:
            self._pooled[key] = downsample_labels(self.voxel_labels, key)
        return self._pooled[key]

    def present_labels(self) -> list[int]:
        """Labels with at least one voxel on the grid, sorted."""
        return [int(v) for v in np.unique(self.voxel_labels) if v > 0]


def _groups_for(names: Mapping[int, str], table_groups: Mapping[int, str] | None = None) -> dict[str, tuple[int, ...]]:
    from bids_regionmae.atlas.regions import LOBE_GROUPS

    groups = {g: tuple(i for i in labels if i in names) for g, labels in LOBE_GROUPS.items()}
    groups = {g: v for g, v in groups.items() if v}
    if not groups and table_groups:
        collected: dict[str, list[int]] = {}
        for index, group in table_groups.items():
            collected.setdefault(group, []).append(index)
        groups = {g: tuple(sorted(v)) for g, v in collected.items()}
    return groups


def read_atlas_derivative(output_dir: str | Path, atlas_name: str = "AAL3") -> ModelGridAtlas | None:
    """Read the atlas derivative that participant level wrote into ``output_dir``.

    Returns
    -------
    ModelGridAtlas or None
        None when the derivative is absent or unreadable.
    """
    import nibabel as nib

    from bids_regionmae.atlas.derivative import atlas_derivative_paths

    paths = atlas_derivative_paths(output_dir, atlas_name)
    if not paths["dseg"].is_file() or not paths["tsv"].is_file():
        return None
    try:
        labels = np.asarray(nib.load(str(paths["dseg"])).dataobj).astype(np.int32)
        if labels.shape != MODEL_SHAPE:
            LOGGER.warning("%s: shape %s, expected the model grid %s; ignored", paths["dseg"], labels.shape,
                           MODEL_SHAPE)
            return None
        names: dict[int, str] = {}
        table_groups: dict[int, str] = {}
        with open(paths["tsv"], newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                names[int(row["index"])] = row["name"]
                if row.get("group"):
                    table_groups[int(row["index"])] = row["group"]
    except Exception as exc:  # noqa: BLE001 - fall back to loading the atlas
        LOGGER.warning("could not read the atlas derivative %s: %s", paths["dseg"], exc)
        return None
    provenance: dict[str, Any] = {"File": str(paths["dseg"])}
    if paths["description"].is_file():
        import json

        try:
            provenance.update(json.loads(paths["description"].read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    return ModelGridAtlas(labels, names, _groups_for(names, table_groups), provenance)


def model_grid_atlas(output_dir: str | Path, atlas_file: str | None = None, atlas_labels: str | None = None,
                     *, write: bool = True) -> ModelGridAtlas:
    """The atlas on the model grid: from ``output_dir`` if participant level wrote it, else loaded (and written).

    Parameters
    ----------
    output_dir : path
    atlas_file, atlas_labels : str, optional
        A user atlas (``--atlas-file``/``--atlas-labels``); forces loading it.
    write : bool
        Write the atlas derivative into ``output_dir`` when it was loaded.

    Returns
    -------
    ModelGridAtlas

    Raises
    ------
    OfflineError, UsageError
        From the atlas loader when neither the derivative nor an atlas source is available.
    """
    import os

    from bids_regionmae.atlas.aal3 import load_atlas
    from bids_regionmae.atlas.derivative import write_atlas_derivative
    from bids_regionmae.atlas.resample import atlas_on_model_grid

    if atlas_file is None:
        found = read_atlas_derivative(output_dir)
        if found is not None:
            return found
    loaded = load_atlas(atlas_file, atlas_labels, allow_download=os.environ.get("REGIONMAE_OFFLINE", "0") != "1")
    voxel_labels = np.asarray(atlas_on_model_grid(loaded)).astype(np.int32)
    if write:
        write_atlas_derivative(loaded, voxel_labels, output_dir)
    LOGGER.info("atlas: %s (%s, sha256 %s...)", loaded.name, loaded.source, loaded.sha256[:12])
    names = {int(k): str(v) for k, v in loaded.labels.items()}
    return ModelGridAtlas(voxel_labels, names, _groups_for(names), loaded.provenance())


def region_rows(atlas: ModelGridAtlas, labels: Sequence[int] | None = None) -> list[tuple[int, str, str]]:
    """``(index, name, group)`` of the atlas regions present on the grid (or of ``labels``)."""
    labels = atlas.present_labels() if labels is None else list(labels)
    return [(i, atlas.names.get(i, str(i)), atlas.group_of(i)) for i in labels]
