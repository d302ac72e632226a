"""Discovery of fMRIPrep derivatives and phenotype labels.

Public API: :func:`locate_fmriprep`, :func:`discover_runs` (returns a
:class:`DiscoveryResult` of :class:`RunRecord` items and a
:class:`DiscoveryReport`), :func:`load_labels` / :class:`Labels` and
:func:`participants_file_candidates`. Inside: :mod:`.filters` (the
selection language), :mod:`.assemble` (the files of one run), :mod:`.index`
(the file index and its cache), :mod:`.validate` (checks). Importing this package is cheap: pybids
and nibabel are imported only when an index has to be built or a header read.
"""

from bids_regionmae.bids.assemble import Skipped
from bids_regionmae.bids.discover import (
    DiscoveryReport,
    DiscoveryResult,
    discover_runs,
    list_participants,
    locate_fmriprep,
)
from bids_regionmae.bids.labels import Labels, load_labels, participants_file_candidates
from bids_regionmae.bids.records import RunRecord

__all__ = [
    "DiscoveryReport",
    "DiscoveryResult",
    "Labels",
    "RunRecord",
    "Skipped",
    "discover_runs",
    "list_participants",
    "load_labels",
    "locate_fmriprep",
    "participants_file_candidates",
]
