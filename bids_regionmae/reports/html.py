"""The one HTML report builder: jinja2 templates, one stylesheet, one self-contained page per report.

A page is a title and a list of blocks (headings, paragraphs, tables,
figure links, inline SVG figures, links, trusted markup); each block is a
macro of ``templates/blocks.html`` and the page is ``templates/page.html``
with ``templates/report.css`` inlined. Text is escaped by jinja2's
autoescaping; only :meth:`HtmlReport.raw` and cells passed as
:class:`markupsafe.Markup` go in as markup. Every report of the app
(participant, group, pretraining, fine-tuning, evaluation, comparison) is
built with :class:`HtmlReport`; a report that cannot be written is logged,
never raised.

New kinds of blocks go into ``templates/blocks.html`` with a method here.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from bids_regionmae import __version__
from bids_regionmae.atomic import atomic_write_text

LOGGER = logging.getLogger(__name__)

__all__ = ["HtmlReport", "Markup", "format_number", "svg_markup"]


def format_number(value: Any, digits: int = 4) -> str:
    """A value for report text: ``n/a`` for None and non-finite numbers, floats with ``digits`` significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("bids_regionmae.reports", "templates"),
                              autoescape=jinja2.select_autoescape(["html"]), trim_blocks=False,
                              undefined=jinja2.StrictUndefined)


def _blocks() -> Any:
    return _environment().get_template("blocks.html").module


def svg_markup(draw: Callable[[Any], None], figsize: tuple[float, float]) -> Markup:
    """Run ``draw(fig)`` on a fresh matplotlib Figure (object API, no pyplot state) and return inline SVG."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "regionmae", "font.size": 9}):
        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasSVG(fig)
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return Markup(text[start:] if start >= 0 else text)


class HtmlReport:
    """Collects blocks, then writes one HTML page atomically.

    Parameters
    ----------
    title : str
        Page title and first heading.
    path : Path
        Where the page will be written; figure links are made relative to it.
    """

    def __init__(self, title: str, path: str | Path) -> None:
        self.title = title
        self.path = Path(path)
        self.blocks: list[Markup] = []

    def _add(self, macro: str, *args: Any, **kwargs: Any) -> None:
        self.blocks.append(Markup(getattr(_blocks(), macro)(*args, **kwargs)))

    def heading(self, text: str, level: int = 2) -> None:
        """Start a new section (``level`` 3 for a subsection)."""
        self._add("heading", text, level)

    def paragraph(self, text: str, kind: str | None = None) -> None:
        """Add text; ``kind`` is ``None``, ``"warn"``, ``"err"`` (highlighted boxes) or ``"note"`` (small print)."""
        self._add("paragraph", text, kind)

    def raw(self, markup: str) -> None:
        """Add trusted HTML markup (e.g. the methods text)."""
        self.blocks.append(Markup(markup))

    def link(self, text: str, target: str | Path, label: str) -> None:
        """A paragraph ``text`` followed by a link to ``target`` (a file; made relative to the page)."""
        self._add("link", text, os.path.relpath(Path(target), self.path.parent), label)

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
              floatfmt: str = "{:.4g}") -> None:
        """Add a table of dict rows (missing cells are blank, floats formatted with ``floatfmt``)."""
        if not rows:
            self.paragraph("(no rows)")
            return
        columns = list(columns or rows[0].keys())
        cells = [[floatfmt.format(v) if isinstance(v, float) else str(v)
                  for v in (row.get(c, "") for c in columns)] for row in rows]
        self._add("table", [str(c) for c in columns], cells)

    def cells(self, header: Sequence[str], rows: Sequence[Sequence[str | Markup]],
              row_classes: Sequence[str] | None = None) -> None:
        """Add a table of formatted cells (text is escaped, :class:`Markup` cells are kept); optional row classes."""
        self._add("table", list(header), [list(r) for r in rows], list(row_classes) if row_classes else None)

    def figure(self, figure_path: str | Path | None, caption: str = "") -> None:
        """Link a figure file (skipped with a note if it could not be made)."""
        if figure_path is None or not Path(figure_path).exists():
            self.paragraph(f"Figure not available: {caption}", kind="warn")
            return
        self._add("figure", os.path.relpath(Path(figure_path), self.path.parent), caption)

    def svg_figure(self, title: str, draw: Callable[[Any], None], figsize: tuple[float, float]) -> None:
        """Draw a figure inline as SVG under a small heading; a failure is a warning in the page, never raised."""
        try:
            svg = svg_markup(draw, figsize)
        except Exception as exc:  # noqa: BLE001 - a broken figure never breaks the report
            LOGGER.warning("figure %r could not be drawn: %s: %s", title, type(exc).__name__, exc)
            self.heading(title, 3)
            self.paragraph(f"Figure “{title}” could not be drawn: {exc}", kind="warn")
            return
        self._add("svg_figure", title, svg)

    def render(self) -> str:
        """The page as text."""
        css = _environment().loader.get_source(_environment(), "report.css")[0]  # type: ignore[union-attr]
        page = _environment().get_template("page.html")
        return page.render(title=self.title, css=Markup(css), blocks=self.blocks, version=__version__) + "\n"

    def write(self, strict: bool = False) -> Path | None:
        """Write the page; a failure is logged and None returned (``strict``: an ``OSError`` is raised)."""
        try:
            return atomic_write_text(self.path, self.render())
        except OSError:
            if strict:
                raise
            LOGGER.warning("could not write report %s", self.path, exc_info=True)
            return None
        except Exception as exc:  # noqa: BLE001 - a report never fails a run
            LOGGER.warning("could not write report %s: %s", self.path, exc)
            return None
