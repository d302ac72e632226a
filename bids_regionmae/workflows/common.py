"""What every stage does first: prepare the output dataset, seed, pick a device, record the config."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_regionmae.atomic import atomic_write_text
from bids_regionmae.config import RunConfig, config_to_toml, environment_record
from bids_regionmae.errors import BackendError, OutputError
from bids_regionmae.outputs.derivatives import init_derivatives

LOGGER = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Resolved locations and compute settings of one invocation.

    Attributes
    ----------
    config : RunConfig
    output_dir, work_dir, logs_dir : Path
    device : str
        ``"cpu"`` or ``"cuda"``.
    run_id : str
        ``<timestamp>_<random>``, unique per invocation.
    environment : dict
        Versions, device, backend...: written into the run config's
        ``[environment]`` table.
    """

    config: RunConfig
    output_dir: Path
    work_dir: Path
    logs_dir: Path
    device: str
    run_id: str
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        from bids_regionmae.workflows import default_stage

        return default_stage(self.config)

    def write_config(self, directory: Path | None = None, **environment: Any) -> Path:
        """Write the resolved configuration (TOML) with its environment record.

        Parameters
        ----------
        directory : Path, optional
            Where to write ``regionmae_config.toml`` (e.g. a model directory);
            by default ``logs/`` under a name unique to this invocation.
        **environment
            Extra facts to record (backend, precision, world size...).
        """
        self.environment.update({k: v for k, v in environment.items() if v is not None})
        text = config_to_toml(self.config, self.environment)
        if directory is None:
            path = self.logs_dir / f"regionmae_{self.config.analysis_level}_{self.stage}_{self.run_id}.toml"
        else:
            path = Path(directory) / "regionmae_config.toml"
        return atomic_write_text(path, text)


def resolve_device(requested: str) -> str:
    """Map ``auto|cpu|cuda`` to an available device.

    Raises
    ------
    BackendError
        ``cuda`` was requested but torch sees no CUDA device.
    """
    import torch

    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise BackendError("--device cuda: torch sees no CUDA device. Install a CUDA build of torch, run "
                           "the container with --gpus all (docker) or --nv (apptainer), or use --device cpu.")
    return "cuda" if available else "cpu"


def set_threads(omp_nthreads: int | None, nprocs: int) -> int:
    """Set torch's intra-op threads: ``omp_nthreads``, else the usable cores shared among ``nprocs``.

    On a shared or oversubscribed machine (SLURM, several participant jobs)
    too many threads make the CPU model several times slower.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = omp_nthreads or max(1, cores // max(1, nprocs))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - seeds legacy global users (e.g. nilearn)
    torch.manual_seed(seed)


def prepare_run(config: RunConfig, *, write_config: bool = True) -> RunContext:
    """Create the derivatives dataset, the work and log folders; seed; pick the device.

    Raises
    ------
    UsageError, InputMissingError, OutputError
        From :func:`~bids_regionmae.outputs.derivatives.init_derivatives`.
    """
    output_dir = init_derivatives(config.output_dir, config.bids_dir)
    work_dir = Path(config.work_dir) if config.work_dir else output_dir / ".work"
    logs_dir = output_dir / "logs"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        logs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {work_dir} or {logs_dir} ({exc}). Give a writable --work-dir.") \
            from exc
    os.environ.setdefault("MPLCONFIGDIR", str(work_dir / "matplotlib"))
    device = resolve_device(config.device)
    threads = set_threads(config.omp_nthreads, config.nprocs)
    seed_everything(config.seed)
    run_id = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:6]
    ctx = RunContext(config=config, output_dir=output_dir, work_dir=work_dir, logs_dir=logs_dir,
                     device=device, run_id=run_id,
                     environment=environment_record(device=device, seed=config.seed, torch_threads=threads))
    if write_config:
        ctx.write_config()
    LOGGER.info("regionmae %s level, stage %s: %s -> %s (device %s)", config.analysis_level, ctx.stage,
                config.bids_dir, output_dir, device)
    return ctx

