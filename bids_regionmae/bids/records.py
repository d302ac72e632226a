"""The record of one BOLD run, as handed from discovery to preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
