"""The container image, end to end (``scripts/container-smoke.sh``).

Builds the CPU image and runs every stage through it read-only, as an
arbitrary user, without network. Needs a Docker daemon: skipped when
``docker info`` fails (CI has none). Slow: a first build takes several
minutes. Set ``REGIONMAE_SMOKE_IMAGE`` to reuse an image that is already built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "container-smoke.sh"
DESCRIPTOR = REPO / "bids_regionmae" / "data" / "boutiques.json"


def _docker_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_boutiques_descriptor_matches_cli():
    """Every flag of the Boutiques descriptor is an option of ``regionmae``."""
    from bids_regionmae.cli import cli

    descriptor = json.loads(DESCRIPTOR.read_text(encoding="utf-8"))
    options = {opt for param in cli.params for opt in getattr(param, "opts", ())}
    flags = {i["command-line-flag"] for i in descriptor["inputs"] if "command-line-flag" in i}
    assert flags <= options, sorted(flags - options)
    assert descriptor["command-line"].startswith("regionmae [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL]")


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    """.dockerignore lets through (``!path``) every source of a ``COPY`` from the build context."""
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.startswith("!")]
    sources = []
    for line in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w.replace("[s]", "s") for w in words[1:-1] if not w.startswith("--")]
    assert "scripts/nvcc-arch-filter.sh" in sources and "bids_regionmae" in sources
    for source in sources:
        assert any(source == a or source.startswith(a + "/") for a in allowed), (source, allowed)
        assert (REPO / source).exists() or source == ".docker-templates", source


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.skipif(not _docker_available(), reason="no Docker daemon (docker info failed)")
def test_container_smoke(tmp_path):
    env = dict(os.environ, SMOKE_DIR=str(tmp_path / "smoke"))
    if os.environ.get("REGIONMAE_SMOKE_IMAGE"):
        env.update(IMAGE=os.environ["REGIONMAE_SMOKE_IMAGE"], SKIP_BUILD="1")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3 * 3600)
    report = proc.stdout + "\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    assert "version" in proc.stdout and "participant" in proc.stdout, report
