"""Training engine safety.

- files written through :func:`bids_regionmae.atomic.atomic_path` get the process umask (``model.safetensors``
  was 0600).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from bids_regionmae.atomic import atomic_path

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
