"""End to end through the real command line: participant -> pretrain -> finetune -> participant --model.

One synthetic fMRIPrep dataset (6 participants, planted cerebellar signal) is
processed by every stage with the tiny model; the output tree is compared
with a golden file list and checked by bids-validator-deno.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from validation import assert_valid_bids

from bids_regionmae.cli import main

GOLDEN = Path(__file__).parent / "golden" / "pipeline_outputs.txt"
PRETRAINED = "pretrain_region-cerebellum_tiny_seed-0"
FINETUNED = f"finetune_diagnosis_from-{PRETRAINED}"
RUN_STAMP = re.compile(r"\d{8}-\d{6}_[0-9a-f]{6}")


def output_listing(out: Path) -> list[str]:
    """Relative paths of every output file, run stamps replaced by ``<run>``.

    The work dir and TensorBoard event files (optional dependency; names hold
    a timestamp and the host name) are left out.
    """
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    return sorted({RUN_STAMP.sub("<run>", f) for f in files
                   if not f.startswith(".work/") and "/tensorboard/" not in f})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from bids_regionmae.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("pipeline")
    bids = generate_dataset(root / "fmriprep", n_subjects=6, n_frames=24, seed=1)
    out = root / "derivatives"
    common = ["--seed", "0", "--omp-nthreads", "1"]
    codes = {}
    codes["participant"] = main([str(bids), str(out), "participant", *common])
    codes["pretrain"] = main([str(bids), str(out), "group", "--stage", "pretrain", "--variant", "tiny",
                              "--regions", "cerebellum", "--max-steps", "4", "--batch-size", "2", *common])
    codes["finetune"] = main([str(bids), str(out), "group", "--stage", "finetune", "--target", "diagnosis",
                              "--model", str(out / "models" / PRETRAINED), "--folds", "2", "--epochs", "2",
                              "--batch-size", "4", *common])
    codes["predict"] = main([str(bids), str(out), "participant", "--model", str(out / "models" / FINETUNED),
                             "--participant-label", "01", "02", "--ig-steps", "2", *common])
    return bids, out, codes


def test_every_stage_exits_zero(pipeline):
    _, _, codes = pipeline
    assert codes == {"participant": 0, "pretrain": 0, "finetune": 0, "predict": 0}


def test_output_files_match_the_golden_list(pipeline):
    _, out, _ = pipeline
    listing = output_listing(out)
    if os.environ.get("REGIONMAE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text("\n".join(listing) + "\n", encoding="utf-8")
    expected = GOLDEN.read_text(encoding="utf-8").split()
    missing = sorted(set(expected) - set(listing))
    extra = sorted(set(listing) - set(expected))
    assert not missing and not extra, f"missing: {missing}\nunexpected: {extra}"


def test_run_configs_repeat_the_run(pipeline):
    from bids_regionmae.config import build_config, read_toml

    _, out, _ = pipeline
    configs = sorted((out / "logs").glob("regionmae_group_pretrain_*.toml"))
    assert configs, "pretraining wrote no run config"
    text = configs[0].read_text()
    assert "[environment]" in text and "torch" in text and "seed = 0" in text
    config = build_config(read_toml(configs[0]))
    assert config.stage == "pretrain" and config.masking.regions == ("cerebellum",)
    assert (out / "models" / PRETRAINED / "regionmae_config.toml").is_file()


def test_input_is_untouched_and_description_is_ours(pipeline):
    bids, out, _ = pipeline
    assert not any("regionmae" in p.name for p in bids.rglob("*"))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Name"] == "regionmae"


def test_predictions_and_reports_exist(pipeline):
    _, out, _ = pipeline
    predictions = sorted(out.glob("sub-01/func/*_predictions.tsv"))
    assert predictions
    header = predictions[0].read_text().splitlines()[0].split("\t")
    assert any("prob" in column for column in header)
    for subject in ("01", "02"):
        report = (out / f"sub-{subject}" / f"sub-{subject}_report.html").read_text()
        assert "Input quality control" in report and "redictions" in report


def test_output_tree_passes_bids_validator(pipeline):
    _, out, _ = pipeline
    assert_valid_bids(out)


def test_rerun_of_participant_level_skips_completed_runs(pipeline, caplog):
    bids, out, _ = pipeline
    before = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/func/*_desc-modelready_bold.npy")}
    assert main([str(bids), str(out), "participant", "--participant-label", "03", "--omp-nthreads", "1"]) == 0
    after = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/func/*_desc-modelready_bold.npy")}
    assert before == after
