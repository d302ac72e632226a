"""BIDS tabular files: the one TSV writer (``n/a`` for missing values) and its reader.

Every TSV of the app is written by :func:`write_table` (atomically, with an
optional JSON sidecar describing the columns) and read back by :func:`read_tsv`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bids_regionmae.atomic import atomic_write_json, atomic_write_text

__all__ = ["format_value", "read_tsv", "write_table"]


def format_value(value: Any, digits: int = 7) -> str:
    """One TSV cell: ``n/a`` for None/NaN, compact floats, plain strings."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "n/a"
        return f"{value:.{digits}g}"
    try:
        import numpy as np

        if isinstance(value, np.floating):
            return format_value(float(value), digits)
        if isinstance(value, np.integer):
            return str(int(value))
    except ImportError:  # pragma: no cover
        pass
    text = str(value)
    return text.replace("\t", " ").replace("\n", " ") or "n/a"


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *,
                json_path: str | Path | None = None, descriptions: Mapping[str, Any] | None = None,
                sidecar: Mapping[str, Any] | None = None, digits: int = 7) -> list[Path]:
    """Write a TSV (and its JSON sidecar) atomically.

    Parameters
    ----------
    path : path
        ``.tsv`` target.
    rows : sequence of mapping
        Missing keys become ``n/a``.
    columns : sequence of str
    json_path : path, optional
        Sidecar; holds ``descriptions`` (column -> ``{"Description": ...}``
        or a plain string) and ``sidecar``.
    descriptions : mapping, optional
    sidecar : mapping, optional
    digits : int
        Significant digits of floats.

    Returns
    -------
    list of Path
    """
    buf = io.StringIO()
    buf.write("\t".join(columns) + "\n")
    for row in rows:
        buf.write("\t".join(format_value(row.get(c), digits) for c in columns) + "\n")
    written = [atomic_write_text(path, buf.getvalue())]
    if json_path is not None:
        content: dict[str, Any] = {}
        for column, text in (descriptions or {}).items():
            content[column] = text if isinstance(text, Mapping) else {"Description": str(text)}
        content.update(dict(sidecar or {}))
        written.append(atomic_write_json(json_path, content))
    return written


def _parse(value: str) -> Any:
    if value in ("n/a", ""):
        return math.nan
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and "." not in value and "e" not in value.lower():
        return int(number)
    return number


def read_tsv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a TSV with numbers parsed and ``n/a`` as NaN.

    Returns
    -------
    list of dict
        Empty when the file is missing or unreadable.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]
    except (OSError, csv.Error):
        return []
