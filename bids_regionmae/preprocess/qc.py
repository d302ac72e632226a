"""Quality-control measures of one model-ready run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bids_regionmae.grid import MODEL_SHAPE


def check_atlas(voxel_labels: np.ndarray | None, groups: Mapping[str, Sequence[int]] | None) -> None:
    """Check the optional atlas arguments of :func:`preprocess_run`.

    Raises
    ------
    ValueError
        ``voxel_labels`` is not an integer array of shape (96, 96, 96), or
        ``groups`` is given without it or is not a mapping of label lists.
    """
    if voxel_labels is None:
        if groups:
            raise ValueError("groups needs voxel_labels (the atlas on the model grid)")
        return
    labels = np.asarray(voxel_labels)
    if labels.shape != MODEL_SHAPE or labels.dtype.kind not in "iu":
        raise ValueError(f"voxel_labels must be an integer array of shape {MODEL_SHAPE}, "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("voxel_labels must be >= 0 (0 = background)")
    if groups is not None:
        if not isinstance(groups, Mapping):
            raise ValueError(f"groups must map a group name to a list of labels, got {type(groups).__name__}")
        for name, members in groups.items():
            if isinstance(members, str | bytes) or not all(int(m) == m for m in members):
                raise ValueError(f"groups[{name!r}] must be a list of integer labels, got {members!r}")


def region_coverage(mask: np.ndarray, voxel_labels: np.ndarray,
                    groups: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Share of each atlas region's voxels that lie inside the run's brain mask.

    Parameters
    ----------
    mask : ndarray, shape (96, 96, 96), bool
        The run's brain mask on the model grid.
    voxel_labels : ndarray, shape (96, 96, 96), int
        Atlas labels on the model grid (0 = background).
    groups : mapping of str to list of int, optional
        Region groups (e.g. lobes).

    Returns
    -------
    dict
        ``{"atlas": {...}, "labels": {label: {...}}, "groups": {name: {...}}}``
        where each entry has ``voxels`` (in the atlas), ``covered`` (inside the
        mask) and ``fraction`` (None for an empty region).
    """
    labels = np.asarray(voxel_labels).ravel().astype(np.int64)
    inside = np.asarray(mask, bool).ravel()
    n_labels = int(labels.max()) + 1 if labels.size else 1
    total = np.bincount(labels, minlength=n_labels)
    covered = np.bincount(labels[inside], minlength=n_labels)

    def entry(n: int, c: int) -> dict:
        return {"voxels": int(n), "covered": int(c), "fraction": (round(c / n, 6) if n else None)}

    per_label = {str(lab): entry(total[lab], covered[lab]) for lab in np.flatnonzero(total) if lab > 0}
    result = {"atlas": entry(total[1:].sum(), covered[1:].sum()), "labels": per_label, "groups": {}}
    for name, members in (groups or {}).items():
        members = [int(m) for m in members if 0 < int(m) < n_labels]
        result["groups"][name] = entry(total[members].sum() if members else 0,
                                       covered[members].sum() if members else 0)
    return result


def framewise_displacement_summary(fd: np.ndarray | None, kept: np.ndarray) -> dict | None:
    """Mean and max FD (mm) over the kept frames (``n/a`` rows ignored)."""
    if fd is None:
        return None
    values = np.asarray(fd, float)[kept]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "max": None}
    return {"mean": round(float(values.mean()), 6), "max": round(float(values.max()), 6)}
