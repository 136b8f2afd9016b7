"""The figures of README.md and docs/ are the project's own and resolve."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_image_the_docs_show_exists_and_is_drawn_here():
  shown = set()
  for doc in DOCS:
    for ref in re.findall(
      r'(?:src="|\]\()([^")]+\.(?:png|jpg|jpeg|svg|gif))', doc.read_text()
    ):
      path = (doc.parent / ref).resolve()
      assert path.is_file(), f"{doc.name} shows {ref}, which is missing"
      shown.add(path)
  assert ROOT / "docs" / "images" / "regions.png" in shown
  # Only figures that docs/make_figures.py writes: no copied images.
  images = sorted(p.name for p in (ROOT / "docs" / "images").iterdir())
  assert images == ["regions.png"], images


def test_make_figures_measures_the_quadrant_regions():
  pytest.importorskip("matplotlib")
  spec = importlib.util.spec_from_file_location(
    "make_figures", ROOT / "docs" / "make_figures.py"
  )
  figures = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(figures)
  rows, cols = np.mgrid[0:7, 0:7]
  want = {
    "top_left": (rows <= 3) & (cols <= 3),
    "top_right": (rows <= 3) & (cols >= 3),
    "bottom_left": (rows >= 3) & (cols <= 3),
    "bottom_right": (rows >= 3) & (cols >= 3),
  }
  for name, mask in want.items():
    np.testing.assert_array_equal(
      figures.region(name, (3, 3), 7), mask, err_msg=name
    )
