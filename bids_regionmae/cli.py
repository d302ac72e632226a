"""Command-line interface of the BIDS-App (``regionmae``).

Follows the BIDS Apps execution specification: positionals
``bids_dir output_dir {participant,group}``, entity filters, and its exit
codes (0 ok, 1 error, 16 validation failed, 17 unknown level, 18 filters
matched nothing, 64 usage, 66 input missing, 73 cannot create output).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from bids_regionmae import __version__
from bids_regionmae.choices import (
    BACKENDS,
    DEVICES,
    FINETUNE_MODES,
    MASK_LEVELS,
    MASK_STRATEGIES,
    OCCLUSION_MODES,
    PATCH_RULES,
    PRECISIONS,
)
from bids_regionmae.errors import (
    EXIT_ERROR,
    EXIT_INPUT_MISSING,
    EXIT_USAGE,
    InputMissingError,
    RegionMAEError,
    UnknownLevelError,
    UsageError,
)

LOGGER = logging.getLogger("bids_regionmae")

#: Options that accept several space-separated values after the positionals,
#: as in ``--participant-label 01 02 03`` (fMRIPrep style).
MULTI_VALUE_OPTIONS = ("--participant-label", "--session-label", "--task", "--run", "--space")
LEVELS = ("participant", "group")
STAGES = {"participant": ("preprocess", "predict"), "group": ("pretrain", "finetune", "compare")}

HELP = """Region-aware masked pretraining of a 4D fMRI foundation model (BIDS-App).

\b
BIDS_DIR      fMRIPrep derivatives (or a raw BIDS dataset with --derivatives)
OUTPUT_DIR    where derivatives are written (never inside BIDS_DIR)
ANALYSIS_LEVEL
              participant: fMRIPrep BOLD -> model-ready arrays, QC and reports;
                           with --model, predictions/embeddings per run
              group:       --stage pretrain | finetune | compare

\b
Examples:
  regionmae /data/fmriprep /out participant --participant-label 01 02
  regionmae /data/fmriprep /out group --stage pretrain --mask-strategy region --regions cerebellum
  regionmae /data/fmriprep /out group --stage finetune --target diagnosis
  regionmae /data/fmriprep /out participant --model /out/models/<model-dir>

Exit codes: 0 ok, 1 error, 16 validation failed, 17 unknown level,
18 filters matched nothing, 64 usage, 66 input missing, 73 cannot create output.
"""


class BIDSAppCommand(click.Command):
    """A click command that lets list options take several values after the positionals.

    ``regionmae bids out participant --participant-label 01 02`` is rewritten
    to ``... --participant-label 01 --participant-label 02`` before parsing.
    Bare words after such an option are only taken as its values once the
    three positionals have been seen, so positionals are never swallowed.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        value_options = {name for param in self.params if isinstance(param, click.Option)
                         and not param.is_flag and not param.count for name in param.opts}
        rewritten: list[str] = []
        positionals = 0
        current_multi: str | None = None
        expect_value = False
        for token in args:
            if expect_value:
                rewritten.append(token)
                expect_value = False
                continue
            if token.startswith("-") and token != "-":
                name = token.split("=", 1)[0]
                current_multi = name if name in MULTI_VALUE_OPTIONS and "=" not in token else None
                expect_value = name in value_options and "=" not in token
                rewritten.append(token)
                continue
            if current_multi and positionals >= 3 and rewritten and rewritten[-1] != current_multi:
                rewritten.extend([current_multi, token])
                continue
            current_multi = None
            positionals += 1
            rewritten.append(token)
        return super().parse_args(ctx, rewritten)


def _labels(values: tuple[str, ...]) -> list[str]:
    """Expand values given as words, comma lists or files of labels."""
    out: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            out.extend(word for word in text.replace(",", " ").split() if word)
        else:
            out.extend(part for part in value.replace(",", " ").split() if part)
    return out


def _parse_derivatives(values: tuple[str, ...]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "fmriprep", value
        parsed[name.strip()] = str(Path(path).expanduser())
    return parsed


def _read_filter_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise InputMissingError(f"--bids-filter-file {file}: no such file. Give a JSON file such as "
                                '{"bold": {"task": "rest", "session": null}}.')
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"--bids-filter-file {file}: not valid JSON ({exc.msg} at line {exc.lineno}). "
                         "Fix the syntax; null means 'entity absent', \"*\" means any value.") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(f"--bids-filter-file {file}: expected an object of queries, e.g. "
                         '{"bold": {"task": "rest"}}, got ' + type(data).__name__ + ".")
    return data


@click.command(cls=BIDSAppCommand, help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                               "max_content_width": 100})
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level")
@click.version_option(__version__, "--version", prog_name="regionmae")
@click.option("--participant-label", multiple=True,
              help="Participants to process, with or without 'sub-'; several values, or a file of labels.")
@click.option("--session-label", multiple=True, help="Sessions to process, with or without 'ses-'.")
@click.option("--task", multiple=True, help="Tasks to process, with or without 'task-'.")
@click.option("--run", "run_label", multiple=True, help="Runs to process, with or without 'run-'.")
@click.option("--space", multiple=True,
              help="Preferred fMRIPrep output spaces, in order [default: MNI152NLin6Asym MNI152NLin2009cAsym].")
@click.option("--bids-filter-file", type=click.Path(), default=None,
              help='JSON filters, fMRIPrep semantics: {"bold": {"session": null, "task": "*"}}.')
@click.option("--derivatives", multiple=True, metavar="NAME=PATH",
              help="Where fMRIPrep outputs are when BIDS_DIR is a raw dataset, e.g. fmriprep=/data/deriv/fmriprep.")
@click.option("--phenotype", type=click.Path(), default=None,
              help="TSV/CSV with participant_id and label columns (default: participants.tsv).")
@click.option("--skip-bids-validation", is_flag=True, default=None, help="Skip input checks.")
@click.option("-w", "--work-dir", type=click.Path(), default=None,
              help="Scratch/cache folder (index cache, temporary files) [default: OUTPUT_DIR/.work].")
@click.option("--nprocs", type=click.IntRange(min=1), default=None, help="Parallel processes [default: 1].")
@click.option("--omp-nthreads", type=click.IntRange(min=1), default=None,
              help="Threads per process for torch/BLAS [default: cores / nprocs].")
@click.option("--config-file", type=click.Path(), default=None,
              help="TOML configuration; command-line options override it (e.g. a previous run's config).")
@click.option("--stage", default=None,
              help="participant: preprocess (default) | predict; group: pretrain (default) | finetune | compare.")
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Trained model directory (participant level: predict with it; finetune: start from it).")
@click.option("--seed", type=int, default=None, help="Random seed [default: 0].")
@click.option("--device", type=click.Choice(DEVICES), default=None, help="Compute device.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Mamba kernels: mamba-ssm (CUDA) or pure PyTorch [default: auto].")
@click.option("--variant", default=None, help="Model variant: neurostorm | tiny | ... [default: tiny].")
@click.option("--atlas-file", type=click.Path(), default=None, help="AAL3-compatible atlas NIfTI.")
@click.option("--atlas-labels", type=click.Path(), default=None, help="Label table for --atlas-file.")
@click.option("--patch-rule", type=click.Choice(PATCH_RULES), default=None,
              help="When a 6^3 patch belongs to a region [default: majority].")
@click.option("--target-tr", type=float, default=None, help="Resample runs in time to this TR (s).")
@click.option("--clip-length", type=click.IntRange(min=1), default=None, help="Frames per clip [default: 20].")
@click.option("--mask-strategy", type=click.Choice(MASK_STRATEGIES), default=None,
              help="Pretraining masking strategy [default: region].")
@click.option("--regions", multiple=True,
              help="Regions to mask: lobe groups, AAL3 names or indices; '+' joins [default: cerebellum].")
@click.option("--mask-ratio", type=float, default=None, help="Masked patch ratio for random strategies.")
@click.option("--mask-fraction", type=float, default=None, help="Fraction of the region's patches masked.")
@click.option("--mask-level", type=click.Choice(MASK_LEVELS), default=None, help="Where masking happens.")
@click.option("--include-background", is_flag=True, default=None, help="Loss also on background voxels.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Clips per step (per process).")
@click.option("--lr", type=float, default=None, help="Pretraining peak learning rate [default: 5e-5].")
@click.option("--finetune-lr", type=float, default=None,
              help="Fine-tuning peak learning rate [default: 1e-2; full mode: --lr].")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help="Gradient accumulation steps.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of participants held out for validation during training [default: 0.2].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps.")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="Data-loader worker processes.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--resume/--no-resume", default=None, help="Continue from the last checkpoint [default: yes].")
@click.option("--target", default=None, help="Column of participants.tsv to predict (finetune).")
@click.option("--finetune-mode", type=click.Choice(FINETUNE_MODES), default=None,
              help="Which weights fine-tuning trains [default: linear-probe].")
@click.option("--group-column", default=None, help="Column for grouped splits, e.g. site (leave-one-site-out).")
@click.option("--folds", type=click.IntRange(min=2), default=None, help="Cross-validation folds.")
@click.option("--strategies", default=None, help="compare: comma list, e.g. random,cerebellum,frontal.")
@click.option("--input-space-maps", is_flag=True, default=None,
              help="predict: also write reconstruction/error maps on each run's source grid.")
@click.option("--per-region-error", is_flag=True, default=None,
              help="predict: reconstruction error masking every AAL3 region on its own (slower).")
@click.option("--occlusion", type=click.Choice(OCCLUSION_MODES), default=None,
              help="predict: how a region is occluded for attribution [default: zero].")
@click.option("--ig-steps", type=click.IntRange(min=1), default=None,
              help="predict: integrated-gradients steps [default: 16].")
@click.option("--no-attribution", is_flag=True, default=None, help="predict: skip occlusion and IG.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(bids_dir: Path, output_dir: Path, analysis_level: str, **options: Any) -> None:
    from bids_regionmae.workflows import run_workflow

    config = resolve_config(bids_dir, output_dir, analysis_level, options)
    _setup_logging(config.verbose)
    code = run_workflow(config)
    sys.exit(code)


def resolve_config(bids_dir: Path, output_dir: Path, analysis_level: str, options: dict[str, Any]):
    """Turn parsed command-line values into a validated :class:`~bids_regionmae.config.RunConfig`."""
    from bids_regionmae.config import build_config

    if analysis_level not in LEVELS:
        raise UnknownLevelError(f"analysis_level {analysis_level!r} is not valid: use one of "
                                f"{', '.join(LEVELS)}.")
    o = options
    sections: dict[str, dict[str, Any]] = {
        "inputs": {
            "participant_label": _labels(o["participant_label"]) or None,
            "session_label": _labels(o["session_label"]) or None,
            "task": _labels(o["task"]) or None,
            "run": _labels(o["run_label"]) or None,
            "space": _labels(o["space"]) or None,
            "bids_filters": _read_filter_file(o["bids_filter_file"]) or None,
            "derivatives": _parse_derivatives(o["derivatives"]) or None,
            "phenotype": o["phenotype"],
            "skip_bids_validation": o["skip_bids_validation"],
        },
        "atlas": {"atlas_file": o["atlas_file"], "atlas_labels": o["atlas_labels"],
                  "patch_rule": o["patch_rule"]},
        "preprocess": {"target_tr": o["target_tr"], "clip_length": o["clip_length"]},
        "model": {"variant": o["variant"], "backend": o["backend"]},
        "masking": {"strategy": o["mask_strategy"], "regions": list(o["regions"]) or None,
                    "mask_ratio": o["mask_ratio"], "mask_fraction": o["mask_fraction"],
                    "level": o["mask_level"], "include_background": o["include_background"]},
        "train": {"epochs": o["epochs"], "max_steps": o["max_steps"], "batch_size": o["batch_size"],
                  "lr": o["lr"], "resume": o["resume"], "grad_accum": o["grad_accum"],
                  "val_fraction": o["val_fraction"], "checkpoint_every": o["checkpoint_every"],
                  "num_workers": o["num_workers"], "precision": o["precision"]},
        "predict": {"input_space": o["input_space_maps"],
                    "region_masking": o["per_region_error"],
                    "occlusion_mode": o["occlusion"], "ig_steps": o["ig_steps"],
                    "attribution": False if o["no_attribution"] else None},
        "finetune": {"lr": o["finetune_lr"], "target": o["target"], "mode": o["finetune_mode"],
                     "group_column": o["group_column"], "folds": o["folds"], "strategies": o["strategies"]},
    }
    values: dict[str, Any] = {
        "bids_dir": str(bids_dir), "output_dir": str(output_dir), "analysis_level": analysis_level,
        "stage": o["stage"], "model_dir": o["model_dir"], "work_dir": o["work_dir"], "nprocs": o["nprocs"],
        "omp_nthreads": o["omp_nthreads"], "seed": o["seed"], "device": o["device"], "verbose": o["verbose"] or None,
    }
    values = {k: v for k, v in values.items() if v is not None}
    for name, section in sections.items():
        given = {k: v for k, v in section.items() if v is not None}
        if given:
            values[name] = given
    stage = values.get("stage")
    if stage is not None and stage not in STAGES[analysis_level]:
        raise UsageError(f"--stage {stage!r} does not run at {analysis_level} level: use one of "
                         f"{', '.join(STAGES[analysis_level])}.")
    return build_config(values, o["config_file"])


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose <= 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s | %(levelname)-7s | %(name)s | %(message)s",
                        datefmt="%H:%M:%S", force=True)
    if verbose < 2:
        for noisy in ("bids", "nibabel", "matplotlib", "PIL", "templateflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``regionmae`` console script; returns the exit code."""
    try:
        cli.main(args=argv, prog_name="regionmae", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return int(exc.exit_code)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_ERROR
        return code
    except click.FileError as exc:
        click.echo(f"regionmae: error: {exc.format_message()}", err=True)
        return EXIT_INPUT_MISSING
    except click.UsageError as exc:  # click exits 2 by default; the spec wants 64
        exc.show()
        return EXIT_USAGE
    except click.Abort:
        click.echo("regionmae: aborted", err=True)
        return EXIT_ERROR
    except RegionMAEError as exc:
        click.echo(f"regionmae: error: {exc}", err=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
