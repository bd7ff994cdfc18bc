"""Markdown tables as results.md and report write them, and figures that fit their canvas."""

from __future__ import annotations

import matplotlib
import pytest

from ser_jax import plots, render


def test_a_markdown_table_has_a_header_a_rule_and_blank_cells():
  lines = render.markdown_table(("", "A (%)", "p"), [("WA", 51.5, ""), ("UA", "", 0.2)])
  assert lines == [
    "| | A (%) | p |",
    "|---|---|---|",
    "| WA | 51.5 | |",
    "| UA | | 0.2 |",
  ]
  assert render.markdown_table(("a",), []) == ["| a |", "|---|"]


def _fits_its_canvas(figure) -> None:
  """Draws `figure` on its Agg canvas; everything drawn lies on the canvas."""
  assert isinstance(figure.canvas, matplotlib.backends.backend_agg.FigureCanvasAgg)
  figure.canvas.draw()
  drawn = figure.get_tightbbox(figure.canvas.get_renderer())  # Inches.
  width, height = figure.get_size_inches()
  assert drawn.x0 >= 0 and drawn.y0 >= 0, drawn
  assert drawn.x1 <= width and drawn.y1 <= height, (drawn, width, height)


# Row labels as long as a study's: they leave each panel narrower than its x label.
FOREST_ROWS = [
  {"label": "emodb", "estimate": 2.4, "low": -2.7, "high": 7.7},
  {"label": "casia", "estimate": -1.6, "low": -4.0, "high": 1.0},
  {"label": "pooled, random effects (2 corpora)", "estimate": -0.2, "low": -24.1, "high": 23.7}
  | {"pooled": True},
  {"label": "common effect (these corpora)", "estimate": -0.8, "low": -3.0, "high": 1.4}
  | {"pooled": True, "colour": "tab:grey"},
]


@pytest.mark.parametrize("n_panels", [1, 2, 3])
def test_the_forest_plot_fits_its_canvas(n_panels, tmp_path):
  panels = [{"title": f"setting {k} - softmax", "rows": FOREST_ROWS} for k in range(n_panels)]
  figure = plots.forest_figure(panels, "UA difference (points), 95 % interval")
  _fits_its_canvas(figure)
  assert figure.get_supxlabel() == "UA difference (points), 95 % interval"
  plots.plot_forest(panels, tmp_path / "forest.png", "UA difference (points), 95 % interval")
  assert (tmp_path / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n_corpora", [2, 4])
def test_the_cross_corpus_matrices_fit_their_canvas(n_corpora):
  names = [f"corpus_{k}" for k in range(n_corpora)]
  ua = [[50.0 + k - j for j in range(n_corpora)] for k in range(n_corpora)]
  ua[0][1] = None  # A failed run: a blank cell.
  matrices = [{"title": s, "corpora": names, "ua": ua} for s in ("softmax", "focal", "weighted")]
  _fits_its_canvas(plots.cross_corpus_figure(matrices))
