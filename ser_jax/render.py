"""Markdown tables, as every results.md (a run's, a study's) and `report` write them.

Figures are drawn in ser_jax/plots.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
  """The lines of a markdown table: the header, its rule, one line per row; '' is a blank cell."""
  return [_line(header), "|---" * len(header) + "|", *(_line(row) for row in rows)]


def _line(cells: Sequence[object]) -> str:
  return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"
