"""lmconv_jax: landmark convolution for JAX and Flax, on XLA custom calls."""

from lmconv_jax.directions import DIRECTIONS, OCTANTS, QUADRANTS, Direction
from lmconv_jax.ops import (
  ALL_QUADRANTS,
  GROUPINGS,
  IMPLEMENTATIONS,
  LEFT_RIGHT,
  TOP_BOTTOM,
  grouped_landmark_pool,
  landmark_pool,
  landmark_pool_reference,
)
from lmconv_jax.landmarks import (
  grouped_landmark_map,
  grouped_landmarks,
  landmark_map,
  landmarks,
)
from lmconv_jax.linen import (
  LandmarkBlock,
  LandmarkConv,
  LandmarkConv4,
  LandmarkConv8,
)
from lmconv_jax import nnx
from lmconv_jax import lbylnet
from lmconv_jax._ffi import export_disabled_checks

__version__ = "0.1.0"

__all__ = [
  "ALL_QUADRANTS",
  "DIRECTIONS",
  "Direction",
  "GROUPINGS",
  "IMPLEMENTATIONS",
  "LEFT_RIGHT",
  "OCTANTS",
  "QUADRANTS",
  "TOP_BOTTOM",
  "grouped_landmark_pool",
  "landmark_pool",
  "landmark_pool_reference",
  "grouped_landmark_map",
  "grouped_landmarks",
  "landmark_map",
  "landmarks",
  "LandmarkBlock",
  "export_disabled_checks",
  "LandmarkConv",
  "LandmarkConv4",
  "LandmarkConv8",
  "nnx",
  "lbylnet",
]
