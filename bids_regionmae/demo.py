"""The embedded default job: a synthetic fMRIPrep dataset processed end to end.

``regionmae-demo DIR`` generates ``DIR/fmriprep`` with
:func:`bids_regionmae.synthetic.generate_dataset` (a cerebellar connectivity
difference planted between diagnosis groups), then runs, through the same
command line a user types:

1. ``participant`` (model-ready arrays, QC, reports),
2. ``group --stage pretrain`` (tiny model, cerebellum masking),
3. ``group --stage finetune --target diagnosis`` (cross-validated),
4. ``participant --model`` (embeddings, predictions, region errors, attribution),

and finally validates ``DIR/derivatives`` with bids-validator-deno when it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import click


def _stage(title: str, argv: list[str]) -> None:
    from bids_regionmae.cli import main as regionmae

    click.secho(f"\n==> {title}\n    regionmae {' '.join(argv)}", fg="cyan", bold=True)
    start = time.perf_counter()
    code = regionmae(argv)
    if code != 0:
        raise click.ClickException(f"{title} failed with exit code {code}")
    click.secho(f"    done in {time.perf_counter() - start:.1f} s", fg="green")


def _validate(derivatives: Path) -> None:
    exe = Path(sys.executable).with_name("bids-validator-deno")
    exe_path = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    if not exe_path:
        click.echo("bids-validator-deno not installed; skipping validation (pip install bids-validator-deno)")
        return
    click.secho(f"\n==> bids-validator-deno {derivatives}", fg="cyan", bold=True)
    proc = subprocess.run([exe_path, str(derivatives), "--datasetTypes", "derivative", "--ignoreWarnings"],
                          capture_output=True, text=True)
    click.echo(proc.stdout.strip()[-2000:])
    if proc.returncode != 0:
        raise click.ClickException("bids-validator-deno found errors in the outputs")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path), default=Path("demo"))
@click.option("--subjects", default=12, show_default=True, help="Synthetic participants.")
@click.option("--frames", default=48, show_default=True, help="Frames per run.")
@click.option("--steps", default=60, show_default=True, help="Pretraining steps.")
@click.option("--seed", default=0, show_default=True)
def main(directory: Path, subjects: int, frames: int, steps: int, seed: int) -> None:
    """Run the whole pipeline on a generated synthetic fMRIPrep dataset in DIRECTORY."""
    from bids_regionmae.synthetic import generate_dataset

    start = time.perf_counter()
    fmriprep = directory / "fmriprep"
    out = directory / "derivatives"
    if not (fmriprep / "dataset_description.json").exists():
        click.secho(f"==> generating a synthetic fMRIPrep dataset in {fmriprep}", fg="cyan", bold=True)
        generate_dataset(fmriprep, n_subjects=subjects, n_frames=frames, seed=seed)
    common = ["--seed", str(seed), "--nprocs", "2"]
    _stage("participant level: fMRIPrep BOLD -> model-ready arrays",
           [str(fmriprep), str(out), "participant", *common])
    _stage("group level: region-aware pretraining (cerebellum masking, tiny model)",
           [str(fmriprep), str(out), "group", "--stage", "pretrain", "--variant", "tiny", "--mask-strategy",
            "region", "--regions", "cerebellum", "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-3",
            *common])
    pretrained = out / "models" / f"pretrain_region-cerebellum_tiny_seed-{seed}"
    _stage("group level: fine-tuning on diagnosis (cross-validated)",
           [str(fmriprep), str(out), "group", "--stage", "finetune", "--target", "diagnosis", "--model",
            str(pretrained), "--folds", "3", "--epochs", "30", "--batch-size", "8", *common])
    finetuned = out / "models" / f"finetune_diagnosis_from-{pretrained.name}"
    _stage("participant level: predictions, region errors and attribution",
           [str(fmriprep), str(out), "participant", "--model", str(finetuned), *common])
    _validate(out)
    click.secho(f"\nDemo finished in {time.perf_counter() - start:.0f} s. Open the reports:", fg="green", bold=True)
    for report in sorted(out.glob("sub-*/*_report.html"))[:3] + sorted(out.glob("models/*/report.html")):
        click.echo(f"  {report}")


if __name__ == "__main__":
    main()
