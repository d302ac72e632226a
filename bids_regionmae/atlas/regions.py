"""AAL3 region groups and the region selection language.

The seven lobe groups use exactly the AAL3 label ranges of the design notes
(they reproduce the paper's coverage figures)::

    frontal      1-32
    limbic       33-46, 151-156
    occipital    47-60
    parietal     61-74
    subcortical  75-82, 121-150, 157-170
    temporal     83-94
    cerebellum   95-120

A *selection* (one masked region) is a ``+``-separated union of terms; each
term is a group name, an AAL3 region name (``Thal_Re_R``), a shell pattern
over region names (``Cerebellum_*``), a label index (``134``) or an index
range (``95-120``). A *spec* is a comma-separated list of selections::

    cerebellum                  -> one region (26 labels)
    cerebellum+frontal          -> one region (union)
    limbic,cerebellum           -> two regions
    Hippocampus_L+Hippocampus_R -> one region (2 labels)

Names are matched case-insensitively; an unknown name raises
:class:`~bids_regionmae.errors.UsageError` with close matches.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from bids_regionmae.errors import UsageError


def _ranges(*spans: tuple[int, int]) -> tuple[int, ...]:
    return tuple(i for lo, hi in spans for i in range(lo, hi + 1))


#: The seven lobe groups: name -> AAL3 label indices (inclusive ranges of the design table).
LOBE_GROUPS: dict[str, tuple[int, ...]] = {
    "frontal": _ranges((1, 32)),
    "limbic": _ranges((33, 46), (151, 156)),
    "occipital": _ranges((47, 60)),
    "parietal": _ranges((61, 74)),
    "subcortical": _ranges((75, 82), (121, 150), (157, 170)),
    "temporal": _ranges((83, 94)),
    "cerebellum": _ranges((95, 120)),
}

#: AAL3 label indices listed in the original label table but absent from the image.
AAL3_EMPTY_LABELS: tuple[int, ...] = (35, 36, 81, 82)

_LABEL_TO_GROUP: dict[int, str] = {i: g for g, labels in LOBE_GROUPS.items() for i in labels}


def group_of_label(index: int) -> str:
    """Lobe group of an AAL3 label index.

    Parameters
    ----------
    index : int
        AAL3 label index (1..170).

    Returns
    -------
    str
        One of the keys of :data:`LOBE_GROUPS`.

    Raises
    ------
    KeyError
        ``index`` is not an AAL3 label (0, negative or > 170).
    """
    try:
        return _LABEL_TO_GROUP[int(index)]
    except KeyError:
        raise KeyError(f"label index {index} is not in any AAL3 lobe group (valid: 1..170)") from None


@lru_cache(maxsize=1)
def aal3_label_names() -> dict[int, str]:
    """The 166 AAL3 region names shipped with the package (index -> name).

    This is the label table of AAL3v1 (Rolls et al. 2020) without the empty
    indices 35, 36, 81 and 82; it lets region specs be checked without
    loading the atlas image.
    """
    text = resources.files("bids_regionmae.data").joinpath("aal3_labels.tsv").read_text("utf-8")
    names: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        if line.strip():
            index, name, _group = line.split("\t")
            names[int(index)] = name
    return names


@dataclass(frozen=True)
class Region:
    """One masked region: a named union of atlas labels.

    Attributes
    ----------
    name : str
        Canonical spelling of the selection (e.g. ``"cerebellum+frontal"``).
    labels : tuple of int
        Sorted atlas label indices of the union (present in the label table).
    """

    name: str
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def _suggest(term: str, label_names: Mapping[int, str]) -> str:
    choices = list(LOBE_GROUPS) + list(label_names.values())
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(term.lower(), list(lower), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(lower[c]) for c in close) + "?"
    return f"valid groups: {', '.join(LOBE_GROUPS)}; or an atlas region name, a label index or a range"


def _resolve_term(term: str, label_names: Mapping[int, str], spec: str) -> tuple[str, set[int]]:
    """Labels of one term of a selection and its canonical spelling."""
    low = term.lower()
    if low in LOBE_GROUPS:
        return low, {i for i in LOBE_GROUPS[low] if i in label_names}
    by_name = {name.lower(): (index, name) for index, name in label_names.items()}
    if low in by_name:
        index, name = by_name[low]
        return name, {index}
    if term.isdigit():
        index = int(term)
        if index not in label_names:
            raise UsageError(f"region {spec!r}: label index {index} is not in the atlas label table "
                             f"(valid: {min(label_names)}..{max(label_names)}, "
                             f"{len(label_names)} labels)")
        return str(index), {index}
    match = _RANGE.match(term)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2))
        if lo > hi:
            raise UsageError(f"region {spec!r}: empty label range {term!r} (start > end)")
        return f"{lo}-{hi}", {i for i in label_names if lo <= i <= hi}
    if any(ch in term for ch in "*?["):
        hits = {i for i, name in label_names.items() if fnmatch.fnmatchcase(name.lower(), low)}
        if hits:
            return term, hits
        raise UsageError(f"region {spec!r}: pattern {term!r} matches no atlas region name")
    raise UsageError(f"region {spec!r}: unknown region {term!r}; {_suggest(term, label_names)}")


def resolve_region(spec: str, label_names: Mapping[int, str] | None = None) -> Region:
    """Resolve one selection (a ``+`` union of terms) to atlas labels.

    Parameters
    ----------
    spec : str
        E.g. ``"cerebellum"``, ``"cerebellum+frontal"``, ``"Thal_Re_R"``,
        ``"Cerebellum_*"``, ``"95-120"`` or ``"134"``. Case-insensitive.
    label_names : mapping of int to str, optional
        The atlas label table (index -> name). Default: the packaged AAL3
        table (:func:`aal3_label_names`). Group labels missing from the table
        (e.g. the empty AAL3 indices 35/36/81/82) are dropped.

    Returns
    -------
    Region

    Raises
    ------
    UsageError
        Empty spec, a comma (use :func:`resolve_regions`), an unknown name
        (with "did you mean" suggestions), an index not in the table, or a
        selection with no label in the table.

    Examples
    --------
    >>> resolve_region("cerebellum+frontal").name
    'cerebellum+frontal'
    >>> resolve_region("thal_re_r").labels
    (134,)
    """
    names = dict(label_names) if label_names is not None else aal3_label_names()
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"region spec must be a non-empty string, got {spec!r}")
    if "," in spec:
        raise UsageError(f"region spec {spec!r} lists several regions; pass one selection "
                         f"(use '+' for a union) or use resolve_regions for a comma list")
    terms = [t.strip() for t in spec.split("+")]
    if any(not t for t in terms):
        raise UsageError(f"region spec {spec!r} has an empty term around '+'")
    canonical, labels = [], set()
    for term in terms:
        name, found = _resolve_term(term, names, spec)
        canonical.append(name)
        labels |= found
    if not labels:
        raise UsageError(f"region {spec!r} has no label in this atlas's label table "
                         f"({len(names)} labels)")
    return Region(name="+".join(canonical), labels=tuple(sorted(labels)))


def resolve_regions(spec: str, label_names: Mapping[int, str] | None = None) -> list[Region]:
    """Resolve a comma-separated list of selections.

    Parameters
    ----------
    spec : str
        E.g. ``"cerebellum,limbic"`` or ``"cerebellum+frontal,temporal"``.
    label_names : mapping of int to str, optional
        See :func:`resolve_region`.

    Returns
    -------
    list of Region
        In the order given; duplicates (same label set) are dropped.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"region spec must be a non-empty string, got {spec!r}")
    parts = [p.strip() for p in spec.split(",")]
    if any(not p for p in parts):
        raise UsageError(f"region spec {spec!r} has an empty item between commas")
    regions: list[Region] = []
    seen: set[tuple[int, ...]] = set()
    for part in parts:
        region = resolve_region(part, label_names)
        if region.labels not in seen:
            seen.add(region.labels)
            regions.append(region)
    return regions


def group_table(label_names: Mapping[int, str]) -> list[tuple[int, str, str]]:
    """Rows ``(index, name, group)`` for a label table; group is ``"other"`` outside AAL3's 1..170."""
    return [(i, label_names[i], _LABEL_TO_GROUP.get(i, "other")) for i in sorted(label_names)]
