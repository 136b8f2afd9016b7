"""The four demo models: one architecture, four kinds of convolution.

Every model is ``conv3x3(1 -> C) - relu - L(C -> C) - relu - L(C -> C) - relu
- global max - dense(4)``, where L is a 3x3 ``nn.Conv`` ("box"), a 3x3
``nn.Conv`` with dilation 2 then 4 ("dilated"), or a 3x3 LandmarkConv4 /
LandmarkConv8. A landmark convolution has exactly the parameters of the
``nn.Conv`` it extends, so the four models have the same parameter count,
the same FLOPs in their convolutions and differ only in what each pixel
sees: 7 x 7 pixels, 15 x 15 pixels, or the whole image by quadrants /
octants. The first layer is a plain convolution in all four (pooling a
one-channel image would not split into direction groups).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmconv_jax.demo.data import GLYPH
from lmconv_jax.linen import LandmarkConv4, LandmarkConv8

# How far apart (centre to centre) the two glyphs can be for one pixel of the
# last layer to see an edge of each: the window width plus GLYPH - 2. Three
# 3x3 convolutions see a 7-pixel window, the dilated stack a 15-pixel one.
BOX_FIELD, DILATED_FIELD = 7, 15
BOX_REACH, DILATED_REACH = BOX_FIELD + GLYPH - 2, DILATED_FIELD + GLYPH - 2


@dataclasses.dataclass(frozen=True)
class ModelKind:
  name: str  # the table's name
  key: str  # the CLI's name
  sees: str  # what one pixel of the last layer sees, in words


KINDS = {
  "box": ModelKind("box 3x3", "box", "7 x 7 pixels"),
  "dilated": ModelKind("dilated 3x3 (1, 2, 4)", "dilated", "15 x 15 pixels"),
  "lm4": ModelKind("LandmarkConv4", "lm4", "the whole image, by quadrant"),
  "lm8": ModelKind("LandmarkConv8", "lm8", "the whole image, by octant"),
}


class RelationNet(nn.Module):
  """Three convolutions, a global max and a linear classifier.

  Attributes:
    kind: ``"box"``, ``"dilated"``, ``"lm4"`` or ``"lm8"`` (see :data:`KINDS`).
    features: channels of every convolution (a multiple of 8 for ``"lm8"``).
    num_classes: outputs of the classifier.
    implementation: the landmark pool's implementation.
  """

  kind: str
  features: int = 16
  num_classes: int = 4
  implementation: str = "auto"
  padding: str = "CIRCULAR"

  def _layer(self, index: int):
    c, name = self.features, f"conv{index}"
    if self.kind == "box":
      return nn.Conv(c, (3, 3), padding=self.padding, name=name)
    if self.kind == "dilated":
      return nn.Conv(
        c,
        (3, 3),
        kernel_dilation=2 ** (index - 1),
        padding=self.padding,
        name=name,
      )
    cls = {"lm4": LandmarkConv4, "lm8": LandmarkConv8}[self.kind]
    return cls(
      c,
      (3, 3),
      padding=self.padding,
      implementation=self.implementation,
      name=name,
    )

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(
      nn.Conv(self.features, (3, 3), padding=self.padding, name="conv1")(x)
    )
    for index in (2, 3):
      self.sow("intermediates", f"conv{index}_input", h)
      h = nn.relu(self._layer(index)(h))
    h = jnp.max(h, axis=(-3, -2))
    self.sow("intermediates", "features", h)
    return nn.Dense(self.num_classes, name="head")(h)


def count_params(params) -> int:
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
