"""Put an atlas on the model grid and reduce it to patches.

Resampling is nearest neighbour through world coordinates (the affines), so
any atlas grid and orientation works: the 1 mm offline AAL3, nilearn's LAS
2 mm AAL3, a user file. When the atlas already lies on the 91x109x91 2 mm
source grid, the result equals :func:`bids_regionmae.grid.source_to_model`
of it voxel for voxel.

Patch-level maps use the ``any`` / ``majority`` / ``all`` rules of
:mod:`bids_regionmae.masking.patches`. Small regions vanish: at voxel level
when resampling drops them, at patch level when no patch satisfies the rule.
:func:`vanished_regions` reports both so callers can say so instead of
crashing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE

from .aal3 import Atlas

#: Default spatial patch edge (voxels) of the NeuroSTORM patch embedding.
PATCH_SIZE: tuple[int, int, int] = (6, 6, 6)


def _patch3(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(patch_size, (int, np.integer)):
        return (int(patch_size),) * 3
    size = tuple(int(p) for p in patch_size)
    return size[:3]  # type: ignore[return-value]


def resample_labels(image: nib.spatialimages.SpatialImage, target_affine: np.ndarray,
                    target_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto a target grid.

    Parameters
    ----------
    image : nibabel image
        3D label image (integer values).
    target_affine : ndarray, shape (4, 4)
        Voxel-to-world affine of the target grid.
    target_shape : sequence of 3 int

    Returns
    -------
    ndarray of int16, shape ``target_shape``
        Target voxels whose centre falls outside the image are 0. Exact
        half-voxel ties go to the higher source index.
    """
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D label image, got shape {data.shape}")
    shape = tuple(int(n) for n in target_shape)
    vox = np.linalg.inv(np.asarray(image.affine, dtype=float)) @ np.asarray(target_affine, dtype=float)
    out = np.zeros(shape, dtype=np.int16)
    lin, off = vox[:3, :3], vox[:3, 3]
    # Source index along each source axis, built from per-target-axis terms.
    axes = [np.arange(n, dtype=float) for n in shape]
    idx = []
    for a in range(3):
        coord = (off[a] + lin[a, 0] * axes[0][:, None, None] + lin[a, 1] * axes[1][None, :, None]
                 + lin[a, 2] * axes[2][None, None, :])
        idx.append(np.floor(coord + 0.5 + 1e-6).astype(np.int64))
    idx = [np.broadcast_to(i, shape) for i in idx]
    valid = np.ones(shape, dtype=bool)
    for a in range(3):
        valid &= (idx[a] >= 0) & (idx[a] < data.shape[a])
    out[valid] = data[idx[0][valid], idx[1][valid], idx[2][valid]]
    return out


def atlas_on_grid(atlas: Atlas, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Atlas labels on an arbitrary grid (e.g. a BOLD run's), nearest neighbour.

    Returns
    -------
    ndarray of int16, shape ``shape``
    """
    return resample_labels(atlas.image, affine, shape)


def atlas_on_model_grid(atlas: Atlas) -> np.ndarray:
    """Atlas labels on the 96^3 model grid (2 mm MNI152NLin6Asym, cropped/padded).

    Returns
    -------
    ndarray of int16, shape (96, 96, 96)
    """
    return resample_labels(atlas.image, MODEL_AFFINE, MODEL_SHAPE)


def region_voxel_counts(voxel_labels: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, int]:
    """Voxels per label (labels absent from ``voxel_labels`` count 0)."""
    values, counts = np.unique(np.asarray(voxel_labels), return_counts=True)
    found = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}
    if labels is None:
        return found
    return {int(i): found.get(int(i), 0) for i in labels}


def patch_fractions(voxel_labels: np.ndarray,
                    patch_size: int | Sequence[int] = PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of every patch covered by every label.

    Parameters
    ----------
    voxel_labels : ndarray of int, shape (X, Y, Z)
    patch_size : int or sequence of 3 int
        Must divide the grid.

    Returns
    -------
    labels : ndarray of int, shape (L,)
        Sorted non-zero labels present.
    fractions : ndarray of float32, shape (L, X/px, Y/py, Z/pz)
    """
    import torch

    from bids_regionmae.masking.patches import label_patch_fractions

    labels, fractions = label_patch_fractions(torch.from_numpy(np.asarray(voxel_labels, dtype=np.int64)),
                                              _patch3(patch_size))
    return labels.numpy(), fractions.numpy()


def patch_region_masks(voxel_labels: np.ndarray, patch_size: int | Sequence[int] = PATCH_SIZE,
                       rule: str = "majority", labels: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """Patches of each region under a rule.

    Parameters
    ----------
    voxel_labels : ndarray of int, shape (X, Y, Z)
    patch_size : int or sequence of 3 int
    rule : {'any', 'majority', 'all'}
        See :mod:`bids_regionmae.masking.patches`. Under ``any`` a patch can
        belong to several regions.
    labels : iterable of int, optional
        Regions to report (default: labels present); absent ones get an
        all-False map.

    Returns
    -------
    dict of int to ndarray of bool, shape (X/px, Y/py, Z/pz)
    """
    import torch

    from bids_regionmae.masking.patches import apply_patch_rule

    present, fractions = patch_fractions(voxel_labels, patch_size)
    member = apply_patch_rule(torch.from_numpy(fractions), rule).numpy()  # type: ignore[arg-type]
    by_label = {int(k): member[i] for i, k in enumerate(present)}
    wanted = [int(k) for k in labels] if labels is not None else [int(k) for k in present]
    empty = np.zeros(fractions.shape[1:], dtype=bool)
    return {k: by_label.get(k, empty) for k in wanted}


def patch_label_map(voxel_labels: np.ndarray, patch_size: int | Sequence[int] = PATCH_SIZE,
                    rule: str = "majority") -> np.ndarray:
    """One label per patch: the region covering most of it, if the rule holds.

    Parameters
    ----------
    voxel_labels : ndarray of int, shape (X, Y, Z)
    patch_size : int or sequence of 3 int
    rule : {'any', 'majority', 'all'}
        ``majority``: the region covering more than half the patch (unique);
        ``all``: the region covering the whole patch; ``any``: the region with
        the most voxels in the patch (plurality among regions, ties to the
        lower label), whenever the patch has any labelled voxel.

    Returns
    -------
    ndarray of int16, shape (X/px, Y/py, Z/pz)
        0 where no region qualifies.
    """
    import torch

    from bids_regionmae.masking.patches import apply_patch_rule

    present, fractions = patch_fractions(voxel_labels, patch_size)
    out = np.zeros(fractions.shape[1:], dtype=np.int16)
    if present.size == 0:
        return out
    best = fractions.argmax(axis=0)  # first maximum -> lowest label on ties
    best_frac = np.take_along_axis(fractions, best[None], axis=0)[0]
    ok = apply_patch_rule(torch.from_numpy(best_frac), rule).numpy()  # type: ignore[arg-type]
    out[ok] = present[best[ok]]
    return out


@dataclass
class VanishedReport:
    """Regions of an atlas table that are lost on the model grid.

    Attributes
    ----------
    n_regions : int
        Regions in the label table.
    voxel_level : dict of int to str
        Regions with no voxel on the grid.
    patch_level : dict of int to str
        Regions with no patch under ``rule`` (includes ``voxel_level``).
    label_map_level : dict of int to str
        Regions that win no patch of :func:`patch_label_map` (one label per
        patch) under ``rule``.
    patch_size : tuple of int
    rule : str
    voxel_counts : dict of int to int
        Voxels per region on the grid.
    """

    n_regions: int
    voxel_level: dict[int, str]
    patch_level: dict[int, str]
    label_map_level: dict[int, str]
    patch_size: tuple[int, int, int]
    rule: str
    voxel_counts: dict[int, int] = field(default_factory=dict)

    @property
    def n_voxel_level(self) -> int:
        """Regions kept at voxel level."""
        return self.n_regions - len(self.voxel_level)

    @property
    def n_patch_level(self) -> int:
        """Regions kept at patch level (membership under the rule)."""
        return self.n_regions - len(self.patch_level)

    @property
    def n_label_map_level(self) -> int:
        """Regions kept in the one-label-per-patch map."""
        return self.n_regions - len(self.label_map_level)

    def summary(self) -> str:
        """One paragraph for logs and reports."""
        def names(d: Mapping[int, str]) -> str:
            shown = ", ".join(f"{v} ({k})" for k, v in list(d.items())[:12])
            return shown + (f", ... ({len(d) - 12} more)" if len(d) > 12 else "")

        text = (f"{self.n_voxel_level} of {self.n_regions} atlas regions have voxels on the model grid; "
                f"{self.n_patch_level} keep at least one {'x'.join(map(str, self.patch_size))} patch "
                f"under the {self.rule!r} rule; {self.n_label_map_level} win at least one patch when "
                f"each patch takes a single label.")
        if self.voxel_level:
            text += f" Lost at voxel level: {names(self.voxel_level)}."
        lost_patch = {k: v for k, v in self.patch_level.items() if k not in self.voxel_level}
        if lost_patch:
            text += f" Lost at patch level: {names(lost_patch)}."
        return text

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"n_regions": self.n_regions, "patch_size": list(self.patch_size), "rule": self.rule,
                "voxel_level": {str(k): v for k, v in self.voxel_level.items()},
                "patch_level": {str(k): v for k, v in self.patch_level.items()},
                "label_map_level": {str(k): v for k, v in self.label_map_level.items()},
                "voxel_counts": {str(k): v for k, v in self.voxel_counts.items()}}


def vanished_regions(label_names: Mapping[int, str], voxel_labels: np.ndarray,
                     patch_size: int | Sequence[int] = PATCH_SIZE, rule: str = "majority") -> VanishedReport:
    """Which regions of a label table vanish on the grid and at patch level.

    Parameters
    ----------
    label_names : mapping of int to str
        The atlas label table (e.g. ``atlas.labels``).
    voxel_labels : ndarray of int, shape (X, Y, Z)
        Labels on the model grid (:func:`atlas_on_model_grid`).
    patch_size : int or sequence of 3 int
    rule : {'any', 'majority', 'all'}

    Returns
    -------
    VanishedReport
    """
    counts = region_voxel_counts(voxel_labels, label_names)
    voxel_level = {k: label_names[k] for k in sorted(label_names) if counts[k] == 0}
    masks = patch_region_masks(voxel_labels, patch_size, rule, labels=label_names)
    patch_level = {k: label_names[k] for k in sorted(label_names) if not masks[k].any()}
    winners = set(np.unique(patch_label_map(voxel_labels, patch_size, rule)).tolist())
    label_map_level = {k: label_names[k] for k in sorted(label_names) if k not in winners}
    return VanishedReport(n_regions=len(label_names), voxel_level=voxel_level, patch_level=patch_level,
                          label_map_level=label_map_level, patch_size=_patch3(patch_size), rule=rule,
                          voxel_counts=counts)
