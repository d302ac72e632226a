"""Group level, ``--stage pretrain``: region-aware masked pretraining on the model-ready store.

Reads what participant level wrote into ``output_dir`` (model-ready runs and
the atlas on the model grid), splits participants into training and
validation sets, builds the masking strategy, trains the masked autoencoder
with :mod:`bids_regionmae.train.engine` (resuming from the last checkpoint
when one exists) and writes a model directory::

    output_dir/models/<name>/
        model.*                     weights + spec (models.checkpoint.save_model)
        regionmae_config.toml       resolved configuration + environment (backend, precision, world size)
        train_log.csv               one row per optimizer step (loss, lr, clips/s)
        val_log.csv                 one row per epoch (val_loss, mse_<lobe>)
        training_summary.json       steps, epochs, final losses, throughput, device
        data_manifest.json          participants, runs, source sha256s, train/validation split
        region_mse.tsv              final masked-voxel MSE per lobe and per atlas region (validation set)
        masks/masking.json          the masker: strategy, labels, ratio/fraction, seed, patch counts
        masks/mask_tokens.npy       bool (D, H, W) token map (region: masked patches; random: candidates)
        masks/mask_voxels.nii.gz    the same map on the 96^3 model grid (MNI152NLin6Asym 2 mm)
        figures/loss_curves.svg     training and validation curves
        figures/masked_region.png   masked region over the mean image, three views
        figures/reconstruction.png  original / masked / reconstructed slices of a validation clip
        report.html                 all of the above on one page
        checkpoints/last.pt         full training state (resume)
        tensorboard/                TensorBoard events (when tensorboard is installed)

``<name>`` is :func:`bids_regionmae.train.pretrain.model_dir_name`, e.g.
``pretrain_region-cerebellum_tiny_seed-0`` or ``pretrain_random-ratio50_tiny_seed-0``.

For several GPUs or nodes start this stage with ``torchrun`` (see
:mod:`bids_regionmae.train.pretrain` for a single-node and a SLURM example);
every rank trains, only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae.atomic import sha256_file
from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_OK, InputMissingError, UsageError
from bids_regionmae.reports.figures import center_of, draw_slice_rows, orthogonal_views

LOGGER = logging.getLogger(__name__)

#: Stream key of the model-initialisation seed (see :func:`bids_regionmae.train.engine.derive_seed`).
STREAM_INIT = 11
#: Tokens of NeuroSTORM's MAE that region/random pretraining never uses (frozen so DDP sees no unused grads).
UNUSED_TOKENS = ("window_mask_token", "atlas_mask_token")


def run(config: RunConfig) -> int:
    """Pretrain a masked autoencoder on the participant-level outputs.

    Parameters
    ----------
    config : RunConfig
        ``model``, ``masking``, ``train``, ``atlas``, ``seed``, ``device`` and
        the ``inputs`` label filters are used.

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
    from bids_regionmae.train.engine import cleanup_distributed, init_distributed
    from bids_regionmae.workflows.common import resolve_device

    info = init_distributed(resolve_device(config.device))
    try:
        return _run(config, info)
    finally:
        cleanup_distributed(info)


# --------------------------------------------------------------------------- inputs


def select_runs(output_dir: Path, config: RunConfig) -> list[Any]:
    """Model-ready runs of ``output_dir`` that pass the participant/session/task/run filters.

    Raises
    ------
    InputMissingError
        None found.
    """
    from bids_regionmae.preprocess.store import find_model_ready_runs

    inputs = config.inputs
    runs = find_model_ready_runs(output_dir, subjects=list(inputs.participant_label) or None)
    filters = {"session": inputs.session_label, "task": inputs.task, "run": inputs.run}
    for entity, wanted in filters.items():
        if wanted:
            runs = [r for r in runs if r.entities.get(entity) in set(wanted)]
    if not runs:
        what = " matching the participant/session/task/run filters" if any(
            (inputs.participant_label, *filters.values())) else ""
        raise InputMissingError(
            f"{output_dir}: no model-ready data{what} (no complete sub-*/func/*_desc-modelready_bold.json). "
            f"Run participant level first: regionmae {config.bids_dir} {output_dir} participant")
    return runs


def load_model_grid_atlas(output_dir: Path, config: RunConfig, *, write: bool = True
                          ) -> tuple[np.ndarray, dict[int, str], dict[str, tuple[int, ...]], dict[str, str]]:
    """The atlas on the 96^3 model grid, its label names, lobe groups and provenance.

    Parameters
    ----------
    output_dir : Path
    config : RunConfig
        ``atlas.atlas_file`` / ``atlas.atlas_labels`` select a user atlas.
    write : bool
        Write the atlas derivative into ``output_dir`` if it is missing (rank 0 only).

    Returns
    -------
    voxel_labels : ndarray of int, shape (96, 96, 96)
    label_names : dict of int to str
    groups : dict of str to tuple of int
        The lobe groups restricted to labels of the atlas (empty groups dropped).
    provenance : dict
        Source, version, sha256, citation of the atlas.
    """
    from bids_regionmae.atlas import model_grid_atlas

    grid_atlas = model_grid_atlas(output_dir, atlas_file=config.atlas.atlas_file,
                                  atlas_labels=config.atlas.atlas_labels, write=write)
    return grid_atlas.voxel_labels, dict(grid_atlas.names), dict(grid_atlas.groups), dict(grid_atlas.provenance)


def resolve_masked_region(config: RunConfig, label_names: Mapping[int, str]) -> tuple[str, tuple[int, ...]]:
    """Name and labels of the masked region for the ``region`` strategy.

    Several selections (``--regions cerebellum --regions limbic`` or
    ``cerebellum,limbic``) are masked together, like ``cerebellum+limbic``.
    ``random`` and ``random-region`` ignore the regions (``random-region``
    draws from every atlas region).
    """
    from bids_regionmae.atlas import resolve_region

    if config.masking.strategy != "region":
        return "", ()
    if not config.masking.regions:
        raise UsageError("--mask-strategy region needs --regions (e.g. cerebellum, limbic, cerebellum+frontal)")
    regions = [resolve_region(spec, label_names) for spec in config.masking.regions]
    name = "+".join(r.name for r in regions)
    labels = tuple(sorted({i for r in regions for i in r.labels}))
    return name, labels


def data_manifest(runs: Sequence[Any], output_dir: Path, train: Sequence[str], val: Sequence[str],
                  datasets: Mapping[str, Any], config: RunConfig) -> dict[str, Any]:
    """Participants, runs (with the source checksums of their sidecars) and the split, as JSON."""
    split = {**{s: "train" for s in train}, **{s: "validation" for s in val}}
    clips_per_run: dict[str, int] = {}
    for dataset in datasets.values():
        for ref in dataset.clips:
            clips_per_run[ref.run_id] = clips_per_run.get(ref.run_id, 0) + 1
    rows = []
    for run in runs:
        meta = run.meta
        sources = {k: {kk: v.get(kk) for kk in ("path", "sha256", "size")}
                   for k, v in (meta.get("sources") or {}).items() if isinstance(v, dict)}
        rows.append({
            "run_id": run.run_id,
            "subject": run.subject,
            "entities": run.entities,
            "split": split.get(run.subject, "unused"),
            "sidecar": str(Path(run.sidecar).relative_to(output_dir)) if Path(run.sidecar).is_relative_to(
                output_dir) else str(run.sidecar),
            "sidecar_sha256": sha256_file(Path(run.sidecar)),
            "data": str(Path(run.paths["data"]).name),
            "data_size": Path(run.paths["data"]).stat().st_size,
            "frames": run.n_frames,
            "clips_used": clips_per_run.get(run.run_id, 0),
            "repetition_time": meta.get("repetition_time"),
            "inputs_fingerprint": meta.get("inputs_fingerprint"),
            "sources": sources,
        })
    return {
        "participants": {"train": list(train), "validation": list(val)},
        "split": {"unit": "participant", "seed": config.seed, "val_fraction": config.train.val_fraction},
        "n_clips": {name: len(ds) for name, ds in datasets.items()},
        "runs": rows,
    }


# --------------------------------------------------------------------------- main


def _run(config: RunConfig, info: Any) -> int:
    import torch

    from bids_regionmae.grid import MODEL_SHAPE
    from bids_regionmae.masking import build_masker
    from bids_regionmae.models.mamba import resolve_backend
    from bids_regionmae.models.registry import create_mae, get_spec
    from bids_regionmae.train.data import (
        ClipDataset,
        downsample_factors,
        downsample_labels,
        downsample_mask,
        split_participants,
    )
    from bids_regionmae.train.engine import TrainSettings, derive_seed, resolve_precision
    from bids_regionmae.train.pretrain import MaskingSetup, model_dir_name, pretrain
    from bids_regionmae.workflows.common import prepare_run

    ctx = prepare_run(config, write_config=info.is_main)
    device = info.device
    runs = select_runs(ctx.output_dir, config)
    voxel_labels_full, label_names, groups, atlas_provenance = load_model_grid_atlas(ctx.output_dir, config,
                                                                                     write=info.is_main)
    region_name, region_labels = resolve_masked_region(config, label_names)

    spec = get_spec(config.model.variant)
    backend = resolve_backend(config.model.backend, device)
    factors = downsample_factors(MODEL_SHAPE, spec.img_size[:3])
    voxel_labels = downsample_labels(voxel_labels_full, factors)

    train_subjects, val_subjects = split_participants(sorted({r.subject for r in runs}),
                                                      config.train.val_fraction, config.seed)
    train_set = ClipDataset(runs, spec.img_size, subjects=train_subjects)
    val_set = ClipDataset(runs, spec.img_size, subjects=val_subjects)
    if len(train_set) == 0:
        raise InputMissingError(f"no clip of {spec.img_size[3]} frames in the training runs: the runs are "
                                "shorter than the model's clip length")
    # group brain mask (majority of runs) on the model grid: brain patches of the masker
    masks = torch.stack([downsample_mask(r.mask, factors) for r in runs]).float()
    group_brain = masks.mean(0) > 0.5

    masking = config.masking
    masker = build_masker(masking.strategy, voxel_labels, spec.patch_size, labels=region_labels or None,
                          ratio=masking.mask_ratio, fraction=masking.mask_fraction, rule=config.atlas.patch_rule,
                          brain_mask=group_brain, T=spec.img_size[3], device=device)
    background = float(runs[0].meta.get("normalization", {}).get("background_value", 0.0) or 0.0)
    setup = MaskingSetup(masker=masker, patch_size=tuple(spec.patch_size), level=masking.level,
                         include_background=masking.include_background, norm_patch=masking.norm_patch_loss,
                         background=background)

    name = model_dir_name(masking.strategy, [region_name] if region_name else [], spec.name, config.seed,
                          ratio=masking.mask_ratio, fraction=masking.mask_fraction, level=masking.level)
    model_dir = ctx.output_dir / "models" / name
    precision = resolve_precision(config.train.precision, device)
    if info.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
        ctx.write_config(model_dir, backend=backend, precision=precision, world_size=info.world_size,
                         model_dir=str(model_dir))
    LOGGER.info("pretraining %s: %d runs, %d participants (%d train / %d validation), %d + %d clips, masker %r",
                name, len(runs), len(train_subjects) + len(val_subjects), len(train_subjects), len(val_subjects),
                len(train_set), len(val_set), masker)

    torch.manual_seed(derive_seed(config.seed, STREAM_INIT))
    model = create_mae(spec, backend=backend)
    for token in UNUSED_TOKENS:
        param = getattr(model, token, None)
        if isinstance(param, torch.nn.Parameter):
            param.requires_grad_(False)

    settings = TrainSettings.from_config(config.train, seed=config.seed)
    fingerprint = {
        "variant": spec.name, "spec": spec.to_dict(), "strategy": masking.strategy, "region": region_name,
        "labels": list(region_labels), "mask_ratio": masking.mask_ratio, "mask_fraction": masking.mask_fraction,
        "patch_rule": config.atlas.patch_rule, "level": masking.level,
        "include_background": masking.include_background, "norm_patch_loss": masking.norm_patch_loss,
        "seed": config.seed, "batch_size": settings.batch_size, "grad_accum": settings.grad_accum,
        "lr": settings.lr, "weight_decay": settings.weight_decay, "warmup_fraction": settings.warmup_fraction,
        "precision": precision, "train_subjects": list(train_subjects), "n_train_clips": len(train_set),
    }
    t0 = time.perf_counter()
    trainer, result = pretrain(model, train_set, val_set if len(val_set) else None, setup, settings=settings,
                               out_dir=model_dir, voxel_labels=voxel_labels, groups=groups, dist_info=info,
                               fingerprint=fingerprint,
                               extra_state={"train_subjects": list(train_subjects),
                                            "val_subjects": list(val_subjects)})
    wall = time.perf_counter() - t0
    if not info.is_main:
        return EXIT_OK

    from bids_regionmae.atomic import atomic_write_json
    from bids_regionmae.models.checkpoint import save_model

    trained = trainer.model
    save_model(model_dir, trained, extra={"stage": "pretrain", "model_dir_name": name,
                                          "masking": masker.describe(), "seed": config.seed,
                                          "steps": result.total_steps})
    ctx.write_config(model_dir, backend=backend, precision=precision, world_size=info.world_size,
                     model_dir=str(model_dir))
    datasets = {"train": train_set, "validation": val_set}
    atomic_write_json(model_dir / "data_manifest.json",
                      data_manifest(runs, ctx.output_dir, train_subjects, val_subjects, datasets, config))
    masking_record = {
        **masker.describe(), "seed": config.seed, "region": region_name or None,
        "level": masking.level, "include_background": masking.include_background,
        "norm_patch_loss": masking.norm_patch_loss, "model_grid": list(spec.img_size[:3]),
        "downsampling": list(factors), "train_masks": "drawn per step from (seed, step, micro-batch)",
        "validation_masks": "drawn per clip from (seed, clip index)", "atlas": atlas_provenance,
        "never_masked_labels": _never_masked(masker, voxel_labels, region_labels, spec.patch_size),
    }
    _write_masks(model_dir, masker, masking_record, spec, factors)

    eval_set = val_set if len(val_set) else train_set
    summary = _summarize(result, wall, info, precision, backend, spec, len(train_set), len(val_set))
    atomic_write_json(model_dir / "training_summary.json", summary)
    extras = _final_evaluation(trainer, eval_set, setup, voxel_labels, groups, label_names, config.seed,
                               model_dir)
    _write_report(model_dir, name=name, config=config, result=result, summary=summary, region=region_name,
                  masker=masker, masking_record=masking_record, runs=runs, extras=extras,
                  label_names=label_names, train_subjects=train_subjects, val_subjects=val_subjects)
    LOGGER.info("pretraining done: %s (%d steps, final loss %.4f)", model_dir, result.total_steps,
                summary.get("final_train_loss") or float("nan"))
    return EXIT_OK


# --------------------------------------------------------------------------- outputs


def _write_masks(model_dir: Path, masker: Any, record: dict[str, Any], spec: Any, factors: Sequence[int]) -> None:
    import nibabel as nib
    import torch

    from bids_regionmae.atomic import atomic_path, atomic_write_json
    from bids_regionmae.grid import MODEL_AFFINE

    folder = model_dir / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    token_map = masker.region_patch_map.detach().cpu().numpy().astype(bool)  # (D, H, W)
    with atomic_path(folder / "mask_tokens.npy") as tmp:
        np.save(tmp, token_map)
    px, py, pz = spec.patch_size[:3]
    up = torch.as_tensor(token_map)
    voxels = up.repeat_interleave(px * factors[0], 0).repeat_interleave(py * factors[1], 1)
    voxels = voxels.repeat_interleave(pz * factors[2], 2).numpy().astype(np.uint8)
    img = nib.Nifti1Image(voxels, MODEL_AFFINE)
    img.header.set_xyzt_units("mm")
    img.header.set_sform(MODEL_AFFINE, code=4)
    img.header.set_qform(MODEL_AFFINE, code=4)
    with atomic_path(folder / "mask_voxels.nii.gz") as tmp:
        nib.save(img, str(tmp))
    record = {**record, "files": {"mask_tokens.npy": "bool (D, H, W): "
                                  + {"region": "patches masked in every frame",
                                     "random": "candidate patches (ratio of them masked per clip)",
                                     "random-region": "union of the candidate regions"}[masker.strategy],
                                  "mask_voxels.nii.gz": "the same map on the 96^3 model grid"}}
    atomic_write_json(folder / "masking.json", record)


def _never_masked(masker: Any, voxel_labels: Any, labels: Sequence[int], patch_size: Sequence[int]) -> list[int]:
    """Labels of the region (``region`` strategy) with no voxel in any patch that gets masked."""
    if masker.strategy != "region" or not labels:
        return []
    import torch

    px, py, pz = patch_size[:3]
    covered = masker.region_patch_map.cpu().repeat_interleave(px, 0).repeat_interleave(py, 1)
    covered = covered.repeat_interleave(pz, 2)
    present = set(torch.unique(voxel_labels[covered]).tolist())
    return sorted(int(i) for i in labels if int(i) not in present)


def _summarize(result: Any, wall: float, info: Any, precision: str, backend: str, spec: Any, n_train: int,
               n_val: int) -> dict[str, Any]:
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
        "world_size": info.world_size,
        "device": str(info.device),
        "precision": precision,
        "backend": backend,
        "variant": spec.name,
        "img_size": list(spec.img_size),
    }


def _final_evaluation(trainer: Any, eval_set: Any, setup: Any, voxel_labels: Any, groups: Mapping[str, Any],
                      label_names: Mapping[int, str], seed: int, model_dir: Path) -> dict[str, Any]:
    """Per-lobe and per-region MSE of the evaluation set, written to ``region_mse.tsv``."""
    import torch

    from bids_regionmae.atomic import atomic_write_text
    from bids_regionmae.train.pretrain import evaluate_regions, reconstruction_example

    out: dict[str, Any] = {"group_mse": {}, "region_mse": {}, "example": None}
    try:
        present = set(torch.unique(voxel_labels).tolist()) - {0}
        per_label = {str(i): (i,) for i in sorted(present)}
        all_groups = {**{f"group:{g}": v for g, v in groups.items()}, **{f"label:{k}": v for k, v in per_label.items()}}
        example: dict[str, Any] = {}
        values = evaluate_regions(trainer.model, eval_set, setup, voxel_labels, all_groups, seed=seed,
                                  device=trainer.device, batch_size=trainer.settings.batch_size,
                                  autocast=trainer.autocast, max_clips=64, example=example)
        out["example"] = example or None
        out["group_mse"] = {k.split(":", 1)[1]: v for k, v in values.items() if k.startswith("group:")}
        out["region_mse"] = {int(k.split(":", 1)[1]): v for k, v in values.items() if k.startswith("label:")}
        lines = ["level\tindex\tname\tmse\tn_clips"]
        for g, v in out["group_mse"].items():
            lines.append(f"lobe\tn/a\t{g}\t{_fmt(v['mse'])}\t{v['n_clips']}")
        for i, v in out["region_mse"].items():
            lines.append(f"region\t{i}\t{label_names.get(i, str(i))}\t{_fmt(v['mse'])}\t{v['n_clips']}")
        atomic_write_text(model_dir / "region_mse.tsv", "\n".join(lines) + "\n")
    except Exception as exc:  # noqa: BLE001 - evaluation for the report must not fail a finished training
        LOGGER.warning("final per-region evaluation failed: %s", exc)
    if out["example"] is None:
        try:
            out["example"] = reconstruction_example(trainer.model, eval_set, 0, setup, seed=seed,
                                                    device=trainer.device, autocast=trainer.autocast)
        except Exception as exc:  # noqa: BLE001
            LOGGER.warning("reconstruction example failed: %s", exc)
    return out


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


# --------------------------------------------------------------------------- figures


def _draw_curves(fig: Any, history: Sequence[Mapping[str, Any]], val_history: Sequence[Mapping[str, Any]]) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    ax1.plot(steps, losses, lw=0.8, color="#9ab", label="train (per step)")
    if len(losses) >= 5:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax1.plot(steps[k - 1:], smooth, color="#2b6cb0", label=f"train ({k}-step mean)")
    if val_history:
        ax1.plot([r["step"] for r in val_history], [r.get("val_loss", np.nan) for r in val_history], "o-",
                 color="#c53030", label="validation")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("masked MSE")
    ax1.set_title("loss")
    ax1.legend(fontsize=8)
    names = sorted({k for r in val_history for k in r if k.startswith("mse_")})
    for name in names:
        ys = [r.get(name, np.nan) for r in val_history]
        if np.isfinite(np.asarray(ys, dtype=float)).any():
            ax2.plot([r["step"] for r in val_history], ys, "o-", label=name[4:])
    ax2.set_xlabel("optimizer step")
    ax2.set_title("validation MSE per lobe (masked voxels)")
    if ax2.lines:
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax2.transAxes)


def _draw_mask(fig: Any, background: np.ndarray, region: np.ndarray, title: str) -> None:
    axes = fig.subplots(1, 3)
    center = center_of(region)
    views = zip(axes, orthogonal_views(background, center), orthogonal_views(region.astype(float), center),
                strict=True)
    for ax, (view, bg), (_, rg) in views:
        ax.imshow(bg, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_where(rg < 0.5, rg), cmap="autumn", alpha=0.55, origin="lower", vmin=0, vmax=1)
        ax.set_title(view)
        ax.axis("off")
    fig.suptitle(title)


def _draw_reconstruction(fig: Any, example: Mapping[str, Any]) -> None:
    original = example["original"].numpy()[..., 0]
    recon = example["reconstruction"].numpy()[..., 0]
    vmask = example["voxel_mask"].numpy()[..., 0]
    brain = example["brain_mask"].numpy()
    masked = np.where(vmask, np.nan, original)
    recon = np.where(brain, recon, np.median(original[~brain]) if (~brain).any() else 0.0)
    center = center_of(vmask & brain) if (vmask & brain).any() else center_of(brain)
    lo, hi = np.nanpercentile(original[brain], [2, 98]) if brain.any() else (-2, 2)
    rows = [("original", original), ("masked input", masked), ("reconstruction", recon)]
    draw_slice_rows(fig, rows, center, lo, hi,
                    title=f"{example['run_id']} clip {example['clip_index']}, frame 0 (masked voxels blank)")


def _background_image(runs: Sequence[Any]) -> np.ndarray:
    """A mean image on the 96^3 grid: the first run's mean BOLD reference, else its first frames' mean."""
    run = runs[0]
    path = run.paths.get("mean")
    if path is not None and Path(path).is_file():
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    frames = np.asarray(run.data[: min(run.n_frames, 10)], dtype=np.float32)
    return frames.mean(0)


def _write_report(model_dir: Path, *, name: str, config: RunConfig, result: Any, summary: Mapping[str, Any],
                  region: str, masker: Any, masking_record: Mapping[str, Any], runs: Sequence[Any],
                  extras: Mapping[str, Any], label_names: Mapping[int, str], train_subjects: Sequence[str],
                  val_subjects: Sequence[str]) -> Path | None:
    """Figures and the HTML report; every failure is logged, never raised."""
    try:
        from bids_regionmae.reports.html import HtmlReport, safe_figure
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        LOGGER.warning("cannot build the report: %s", exc)
        return None
    figures = model_dir / "figures"
    curves = safe_figure(figures / "loss_curves.svg", _draw_curves, result.history, result.val_history,
                         figsize=(11, 4))
    mask_fig = None
    try:
        voxels_path = model_dir / "masks" / "mask_voxels.nii.gz"
        import nibabel as nib

        region_voxels = np.asarray(nib.load(str(voxels_path)).dataobj) > 0
        title = (f"masked region: {region}" if masker.strategy == "region"
                 else f"{masker.strategy}: candidate patches (ratio {masker.ratio})")
        mask_fig = safe_figure(figures / "masked_region.png", _draw_mask, _background_image(runs), region_voxels,
                               title, figsize=(11, 4))
    except Exception as exc:  # noqa: BLE001
        LOGGER.warning("could not draw the masked-region figure: %s", exc)
    recon_fig = None
    if extras.get("example") is not None:
        recon_fig = safe_figure(figures / "reconstruction.png", _draw_reconstruction, extras["example"],
                                figsize=(9, 9))

    report = HtmlReport(f"Pretraining: {name}", model_dir / "report.html")
    try:
        report.heading("Summary")
        report.table([
            {"item": "masking", "value": (f"region: {region}" if region else masker.strategy)
             + (f", fraction {masker.fraction}" if masker.strategy == "region" and masker.fraction != 1 else "")
             + (f", ratio {masker.ratio}" if masker.ratio is not None else "")},
            {"item": "masked patches / clip", "value": f"{masking_record['n_masked_patches']} of "
                                                       f"{int(np.prod(masker.grid[:3]))} (rule {masker.rule})"},
            {"item": "model", "value": f"{summary['variant']} {tuple(summary['img_size'])}, backend "
                                       f"{summary['backend']}, {summary['precision']}"},
            {"item": "device", "value": f"{summary['device']} x {summary['world_size']} process(es)"},
            {"item": "steps", "value": f"{summary['steps']} ({summary['epochs']} epoch(s), "
                                       f"{summary['steps_per_epoch']} steps/epoch)"},
            {"item": "batch", "value": f"{config.train.batch_size} per process x {config.train.grad_accum} "
                                       f"accumulation x {summary['world_size']}"},
            {"item": "train loss (first -> last)", "value": f"{_fmt(summary['first_train_loss'])} -> "
                                                            f"{_fmt(summary['final_train_loss'])}"},
            {"item": "final validation loss", "value": _fmt(summary["final_val_loss"])},
            {"item": "throughput", "value": f"{_fmt(summary['clips_per_s_median'])} clips/s (median)"},
            {"item": "participants", "value": f"{len(train_subjects)} train, {len(val_subjects)} validation "
                                              f"({summary['n_train_clips']} / {summary['n_val_clips']} clips)"},
            {"item": "seed", "value": str(config.seed)},
        ])
        never = masking_record.get("never_masked_labels") or []
        if never:
            names = ", ".join(f"{i} {label_names.get(i, '')}".strip() for i in never)
            report.paragraph(f"{len(never)} label(s) of the region have no voxel in any masked patch (patch rule "
                             f"'{masker.rule}' on the model grid) and are never masked: {names}", kind="warn")
        report.heading("Training curves")
        report.figure(curves, "Masked in-brain MSE per step (train) and per epoch (validation); right: "
                              "validation MSE per lobe.")
        report.heading("Masked region")
        report.figure(mask_fig, "Token-level mask on the model grid over the mean image "
                                "(slices through its centre).")
        report.heading("Reconstruction example")
        report.figure(recon_fig, "A held-out clip: original, input with masked voxels blank, reconstruction.")
        report.heading("Reconstruction error per lobe")
        group_rows = [{"lobe": g, "MSE (masked voxels)": v["mse"], "clips": v["n_clips"]}
                      for g, v in extras.get("group_mse", {}).items()]
        report.table(group_rows)
        region_rows = [{"index": i, "region": v.get("name", ""), "MSE": v["mse"], "clips": v["n_clips"]}
                       for i, v in _named(extras.get("region_mse", {}), label_names).items()
                       if v["n_clips"]]
        if region_rows:
            report.heading("Reconstruction error per region (masked regions only)")
            report.table(region_rows)
        report.paragraph("Full tables: region_mse.tsv, train_log.csv, val_log.csv; data: data_manifest.json; "
                         "masks: masks/; configuration: regionmae_config.toml.")
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        LOGGER.warning("report content incomplete: %s", exc)
    return report.write()


def _named(region_mse: Mapping[int, Mapping[str, Any]], names: Mapping[int, str]) -> dict[int, dict[str, Any]]:
    return {i: {**v, "name": names.get(i, "")} for i, v in region_mse.items()}
