"""The synthetic spatial-relation data set: where is the plus from the ring?

Every image (H x W, one channel, values 0 / 1) holds two distinct 5x5 glyphs,
a plus (the seed README's pig) and a ring (its bear), plus one or two
distractor glyphs (an X, a filled square). The plus and the ring share a row
band (or a column band: their centres differ by at most ``JITTER`` pixels
across the axis) and are ``distance`` pixels apart along it, anywhere from
``MIN_DISTANCE`` to the width of the image. The label says only how they are
related:

  0 "left of": the plus is left of the ring     1 "right of"
  2 "above":   the plus is above the ring       3 "below"

so it does not depend on where the pair is or how far apart, and most pairs
are farther apart than the 7 x 7 receptive field of three 3x3 convolutions:
a box convolution has to see both glyphs at once to tell, a landmark
convolution only has to look for the ring in the right region.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASSES = ("left of", "right of", "above", "below")
GLYPH = 5
MIN_DISTANCE = GLYPH + 1  # centres this far apart: the glyphs never touch
JITTER = 2  # max offset across the band: the ring straddles it


def _glyph(rows: str) -> np.ndarray:
  return np.array([[c == "#" for c in r] for r in rows.split()], np.float32)


PLUS = _glyph("..#.. ..#.. ##### ..#.. ..#..")
RING = _glyph("##### #...# #...# #...# #####")
DISTRACTORS = (
  _glyph("#...# .#.#. ..#.. .#.#. #...#"),  # X
  _glyph("..... .###. .###. .###. ....."),
)  # filled square


@dataclasses.dataclass
class RelationData:
  """Images (N, H, W, 1) float32, labels (N,) int32, and what made them.

  ``plus`` and ``ring`` are the glyph centres (N, 2) as (row, col);
  ``distance`` is how far apart they are along the label's axis (N,).
  """

  images: np.ndarray
  labels: np.ndarray
  plus: np.ndarray
  ring: np.ndarray
  distance: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, idx) -> "RelationData":
    return RelationData(
      self.images[idx],
      self.labels[idx],
      self.plus[idx],
      self.ring[idx],
      self.distance[idx],
    )


def _place(img: np.ndarray, glyph: np.ndarray, centre) -> None:
  r, c = centre[0] - GLYPH // 2, centre[1] - GLYPH // 2
  img[r : r + GLYPH, c : c + GLYPH] = np.maximum(
    img[r : r + GLYPH, c : c + GLYPH], glyph
  )


def _apart(a, b) -> bool:
  """5x5 boxes centred at a and b do not touch (one free pixel between)."""
  return max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= MIN_DISTANCE


def make_relation_data(
  n: int,
  size: int = 32,
  seed: int = 0,
  max_distance: int | None = None,
  distractors: tuple[int, int] = (1, 2),
) -> RelationData:
  """``n`` images of ``size`` x ``size``, classes balanced, from ``seed``.

  The distance between the plus and the ring is uniform in
  ``[MIN_DISTANCE, max_distance]``; the default ``size // 2`` keeps every
  pair nearer than its wrap-around image, so that a circularly padded
  convolution is never shown the pair closer the other way round.
  """
  if max_distance is None:
    max_distance = size // 2
  if size < 2 * MIN_DISTANCE or not (
    MIN_DISTANCE <= max_distance <= size - GLYPH
  ):
    raise ValueError(
      f"need size >= {2 * MIN_DISTANCE} and {MIN_DISTANCE} <= max_distance "
      f"<= size - {GLYPH}, got size={size}, max_distance={max_distance}."
    )
  rng = np.random.default_rng(seed)
  lo, hi = GLYPH // 2, size - 1 - GLYPH // 2  # valid centre coordinates
  images = np.zeros((n, size, size, 1), np.float32)
  labels = np.arange(n) % len(CLASSES)
  rng.shuffle(labels)
  plus = np.zeros((n, 2), np.int32)
  ring = np.zeros((n, 2), np.int32)
  for k in range(n):
    label = labels[k]
    # Along the axis: a distance, uniformly, then where the pair sits.
    d = rng.integers(MIN_DISTANCE, max_distance + 1)
    a = rng.integers(lo, hi - d + 1)
    b = a + d
    if label in (1, 3):  # right of / below: the plus is the later one
      a, b = b, a
    across = rng.integers(lo, hi + 1)
    other = int(np.clip(across + rng.integers(-JITTER, JITTER + 1), lo, hi))
    if label in (0, 1):  # a row band: the axis is the column
      p, q = (across, a), (other, b)
    else:
      p, q = (a, across), (b, other)
    plus[k], ring[k] = p, q
    _place(images[k, ..., 0], PLUS, p)
    _place(images[k, ..., 0], RING, q)
    placed = [p, q]
    for _ in range(rng.integers(distractors[0], distractors[1] + 1)):
      for _attempt in range(50):
        c = tuple(rng.integers(lo, hi + 1, 2))
        if all(_apart(c, o) for o in placed):
          _place(
            images[k, ..., 0], DISTRACTORS[rng.integers(len(DISTRACTORS))], c
          )
          placed.append(c)
          break
  axis = np.where(labels < 2, 1, 0)
  distance = np.abs(plus[np.arange(n), axis] - ring[np.arange(n), axis])
  return RelationData(
    images, labels.astype(np.int32), plus, ring, distance.astype(np.int32)
  )


def relation_series(
  size: int, distances, rows, plus_left: bool = True
) -> np.ndarray:
  """One relation at growing distances, no distractors.

  Returns images (len(rows), len(distances), size, size, 1): in row r, the
  left glyph centred at column GLYPH // 2 and the other ``d`` columns to its
  right; the plus is the left one if ``plus_left`` (label "left of"), the
  ring otherwise ("right of").
  """
  c0 = GLYPH // 2
  left, right = (PLUS, RING) if plus_left else (RING, PLUS)
  images = np.zeros((len(rows), len(distances), size, size, 1), np.float32)
  for a, r in enumerate(rows):
    for b, d in enumerate(distances):
      _place(images[a, b, ..., 0], left, (r, c0))
      _place(images[a, b, ..., 0], right, (r, c0 + d))
  return images
