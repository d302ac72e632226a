"""What a prediction of one run works with and gives: settings, the run's context (the *load* step), the outcome.

:func:`load_run` opens a model-ready run for a model: its clips on the
model's grid, the atlas labels pooled to that grid, the output paths and the
provenance every sidecar repeats. The other steps of
:func:`bids_regionmae.predict.run.predict_run` (infer, attribute, write)
receive the :class:`RunContext`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.outputs.naming import run_output_paths
from bids_regionmae.predict.inference import autocast_factory

if TYPE_CHECKING:
    import torch

    from bids_regionmae.atlas import ModelGridAtlas
    from bids_regionmae.config import RunConfig
    from bids_regionmae.predict.models import PredictionModel
    from bids_regionmae.preprocess.store import ModelReadyRun
    from bids_regionmae.train.data import ClipDataset

LOGGER = logging.getLogger(__name__)

__all__ = ["PredictSettings", "RunContext", "RunOutcome", "load_run"]


@dataclass(frozen=True)
class PredictSettings:
    """What to compute and how.

    Attributes
    ----------
    batch_size : int
        Clips per forward pass.
    precision : {'auto', 'bf16', 'fp32'}
        ``auto``: bf16 autocast on CUDA, fp32 on CPU.
    region_error : bool
        Per-region reconstruction error with the MAE (when there is one).
    region_masking : bool
        Also mask every AAL3 region on its own (one pass per region and clip).
    attribution : bool
        Occlusion + integrated gradients (fine-tuned models).
    occlusion_mode : {'zero', 'mask-token'}
        Replace a region's voxels by the background value, or its patches by
        the model's mask token (needs a classifier that takes token masks).
    occlusion_regions : bool
        Occlude every region on its own too (else lobe groups only).
    ig_steps : int
        Integrated-gradients path points.
    ig_batch_size : int
        Path points per forward/backward pass.
    ig_max_clips : int or None
        Clips per run that get integrated gradients (None: all).
    input_space : bool
        Also write the reconstruction and error maps on the run's source grid.
    progress : bool
        tqdm bar per run (on a terminal).
    """

    batch_size: int = 2
    precision: str = "auto"
    region_error: bool = True
    region_masking: bool = False
    attribution: bool = True
    occlusion_mode: str = "zero"
    occlusion_regions: bool = False
    ig_steps: int = 16
    ig_batch_size: int = 4
    ig_max_clips: int | None = 4
    input_space: bool = False
    progress: bool = True

    @classmethod
    def from_config(cls, config: RunConfig) -> PredictSettings:
        """Settings from a :class:`~bids_regionmae.config.RunConfig`.

        ``train.batch_size`` and ``train.precision`` are used; every field of
        the ``predict`` section with a matching name overrides the defaults.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {"batch_size": int(config.train.batch_size),
                                  "precision": str(config.train.precision)}
        values.update({k: v for k, v in config.predict.model_dump().items() if k in names})
        return cls(**values)

    def n_ig_clips(self, n_clips: int) -> int:
        """Clips of a run that get integrated gradients."""
        return n_clips if self.ig_max_clips is None else min(n_clips, int(self.ig_max_clips))


@dataclass
class RunOutcome:
    """Result of predicting one run.

    Attributes
    ----------
    run_id, subject : str
    status : {'done', 'skipped', 'failed'}
    message : str
    seconds : float
    outputs : list of Path
    clip_outputs : ndarray, shape (n_clips, K), optional
        Clip logits / regression outputs (fine-tuned models).
    attribution : list of dict
        The run's attribution rows.
    n_clips : int
    n_ig_clips : int
    """

    run_id: str
    subject: str
    status: str
    message: str = ""
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    clip_outputs: np.ndarray | None = None
    attribution: list[dict[str, Any]] = field(default_factory=list)
    n_clips: int = 0
    n_ig_clips: int = 0


@dataclass
class RunContext:
    """One run opened for one model.

    Attributes
    ----------
    run : ModelReadyRun
    model : PredictionModel
    settings : PredictSettings
    device : torch.device or str
    dataset : ClipDataset
        The run's clips on the model's grid.
    labels : LongTensor, shape (X, Y, Z)
        Atlas labels on the model's grid.
    brain : BoolTensor, shape (X, Y, Z)
        The run's brain mask on the model's grid.
    atlas : ModelGridAtlas
    paths : dict of str to Path
        :func:`bids_regionmae.outputs.naming.run_output_paths`.
    common : dict
        ``Model``, ``Sources`` and ``ModelGrid`` entries every sidecar repeats.
    autocast : callable
        Context-manager factory of the forward passes.
    source_space : str or None
        Space of the run's source grid when input-space maps are written.
    """

    run: ModelReadyRun
    model: PredictionModel
    settings: PredictSettings
    device: torch.device | str
    dataset: ClipDataset
    labels: torch.Tensor
    brain: torch.Tensor
    atlas: ModelGridAtlas
    paths: dict[str, Path]
    common: dict[str, Any]
    autocast: Callable[[], Any]
    source_space: str | None = None

    @property
    def factors(self) -> tuple[int, int, int]:
        """Pooling factors from the 96^3 store grid to the model's grid."""
        return self.dataset.factors

    @property
    def background(self) -> float:
        """The store's background value (occluded voxels take it)."""
        return float((self.run.meta.get("normalization") or {}).get("background_value", 0.0) or 0.0)


def _relative(path: Path, output_dir: Path) -> str:
    try:
        return "bids::" + Path(path).resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def load_run(run: ModelReadyRun, model: PredictionModel, atlas: ModelGridAtlas, output_dir: Path,
             settings: PredictSettings, device: torch.device | str) -> RunContext | None:
    """The run opened for ``model``; None when it is shorter than one clip of the model."""
    from bids_regionmae.train.data import ClipDataset

    spec = model.spec
    dataset = ClipDataset([run], spec.img_size)
    if len(dataset) == 0:
        return None
    source_space = run.meta.get("source_space") if settings.input_space else None
    if settings.input_space and not (run.meta.get("source_grid") or {}).get("affine"):
        LOGGER.warning("%s: no source grid in its sidecar; input-space maps skipped", run.run_id)
        source_space = None
    common = {"Model": model.describe(), "Sources": [_relative(run.sidecar, output_dir)],
              "ModelGrid": {"img_size": list(spec.img_size), "downsampling": list(dataset.factors)}}
    return RunContext(run=run, model=model, settings=settings, device=device, dataset=dataset,
                      labels=atlas.model_grid_labels(dataset.factors), brain=dataset.brain_mask(0), atlas=atlas,
                      paths=run_output_paths(run.entities, model.label, output_dir, source_space=source_space),
                      common=common, autocast=autocast_factory(device, settings.precision), source_space=source_space)
