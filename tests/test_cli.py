"""The BIDS-App command-line contract: exit codes, label handling, config precedence."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from bids_regionmae import __version__
from bids_regionmae.cli import cli, main, resolve_config
from bids_regionmae.config import RunConfig, build_config, config_to_toml, read_toml


def _minimal_derivative(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "dataset_description.json").write_text(json.dumps({
        "Name": "fmriprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.0"}]}))
    return path


def _parse(tmp_path: Path, *extra: str) -> RunConfig:
    ctx = cli.make_context("regionmae", [str(tmp_path / "in"), str(tmp_path / "out"), "participant", *extra])
    params = dict(ctx.params)
    return resolve_config(params.pop("bids_dir"), params.pop("output_dir"), params.pop("analysis_level"), params)


def test_help_reads_like_a_bids_app():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for text in ("BIDS_DIR", "OUTPUT_DIR", "ANALYSIS_LEVEL", "--participant-label", "--bids-filter-file",
                 "--work-dir", "--nprocs", "--config-file", "--skip-bids-validation", "Exit codes"):
        assert text in result.output


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_level_exits_17(tmp_path, capsys):
    bids = _minimal_derivative(tmp_path / "in")
    assert main([str(bids), str(tmp_path / "out"), "subject"]) == 17
    assert "participant, group" in capsys.readouterr().err


def test_click_usage_errors_exit_64(tmp_path):
    bids = _minimal_derivative(tmp_path / "in")
    assert main([str(bids), str(tmp_path / "out"), "participant", "--no-such-option"]) == 64
    assert main([str(bids)]) == 64
    assert main([str(bids), str(tmp_path / "out"), "participant", "--nprocs", "0"]) == 64


def test_stage_must_fit_level(tmp_path, capsys):
    bids = _minimal_derivative(tmp_path / "in")
    assert main([str(bids), str(tmp_path / "out"), "participant", "--stage", "pretrain"]) == 64
    assert "does not run at participant level" in capsys.readouterr().err


def test_missing_bids_dir_exits_66(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_refuses_output_in_input(tmp_path, where, capsys):
    bids = _minimal_derivative(tmp_path / "in")
    out = bids if where == "same" else bids / "derivatives" / "regionmae"
    before = sorted(p.name for p in bids.rglob("*"))
    assert main([str(bids), str(out), "participant"]) == 64
    assert "never writes into its input" in capsys.readouterr().err
    assert sorted(p.name for p in bids.rglob("*")) == before


def test_output_not_creatable_exits_73(tmp_path):
    bids = _minimal_derivative(tmp_path / "in")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main([str(bids), str(blocker / "out"), "participant"]) == 73


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_output_read_only_exits_73(tmp_path):
    bids = _minimal_derivative(tmp_path / "in")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main([str(bids), str(ro / "out"), "participant"]) == 73
    finally:
        ro.chmod(0o700)


def test_filter_file_errors(tmp_path):
    bids = _minimal_derivative(tmp_path / "in")
    out = str(tmp_path / "out")
    assert main([str(bids), out, "participant", "--bids-filter-file", str(tmp_path / "nofile.json")]) == 66
    bad = tmp_path / "bad.json"
    bad.write_text("{bold: }")
    assert main([str(bids), out, "participant", "--bids-filter-file", str(bad)]) == 64
    wrong = tmp_path / "wrong.json"
    wrong.write_text('["task"]')
    assert main([str(bids), out, "participant", "--bids-filter-file", str(wrong)]) == 64


def test_filter_file_semantics_are_kept(tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"bold": {"session": None, "task": "*", "run": [1, 2]}}))
    config = _parse(tmp_path, "--bids-filter-file", str(filters))
    assert config.inputs.bids_filters == {"bold": {"session": None, "task": "*", "run": [1, 2]}}


def test_labels_with_or_without_prefix_several_values_and_files(tmp_path):
    label_file = tmp_path / "labels.txt"
    label_file.write_text("sub-07\n08\n")
    config = _parse(tmp_path, "--participant-label", "sub-01", "02", "sub-03,04",
                    "--participant-label", str(label_file), "--session-label", "ses-A", "B",
                    "--task", "task-rest", "--run", "run-1", "2")
    assert config.inputs.participant_label == ("01", "02", "03", "04", "07", "08")
    assert config.inputs.session_label == ("A", "B")
    assert config.inputs.task == ("rest",)
    assert config.inputs.run == ("1", "2")


def test_multi_values_never_swallow_positionals(tmp_path):
    ctx = cli.make_context("regionmae", ["--participant-label", "01", str(tmp_path / "in"),
                                         str(tmp_path / "out"), "participant"])
    assert ctx.params["participant_label"] == ("01",)
    assert ctx.params["analysis_level"] == "participant"


def test_config_file_is_overridden_by_cli(tmp_path):
    toml = tmp_path / "cfg.toml"
    toml.write_text('seed = 5\n[train]\nepochs = 3\nbatch_size = 4\n[masking]\nregions = ["limbic"]\n')
    config = _parse(tmp_path, "--config-file", str(toml), "--epochs", "7")
    assert config.seed == 5
    assert config.train.epochs == 7
    assert config.train.batch_size == 4
    assert config.masking.regions == ("limbic",)


def test_config_round_trip(tmp_path):
    config = _parse(tmp_path, "--participant-label", "01", "--seed", "3", "--regions", "cerebellum+frontal",
                    "--mask-strategy", "random", "--target", "diagnosis")
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(config, {"torch": "x", "backend": "torch"}))
    data = read_toml(path)
    assert "environment" not in data
    assert build_config(data) == config


def test_invalid_config_values_name_the_option(tmp_path, capsys):
    bids = _minimal_derivative(tmp_path / "in")
    toml = tmp_path / "cfg.toml"
    toml.write_text("[masking]\nmask_ratio = 1.5\nunknown_key = 1\n")
    assert main([str(bids), str(tmp_path / "out"), "participant", "--config-file", str(toml)]) == 64
    err = capsys.readouterr().err
    assert "masking.mask_ratio" in err and "masking.unknown_key" in err
    assert main([str(bids), str(tmp_path / "out"), "participant", "--config-file",
                 str(tmp_path / "none.toml")]) == 66


def test_filters_matching_nothing_exit_18(tmp_path, capsys):
    from bids_regionmae.testing.fmriprep import make_fmriprep_tree

    bids = make_fmriprep_tree(tmp_path / "fmriprep", subjects=("01", "02"))
    assert main([str(bids), str(tmp_path / "out"), "participant", "--participant-label", "99"]) == 18
    err = capsys.readouterr().err
    assert "01" in err and "02" in err  # lists what exists
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"bold": {"task": "nback"}}))
    assert main([str(bids), str(tmp_path / "out"), "participant", "--bids-filter-file", str(filters)]) == 18
    assert "rest" in capsys.readouterr().err


def test_invalid_dataset_description_exits_16(tmp_path, capsys):
    from bids_regionmae.testing.fmriprep import make_fmriprep_tree

    bids = make_fmriprep_tree(tmp_path / "fmriprep", subjects=("01",))
    (bids / "dataset_description.json").write_text("{not json")
    assert main([str(bids), str(tmp_path / "out"), "participant"]) == 16
    assert "dataset_description.json" in capsys.readouterr().err


def test_failed_runs_exit_1_and_are_reported(tmp_path, capsys):
    """Runs that cannot be preprocessed (here a 4x5x6 field of view, not an MNI brain) fail alone: exit 1."""
    from bids_regionmae.testing.fmriprep import make_fmriprep_tree

    bids = make_fmriprep_tree(tmp_path / "fmriprep", subjects=("01", "02"), spaces=("MNI152NLin6Asym:res-2",),
                              n_vols=24, clutter=False)
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--omp-nthreads", "1"]) == 1
    assert (out / "dataset_description.json").is_file()
    assert sorted(p.name for p in (out / "logs").glob("regionmae_participant_*.toml"))
    assert not list(out.glob("sub-*/func/*_desc-modelready_bold.npy"))


@pytest.mark.parametrize("level, stage, extra", [
    ("participant", "preprocess", []),
    ("participant", "predict", ["--model", "models/x"]),
    ("group", "pretrain", []),
    ("group", "finetune", ["--target", "diagnosis"]),
    ("group", "compare", ["--target", "diagnosis"]),
])
def test_cuda_without_a_gpu_is_the_same_usage_error_in_every_stage(tmp_path, capsys, level, stage, extra):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    bids = _minimal_derivative(tmp_path / "in")
    out = tmp_path / "out"
    code = main([str(bids), str(out), level, "--stage", stage, "--device", "cuda", *extra])
    err = capsys.readouterr().err
    assert code == 64 and "--device cuda: torch sees no CUDA device" in err and "--device cpu" in err
    assert not out.exists()  # refused before anything is written
