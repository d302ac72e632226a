"""Group level, ``--stage compare``: the masking-strategy experiment of the region-aware paper.

For every entry of ``--strategies`` (``config.finetune.strategies``; default
``random`` + the seven lobe groups)::

    random          random tube masking (ratio --mask-ratio)
    random-region   whole atlas regions drawn at random (ratio --mask-ratio)
    <region>        region-aware masking of that region (a lobe group such as
                    cerebellum or limbic, an AAL3 region name, cerebellum+frontal, ...)

it

1. pretrains a masked autoencoder through the ``pretrain`` stage with the
   masking settings overridden (one model directory per strategy,
   ``output_dir/models/pretrain_<masking>_<variant>_seed-<seed>/``; the
   other settings, seed and participant split are shared);
2. fine-tunes it on ``--target`` through the ``finetune`` stage code with
   the *same* evaluation splits and seeds for every strategy
   (``output_dir/models/finetune_<target>_from-<pretrain dir>/``);
3. measures reconstruction: the strategy's own validation masked MSE (its
   ``training_summary.json``), and a *common* MSE -- random tube masking,
   with per-clip masks drawn from ``(seed, clip index)``, so identical for
   every strategy -- on the same validation clips (at most
   :data:`COMMON_MSE_CLIPS`), which makes the strategies comparable.

Two reference rows are added: ``no-pretraining`` (the same fine-tuning from
a seeded random encoder) and ``connectivity-baseline`` (AAL3 connectivity +
logistic regression on the same splits).

Output: ``output_dir/group/compare_<target>/``::

    masking_comparison.tsv / .json / .html   one row per strategy (+ the two references):
        strategy, recon_mse (own validation masked MSE), acc_mean, acc_sd, auroc_mean, auroc_sd,
        balanced_acc_mean, balanced_acc_sd, n_folds, common_recon_mse, masking, pretrained_dir,
        finetuned_dir
    splits.json                              the shared evaluation splits
    baseline_folds.json                      the baseline's fold results (reused on rerun)
    common_mse.json                          common reconstruction MSE per pretrained model (cache)
    regionmae_config.toml

Resumable: a strategy whose pretraining directory has its
``training_summary.json`` is not pretrained again, and fine-tuning skips the
splits (and the final model) it already finished; ``--no-resume`` redoes
everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bids_regionmae.config import RunConfig
from bids_regionmae.errors import EXIT_OK, UsageError

LOGGER = logging.getLogger(__name__)

__all__ = ["COMMON_MSE_CLIPS", "DEFAULT_STRATEGIES", "common_reconstruction_mse", "pretrain_config",
           "pretrained_dir", "run"]

#: The paper's main experiment: random tube masking and each lobe group.
DEFAULT_STRATEGIES = ("random", "frontal", "parietal", "temporal", "occipital", "limbic", "cerebellum",
                      "subcortical")
#: Validation clips used for the common (random-masking) reconstruction MSE.
COMMON_MSE_CLIPS = 64


def run(config: RunConfig) -> int:
    """Pretrain and fine-tune every masking strategy and write the comparison table.

    Returns
    -------
    int
        0 on success.

    Raises
    ------
    UsageError
        No ``--target``, an unknown region in ``--strategies``, or repeated strategies.
    """
    from bids_regionmae.train.engine import cleanup_distributed, init_distributed

    info = init_distributed(config.device)
    try:
        return _run(config, info)
    finally:
        cleanup_distributed(info)


# --------------------------------------------------------------------------- strategies


def pretrain_config(config: RunConfig, strategy: str) -> RunConfig:
    """``config`` for pretraining with masking strategy ``strategy``.

    ``random`` and ``random-region`` select those strategies; anything else is
    region-aware masking of that selection (``cerebellum``, ``cerebellum+frontal``...).
    """
    if strategy in ("random", "random-region"):
        masking = config.masking.model_copy(update={"strategy": strategy})
    else:
        masking = config.masking.model_copy(update={"strategy": "region", "regions": (strategy,)})
    return config.model_copy(update={"stage": "pretrain", "masking": masking, "model_dir": None})


def pretrained_dir(config: RunConfig, output_dir: Path, label_names: Mapping[int, str]) -> Path:
    """The model directory the pretrain stage writes for ``config`` (see :func:`model_dir_name`)."""
    from bids_regionmae.models.registry import get_spec
    from bids_regionmae.train.pretrain import model_dir_name
    from bids_regionmae.workflows.pretrain import resolve_masked_region

    region, _ = resolve_masked_region(config, label_names)
    m = config.masking
    name = model_dir_name(m.strategy, [region] if region else [], get_spec(config.model.variant).name, config.seed,
                          ratio=m.mask_ratio, fraction=m.mask_fraction, level=m.level)
    return output_dir / "models" / name


def _pretraining_done(model_dir: Path) -> bool:
    return (model_dir / "training_summary.json").is_file() and any(
        p.name.startswith("model.") for p in model_dir.iterdir())


# --------------------------------------------------------------------------- reconstruction


def common_reconstruction_mse(model_dir: Path, config: RunConfig, output_dir: Path, *, device: Any,
                              max_clips: int = COMMON_MSE_CLIPS) -> dict[str, Any]:
    """Masked MSE of a pretrained model under random tube masking on its validation clips.

    The masks are drawn per clip from ``(config.seed, clip index)``
    (:func:`bids_regionmae.train.pretrain.sample_masks`) with ratio
    ``config.masking.mask_ratio``; every strategy pretrained with the same
    seed has the same validation participants, hence the same clips and
    masks. Loss as in pretraining: in-brain voxels of masked tokens.

    Returns
    -------
    dict
        ``mse`` (float, NaN without clips), ``n_clips``, ``mask_ratio``, ``participants``.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from bids_regionmae.grid import MODEL_SHAPE
    from bids_regionmae.masking import build_masker
    from bids_regionmae.models.checkpoint import load_model
    from bids_regionmae.models.mamba import resolve_backend
    from bids_regionmae.train.data import ClipDataset, downsample_factors, downsample_labels, downsample_mask
    from bids_regionmae.train.engine import EvalContext, resolve_precision
    from bids_regionmae.train.pretrain import MaskingSetup, make_eval_fn
    from bids_regionmae.workflows.pretrain import load_model_grid_atlas, select_runs

    device = torch.device(device)
    manifest = json.loads((model_dir / "data_manifest.json").read_text(encoding="utf-8"))
    val_subjects = list(manifest.get("participants", {}).get("validation") or [])
    if not val_subjects:
        val_subjects = list(manifest.get("participants", {}).get("train") or [])
    loaded = load_model(model_dir, backend=resolve_backend(config.model.backend, device))
    model = loaded[0] if isinstance(loaded, tuple) else getattr(loaded, "model", loaded)
    spec = model.spec
    model = model.to(device).eval()
    runs = select_runs(output_dir, config)
    voxel_full, _, _, _ = load_model_grid_atlas(output_dir, config)
    factors = downsample_factors(MODEL_SHAPE, spec.img_size[:3])
    voxel_labels = downsample_labels(voxel_full, factors)
    group_brain = torch.stack([downsample_mask(r.mask, factors) for r in runs]).float().mean(0) > 0.5
    masker = build_masker("random", voxel_labels, spec.patch_size, ratio=config.masking.mask_ratio,
                          rule=config.atlas.patch_rule, brain_mask=group_brain, T=spec.img_size[3], device=device)
    background = float(runs[0].meta.get("normalization", {}).get("background_value", 0.0) or 0.0)
    setup = MaskingSetup(masker=masker, patch_size=tuple(spec.patch_size), level=config.masking.level,
                         include_background=config.masking.include_background, norm_patch=False,
                         background=background)
    val_set = ClipDataset(runs, spec.img_size, subjects=val_subjects)
    n = min(len(val_set), max_clips)
    if n == 0:
        return {"mse": math.nan, "n_clips": 0, "mask_ratio": config.masking.mask_ratio, "participants": val_subjects}
    loader = DataLoader(Subset(val_set, range(n)), batch_size=config.train.batch_size)
    bf16 = resolve_precision(config.train.precision, device) == "bf16"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    ctx = EvalContext(step=0, epoch=0, rank=0, world_size=1, device=device, seed=config.seed, autocast=autocast)
    with torch.no_grad():
        sums = make_eval_fn(setup, voxel_labels, {})(model, loader, ctx)
    total, count = sums["val_loss"]
    return {"mse": total / count if count else math.nan, "n_clips": int(count),
            "mask_ratio": config.masking.mask_ratio, "participants": val_subjects}


# --------------------------------------------------------------------------- main


def _row(strategy: str, summary: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    from bids_regionmae.evaluation.report import comparison_row
    from bids_regionmae.workflows.finetune import summary_floats

    recon = extra.pop("recon_mse", None)
    return comparison_row(strategy, summary_floats(summary), recon_mse=recon, **extra)


def _run(config: RunConfig, info: Any) -> int:
    from bids_regionmae.atomic import atomic_write_json
    from bids_regionmae.evaluation.splits import save_splits
    from bids_regionmae.finetune.cv import pooled_summary
    from bids_regionmae.workflows import pretrain as pretrain_stage
    from bids_regionmae.workflows.common import prepare_run
    from bids_regionmae.workflows.finetune import (
        _safe,
        baseline_results,
        cv_splits,
        load_cohort,
        run_finetune,
    )

    strategies = list(config.finetune.strategies or DEFAULT_STRATEGIES)
    if len(set(strategies)) != len(strategies):
        raise UsageError(f"--strategies repeats an entry: {strategies}")
    if not config.finetune.target:
        raise UsageError("--stage compare needs --target COLUMN: the strategies are compared on fine-tuning "
                         "accuracy (e.g. --target diagnosis)")
    ctx = prepare_run(config, write_config=info.is_main)
    output_dir = ctx.output_dir
    _, label_names, _, _ = pretrain_stage.load_model_grid_atlas(output_dir, config)
    configs = {s: pretrain_config(config, s) for s in strategies}
    dirs = {s: pretrained_dir(c, output_dir, label_names) for s, c in configs.items()}  # validates region names
    if len(set(dirs.values())) != len(dirs):
        raise UsageError(f"--strategies {strategies}: two entries pretrain the same model")

    cohort = load_cohort(config, output_dir)
    splits = cv_splits(cohort, config)
    out_dir = output_dir / "group" / f"compare_{_safe(cohort.task.target)}"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx.write_config(out_dir)
        save_splits(out_dir / "splits.json", splits, metadata={"target": cohort.task.target, "seed": config.seed,
                                                               "strategies": strategies})
    try:
        baseline = baseline_results(cohort, splits, config, output_dir,
                                    cache=out_dir / "baseline_folds.json" if info.is_main else None)
    except Exception as exc:  # noqa: BLE001 - the strategies are still compared
        LOGGER.error("the connectivity baseline failed (%s: %s); no baseline row", type(exc).__name__, exc)
        baseline = None
    common_path = out_dir / "common_mse.json"
    common: dict[str, Any] = {}
    if common_path.is_file() and config.train.resume:
        common = json.loads(common_path.read_text(encoding="utf-8"))

    rows = []
    for strategy in strategies:
        model_dir = dirs[strategy]
        if _pretraining_done(model_dir) and config.train.resume:
            LOGGER.info("compare: %s already pretrained (%s)", strategy, model_dir)
        else:
            LOGGER.info("compare: pretraining %s -> %s", strategy, model_dir)
            pretrain_stage.run(configs[strategy])
        ft_config = config.model_copy(update={"stage": "finetune", "model_dir": str(model_dir)})
        ft_ctx = dataclasses.replace(ctx, config=ft_config)
        result = run_finetune(ft_ctx, ft_config, cohort, splits, info=info, pretrained=model_dir, baseline=baseline,
                              with_baseline=baseline is not None)
        own = json.loads((model_dir / "training_summary.json").read_text(encoding="utf-8")).get("final_val_loss")
        if model_dir.name not in common:
            common[model_dir.name] = common_reconstruction_mse(model_dir, config, output_dir, device=info.device)
            if info.is_main:
                atomic_write_json(common_path, common)
        rows.append(_row(strategy, result.summary, recon_mse=own,
                         common_recon_mse=common[model_dir.name]["mse"],
                         masking=configs[strategy].masking.strategy, pretrained_dir=model_dir.name,
                         finetuned_dir=result.model_dir.name))

    scratch_config = config.model_copy(update={"stage": "finetune", "model_dir": None})
    scratch = run_finetune(dataclasses.replace(ctx, config=scratch_config), scratch_config, cohort, splits,
                           info=info, pretrained=None, baseline=baseline, with_baseline=baseline is not None)
    rows.append(_row("no-pretraining", scratch.summary, masking="none", finetuned_dir=scratch.model_dir.name))
    if baseline:
        rows.append(_row("connectivity-baseline", pooled_summary(baseline), masking="none"))
    if info.is_main:
        from bids_regionmae.evaluation.report import write_comparison

        write_comparison(out_dir, rows, name="masking_comparison")
        LOGGER.info("masking comparison written to %s", out_dir / "masking_comparison.html")
    return EXIT_OK
