"""Stage workflows: what each ``analysis_level`` / ``--stage`` runs.

Every stage opens a :class:`~bids_regionmae.workflows.session.Session`
(device, process group, output dataset, run selection, atlas, ``--model``,
masking plan) and only orchestrates the rooms. Stage modules are imported
lazily so that ``regionmae --help`` stays fast and a stage's heavy
dependencies load only when it runs.
"""

from __future__ import annotations

from importlib import import_module

from bids_regionmae.config import RunConfig
from bids_regionmae.workflows.session import default_stage

__all__ = ["STAGE_MODULES", "default_stage", "run_workflow"]

#: stage name -> module path of a ``run(config) -> int`` function.
STAGE_MODULES = {
    "preprocess": "bids_regionmae.workflows.participant",
    "predict": "bids_regionmae.workflows.predict",
    "pretrain": "bids_regionmae.workflows.pretrain",
    "finetune": "bids_regionmae.workflows.finetune",
    "compare": "bids_regionmae.workflows.compare",
}


def run_workflow(config: RunConfig) -> int:
    """Run the stage selected by ``config`` and return the process exit code."""
    stage = default_stage(config)
    module = import_module(STAGE_MODULES[stage])
    return int(module.run(config))
