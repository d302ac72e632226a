"""Group level, ``--stage compare``: the masking-strategy experiment of the region-aware paper.

Every entry of ``--strategies`` (``config.finetune.strategies``; default
``random`` + the seven lobe groups) is a masking choice in the vocabulary of
``--mask-strategy`` / ``--regions``::

    random          random tube masking (ratio --mask-ratio)
    random-region   whole atlas regions drawn at random (ratio --mask-ratio)
    <region>        region-aware masking of that selection (a lobe group such as
                    cerebellum or limbic, an AAL3 region name, cerebellum+frontal, ...)

turned into a masking plan by the same constructor as a single pretraining
(:meth:`bids_regionmae.workflows.session.Session.masking_plan`). For each, it

1. pretrains a masked autoencoder (:func:`bids_regionmae.workflows.pretrain.pretrain_model`;
   one model directory per strategy, the other settings, seed and
   participant split shared);
2. fine-tunes it on ``--target`` (:func:`bids_regionmae.workflows.finetune.run_finetune`)
   with the *same* evaluation splits and seeds for every strategy;
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
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.choices import MASK_STRATEGIES
from bids_regionmae.config import MaskingConfig, RunConfig
from bids_regionmae.errors import EXIT_OK, UsageError
from bids_regionmae.evaluation.splits import save_splits
from bids_regionmae.finetune.cv import pooled_summary, summary_floats
from bids_regionmae.masking import MaskingPlan
from bids_regionmae.models.mamba import resolve_backend
from bids_regionmae.models.model_dir import ModelDir
from bids_regionmae.models.registry import get_spec
from bids_regionmae.outputs.naming import compare_dir, pretrain_dir_name
from bids_regionmae.reports.evaluation import comparison_row, write_comparison
from bids_regionmae.train.data import ClipDataset
from bids_regionmae.train.engine import EvalContext, resolve_precision
from bids_regionmae.train.pretrain import MaskingSetup, make_eval_fn
from bids_regionmae.workflows.finetune import baseline_for, evaluation_splits, load_cohort, run_finetune
from bids_regionmae.workflows.pretrain import load_data, pretrain_model
from bids_regionmae.workflows.session import Session, open_session, seed_everything

LOGGER = logging.getLogger(__name__)

__all__ = ["COMMON_MSE_CLIPS", "DEFAULT_STRATEGIES", "common_reconstruction_mse", "entry_masking", "run"]

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
    strategies = list(config.finetune.strategies or DEFAULT_STRATEGIES)
    if len(set(strategies)) != len(strategies):
        raise UsageError(f"--strategies repeats an entry: {strategies}")
    if not config.finetune.target:
        raise UsageError("--stage compare needs --target COLUMN: the strategies are compared on fine-tuning "
                         "accuracy (e.g. --target diagnosis)")
    with open_session(config) as session:
        compare(session, strategies)
    return EXIT_OK


def entry_masking(masking: MaskingConfig, entry: str) -> MaskingConfig:
    """The masking settings of one ``--strategies`` entry: a strategy name, else a region selection."""
    if entry in MASK_STRATEGIES:
        return masking.model_copy(update={"strategy": entry})
    return masking.model_copy(update={"strategy": "region", "regions": (entry,)})


def _plans(session: Session, strategies: list[str]) -> dict[str, tuple[MaskingPlan, Path]]:
    """Masking plan and pretraining directory of every entry (region names are checked here, before training)."""
    config = session.config
    variant = get_spec(config.model.variant).name
    out = {}
    for entry in strategies:
        plan = session.masking_plan(entry_masking(config.masking, entry))
        out[entry] = (plan, session.output_dir / "models" / pretrain_dir_name(plan, variant, config.seed))
    if len({d for _, d in out.values()}) != len(out):
        raise UsageError(f"--strategies {strategies}: two entries pretrain the same model")
    return out


def _pretrained(session: Session, entry: str, plan: MaskingPlan, model_dir: Path) -> ModelDir:
    """The pretraining directory of ``entry``: trained now unless a finished one exists (and --resume)."""
    config = session.config
    done = ModelDir.is_saved(model_dir) and (model_dir / "training_summary.json").is_file()
    if done and config.train.resume:
        LOGGER.info("compare: %s already pretrained (%s)", entry, model_dir)
    else:
        LOGGER.info("compare: pretraining %s -> %s", entry, model_dir)
        pre_config = config.model_copy(update={"stage": "pretrain", "model_dir": None,
                                               "masking": entry_masking(config.masking, entry)})
        seed_everything(config.seed)
        pretrain_model(session.derive(pre_config, write_config=True), plan)
    session.barrier()
    return ModelDir.open(model_dir)


def compare(session: Session, strategies: list[str]) -> Path:
    """Pretrain and fine-tune every entry of ``strategies``, then write the comparison (rank 0).

    Returns
    -------
    Path
        The comparison folder.
    """
    config = session.config
    plans = _plans(session, strategies)
    cohort = load_cohort(session)
    splits = evaluation_splits(session, cohort)
    out_dir = compare_dir(session.output_dir, cohort.task.target)
    if session.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        session.write_config(out_dir)
        save_splits(out_dir / "splits.json", splits, metadata={"target": cohort.task.target, "seed": config.seed,
                                                               "strategies": strategies})
    baseline = baseline_for(session, cohort, splits, out_dir / "baseline_folds.json")
    common_path = out_dir / "common_mse.json"
    common: dict[str, Any] = {}
    if common_path.is_file() and config.train.resume:
        common = json.loads(common_path.read_text(encoding="utf-8"))
    rows = []
    for entry, (plan, model_dir) in plans.items():
        pretrained = _pretrained(session, entry, plan, model_dir)
        ft_session = session.derive(config.model_copy(update={"stage": "finetune", "model_dir": str(model_dir)}))
        result = run_finetune(ft_session, cohort, splits, pretrained=pretrained, baseline=baseline,
                              with_baseline=baseline is not None)
        own = (pretrained.read_json(pretrained.layout.training_summary) or {}).get("final_val_loss")
        if model_dir.name not in common:
            common[model_dir.name] = common_reconstruction_mse(session, pretrained)
            if session.is_main:
                atomic_write_json(common_path, common)
        rows.append(comparison_row(entry, summary_floats(result.summary), recon_mse=own,
                                   common_recon_mse=common[model_dir.name]["mse"], masking=plan.strategy,
                                   pretrained_dir=model_dir.name, finetuned_dir=result.model_dir.name))

    ft_session = session.derive(config.model_copy(update={"stage": "finetune", "model_dir": None}))
    scratch = run_finetune(ft_session, cohort, splits, pretrained=None, baseline=baseline,
                           with_baseline=baseline is not None)
    rows.append(comparison_row("no-pretraining", summary_floats(scratch.summary), masking="none",
                               finetuned_dir=scratch.model_dir.name))
    if baseline:
        rows.append(comparison_row("connectivity-baseline", summary_floats(pooled_summary(baseline)),
                                   masking="none"))
    if session.is_main:
        write_comparison(out_dir, rows, name="masking_comparison")
        LOGGER.info("masking comparison written to %s", out_dir / "masking_comparison.html")
    return out_dir


# --------------------------------------------------------------------------- reconstruction


def common_reconstruction_mse(session: Session, pretrained: ModelDir, *,
                              max_clips: int = COMMON_MSE_CLIPS) -> Mapping[str, Any]:
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

    config, device = session.config, session.device
    data_record = pretrained.meta.data
    val_subjects = list(data_record.val_participants or data_record.train_participants)
    model = pretrained.load_mae(resolve_backend(config.model.backend, device)).to(device).eval()
    spec = model.spec
    data = load_data(session, spec)
    plan = MaskingPlan("random", rule=config.atlas.patch_rule, ratio=config.masking.mask_ratio,
                       level=config.masking.level, include_background=config.masking.include_background)
    masker = plan.build_masker(data.voxel_labels, spec.patch_size, T=spec.img_size[3], brain_mask=data.group_brain,
                               device=device)
    setup = MaskingSetup.from_plan(plan, masker, background=data.background)
    val_set = ClipDataset(data.runs, spec.img_size, subjects=val_subjects)
    n = min(len(val_set), max_clips)
    if n == 0:
        return {"mse": math.nan, "n_clips": 0, "mask_ratio": plan.ratio, "participants": val_subjects}
    loader = DataLoader(Subset(val_set, range(n)), batch_size=config.train.batch_size)
    bf16 = resolve_precision(config.train.precision, device) == "bf16"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    ctx = EvalContext(step=0, epoch=0, rank=0, world_size=1, device=device, seed=config.seed, autocast=autocast)
    with torch.no_grad():
        sums = make_eval_fn(setup, data.voxel_labels, {})(model, loader, ctx)
    total, count = sums["val_loss"]
    return {"mse": total / count if count else math.nan, "n_clips": int(count), "mask_ratio": plan.ratio,
            "participants": val_subjects}
