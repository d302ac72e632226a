"""Phenotype labels for fine-tuning: read a participants table, pick a target column.

Sources, in the order :func:`participants_file_candidates` proposes them: a
``--phenotype`` file (TSV or CSV, e.g. ADHD-200's phenotypic CSV or a BIDS
``phenotype/*.tsv``), the raw dataset's ``participants.tsv``, then the
fMRIPrep dataset's ``participants.tsv``. :func:`load_labels` uses the first
existing file that has the target column.

The participant column is ``participant_id`` (BIDS), or one of
``participant``, ``subject_id``, ``subject``, ``sub``, ``ScanDir ID``, ``id``
(case-insensitive); its values match discovery's labels with or without
``sub-``, and purely numeric IDs also match when they differ only by leading
zeros (``10001`` vs ``0010001``).

Target kinds: two distinct values -> ``binary``; integers with at most
``max_classes`` distinct values, each seen twice on average -> ``multiclass``;
other numbers -> ``continuous``; text with more than two values ->
``multiclass``. ``n/a``, empty, ``NA``, ``NaN``, ``null`` and ``None`` are
missing values; participants with a missing value, a missing group value,
conflicting duplicate rows, or no row at all are excluded with the reason.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_regionmae.errors import InputDataError, InputMissingError, UsageError

LOGGER = logging.getLogger(__name__)

MISSING_VALUES = frozenset({"", "n/a", "na", "nan", "null", "none"})
ID_COLUMNS = ("participant_id", "participant", "subject_id", "subject", "sub", "scandir id", "id")
KINDS = ("binary", "multiclass", "continuous")


@dataclass
class Labels:
    """Target values per participant.

    Attributes
    ----------
    values : dict
        Participant label (no ``sub-``) -> value: the class label for
        ``binary``/``multiclass`` (``int`` when the column is integer, else
        ``str``), a ``float`` for ``continuous``.
    kind : str
        ``"binary"``, ``"multiclass"`` or ``"continuous"``.
    classes : list
        Sorted class labels (empty for ``continuous``); for ``binary`` the
        second one is the positive class.
    groups : dict or None
        Participant -> group (site) label when ``group_column`` was given.
    excluded : dict
        Participant -> reason it has no label.
    source : Path or None
        File the labels were read from.
    target : str
        Column name.
    """

    values: dict[str, Any]
    kind: str
    classes: list[Any]
    groups: dict[str, str] | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    target: str = ""

    def encoded(self) -> dict[str, float]:
        """Values as numbers: class index for classification, the value for regression."""
        if self.kind == "continuous":
            return {k: float(v) for k, v in self.values.items()}
        index = {c: i for i, c in enumerate(self.classes)}
        return {k: float(index[v]) for k, v in self.values.items()}

    def counts(self) -> dict[Any, int]:
        """Participants per class (empty for ``continuous``)."""
        if self.kind == "continuous":
            return {}
        counter = Counter(self.values.values())
        return {c: counter.get(c, 0) for c in self.classes}

    def summary(self) -> str:
        """One paragraph for logs and reports."""
        text = (f"target {self.target!r} from {self.source}: {self.kind}, {len(self.values)} "
                f"participant(s) labelled, {len(self.excluded)} excluded")
        if self.kind != "continuous":
            text += "; classes " + ", ".join(f"{c}: {n}" for c, n in self.counts().items())
        if self.groups is not None:
            text += f"; {len(set(self.groups.values()))} group(s)"
        reasons = Counter(self.excluded.values())
        for reason, n in reasons.most_common(5):
            text += f"\n  excluded {n}: {reason}"
        return text


def participants_file_candidates(fmriprep_dir: str | Path | None = None, raw_dir: str | Path | None = None,
                                 phenotype: str | Path | None = None) -> list[Path]:
    """Files to look for labels in, best first.

    Raises
    ------
    InputMissingError
        ``phenotype`` was given but does not exist.
    """
    out: list[Path] = []
    if phenotype:
        path = Path(phenotype).expanduser()
        if not path.is_file():
            raise InputMissingError(f"--phenotype {phenotype}: no such file. Give a TSV or CSV file with "
                                    "a participant_id column.")
        out.append(path)
    for root in (raw_dir, fmriprep_dir):
        if root is not None:
            out.append(Path(root) / "participants.tsv")
    return out


def read_table(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read a TSV/CSV file (delimiter from the extension, sniffed otherwise).

    Returns
    -------
    header : list of str
    rows : list of list of str
        Rows padded/truncated to the header length.

    Raises
    ------
    InputDataError
        The file cannot be decoded or has no header.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise InputMissingError(f"{path}: cannot be read ({exc}).") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputDataError(f"{path}: empty table; it needs a header row with participant_id.")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        delimiter = "\t"
    elif suffix == ".csv":
        delimiter = ","
    else:
        first = lines[0]
        delimiter = max(("\t", ",", ";"), key=first.count)
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    rows = []
    for row in reader:
        row = [c.strip() for c in row]
        rows.append((row + [""] * len(header))[: len(header)])
    return header, rows


def _find_id_column(header: list[str]) -> int | None:
    lowered = [h.lower() for h in header]
    for name in ID_COLUMNS:
        if name in lowered:
            return lowered.index(name)
    return None


def _strip_sub(value: str) -> str:
    return value[4:] if value.startswith("sub-") else value


def _is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING_VALUES


def _as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def detect_kind(values: Iterable[str], max_classes: int = 10) -> tuple[str, list[Any]]:
    """Detect the target kind of non-missing raw values.

    Returns
    -------
    kind : str
    classes : list
        Sorted classes (ints for integer columns), empty for continuous.

    Raises
    ------
    InputDataError
        Fewer than two distinct values.
    """
    values = list(values)
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise InputDataError(f"only one distinct value ({distinct[0] if distinct else 'none'!r}); "
                             "a target needs at least two.")
    numbers = [_as_number(v) for v in values]
    if all(n is not None for n in numbers):
        nums = sorted({float(n) for n in numbers if n is not None})
        integral = all(n.is_integer() for n in nums)
        if len(nums) == 2:
            return "binary", [int(n) for n in nums] if integral else nums
        if integral and len(nums) <= max_classes and 2 * len(nums) <= len(values):
            return "multiclass", [int(n) for n in nums]
        return "continuous", []
    if len(distinct) == 2:
        return "binary", _control_first(distinct)
    return "multiclass", distinct


#: Text labels that name the reference (negative) group of a binary target.
CONTROL_NAMES = frozenset({"control", "controls", "hc", "healthy", "healthy control", "td",
                           "typically developing", "tdc", "nc", "normal", "con", "ctrl", "no", "negative", "false"})


def _control_first(classes: list[str]) -> list[str]:
    """Order two text classes so that a control-like one is first (negative, logit < 0).

    Sorted order otherwise: e.g. ``["ADHD", "control"]`` becomes
    ``["control", "ADHD"]`` so that ADHD is the positive class and
    sensitivity refers to it.
    """
    controls = [c for c in classes if str(c).strip().lower() in CONTROL_NAMES]
    if len(controls) == 1:
        return controls + [c for c in classes if c not in controls]
    return classes


def load_labels(*candidates: str | Path, target: str, group_column: str | None = None,
                participants: Iterable[str] | None = None, kind: str | None = None,
                max_classes: int = 10) -> Labels:
    """Read target labels (and optional groups) for participants.

    Parameters
    ----------
    *candidates : path
        Tables to try, best first (see :func:`participants_file_candidates`);
        missing files are skipped, the first one with the ``target`` column
        is used.
    target : str
        Column to predict.
    group_column : str, optional
        Column with a site/group label for grouped splits.
    participants : iterable of str, optional
        Participants to label (with or without ``sub-``); others in the file
        are ignored, and listed ones without a row are excluded. Default: all
        rows.
    kind : {"binary", "multiclass", "continuous"}, optional
        Override the detected kind.
    max_classes : int
        Most distinct integer values still read as classes.

    Returns
    -------
    Labels

    Raises
    ------
    InputMissingError
        None of the candidate files exists.
    UsageError
        No file has the ``target`` (or ``group_column``) column; the message
        lists the available columns. Or ``kind`` is invalid for the values.
    InputDataError
        No participant id column, or no usable value remains.
    """
    if kind is not None and kind not in KINDS:
        raise UsageError(f"kind {kind!r}: choose among {', '.join(KINDS)}.")
    path, header, rows = _target_table(candidates, target)
    if group_column is not None and group_column not in header:
        raise UsageError(f"group column {group_column!r} not found in {path}. Available columns: "
                         f"{', '.join(header)}.")
    id_col = _find_id_column(header)
    if id_col is None:
        raise InputDataError(f"{path}: no participant column (expected one of "
                             f"{', '.join(ID_COLUMNS)}); found {', '.join(header)}.")
    raw_values, groups, excluded = _row_values(path, rows, id_col, header.index(target), target,
                                               header.index(group_column) if group_column is not None else None,
                                               group_column, participants)
    if not raw_values:
        raise InputDataError(f"{path}: no participant has a usable {target!r} value "
                             f"({len(excluded)} excluded, e.g. "
                             f"{'; '.join(f'{k}: {v}' for k, v in list(excluded.items())[:3])}).")
    detected, classes = _kind_and_classes(path, target, raw_values, kind, max_classes)
    values: dict[str, Any] = {}
    for pid, value in raw_values.items():
        if detected == "continuous":
            values[pid] = float(value)
        elif classes and isinstance(classes[0], (int, float)) and not isinstance(classes[0], bool):
            number = float(value)
            values[pid] = int(number) if isinstance(classes[0], int) else number
        else:
            values[pid] = value
    return Labels(values, detected, list(classes), groups, excluded, path, target)


def _target_table(candidates: Sequence[str | Path | None], target: str) -> tuple[Path, list[str], list[list[str]]]:
    """The first existing candidate table with the ``target`` column: path, header and rows."""
    existing = [Path(c) for c in candidates if c is not None and Path(c).is_file()]
    if not existing:
        tried = ", ".join(str(c) for c in candidates) or "(no candidate given)"
        raise InputMissingError(f"no participants table found (looked for {tried}). Add a "
                                "participants.tsv to the dataset or pass --phenotype FILE.")
    seen_columns: dict[Path, list[str]] = {}
    for path in existing:
        header, rows = read_table(path)
        seen_columns[path] = header
        if target in header:
            return path, header, rows
    listing = "; ".join(f"{p}: {', '.join(h)}" for p, h in seen_columns.items())
    raise UsageError(f"target column {target!r} not found. Available columns: {listing}. "
                     "Choose one of them with --target, or pass a --phenotype file.")


def _row_values(path: Path, rows: list[list[str]], id_col: int, t_col: int, target: str, g_col: int | None,
                group_column: str | None, participants: Iterable[str] | None
                ) -> tuple[dict[str, str], dict[str, str] | None, dict[str, str]]:
    """Raw target value (and group) per wanted participant, and why the others are excluded."""
    rows_by_id: dict[str, list[list[str]]] = {}
    for row in rows:
        pid = _strip_sub(row[id_col])
        if pid:
            rows_by_id.setdefault(pid, []).append(row)
    numeric_ids: dict[int, str] = {}
    for pid in rows_by_id:
        if pid.isdigit():
            numeric_ids[int(pid)] = pid if int(pid) not in numeric_ids else ""
    wanted = [_strip_sub(str(p)) for p in participants] if participants is not None else list(rows_by_id)
    excluded: dict[str, str] = {}
    raw_values: dict[str, str] = {}
    groups: dict[str, str] | None = {} if g_col is not None else None
    for pid in dict.fromkeys(wanted):
        key = pid if pid in rows_by_id else (numeric_ids.get(int(pid)) if pid.isdigit() else None)
        if not key:
            excluded[pid] = f"no row in {path.name}"
            continue
        entries = rows_by_id[key]
        if len(entries) > 1 and len({r[t_col] for r in entries}) > 1:
            excluded[pid] = f"{len(entries)} conflicting rows in {path.name}"
            continue
        value = entries[0][t_col]
        if _is_missing(value):
            excluded[pid] = f"missing {target!r} value ({value or 'empty'!r})"
            continue
        if g_col is not None and groups is not None:
            group = entries[0][g_col]
            if len({r[g_col] for r in entries}) > 1 or _is_missing(group):
                excluded[pid] = f"missing or conflicting {group_column!r} value"
                continue
            groups[pid] = group
        raw_values[pid] = value
    return raw_values, groups, excluded


def _kind_and_classes(path: Path, target: str, raw_values: dict[str, str], kind: str | None,
                      max_classes: int) -> tuple[str, list[Any]]:
    """The detected kind and classes of the values, or those of the requested ``kind`` when it fits."""
    try:
        detected, classes = detect_kind(raw_values.values(), max_classes=max_classes)
    except InputDataError as exc:
        raise InputDataError(f"{path}: column {target!r}: {exc}") from exc
    if kind is None or kind == detected:
        return detected, classes
    if kind == "continuous":
        if any(_as_number(v) is None for v in raw_values.values()):
            raise UsageError(f"{path}: column {target!r} has non-numeric values; it cannot be continuous.")
        return kind, []
    if kind == "binary" and len(set(raw_values.values())) != 2:
        raise UsageError(f"{path}: column {target!r} has {len(set(raw_values.values()))} distinct "
                         "values; binary needs exactly 2.")
    numbers = [_as_number(v) for v in raw_values.values()]
    if all(n is not None and float(n).is_integer() for n in numbers):
        return kind, sorted({int(float(v)) for v in raw_values.values()})
    return kind, sorted(set(raw_values.values()))


def label_tables(bids_dir: str | Path, *, derivatives: dict[str, str] | None = None, phenotype: str | None = None,
                 skip_validation: bool = False) -> list[Path]:
    """Tables that may hold a target column, in order: ``--phenotype``, the raw then the fMRIPrep ``participants.tsv``.

    ``bids_dir/participants.tsv`` is added last when it is not among them.
    """
    from bids_regionmae.bids.discover import locate_fmriprep
    from bids_regionmae.errors import ValidationError

    try:
        fmriprep_dir, raw_dir = locate_fmriprep(bids_dir, derivatives or None, skip_validation=skip_validation)
    except (InputMissingError, ValidationError) as exc:
        LOGGER.debug("no fMRIPrep dataset located (%s): looking for participants.tsv in bids_dir", exc)
        fmriprep_dir, raw_dir = Path(bids_dir), None
    candidates = participants_file_candidates(fmriprep_dir, raw_dir, phenotype)
    bids_table = Path(bids_dir) / "participants.tsv"
    if bids_table not in candidates:
        candidates.append(bids_table)
    return candidates
