"""Masked-reconstruction pretraining: step and evaluation functions for the engine.

This module holds the pretraining logic that does not touch files other than
through the engine: the loss of one batch (:func:`make_step_fn`), the
validation metrics (:func:`make_eval_fn`), a final per-region evaluation and
reconstruction examples. :mod:`bids_regionmae.workflows.pretrain` reads the
data and atlas, calls :func:`pretrain` and writes the model directory.

Masks and loss
--------------
Each optimizer step draws the token masks of the whole global batch from a
generator seeded by ``(seed, step, micro-batch)`` and every process keeps its
rows, so a run on ``N`` processes with batch ``B`` sees the masks and clips of
a one-process run with batch ``N*B``. The loss is the masked, in-brain MSE of
each clip (:func:`bids_regionmae.masking.masked_mse` with the clip's own brain
mask), averaged over clips, so that the DDP average of per-process means is
the mean over the global batch. With ``level="voxel"`` the voxels of masked
tokens are set to the background value in the input instead of being replaced
by the model's mask token.

Running on several GPUs or nodes
--------------------------------
One GPU::

    regionmae /data/fmriprep /out group --stage pretrain --mask-strategy region \\
        --regions cerebellum --variant neurostorm --batch-size 8

One node, 4 GPUs (``--batch-size`` is per process: global batch 32)::

    torchrun --standalone --nproc_per_node 4 -m bids_regionmae.cli \\
        /data/fmriprep /out group --stage pretrain --regions cerebellum --variant neurostorm --batch-size 8

SLURM, 2 nodes x 4 GPUs (``sbatch pretrain.sbatch``)::

    #!/bin/bash
    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=1
    #SBATCH --gpus-per-node=4
    #SBATCH --cpus-per-task=32
    #SBATCH --time=48:00:00
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun apptainer exec --nv regionmae.sif \\
        torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 4 \\
            --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head:29500" \\
            -m bids_regionmae.cli /data/fmriprep /out group --stage pretrain \\
            --regions cerebellum --variant neurostorm --batch-size 8

Every process must see the same ``output_dir`` (a shared file system); only
rank 0 writes. A job killed by the scheduler continues from
``models/<name>/checkpoints/`` when resubmitted (``--resume`` is the
default), with the same losses as an uninterrupted run. At the time limit
SLURM sends SIGTERM: the step in progress is finished, checkpointed, and the
command exits 143 (``#SBATCH --signal=TERM@300`` gives a step 5 minutes
instead of ``KillWait``); use ``#SBATCH --requeue`` as usual. CPU-only
clusters work too (gloo backend): add ``--device cpu``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bids_regionmae.masking import Masker, MaskingPlan, apply_voxel_mask, masked_mse, per_region_mse
from bids_regionmae.train.engine import (
    STREAM_EVAL,
    DistInfo,
    EvalContext,
    StepContext,
    StepOutput,
    Trainer,
    TrainResult,
    TrainSettings,
    make_generator,
    unwrap,
)

LOGGER = logging.getLogger(__name__)

__all__ = [
    "MaskingSetup",
    "evaluate_regions",
    "make_eval_fn",
    "make_step_fn",
    "pretrain",
    "reconstruction_example",
    "sample_masks",
    "summarize_training",
]


@dataclass(frozen=True)
class MaskingSetup:
    """How masks become a loss.

    Attributes
    ----------
    masker : Masker
        Token-mask sampler (:func:`bids_regionmae.masking.build_masker`).
    patch_size : tuple of 4 int
        The model's ``(px, py, pz, pt)``.
    level : {'token', 'voxel'}
        ``token``: the model replaces masked tokens by its mask token;
        ``voxel``: masked voxels are set to ``background`` in the input.
    include_background : bool
        Loss over every voxel of masked tokens (NeuroSTORM) instead of brain voxels only.
    norm_patch : bool
        MAE's normalised-patch target.
    background : float
        Value of masked voxels at ``level='voxel'`` (the store's background).
    """

    masker: Masker
    patch_size: tuple[int, int, int, int]
    level: str = "token"
    include_background: bool = False
    norm_patch: bool = False
    background: float = 0.0

    @classmethod
    def from_plan(cls, plan: MaskingPlan, masker: Masker, background: float = 0.0) -> MaskingSetup:
        """The setup of a masking plan, with the masker built from it on the model grid."""
        return cls(masker=masker, patch_size=tuple(masker.patch_size), level=plan.level,
                   include_background=plan.include_background, norm_patch=plan.norm_patch_loss,
                   background=background)


def _forward(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, setup: MaskingSetup) -> torch.Tensor:
    if setup.level == "voxel":
        return model(apply_voxel_mask(x, mask, setup.patch_size, setup.background), None)
    return model(x, mask)


def _per_sample_loss(recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, brain: torch.Tensor,
                     setup: MaskingSetup) -> torch.Tensor:
    """Masked MSE of each clip, shape (B,), float32."""
    losses = [masked_mse(recon[b:b + 1], x[b:b + 1], mask[b:b + 1], setup.patch_size,
                         brain_mask=brain[b], include_background=setup.include_background,
                         norm_patch=setup.norm_patch) for b in range(x.shape[0])]
    return torch.stack(losses)


def make_step_fn(setup: MaskingSetup) -> Callable[[nn.Module, Any, StepContext], StepOutput]:
    """The engine step of masked-reconstruction pretraining.

    The returned function takes a batch of :class:`~bids_regionmae.train.data.ClipDataset`
    items (``clip`` (B, 1, X, Y, Z, T), ``brain_mask`` (B, X, Y, Z)), draws
    the global batch's token masks (B*world, D, H, W, T) from ``ctx.generator``,
    keeps this rank's rows and returns the mean per-clip masked MSE, plus the
    share of masked tokens as a metric.
    """
    def step_fn(model: nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> StepOutput:
        x = batch["clip"]
        brain = batch["brain_mask"]
        mask = setup.masker(ctx.global_batch, generator=ctx.generator, device=ctx.device)[ctx.local_rows]
        recon = _forward(model, x, mask, setup)
        loss = _per_sample_loss(recon, x, mask, brain, setup).mean()
        return StepOutput(loss=loss, batch_size=x.shape[0], metrics={"masked_ratio": float(mask.float().mean())})

    return step_fn


def sample_masks(masker: Masker, indices: Sequence[int], seed: int, device: torch.device | str) -> torch.Tensor:
    """Evaluation masks, one per dataset index, independent of batch size and world size.

    Parameters
    ----------
    masker : Masker
    indices : sequence of int
        Dataset indices of the batch's clips.
    seed : int
    device : torch.device or str

    Returns
    -------
    BoolTensor, shape (B, D, H, W, T)
    """
    masks = [masker(1, generator=make_generator(seed, STREAM_EVAL, int(i)), device=device) for i in indices]
    return torch.cat(masks, 0)


def make_eval_fn(setup: MaskingSetup, voxel_labels: torch.Tensor,
                 groups: Mapping[str, Sequence[int]]) -> Callable[[nn.Module, DataLoader, EvalContext], dict]:
    """The engine's evaluation: validation loss and per-group MSE of masked voxels.

    Parameters
    ----------
    setup : MaskingSetup
    voxel_labels : LongTensor, shape (X, Y, Z)
        Atlas labels on the model grid.
    groups : mapping of str to sequence of int
        Region groups to report (e.g. the seven lobes).

    Returns
    -------
    callable
        ``eval_fn(model, loader, ctx) -> {name: (sum, count)}`` with
        ``val_loss`` (mean per-clip masked MSE) and ``mse_<group>`` (mean over
        clips where the group has masked voxels).
    """
    def eval_fn(model: nn.Module, loader: DataLoader, ctx: EvalContext) -> dict[str, tuple[float, float]]:
        labels = voxel_labels.to(ctx.device)
        sums: dict[str, list[float]] = {"val_loss": [0.0, 0.0]}
        sums.update({f"mse_{g}": [0.0, 0.0] for g in groups})
        for batch in loader:
            x = batch["clip"].to(ctx.device)
            brain = batch["brain_mask"].to(ctx.device)
            mask = sample_masks(setup.masker, batch["index"].tolist(), ctx.seed, ctx.device)
            with ctx.autocast():
                recon = _forward(model, x, mask, setup)
            recon = recon.float()
            loss = _per_sample_loss(recon, x, mask, brain, setup)
            sums["val_loss"][0] += float(loss.sum())
            sums["val_loss"][1] += x.shape[0]
            for b in range(x.shape[0]):
                per = per_region_mse(recon[b:b + 1], x[b:b + 1], mask[b:b + 1], labels, groups, setup.patch_size,
                                     brain_mask=None if setup.include_background else brain[b])
                for g, value in per.items():
                    if not math.isnan(value):
                        sums[f"mse_{g}"][0] += value
                        sums[f"mse_{g}"][1] += 1
        return {k: (v[0], v[1]) for k, v in sums.items()}

    return eval_fn


@torch.no_grad()
def evaluate_regions(model: nn.Module, dataset: Dataset, setup: MaskingSetup, voxel_labels: torch.Tensor,
                     groups: Mapping[str, Sequence[int]], *, seed: int, device: torch.device | str,
                     batch_size: int = 2, autocast: Callable[[], Any] | None = None,
                     max_clips: int | None = None,
                     example: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Masked-voxel MSE per group over a dataset, pooled over clips (for the report).

    Parameters
    ----------
    model : nn.Module
    dataset : ClipDataset
    setup : MaskingSetup
    voxel_labels : LongTensor, shape (X, Y, Z)
    groups : mapping of str to sequence of int
        E.g. the lobes, or one entry per atlas region.
    seed : int
        Masks as in validation (:func:`sample_masks`).
    device : torch.device or str
    batch_size : int
    autocast : callable, optional
        Context-manager factory for the forward pass.
    max_clips : int, optional
        Evaluate at most this many clips (the first ones).
    example : dict, optional
        Filled with the first clip's tensors, as :func:`reconstruction_example`
        returns them (saves a forward pass when both are needed).

    Returns
    -------
    dict
        ``{group: {"mse": float, "n_clips": int}}``; ``mse`` is the mean over
        clips where the group has masked voxels (NaN if none).
    """
    import contextlib

    device = torch.device(device)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    labels = voxel_labels.to(device)
    n = len(dataset) if max_clips is None else min(len(dataset), max_clips)  # type: ignore[arg-type]
    sums = {g: [0.0, 0] for g in groups}
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    for batch in loader:
        x = batch["clip"].to(device)
        brain = batch["brain_mask"].to(device)
        mask = sample_masks(setup.masker, batch["index"].tolist(), seed, device)
        with (autocast() if autocast else contextlib.nullcontext()):
            recon = _forward(model, x, mask, setup)
        recon = recon.float()
        if example is not None and not example:
            example.update(_example(batch, 0, x, recon, mask, setup))
        for b in range(x.shape[0]):
            per = per_region_mse(recon[b:b + 1], x[b:b + 1], mask[b:b + 1], labels, groups, setup.patch_size,
                                 brain_mask=None if setup.include_background else brain[b])
            for g, value in per.items():
                if not math.isnan(value):
                    sums[g][0] += value
                    sums[g][1] += 1
    model.train(was_training)
    return {g: {"mse": (s / c if c else float("nan")), "n_clips": c} for g, (s, c) in sums.items()}


@torch.no_grad()
def reconstruction_example(model: nn.Module, dataset: Dataset, index: int, setup: MaskingSetup, *, seed: int,
                           device: torch.device | str,
                           autocast: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Original, masked input and reconstruction of one clip (for figures).

    Returns
    -------
    dict
        ``original``, ``reconstruction`` : FloatTensor (X, Y, Z, T) on CPU;
        ``voxel_mask`` : BoolTensor (X, Y, Z, T), True where the voxel belongs
        to a masked token; ``brain_mask`` : BoolTensor (X, Y, Z); ``subject``,
        ``run_id``, ``clip_index``.
    """
    import contextlib

    device = torch.device(device)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    item = dataset[index]
    x = item["clip"][None].to(device)
    mask = sample_masks(setup.masker, [index], seed, device)
    with (autocast() if autocast else contextlib.nullcontext()):
        recon = _forward(model, x, mask, setup)
    model.train(was_training)
    batch = {k: ([v] if isinstance(v, str) else torch.as_tensor(v)[None]) for k, v in item.items()}
    return _example(batch, 0, x, recon, mask, setup)


def _example(batch: Mapping[str, Any], b: int, x: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor,
             setup: MaskingSetup) -> dict[str, Any]:
    """Row ``b`` of a batch as CPU tensors for figures (see :func:`reconstruction_example`)."""
    from bids_regionmae.masking import token_to_voxel_mask

    vmask = token_to_voxel_mask(mask[b:b + 1], setup.patch_size)[0, 0].cpu()
    return {"original": x[b, 0].float().cpu(), "reconstruction": recon[b, 0].float().cpu(), "voxel_mask": vmask,
            "brain_mask": batch["brain_mask"][b].cpu(), "subject": batch["subject"][b],
            "run_id": batch["run_id"][b], "clip_index": int(batch["clip_index"][b])}


def pretrain(model: nn.Module, train_set: Dataset, val_set: Dataset | None, setup: MaskingSetup, *,
             settings: TrainSettings, out_dir: str | Path, voxel_labels: torch.Tensor,
             groups: Mapping[str, Sequence[int]], dist_info: DistInfo | None = None,
             fingerprint: Mapping[str, Any] | None = None,
             extra_state: Mapping[str, Any] | None = None) -> tuple[Trainer, TrainResult]:
    """Pretrain ``model`` by masked reconstruction (resuming when a checkpoint exists).

    Parameters
    ----------
    model : nn.Module
        MAE: ``model(x (B, 1, X, Y, Z, T), token_mask (B, D, H, W, T) or None) -> (B, 1, X, Y, Z, T)``.
    train_set, val_set : ClipDataset
        Disjoint participants.
    setup : MaskingSetup
    settings : TrainSettings
    out_dir : path
        The model directory: checkpoints, CSV logs and TensorBoard go there.
    voxel_labels : LongTensor, shape (X, Y, Z)
        Atlas labels on the model grid (per-group validation MSE).
    groups : mapping of str to sequence of int
    dist_info : DistInfo, optional
    fingerprint, extra_state : mapping, optional
        See :class:`~bids_regionmae.train.engine.Trainer`.

    Returns
    -------
    (Trainer, TrainResult)
        The trainer holds the trained model (``trainer.model``).
    """
    trainer = Trainer(model, train_set, step_fn=make_step_fn(setup), settings=settings, out_dir=out_dir,
                      eval_fn=make_eval_fn(setup, voxel_labels, groups), val_dataset=val_set,
                      dist_info=dist_info, fingerprint=fingerprint, extra_state=extra_state)
    result = trainer.fit()
    return trainer, result


def summarize_training(result: TrainResult, wall: float, *, dist_info: DistInfo, precision: str, backend: str,
                       variant: str, img_size: Sequence[int], n_train: int, n_val: int) -> dict[str, Any]:
    """JSON summary of a pretraining run (``training_summary.json``).

    Returns
    -------
    dict
        ``steps``, ``epochs``, first/final training loss, final validation
        loss, median clips/s, wall and training time, clip counts, world
        size, device, precision, backend, variant and input size.
    """
    import numpy as np

    history = result.history
    rates = [r["clips_per_s"] for r in history[1:]] or [r["clips_per_s"] for r in history]
    last_val = result.val_history[-1] if result.val_history else {}
    return {
        "steps": result.total_steps,
        "steps_per_epoch": result.steps_per_epoch,
        "epochs": (history[-1]["epoch"] + 1) if history else 0,
        "resumed_from_step": result.start_step,
        "stopped_early": result.stopped_early,
        "final_train_loss": history[-1]["loss"] if history else None,
        "first_train_loss": history[0]["loss"] if history else None,
        "final_val_loss": last_val.get("val_loss"),
        "clips_per_s_median": float(np.median(rates)) if rates else None,
        "wall_time_s_this_invocation": round(wall, 3),
        "train_time_s_total": history[-1]["elapsed_s"] if history else None,
        "n_train_clips": n_train,
        "n_val_clips": n_val,
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
        "precision": precision,
        "backend": backend,
        "variant": variant,
        "img_size": list(img_size),
    }


def final_region_errors(trainer: Trainer, eval_set: Dataset, setup: MaskingSetup, voxel_labels: torch.Tensor,
                        groups: Mapping[str, Sequence[int]], *, seed: int,
                        max_clips: int = 64) -> tuple[dict[str, Any], dict[int, Any], dict[str, Any] | None]:
    """Masked-voxel MSE per group and per atlas label after training, and a reconstruction example.

    Failures are logged (the evaluation is for the report and must not fail a finished training).

    Returns
    -------
    group_mse : dict of str to dict
        ``{group: {"mse", "n_clips"}}``.
    region_mse : dict of int to dict
        ``{label: {"mse", "n_clips"}}``.
    example : dict or None
        :func:`reconstruction_example` of the first clip.
    """
    group_mse: dict[str, Any] = {}
    region_mse: dict[int, Any] = {}
    example: dict[str, Any] = {}
    try:
        present = set(torch.unique(voxel_labels).tolist()) - {0}
        units = {**{f"group:{g}": v for g, v in groups.items()}, **{f"label:{i}": (i,) for i in sorted(present)}}
        values = evaluate_regions(trainer.model, eval_set, setup, voxel_labels, units, seed=seed,
                                  device=trainer.device, batch_size=trainer.settings.batch_size,
                                  autocast=trainer.autocast, max_clips=max_clips, example=example)
        group_mse = {k.split(":", 1)[1]: v for k, v in values.items() if k.startswith("group:")}
        region_mse = {int(k.split(":", 1)[1]): v for k, v in values.items() if k.startswith("label:")}
    except Exception as exc:  # noqa: BLE001 - evaluation for the report must not fail a finished training
        LOGGER.warning("final per-region evaluation failed: %s", exc)
    if not example:
        try:
            example = reconstruction_example(trainer.model, eval_set, 0, setup, seed=seed, device=trainer.device,
                                             autocast=trainer.autocast)
        except Exception as exc:  # noqa: BLE001
            LOGGER.warning("reconstruction example failed: %s", exc)
    return group_mse, region_mse, example or None
