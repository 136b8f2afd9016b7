"""The twelve landmark-pool directions, as data.

A direction is a scan order (rows ascending or descending, columns ascending
or descending; rows are the outer loop) and two neighbour offsets ``n1`` and
``n2`` whose outputs feed the current pixel, exactly as in docs/semantics.md.
Every implementation (reference, CPU, CUDA) reads this table; nothing else
knows what "top_left" means.
"""

from __future__ import annotations

import dataclasses
from typing import Union


@dataclasses.dataclass(frozen=True)
class Direction:
  """One directional landmark pool.

  Attributes:
    name: readable name, e.g. ``"top_left"``.
    alias: the original release's name, e.g. ``"tl"`` or ``"I1"``.
    row_step: +1 if rows are scanned top to bottom, -1 if bottom to top.
    col_step: +1 if columns are scanned left to right, -1 if right to left.
    n1: (row, col) offset of the first neighbour (wins ties over n2).
    n2: (row, col) offset of the second neighbour.
    region: what the pool covers with no guide, in words.
  """

  name: str
  alias: str
  row_step: int
  col_step: int
  n1: tuple[int, int]
  n2: tuple[int, int]
  region: str

  @property
  def is_quadrant(self) -> bool:
    """True for the 2-D (wavefront) recurrences, False for the octants."""
    return 0 in self.n1 and 0 in self.n2 and self.n1 != self.n2 and (
        self.n1[0] != self.n2[0] and self.n1[1] != self.n2[1])

  def __str__(self) -> str:
    return self.name


def _d(name, alias, rows, cols, n1, n2, region):
  return Direction(name, alias, +1 if rows == "asc" else -1,
                   +1 if cols == "asc" else -1, n1, n2, region)


_TABLE = (
    _d("top_left", "tl", "asc", "asc", (0, -1), (-1, 0), "top-left quadrant"),
    _d("top_right", "tr", "asc", "desc", (0, +1), (-1, 0), "top-right quadrant"),
    _d("bottom_left", "bl", "desc", "asc", (0, -1), (+1, 0),
       "bottom-left quadrant"),
    _d("bottom_right", "br", "desc", "desc", (0, +1), (+1, 0),
       "bottom-right quadrant"),
    _d("east_northeast", "I1", "asc", "desc", (0, +1), (-1, +1),
       "octant between east and north-east"),
    _d("north_northeast", "I2", "asc", "desc", (-1, +1), (-1, 0),
       "octant between north-east and north"),
    _d("north_northwest", "I3", "asc", "asc", (-1, -1), (-1, 0),
       "octant between north and north-west"),
    _d("west_northwest", "I4", "asc", "asc", (0, -1), (-1, -1),
       "octant between north-west and west"),
    _d("south_southwest", "I5", "desc", "asc", (+1, -1), (+1, 0),
       "octant between south and south-west"),
    _d("west_southwest", "I6", "desc", "asc", (0, -1), (+1, -1),
       "octant between west and south-west"),
    _d("south_southeast", "I7", "desc", "desc", (+1, +1), (+1, 0),
       "octant between south-east and south"),
    _d("east_southeast", "I8", "desc", "desc", (0, +1), (+1, +1),
       "octant between east and south-east"),
)

DIRECTIONS: dict[str, Direction] = {d.name: d for d in _TABLE}
QUADRANTS: tuple[str, ...] = tuple(d.name for d in _TABLE[:4])
OCTANTS: tuple[str, ...] = tuple(d.name for d in _TABLE[4:])
_ALIASES: dict[str, Direction] = {d.alias: d for d in _TABLE}

DirectionLike = Union[str, Direction]


def resolve(direction: DirectionLike) -> Direction:
  """Returns the Direction for a readable name, an original alias or a Direction."""
  if isinstance(direction, Direction):
    return direction
  if isinstance(direction, str):
    found = DIRECTIONS.get(direction) or _ALIASES.get(direction)
    if found is not None:
      return found
  names = ", ".join(f"{d.name!r} (alias {d.alias!r})" for d in _TABLE)
  raise ValueError(
      f"Unknown landmark-pool direction {direction!r}. Valid directions are: "
      f"{names}. Use lmconv_jax.QUADRANTS or lmconv_jax.OCTANTS for the groups.")
