"""Pretraining across processes: DDP on CPU (gloo via torchrun), resume after ``kill -9`` and after SIGTERM.

The DDP and kill tests start the real command line (``python -m bids_regionmae.cli``)
in subprocesses, the SIGTERM test calls it in this process; all run on a
synthetic model-ready store and compare against an in-process run of the same
configuration.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pretrain import MODEL_NAME, make_config, read_log

from bids_regionmae.config import RunConfig, config_to_toml
from bids_regionmae.errors import EXIT_SIGTERM
from bids_regionmae.testing.store import write_synthetic_store
from bids_regionmae.train.engine import load_checkpoint
from bids_regionmae.workflows.pretrain import run


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bids_dir, store_dir): 4 participants x 16 frames (8 clips of 8 frames)."""
    root = tmp_path_factory.mktemp("ddp")
    bids_dir = root / "fmriprep"
    bids_dir.mkdir()
    store_dir = root / "store"
    write_synthetic_store(store_dir, n_subjects=4, n_frames=16, clip_length=8, seed=1)
    return bids_dir, store_dir


def output_dir_with_store(store_dir: Path, output_dir: Path) -> Path:
    """A fresh output directory whose participant folders link to the shared store."""
    output_dir.mkdir(parents=True)
    for subject in store_dir.glob("sub-*"):
        (output_dir / subject.name).symlink_to(subject, target_is_directory=True)
    return output_dir


def cli_command(config: RunConfig, config_file: Path, *, nproc: int = 1) -> list[str]:
    config_file.write_text(config_to_toml(config), encoding="utf-8")
    args = [config.bids_dir, config.output_dir, "group", "--stage", "pretrain", "--config-file", str(config_file)]
    if nproc == 1:
        return [sys.executable, "-m", "bids_regionmae.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "-m", "bids_regionmae.cli", *args]


def final_state(output_dir: Path) -> tuple[list[float], dict[str, torch.Tensor], int]:
    model_dir = output_dir / "models" / MODEL_NAME
    state = load_checkpoint(model_dir / "checkpoints" / "last.json")
    return [r["loss"] for r in read_log(model_dir / "train_log.csv")], state["model"], state["step"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["REGIONMAE_OFFLINE"] = "1"
    return env


#: 6 training clips (3 participants), 2 validation clips; 4 steps, a checkpoint every 2.
COMMON = {"max_steps": 4, "checkpoint_every": 2, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """An uninterrupted one-process run: batch 2, 3 steps per epoch, 4 steps."""
    bids_dir, store_dir = store
    config = make_config(bids_dir, output_dir_with_store(store_dir, tmp_path_factory.mktemp("reference") / "out"),
                         batch_size=2, **COMMON)
    assert run(config) == 0
    return config


def compare_logs(got_dir: Path, ref_dir: Path, **approx: float) -> None:
    """train/val logs equal (exactly, or ``pytest.approx(**approx)``), timing columns aside."""
    for name in ("train_log.csv", "val_log.csv"):
        drop = ("clips_per_s", "elapsed_s")
        ref = [{k: v for k, v in r.items() if k not in drop} for r in read_log(ref_dir / name)]
        got = [{k: v for k, v in r.items() if k not in drop} for r in read_log(got_dir / name)]
        assert len(got) == len(ref) and [sorted(r) for r in got] == [sorted(r) for r in ref], name
        for g, r in zip(got, ref, strict=True):
            for key, value in r.items():
                if approx:
                    assert g[key] == pytest.approx(value, nan_ok=True, **approx), (name, key)
                else:
                    assert repr(g[key]) == repr(value), (name, key)


def test_two_gloo_processes_match_one_process_with_double_batch(store, reference, tmp_path):
    bids_dir, store_dir = store
    ddp = make_config(bids_dir, output_dir_with_store(store_dir, tmp_path / "ddp"), batch_size=1, **COMMON)
    proc = subprocess.run(cli_command(ddp, tmp_path / "ddp.toml", nproc=2), capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    losses_1, weights_1, steps_1 = final_state(Path(reference.output_dir))
    losses_2, weights_2, steps_2 = final_state(Path(ddp.output_dir))
    assert steps_1 == steps_2 == 4
    compare_logs(Path(ddp.output_dir) / "models" / MODEL_NAME, Path(reference.output_dir) / "models" / MODEL_NAME,
                 rel=1e-4, abs=1e-6)
    # fp32 sums in another order: differences stay at rounding level, except that Adam's normalisation
    # can lift a near-zero gradient's noise to a few % of one update (lr = 2e-3 per step)
    diffs = torch.cat([(weights_2[k] - v).abs().flatten() for k, v in weights_1.items()])
    assert diffs.max() < 2e-4 and diffs.mean() < 1e-7, (diffs.max(), diffs.mean())
    config = (Path(ddp.output_dir) / "models" / MODEL_NAME / "regionmae_config.toml").read_text()
    assert "world_size = 2" in config


def test_kill_9_then_rerun_resumes_identically(store, reference, tmp_path):
    bids_dir, store_dir = store
    killed = make_config(bids_dir, output_dir_with_store(store_dir, tmp_path / "killed"), batch_size=2, **COMMON)
    checkpoint = Path(killed.output_dir) / "models" / MODEL_NAME / "checkpoints" / "last.json"
    log = tmp_path / "killed.log"
    with open(log, "wb") as stream:
        proc = subprocess.Popen(cli_command(killed, tmp_path / "killed.toml"), env=subprocess_env(),
                                stdout=stream, stderr=subprocess.STDOUT)
    try:  # kill -9 as soon as the checkpoint of step 2 exists (the run is then in step 3)
        deadline = time.monotonic() + 600
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, log.read_text(errors="replace")[-4000:]
    assert load_checkpoint(checkpoint)["step"] == 2

    assert run(killed) == 0  # the rerun resumes from checkpoints/last.json
    losses_ref, weights_ref, _ = final_state(Path(reference.output_dir))
    losses, weights, step = final_state(Path(killed.output_dir))
    assert step == 4 and len(losses) == 4 and losses == losses_ref
    for key, value in weights_ref.items():
        assert torch.equal(weights[key], value), key
    compare_logs(Path(killed.output_dir) / "models" / MODEL_NAME, Path(reference.output_dir) / "models" / MODEL_NAME)


def test_sigterm_through_the_cli_checkpoints_and_exits_143(store, tmp_path, capsys, monkeypatch):
    """In this process: ``regionmae ... group --stage pretrain`` gets SIGTERM during step 2 of 3 of the first
    epoch (as from SLURM's time limit): it checkpoints that step and exits 143. (That a rerun then ends with the
    weights of an uninterrupted run: tests/test_engine_safety.py, on a real process.)"""
    from bids_regionmae.cli import main
    from bids_regionmae.train.engine import Trainer

    bids_dir, store_dir = store
    config = make_config(bids_dir, output_dir_with_store(store_dir, tmp_path / "term"), batch_size=2,
                         **{**COMMON, "checkpoint_every": 3})
    config_file = tmp_path / "term.toml"
    config_file.write_text(config_to_toml(config), encoding="utf-8")
    seed_step = Trainer._seed_step

    def signal_during_step_2(self):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        seed_step(self)

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler: the trainer did not install one")

    monkeypatch.setattr(Trainer, "_seed_step", signal_during_step_2)
    previous = signal.signal(signal.SIGTERM, unhandled)
    handlers = logging.root.handlers[:]
    try:
        code = main([config.bids_dir, config.output_dir, "group", "--stage", "pretrain", "--config-file",
                     str(config_file)])
    finally:
        logging.root.handlers[:] = handlers
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the trainer restored what it found
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert code == EXIT_SIGTERM
    model_dir = Path(config.output_dir) / "models" / MODEL_NAME
    assert "training stopped by SIGTERM after step 2/4" in capsys.readouterr().err
    state = load_checkpoint(model_dir / "checkpoints" / "last.json")
    assert (state["step"], state["step_in_epoch"]) == (2, 2)
    assert not (model_dir / "model.safetensors").exists()  # the workflow stopped with the trainer
    assert [r["step"] for r in read_log(model_dir / "train_log.csv")] == [1, 2]
