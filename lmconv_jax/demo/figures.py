"""The demo's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402

from lmconv_jax.demo.data import CLASSES, GLYPH, RelationData  # noqa: E402
from lmconv_jax.directions import resolve  # noqa: E402

COLOURS = {
  "box": "tab:gray",
  "dilated": "tab:orange",
  "lm4": "tab:blue",
  "lm8": "tab:green",
}
STYLES = {"box": "-o", "dilated": "-s", "lm4": "-^", "lm8": "--v"}
DIRECTIONS = {"lm4": "quadrants", "lm8": "octants"}
GLYPH_HALF = GLYPH // 2


def _save(fig, path: pathlib.Path) -> str:
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path.name


def examples(path, data: RelationData, n: int = 8) -> str:
  """A few test images with their labels."""
  cols = min(n, 4)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows))
  for k, ax in enumerate(np.ravel(axes)):
    ax.axis("off")
    if k >= min(n, len(data)):
      continue
    ax.imshow(data.images[k, ..., 0], cmap="gray", vmin=0, vmax=1)
    ax.set_title(
      f"plus {CLASSES[data.labels[k]]} ring\n{data.distance[k]} px apart",
      fontsize=9,
    )
  fig.suptitle(
    "The data set: where is the plus, seen from the ring? "
    "(X and square: distractors)",
    fontsize=10,
  )
  return _save(fig, path)


def curves(path, rows: list[dict]) -> str:
  """Test accuracy and training loss against steps, one line per model."""
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
  for r in rows:
    c = COLOURS.get(r["key"])
    label = f"{r['model']} ({r['params']:,} params)"
    a1.plot(
      r["curve"]["steps"],
      r["curve"]["test_accuracy"],
      STYLES.get(r["key"], "-o"),
      ms=3,
      color=c,
      label=label,
    )
    a2.plot(r["curve"]["loss_steps"], r["curve"]["train_loss"], "-", color=c)
  a1.axhline(1 / len(CLASSES), color="k", lw=0.8, ls=":", label="chance")
  a1.set(
    xlabel="training step",
    ylabel="test accuracy",
    ylim=(0, 1.02),
    title="Test accuracy while training (first 500 test images)",
  )
  a2.set(
    xlabel="training step",
    ylabel="cross-entropy",
    yscale="log",
    title="Training loss",
  )
  for a in (a1, a2):
    a.grid(alpha=0.3)
  fig.legend(
    *a1.get_legend_handles_labels(),
    loc="lower center",
    ncol=3,
    fontsize=8,
    bbox_to_anchor=(0.5, -0.12),
  )
  return _save(fig, path)


def by_distance(
  path, rows: list[dict], box_reach: int, dilated_reach: int
) -> str:
  """Test accuracy against the distance between the plus and the ring."""
  fig, ax = plt.subplots(figsize=(7, 3.8))
  for r in rows:
    d = sorted(r["accuracy_by_distance"], key=int)
    ax.plot(
      [int(v) for v in d],
      [r["accuracy_by_distance"][v] for v in d],
      STYLES.get(r["key"], "-o"),
      ms=4,
      color=COLOURS.get(r["key"]),
      label=r["model"],
    )
  ax.axhline(1 / len(CLASSES), color="k", lw=0.8, ls=":", label="chance")
  for reach, what in (
    (box_reach, "3x3 stack's\nreach"),
    (dilated_reach, "dilated stack's\nreach"),
  ):
    ax.axvline(reach + 0.5, color="k", lw=0.8, ls="--")
    ax.text(reach + 0.7, 0.05, what, fontsize=8)
  ax.set(
    xlabel="distance between the plus and the ring (px)",
    ylabel="test accuracy",
    ylim=(0, 1.05),
    title="Accuracy by distance: box convolutions see points, "
    "landmark convolutions regions",
  )
  ax.title.set_fontsize(10)
  ax.legend(fontsize=8, loc="center left")
  ax.grid(alpha=0.3)
  return _save(fig, path)


def _pick(data: RelationData) -> list[int]:
  """One test image per class, the farthest pair of each."""
  picks = []
  for c in range(len(CLASSES)):
    idx = np.flatnonzero(data.labels == c)
    if len(idx):
      picks.append(int(idx[np.argmax(data.distance[idx])]))
  return picks


def landmarks(path, trained: dict, data: RelationData) -> str | None:
  """For the pixel at the plus's centre (green), where each channel's max
  came from (dots, coloured by direction) in the first landmark layer."""
  import jax.numpy as jnp
  from lmconv_jax.landmarks import grouped_landmark_map
  from lmconv_jax.ops import grouped_landmark_pool, resolve_grouping

  keys = [k for k in ("lm4", "lm8") if k in trained]
  if not keys:
    return None
  picks = _pick(data)
  fig, axes = plt.subplots(
    len(keys),
    len(picks),
    figsize=(2.9 * len(picks), 3.2 * len(keys)),
    squeeze=False,
  )
  for row, key in enumerate(keys):
    model, result = trained[key]
    grouping = DIRECTIONS[key]
    _, state = model.apply(
      {"params": result.params},
      jnp.asarray(data.images[picks]),
      mutable=["intermediates"],
    )
    h = state["intermediates"]["conv2_input"][0]  # the pool's input
    lm = np.asarray(
      grouped_landmark_map(h, grouping, implementation=model.implementation)
    )
    pooled = np.asarray(
      grouped_landmark_pool(h, grouping, implementation=model.implementation)
    )
    groups = resolve_grouping(grouping)
    cg = h.shape[-1] // len(groups)
    cmap = plt.get_cmap("tab10")
    for col, n in enumerate(picks):
      ax = axes[row, col]
      ax.imshow(data.images[n, ..., 0], cmap="gray", vmin=0, vmax=1.6)
      qi, qj = data.plus[n]
      active = 0
      for g, members in enumerate(groups):
        pts = []
        for ch in range(g * cg, (g + 1) * cg):
          if pooled[col, qi, qj, ch] > 0:  # a channel that found something
            pts.append(lm[col, qi, qj, ch])
        active += len(pts)
        if pts:
          pts = np.array(pts)
          uniq, count = np.unique(pts, axis=0, return_counts=True)
          ax.scatter(
            uniq[:, 1],
            uniq[:, 0],
            s=18 + 22 * (count - 1),
            color=cmap(g % 10),
            edgecolors="white",
            linewidths=0.4,
            zorder=3,
          )
      ax.scatter(
        [qj], [qi], s=60, color="lime", edgecolors="black", marker="o", zorder=4
      )
      ax.set_title(
        f"{result_name(key)}: plus {CLASSES[data.labels[n]]} "
        f"ring, {data.distance[n]} px\n{active}/{h.shape[-1]} "
        f"channels found a max",
        fontsize=8,
      )
      ax.set_xticks([])
      ax.set_yticks([])
    handles = [
      Line2D(
        [],
        [],
        ls="",
        marker="o",
        color=cmap(g % 10),
        label=_group_label(members),
      )
      for g, members in enumerate(groups)
    ]
    axes[row, -1].legend(
      handles=handles,
      fontsize=7,
      loc="upper left",
      bbox_to_anchor=(1.02, 1),
      title="direction",
      title_fontsize=7,
    )
  fig.suptitle(
    "Landmarks of the query pixel (green, the plus's centre): the "
    "input pixel each channel's max came from",
    fontsize=10,
  )
  return _save(fig, path)


def _group_label(members) -> str:
  return "+".join(f"{resolve(m).name} ({resolve(m).alias})" for m in members)


def equivalence(
  path, trained: dict, rows: list[dict], image_size: int, max_distance: int
) -> str:
  """The README's claim, measured: is the same relation represented the same
  way at any distance, and opposite relations differently?

  f(d): the model's image representation (the globally max-pooled last
  layer) for the plus left of the ring, d px apart, no distractors, averaged
  over several rows; f'(d) the same with the two glyphs swapped (the plus
  right of the ring). Left panel: |f(d) - f(6)|, right panel:
  |f(d) - f'(d)|, both in units of |f(6) - f'(6)|, the model's own
  separation of the two relations at 6 px.
  """
  import jax.numpy as jnp
  from lmconv_jax.demo.data import MIN_DISTANCE, relation_series

  distances = list(range(MIN_DISTANCE, max_distance + 1))
  lanes = list(range(GLYPH_HALF, image_size - GLYPH_HALF, 4))
  left = relation_series(image_size, distances, lanes, plus_left=True)
  right = relation_series(image_size, distances, lanes, plus_left=False)
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
  for r in rows:
    model, result = trained[r["key"]]

    def features(images):
      flat = images.reshape((-1,) + images.shape[2:])
      _, state = model.apply(
        {"params": result.params}, jnp.asarray(flat), mutable=["intermediates"]
      )
      return np.asarray(state["intermediates"]["features"][0]).reshape(
        images.shape[:2] + (-1,)
      )

    f, g = features(left), features(right)
    unit = np.maximum(np.linalg.norm(f[:, 0] - g[:, 0], axis=-1), 1e-12)
    drift = np.linalg.norm(f - f[:, :1], axis=-1) / unit[:, None]
    separation = np.linalg.norm(f - g, axis=-1) / unit[:, None]
    style = dict(ms=4, color=COLOURS.get(r["key"]), label=r["model"])
    a1.plot(distances, drift.mean(0), STYLES.get(r["key"], "-o"), **style)
    a2.plot(distances, separation.mean(0), STYLES.get(r["key"], "-o"), **style)
  a1.set(
    xlabel="distance (px), the plus left of the ring",
    ylabel=f"|f(d) - f({MIN_DISTANCE})|",
    ylim=(0, None),
    title="Same relation, growing distance (0: unchanged)",
  )
  a2.set(
    xlabel="distance (px)",
    ylabel="|f(d) - f'(d)|",
    ylim=(0, None),
    title="Opposite relations, same distance (0: indistinguishable)",
  )
  for a in (a1, a2):
    a.axhline(1.0, color="k", lw=0.8, ls=":")
    a.title.set_fontsize(10)
    a.grid(alpha=0.3)
  a2.legend(fontsize=8)
  fig.suptitle(
    f"The image representation f, in units of each model's own "
    f"left-vs-right separation at {MIN_DISTANCE} px",
    fontsize=10,
  )
  return _save(fig, path)


def result_name(key: str) -> str:
  return {"lm4": "LandmarkConv4", "lm8": "LandmarkConv8"}.get(key, key)


def write_all(
  out_dir: pathlib.Path, config, rows, trained, test_data: RelationData
) -> list[str]:
  from lmconv_jax.demo.models import BOX_REACH, DILATED_REACH

  files = [
    examples(out_dir / "examples.png", test_data),
    curves(out_dir / "accuracy_curves.png", rows),
    by_distance(
      out_dir / "accuracy_by_distance.png", rows, BOX_REACH, DILATED_REACH
    ),
  ]
  files.append(
    equivalence(
      out_dir / "equivalence.png",
      trained,
      rows,
      config.image_size,
      config.max_distance,
    )
  )
  lm = landmarks(out_dir / "landmarks.png", trained, test_data)
  if lm:
    files.append(lm)
  return files
