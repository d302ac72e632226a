"""Per-participant status logs: ``logs/status/sub-<label>_<stage>.json``.

Every stage that processes runs merges its outcomes (done, skipped, failed,
with the message and the time spent) into one JSON file per participant and
stage (:func:`record_status`); participant reports read them back
(:func:`read_statuses`) to list skipped and failed runs. Participant jobs
that run separately (SLURM arrays) each write their own participants' files.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.outputs.naming import status_path

LOGGER = logging.getLogger(__name__)

__all__ = ["read_json", "read_statuses", "record_status"]

_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")


def _subject_of(text: str) -> str | None:
    match = _SUBJECT.search(str(text))
    return match.group(1) if match else None


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is absent, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def record_status(output_dir: str | Path, stage: str, entries: Iterable[Mapping[str, Any]],
                  skipped_inputs: Iterable[tuple[str, str]] = ()) -> list[Path]:
    """Merge run outcomes into the per-participant status logs of a stage.

    Parameters
    ----------
    output_dir : path
    stage : str
        ``preprocess`` or ``predict-<model label>``.
    entries : iterable of mapping
        ``{"run_id", "status", "message", "seconds"}`` (``run_id`` starts with
        ``sub-<label>``); a later entry of the same run replaces the earlier one.
    skipped_inputs : iterable of (path, reason)
        Input files that discovery skipped.

    Returns
    -------
    list of Path
        The status files written.
    """
    output_dir = Path(output_dir)
    by_subject: dict[str, dict[str, Any]] = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for entry in entries:
        subject = _subject_of(entry.get("run_id", ""))
        if subject is None:
            continue
        by_subject.setdefault(subject, {"runs": {}, "skipped_inputs": []})["runs"][entry["run_id"]] = {
            "status": str(entry.get("status", "")), "message": str(entry.get("message") or ""),
            "seconds": round(float(entry.get("seconds") or 0.0), 3), "updated": now}
    for path, reason in skipped_inputs:
        subject = _subject_of(Path(str(path)).name) or _subject_of(str(path))
        if subject is not None:
            by_subject.setdefault(subject, {"runs": {}, "skipped_inputs": []})["skipped_inputs"].append(
                {"path": str(path), "reason": str(reason)})
    written = []
    for subject, new in by_subject.items():
        path = status_path(output_dir, subject, stage)
        old = read_json(path) or {}
        runs = {**(old.get("runs") or {}), **new["runs"]}
        skipped = new["skipped_inputs"] or old.get("skipped_inputs") or []
        try:
            written.append(atomic_write_json(path, {"subject": subject, "stage": stage, "updated": now,
                                                    "runs": runs, "skipped_inputs": skipped}))
        except OSError as exc:
            LOGGER.warning("could not write the status log %s: %s", path, exc)
    return written


def read_statuses(output_dir: str | Path, subject: str) -> dict[str, dict[str, Any]]:
    """Every stage's status log of a participant: stage -> content."""
    folder = status_path(output_dir, subject, "x").parent
    out = {}
    for path in sorted(folder.glob(f"sub-{subject}_*.json")):
        content = read_json(path)
        if content:
            out[path.stem[len(f"sub-{subject}_"):]] = content
    return out
