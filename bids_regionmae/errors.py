"""Exception hierarchy mapped to the BIDS Apps execution-spec exit codes.

Every error message should name the file (or parameter), the problem and the
fix, e.g. ``"sub-01_bold.nii.gz: 3D image, expected 4D (x, y, z, t). Check
that you pointed at desc-preproc_bold, not boldref."``
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_INPUT_MISSING = 66
EXIT_CANT_CREATE = 73
#: 128 + signal number, as a shell reports a process ended by that signal
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class RegionMAEError(Exception):
    """Base class of every error this package raises on purpose.

    Attributes
    ----------
    exit_code : int
        Process exit status from the BIDS Apps execution spec.
    """

    exit_code = EXIT_ERROR


class UsageError(RegionMAEError):
    """Bad command-line usage or invalid configuration value (exit 64)."""

    exit_code = EXIT_USAGE


class UnknownLevelError(RegionMAEError):
    """Analysis level is neither ``participant`` nor ``group`` (exit 17)."""

    exit_code = EXIT_UNKNOWN_LEVEL


class ValidationError(RegionMAEError):
    """Input dataset failed validation (exit 16)."""

    exit_code = EXIT_VALIDATION


class NoMatchError(RegionMAEError):
    """Filters matched no participant, session, task or run (exit 18)."""

    exit_code = EXIT_NO_MATCH


class InputMissingError(RegionMAEError):
    """A required input file or directory does not exist (exit 66)."""

    exit_code = EXIT_INPUT_MISSING


class OutputError(RegionMAEError):
    """The output directory cannot be created or written (exit 73)."""

    exit_code = EXIT_CANT_CREATE


class InputDataError(RegionMAEError):
    """An input file exists but its content is unusable (exit 1).

    Raised per run so that one broken run does not stop the others.
    """

    exit_code = EXIT_ERROR


class OfflineError(RegionMAEError):
    """A resource (template, atlas) is missing and cannot be downloaded (exit 1)."""

    exit_code = EXIT_ERROR


class BackendError(RegionMAEError):
    """A requested compute backend (e.g. mamba-ssm, CUDA) is unavailable (exit 1)."""

    exit_code = EXIT_ERROR


class CheckpointError(RegionMAEError):
    """A training checkpoint cannot be resumed from: unreadable, tampered, old or foreign format (exit 1)."""

    exit_code = EXIT_ERROR


class TrainingInterrupted(RegionMAEError):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint (exit 128 + signal: 143, 130).

    Attributes
    ----------
    signum : int
        The signal received.
    checkpoint : str or None
        The checkpoint a rerun resumes from (None on ranks other than 0).
    """

    def __init__(self, message: str, signum: int, checkpoint: str | None = None):
        super().__init__(message)
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.exit_code = 128 + self.signum


class DeviceUnavailableError(BackendError):
    """``--device cuda`` where torch sees no CUDA device: a usage problem (exit 64)."""

    exit_code = EXIT_USAGE
