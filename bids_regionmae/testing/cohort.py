"""A small labelled synthetic cohort for fine-tuning tests and demos.

Nothing here is used at run time. :func:`write_labelled_cohort` writes

- a model-ready store into ``output_dir`` (the on-disk format of participant
  level, through :func:`bids_regionmae.testing.store.write_synthetic_store`:
  float16 ``(T, 96, 96, 96)`` arrays, brain masks, clip indexes, sidecars);
- a stand-in fMRIPrep dataset at ``bids_dir`` holding only
  ``dataset_description.json`` and ``participants.tsv`` (columns
  ``participant_id``, ``diagnosis`` = ``ADHD``/``Control``, ``site`` =
  ``A``/``B``/..., ``age``);
- the synthetic AAL3-like label map (:func:`bids_regionmae.testing.store.synthetic_labels`)
  as a NIfTI on the model grid, to pass as ``--atlas-file``.

The label is planted in one region group: in ``ADHD`` participants the
voxels of ``signal_labels`` (default the two synthetic cerebellum labels
95/96) share one extra fluctuation ``amplitude * s(t)`` (a sinusoid with a
per-run random phase, plus a constant ``offset``); controls get nothing.
Only those voxels differ between the groups, so a model (or the
connectivity baseline: the shared fluctuation raises the left-right
cerebellar correlation) that beats chance has found the region.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_regionmae.grid import MODEL_AFFINE, MODEL_SHAPE

__all__ = ["LabelledCohort", "write_labelled_cohort"]


@dataclass(frozen=True)
class LabelledCohort:
    """Where :func:`write_labelled_cohort` put things.

    Attributes
    ----------
    bids_dir : Path
        The stand-in fMRIPrep dataset (``participants.tsv`` inside).
    output_dir : Path
        The app's output directory with the model-ready store.
    atlas_file : Path
        Synthetic label map on the model grid (NIfTI, AAL3 indices).
    labels : dict of str to str
        Participant (no ``sub-``) -> ``"ADHD"`` or ``"Control"``.
    sites : dict of str to str
        Participant -> site letter.
    """

    bids_dir: Path
    output_dir: Path
    atlas_file: Path
    labels: dict[str, str]
    sites: dict[str, str]


def write_labelled_cohort(root: str | Path, n_subjects: int = 12, n_frames: int = 16, *, clip_length: int = 4,
                          signal_labels: Sequence[int] = (95, 96), amplitude: float = 2.0, offset: float = 1.0,
                          n_sites: int = 2, seed: int = 0) -> LabelledCohort:
    """Write a labelled synthetic cohort under ``root`` (``root/fmriprep``, ``root/out``, ``root/atlas.nii.gz``).

    Parameters
    ----------
    root : path
        Empty or new folder.
    n_subjects : int
        Participants ``01``.. ``n``; odd numbers are ``ADHD``, even ``Control``
        (balanced when ``n`` is even).
    n_frames : int
        Frames per run (one run each).
    clip_length : int
        Frames per clip in the clip index.
    signal_labels : sequence of int
        Synthetic atlas labels whose voxels carry the planted signal.
    amplitude, offset : float
        Size of the planted fluctuation and of its constant part, in units
        of the z-scored data.
    n_sites : int
        Sites ``A``, ``B``... assigned round-robin within each class, so
        every site has both classes.
    seed : int

    Returns
    -------
    LabelledCohort
    """
    import nibabel as nib

    from bids_regionmae.testing.store import synthetic_labels, write_synthetic_store

    root = Path(root)
    bids_dir = root / "fmriprep"
    output_dir = root / "out"
    bids_dir.mkdir(parents=True, exist_ok=True)
    sidecars = write_synthetic_store(output_dir, n_subjects=n_subjects, n_frames=n_frames, clip_length=clip_length,
                                     seed=seed)
    atlas = synthetic_labels(MODEL_SHAPE)
    region = np.isin(atlas, np.asarray(list(signal_labels)))
    rng = np.random.default_rng([seed, 0xC0])
    labels: dict[str, str] = {}
    sites: dict[str, str] = {}
    counters = {"ADHD": 0, "Control": 0}
    for sidecar in sidecars:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        subject = meta["entities"]["subject"]
        diagnosis = "ADHD" if int(subject) % 2 == 1 else "Control"
        labels[subject] = diagnosis
        sites[subject] = chr(ord("A") + counters[diagnosis] % max(n_sites, 1))
        counters[diagnosis] += 1
        if diagnosis != "ADHD":
            continue
        data = np.load(sidecar.parent / meta["files"]["data"], mmap_mode="r+")  # (T, 96, 96, 96) float16
        mask = np.asarray(nib.load(str(sidecar.parent / meta["files"]["mask"])).dataobj) > 0
        where = region & mask
        t = np.arange(data.shape[0], dtype=np.float32)
        course = offset + amplitude * np.sin(2 * np.pi * t / 4.0 + rng.uniform(0, 2 * np.pi))
        for frame in range(data.shape[0]):
            values = data[frame][where].astype(np.float32) + course[frame]
            data[frame][where] = values.astype(np.float16)
        data.flush()
        del data
    description = {"Name": "synthetic labelled cohort", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "fMRIPrep", "Version": "synthetic"}]}
    (bids_dir / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    rows = ["participant_id\tdiagnosis\tsite\tage"]
    for i, subject in enumerate(sorted(labels)):
        rows.append(f"sub-{subject}\t{labels[subject]}\t{sites[subject]}\t{20 + (7 * i) % 15}")
    (bids_dir / "participants.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    atlas_file = root / "atlas.nii.gz"
    img = nib.Nifti1Image(atlas.astype(np.int16), MODEL_AFFINE)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(atlas_file))
    return LabelledCohort(bids_dir=bids_dir, output_dir=output_dir, atlas_file=atlas_file, labels=labels,
                          sites=sites)
