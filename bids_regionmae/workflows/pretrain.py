"""Group level, ``--stage pretrain``: region-aware masked pretraining on the model-ready store.

Reads what participant level wrote into ``output_dir`` (model-ready runs and
the atlas on the model grid), splits participants into training and
validation sets, builds the masker of the run's masking plan, trains the
masked autoencoder with :mod:`bids_regionmae.train.engine` (resuming from the
last checkpoint when one exists) and writes a model directory
(:class:`bids_regionmae.models.model_dir.ModelDir`)::

    output_dir/models/<name>/
        model.safetensors, model.json   weights and typed metadata (masking plan, provenance, data)
        regionmae_config.toml       resolved configuration + environment (backend, precision, world size)
        train_log.csv               one row per optimizer step (loss, lr, clips/s)
        val_log.csv                 one row per epoch (val_loss, mse_<lobe>)
        training_summary.json       steps, epochs, final losses, throughput, device
        data_manifest.json          participants, runs, source sha256s, train/validation split
        region_mse.tsv              final masked-voxel MSE per lobe and per atlas region (validation set)
        masks/masking.json          the masker: strategy, labels, ratio/fraction, seed, patch counts
        masks/mask_tokens.npy       bool (D, H, W) token map (region: masked patches; random: candidates)
        masks/mask_voxels.nii.gz    the same map on the 96^3 model grid (MNI152NLin6Asym 2 mm)
        figures/, report.html       loss curves, masked region, a reconstruction (reports.pretrain)
        checkpoints/                full training state (resume)
        tensorboard/                TensorBoard events (when tensorboard is installed)

``<name>`` is :func:`bids_regionmae.outputs.naming.pretrain_dir_name`, e.g.
``pretrain_region-cerebellum_tiny_seed-0`` or ``pretrain_random-ratio50_tiny_seed-0``.

For several GPUs or nodes start this stage with ``torchrun`` (see
:mod:`bids_regionmae.train.pretrain` for a single-node and a SLURM example);
every rank trains, only rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_OK, InputMissingError
from bids_regionmae.grid import MODEL_SHAPE, downsample_factors, downsample_mask
from bids_regionmae.models.mamba import resolve_backend
from bids_regionmae.models.model_dir import ModelDir
from bids_regionmae.models.model_record import DataRecord, Provenance
from bids_regionmae.models.registry import create_mae, get_spec
from bids_regionmae.outputs.masks import never_masked_labels, write_mask_files
from bids_regionmae.outputs.naming import pretrain_dir_name
from bids_regionmae.outputs.tables import write_table
from bids_regionmae.preprocess.store import data_manifest
from bids_regionmae.reports.pretrain import PretrainRecord, write_pretrain_report
from bids_regionmae.train.data import ClipDataset, split_participants
from bids_regionmae.train.engine import TrainSettings, derive_seed, resolve_precision
from bids_regionmae.train.pretrain import MaskingSetup, final_region_errors, pretrain, summarize_training
from bids_regionmae.workflows.session import Session, open_session

if TYPE_CHECKING:
    from bids_regionmae.masking import Masker, MaskingPlan
    from bids_regionmae.models.spec import ModelSpec
    from bids_regionmae.preprocess.store import ModelReadyRun
    from bids_regionmae.train.engine import Trainer, TrainResult

LOGGER = logging.getLogger(__name__)

__all__ = ["UNUSED_TOKENS", "pretrain_model", "run"]

#: Stream key of the model-initialisation seed (see :func:`bids_regionmae.train.engine.derive_seed`).
STREAM_INIT = 11
#: Tokens of NeuroSTORM's MAE that region/random pretraining never uses (frozen so DDP sees no unused grads).
UNUSED_TOKENS = ("window_mask_token", "atlas_mask_token")


def run(config: RunConfig) -> int:
    """Pretrain a masked autoencoder on the participant-level outputs.

    Returns
    -------
    int
        0 on success (also on ranks other than 0 under ``torchrun``).

    Raises
    ------
    InputMissingError
        No model-ready run in ``output_dir`` (exit 66): run participant level first.
    UsageError
        Invalid region, empty region at patch level, model grid not an
        integer downsampling of the store, too few clips for one step, or a
        checkpoint from other settings (exit 64).
    """
    with open_session(config) as session:
        pretrain_model(session)
    return EXIT_OK


@dataclass
class PretrainData:
    """The data of one pretraining run on the model's grid.

    Attributes
    ----------
    runs : list of ModelReadyRun
    spec : ModelSpec
    factors : tuple of 3 int
        Pooling from the 96^3 store to the model grid.
    voxel_labels : LongTensor, shape (X, Y, Z)
        Atlas labels on the model grid.
    group_brain : BoolTensor, shape (X, Y, Z)
        Brain of the majority of runs: the brain patches of the masker.
    train_subjects, val_subjects : list of str
    train_set, val_set : ClipDataset
    background : float
        The store's background value.
    """
    runs: list[ModelReadyRun]
    spec: ModelSpec
    factors: tuple[int, int, int]
    voxel_labels: torch.Tensor
    group_brain: torch.Tensor
    train_subjects: list[str]
    val_subjects: list[str]
    train_set: ClipDataset
    val_set: ClipDataset
    background: float

    def split(self) -> dict[str, str]:
        """Participant -> ``train`` / ``validation``."""
        return {**{s: "train" for s in self.train_subjects}, **{s: "validation" for s in self.val_subjects}}


def load_data(session: Session, spec: ModelSpec) -> PretrainData:
    """Runs, participant split, clip datasets and label/brain maps on the model grid of ``spec``.

    Raises
    ------
    InputMissingError
        No model-ready run, or no training clip of the model's length.
    """

    config = session.config
    runs = session.model_ready_runs()
    factors = downsample_factors(MODEL_SHAPE, spec.img_size[:3])
    voxel_labels = session.atlas.model_grid_labels(factors)
    train_subjects, val_subjects = split_participants(sorted({r.subject for r in runs}),
                                                      config.train.val_fraction, config.seed)
    train_set = ClipDataset(runs, spec.img_size, subjects=train_subjects)
    val_set = ClipDataset(runs, spec.img_size, subjects=val_subjects)
    if len(train_set) == 0:
        raise InputMissingError(f"no clip of {spec.img_size[3]} frames in the training runs: the runs are "
                                "shorter than the model's clip length")
    masks = torch.stack([downsample_mask(r.mask, factors) for r in runs]).float()
    background = float(runs[0].meta.get("normalization", {}).get("background_value", 0.0) or 0.0)
    return PretrainData(runs=runs, spec=spec, factors=factors, voxel_labels=voxel_labels,
                        group_brain=masks.mean(0) > 0.5, train_subjects=train_subjects, val_subjects=val_subjects,
                        train_set=train_set, val_set=val_set, background=background)


def pretrain_model(session: Session, plan: MaskingPlan | None = None) -> Path:
    """Pretrain one model with ``plan`` (default: the session's) and write its directory.

    Returns
    -------
    Path
        The model directory (written by rank 0 only).
    """
    config = session.config
    plan = plan or session.masking_plan()
    spec = get_spec(config.model.variant)
    data = load_data(session, spec)
    masker = plan.build_masker(data.voxel_labels, spec.patch_size, T=spec.img_size[3], brain_mask=data.group_brain,
                               device=session.device)
    setup = MaskingSetup.from_plan(plan, masker, background=data.background)
    name = pretrain_dir_name(plan, spec.name, config.seed)
    model_dir = session.output_dir / "models" / name
    backend = resolve_backend(config.model.backend, session.device)
    precision = resolve_precision(config.train.precision, session.device)
    env = {"backend": backend, "precision": precision, "world_size": session.dist.world_size,
           "model_dir": str(model_dir)}
    if session.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
        session.write_config(model_dir, **env)
    LOGGER.info("pretraining %s: %d runs, %d participants (%d train / %d validation), %d + %d clips, masker %r",
                name, len(data.runs), len(data.train_subjects) + len(data.val_subjects), len(data.train_subjects),
                len(data.val_subjects), len(data.train_set), len(data.val_set), masker)
    t0 = time.perf_counter()
    trainer, result = _train(session, plan, data, setup, model_dir, backend=backend, precision=precision)
    wall = time.perf_counter() - t0
    if session.is_main:
        _write_model_dir(session, plan, data, masker, setup, trainer, result, model_dir, wall=wall, env=env)
    return model_dir


def _train(session: Session, plan: MaskingPlan, data: PretrainData, setup: MaskingSetup, model_dir: Path, *,
           backend: str, precision: str) -> tuple[Trainer, TrainResult]:


    config, spec = session.config, data.spec
    torch.manual_seed(derive_seed(config.seed, STREAM_INIT))
    model = create_mae(spec, backend=backend)
    for token in UNUSED_TOKENS:
        param = getattr(model, token, None)
        if isinstance(param, torch.nn.Parameter):
            param.requires_grad_(False)
    settings = TrainSettings.from_config(config.train, seed=config.seed)
    fingerprint = {
        "variant": spec.name, "spec": spec.to_dict(), "strategy": plan.strategy, "region": plan.region or "",
        "labels": list(plan.labels), "mask_ratio": plan.ratio, "mask_fraction": plan.fraction,
        "patch_rule": plan.rule, "level": plan.level, "include_background": plan.include_background,
        "norm_patch_loss": plan.norm_patch_loss, "seed": config.seed, "batch_size": settings.batch_size,
        "grad_accum": settings.grad_accum, "lr": settings.lr, "weight_decay": settings.weight_decay,
        "warmup_fraction": settings.warmup_fraction, "precision": precision,
        "train_subjects": list(data.train_subjects), "n_train_clips": len(data.train_set),
    }
    return pretrain(model, data.train_set, data.val_set if len(data.val_set) else None, setup, settings=settings,
                    out_dir=model_dir, voxel_labels=data.voxel_labels, groups=session.atlas.groups,
                    dist_info=session.dist, fingerprint=fingerprint,
                    extra_state={"train_subjects": list(data.train_subjects),
                                 "val_subjects": list(data.val_subjects)})


def _write_model_dir(session: Session, plan: MaskingPlan, data: PretrainData, masker: Masker, setup: MaskingSetup,
                     trainer: Trainer, result: TrainResult, model_dir: Path, *, wall: float,
                     env: dict[str, object]) -> None:
    """Rank 0: weights and metadata, configuration, masks, summary, per-region MSE and the report."""
    config, spec, atlas = session.config, data.spec, session.atlas
    clips_per_run: dict[str, int] = {}
    for dataset in (data.train_set, data.val_set):
        for ref in dataset.clips:
            clips_per_run[ref.run_id] = clips_per_run.get(ref.run_id, 0) + 1
    manifest = {
        "participants": {"train": list(data.train_subjects), "validation": list(data.val_subjects)},
        "split": {"unit": "participant", "seed": config.seed, "val_fraction": config.train.val_fraction},
        "n_clips": {"train": len(data.train_set), "validation": len(data.val_set)},
        "runs": data_manifest(data.runs, session.output_dir, data.split(), clips_per_run),
    }
    saved = ModelDir.save(model_dir, trainer.model, stage="pretrain", masking=plan, manifest=manifest,
                          provenance=Provenance(source="pretrained-here", seed=config.seed, steps=result.total_steps),
                          data=DataRecord(train_participants=tuple(data.train_subjects),
                                          val_participants=tuple(data.val_subjects)),
                          extra={"masker": masker.describe()})
    session.write_config(model_dir, **env)
    layout = saved.layout
    masking_record = write_mask_files(layout.masks, masker, {
        **masker.describe(), "seed": config.seed, "region": plan.region, "level": plan.level,
        "include_background": plan.include_background, "norm_patch_loss": plan.norm_patch_loss,
        "model_grid": list(spec.img_size[:3]), "downsampling": list(data.factors),
        "train_masks": "drawn per step from (seed, step, micro-batch)",
        "validation_masks": "drawn per clip from (seed, clip index)", "atlas": dict(atlas.provenance),
        "never_masked_labels": never_masked_labels(masker, data.voxel_labels, plan.labels),
    }, spec.patch_size, data.factors)
    summary = summarize_training(result, wall, dist_info=session.dist, precision=str(env["precision"]),
                                 backend=str(env["backend"]), variant=spec.name, img_size=spec.img_size,
                                 n_train=len(data.train_set), n_val=len(data.val_set))
    atomic_write_json(layout.training_summary, summary)
    eval_set = data.val_set if len(data.val_set) else data.train_set
    group_mse, region_mse, example = final_region_errors(trainer, eval_set, setup, data.voxel_labels, atlas.groups,
                                                         seed=config.seed)
    _write_region_mse(layout.region_mse, group_mse, region_mse, atlas.names)
    record = PretrainRecord(name=model_dir.name, plan=plan, masker=masker, masking_record=masking_record,
                            summary=summary, history=result.history, val_history=result.val_history,
                            batch_size=config.train.batch_size, grad_accum=config.train.grad_accum, seed=config.seed,
                            train_subjects=data.train_subjects, val_subjects=data.val_subjects,
                            group_mse=group_mse, region_mse=region_mse, example=example)
    write_pretrain_report(layout, record, data.runs, atlas.names)
    LOGGER.info("pretraining done: %s (%d steps, final loss %.4f)", model_dir, result.total_steps,
                summary.get("final_train_loss") or float("nan"))


def _write_region_mse(path: Path, group_mse: dict, region_mse: dict, names: dict[int, str]) -> None:
    """``region_mse.tsv``: masked-voxel MSE per lobe, then per atlas region."""
    if not group_mse and not region_mse:
        return
    rows = [{"level": "lobe", "index": "n/a", "name": g, "mse": v["mse"], "n_clips": v["n_clips"]}
            for g, v in group_mse.items()]
    rows += [{"level": "region", "index": i, "name": names.get(i, str(i)), "mse": v["mse"], "n_clips": v["n_clips"]}
             for i, v in region_mse.items()]
    write_table(path, rows, ["level", "index", "name", "mse", "n_clips"], digits=6)
