"""A reusable, resumable, distributed training loop (pretraining and fine-tuning).

The engine knows nothing about masks, models or labels: the caller gives it a
model, datasets and a *step function* that turns one batch into a loss::

    def step_fn(model, batch, ctx: StepContext) -> StepOutput:
        x = batch["clip"]                                   # (B, 1, X, Y, Z, T), already on ctx.device
        mask = masker(ctx.global_batch, ctx.generator, ctx.device)[ctx.local_rows]
        recon = model(x, mask)
        return StepOutput(loss=masked_mse(recon, x, mask, patch), batch_size=x.shape[0])

    trainer = Trainer(model, train_set, step_fn=step_fn, settings=TrainSettings(...),
                      out_dir=model_dir, eval_fn=eval_fn, val_dataset=val_set)
    result = trainer.fit()

What it does:

- AdamW (no weight decay on biases, norms, embeddings and Mamba's ``A_log``/``D``)
  with linear warm-up and cosine decay to 0 (:func:`warmup_cosine`);
- bf16 autocast on CUDA (``precision="auto"`` or ``"bf16"``), fp32 on CPU;
- gradient accumulation (``no_sync`` on all but the last micro-batch under DDP);
- DDP when started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
  environment): gloo on CPU, nccl on CUDA; a :class:`ResumableSampler` shards
  the data; only rank 0 writes (checkpoints, CSV, TensorBoard, progress bar);
- reproducibility: the data order of epoch ``e`` is a permutation seeded by
  ``(seed, e)``; before each optimizer step the global torch RNG is reseeded
  from ``(seed, step, rank)`` (dropout, drop-path), and the step function gets a
  :class:`torch.Generator` seeded from ``(seed, step, micro)`` that is the same
  on every rank (draw the masks of the whole *global* batch from it and keep
  this rank's rows with :attr:`StepContext.local_rows`: the masks and data of
  ``N`` processes with batch ``B`` are then exactly those of one process with
  batch ``N*B``);
- checkpoints in ``out_dir/checkpoints/`` every ``checkpoint_every`` steps and
  at the end (model, optimizer, scheduler, step, epoch, position in the epoch,
  RNG states, the loss history): tensors in a safetensors file, the rest in
  ``last.json``, committed atomically (:mod:`bids_regionmae.train.resume_state`;
  nothing is executed when a checkpoint is read). With ``resume=True`` a rerun
  (after a crash, ``kill -9`` or a signal) continues from it and produces the
  same losses and weights as an uninterrupted run. A ``last.pt`` of the old
  ``torch.save`` format is never read: resuming next to one is an error
  (:class:`~bids_regionmae.errors.CheckpointError`, exit 1) that names it;
  ``resume=False`` (``--no-resume``) ignores it and deletes it with the run's
  first checkpoint;
- SIGTERM (a SLURM time limit, ``scancel``, torchrun shutting down) and SIGINT
  (Ctrl-C) during :meth:`Trainer.fit` finish the current optimizer step, write
  a checkpoint and raise :class:`~bids_regionmae.errors.TrainingInterrupted`
  (the command line exits 143 / 130); rerunning the command resumes. Under DDP
  the ranks agree on the stop step (a MAX all-reduce of the signal every
  step). A repeated SIGTERM is ignored; a second Ctrl-C more than a second
  after the first stops at once (``KeyboardInterrupt``, no checkpoint).
  DataLoader workers ignore both signals (they end with the main process).
  SLURM sends SIGKILL ``KillWait`` seconds (often 30) after SIGTERM: when a
  step can take longer, ask for an earlier warning (``#SBATCH --signal=TERM@300``);
- logs: ``out_dir/train_log.csv`` (one row per optimizer step),
  ``out_dir/val_log.csv`` (one row per epoch), TensorBoard events in
  ``out_dir/tensorboard`` when ``tensorboard`` is importable, and a tqdm bar
  with the loss and the throughput (clips/s over all processes).

Multi-GPU / multi-node
----------------------
Start one process per GPU with ``torchrun``; every process runs the same
command and the engine picks up the rank from the environment::

    torchrun --standalone --nproc_per_node 4 -m bids_regionmae.cli \\
        /data/fmriprep /out group --stage pretrain --regions cerebellum --variant neurostorm

``--batch-size`` is per process: the global batch is
``batch_size * world_size * grad_accum``. See :mod:`bids_regionmae.train.pretrain`
for a SLURM example.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from bids_regionmae.atomic import atomic_write_text
from bids_regionmae.errors import CheckpointError, TrainingInterrupted, UsageError
from bids_regionmae.train import resume_state

LOGGER = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "DistInfo",
    "EvalContext",
    "ResumableSampler",
    "StepContext",
    "StepOutput",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "cleanup_distributed",
    "derive_seed",
    "init_distributed",
    "load_checkpoint",
    "make_generator",
    "resolve_precision",
    "unwrap",
    "warmup_cosine",
]

CHECKPOINT_FORMAT = resume_state.FORMAT
CHECKPOINT_VERSION = resume_state.VERSION
#: stream keys mixed into :func:`derive_seed` so that different uses never share a stream
STREAM_MASK = 1
STREAM_GLOBAL = 2
STREAM_EVAL = 3
STREAM_ORDER = 4


# --------------------------------------------------------------------------- seeds


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``keys`` (NumPy ``SeedSequence``).

    Parameters
    ----------
    seed : int
        The run's seed.
    *keys : int
        Stream identifiers, e.g. ``(STREAM_MASK, step, micro)``.

    Returns
    -------
    int
        In ``[0, 2**63)``; different keys give statistically independent seeds.
    """
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF] + [int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def make_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job.

    Attributes
    ----------
    rank, world_size, local_rank : int
    device : torch.device
        ``cpu`` or ``cuda:<local_rank>``.
    backend : str or None
        ``gloo`` / ``nccl`` when distributed, else None.
    initialized_here : bool
        Whether :func:`init_distributed` created the process group (and
        :func:`cleanup_distributed` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by ``torchrun``'s environment, if any.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1``
    initialises ``torch.distributed`` (``env://``) with nccl on CUDA and gloo
    on CPU. Without those variables this is a single-process job.

    Parameters
    ----------
    device : {'auto', 'cpu', 'cuda'}
        ``auto`` uses CUDA when available.

    Returns
    -------
    DistInfo

    Raises
    ------
    UsageError
        The environment asks for more processes than there are GPUs on this
        node with ``device='cuda'``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                             "device(s): start at most one process per GPU (torchrun --nproc_per_node).")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size <= 1:
        return DistInfo(device=dev)
    backend = "nccl" if use_cuda else "gloo"
    initialized_here = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        initialized_here = True
    LOGGER.info("distributed: rank %d/%d (local %d), backend %s, device %s", rank, world_size, local_rank,
                backend, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend,
                    initialized_here=initialized_here)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single-process job); nccl waits on this rank's GPU."""
    if info.distributed and dist.is_initialized():
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[int]):
    """Epoch-seeded shuffled sharding that can start mid-epoch.

    The permutation of epoch ``e`` is drawn from ``(seed, e)`` only, so it is
    the same whatever the number of processes; it is truncated to a multiple
    of ``num_replicas`` and rank ``r`` takes positions ``r, r + N, r + 2N...``
    (as :class:`torch.utils.data.DistributedSampler`). Consecutive batches of
    ``B`` on ``N`` ranks then hold exactly the samples of consecutive batches
    of ``N*B`` on one process, with rank ``r`` holding rows ``r::N``.

    Parameters
    ----------
    length : int
        Dataset length.
    num_replicas, rank : int
    shuffle : bool
        False keeps the dataset order (validation).
    seed : int
    drop_tail : bool
        True: drop the last ``length % num_replicas`` samples of the
        permutation so every rank gets the same number (training). False:
        ranks get ``ceil``/``floor`` shares with no sample repeated (evaluation).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, *, shuffle: bool = True,
                 seed: int = 0, drop_tail: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.length = int(length)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_tail = drop_tail
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and skip this rank's first ``skip`` samples."""
        self.epoch = int(epoch)
        self.skip = int(skip)

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = make_generator(self.seed, STREAM_ORDER, self.epoch)
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        if self.drop_tail:
            order = order[: self.length - self.length % self.num_replicas]
        return order[self.rank:: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return max(len(self._indices()) - self.skip, 0)

    def per_rank(self) -> int:
        """Samples per rank in a whole epoch (ignoring ``skip``)."""
        if self.drop_tail:
            return self.length // self.num_replicas
        return len(range(self.rank, self.length, self.num_replicas))


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (mirrors :class:`bids_regionmae.config.TrainConfig`).

    Attributes
    ----------
    epochs : int
        Passes over the training set.
    max_steps : int or None
        Cap on the number of optimizer steps (training stops at
        ``min(epochs * steps_per_epoch, max_steps)``).
    batch_size : int
        Clips per micro-batch **per process**.
    grad_accum : int
        Micro-batches per optimizer step.
    lr, weight_decay : float
        AdamW peak learning rate and decoupled weight decay.
    warmup_fraction : float
        Share of the steps with a linear warm-up; cosine decay to 0 after.
    checkpoint_every : int
        Optimizer steps between checkpoints (plus one at the end).
    num_workers : int
        DataLoader worker processes.
    precision : {'auto', 'fp32', 'bf16'}
        ``auto``: bf16 autocast on CUDA (when supported), fp32 on CPU.
    resume : bool
        Continue from ``out_dir/checkpoints/last.json`` when it exists.
    seed : int
    clip_grad_norm : float or None
        Max global gradient norm (None: no clipping).
    betas : tuple of 2 float
    log_every : int
        Optimizer steps between TensorBoard scalars / progress-bar updates.
    progress : bool
        Show a tqdm bar (rank 0 only).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    checkpoint_every: int = 100
    num_workers: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    resume: bool = True
    seed: int = 0
    clip_grad_norm: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    log_every: int = 1
    progress: bool = True

    @classmethod
    def from_config(cls, train: Any, seed: int, **overrides: Any) -> TrainSettings:
        """Build from a :class:`bids_regionmae.config.TrainConfig` section."""
        values = {name: getattr(train, name) for name in (
            "epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_fraction",
            "checkpoint_every", "num_workers", "precision", "resume")}
        values["seed"] = seed
        values.update(overrides)
        return cls(**values)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 support, else ``fp32``; others pass through.

    Returns
    -------
    {'fp32', 'bf16'}
    """
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
    return precision


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up then cosine decay.

    Parameters
    ----------
    total_steps : int
        Number of optimizer steps.
    warmup_steps : int
        Steps ``0 .. warmup_steps - 1`` ramp linearly to 1 (step ``s`` gets
        ``(s + 1) / warmup_steps``).
    min_ratio : float
        Multiplier reached at the end of the cosine.

    Returns
    -------
    callable
        ``f(step) -> float`` for :class:`torch.optim.lr_scheduler.LambdaLR`.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(min(int(warmup_steps), total_steps - 1), 0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: no decay on 1-D tensors, embeddings and Mamba's ``A_log``/``D``.

    Only parameters with ``requires_grad`` are included (frozen encoders of
    fine-tuning are skipped).
    """
    decay, no_decay = [], []
    skip_names = ("pos_embed", "time_embed", "mask_token", "cls_token", "prompt")
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.ndim <= 1 or getattr(param, "_no_weight_decay", False)
                or name.split(".")[-1] in ("A_log", "D") or any(s in name for s in skip_names)):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------- step API


@dataclass
class StepContext:
    """What a step function needs to know about the current micro-batch.

    Attributes
    ----------
    step : int
        Index (0-based) of the optimizer step being computed.
    micro : int
        Micro-batch index within the step (gradient accumulation).
    epoch : int
    rank, world_size : int
    device : torch.device
    generator : torch.Generator
        Seeded from ``(seed, step, micro)``; identical on every rank. Draw
        randomness for the whole global batch from it, then keep
        :attr:`local_rows`.
    local_batch : int
        Samples in this rank's micro-batch.
    """

    step: int
    micro: int
    epoch: int
    rank: int
    world_size: int
    device: torch.device
    generator: torch.Generator
    local_batch: int

    @property
    def global_batch(self) -> int:
        """Samples in the micro-batch over all ranks (``local_batch * world_size``)."""
        return self.local_batch * self.world_size

    @property
    def local_rows(self) -> slice:
        """Rows of a global-batch tensor that belong to this rank (``rank::world_size``)."""
        return slice(self.rank, self.global_batch, self.world_size)


@dataclass
class EvalContext:
    """Passed to the evaluation function.

    Attributes
    ----------
    step, epoch : int
        Optimizer steps done; epoch just finished (0-based).
    rank, world_size : int
    device : torch.device
    seed : int
        Derive per-sample generators with ``make_generator(seed, STREAM_EVAL, index)``
        so that evaluation does not depend on the world size or batch size.
    autocast : callable
        ``with ctx.autocast():`` runs the forward pass in the training precision.
    """

    step: int
    epoch: int
    rank: int
    world_size: int
    device: torch.device
    seed: int
    autocast: Callable[[], contextlib.AbstractContextManager]


@dataclass
class StepOutput:
    """What a step function returns.

    Attributes
    ----------
    loss : Tensor, shape ()
        Mean loss of this rank's micro-batch (the engine divides by
        ``grad_accum``; DDP averages gradients over ranks).
    batch_size : int
        Samples in the micro-batch (throughput).
    metrics : dict of str to float
        Extra scalars to log (averaged over micro-batches and ranks).
    """

    loss: torch.Tensor
    batch_size: int
    metrics: dict[str, float] = field(default_factory=dict)


#: ``step_fn(model, batch, ctx) -> StepOutput`` (or a scalar loss tensor).
StepFn = Callable[[nn.Module, Any, StepContext], "StepOutput | torch.Tensor"]
#: ``eval_fn(model, loader, ctx) -> {name: (sum, count)}``; the engine pools
#: sums and counts over ranks and logs ``sum / count``.
EvalFn = Callable[[nn.Module, DataLoader, EvalContext], Mapping[str, tuple[float, float]]]


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit`.

    Attributes
    ----------
    history : list of dict
        One row per optimizer step: ``step`` (1-based count of steps done),
        ``epoch``, ``lr``, ``loss``, ``clips_per_s``, ``elapsed_s`` and metrics.
    val_history : list of dict
        One row per evaluation: ``step``, ``epoch`` and the eval metrics.
    total_steps, steps_per_epoch : int
    start_step : int
        Step the run resumed from (0 for a fresh run).
    stopped_early : bool
        ``on_eval`` stopped training before ``total_steps``.
    precision : str
    world_size : int
    checkpoint : Path or None
        The last checkpoint written (rank 0).
    """

    history: list[dict[str, Any]]
    val_history: list[dict[str, Any]]
    total_steps: int
    steps_per_epoch: int
    start_step: int
    stopped_early: bool
    precision: str
    world_size: int
    checkpoint: Path | None


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dict/list/tuple to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global state other libraries use
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an engine checkpoint (JSON and safetensors only: no code in it runs).

    Parameters
    ----------
    path : path
        ``out_dir/checkpoints/last.json`` (:attr:`Trainer.checkpoint_path`) or its folder.

    Returns
    -------
    dict
        ``model``, ``optimizer``, ``scheduler`` (state dicts, tensors on the
        CPU), ``step``, ``epoch``, ``step_in_epoch``, ``rng``, ``history``,
        ``val_history``, ``fingerprint``, ``world_size``, ``extra``.

    Raises
    ------
    CheckpointError
        Unreadable, tampered, of another format, or the folder holds a
        ``last.pt`` of the old format (never read: it could run code).
    """
    path = Path(path)
    if path.is_dir():
        path = path / resume_state.RECORD_NAME
    _refuse_legacy(path.parent)
    return resume_state.read_checkpoint(path)


def _refuse_legacy(folder: Path) -> None:
    legacy = folder / resume_state.LEGACY_NAME
    if legacy.exists() or legacy.is_symlink():
        raise CheckpointError(
            f"{legacy}: a training checkpoint in the old torch.save format (written by an older version of "
            "regionmae) or a file that is not ours. It is not loaded: loading such a file can run arbitrary code. "
            "Rerun with --no-resume to start this training over (the file is deleted with the first new "
            "checkpoint), or delete it yourself.")


class StopSignals:
    """SIGTERM and SIGINT turned into a request to stop at the next step boundary (a context manager).

    While active, the first SIGTERM or SIGINT is recorded in :attr:`received`
    (the trainer checkpoints and stops after the current step). Repeats are
    ignored (SLURM and torchrun may both deliver SIGTERM), except a SIGINT at
    least ``escalate_after`` seconds after the first signal, which raises
    ``KeyboardInterrupt`` at once (a second Ctrl-C). The previous handlers
    are restored on exit. Outside the main thread (where Python cannot set
    handlers) it does nothing and signals keep their usual effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, escalate_after: float = 1.0):
        self.escalate_after = escalate_after
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
            LOGGER.warning("%s received: stopping after the current step, once a checkpoint is written", name)
        elif signum == signal.SIGINT and time.monotonic() - self._first_at >= self.escalate_after:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGTERM/SIGINT to the main process (which ends them)."""
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Train ``model`` on ``train_dataset`` with a caller-defined step function.

    Parameters
    ----------
    model : nn.Module
        On CPU or already on the device; moved to ``dist_info.device``.
    train_dataset : Dataset
        Map-style dataset; items are collated by ``collate_fn``.
    step_fn : callable
        ``step_fn(model, batch, ctx: StepContext) -> StepOutput`` (or a loss
        tensor). ``batch`` is already on the device. Runs under autocast.
    settings : TrainSettings
    out_dir : path
        Where rank 0 writes ``checkpoints/``, ``train_log.csv``,
        ``val_log.csv`` and ``tensorboard/``.
    eval_fn : callable, optional
        ``eval_fn(model, loader, ctx: EvalContext) -> {name: (sum, count)}``,
        run under ``torch.no_grad()`` in eval mode after every epoch and at
        the end; ``model`` is the unwrapped module.
    val_dataset : Dataset, optional
    dist_info : DistInfo, optional
        Default: :func:`init_distributed` was not called, single process on CPU.
    collate_fn : callable, optional
    param_groups : callable, optional
        ``param_groups(model, weight_decay) -> list of dict`` for AdamW;
        default :func:`default_param_groups`.
    fingerprint : mapping, optional
        Settings a resumed checkpoint must match (masking, model...); a
        mismatch raises instead of silently mixing two runs.
    extra_state : mapping, optional
        Saved in every checkpoint under ``extra`` (e.g. the data split).
    find_unused_parameters : bool
        Passed to ``DistributedDataParallel`` (fine-tuning with frozen parts).
    on_eval : callable, optional
        ``on_eval(trainer, metrics) -> bool``, called on every rank after each
        evaluation with the pooled metrics (identical on all ranks); return
        True to stop training (early stopping). The stop is recorded in the
        checkpoint, so a rerun does not train further. Use it also to keep
        the best weights (``unwrap(trainer.model).state_dict()``).
    """

    def __init__(self, model: nn.Module, train_dataset: Dataset, *, step_fn: StepFn, settings: TrainSettings,
                 out_dir: str | Path, eval_fn: EvalFn | None = None, val_dataset: Dataset | None = None,
                 dist_info: DistInfo | None = None, collate_fn: Callable | None = None,
                 param_groups: Callable[[nn.Module, float], list[dict[str, Any]]] | None = None,
                 fingerprint: Mapping[str, Any] | None = None, extra_state: Mapping[str, Any] | None = None,
                 find_unused_parameters: bool = False,
                 on_eval: Callable[[Trainer, dict[str, float]], bool] | None = None):
        self.settings = settings
        self.on_eval = on_eval
        self.stopped_early = False
        self.info = dist_info or DistInfo()
        self.device = self.info.device
        self.out_dir = Path(out_dir)
        self.step_fn = step_fn
        self.eval_fn = eval_fn
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.collate_fn = collate_fn
        self.fingerprint = dict(fingerprint or {})
        self.extra_state = dict(extra_state or {})
        self.precision = resolve_precision(settings.precision, self.device)
        self.checkpoint_path = self.out_dir / "checkpoints" / resume_state.RECORD_NAME

        n_train = len(train_dataset)  # type: ignore[arg-type]
        self.sampler = ResumableSampler(n_train, self.info.world_size, self.info.rank, shuffle=True,
                                        seed=settings.seed, drop_tail=True)
        micro_per_epoch = self.sampler.per_rank() // settings.batch_size
        self.steps_per_epoch = micro_per_epoch // settings.grad_accum
        if self.steps_per_epoch < 1:
            need = settings.batch_size * settings.grad_accum * self.info.world_size
            raise UsageError(f"{n_train} training clip(s) cannot fill one optimizer step of {need} clips "
                             f"(batch_size {settings.batch_size} x grad_accum {settings.grad_accum} x "
                             f"{self.info.world_size} process(es)). Lower train.batch_size / grad_accum, "
                             "lower train.val_fraction, or add data.")
        total = settings.epochs * self.steps_per_epoch
        self.total_steps = min(total, settings.max_steps) if settings.max_steps else total
        self.warmup_steps = int(round(settings.warmup_fraction * self.total_steps))

        self.model = model.to(self.device)
        groups = (param_groups or default_param_groups)(self.model, settings.weight_decay)
        if not groups:
            raise UsageError("the model has no trainable parameter")
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay, **({"fused": True} if fused else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, self.warmup_steps))
        if self.info.distributed:
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=find_unused_parameters)
        else:
            self.ddp_model = self.model

        self.history: list[dict[str, Any]] = []
        self.val_history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.start_step = 0
        self._elapsed_before = 0.0

    # ------------------------------------------------------------------ helpers

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context of the training precision (a no-op for fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loader(self, dataset: Dataset, sampler: Sampler, drop_last: bool) -> DataLoader:
        workers = self.settings.num_workers
        return DataLoader(dataset, batch_size=self.settings.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=workers, collate_fn=self.collate_fn, worker_init_fn=_ignore_stop_signals,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                          prefetch_factor=2 if workers > 0 else None)

    def _all_mean(self, values: list[float]) -> list[float]:
        if not self.info.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.info.world_size).tolist()

    def _all_sum(self, values: list[float]) -> list[float]:
        if not self.info.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (tensors, numbers, strings: see :mod:`.resume_state`)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "total_steps": self.total_steps,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "sampler": {"epoch": self.epoch, "skip": self.step_in_epoch * self.settings.grad_accum
                        * self.settings.batch_size},
            "history": self.history,
            "val_history": self.val_history,
            "fingerprint": self.fingerprint,
            "world_size": self.info.world_size,
            "elapsed_s": self._elapsed(),
            "stopped_early": self.stopped_early,
            "extra": self.extra_state,
        }

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint (rank 0) and the CSV logs; return ``checkpoints/last.json``.

        The tensor file is written first and ``last.json`` replaced atomically
        after it, so a kill at any moment leaves the previous checkpoint or this
        one (:func:`bids_regionmae.train.resume_state.write_checkpoint`). A
        ``last.pt`` of the old format is deleted once this one is committed.
        """
        if not self.info.is_main:
            return None
        self.write_logs()  # first: once the checkpoint exists, the logs reach its step
        resume_state.write_checkpoint(self.checkpoint_path.parent, self.state_dict(), self.step)
        legacy = self.checkpoint_path.parent / resume_state.LEGACY_NAME
        if legacy.exists() or legacy.is_symlink():
            try:
                legacy.unlink()
                LOGGER.info("deleted %s (old checkpoint format, replaced by %s)", legacy, self.checkpoint_path)
            except OSError as exc:  # a resumed run will refuse it again, with the same advice
                LOGGER.warning("cannot delete %s (%s): delete it before resuming this run", legacy, exc)
        LOGGER.debug("checkpoint at step %d -> %s", self.step, self.checkpoint_path)
        return self.checkpoint_path

    def write_logs(self) -> None:
        """Write ``train_log.csv`` and ``val_log.csv`` from the in-memory history (rank 0)."""
        if not self.info.is_main:
            return
        if self.history:
            _write_csv(self.out_dir / "train_log.csv", self.history)
        if self.val_history:
            _write_csv(self.out_dir / "val_log.csv", self.val_history)

    def _maybe_resume(self) -> None:
        folder = self.checkpoint_path.parent
        if self.settings.resume:
            _refuse_legacy(folder)
        elif self.info.is_main and (folder / resume_state.LEGACY_NAME).exists():
            LOGGER.warning("train.resume is off: ignoring %s (old checkpoint format, never read); it is deleted "
                           "with this run's first checkpoint", folder / resume_state.LEGACY_NAME)
        if not self.checkpoint_path.is_file():
            return
        if not self.settings.resume:
            LOGGER.info("train.resume is off: ignoring %s and starting over", self.checkpoint_path)
            return
        state = load_checkpoint(self.checkpoint_path)
        diff = _fingerprint_diff(state.get("fingerprint", {}), self.fingerprint)
        if state.get("world_size") != self.info.world_size:
            diff.append(f"world_size: checkpoint {state.get('world_size')} vs now {self.info.world_size}")
        if state.get("total_steps") != self.total_steps:
            diff.append(f"total_steps: checkpoint {state.get('total_steps')} vs now {self.total_steps}")
        if diff:
            raise UsageError(f"{self.checkpoint_path} belongs to a run with other settings ("
                             + "; ".join(diff) + "). Run with --no-resume to start over (the checkpoint "
                             "is replaced), or restore the settings to continue it.")
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.history = list(state["history"])
        self.val_history = list(state["val_history"])
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self.stopped_early = bool(state.get("stopped_early", False))
        self.start_step = self.step
        LOGGER.info("resuming from %s at step %d/%d (epoch %d)", self.checkpoint_path, self.step,
                    self.total_steps, self.epoch)

    def _remove_stale_temporaries(self) -> None:
        """Delete what a killed run left half-done: temporary files (``.<name>.tmp-<pid>-...``) and
        tensor files whose checkpoint was never committed."""
        for folder in (self.checkpoint_path.parent, self.out_dir):
            if folder.is_dir():
                for stale in folder.glob(".*.tmp-*"):
                    with contextlib.suppress(OSError):
                        stale.unlink()
        if self.checkpoint_path.parent.is_dir():
            for stale in resume_state.unreferenced_tensor_files(self.checkpoint_path.parent):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` over this rank's share of the validation set; pool over ranks.

        Returns
        -------
        dict of str to float
            ``sum / count`` per metric (NaN when the count is 0).
        """
        if self.eval_fn is None or self.val_dataset is None or len(self.val_dataset) == 0:  # type: ignore[arg-type]
            return {}
        sampler = ResumableSampler(len(self.val_dataset), self.info.world_size, self.info.rank,  # type: ignore[arg-type]
                                   shuffle=False, drop_tail=False)
        loader = DataLoader(self.val_dataset, batch_size=self.settings.batch_size, sampler=sampler,
                            num_workers=min(self.settings.num_workers, 1), collate_fn=self.collate_fn,
                            worker_init_fn=_ignore_stop_signals, pin_memory=self.device.type == "cuda")
        module = unwrap(self.model)
        was_training = module.training
        module.eval()
        ctx = EvalContext(step=self.step, epoch=self.epoch, rank=self.info.rank,
                          world_size=self.info.world_size, device=self.device, seed=self.settings.seed,
                          autocast=self.autocast)
        raw = dict(self.eval_fn(module, loader, ctx))
        module.train(was_training)
        names = sorted(raw)
        pooled = self._all_sum([float(v) for n in names for v in raw[n]])
        out: dict[str, float] = {}
        for i, name in enumerate(names):
            total, count = pooled[2 * i], pooled[2 * i + 1]
            out[name] = total / count if count > 0 else float("nan")
        return out

    # ------------------------------------------------------------------ training

    def fit(self) -> TrainResult:
        """Train until ``total_steps`` (resuming first if a checkpoint exists).

        Returns
        -------
        TrainResult

        Raises
        ------
        TrainingInterrupted
            SIGTERM or SIGINT arrived: the step in progress was finished and
            checkpointed (see :class:`StopSignals`); rerun to resume.
        CheckpointError
            The checkpoint to resume from is unreadable, or is an old ``last.pt``.
        """
        with StopSignals() as signals:
            return self._fit(signals)

    def _fit(self, signals: StopSignals) -> TrainResult:
        s = self.settings
        info = self.info
        if info.is_main:
            self._remove_stale_temporaries()
        self._maybe_resume()
        self._t0 = time.perf_counter()
        writer = self._tensorboard() if info.is_main else None
        bar = None
        if info.is_main and s.progress:
            from tqdm.auto import tqdm

            interactive = sys.stderr.isatty()
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       leave=False, mininterval=0.1 if interactive else 30.0)
        loader = self._loader(self.train_dataset, self.sampler, drop_last=True)
        iterator: Iterator | None = None
        last_ckpt: Path | None = self.checkpoint_path if self.step and info.is_main else None
        saved_step = self.step
        ema_rate: float | None = None
        try:
            while self.step < self.total_steps and not self.stopped_early:
                if iterator is None:
                    skip = self.step_in_epoch * s.grad_accum * s.batch_size
                    self.sampler.set_epoch(self.epoch, skip=skip)
                    iterator = iter(loader)
                t_step = time.perf_counter()
                self._seed_step()
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum, n_local, metric_sums = 0.0, 0, {}
                for micro in range(s.grad_accum):
                    batch = move_to_device(next(iterator), self.device)
                    out = self._micro_step(batch, micro)
                    loss_sum += float(out.loss.detach())
                    n_local += out.batch_size
                    for k, v in out.metrics.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                if s.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad_norm)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.step_in_epoch += 1
                names = sorted(metric_sums)
                reduced = self._all_mean([loss_sum / s.grad_accum]
                                         + [metric_sums[k] / s.grad_accum for k in names])
                dt = max(time.perf_counter() - t_step, 1e-9)
                rate = n_local * info.world_size / dt
                ema_rate = rate if ema_rate is None else 0.9 * ema_rate + 0.1 * rate
                row = {"step": self.step, "epoch": self.epoch, "lr": lr, "loss": reduced[0],
                       "clips_per_s": rate, "elapsed_s": self._elapsed()}
                row.update({k: v for k, v in zip(names, reduced[1:], strict=True)})
                self.history.append(row)
                if bar is not None:
                    bar.update(1)
                    if self.step % s.log_every == 0 or self.step == self.total_steps:
                        bar.set_postfix(loss=f"{reduced[0]:.4f}", clips_s=f"{ema_rate:.2f}", epoch=self.epoch)
                if writer is not None and (self.step % s.log_every == 0 or self.step == self.total_steps):
                    writer.add_scalar("train/loss", reduced[0], self.step)
                    writer.add_scalar("train/lr", lr, self.step)
                    writer.add_scalar("train/clips_per_s", rate, self.step)
                    for k, v in zip(names, reduced[1:], strict=True):
                        writer.add_scalar(f"train/{k}", v, self.step)

                epoch_done = self.step_in_epoch >= self.steps_per_epoch
                if epoch_done or self.step == self.total_steps:
                    self._run_eval(writer, bar)
                if epoch_done:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    iterator = None
                if (self.step % s.checkpoint_every == 0 or self.step == self.total_steps
                        or self.stopped_early):
                    last_ckpt = self.save_checkpoint() or last_ckpt
                    saved_step = self.step
                self._stop_if_signalled(signals, saved_step)
            self._stop_if_signalled(signals, saved_step)
            if self.start_step and self.start_step == self.step and info.is_main:
                LOGGER.info("training already complete at step %d (%s)", self.step, self.checkpoint_path)
                self.write_logs()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            del iterator, loader
        barrier(info)
        return TrainResult(history=self.history, val_history=self.val_history, total_steps=self.total_steps,
                           steps_per_epoch=self.steps_per_epoch, start_step=self.start_step,
                           stopped_early=self.stopped_early, precision=self.precision,
                           world_size=info.world_size, checkpoint=last_ckpt)

    def _stop_if_signalled(self, signals: StopSignals, saved_step: int) -> None:
        """At a step boundary: when any rank got SIGTERM/SIGINT, checkpoint (unless this step has one) and raise.

        Every rank calls this after every step; under DDP a MAX all-reduce of
        the received signal makes them all stop at the same step.
        """
        signum = signals.received or 0
        if self.info.distributed:
            flag = torch.tensor([signum], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if not signum:
            return
        if self.step and saved_step != self.step:
            self.save_checkpoint()
        barrier(self.info)  # no rank leaves before rank 0 has written
        name = signal.Signals(signum).name
        where = self.checkpoint_path if self.step else None
        message = (f"training stopped by {name} after step {self.step}/{self.total_steps}"
                   + (f"; checkpoint {where}. Rerun the same command to continue from it." if where else
                      " (no step done, nothing to save). Rerun the same command to start it."))
        if self.info.is_main:
            LOGGER.warning(message)
        raise TrainingInterrupted(message, signum, str(where) if where and self.info.is_main else None)

    def _seed_step(self) -> None:
        torch.manual_seed(derive_seed(self.settings.seed, STREAM_GLOBAL, self.step, self.info.rank))

    def _micro_step(self, batch: Any, micro: int) -> StepOutput:
        s = self.settings
        local = _batch_len(batch, s.batch_size)
        ctx = StepContext(step=self.step, micro=micro, epoch=self.epoch, rank=self.info.rank,
                          world_size=self.info.world_size, device=self.device,
                          generator=make_generator(s.seed, STREAM_MASK, self.step, micro, device=self.device),
                          local_batch=local)
        sync = micro == s.grad_accum - 1 or not self.info.distributed
        no_sync = contextlib.nullcontext() if sync else self.ddp_model.no_sync()  # type: ignore[operator]
        with no_sync:
            with self.autocast():
                out = self.step_fn(self.ddp_model, batch, ctx)
            if isinstance(out, torch.Tensor):
                out = StepOutput(loss=out, batch_size=local)
            if not torch.isfinite(out.loss.detach()):
                raise FloatingPointError(f"non-finite loss {float(out.loss)} at step {self.step} (micro {micro}). "
                                         "Lower train.lr or use precision fp32.")
            (out.loss.float() / s.grad_accum).backward()
        return out

    def _run_eval(self, writer: Any, bar: Any) -> None:
        metrics = self.evaluate()
        if not metrics:
            return
        row: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        row.update(metrics)
        self.val_history.append(row)
        if writer is not None:
            for k, v in metrics.items():
                if not math.isnan(v):
                    writer.add_scalar(f"val/{k}", v, self.step)
        if self.on_eval is not None and self.on_eval(self, metrics):
            self.stopped_early = True
            LOGGER.info("early stop requested after step %d", self.step)
        if self.info.is_main:
            ordered = sorted(metrics.items(), key=lambda kv: (math.isnan(kv[1]), kv[0].startswith("mse_"), kv[0]))
            shown = ", ".join(f"{k} {v:.4f}" for k, v in ordered[:4])
            message = f"epoch {self.epoch} step {self.step}: {shown}"
            if bar is not None:
                bar.write(message)
            LOGGER.info(message)

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed
            LOGGER.info("tensorboard is not installed: CSV logs only (pip install tensorboard)")
            return None
        try:
            return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=self.step or None)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            LOGGER.warning("cannot open TensorBoard writer (%s): CSV logs only", exc)
            return None


def _batch_len(batch: Any, default: int) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0], default)
    return default
