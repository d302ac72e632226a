"""Run the real bids-validator-deno on a derivatives tree (shared by the tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def validator_path() -> str | None:
    """The ``bids-validator-deno`` executable next to this Python, or on PATH."""
    candidate = Path(sys.executable).with_name("bids-validator-deno")
    if candidate.exists():
        return str(candidate)
    return shutil.which("bids-validator-deno")


def validation_errors(dataset: Path) -> list[dict]:
    """Errors (not warnings) that bids-validator-deno reports for ``dataset``; skips if absent."""
    exe = validator_path()
    if exe is None:
        pytest.skip("bids-validator-deno not installed")
    proc = subprocess.run([exe, str(dataset), "--format", "json", "--datasetTypes", "derivative"],
                          capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    return [i for i in report["issues"]["issues"] if i.get("severity") == "error"]


def assert_valid_bids(dataset: Path) -> None:
    """Fail with the validator's errors unless ``dataset`` is valid."""
    errors = validation_errors(dataset)
    assert not errors, json.dumps(errors, indent=1)[:4000]
