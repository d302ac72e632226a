"""Stage workflows: what each ``analysis_level`` / ``--stage`` runs.

Stage modules are imported lazily so that ``regionmae --help`` stays fast
and a stage's heavy dependencies load only when it runs.
"""

from __future__ import annotations

from importlib import import_module

from bids_regionmae.config import RunConfig

#: stage name -> module path of a ``run(config) -> int`` function.
STAGE_MODULES = {
    "preprocess": "bids_regionmae.workflows.participant",
    "predict": "bids_regionmae.workflows.predict",
    "pretrain": "bids_regionmae.workflows.pretrain",
    "finetune": "bids_regionmae.workflows.finetune",
    "compare": "bids_regionmae.workflows.compare",
}


def default_stage(config: RunConfig) -> str:
    """The stage a configuration runs when ``--stage`` is not given."""
    if config.stage:
        return config.stage
    if config.analysis_level == "participant":
        return "predict" if config.model_dir else "preprocess"
    return "pretrain"


def run_workflow(config: RunConfig) -> int:
    """Run the stage selected by ``config`` and return the process exit code."""
    stage = default_stage(config)
    module = import_module(STAGE_MODULES[stage])
    return int(module.run(config))
