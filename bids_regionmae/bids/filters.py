"""The selection language of discovery: spaces and fMRIPrep-style BIDS filters.

``--space`` items (``MNI152NLin6Asym:res-2``) are parsed by
:func:`parse_space_specs`; the ``bold`` query of ``--bids-filter-file``
(fMRIPrep's semantics: a value, a list of values, ``null`` = the entity is
absent, ``"*"`` = any value) by :func:`normalize_bold_filters`, and entities
are matched against it by :func:`entities_match`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bids_regionmae.bids.entities import RUN_ENTITIES
from bids_regionmae.errors import UsageError

__all__ = ["IGNORED_FILTER_ENTITIES", "SUPPORTED_SPACES", "entities_match", "format_filters",
           "normalize_bold_filters", "parse_space_specs", "value_matches"]

#: Volumetric template spaces the model can use (resampled by their affines).
SUPPORTED_SPACES: tuple[str, ...] = (
    "MNI152NLin6Asym", "MNI152NLin2009cAsym", "MNI152NLin2009cSym", "MNI152NLin2009aAsym",
    "MNI152NLin6Sym", "MNI152Lin",
)
#: bids_filters entities that discovery ignores (it always picks desc-preproc_bold).
IGNORED_FILTER_ENTITIES = frozenset({"datatype", "suffix", "extension", "desc"})
_SHORT_TO_LONG = {
    "sub": "subject", "ses": "session", "acq": "acquisition", "ce": "ceagent",
    "rec": "reconstruction", "dir": "direction", "den": "den", "res": "res",
}
_FILTERABLE = set(RUN_ENTITIES) | {"space", "res", "den"}



def parse_space_specs(spaces: Iterable[str]) -> list[tuple[str, str | None]]:
    """Parse ``("MNI152NLin6Asym:res-2", "MNI152NLin2009cAsym")`` into ``[(space, res), ...]``.

    Raises
    ------
    UsageError
        A space is not a supported volumetric MNI152 template, or the
        modifier is not ``res-<label>``.
    """
    out: list[tuple[str, str | None]] = []
    for spec in spaces:
        name, _, modifier = str(spec).partition(":")
        name = name.strip()
        if name not in SUPPORTED_SPACES:
            raise UsageError(f"--space {spec!r}: not supported. The model reads volumetric MNI152 "
                             f"outputs; choose among {', '.join(SUPPORTED_SPACES)} (optionally "
                             "with :res-<label>, e.g. MNI152NLin6Asym:res-2).")
        res = None
        if modifier:
            if not modifier.startswith("res-") or len(modifier) <= 4:
                raise UsageError(f"--space {spec!r}: the modifier must be res-<label> "
                                 "(e.g. MNI152NLin6Asym:res-2).")
            res = modifier[4:]
        if (name, res) not in out:
            out.append((name, res))
    if not out:
        raise UsageError("--space: at least one space is needed, e.g. MNI152NLin6Asym.")
    return out


def normalize_bold_filters(bids_filters: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Return the ``bold`` query of ``bids_filters`` with long entity names.

    Returns
    -------
    filters : dict
        Entity -> value spec (value, list, None or ``"*"``).
    notes : list of str
        Entities that were ignored.

    Raises
    ------
    UsageError
        ``bids_filters`` or its ``bold`` entry is not a mapping, or an entity
        is unknown.
    """
    if not bids_filters:
        return {}, []
    if not isinstance(bids_filters, Mapping):
        raise UsageError("--bids-filter-file: must hold a JSON object such as "
                         '{"bold": {"session": "1"}}.')
    query = bids_filters.get("bold") or {}
    if not isinstance(query, Mapping):
        raise UsageError(f"--bids-filter-file: 'bold' must map entities to values, got {query!r}.")
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in query.items():
        name = _SHORT_TO_LONG.get(key, key)
        if name in IGNORED_FILTER_ENTITIES:
            notes.append(f"bids_filters bold.{key} is ignored: discovery always selects "
                         "desc-preproc_bold files.")
            continue
        if name not in _FILTERABLE:
            raise UsageError(f"--bids-filter-file: unknown or unsupported entity {key!r} in the "
                             f"'bold' query; use one of {', '.join(sorted(_FILTERABLE))}.")
        out[name] = value
    return out, notes


def is_query(spec: Any, which: str) -> bool:
    """Whether ``spec`` is pybids' ``Query.NONE`` / ``Query.ANY`` (``which``)."""
    return getattr(spec, "name", None) == which and not isinstance(spec, str)


def value_matches(value: str | None, spec: Any, numeric: bool) -> bool:
    """Whether an entity value matches a filter value spec (``numeric``: run-1 == run-01)."""
    specs = spec if isinstance(spec, (list, tuple, set, frozenset)) else [spec]
    for item in specs:
        if item is None or is_query(item, "NONE"):
            if value is None:
                return True
        elif item == "*" or is_query(item, "ANY"):
            if value is not None:
                return True
        elif value is not None:
            if numeric and str(item).isdigit() and value.isdigit():
                if int(item) == int(value):
                    return True
            elif str(item) == value:
                return True
    return False


def entities_match(ents: Mapping[str, str], filters: Mapping[str, Any]) -> bool:
    """Whether every filtered entity of ``ents`` matches its spec."""
    for name, spec in filters.items():
        if not value_matches(ents.get(name), spec, name in ("run", "echo", "chunk")):
            return False
    return True


def format_filters(filters: Mapping[str, Any]) -> str:
    """``key=value`` pairs for messages."""
    if not filters:
        return "none"
    return ", ".join(f"{k}={v!r}" for k, v in filters.items())
