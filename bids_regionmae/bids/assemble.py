"""Assembly of one run: which files of a group of same-entity files feed the model, checked.

:func:`assemble` picks the preprocessed BOLD series in the first preferred
space (:func:`choose_bold`), its brain mask, BOLD reference and confounds
table, checks the files and headers and finds the repetition time
(sidecar, raw dataset, header); it returns a :class:`RunRow` or the reason the
run is skipped (:class:`Skipped`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from bids_regionmae.bids.entities import (
    EXTRA_ENTITIES,
    KIND_BOLD,
    KIND_BOLDREF,
    KIND_CONFOUNDS,
    KIND_MASK,
    RUN_ENTITIES,
    format_extra,
    parse_entities,
    run_key,
)
from bids_regionmae.bids.filters import entities_match, value_matches
from bids_regionmae.bids.index import DatasetIndex, FileEntry
from bids_regionmae.bids.validate import (
    HeaderInfo,
    check_bold_header,
    check_file,
    check_mask_header,
    read_header,
    read_sidecar_tr,
)
from bids_regionmae.errors import InputDataError

__all__ = ["SPACE_REASON", "AssemblyContext", "RunRow", "Skipped", "assemble", "choose_bold", "group_runs",
           "sort_key"]

SPACE_REASON = "space"  # reason class: runs skipped only because of their space


class RunRow(NamedTuple):
    """One usable run as discovery stores it in its cache (JSON: a list in this field order).

    The fields are those of :class:`~bids_regionmae.bids.records.RunRecord`;
    paths are strings here and become :class:`~pathlib.Path` in the record
    (:func:`_record_from_row`).
    """

    subject: str
    task: str
    space: str
    bold: str
    mask: str
    repetition_time: float
    session: str | None
    run: str | None
    res: str | None
    boldref: str | None
    confounds: str | None
    acquisition: str | None
    extra: dict[str, str]


class Skipped(NamedTuple):
    """A run (or file) discovery did not use, and why.

    Attributes
    ----------
    path : str
        The file the problem is about (usually the BOLD series).
    reason : str
        What is wrong and how to fix it.
    """

    path: str
    reason: str


def _res_order(res: str | None) -> tuple[int, float, str]:
    if res == "2":
        return (0, 0.0, "")
    if res is None:
        return (1, 0.0, "")
    try:
        return (2, float(res), res)
    except ValueError:
        return (3, 0.0, res)


class AssemblyContext:
    """Per-call state shared by the run assembly helpers (stat results, raw sidecars)."""

    def __init__(self, index: DatasetIndex, raw_dir: Path | None, validate: bool):
        self.index = index
        self.root = str(index.root)
        self.raw_dir = raw_dir
        self.validate = validate
        self.warnings: list[str] = []
        self._raw_json: dict[Path, list[str]] = {}
        self._stats: dict[str, os.stat_result | None] = {}

    def path(self, entry: FileEntry) -> str:
        return os.path.join(self.root, entry.relpath)

    def stat(self, path: str) -> os.stat_result | None:
        if path not in self._stats:
            try:
                self._stats[path] = os.stat(path)
            except OSError:
                self._stats[path] = None
        return self._stats[path]

    def header(self, path: str) -> HeaderInfo:
        st = self.stat(path)
        cached = self.index.memo_get(path, "hdr", st)
        if cached is not None:
            if "error" in cached:
                raise InputDataError(cached["error"])
            return HeaderInfo.from_dict(cached)
        try:
            info = read_header(path, st)
        except InputDataError as exc:
            self.index.memo_put(path, "hdr", {"error": str(exc)}, st)
            raise
        self.index.memo_put(path, "hdr", info.to_dict(), st)
        return info

    def sidecar_tr(self, path: str) -> tuple[float | None, str | None]:
        st = self.stat(path)
        cached = self.index.memo_get(path, "tr", st)
        if cached is not None:
            return cached[0], cached[1]
        tr, problem = read_sidecar_tr(path)
        self.index.memo_put(path, "tr", [tr, problem], st)
        return tr, problem

    def raw_tr(self, ents: Mapping[str, str]) -> tuple[float | None, Path | None]:
        """RepetitionTime from the raw dataset's sidecars (BIDS inheritance, closest first)."""
        if self.raw_dir is None:
            return None, None
        sub = self.raw_dir / f"sub-{ents['subject']}"
        ses = sub / f"ses-{ents['session']}" if ents.get("session") else None
        dirs = [d for d in ((ses or sub) / "func", ses, sub, self.raw_dir) if d is not None]
        for directory in dirs:
            names = self._raw_json.get(directory)
            if names is None:
                try:
                    names = sorted(n for n in os.listdir(directory) if n.endswith("_bold.json"))
                except OSError:
                    names = []
                self._raw_json[directory] = names
            best: tuple[int, Path] | None = None
            for name in names:
                parsed = parse_entities(name)
                if not parsed or "__unknown__" in parsed or "space" in parsed or "desc" in parsed:
                    continue
                keys = [k for k in parsed if k in RUN_ENTITIES]
                if all(value_matches(ents.get(k), parsed[k], k in ("run", "echo")) for k in keys):
                    if best is None or len(keys) > best[0]:
                        best = (len(keys), directory / name)
            if best is not None:
                tr, _ = self.sidecar_tr(str(best[1]))
                if tr is not None:
                    return tr, best[1]
        return None, None


def group_runs(files: list[FileEntry]) -> dict[tuple, list[FileEntry]]:
    """Files grouped by the entities of their run (``run-1`` == ``run-01``)."""
    groups: dict[tuple, list[FileEntry]] = {}
    for f in files:
        groups.setdefault(run_key(f.entities), []).append(f)
    return groups


def _space_key(f: FileEntry) -> tuple[str | None, str | None, str | None]:
    e = f.entities
    return e.get("space"), e.get("res"), e.get("den")


def choose_bold(bolds: list[FileEntry], prefs: list[tuple[str, str | None]]) -> list[FileEntry]:
    """All BOLD files at the preferred (space, res); more than one means duplicates."""
    for space, res in prefs:
        cands = [b for b in bolds if b.entities.get("space") == space
                 and (res is None or b.entities.get("res") == res)]
        if cands:
            best = min(_res_order(c.entities.get("res")) for c in cands)
            chosen = [c for c in cands if _res_order(c.entities.get("res")) == best]
            dens = sorted({c.entities.get("den") or "" for c in chosen})
            return [c for c in chosen if (c.entities.get("den") or "") == dens[0]]
    return []


def _repetition_time(ctx: AssemblyContext, bold: FileEntry, bold_path: str,
                     bold_info: HeaderInfo | None) -> float | tuple[Skipped, str]:
    """The TR of a run: its sidecar, else the raw dataset's sidecars, else the header (checked against it)."""
    tr: float | None = None
    tr_source = ""
    if bold.sidecar:
        tr, problem = ctx.sidecar_tr(os.path.join(ctx.root, bold.sidecar))
        tr_source = bold.sidecar
        if problem:
            ctx.warnings.append(problem)
    if tr is None:
        tr, raw_path = ctx.raw_tr(bold.entities)
        tr_source = str(raw_path) if raw_path else ""
    if tr is None or ctx.validate:
        try:
            bold_info = bold_info or ctx.header(bold_path)
        except InputDataError as exc:
            return Skipped(bold_path, str(exc)), "header"
        header_tr = bold_info.repetition_time
        if tr is None:
            tr = header_tr
            if tr is not None and bold_info.time_unit_s is None:
                ctx.warnings.append(f"{bold_path}: no RepetitionTime in a sidecar and the header's time "
                                    f"unit is unknown; assuming TR = {tr:g} s.")
        elif header_tr is not None and abs(header_tr - tr) > 0.01 * tr:
            ctx.warnings.append(f"{bold_path}: RepetitionTime {tr:g} s in {tr_source} differs from the "
                                f"header's {header_tr:g} s; using {tr:g} s from the sidecar.")
    if tr is None:
        return Skipped(bold_path, "no RepetitionTime: none in the JSON sidecars and pixdim[4] is 0. "
                       "Add RepetitionTime (seconds) to the sidecar next to the file."), "tr"
    return float(tr)


def assemble(ctx: AssemblyContext, group: list[FileEntry], prefs: list[tuple[str, str | None]],
              space_filters: Mapping[str, Any]) -> RunRow | tuple[Skipped, str]:
    """Pick and check the files of one run: a record row, or (Skipped, reason class)."""
    bolds = [f for f in group if f.kind == KIND_BOLD]
    if not bolds:
        others = ", ".join(sorted({f.kind for f in group}))
        first = min(group, key=lambda f: f.relpath)
        return Skipped(ctx.path(first),
                       f"no desc-preproc_bold series for this run (found only: {others}). fMRIPrep "
                       "may have failed for it, or ran with --level minimal; re-run fMRIPrep."), "missing"
    allowed = [b for b in bolds if entities_match(b.entities, space_filters)]
    chosen = choose_bold(allowed, prefs)
    first_bold = ctx.path(min(bolds, key=lambda f: f.relpath))
    if not chosen:
        found = sorted({b.entities.get("space") or "(native)" for b in bolds})
        wanted = ", ".join(s + (f":res-{r}" if r else "") for s, r in prefs)
        return Skipped(first_bold, f"no preprocessed BOLD in a requested space: found {', '.join(found)}; "
                       f"requested {wanted}" + (" with the bids_filters space/res" if space_filters else "")
                       + ". Re-run fMRIPrep with --output-spaces MNI152NLin6Asym:res-2, or choose "
                       "--space among the MNI152 spaces found."), SPACE_REASON
    if len(chosen) > 1:
        names = ", ".join(c.relpath for c in chosen)
        return Skipped(ctx.path(chosen[0]),
                       f"duplicated run: {names} map to the same entities. Remove or rename one "
                       "(e.g. run-1 vs run-01, or .nii next to .nii.gz)."), "duplicate"
    bold = chosen[0]
    skey = _space_key(bold)
    masks = [f for f in group if f.kind == KIND_MASK and _space_key(f) == skey]
    bold_path = ctx.path(bold)
    if not masks:
        return Skipped(bold_path, "no desc-brain_mask with the same space/res entities next to it. "
                       "fMRIPrep writes one per output space; restore it or re-run fMRIPrep."), "mask"
    if len(masks) > 1:
        return Skipped(bold_path, "duplicated brain masks: "
                       f"{', '.join(m.relpath for m in masks)}. Remove one."), "duplicate"
    mask_path = ctx.path(masks[0])
    boldrefs = sorted((f for f in group if f.kind == KIND_BOLDREF and _space_key(f) == skey),
                      key=lambda f: (f.legacy != bold.legacy, f.relpath))
    confounds = sorted((f for f in group if f.kind == KIND_CONFOUNDS), key=lambda f: (f.rank, f.relpath))

    for entry, path in ((bold, bold_path), (masks[0], mask_path)):
        if entry.symlink or ctx.validate:
            problem = check_file(path, ctx.stat(path))
            if problem:
                return Skipped(bold_path, problem), "file"

    bold_info: HeaderInfo | None = None
    if ctx.validate:
        try:
            bold_info = ctx.header(bold_path)
            mask_info = ctx.header(mask_path)
        except InputDataError as exc:
            return Skipped(bold_path, str(exc)), "header"
        problem = check_bold_header(bold_path, bold_info) or \
            check_mask_header(mask_path, mask_info, bold_path, bold_info)
        if problem:
            return Skipped(bold_path, problem), "header"

    tr = _repetition_time(ctx, bold, bold_path, bold_info)
    if isinstance(tr, tuple):
        return tr

    ents = bold.entities
    extra = {name: ents[name] for name in EXTRA_ENTITIES if ents.get(name)}
    return RunRow(subject=ents["subject"], task=ents["task"], space=ents["space"], bold=bold_path, mask=mask_path,
                  repetition_time=float(tr), session=ents.get("session"), run=ents.get("run"), res=ents.get("res"),
                  boldref=ctx.path(boldrefs[0]) if boldrefs else None,
                  confounds=ctx.path(confounds[0]) if confounds else None, acquisition=format_extra(ents),
                  extra=extra)


def sort_key(row: RunRow) -> tuple:
    """Order of runs: participant, session, task, other entities, run number."""
    run = row.run
    return (row.subject, row.session or "", row.task, row.acquisition or "", int(run) if run and run.isdigit() else 0,
            run or "")


