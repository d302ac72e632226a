"""The records discovery hands on: one :class:`RunRecord` per BOLD run, the :class:`DiscoveryResult` and its report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_regionmae.bids.assemble import Skipped


@dataclass(frozen=True)
class RunRecord:
    """One fMRIPrep BOLD run and its companions.

    Attributes
    ----------
    subject, session, task, run : str or None
        BIDS entity labels, without prefixes (``session``/``run`` may be None).
    space : str
        Template space of ``bold`` (e.g. ``MNI152NLin6Asym``).
    res : str or None
        ``res-`` label of ``bold`` if present.
    bold : Path
        ``desc-preproc_bold`` NIfTI (4D).
    mask : Path
        Matching ``desc-brain_mask`` NIfTI (3D).
    boldref : Path or None
        Matching ``boldref`` NIfTI.
    confounds : Path or None
        ``desc-confounds_timeseries.tsv`` (or the older ``_regressors.tsv``).
    repetition_time : float
        Seconds, from the sidecar or the NIfTI header.
    acquisition : str or None
        Other entities that make the run unique (``acq``, ``rec``, ``echo`` ...),
        already formatted as ``key-value`` pairs joined with ``_``.
    """

    subject: str
    task: str
    space: str
    bold: Path
    mask: Path
    repetition_time: float
    session: str | None = None
    run: str | None = None
    res: str | None = None
    boldref: Path | None = None
    confounds: Path | None = None
    acquisition: str | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def entities(self) -> dict[str, str]:
        """BIDS entities identifying the run (``subject``, ``session``, ``task``, ``run``)."""
        ents = {"subject": self.subject, "task": self.task}
        if self.session is not None:
            ents["session"] = self.session
        if self.run is not None:
            ents["run"] = self.run
        ents.update(self.extra)
        return ents

    @property
    def run_id(self) -> str:
        """A readable unique name, e.g. ``sub-01_ses-1_task-rest_run-1``."""
        parts = [f"sub-{self.subject}"]
        if self.session is not None:
            parts.append(f"ses-{self.session}")
        parts.append(f"task-{self.task}")
        if self.acquisition:
            parts.append(self.acquisition)
        if self.run is not None:
            parts.append(f"run-{self.run}")
        return "_".join(parts)


@dataclass
class DiscoveryReport:
    """What discovery found, skipped and warned about.

    Attributes
    ----------
    skipped : list of Skipped
        Runs that matched the filters but cannot be used, with the reason.
    warnings : list of str
        Non-fatal findings (TR mismatches, missing confounds, mixed spaces ...).
    available : dict
        Labels present in the dataset: ``participants``, ``sessions``,
        ``tasks``, ``runs``, ``spaces``.
    cache : str
        ``"off"``, ``"miss"``, ``"hit"`` or ``"rebuilt"``.
    backend : str
        Indexer used (``"fast"`` or ``"pybids"``).
    seconds : float
        Wall time of the discovery.
    n_runs : int
        Number of usable runs.
    """

    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    available: dict[str, list[str]] = field(default_factory=dict)
    cache: str = "off"
    backend: str = "fast"
    seconds: float = 0.0
    n_runs: int = 0

    def summary(self, max_items: int = 20) -> str:
        """Human-readable multi-line summary (long lists are truncated)."""
        lines = [f"{self.n_runs} run(s) found, {len(self.skipped)} skipped "
                 f"(index: {self.backend}, cache {self.cache}, {self.seconds:.2f} s)."]
        for item in self.skipped[:max_items]:
            lines.append(f"  skipped {item.path}: {item.reason}")
        if len(self.skipped) > max_items:
            lines.append(f"  ... and {len(self.skipped) - max_items} more skipped")
        for text in self.warnings[:max_items]:
            lines.append(f"  warning: {text}")
        if len(self.warnings) > max_items:
            lines.append(f"  ... and {len(self.warnings) - max_items} more warnings")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for reports and logs)."""
        return {"n_runs": self.n_runs, "skipped": [list(s) for s in self.skipped],
                "warnings": list(self.warnings), "available": self.available, "cache": self.cache,
                "backend": self.backend, "seconds": round(self.seconds, 4)}


@dataclass
class DiscoveryResult:
    """Output of :func:`discover_runs`.

    Attributes
    ----------
    runs : list of RunRecord
        Usable runs, sorted by participant, session, task, other entities, run.
    skipped : list of Skipped
        ``(path, reason)`` for runs that matched but cannot be used.
    fmriprep_dir : Path
        The fMRIPrep dataset that was read.
    raw_dir : Path or None
        The raw BIDS dataset, when known.
    participants : list of str
        Labels (no ``sub-``) of participants with at least one usable run.
    report : DiscoveryReport
        Full report (includes ``skipped``).
    """

    runs: list[RunRecord]
    skipped: list[Skipped]
    fmriprep_dir: Path
    raw_dir: Path | None
    participants: list[str]
    report: DiscoveryReport = field(default_factory=DiscoveryReport)
