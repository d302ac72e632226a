"""Training engine safety: resume state that runs no code, stop on SIGTERM/SIGINT, output permissions.

- the resume checkpoint is JSON + safetensors (:mod:`bids_regionmae.train.resume_state`): exact round trip,
  atomic commit, tampering detected; an old ``last.pt`` carrying a code payload is refused in every resume
  path (Trainer, pretraining and fine-tuning through the command line) and its payload never runs;
- no module of the package can load a pickle-based file (source scan);
- SIGTERM to a real training process (its process group, DataLoader worker included) and SIGINT in this one:
  checkpoint at the next step boundary, exit 143 / 130, and a rerun that ends with the weights of an
  uninterrupted run; under 2 gloo processes one signalled rank stops both at the same step;
- files written through :func:`bids_regionmae.atomic.atomic_path` get the process umask (``model.safetensors``
  was 0600).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bids_regionmae
from bids_regionmae.atomic import atomic_path
from bids_regionmae.errors import EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM, CheckpointError, TrainingInterrupted
from bids_regionmae.train import resume_state
from bids_regionmae.train.engine import StopSignals, Trainer, TrainSettings, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- helpers


class Payload:
    """Unpickling this creates ``marker`` (what a crafted ``last.pt`` would do with worse code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_payload(folder: Path, marker: Path) -> Path:
    """A ``last.pt`` in the old ``torch.save`` format whose loading would create ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "last.pt"
    torch.save({"format": "regionmae-train-checkpoint", "step": 1, "model": Payload(marker)}, path)
    return path


class ToyData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(index)
        return {"x": torch.randn(4, generator=gen), "y": torch.randn(1, generator=gen)}


def toy_trainer(out_dir: Path, **settings: object) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    values = {"epochs": 2, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 100, "progress": False}
    values.update(settings)
    return Trainer(model, ToyData(), step_fn=lambda m, b, ctx: ((m(b["x"]) - b["y"]) ** 2).mean(),
                   settings=TrainSettings(**values), out_dir=out_dir)


# --------------------------------------------------------------------------- resume state format


def test_state_round_trips_exactly_through_json_and_safetensors():
    state = {
        "step": 7, "lr": 1e-3, "flag": True, "none": None, "name": "x",
        "bad": [float("nan"), float("inf"), -float("inf")],
        "betas": (0.9, 0.999),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2)}}, "param_groups": []},
        "bf16": torch.randn(5).to(torch.bfloat16), "mask": torch.tensor([True, False]),
        "numpy_rng": np.random.get_state(),  # noqa: NPY002 - the global state the engine saves
        "python_rng": __import__("random").getstate(),
        "np_scalars": [np.float64(0.25), np.int64(3), np.bool_(True)],
        "__tensor__": "a user key that looks like a tag",
    }
    tree, tensors = resume_state.encode_state(state)
    text = json.dumps(tree, allow_nan=False)  # standard JSON: no NaN literals
    back = resume_state.decode_state(json.loads(text), tensors)

    assert back["betas"] == (0.9, 0.999) and isinstance(back["python_rng"], tuple)
    __import__("random").setstate(back["python_rng"])  # needs the exact nested tuples
    assert list(back["optimizer"]["state"]) == [0]  # integer keys stay integers (the optimizer needs them)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["state"][0]["step"].shape == ()
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], state["bf16"])
    assert np.array_equal(back["numpy_rng"][1], state["numpy_rng"][1]) and back["numpy_rng"][1].dtype == np.uint32
    assert back["numpy_rng"][0] == "MT19937" and back["numpy_rng"][2:] == state["numpy_rng"][2:]
    assert np.isnan(back["bad"][0]) and back["bad"][1:] == [float("inf"), -float("inf")]
    assert back["np_scalars"] == [0.25, 3, True] and back["__tensor__"] == state["__tensor__"]
    assert {k: back[k] for k in ("step", "lr", "flag", "none", "name")} == {k: state[k] for k in
                                                                            ("step", "lr", "flag", "none", "name")}
    assert tensors["numpy_rng/1"].dtype == torch.uint8  # RNG state bytes as a uint8 tensor

    with pytest.raises(TypeError, match=r"extra/where: a PosixPath cannot be stored"):
        resume_state.encode_state({"extra": {"where": Path("/tmp")}})


def test_a_killed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    resume_state.write_checkpoint(folder, {"step": 1, "w": torch.ones(3)}, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the tensor file and the commit")

    monkeypatch.setattr(resume_state, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        resume_state.write_checkpoint(folder, {"step": 2, "w": torch.zeros(3)}, 2)
    state = resume_state.read_checkpoint(folder / "last.json")
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    orphans = resume_state.unreferenced_tensor_files(folder)
    assert [p.name for p in orphans] == ["tensors-00000002.safetensors"]  # removed by the next Trainer.fit()
    monkeypatch.undo()

    resume_state.write_checkpoint(folder, {"step": 1, "w": torch.zeros(3)}, 1)  # a --no-resume run at step 1
    assert json.loads((folder / "last.json").read_text())["tensor_file"] == "tensors-00000001.1.safetensors"
    resume_state.write_checkpoint(folder, {"step": 3, "w": torch.zeros(3)}, 3)
    assert [p.name for p in folder.glob("tensors-*")] == ["tensors-00000003.safetensors"]  # older ones deleted


def test_tampered_checkpoints_are_refused_with_the_file_named(tmp_path):
    folder = tmp_path / "checkpoints"
    record_path = resume_state.write_checkpoint(folder, {"step": 1, "w": torch.ones(3)}, 1)
    record = json.loads(record_path.read_text())
    tensor_file = folder / record["tensor_file"]

    save_file({"w": torch.zeros(3)}, str(tensor_file))  # another file under the recorded name
    with pytest.raises(CheckpointError, match=r"sha256 differs .*--no-resume"):
        load_checkpoint(record_path)
    for bad_name in ("../elsewhere.safetensors", "/etc/passwd", ".hidden.safetensors"):
        record_path.write_text(json.dumps({**record, "tensor_file": bad_name}))
        with pytest.raises(CheckpointError, match="bad tensor file name"):
            load_checkpoint(record_path)
    record_path.write_text(json.dumps({**record, "version": 1}))
    with pytest.raises(CheckpointError, match="version 1"):
        load_checkpoint(record_path)
    record_path.write_text('{"format": "regionmae-train-checkpoint", "version": 2, "x": NaN}')
    with pytest.raises(CheckpointError, match=r"last\.json: cannot read"):
        load_checkpoint(record_path)
    assert resume_state.unreferenced_tensor_files(folder) == []  # unreadable record: nothing is deleted


def test_fine_tuning_early_stopping_state_survives_a_checkpoint(tmp_path):
    """The best weights fine-tuning keeps in ``extra_state`` travel as tensors, its NaN ``best`` as JSON."""
    from bids_regionmae.finetune.train import EarlyStopping

    trainer = toy_trainer(tmp_path, max_steps=2)
    stopper = EarlyStopping(patience=3)
    stopper(trainer, {"val_loss": 0.5})
    stopper(trainer, {"val_loss": 0.7})
    trainer.save_checkpoint()
    clone = EarlyStopping(patience=3)
    clone.load(load_checkpoint(trainer.checkpoint_path)["extra"]["early_stopping"])
    assert (clone.best, clone.bad_evals) == (0.5, 1)
    assert clone.best_state.keys() == stopper.best_state.keys()
    assert all(torch.equal(clone.best_state[k], v) for k, v in stopper.best_state.items())
    trainer.extra_state["early_stopping"] = EarlyStopping().state_dict()  # nothing evaluated yet: best is NaN
    trainer.save_checkpoint()
    assert np.isnan(load_checkpoint(trainer.checkpoint_path)["extra"]["early_stopping"]["best"])


def test_the_grep_proof_no_module_can_load_pickle_based_files():
    """No pickle, joblib, ``weights_only=False`` or ``allow_pickle`` anywhere in the package, even in text;
    every ``torch.load`` says ``weights_only=True``."""
    forbidden = re.compile(r"pickl|joblib|\bdill\b|\bshelve\b|\bmarshal\b|weights_only\s*=\s*(?:False|0)\b", re.I)
    assert forbidden.search("torch.load(f, weights_only=False)") and forbidden.search("np.load(f, allow_pickle=True)")
    root = Path(bids_regionmae.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 50
    hits, loads = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        hits += [f"{path.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
                 for m in forbidden.finditer(text)]
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                loads += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                hits += [] if safe else [f"{path.relative_to(root)}:{node.lineno}: torch.load without weights_only"]
    assert loads >= 1  # the NeuroSTORM import (weights_only=True) is found: the AST check can see calls
    assert hits == []


# --------------------------------------------------------------------------- old last.pt payloads


def test_payload_fixture_really_runs_code_when_unpickled(tmp_path):
    """Guards the tests below: loading the planted file the unsafe way does create the marker."""
    marker = tmp_path / "pwned"
    path = plant_payload(tmp_path, marker)
    torch.load(path, weights_only=False)  # the test itself may do what the package must never do
    assert marker.exists()


def test_trainer_refuses_an_old_last_pt_and_no_resume_replaces_it(tmp_path, caplog):
    marker = tmp_path / "pwned"
    legacy = plant_payload(tmp_path / "run" / "checkpoints", marker)
    with pytest.raises(CheckpointError) as info:
        toy_trainer(tmp_path / "run", max_steps=2).fit()
    assert not marker.exists()
    assert str(legacy) in str(info.value) and "--no-resume" in str(info.value) and "older version" in str(info.value)
    assert info.value.exit_code == EXIT_ERROR
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(legacy.parent)
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(legacy)

    result = toy_trainer(tmp_path / "run", max_steps=2, resume=False).fit()
    assert result.total_steps == 2 and not marker.exists()
    assert not legacy.exists() and (legacy.parent / "last.json").is_file()  # deleted with the first checkpoint
    assert "never read" in caplog.text
    assert load_checkpoint(legacy.parent)["step"] == 2


def _cli(args: list[str]) -> int:
    """``regionmae ARGS`` in this process (its logging set-up undone afterwards)."""
    from bids_regionmae.cli import main

    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        return main([str(a) for a in args])
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def test_pretraining_through_the_cli_refuses_a_payload_last_pt(tmp_path, capsys):
    from test_pretrain import MODEL_NAME, make_config

    from bids_regionmae.config import config_to_toml
    from bids_regionmae.testing.store import write_synthetic_store

    bids_dir, out = tmp_path / "fmriprep", tmp_path / "out"
    bids_dir.mkdir()
    write_synthetic_store(out, n_subjects=4, n_frames=16, clip_length=8, seed=0)
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_to_toml(make_config(bids_dir, out, max_steps=1)))
    marker = tmp_path / "pwned"
    legacy = plant_payload(out / "models" / MODEL_NAME / "checkpoints", marker)
    args = [bids_dir, out, "group", "--stage", "pretrain", "--config-file", config_file]

    assert _cli(args) == 1  # --no-resume then trains: test_trainer_refuses_an_old_last_pt_and_no_resume_replaces_it
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(legacy) in err and "--no-resume" in err


def test_finetuning_through_the_cli_refuses_a_payload_last_pt(tmp_path, capsys):
    from test_finetune import FT_NAME, MICRO, fresh_output
    from test_finetune import make_config as finetune_config

    from bids_regionmae.config import config_to_toml
    from bids_regionmae.models.registry import register_variant
    from bids_regionmae.testing.cohort import write_labelled_cohort

    register_variant(MICRO, overwrite=True)
    cohort = write_labelled_cohort(tmp_path / "cohort", n_subjects=6, n_frames=16, clip_length=4)
    out = fresh_output(cohort, tmp_path / "out")
    config_file = tmp_path / "config.toml"  # prompt mode: the first fold trains at once (no embedding cache)
    config_file.write_text(config_to_toml(finetune_config(cohort, out, epochs=1, finetune={"mode": "prompt",
                                                                                           "folds": 2})))
    marker = tmp_path / "pwned"
    legacy = plant_payload(out / "models" / FT_NAME / "folds" / "fold-0" / "checkpoints", marker)

    assert _cli([cohort.bids_dir, out, "group", "--stage", "finetune", "--config-file", config_file]) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(legacy) in err and "--no-resume" in err


# --------------------------------------------------------------------------- signals


def test_stop_signals_record_the_first_ignore_repeats_and_restore_handlers():
    before = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS}
    with StopSignals(escalate_after=3600) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM and torchrun may both send it
        os.kill(os.getpid(), signal.SIGINT)  # within escalate_after: ignored too
        assert stop.received == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS} == before
    with StopSignals(escalate_after=0.0) as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: stop at once
    assert {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS} == before


#: A tiny training process for the signal tests: 16 samples, batch 2 (8 steps per epoch), 6 steps, dropout.
#: Arguments: out_dir, num_workers, step index at which rank ``stop_rank`` waits for out_dir/go (-1: none).
SCRIPT = '''
import sys, time
from pathlib import Path
import torch
from bids_regionmae.errors import RegionMAEError
from bids_regionmae.train.engine import Trainer, TrainSettings, init_distributed, cleanup_distributed

out, workers, block_at, stop_rank = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)

class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        return {"x": torch.randn(4, generator=gen), "y": torch.randn(1, generator=gen)}

def step_fn(model, batch, ctx):
    if ctx.step == block_at and ctx.micro == 0 and ctx.rank == stop_rank:
        import os
        (out / f"reached-{ctx.rank}").write_text(str(os.getpid()))
        while not (out / "go").exists():
            time.sleep(0.01)
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()

info = init_distributed("cpu")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
settings = TrainSettings(epochs=2, max_steps=6, batch_size=2 // info.world_size, lr=1e-2, checkpoint_every=100,
                         num_workers=workers, progress=False)
try:
    Trainer(model, ToyData(), step_fn=step_fn, settings=settings, out_dir=out, dist_info=info).fit()
except RegionMAEError as exc:  # what bids_regionmae.cli.main does
    print(f"rank {info.rank}: {exc}", file=sys.stderr, flush=True)
    sys.exit(exc.exit_code)
finally:
    cleanup_distributed(info)
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(bids_regionmae.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _train(script: Path, out: Path, *, workers: int = 0, block_at: int = -1, stop_rank: int = 0,
           nproc: int = 1, **popen: object) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    return subprocess.Popen([*launcher, str(script), str(out), str(workers), str(block_at), str(stop_rank)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} never appeared:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.02)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / "last.json")["model"]


@pytest.fixture(scope="module")
def toy_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "train_toy.py"
    path.write_text(SCRIPT, encoding="utf-8")
    return path


def test_sigterm_mid_epoch_checkpoints_exits_143_and_the_rerun_ends_as_an_uninterrupted_run(toy_script, tmp_path):
    """A real process, signalled like SLURM does: SIGTERM to its whole process group (DataLoader worker too)."""
    out = tmp_path / "run"
    proc = _train(toy_script, out, workers=1, block_at=1, start_new_session=True)
    try:
        _wait_for(out / "reached-0", proc)  # the process is inside step index 1 (of 8 in the epoch)
        os.killpg(proc.pid, signal.SIGTERM)
        (out / "go").touch()
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_SIGTERM, log[-3000:]
    assert "training stopped by SIGTERM after step 2/6" in log
    assert log.count("SIGTERM received") == 1, log[-3000:]  # the DataLoader worker ignores it
    state = load_checkpoint(out / "checkpoints" / "last.json")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 0, 2)  # mid-epoch, written on the signal

    (out / "go").unlink()
    rerun = _train(toy_script, out)
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log[-3000:]
    uninterrupted = toy_trainer(tmp_path / "reference", max_steps=6)
    uninterrupted.fit()
    weights = _weights(out)
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(weights[key], value), key


def test_sigint_stops_after_the_step_with_exit_code_130(tmp_path):
    trainer = toy_trainer(tmp_path / "run", max_steps=6)
    step_fn = trainer.step_fn

    def interrupted_in_step_3(model, batch, ctx):
        if ctx.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return step_fn(model, batch, ctx)

    trainer.step_fn = interrupted_in_step_3
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.exit_code == EXIT_SIGINT and info.value.signum == signal.SIGINT
    assert "stopped by SIGINT after step 3/6" in str(info.value) and str(trainer.checkpoint_path) in str(info.value)
    assert load_checkpoint(trainer.checkpoint_path)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ddp_ranks_stop_at_the_same_step_when_one_rank_is_signalled(toy_script, tmp_path):
    out = tmp_path / "ddp"
    proc = _train(toy_script, out, block_at=1, stop_rank=1, nproc=2)
    try:
        _wait_for(out / "reached-1", proc)
        os.kill(int((out / "reached-1").read_text()), signal.SIGTERM)  # rank 1 only; rank 0 never sees it
        (out / "go").touch()
        log = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, log[-3000:]  # torchrun reports its failed workers
    for rank in (0, 1):
        assert f"rank {rank}: training stopped by SIGTERM after step 2/6" in log, log[-3000:]
    assert load_checkpoint(out / "checkpoints" / "last.json")["step"] == 2


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_outputs_get_the_process_umask_not_0600(tmp_path, umask):
    from bids_regionmae.models.checkpoint import save_model
    from bids_regionmae.models.registry import create_encoder, get_spec

    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "plain.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors creates its file 0600
        model_dir = tmp_path / "model"
        save_model(model_dir, create_encoder(get_spec("tiny"), backend="torch"))
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for path in (tmp_path / "plain.safetensors", model_dir / "model.safetensors", model_dir / "model.json"):
        assert path.stat().st_mode & 0o777 == expected, (path.name, oct(path.stat().st_mode))
