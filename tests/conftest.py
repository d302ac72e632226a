"""Shared pytest fixtures (keep them generic: several test files use them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests never try to download AAL3 (atlas tests exercise downloads explicitly).
os.environ.setdefault("REGIONMAE_OFFLINE", "1")

#: Real reference data next to the repository (``../shared/data``); never copied into the repo.
SHARED_DATA: Path = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_path(*parts: str) -> Path:
    """Path under ``../shared/data``; skips the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real reference data not available: {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ``../shared/data`` folder (test skipped when absent)."""
    return shared_data_path()


@pytest.fixture
def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every HTTP(S) request through ``requests``/``urllib`` fail at once.

    Points the proxy variables at a closed local port, so the real download
    code runs and fails fast with a connection error, whatever the machine's
    connectivity.
    """
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def templateflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TEMPLATEFLOW_HOME pre-populated from ``../shared/data/templateflow`` (copied: TemplateFlow writes there)."""
    source = shared_data_path("templateflow")
    home = tmp_path / "templateflow"
    shutil.copytree(source, home)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic fMRIPrep derivative tree (4 subjects, 1 run, 24 frames, MNI152NLin6Asym res-2).

    Built once per session with :func:`bids_regionmae.synthetic.generate_dataset`
    (seed 0, ADHD/control balanced, cerebellar signal planted in the ADHD group).
    Treat it as read-only.
    """
    from bids_regionmae.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "fmriprep", n_subjects=4, n_frames=24,
                            seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's torch code on one thread (threads fight with other processes on a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
