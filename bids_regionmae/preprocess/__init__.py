"""Participant-level preprocessing: fMRIPrep runs -> model-ready arrays on the 96^3 grid.

Public API (imported lazily, so that ``store`` can be used without torch):

- :func:`preprocess_run`, :func:`preprocess_runs`, :class:`RunResult` (``.run``)
- :class:`ModelReadyRun`, :func:`find_model_ready_runs`, :func:`model_ready_paths` (``.store``)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "preprocess_run": "run",
    "preprocess_runs": "run",
    "RunResult": "run",
    "inputs_fingerprint": "run",
    "ModelReadyRun": "store",
    "find_model_ready_runs": "store",
    "load_model_ready_run": "store",
    "model_ready_paths": "store",
    "SpatialResampler": "resample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
