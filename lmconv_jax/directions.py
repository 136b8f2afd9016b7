"""The twelve landmark-pool directions, as data.

A direction is a scan order (rows ascending or descending, columns ascending
or descending; rows are the outer loop) and two neighbour offsets ``n1`` and
``n2`` whose outputs feed the current pixel, exactly as in docs/semantics.md.
Every implementation (reference, CPU, CUDA) reads this table; nothing else
knows what "top_left" means. The groupings (which directions pool which
channel group, and which pools a group merges by max) live here too.

A :class:`Direction` built by hand (not from the table) is accepted when it
is valid by the same rules as the C++ ``make_direction``
(xla_ffi/landmark_pool.h), checked by :func:`resolve`:

* ``row_step`` and ``col_step`` are each +1 or -1;
* every neighbour offset component is -1, 0 or +1;
* ``n1 != n2``;
* both neighbours are visited before the pixel in the scan order (rows
  outer, columns inner) given by the steps.

Every valid direction works identically in every implementation.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable, Sequence, Union


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
    return (
      0 in self.n1
      and 0 in self.n2
      and self.n1 != self.n2
      and (self.n1[0] != self.n2[0] and self.n1[1] != self.n2[1])
    )

  def __str__(self) -> str:
    return self.name


def _d(name, alias, rows, cols, n1, n2, region):
  return Direction(
    name,
    alias,
    +1 if rows == "asc" else -1,
    +1 if cols == "asc" else -1,
    n1,
    n2,
    region,
  )


_TABLE = (
  _d("top_left", "tl", "asc", "asc", (0, -1), (-1, 0), "top-left quadrant"),
  _d("top_right", "tr", "asc", "desc", (0, +1), (-1, 0), "top-right quadrant"),
  _d(
    "bottom_left", "bl", "desc", "asc", (0, -1), (+1, 0), "bottom-left quadrant"
  ),
  _d(
    "bottom_right",
    "br",
    "desc",
    "desc",
    (0, +1),
    (+1, 0),
    "bottom-right quadrant",
  ),
  _d(
    "east_northeast",
    "I1",
    "asc",
    "desc",
    (0, +1),
    (-1, +1),
    "octant between east and north-east",
  ),
  _d(
    "north_northeast",
    "I2",
    "asc",
    "desc",
    (-1, +1),
    (-1, 0),
    "octant between north-east and north",
  ),
  _d(
    "north_northwest",
    "I3",
    "asc",
    "asc",
    (-1, -1),
    (-1, 0),
    "octant between north and north-west",
  ),
  _d(
    "west_northwest",
    "I4",
    "asc",
    "asc",
    (0, -1),
    (-1, -1),
    "octant between north-west and west",
  ),
  _d(
    "south_southwest",
    "I5",
    "desc",
    "asc",
    (+1, -1),
    (+1, 0),
    "octant between south and south-west",
  ),
  _d(
    "west_southwest",
    "I6",
    "desc",
    "asc",
    (0, -1),
    (+1, -1),
    "octant between west and south-west",
  ),
  _d(
    "south_southeast",
    "I7",
    "desc",
    "desc",
    (+1, +1),
    (+1, 0),
    "octant between south-east and south",
  ),
  _d(
    "east_southeast",
    "I8",
    "desc",
    "desc",
    (0, +1),
    (+1, +1),
    "octant between east and south-east",
  ),
)

DIRECTIONS: dict[str, Direction] = {d.name: d for d in _TABLE}
QUADRANTS: tuple[str, ...] = tuple(d.name for d in _TABLE[:4])
OCTANTS: tuple[str, ...] = tuple(d.name for d in _TABLE[4:])
_ALIASES: dict[str, Direction] = {d.alias: d for d in _TABLE}

DirectionLike = Union[str, Direction]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _visited_before(row_step: int, col_step: int, off) -> bool:
  return off[0] * row_step < 0 or (off[0] == 0 and off[1] * col_step < 0)


def validate(d: Direction) -> Direction:
  """Checks a Direction by the rules of the C++ ``make_direction``.

  Returns ``d`` (with its offsets as tuples of ints); raises a ValueError
  that names the rule broken.
  """
  if not (
    _is_int(d.row_step)
    and _is_int(d.col_step)
    and d.row_step in (1, -1)
    and d.col_step in (1, -1)
  ):
    raise ValueError(
      f"Invalid Direction {d.name!r}: row_step and col_step must each be +1 "
      f"or -1, got row_step={d.row_step!r}, col_step={d.col_step!r}."
    )
  offs = []
  for label, off in (("n1", d.n1), ("n2", d.n2)):
    try:
      off = tuple(off)
    except TypeError:
      off = None
    if (
      off is None
      or len(off) != 2
      or not all(_is_int(v) for v in off)
      or not all(v in (-1, 0, 1) for v in off)
    ):
      raise ValueError(
        f"Invalid Direction {d.name!r}: neighbour offset {label} must be a "
        f"(row, col) pair with each entry in {{-1, 0, +1}}, got {label}="
        f"{getattr(d, label)!r}."
      )
    offs.append(off)
  n1, n2 = offs
  if n1 == n2:
    raise ValueError(
      f"Invalid Direction {d.name!r}: neighbours n1 and n2 must differ, got "
      f"n1 = n2 = {n1}."
    )
  for label, off in (("n1", n1), ("n2", n2)):
    if not _visited_before(d.row_step, d.col_step, off):
      raise ValueError(
        f"Invalid Direction {d.name!r}: neighbours n1 and n2 must both be "
        f"visited before the pixel in the scan order (rows outer, columns "
        f"inner) given by row_step={d.row_step} and col_step={d.col_step}; "
        f"{label}={off} is not. With these steps the earlier neighbours "
        f"are {_earlier(d.row_step, d.col_step)}."
      )
  if (n1, n2) != (d.n1, d.n2):
    d = dataclasses.replace(d, n1=n1, n2=n2)
  return d


def _earlier(row_step: int, col_step: int) -> str:
  offs = [(-row_step, -1), (-row_step, 0), (-row_step, 1), (0, -col_step)]
  return ", ".join(str(o) for o in offs)


def resolve(direction: DirectionLike) -> Direction:
  """Returns the Direction for a readable name, an original alias or a Direction.

  Names and aliases are matched ignoring case (``"TL"``, ``"i3"``,
  ``"Top_Left"`` work); an unknown one is reported with the closest names.
  A Direction instance is validated (see the module docstring) and returned.
  """
  if isinstance(direction, Direction):
    return validate(direction)
  if isinstance(direction, str):
    found = (
      DIRECTIONS.get(direction)
      or _ALIASES.get(direction)
      or _BY_FOLDED_NAME.get(_fold(direction))
    )
    if found is not None:
      return found
  names = ", ".join(f"{d.name!r} (alias {d.alias!r})" for d in _TABLE)
  hint = ""
  if isinstance(direction, str):
    grouping = GROUPINGS.get(_fold(direction)) or LBYLNET_GROUPINGS.get(
      _fold(direction)
    )
    if grouping is not None:
      raise ValueError(
        f"{direction!r} is a grouping ({len(grouping)} channel groups), not "
        f"a direction: pass it to lmconv_jax.grouped_landmark_pool (or "
        f"LandmarkConv(directions=...)), or give one direction here: "
        f"{names}."
      )
    close = difflib.get_close_matches(_fold(direction), _BY_FOLDED_NAME, n=3)
    if close:
      hint = (
        " Did you mean "
        + " or ".join(
          repr(
            _BY_FOLDED_NAME[c].name
            if c == _BY_FOLDED_NAME[c].name
            else _BY_FOLDED_NAME[c].alias
          )
          for c in close
        )
        + "?"
      )
  raise ValueError(
    f"Unknown landmark-pool direction {direction!r}.{hint} Valid directions "
    f"(case does not matter) are: {names}. Use lmconv_jax.QUADRANTS or "
    f"lmconv_jax.OCTANTS for the groups."
  )


def _fold(name: str) -> str:
  """A direction name as resolve compares it: case and '-' / ' ' ignored."""
  return name.strip().lower().replace("-", "_").replace(" ", "_")


# Every name and alias, case-folded (resolve's second try, and its "did you
# mean" candidates).
_BY_FOLDED_NAME: dict[str, Direction] = {
  **{_fold(d.name): d for d in _TABLE},
  **{_fold(d.alias): d for d in _TABLE},
}


# --------------------------------------------------------------------------
# Groupings. Each group is a tuple of directions whose pools are merged by
# max (ties to the first listed, NaN propagates); a group of one direction is
# a plain pool. Group k pools channels [k*C/P, (k+1)*C/P).

TOP_BOTTOM = (("top_left", "top_right"), ("bottom_left", "bottom_right"))
LEFT_RIGHT = (("top_left", "bottom_left"), ("top_right", "bottom_right"))
ALL_QUADRANTS = (QUADRANTS,)
GROUPINGS = {
  "quadrants": tuple((d,) for d in QUADRANTS),  # P = 4 (PConv2d4)
  "octants": tuple((d,) for d in OCTANTS),  # P = 8 (PConv2d8)
  "top_bottom": TOP_BOTTOM,  # P = 2, merged by max
  "left_right": LEFT_RIGHT,  # P = 2, merged by max
  "all_quadrants": ALL_QUADRANTS,  # P = 1, merged by max
}

# LBYLNet's landmark blocks (svip-lab/LBYLNet, core/models/context/module.py),
# each in its own channel order: group k is the block's branch p{k+1}_conv1,
# pooled in the directions LBYLNet pools it in, merged in the order of its
# torch.max calls. Not in GROUPINGS (the library's own set, which the
# benchmarks and the exhaustive tests walk); resolve_grouping accepts both.
# "lbylnet_p4" is not "quadrants": LandmarkP4 concatenates tr, tl, bl, br.
# "lbylnet_p4x" pairs I5 (south-southwest) with I4 and I6 (west-southwest)
# with I7: two of its pairs are not adjacent wedges, as LBYLNet has them.
LBYLNET_GROUPINGS = {
  "lbylnet_p1": (("top_right", "top_left", "bottom_left", "bottom_right"),),
  "lbylnet_p2": (("top_right", "top_left"), ("bottom_left", "bottom_right")),
  "lbylnet_p2x": (("top_right", "bottom_right"), ("top_left", "bottom_left")),
  "lbylnet_p4": (
    ("top_right",),
    ("top_left",),
    ("bottom_left",),
    ("bottom_right",),
  ),
  "lbylnet_p4x": (
    ("east_northeast", "east_southeast"),  # I1, I8
    ("north_northeast", "north_northwest"),  # I2, I3
    ("west_northwest", "south_southwest"),  # I4, I5
    ("west_southwest", "south_southeast"),
  ),  # I6, I7
  "lbylnet_p8": tuple((d,) for d in OCTANTS),  # I1 ... I8
}

Grouping = Union[
  str, Direction, Iterable[Union[DirectionLike, Sequence[DirectionLike]]]
]


def _grouping_help() -> str:
  return (
    f"a grouping name ({', '.join(map(repr, GROUPINGS))}; LBYLNet's "
    f"blocks in its channel order: "
    f"{', '.join(map(repr, LBYLNET_GROUPINGS))}) or a sequence "
    f"of directions (each a direction name, a Direction, or a tuple of "
    f"them merged by max)"
  )


def resolve_grouping(directions: Grouping) -> tuple[tuple[Direction, ...], ...]:
  """Normalises a grouping to a tuple of groups of (validated) Directions.

  Accepts a grouping name, a single direction, or any iterable (a generator
  included) whose items are a direction or an iterable of directions.
  """
  if directions is None:
    raise ValueError(
      f"directions must be a grouping name or a sequence of directions, got "
      f"None. Give {_grouping_help()}."
    )
  if isinstance(directions, Direction):
    return ((resolve(directions),),)
  if isinstance(directions, str):
    if directions in GROUPINGS:
      directions = GROUPINGS[directions]
    elif directions in LBYLNET_GROUPINGS:
      directions = LBYLNET_GROUPINGS[directions]
    else:
      try:
        return ((resolve(directions),),)
      except ValueError:
        raise ValueError(
          f"Unknown grouping {directions!r}: expected {_grouping_help()}."
        ) from None
  try:
    items = list(directions)
  except TypeError:
    raise ValueError(
      f"directions must be a grouping name or a sequence of directions, got "
      f"{type(directions).__name__} {directions!r}. Give {_grouping_help()}."
    ) from None
  groups = []
  for k, item in enumerate(items):
    if isinstance(item, (str, Direction)):
      groups.append((resolve(item),))
      continue
    try:
      members = list(item)
    except TypeError:
      raise ValueError(
        f"directions: group {k} is {type(item).__name__} {item!r}, not a "
        f"direction or a tuple of directions. Give {_grouping_help()}."
      ) from None
    if not members:
      raise ValueError(
        f"directions: group {k} has no directions. Give each group at least "
        f"one direction, e.g. ('top_left',) or ('top_left', 'top_right')."
      )
    groups.append(tuple(resolve(m) for m in members))
  if not groups:
    raise ValueError(
      f"directions is empty (got {directions!r}). Give {_grouping_help()}."
    )
  return tuple(groups)
