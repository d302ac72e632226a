"""Index of the functional files of an fMRIPrep dataset, with a cache in the work directory.

Two indexers produce the same :class:`DatasetIndex`:

``"fast"`` (default)
    Walks only ``sub-*/[ses-*/]func`` directories with :func:`os.scandir`
    (everything else - ``anat``, ``figures``, ``log``, reports, surfaces,
    transforms - is never listed) and parses candidate names with pybids'
    entity regexes (:mod:`bids_regionmae.bids.entities`). Measured with
    ``benchmarks/bench_discovery.py`` on 1,000 participants x 2 runs of
    cluttered fMRIPrep output (68,000 files), on a shared 2-core machine:
    cold discovery 1.7 s CPU (4.3 s wall under load), warm 0.1 s CPU (0.3 s
    wall); the pybids index below, with its ignore list, took 29 s CPU (71 s
    wall), and a plain ``BIDSLayout`` did not finish within 600 s (16 s CPU
    for 100 participants).
``"pybids"``
    A real :class:`bids.layout.BIDSLayout` (``validate=False``,
    ``config=["bids", "derivatives"]``) with a
    :class:`bids.layout.BIDSLayoutIndexer` using :data:`IGNORE_PATTERNS` plus
    the unselected spaces and ``index_metadata=False``, stored in the work
    directory through ``database_path``; entities are read back in bulk
    from pybids' ``Tag`` table. Kept for cross-checking (the tests assert
    both give the same runs) and for comparison in the benchmark.

Caching (both indexers): the fingerprint of the tree is the ``st_mtime_ns``
of the root, every ``sub-*`` and ``ses-*`` directory and every ``func``
directory; adding, removing or renaming a participant, session or file
changes it and triggers a rebuild. Per-file results (NIfTI header summaries,
sidecar repetition times) are memoised by path, size and modification time,
so files rewritten in place are re-read and unchanged ones are not, even
after a rebuild. Two JSON files per dataset live under
``<work_dir>/bids_index/`` (written atomically): the index with the memo,
and the finished discovery results per option set together with the size
and mtime of every file they read (:func:`load_results`,
:func:`save_results`); the warm path reads only the latter, checks the
fingerprint and those files, and imports neither pybids nor nibabel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_regionmae.bids.entities import (
    KIND_BOLD,
    RUN_ENTITIES,
    SPACE_ENTITIES,
    classify,
    split_extension,
)

CACHE_VERSION = 1

#: Regexes (matched against ``/``-prefixed paths relative to the dataset root,
#: as pybids does) of what the pybids indexer skips in an fMRIPrep dataset.
IGNORE_PATTERNS: tuple[str, ...] = (
    r"/\.",                                  # .git, .datalad, hidden files
    r"^/(code|sourcedata|logs?|derivatives|figures)(/|$)",
    r"/(anat|figures|log|fmap|dwi|perf|xfm|surf)(/|$)",
    r"\.(html|svg|png|h5|gii|txt|toml|md|csv|dtseries\.nii|dscalar\.nii)$",
    r"_(dseg|probseg)\.",
    r"_xfm\.",
)


@dataclass
class FileEntry:
    """One candidate file of the index.

    Attributes
    ----------
    relpath : str
        Path relative to the dataset root, with ``/`` separators.
    kind : str
        ``bold``, ``mask``, ``boldref`` or ``confounds``.
    entities : dict
        pybids entity names to labels (see :func:`~bids_regionmae.bids.entities.parse_entities`).
    legacy : bool
        fMRIPrep 1.0-1.3 naming.
    rank : int
        Preference among alternatives (confounds flavours).
    symlink : bool
        The directory entry is a symbolic link.
    sidecar : str or None
        Relative path of the JSON sidecar next to a BOLD file, if present.
    """

    relpath: str
    kind: str
    entities: dict[str, str]
    legacy: bool = False
    rank: int = 0
    symlink: bool = False
    sidecar: str | None = None

    def to_list(self) -> list[Any]:
        """Compact JSON form."""
        return [self.relpath, self.kind, self.entities, int(self.legacy), self.rank,
                int(self.symlink), self.sidecar]

    @classmethod
    def from_list(cls, row: list[Any]) -> FileEntry:
        """Inverse of :meth:`to_list`."""
        return cls(row[0], row[1], row[2], bool(row[3]), row[4], bool(row[5]), row[6])


@dataclass
class DatasetIndex:
    """Functional files of one fMRIPrep dataset and what is known about them.

    Attributes
    ----------
    root : Path
        Dataset root.
    files : list of FileEntry
        Candidate BOLD/mask/boldref/confounds files.
    subjects : list of str
        Labels of all ``sub-*`` directories (not pybids' slow ``get_subjects``).
    n_func_files : int
        Number of entries seen in ``func`` directories (tells fMRIPrep
        ``--level minimal`` output from an empty dataset).
    fingerprint : dict
        Relative directory path -> ``st_mtime_ns``.
    memo : dict
        Absolute file path -> ``[size, mtime_ns, payload]`` for header summaries
        and sidecar values.
    backend : str
        ``"fast"`` or ``"pybids"``.
    cache_status : str
        ``"off"`` (no work dir), ``"miss"``, ``"hit"`` or ``"rebuilt"``.
    """

    root: Path
    files: list[FileEntry]
    subjects: list[str]
    n_func_files: int
    fingerprint: dict[str, int]
    memo: dict[str, list[Any]] = field(default_factory=dict)
    backend: str = "fast"
    cache_status: str = "off"
    cache_path: Path | None = None
    memo_dirty: bool = False
    spaces: tuple[str, ...] = ()

    def memo_get(self, path: str, tag: str, st: os.stat_result | None) -> Any:
        """Memoised value ``tag`` for ``path`` if the file is unchanged since, else None.

        Parameters
        ----------
        path : str
            Absolute file path.
        tag : str
            What is memoised (``"hdr"``, ``"tr"``).
        st : os.stat_result or None
            Current ``os.stat(path)``; None (file missing) never matches.
        """
        entry = self.memo.get(f"{tag}:{path}")
        if entry is None or st is None:
            return None
        if entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        return None

    def memo_put(self, path: str, tag: str, payload: Any, st: os.stat_result | None) -> None:
        """Remember ``payload`` for the version of ``path`` described by ``st``."""
        if st is None:
            return
        self.memo[f"{tag}:{path}"] = [st.st_size, st.st_mtime_ns, payload]
        self.memo_dirty = True

    def save(self) -> None:
        """Write the cache (if there is a cache path and something changed)."""
        if self.cache_path is None or (self.cache_status == "hit" and not self.memo_dirty):
            return
        data = {
            "version": CACHE_VERSION, "root": str(self.root), "backend": self.backend,
            "fingerprint": self.fingerprint, "subjects": self.subjects,
            "n_func_files": self.n_func_files, "files": [f.to_list() for f in self.files],
            "memo": self.memo, "spaces": list(self.spaces),
        }
        if _write_json(self.cache_path, data):
            self.memo_dirty = False


def _write_json(path: Path, data: Any) -> bool:
    """Write JSON atomically (temporary file + rename); False if the directory is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, separators=(",", ":"))  # dumps uses the C encoder, dump does not
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fobj:
            fobj.write(text)
        os.replace(tmp, path)
    except OSError:
        return False  # the cache is an optimisation; an unwritable work dir is not an error
    return True


def load_results(work_dir: str | Path | None, root: str | Path, backend: str) -> dict[str, Any]:
    """Cached discovery results of ``root`` that are still valid for the directory tree.

    Returns
    -------
    dict
        Result key -> payload (see :func:`~bids_regionmae.bids.discover.discover_runs`);
        empty when there is no cache or the tree's fingerprint changed.
    """
    if work_dir is None:
        return {}
    root = Path(os.path.abspath(root))
    data = _load_cache(cache_file(work_dir, root, backend).with_suffix(".results.json"), root, backend)
    if data is None or not _fingerprint_matches(root, data["fingerprint"]):
        return {}
    return data.get("results", {})


def save_results(work_dir: str | Path | None, index: DatasetIndex, results: dict[str, Any],
                 keep: int = 8) -> None:
    """Store discovery results (the last ``keep`` keys) with the index's fingerprint."""
    if work_dir is None:
        return
    while len(results) > keep:
        results.pop(next(iter(results)))
    data = {"version": CACHE_VERSION, "root": str(index.root), "backend": index.backend,
            "fingerprint": index.fingerprint, "results": results}
    _write_json(cache_file(work_dir, index.root, index.backend).with_suffix(".results.json"), data)


def cache_file(work_dir: str | Path, root: str | Path, backend: str = "fast") -> Path:
    """Cache file of the index of ``root`` inside ``work_dir``."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return Path(work_dir) / "bids_index" / f"{backend}-{digest[:16]}.json"


def fingerprint(root: str | Path) -> dict[str, int]:
    """Modification times of the root, ``sub-*``, ``ses-*`` and ``func`` directories.

    Returns
    -------
    dict
        Relative path (``"."``, ``"sub-01"``, ``"sub-01/ses-1/func"``) -> ``st_mtime_ns``.
    """
    return _walk(Path(root), listing=False)[3]


def _walk(root: Path, listing: bool = True):
    """Scan ``sub-*/[ses-*/]func``; return (files, subjects, n_func, fingerprint)."""
    fp = {".": os.stat(root).st_mtime_ns}
    files: list[FileEntry] = []
    subjects: list[str] = []
    n_func = 0
    func_dirs: list[tuple[str, str]] = []
    with os.scandir(root) as it:
        subs = sorted((e for e in it if e.name.startswith("sub-") and e.is_dir()), key=lambda e: e.name)
    for sub in subs:
        subjects.append(sub.name[4:])
        fp[sub.name] = sub.stat().st_mtime_ns
        with os.scandir(sub.path) as it:
            children = sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
        for child in children:
            if child.name == "func":
                func_dirs.append((f"{sub.name}/func", child.path))
            elif child.name.startswith("ses-"):
                rel = f"{sub.name}/{child.name}"
                fp[rel] = child.stat().st_mtime_ns
                func = os.path.join(child.path, "func")
                if os.path.isdir(func):
                    func_dirs.append((f"{rel}/func", func))
    for rel, path in func_dirs:
        fp[rel] = os.stat(path).st_mtime_ns
        if not listing:
            continue
        with os.scandir(path) as it:
            entries = list(it)
        n_func += len(entries)
        names = {e.name for e in entries}
        for entry in sorted(entries, key=lambda e: e.name):
            parsed = classify(entry.name)
            if parsed is None:
                continue
            sidecar = None
            if parsed.kind == KIND_BOLD:
                side = split_extension(entry.name)[0] + ".json"
                sidecar = f"{rel}/{side}" if side in names else None
            files.append(FileEntry(f"{rel}/{entry.name}", parsed.kind, parsed.entities, parsed.legacy,
                                   parsed.rank, entry.is_symlink(), sidecar))
    return files, subjects, n_func, fp


def _load_cache(path: Path, root: Path, backend: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fobj:
            data = json.load(fobj)
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("version") != CACHE_VERSION
            or data.get("root") != str(root) or data.get("backend") != backend):
        return None
    return data


def _fingerprint_matches(root: Path, stored: dict[str, int]) -> bool:
    for rel, mtime in stored.items():
        try:
            if os.stat(root / rel).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def build_index(root: str | Path, work_dir: str | Path | None = None, backend: str = "fast",
                spaces: tuple[str, ...] | None = None) -> DatasetIndex:
    """Index the functional files of an fMRIPrep dataset, using the cache when valid.

    Parameters
    ----------
    root : path
        fMRIPrep dataset root.
    work_dir : path, optional
        Where the cache lives; None disables caching.
    backend : {"fast", "pybids"}
        Indexer (see the module docstring).
    spaces : tuple of str, optional
        Only for ``backend="pybids"``: spaces to keep in the layout (others are
        added to the ignore list). The fast index always keeps every space so
        that changing ``--space`` does not invalidate the cache.

    Returns
    -------
    DatasetIndex
    """
    root = Path(os.path.abspath(root))
    if backend not in ("fast", "pybids"):
        raise ValueError(f"backend must be 'fast' or 'pybids', got {backend!r}")
    path = cache_file(work_dir, root, backend) if work_dir is not None else None
    memo: dict[str, list[Any]] = {}
    status = "off"
    spaces = tuple(spaces or ())
    if path is not None:
        data = _load_cache(path, root, backend)
        status = "miss"
        if data is not None:
            memo = data.get("memo", {})
            status = "rebuilt"
            if _fingerprint_matches(root, data["fingerprint"]):
                if backend == "fast":
                    return DatasetIndex(root, [FileEntry.from_list(r) for r in data["files"]],
                                        data["subjects"], data["n_func_files"], data["fingerprint"],
                                        memo, backend, "hit", path)
                if data.get("spaces") == list(spaces):
                    status = "hit"
    if backend == "fast":
        files, subjects, n_func, fp = _walk(root)
    else:
        files, subjects, n_func, fp = _pybids_walk(root, path, spaces, reset=status != "hit")
    index = DatasetIndex(root, files, subjects, n_func, fp, memo, backend, status, path,
                         memo_dirty=path is not None and status != "hit")
    index.spaces = spaces
    return index


def pybids_ignore(spaces: tuple[str, ...] | None = None) -> list[re.Pattern[str]]:
    """Compiled ignore list for :class:`bids.layout.BIDSLayoutIndexer`.

    Parameters
    ----------
    spaces : tuple of str, optional
        Spaces to keep; files with any other ``space-`` entity are ignored.
    """
    patterns = [re.compile(p) for p in IGNORE_PATTERNS]
    if spaces:
        keep = "|".join(re.escape(s) for s in spaces)
        patterns.append(re.compile(rf"_space-(?!(?:{keep})[_.])[a-zA-Z0-9+]+[_.]"))
    return patterns


def _pybids_walk(root: Path, cache_path: Path | None, spaces: tuple[str, ...] | None, reset: bool):
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    db = None
    if cache_path is not None:
        db = cache_path.with_suffix(".sqlite")
        db.mkdir(parents=True, exist_ok=True)
    indexer = BIDSLayoutIndexer(validate=False, ignore=pybids_ignore(spaces), index_metadata=False)
    layout = BIDSLayout(root, validate=False, derivatives=False, config=["bids", "derivatives"],
                        indexer=indexer, database_path=db, reset_database=reset)
    # One bulk read of the entity table pybids just built (BIDSFile.get_entities() per file
    # costs a database query each: minutes for 1,000 participants).
    from bids.layout.models import Tag

    tags: dict[str, dict[str, str]] = {}
    query = layout.connection_manager.session.query(Tag.file_path, Tag.entity_name, Tag._value)
    for file_path, entity, value in query:
        tags.setdefault(file_path, {})[entity] = value
    keep = set(RUN_ENTITIES) | set(SPACE_ENTITIES) | {"desc", "suffix", "extension"}
    func = {p: e for p, e in tags.items() if e.get("datatype") == "func"}
    all_names = {os.path.basename(p) for p in func}
    files: list[FileEntry] = []
    for file_path, entities in func.items():
        name = os.path.basename(file_path)
        parsed = classify(name)  # fMRIPrep naming rules (kind, legacy) on top of pybids' entities
        if parsed is None:
            continue
        ents = {k: str(v) for k, v in entities.items() if k in keep}
        rel = Path(os.path.relpath(file_path, layout.root)).as_posix()
        sidecar = None
        if parsed.kind == KIND_BOLD:
            side = split_extension(name)[0] + ".json"
            if side in all_names:
                sidecar = rel[: -len(name)] + side
        files.append(FileEntry(rel, parsed.kind, ents, parsed.legacy, parsed.rank,
                               os.path.islink(file_path), sidecar))
    files.sort(key=lambda f: f.relpath)
    _, subjects, _, fp = _walk(root, listing=False)
    return files, subjects, len(func), fp
