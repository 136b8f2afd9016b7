"""The CPU schedules: which one plan_cpu (xla_ffi/cpu_plan.h) picks for each
call at 1, 2 and 16 threads, and every schedule run, through the CPU
module's test-only thread count (set_plan_threads), bit for bit against the
reference, whatever machine runs the suite: the plan is made for the thread
count given, and the items still run on XLA's pool.

The kinds (cpu_plan.h: CpuKind), one per schedule:
  forward_image_rows    an item per image, the groups of one row order swept
                        together (forward_views)
  forward_items         (image, channel block) items: forward_item
  forward_code_members  + merged unguided groups writing winner codes
  forward_saved_members + merged guided groups writing their member pools
  forward_ring_merge    + merged groups merging as they go (inference)
  tangent_items         TangentPass per member
  tangent_codes         + merged unguided groups from their winner codes
  backward_image_rows   an item per (image, row order): backward_views
  backward_lines        items of whole lines, those of one scan order swept
                        together (backward_views)
  backward_items        backward_item per group and member
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmconv_jax
from lmconv_jax import _ffi

import emulator
import inputs
from spec_oracle import assert_same_bits

pytestmark = pytest.mark.skipif(
  not _ffi.has_kernels("cpu"), reason="the CPU extension is not built"
)
needs_emulator = pytest.mark.skipif(
  emulator.EMULATOR is None,
  reason="built without the emulator module (LMCONV_EMULATOR=OFF)",
)

THREADS = (1, 2, 16)
MIXED = (
  ("top_left",),
  ("top_left",),
  ("top_right", "bottom_right"),
  ("bottom_left",),
)

# name: (grouping, shape, dtype, guided, {pass: kind or {threads: kind}});
# "inference" is the forward that saves no member pools, "forward" the one
# under differentiation.
CASES = {
  # Narrow groups (8 float32 channels: half a line), four per row order.
  "octants_float32": (
    "octants",
    (4, 17, 19, 64),
    "float32",
    False,
    {
      "inference": {
        1: "forward_image_rows",
        2: "forward_image_rows",
        16: "forward_items",
      },
      "forward": {
        1: "forward_image_rows",
        2: "forward_image_rows",
        16: "forward_items",
      },
      "tangent": "tangent_items",
      "backward": {
        1: "backward_image_rows",
        2: "backward_image_rows",
        16: "backward_lines",
      },
    },
  ),
  "octants_float16": (
    "octants",
    (2, 16, 16, 128),
    "float16",
    False,
    {
      "inference": {
        1: "forward_image_rows",
        2: "forward_image_rows",
        16: "forward_items",
      },
      "forward": {
        1: "forward_image_rows",
        2: "forward_image_rows",
        16: "forward_items",
      },
      "tangent": "tangent_items",
      "backward": {
        1: "backward_image_rows",
        2: "backward_image_rows",
        16: "backward_lines",
      },
    },
  ),
  # Lines of two column orders: swept by row order, never by line.
  "quadrants_bfloat16": (
    "quadrants",
    (2, 16, 16, 64),
    "bfloat16",
    False,
    {
      "inference": {
        1: "forward_image_rows",
        2: "forward_image_rows",
        16: "forward_items",
      },
      "forward": {
        1: "forward_image_rows",
        2: "forward_image_rows",
        16: "forward_items",
      },
      "tangent": "tangent_items",
      "backward": {
        1: "backward_image_rows",
        2: "backward_image_rows",
        16: "backward_items",
      },
    },
  ),
  # Whole lines, one image: the items split channels for the threads.
  "quadrants_wide_float32": (
    "quadrants",
    (1, 24, 24, 512),
    "float32",
    False,
    {
      "inference": {
        1: "forward_image_rows",
        2: "forward_items",
        16: "forward_items",
      },
      "forward": {
        1: "forward_image_rows",
        2: "forward_items",
        16: "forward_items",
      },
      "tangent": "tangent_items",
      "backward": {
        1: "backward_image_rows",
        2: "backward_image_rows",
        16: "backward_items",
      },
    },
  ),
  "top_bottom_float32": (
    "top_bottom",
    (2, 20, 24, 64),
    "float32",
    False,
    {
      "inference": "forward_ring_merge",
      "forward": "forward_code_members",
      "tangent": "tangent_codes",
      "backward": "backward_items",
    },
  ),
  "top_bottom_guided_float32": (
    "top_bottom",
    (2, 20, 24, 64),
    "float32",
    True,
    {
      "inference": "forward_ring_merge",
      "forward": "forward_saved_members",
      "tangent": "tangent_items",
      "backward": "backward_items",
    },
  ),
  # A line of two top_left groups (swept together) beside a merged group.
  "mixed_lines_float32": (
    MIXED,
    (3, 20, 20, 32),
    "float32",
    False,
    {
      "inference": "forward_ring_merge",
      "forward": "forward_code_members",
      "tangent": "tangent_codes",
      "backward": "backward_lines",
    },
  ),
}


def _kind(expected, threads):
  return expected if isinstance(expected, str) else expected[threads]


def _plan(name, pass_, threads):
  grouping, shape, dtype, guided, _ = CASES[name]
  return emulator.cpu_plan(
    grouping,
    shape,
    "forward" if pass_ == "inference" else pass_,
    threads=threads,
    dtype=dtype,
    guide_shape=shape[-1:] if guided else None,
    saved_members=pass_ != "inference",
  )


@needs_emulator
@pytest.mark.parametrize("name", CASES)
def test_plan_of_each_schedule_at_1_2_and_16_threads(name):
  for pass_, expected in CASES[name][4].items():
    for threads in THREADS:
      plan = _plan(name, pass_, threads)
      assert plan["kind"] == _kind(expected, threads), (pass_, threads, plan)


@needs_emulator
def test_every_kind_is_planned_by_some_case():
  kinds = {
    _plan(name, pass_, threads)["kind"]
    for name in CASES
    for pass_ in CASES[name][4]
    for threads in THREADS
  }
  assert kinds == {
    "forward_image_rows",
    "forward_items",
    "forward_code_members",
    "forward_saved_members",
    "forward_ring_merge",
    "tangent_items",
    "tangent_codes",
    "backward_image_rows",
    "backward_lines",
    "backward_items",
  }


@needs_emulator
def test_work_items_of_the_plans():
  """Items split a group's channels only while there are fewer than the
  threads; narrow groups that fill lines go a line per item; the image kinds
  are an item per image (forward) or per image and row order (backward)."""
  one = _plan("quadrants_wide_float32", "forward", 1)
  assert (one["items"], one["items_per_image"]) == (1, 1)
  two = _plan("quadrants_wide_float32", "forward", 2)
  assert (two["items"], two["block"], two["nblocks"]) == (4, 128, 1)
  many = _plan("quadrants_wide_float32", "forward", 16)
  assert (many["items"], many["block"], many["nblocks"]) == (16, 32, 4)
  rows = _plan("octants_float32", "backward", 2)
  assert (rows["items"], rows["items_per_image"]) == (8, 2)
  lines = _plan("octants_float32", "backward", 16)
  assert lines["whole_groups"] and lines["block"] == 16
  assert lines["swept_together"] == [0, 1, 2, 3]
  mixed = _plan("mixed_lines_float32", "backward", 2)
  assert mixed["swept_together"] == [0]  # the merged group's line is not


@contextlib.contextmanager
def _plan_threads(threads):
  from lmconv_jax import _lmconv_cpu

  previous = _lmconv_cpu.set_plan_threads(threads)
  try:
    yield
  finally:
    _lmconv_cpu.set_plan_threads(previous)


def _operands(shape, dtype, guided):
  # Small integers with post-ReLU zeros and NaNs, a guide of 0s and 1s,
  # integer cotangents and tangents: every value is an integer and every sum
  # exact, so the guide's reduction (summed in any order) has the
  # reference's bits too.
  x = np.maximum(inputs.make_x("small_int", shape), 0) + inputs.make_x(
    "small_int", shape, 1
  )
  x[0, 2, 3, 1] = np.nan
  x[-1, -3, 5, -1] = np.nan
  rng = np.random.default_rng(5)
  g = rng.integers(0, 2, shape[-1:]).astype(np.float64) if guided else None
  tx = inputs.make_ct(shape, seed=7)
  tg = rng.integers(-2, 3, shape[-1:]).astype(np.float64) if guided else None
  ct = inputs.make_ct(shape)
  as_dtype = lambda a: None if a is None else jnp.asarray(a).astype(dtype)
  return tuple(as_dtype(a) for a in (x, g, tx, tg, ct))


def _run(grouping, x, g, tx, tg, ct, impl):
  pool = lambda x, g: lmconv_jax.grouped_landmark_pool(
    x, grouping, g, implementation=impl
  )
  infer = jax.jit(pool)(x, g)
  if g is None:
    out, vjp = jax.vjp(lambda x: pool(x, None), x)
    grads = vjp(ct)
    t = jax.jvp(lambda x: pool(x, None), (x,), (tx,))[1]
  else:
    out, vjp = jax.vjp(pool, x, g)
    grads = vjp(ct)
    t = jax.jvp(pool, (x, g), (tx, tg))[1]
  return (infer, out, t) + tuple(grads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("name", CASES)
def test_every_schedule_equals_the_reference(name, threads):
  grouping, shape, dtype, guided, _ = CASES[name]
  x, g, tx, tg, ct = _operands(shape, dtype, guided)
  want = _run(grouping, x, g, tx, tg, ct, "reference")
  with _plan_threads(threads):
    got = _run(grouping, x, g, tx, tg, ct, "ffi")
  names = ("inference", "forward", "tangent", "dx", "dguide")
  for label, a, b in zip(names, got, want):
    assert_same_bits(a, b, f"{label} of {name} at {threads} threads")
