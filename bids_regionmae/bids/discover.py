"""Discovery of fMRIPrep BOLD runs: which files feed the model.

Entry points: :func:`locate_fmriprep` (where the fMRIPrep dataset is) and
:func:`discover_runs` (one :class:`~bids_regionmae.bids.records.RunRecord`
per participant/session/task/run, plus a :class:`DiscoveryReport` of what
was skipped and why).

How it works
------------
1. :func:`locate_fmriprep` accepts an fMRIPrep derivatives dataset directly,
   or a raw BIDS dataset together with ``derivatives={"fmriprep": PATH}`` or
   with ``derivatives/fmriprep`` inside it.
2. :func:`bids_regionmae.bids.index.build_index` lists the functional files.
   The default indexer is an :func:`os.scandir` walk of ``sub-*/[ses-*/]func``
   that parses names with pybids' own entity regexes; it was chosen over a
   pybids :class:`~bids.layout.BIDSLayout` because the latter misses the
   cold-start target by an order of magnitude on 1,000 participants (see
   ``benchmarks/bench_discovery.py``); ``backend="pybids"`` runs the real
   layout (ignore list, ``database_path`` in the work directory) instead.
   The index is cached in ``work_dir`` and rebuilt when the tree changes.
3. Runs are grouped by their entities (``run-1`` == ``run-01``) and filtered
   with fMRIPrep's semantics (below). For each run the preprocessed BOLD
   series is taken in the first space of ``InputConfig.space`` that has one
   (a ``"Space:res-2"`` item pins the resolution; otherwise ``res-2`` is
   preferred, then no ``res-``, then the other resolutions in increasing
   order), together with the brain mask and BOLD reference of the same
   space/resolution and the confounds table (``desc-confounds_timeseries``,
   else ``desc-confounds_regressors`` or the 1.x ``_bold_confounds.tsv``).
4. Per-run problems skip the run and are reported; whole-dataset problems
   raise (see :mod:`bids_regionmae.bids.validate` for the list of checks).

Filters
-------
``participant_label``, ``session_label``, ``task`` and ``run`` select runs
by label (runs compare as integers). ``bids_filters["bold"]`` follows
fMRIPrep's ``--bids-filter-file``: each entity (pybids long names such as
``session``, ``acquisition``, ``run``, ``echo``, ``space``, ``res``; the
short keys ``ses``/``acq``/... are accepted too) maps to a value, a list of
values, ``null`` (the entity must be absent) or ``"*"`` (any value, but
present). ``datatype``, ``suffix``, ``extension`` and ``desc`` are ignored
(discovery always selects ``desc-preproc_bold``); other queries of the
filter file (``t1w``, ``fmap`` ...) are for fMRIPrep and are ignored.

Errors
------
* missing directories, no fMRIPrep dataset found, no preprocessed BOLD at all
  (fMRIPrep ``--level minimal`` / ``--anat-only``):
  :class:`~bids_regionmae.errors.InputMissingError` (exit 66);
* invalid ``dataset_description.json``, or no usable run left after the
  per-run checks: :class:`~bids_regionmae.errors.ValidationError` (exit 16);
* filters that match nothing (including a requested participant that does
  not exist, or runs only in other spaces):
  :class:`~bids_regionmae.errors.NoMatchError` (exit 18), listing the
  participants, sessions, tasks, runs and spaces that exist;
* an unsupported ``space`` or unknown filter entity:
  :class:`~bids_regionmae.errors.UsageError` (exit 64).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_regionmae.bids.assemble import (
    SPACE_REASON,
    AssemblyContext,
    RunRow,
    Skipped,
    assemble,
    group_runs,
    sort_key,
)
from bids_regionmae.bids.entities import KIND_BOLD, RUN_ENTITIES
from bids_regionmae.bids.filters import (
    entities_match,
    format_filters,
    normalize_bold_filters,
    parse_space_specs,
)
from bids_regionmae.bids.index import DatasetIndex, FileEntry, build_index, load_results, save_results
from bids_regionmae.bids.records import DiscoveryReport, DiscoveryResult, RunRecord
from bids_regionmae.bids.validate import check_dataset_description, is_derivative_description
from bids_regionmae.errors import (
    InputMissingError,
    NoMatchError,
    UsageError,
    ValidationError,
)

if TYPE_CHECKING:
    from bids_regionmae.config import InputConfig

# --------------------------------------------------------------------------- locate


def _read_description(root: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = root / "dataset_description.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: not valid JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"{path}: must hold a JSON object, found {type(data).__name__}"
    return data, None


def _looks_like_fmriprep(root: Path) -> bool:
    """fMRIPrep output without a description (1.0/1.1): per-participant HTML reports."""
    try:
        with os.scandir(root) as it:
            return any(e.name.startswith("sub-") and e.name.endswith(".html") for e in it)
    except OSError:
        return False


def _raw_parent(fmriprep_dir: Path) -> Path | None:
    parent = fmriprep_dir.parent
    if parent.name == "derivatives" and (parent.parent / "dataset_description.json").is_file():
        return parent.parent
    return None


def _nested_fmriprep(bids_dir: Path) -> Path | None:
    deriv = bids_dir / "derivatives"
    if (deriv / "fmriprep").is_dir():
        return deriv / "fmriprep"
    if deriv.is_dir():
        found = sorted(p for p in deriv.iterdir() if p.is_dir() and p.name.lower().startswith("fmriprep"))
        if len(found) == 1:
            return found[0]
    return None


def locate_fmriprep(bids_dir: str | Path, derivatives: Mapping[str, str] | None = None, *,
                    skip_validation: bool = False) -> tuple[Path, Path | None]:
    """Find the fMRIPrep derivatives dataset (and the raw dataset, when there is one).

    Parameters
    ----------
    bids_dir : path
        The BIDS-App ``bids_dir``: an fMRIPrep derivatives dataset, or a raw
        BIDS dataset (with ``derivatives/fmriprep`` inside it, or with
        ``derivatives`` given).
    derivatives : mapping, optional
        ``--derivatives name=PATH`` pairs; the entry named ``fmriprep`` (or the
        only entry) is used. Relative paths are resolved against the current
        directory, then against ``bids_dir``.
    skip_validation : bool
        Accept an unreadable ``dataset_description.json`` of ``bids_dir``.

    Returns
    -------
    fmriprep_dir : Path
        Absolute path of the fMRIPrep dataset.
    raw_dir : Path or None
        Absolute path of the raw dataset, if known (``bids_dir`` when it is
        raw, or the dataset above ``<raw>/derivatives/fmriprep``).

    Raises
    ------
    InputMissingError
        A directory does not exist, or no fMRIPrep dataset is found (the
        message explains ``--derivatives fmriprep=PATH``).
    UsageError
        Several derivatives given and none is named ``fmriprep``.
    ValidationError
        ``bids_dir``'s ``dataset_description.json`` is not valid JSON and no
        fMRIPrep dataset can be found without it.
    """
    bids_dir = Path(os.path.abspath(os.path.expanduser(str(bids_dir))))
    if not bids_dir.exists():
        raise InputMissingError(f"bids_dir {bids_dir}: no such directory. Give the fMRIPrep "
                                "derivatives directory, or the raw BIDS dataset with "
                                "--derivatives fmriprep=PATH.")
    if not bids_dir.is_dir():
        raise InputMissingError(f"bids_dir {bids_dir}: is a file, expected a dataset directory.")
    description, desc_error = _read_description(bids_dir)
    bids_is_derivative = description is not None and is_derivative_description(description)
    if derivatives:
        items = dict(derivatives)
        lowered = {k.lower(): k for k in items}
        if "fmriprep" in lowered:
            name = lowered["fmriprep"]
        elif len(items) == 1:
            name = next(iter(items))
        else:
            raise UsageError(f"--derivatives: several datasets given ({', '.join(items)}) and none is "
                             "named 'fmriprep'. Use --derivatives fmriprep=PATH.")
        given = Path(os.path.expanduser(str(items[name])))
        candidates = [given] if given.is_absolute() else [Path.cwd() / given, bids_dir / given]
        for candidate in candidates:
            if candidate.is_dir():
                fmriprep_dir = Path(os.path.abspath(candidate))
                raw = _raw_parent(bids_dir) if bids_is_derivative else bids_dir
                return fmriprep_dir, raw
        raise InputMissingError(f"--derivatives {name}={items[name]}: no such directory "
                                f"(looked at {', '.join(str(c) for c in candidates)}).")
    if bids_is_derivative or (description is None and _looks_like_fmriprep(bids_dir)):
        # fMRIPrep 1.0/1.1 wrote no description; a broken one is reported by validation later
        return bids_dir, _raw_parent(bids_dir)
    nested = _nested_fmriprep(bids_dir)
    if nested is not None:
        return nested, bids_dir
    if desc_error is not None and not skip_validation:
        raise ValidationError(f"{desc_error}. Fix the file or pass --skip-bids-validation.")
    raise InputMissingError(
        f"bids_dir {bids_dir}: not an fMRIPrep derivatives dataset (its dataset_description.json "
        "does not declare DatasetType 'derivative' or GeneratedBy) and it has no "
        "derivatives/fmriprep directory. Pass the fMRIPrep output directory as bids_dir, or the "
        "raw dataset with --derivatives fmriprep=PATH.")


def list_participants(root: str | Path) -> list[str]:
    """Participant labels (no ``sub-``) of the ``sub-*`` directories of a dataset.

    A directory scan: pybids' ``get_subjects()`` needs a full index (seconds
    to minutes on large datasets) for the same answer.
    """
    with os.scandir(root) as it:
        return sorted(e.name[4:] for e in it if e.name.startswith("sub-") and e.is_dir())


# --------------------------------------------------------------------------- discovery


def _format_labels(values: Iterable[str], limit: int = 12) -> str:
    values = list(values)
    if not values:
        return "(none)"
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _available(index: DatasetIndex) -> dict[str, list[str]]:
    sessions, tasks, runs, spaces = set(), set(), set(), set()
    for f in index.files:
        if f.kind != KIND_BOLD:
            continue
        e = f.entities
        if e.get("session"):
            sessions.add(e["session"])
        tasks.add(e["task"])
        if e.get("run"):
            runs.add(e["run"])
        spaces.add(e.get("space") or "(native)")
    return {"participants": list(index.subjects), "sessions": sorted(sessions),
            "tasks": sorted(tasks), "runs": sorted(runs, key=lambda r: (len(r), r)),
            "spaces": sorted(spaces)}


def _describe_available(root: Path, available: dict[str, list[str]]) -> str:
    return (f"Available in {root}:\n"
            f"  participants ({len(available['participants'])}): "
            f"{_format_labels(available['participants'])}\n"
            f"  sessions: {_format_labels(available['sessions'])}\n"
            f"  tasks: {_format_labels(available['tasks'])}\n"
            f"  runs: {_format_labels(available['runs'])}\n"
            f"  spaces: {_format_labels(available['spaces'])}")


def discover_runs(bids_dir: str | Path, config: InputConfig, work_dir: str | Path | None = None, *,
                  backend: str = "fast") -> DiscoveryResult:
    """Find the usable fMRIPrep BOLD runs selected by ``config``.

    Parameters
    ----------
    bids_dir : path
        fMRIPrep derivatives, or a raw dataset (see :func:`locate_fmriprep`).
    config : InputConfig
        Labels, spaces, ``bids_filters``, ``derivatives`` and
        ``skip_bids_validation`` (:class:`bids_regionmae.config.InputConfig`).
    work_dir : path, optional
        Where the discovery cache lives (``<work_dir>/bids_index``); None
        disables it.
    backend : {"fast", "pybids"}
        Indexer (see :mod:`bids_regionmae.bids.index`).

    Returns
    -------
    DiscoveryResult

    Raises
    ------
    InputMissingError, ValidationError, NoMatchError, UsageError
        See the module docstring.
    """
    start = time.perf_counter()
    validate = not config.skip_bids_validation
    prefs = parse_space_specs(config.space)
    bold_filters, notes = normalize_bold_filters(config.bids_filters)
    fmriprep_dir, raw_dir = locate_fmriprep(bids_dir, config.derivatives, skip_validation=not validate)
    warnings = list(notes)
    description, desc_warnings = check_dataset_description(fmriprep_dir, "fMRIPrep derivatives",
                                                           required=validate)
    warnings += desc_warnings
    generated = description.get("GeneratedBy") or []
    names = [str(g.get("Name", "")) for g in generated if isinstance(g, dict)]
    if names and not any("fmriprep" in n.lower() for n in names):
        warnings.append(f"{fmriprep_dir}: GeneratedBy names {', '.join(names)}, not fMRIPrep; "
                        "reading it as fMRIPrep-style output anyway.")
    if raw_dir is not None and raw_dir != fmriprep_dir:
        warnings += check_dataset_description(raw_dir, "raw BIDS", required=validate)[1]

    label_filters: dict[str, Any] = {}
    if config.participant_label:
        label_filters["subject"] = list(config.participant_label)
    if config.session_label:
        label_filters["session"] = list(config.session_label)
    if config.task:
        label_filters["task"] = list(config.task)
    if config.run:
        label_filters["run"] = list(config.run)

    # Warm path: a stored result for these options, same tree, same files -> no index needed.
    key = _result_key(prefs, bold_filters, label_filters, validate, raw_dir)
    results = load_results(work_dir, fmriprep_dir, backend)
    payload = results.get(key)
    cache_status = "hit"
    if payload is None or not _deps_unchanged(payload["deps"]):
        search_spaces = tuple(dict.fromkeys(s for s, _ in prefs))
        index = build_index(fmriprep_dir, work_dir, backend=backend, spaces=search_spaces)
        cache_status = "rebuilt" if payload is not None else index.cache_status
        payload = _discover(index, fmriprep_dir, raw_dir, prefs, bold_filters, label_filters, validate)
        index.save()
        results.pop(key, None)
        results[key] = payload
        save_results(work_dir, index, results)

    dirs: dict[str, Path] = {}
    runs = [_record_from_row(RunRow(*row), dirs) for row in payload["runs"]]
    report = DiscoveryReport(skipped=[Skipped(p, r) for p, r in payload["skipped"]],
                             warnings=warnings + payload["warnings"], available=payload["available"],
                             cache=cache_status, backend=backend, n_runs=len(runs))
    report.seconds = time.perf_counter() - start
    participants = sorted({r.subject for r in runs})
    return DiscoveryResult(runs, report.skipped, fmriprep_dir, raw_dir, participants, report)


def _result_key(prefs, bold_filters, label_filters, validate, raw_dir) -> str:
    text = json.dumps([prefs, bold_filters, label_filters, validate, str(raw_dir)], sort_keys=True,
                      default=lambda o: f"<{type(o).__name__}:{getattr(o, 'name', o)}>")
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def _deps_unchanged(deps: Mapping[str, Any]) -> bool:
    """True when every file a cached result read still has the same size and mtime."""
    for path, stamp in deps.items():
        try:
            st = os.stat(path)
        except OSError:
            if stamp is not None:
                return False
            continue
        if stamp is None or st.st_size != stamp[0] or st.st_mtime_ns != stamp[1]:
            return False
    return True


_PATH_FIELDS = frozenset({"bold", "mask", "boldref", "confounds"})


def _record_from_row(row: RunRow, dirs: dict[str, Path]) -> RunRecord:
    """Rebuild a cached record; ``dirs`` caches directory Paths (joining a name is
    much cheaper than parsing a whole absolute path, which matters for thousands of runs)."""
    values: dict[str, Any] = row._asdict()
    for name in _PATH_FIELDS:
        value = values[name]
        if value is not None:
            head, tail = os.path.split(value)
            parent = dirs.get(head)
            if parent is None:
                parent = dirs[head] = Path(head)
            values[name] = parent / tail
    return RunRecord(**values)


def _discover(index: DatasetIndex, fmriprep_dir: Path, raw_dir: Path | None,
              prefs: list[tuple[str, str | None]], bold_filters: dict[str, Any],
              label_filters: dict[str, Any], validate: bool) -> dict[str, Any]:
    """Select and check runs; return the JSON-able payload that the cache stores."""
    available = _available(index)
    if not index.subjects:
        raise InputMissingError(f"{fmriprep_dir}: no sub-* directories. Is this the fMRIPrep output "
                                "directory? Pass it as bids_dir or with --derivatives fmriprep=PATH.")
    if not any(f.kind == KIND_BOLD for f in index.files):
        what = ("its func/ folders hold no desc-preproc_bold series: fMRIPrep was probably run with "
                "--level minimal (or resampling), which writes only BOLD references and transforms"
                if index.n_func_files else "it has no func/ folders: fMRIPrep was run with --anat-only "
                "or on a dataset without BOLD")
        raise InputMissingError(f"{fmriprep_dir}: {what}. Re-run fMRIPrep with --level full (the "
                                "default) and --output-spaces MNI152NLin6Asym:res-2.")
    if "subject" in label_filters:
        known = set(index.subjects)
        missing = [p for p in label_filters["subject"] if p not in known]
        if missing:
            raise NoMatchError(f"participant label(s) {', '.join(missing)} not found in {fmriprep_dir}.\n"
                               + _describe_available(fmriprep_dir, available))
    run_filters = {k: v for k, v in bold_filters.items() if k in RUN_ENTITIES}
    space_filters = {k: v for k, v in bold_filters.items() if k not in RUN_ENTITIES}

    selected: list[tuple[tuple, list[FileEntry]]] = []
    for key, group in group_runs(index.files).items():
        ents = dict(zip(RUN_ENTITIES, (group[0].entities.get(n) for n in RUN_ENTITIES), strict=True))
        if entities_match(ents, label_filters) and entities_match(ents, run_filters):
            selected.append((key, group))
    if not selected:
        given = {**label_filters, **bold_filters}
        raise NoMatchError(f"no BOLD run matches the filters ({format_filters(given)}).\n"
                           + _describe_available(fmriprep_dir, available)
                           + "\nLabels are accepted with or without their sub-/ses-/task-/run- prefix.")

    echo = RUN_ENTITIES.index("echo")
    combined = {key for key, group in selected
                if key[echo] is None and any(f.kind == KIND_BOLD for f in group)}
    ctx = AssemblyContext(index, raw_dir, validate)
    runs: list[RunRow] = []
    skipped: list[Skipped] = []
    reasons: dict[str, int] = {}
    echo_skipped = 0
    for key, group in sorted(selected, key=lambda kg: tuple(str(v) for v in kg[0])):
        if key[echo] is not None and key[:echo] + (None,) + key[echo + 1:] in combined:
            echo_skipped += 1
            continue
        result = assemble(ctx, group, prefs, space_filters)
        if isinstance(result, RunRow):
            runs.append(result)
        else:
            skipped.append(result[0])
            reasons[result[1]] = reasons.get(result[1], 0) + 1
    warnings = list(ctx.warnings)
    if echo_skipped:
        warnings.append(f"{echo_skipped} per-echo series ignored: the optimally combined "
                        "series of the same run is used.")
    runs.sort(key=sort_key)
    if not runs:
        details = "\n".join(f"  {s.path}: {s.reason}" for s in skipped[:10])
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        if set(reasons) == {SPACE_REASON}:
            raise NoMatchError("no selected run has a preprocessed BOLD series in the requested "
                               f"space(s).\n{details}{more}\n" + _describe_available(fmriprep_dir, available))
        raise ValidationError(f"none of the {len(selected)} selected run(s) is usable:\n{details}{more}")
    spaces_used = sorted({r.space for r in runs})
    if len(spaces_used) > 1:
        warnings.append(f"runs come from several spaces ({', '.join(spaces_used)}); each is "
                        "resampled to the model grid by its affine.")
    n_noconf = sum(r.confounds is None for r in runs)
    if n_noconf:
        warnings.append(f"{n_noconf} run(s) have no confounds table.")
    deps = {path: (None if st is None else [st.st_size, st.st_mtime_ns])
            for path, st in ctx._stats.items()}
    return {"runs": runs, "skipped": [list(s) for s in skipped],
            "warnings": warnings, "available": available, "deps": deps}


