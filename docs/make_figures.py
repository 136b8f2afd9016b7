"""Draws the figures of README.md and docs/ from the library itself.

  .venv/bin/python docs/make_figures.py          # writes docs/images/*.png

regions.png: for one query pixel, the input pixels a 3x3 convolution reads
and the regions of the landmark pools for P = 2 ("top_bottom"), P = 4
("quadrants") and P = 8 ("octants"). The regions are not drawn from a
description but measured: a pixel belongs to group k's region when a single
hot input pixel there reaches the query's output of the pool (the reference
implementation, so no kernels are needed). Pixels on a border between two
regions belong to both and get the mix of their colours; the legend under
each panel names each region's colour (the original aliases, merged groups
joined by +) and shows the mix ("in 2+ regions").

Needs matplotlib (pip install 'lmconv-jax[demo]').
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import lmconv_jax  # noqa: E402

IMAGES = pathlib.Path(__file__).resolve().parent / "images"
SIZE = 15  # a SIZE x SIZE image
QUERY = (SIZE // 2, SIZE // 2)
PANELS = (
  ("3x3 convolution: 9 points", None),
  ("P = 2 (top_bottom)", "top_bottom"),
  ("P = 4 (quadrants)", "quadrants"),
  ("P = 8 (octants)", "octants"),
)


def region(direction: str, query=QUERY, size: int = SIZE) -> np.ndarray:
  """(size, size) bool: the input pixels that reach ``query``'s output of
  ``direction``'s pool."""
  hot = np.eye(size * size, dtype=np.float32).reshape(
    size * size, size, size, 1
  )
  out = np.asarray(lmconv_jax.landmark_pool_reference(hot, direction))
  return out[:, query[0], query[1], 0].reshape(size, size) > 0.5


def group_regions(grouping: str, query=QUERY, size: int = SIZE):
  """[(label, (size, size) bool)]: one per group (merged groups: the union)."""
  groups = []
  for group in lmconv_jax.GROUPINGS[grouping]:
    members = (group,) if isinstance(group, str) else tuple(group)
    mask = np.zeros((size, size), bool)
    for name in members:
      mask |= region(name, query, size)
    label = "+".join(lmconv_jax.DIRECTIONS[n].alias for n in members)
    groups.append((label, mask))
  return groups


def box_region(query=QUERY, size: int = SIZE):
  mask = np.zeros((size, size), bool)
  mask[query[0] - 1 : query[0] + 2, query[1] - 1 : query[1] + 2] = True
  return [("3x3", mask)]


COLOURS = plt.get_cmap("tab10").colors
OVERLAP_LABEL = "on a border: in 2+ regions (colours mixed)"


def colour_image(groups) -> np.ndarray:
  """(SIZE, SIZE, 3): each pixel the mean colour of the regions it is in."""
  rgb, count = np.zeros((SIZE, SIZE, 3)), np.zeros((SIZE, SIZE, 1))
  for k, (_, mask) in enumerate(groups):
    rgb += mask[..., None] * np.asarray(COLOURS[k % 10])
    count += mask[..., None]
  return np.where(count > 0, rgb / np.maximum(count, 1), 0.94)


def legend_entries(groups) -> list[tuple[str, tuple]]:
  """[(label, rgb)]: each region's colour, then, where regions overlap, the
  mixed colour of the first overlap found (an example of the mix)."""
  entries = [
    (label, tuple(COLOURS[k % 10])) for k, (label, _) in enumerate(groups)
  ]
  count = sum(mask.astype(int) for _, mask in groups)
  shared = np.argwhere(count >= 2)
  if len(shared):
    image = colour_image(groups)
    entries.append((OVERLAP_LABEL, tuple(image[tuple(shared[0])])))
  return entries


def draw_regions(path: pathlib.Path) -> None:
  from matplotlib.patches import Patch

  fig, axes = plt.subplots(1, len(PANELS), figsize=(3.1 * len(PANELS), 4.0))
  for ax, (title, grouping) in zip(axes, PANELS):
    groups = box_region() if grouping is None else group_regions(grouping)
    ax.imshow(colour_image(groups), interpolation="nearest")
    entries = (
      legend_entries(groups)
      if grouping is not None
      else [("the 9 points read", tuple(COLOURS[0]))]
    )
    ax.legend(
      handles=[
        Patch(facecolor=c, edgecolor="none", label=label)
        for label, c in entries
      ],
      loc="upper center",
      bbox_to_anchor=(0.5, -0.02),
      ncol=2,
      fontsize=7,
      frameon=False,
      handlelength=1.2,
      columnspacing=0.8,
    )
    for k, (label, mask) in enumerate(groups):
      if grouping is None:
        continue
      rows, cols = np.nonzero(mask)
      # Label at the region pixel nearest its centre of mass, off the query.
      far = (rows - QUERY[0]) ** 2 + (cols - QUERY[1]) ** 2 > 2
      rows, cols = rows[far], cols[far]
      centre = np.array([rows.mean(), cols.mean()])
      j = np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
      ax.text(
        cols[j],
        rows[j],
        label,
        ha="center",
        va="center",
        fontsize=7 if len(label) > 2 else 9,
        color="black",
        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8),
      )
    ax.plot(QUERY[1], QUERY[0], marker="s", markersize=7, color="black")
    ax.set_xticks(np.arange(-0.5, SIZE, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, SIZE, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title, fontsize=10)
  fig.suptitle(
    "What one output pixel (black) sees: a box of points, or P "
    "regions, each reduced by a running max",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110, metadata={"Software": None})
  plt.close(fig)


def main() -> None:
  IMAGES.mkdir(exist_ok=True)
  path = IMAGES / "regions.png"
  draw_regions(path)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
