"""Test inputs: tie-heavy (small integers, post-ReLU zeros, constant planes) and random."""

import numpy as np
import pytest

KINDS = ("small_int", "relu", "constant", "random")
GUIDE_MODES = ("none", "full", "per_channel", "per_batch")


def make_x(kind, shape, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "small_int":
    return rng.integers(-2, 3, shape).astype(np.float64)
  if kind == "relu":
    return np.maximum(rng.normal(size=shape), 0.0)
  if kind == "constant":
    return np.full(shape, 1.5)
  if kind == "random":
    return rng.normal(size=shape)
  raise ValueError(kind)


def stacked_kinds(shape, seed=0):
  """(4,) + shape: one make_x slice per input kind, ties everywhere."""
  return np.stack([make_x(k, shape, seed) for k in KINDS])


def make_guide(mode, shape, seed=1, tie_heavy=False):
  """A guide of the given broadcast mode; any finite values, not only [0, 1]."""
  if mode == "none":
    return None
  rng = np.random.default_rng(seed)
  gshape = {
    "full": shape,
    "per_channel": shape[-1:],
    "per_batch": shape[:-3] + (1, 1, 1),
  }[mode]
  if tie_heavy:
    return rng.choice([0.0, 0.5, 1.0, 1.5, -0.5], size=gshape)
  return rng.uniform(-0.5, 1.5, gshape)


def make_ct(shape, seed=2):
  """Small-integer cotangents: with g = 1 every gradient is an exact integer."""
  return np.random.default_rng(seed).integers(-3, 4, shape).astype(np.float64)


def dtype_params(names):
  """pytest parameters for dtype names: float64's is marked x64, which turns
  jax_enable_x64 on for that case only (tests/conftest.py)."""
  return [
    pytest.param(n, marks=pytest.mark.x64) if n == "float64" else n
    for n in names
  ]
