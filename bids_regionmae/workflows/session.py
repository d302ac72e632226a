"""What every stage starts with, in one place: the session of one invocation.

:func:`open_session` resolves the device (``--device cuda`` without a GPU is
the same clear error, exit 64, in every stage), joins the ``torchrun``
process group when there is one, prepares the output dataset and the work
and log folders, sets threads and seeds, and records the configuration. The
:class:`Session` it yields then owns, for every stage:

- run selection: :meth:`Session.model_ready_runs` (the model-ready runs that
  pass the participant/session/task/run filters);
- the atlas on the model grid: :attr:`Session.atlas`;
- the masking plan: :meth:`Session.masking_plan` (``--mask-strategy``,
  ``--regions``, ``--patch-rule``, ratios: parsed once, resolved to labels);
- ``--model``: :attr:`Session.model`, opened once by
  :meth:`bids_regionmae.models.model_dir.ModelDir.open`;
- writing the configuration and waiting for the other ranks.

Workflows only orchestrate: they take what they need from the session and
call the rooms (``preprocess``, ``train``, ``finetune``, ``predict``,
``reports``...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_regionmae.atomic import atomic_write_text
from bids_regionmae.config import CONFIG_FILE_NAME, MaskingConfig, RunConfig, config_to_toml, environment_record
from bids_regionmae.errors import DeviceUnavailableError, InputMissingError, OutputError

if TYPE_CHECKING:
    import torch

    from bids_regionmae.atlas import ModelGridAtlas
    from bids_regionmae.masking import MaskingPlan
    from bids_regionmae.models.model_dir import ModelDir
    from bids_regionmae.preprocess.store import ModelReadyRun
    from bids_regionmae.train.engine import DistInfo

LOGGER = logging.getLogger(__name__)

__all__ = ["Session", "open_session", "resolve_device", "seed_everything", "set_threads"]

#: stage name when ``--stage`` is not given, per analysis level.
_DEFAULT_STAGE = {"participant": "preprocess", "group": "pretrain"}


def default_stage(config: RunConfig) -> str:
    """The stage a configuration runs when ``--stage`` is not given."""
    if config.stage:
        return config.stage
    if config.analysis_level == "participant" and config.model_dir:
        return "predict"
    return _DEFAULT_STAGE[config.analysis_level]


def new_run_id() -> str:
    """``<timestamp>_<random>``: unique per invocation (and per derived session)."""
    return time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:6]


def resolve_device(requested: str) -> str:
    """Map ``auto|cpu|cuda`` to an available device.

    Raises
    ------
    DeviceUnavailableError
        ``cuda`` was requested but torch sees no CUDA device (exit 64).
    """
    import torch

    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise DeviceUnavailableError(
            "--device cuda: torch sees no CUDA device. Install a CUDA build of torch, run the container with "
            "--gpus all (docker) or --nv (apptainer), or use --device cpu.")
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


@dataclass
class Session:
    """Locations, compute settings and the shared inputs of one invocation.

    Attributes
    ----------
    config : RunConfig
    output_dir, work_dir, logs_dir : Path
    dist : DistInfo
        Rank, world size and device of this process.
    run_id : str
        ``<timestamp>_<random>``, unique per invocation.
    environment : dict
        Versions, device, backend...: written into the run config's ``[environment]`` table.
    """

    config: RunConfig
    output_dir: Path
    work_dir: Path
    logs_dir: Path
    dist: DistInfo
    run_id: str
    environment: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ facts

    @property
    def stage(self) -> str:
        return default_stage(self.config)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.dist.is_main

    def derive(self, config: RunConfig, *, write_config: bool = False) -> Session:
        """The same session for another configuration (a sub-stage of ``compare``, ``predict``'s preprocessing).

        The atlas and the opened model are shared when the settings they come from are unchanged.
        """
        child = dataclasses.replace(self, config=config, environment=dict(self.environment), run_id=new_run_id())
        same_atlas = (config.atlas.atlas_file, config.atlas.atlas_labels) == (self.config.atlas.atlas_file,
                                                                              self.config.atlas.atlas_labels)
        if same_atlas and "atlas" in self.__dict__:
            child.__dict__["atlas"] = self.__dict__["atlas"]
        if config.model_dir == self.config.model_dir and "model" in self.__dict__:
            child.__dict__["model"] = self.__dict__["model"]
        if write_config:
            child.write_config()
        return child

    # ------------------------------------------------------------------ shared inputs

    @cached_property
    def atlas(self) -> ModelGridAtlas:
        """The atlas on the 96^3 model grid (written into ``output_dir`` by rank 0 when missing)."""
        from bids_regionmae.atlas import model_grid_atlas

        a = self.config.atlas
        return model_grid_atlas(self.output_dir, atlas_file=a.atlas_file, atlas_labels=a.atlas_labels,
                                write=self.is_main)

    @cached_property
    def model(self) -> ModelDir | None:
        """``--model``, opened once (None without it).

        Raises
        ------
        ModelDirMissingError, NotAModelDirError, ModelDirCorruptError, ModelDirTooNewError, ModelDirTooOldError
            See :mod:`bids_regionmae.models.model_dir`.
        """
        if not self.config.model_dir:
            return None
        from bids_regionmae.models.model_dir import ModelDir

        return ModelDir.open(self.config.model_dir)

    def model_ready_runs(self, *, required: bool = True) -> list[ModelReadyRun]:
        """Model-ready runs of ``output_dir`` that pass the participant/session/task/run filters.

        Raises
        ------
        InputMissingError
            ``required`` and none found (exit 66): run participant level first.
        """
        from bids_regionmae.preprocess.store import find_model_ready_runs

        inputs = self.config.inputs
        runs = find_model_ready_runs(self.output_dir, subjects=list(inputs.participant_label) or None)
        filters = {"session": inputs.session_label, "task": inputs.task, "run": inputs.run}
        for entity, wanted in filters.items():
            if wanted:
                runs = [r for r in runs if r.entities.get(entity) in set(wanted)]
        if required and not runs:
            what = " matching the participant/session/task/run filters" if any(
                (inputs.participant_label, *filters.values())) else ""
            raise InputMissingError(
                f"{self.output_dir}: no model-ready data{what} (no complete "
                "sub-*/func/*_desc-modelready_bold.json). Run participant level first: "
                f"regionmae {self.config.bids_dir} {self.output_dir} participant")
        return runs

    def masking_plan(self, masking: MaskingConfig | None = None) -> MaskingPlan:
        """The masking plan of ``masking`` (default: the configuration's), regions resolved on :attr:`atlas`.

        Several selections (``--regions cerebellum --regions limbic`` or
        ``cerebellum,limbic``) are masked together, like ``cerebellum+limbic``.

        Raises
        ------
        UsageError
            An unknown region, or a strategy that needs ``--regions`` without them.
        """
        from bids_regionmae.atlas import resolve_region
        from bids_regionmae.masking import MaskingPlan, strategy_class

        m = masking or self.config.masking
        region, labels = None, ()
        if strategy_class(m.strategy).uses_regions and m.regions:
            regions = [resolve_region(spec, self.atlas.names) for spec in m.regions]
            region = "+".join(r.name for r in regions)
            labels = tuple(sorted({i for r in regions for i in r.labels}))
        return MaskingPlan(strategy=m.strategy, region=region, labels=labels, rule=self.config.atlas.patch_rule,
                           ratio=m.mask_ratio, fraction=m.mask_fraction, level=m.level,
                           include_background=m.include_background, norm_patch_loss=m.norm_patch_loss)

    # ------------------------------------------------------------------ writing

    def write_config(self, directory: Path | None = None, **environment: Any) -> Path | None:
        """Write the resolved configuration (TOML) with its environment record (rank 0 only).

        Parameters
        ----------
        directory : Path, optional
            Where to write :data:`~bids_regionmae.config.CONFIG_FILE_NAME` (e.g. a model directory);
            by default ``logs/`` under a name unique to this invocation.
        **environment
            Extra facts to record (backend, precision, world size...).
        """
        self.environment.update({k: v for k, v in environment.items() if v is not None})
        if not self.is_main:
            return None
        text = config_to_toml(self.config, self.environment)
        if directory is None:
            path = self.logs_dir / f"regionmae_{self.config.analysis_level}_{self.stage}_{self.run_id}.toml"
        else:
            path = Path(directory) / CONFIG_FILE_NAME
        return atomic_write_text(path, text)

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single-process job)."""
        from bids_regionmae.train.engine import barrier

        barrier(self.dist)


@contextlib.contextmanager
def open_session(config: RunConfig, *, distributed: bool = True) -> Iterator[Session]:
    """Start one invocation: device, process group, output dataset, threads, seed, config record.

    Parameters
    ----------
    config : RunConfig
    distributed : bool
        Join the ``torchrun`` process group when the environment describes
        one (the group stages); participant level always runs one process.

    Yields
    ------
    Session

    Raises
    ------
    DeviceUnavailableError
        ``--device cuda`` without a CUDA device (exit 64).
    UsageError, InputMissingError, OutputError
        From :func:`~bids_regionmae.outputs.derivatives.init_derivatives` or the work folders.
    """
    import torch

    from bids_regionmae.train.engine import DistInfo, cleanup_distributed, init_distributed

    device = resolve_device(config.device)
    info = init_distributed(device) if distributed else DistInfo(device=torch.device(device))
    try:
        yield _start(config, info)
    finally:
        cleanup_distributed(info)


def _start(config: RunConfig, info: DistInfo) -> Session:
    from bids_regionmae.outputs.derivatives import init_derivatives

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
    threads = set_threads(config.omp_nthreads, config.nprocs)
    seed_everything(config.seed)
    run_id = new_run_id()
    device = str(info.device.type)
    session = Session(config=config, output_dir=output_dir, work_dir=work_dir, logs_dir=logs_dir, dist=info,
                      run_id=run_id,
                      environment=environment_record(device=device, seed=config.seed, torch_threads=threads))
    session.write_config()
    LOGGER.info("regionmae %s level, stage %s: %s -> %s (device %s)", config.analysis_level, session.stage,
                config.bids_dir, output_dir, device)
    return session
