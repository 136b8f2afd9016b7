"""The CUDA kernels, verified where there is no GPU, and on one where there is.

1. Emulation. ``lmconv_jax._lmconv_cuda_emu`` runs the CUDA kernel bodies
   (xla_ffi/cuda_schedule.h, the code cuda.cu launches) on the CPU for every
   block and thread of the launch the CUDA handler would make, phase by phase,
   behind FFI targets of its own. Its outputs and workspace start as NaN, so an
   element never written, or read before it is written, shows. The tests pin:
   bit-for-bit equality with the CPU kernels on the whole grid (12 directions x
   4 dtypes x 4 guide modes, shapes, NaN/inf, plans with split channels, blocks
   and threads run in reverse), agreement with the pure-jnp reference on the
   grid (test_ffi.py's tolerances; one jit per dtype for all of it) and with
   the SPEC oracle (float64), forward and backward.
2. Lowering. On this CPU-only machine, ``jax.jit(f).trace(x).lower(
   lowering_platforms=("cuda",))`` of forward and backward for every direction
   holds our custom calls and no while loop (the reference is all while loops).
3. GPU (``-m gpu``; skipped without an NVIDIA GPU): the grid against the
   reference on the device, and a tensor of more than 2**31 elements.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmconv_jax
from lmconv_jax import _ffi
from lmconv_jax.directions import DIRECTIONS, Direction

import inputs
import spec_oracle
import test_ffi   # the CPU kernels' grid: same dtypes, shapes and tolerances
from test_ffi import ALL, DTYPES, assert_close

GUIDED_MODES = ("full", "per_channel", "per_batch")
CPU = jax.devices("cpu")[0]

needs_emulator = pytest.mark.skipif(
    _ffi._EMULATOR is None or not _ffi.has_kernels("cpu"),
    reason="the CUDA emulator or the CPU extension is not built")


@pytest.fixture(autouse=True)
def _on_the_cpu_unless_marked_gpu(request):
  """The emulation tests compare with the CPU kernels, on the CPU, even on a
  machine with a GPU."""
  if request.node.get_closest_marker("gpu"):
    yield
  else:
    with jax.default_device(CPU):
      yield


# --------------------------------------------------------------------------
# Inputs and the three ways to run one case.

def grid_case(dtype, shape=(2, 5, 6, 3), seed=0):
  """x (one slice per input kind), {guide mode: full-shape guide}, ct."""
  x = np.stack([inputs.make_x(k, shape, seed) for k in inputs.KINDS])
  guides = {m: np.broadcast_to(inputs.make_guide(m, x.shape,
                                                 tie_heavy=m == "full"),
                               x.shape) for m in GUIDED_MODES}
  ct = inputs.make_ct(x.shape)
  dt = DTYPES[dtype]
  guides = {m: jnp.asarray(g, dt) for m, g in guides.items()}
  return jnp.asarray(x, dt), guides, jnp.asarray(ct, dt)


def emulated(d, x, g, ct, **plan):
  """(out, dx, dguide) from the CUDA kernels' CPU emulation (on the CPU)."""
  x, g, ct = jax.device_put((x, g, ct), CPU)
  out = _ffi._emulated_pool_forward(x, g, d, **plan)
  return (out,) + _ffi._emulated_pool_backward(x, g, out, ct, d, **plan)


def public(d, x, g, ct):
  """(out, dx, dguide) from landmark_pool(implementation="ffi") and jax.vjp,
  on the device x is on."""
  return test_ffi._vjp_fn(d, "ffi", g is not None)(x, g, ct)


def bits(a):
  """The bit patterns of an array (so -0.0 != 0.0 and NaNs compare)."""
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


def assert_same_bits(got, want):
  for g, w in zip(got, want):
    assert (g is None) == (w is None)
    if g is not None:
      assert g.dtype == w.dtype and g.shape == w.shape
      np.testing.assert_array_equal(bits(g), bits(w))


def assert_matches_reference(got, want, dtype, guided):
  """test_ffi.py's rules: exact with g = 1, a few ulps of scale otherwise."""
  out, dx, dg = got
  rout, rdx, rdg = want
  assert_close(out, rout, dtype, exact=not guided)
  scale = float(jnp.max(jnp.abs(jnp.asarray(rdx, jnp.float32))))
  assert_close(dx, rdx, dtype, exact=not guided and dtype in ("float32",
                                                                "float64"),
               scale=scale)
  if guided:
    dscale = float(jnp.max(jnp.abs(jnp.asarray(rdg, jnp.float32))))
    assert_close(dg, rdg, dtype, exact=False, scale=dscale)


@functools.lru_cache(maxsize=None)
def reference_grid(dtype, device_kind="cpu"):
  """{(direction, guide mode): (out, dx, dguide)} of the jnp reference.

  One jit for all directions and guide modes (the guided modes stacked along
  a new batch axis): compiling the reference's nested scans is what costs.
  """
  x, guides, ct = grid_case(dtype)
  g3 = jnp.stack([guides[m] for m in GUIDED_MODES])
  x3, ct3 = (jnp.broadcast_to(a, g3.shape) for a in (x, ct))

  def grid(x, ct, x3, g3, ct3):
    res = {}
    for name in ALL:
      pool = functools.partial(lmconv_jax.landmark_pool_reference,
                               direction=name)
      out, vjp = jax.vjp(pool, x)
      res[name, "none"] = (out,) + vjp(ct) + (None,)
      out, vjp = jax.vjp(lambda x, g: pool(x, guide=g), x3, g3)
      dx, dg = vjp(ct3)
      for k, m in enumerate(GUIDED_MODES):
        res[name, m] = (out[k], dx[k], dg[k])
    return res

  device = jax.devices(device_kind)[0]
  args = jax.device_put((x, ct, x3, g3, ct3), device)
  return jax.jit(grid)(*args)


# --------------------------------------------------------------------------
# 1. Emulation

@needs_emulator
@pytest.mark.parametrize("guide_mode", inputs.GUIDE_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ALL)
def test_emulated_cuda_kernels_equal_cpu_kernels_bit_for_bit(
    direction, dtype, guide_mode):
  d = DIRECTIONS[direction]
  x, guides, ct = grid_case(dtype)
  g = guides.get(guide_mode)
  assert_same_bits(emulated(d, x, g, ct), public(d, x, g, ct))


@needs_emulator
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_cuda_kernels_match_reference(dtype):
  """Every direction and guide mode against lmconv_jax's jnp reference."""
  x, guides, ct = grid_case(dtype)
  ref = reference_grid(dtype)
  for direction in ALL:
    for mode in inputs.GUIDE_MODES:
      g = guides.get(mode)
      got = emulated(DIRECTIONS[direction], x, g, ct)
      assert_matches_reference(got, ref[direction, mode], dtype, g is not None)


@needs_emulator
@pytest.mark.parametrize("guide_mode", inputs.GUIDE_MODES)
@pytest.mark.parametrize("direction", ALL)
def test_emulated_cuda_kernels_match_spec_oracle_float64(direction, guide_mode):
  d = DIRECTIONS[direction]
  x, guides, ct = grid_case("float64")
  g = guides.get(guide_mode)
  out, dx, dg = emulated(d, x, g, ct)
  xs, gs, cs = (None if a is None else np.asarray(a).reshape(
      (-1,) + a.shape[-3:]) for a in (x, g, ct))
  want_dx, want_dg = spec_oracle.backward(xs, d, gs, cs)
  tol = dict(rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.asarray(out).reshape(xs.shape),
                             spec_oracle.forward(xs, d, gs), **tol)
  np.testing.assert_allclose(np.asarray(dx).reshape(xs.shape), want_dx, **tol)
  if g is not None:
    np.testing.assert_allclose(np.asarray(dg).reshape(xs.shape), want_dg, **tol)


SHAPES = {**test_ffi.SHAPES,
          "wide_channels": (2, 4, 5, 70)}  # 3 channel chunks, the last partial


@needs_emulator
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", ALL)
def test_emulated_cuda_kernels_all_shapes(direction, shape, guided):
  d = DIRECTIONS[direction]
  shp = SHAPES[shape]
  x = jnp.asarray(inputs.make_x("small_int", shp, 5))
  g = jnp.asarray(inputs.make_guide("full", shp)) if guided else None
  ct = jnp.asarray(inputs.make_ct(shp))
  assert_same_bits(emulated(d, x, g, ct), public(d, x, g, ct))


@needs_emulator
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("direction", ALL)
def test_emulated_threads_with_several_pixel_batches_per_phase(direction,
                                                               guided):
  """Images large enough that each thread takes more than one batch of
  kBatch = 4 pixels per phase, the last batch partial."""
  d = DIRECTIONS[direction]
  shape = (1, 70, 75, 32)
  plan = _ffi._cuda_launch_plan(d, shape, multiprocessors=1)
  assert plan["lanes"] == 32 and plan["pixel_lanes"] == 8   # 9 pixels each
  x = jnp.asarray(inputs.make_x("relu", shape, 6))
  g = jnp.asarray(inputs.make_guide("full", shape)) if guided else None
  ct = jnp.asarray(inputs.make_ct(shape))
  assert_same_bits(emulated(d, x, g, ct, multiprocessors=1),
                   public(d, x, g, ct))


@needs_emulator
@pytest.mark.parametrize("direction", ["top_left", "bottom_right",
                                       "north_northeast", "west_southwest"])
def test_emulation_is_the_same_for_every_plan_and_thread_order(direction):
  """Splitting channels into more blocks, or running the blocks and threads of
  a phase in reverse (a race within a phase would show), changes no bit."""
  d = DIRECTIONS[direction]
  x, guides, ct = grid_case("float32", shape=(2, 7, 9, 40))
  for g in (None, guides["full"]):
    want = emulated(d, x, g, ct)
    for plan in (dict(multiprocessors=1), dict(multiprocessors=10**6),
                 dict(multiprocessors=1, order=1),
                 dict(multiprocessors=10**6, order=1)):
      assert_same_bits(emulated(d, x, g, ct, **plan), want)
  plans = {_ffi._cuda_launch_plan(d, x.shape, multiprocessors=m)["lanes"]
           for m in (1, 10**6)}
  assert plans == {32, 16}   # both plans really differ


@needs_emulator
@pytest.mark.parametrize("direction", ["top_left", "bottom_right",
                                       "north_northeast", "east_southeast"])
def test_emulated_nan_and_inf_equal_cpu_kernels(direction):
  x = inputs.make_x("small_int", (2, 6, 5, 3))
  for where, value in {(0, 2, 3, 1): np.nan, (1, 4, 1, 0): np.inf,
                       (1, 1, 1, 2): -np.inf, (0, 0, 0, 0): np.nan}.items():
    x[where] = value
  g = inputs.make_guide("full", x.shape, tie_heavy=True)
  ct = inputs.make_ct(x.shape)
  d = DIRECTIONS[direction]
  for dtype in ("float32", "bfloat16"):
    args = [jnp.asarray(a, DTYPES[dtype]) for a in (x, g, ct)]
    for guide in (None, args[1]):
      got = emulated(d, args[0], guide, args[2])
      assert np.isnan(np.asarray(got[0], np.float32)).sum() > 2
      assert_same_bits(got, public(d, args[0], guide, args[2]))


SKEWED = Direction("skewed", "skewed", +1, +1, (0, -1), (-1, +1),
                   "left neighbour and the one up and to the right")


@needs_emulator
def test_emulated_skewed_wavefront_direction_matches_cpu_and_oracle():
  """A valid direction that is neither an octant nor a quadrant (n = (0,-1)
  and (-1,+1)): the wavefront with phase 2i + j."""
  assert _ffi._cuda_launch_plan(SKEWED, (1, 4, 5, 2))["skew"] == 2
  x = inputs.make_x("small_int", (2, 6, 7, 3), 3)
  g = inputs.make_guide("full", x.shape, tie_heavy=True)
  ct = inputs.make_ct(x.shape)
  for guide in (None, g):
    jg = None if guide is None else jnp.asarray(guide)
    out, dx, dg = emulated(SKEWED, jnp.asarray(x), jg, jnp.asarray(ct))
    cpu_out = _ffi.pool_forward(jnp.asarray(x), jg, SKEWED)
    cpu_dx, cpu_dg = _ffi.pool_backward(jnp.asarray(x), jg, cpu_out,
                                        jnp.asarray(ct), SKEWED)
    assert_same_bits((out, dx, dg), (cpu_out, cpu_dx, cpu_dg))
    want_dx, want_dg = spec_oracle.backward(x, SKEWED, guide, ct)
    np.testing.assert_allclose(out, spec_oracle.forward(x, SKEWED, guide),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)


@needs_emulator
def test_emulated_zero_size_arrays_are_no_launch():
  for shape in [(0, 4, 4, 2), (2, 0, 4, 2), (2, 4, 0, 2), (2, 4, 4, 0)]:
    x = jnp.zeros(shape, jnp.float32)
    out, dx, _ = emulated(DIRECTIONS["top_left"], x, None, x)
    assert out.shape == dx.shape == shape


@needs_emulator
def test_cuda_handler_checks_reach_python():
  """The checks are shared by the CUDA and emulated handlers (cuda_ffi.h)."""
  bad = Direction("bad", "bad", +1, +1, (0, -1), (0, -1), "n1 == n2")
  x = jnp.ones((1, 3, 3, 2), jnp.float32)
  with pytest.raises(Exception, match="n1 and n2 must differ"):
    _ffi._emulated_pool_forward(x, None, bad)
  with pytest.raises(Exception, match="unsupported dtype"):
    _ffi._emulated_pool_forward(jnp.ones((1, 3, 3, 2), jnp.int32), None,
                                DIRECTIONS["top_left"])
  with pytest.raises(Exception, match="rank >= 3"):
    _ffi._emulated_pool_forward(jnp.ones((3, 2), jnp.float32), None,
                                DIRECTIONS["top_left"])


@needs_emulator
def test_build_info_says_when_nvcc_was_missing(monkeypatch):
  """A build without nvcc is CPU only and `python -m lmconv_jax info` (which
  prints _ffi.build_info()) says why."""
  class NoCudaBuild:
    @staticmethod
    def build_info():
      return {"cuda_compiled": False, "cuda_compiler": ""}
  monkeypatch.setattr(_ffi, "_MODULES",
                      {k: v for k, v in _ffi._MODULES.items() if k != "cuda"})
  monkeypatch.setattr(_ffi, "_EMULATOR", NoCudaBuild)
  info = _ffi.build_info()
  assert info["platforms"] == ("cpu",)
  assert not info["cuda"]["built"]
  assert "no CUDA compiler (nvcc)" in info["cuda"]["error"]


@needs_emulator
@pytest.mark.parametrize("direction", ALL)
def test_launch_plan_is_one_parallel_launch(direction):
  """The geometry the CUDA handler launches (and the emulator runs): one
  launch per call; octants take one phase per row or column, quadrants one
  per anti-diagonal; channels are split so the GPU has work; only the
  backward needs a workspace."""
  d = DIRECTIONS[direction]
  b, h, w, c = 64, 32, 48, 32
  fwd = _ffi._cuda_launch_plan(d, (b, h, w, c))        # on an H100
  bwd = _ffi._cuda_launch_plan(d, (b, h, w, c), backward=True)
  assert fwd["launches"] == bwd["launches"] == 1
  assert fwd["phases"] == bwd["phases"]
  if d.is_quadrant:
    assert (fwd["skew"], fwd["phases"]) == (1, h + w - 1)
  else:
    scans_columns = d.n1[1] == d.n2[1] != 0
    assert fwd["skew"] == 0 and fwd["transposed"] == scans_columns
    assert fwd["phases"] == (w if scans_columns else h)
  assert fwd["lanes"] == 16 and fwd["blocks"] == b * c // 16   # 2 chunks
  assert fwd["threads"] == 256
  assert fwd["workspace_elements"] == 0 < bwd["workspace_elements"]
  assert fwd["shared_bytes"] == 0


def tangent_case(dtype, guided, shape=(2, 5, 6, 3)):
  """(x, guide, tx, tguide): grid_case's x (every input kind, so ties
  everywhere) and tie-heavy guide, with NaNs in x and tx; guide and tguide
  are None unless guided."""
  x, guides, _ = grid_case(dtype, shape)
  x = np.array(x, np.float64)
  x[0, 1, 2, 3, 1] = x[2, 0, 0, 0, 0] = x[3, 1, 4, 5, 2] = np.nan
  tx = inputs.make_ct(x.shape, seed=3)
  tx[2, 0, 3, 2, 1] = np.nan   # x is constant there: x wins, t is NaN
  dt = DTYPES[dtype]
  g = guides["full"] if guided else None
  tg = jnp.asarray(inputs.make_ct(x.shape, seed=4), dt) if guided else None
  return jnp.asarray(x, dt), g, jnp.asarray(tx, dt), tg


def tangents(d, x, g, tx, tg, **plan):
  """(CPU kernel's tout, emulated CUDA kernel's tout) from the same out."""
  x, g, tx, tg = jax.device_put((x, g, tx, tg), CPU)
  out = _ffi.pool_forward(x, g, d)
  return (_ffi._emulated_pool_tangent(x, g, out, tx, tg, d, **plan),
          _ffi.pool_tangent(x, g, out, tx, tg, d))


@needs_emulator
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ALL)
def test_emulated_tangent_equals_cpu_tangent_bit_for_bit(direction, dtype,
                                                         guided):
  """The CUDA tangent kernel (emulated) against the CPU one: halves keep the
  running tangent in float32 on both, so every bit agrees."""
  d = DIRECTIONS[direction]
  got, want = tangents(d, *tangent_case(dtype, guided))
  assert np.isnan(np.asarray(got, np.float32)).any()
  assert_same_bits([got], [want])


@needs_emulator
@pytest.mark.parametrize("direction", ["top_left", "bottom_right",
                                       "north_northeast", "west_southwest"])
def test_emulated_tangent_is_the_same_for_every_plan_and_thread_order(
    direction):
  """Several pixel batches per thread and phase, split channels, reversed
  threads: the ring of the last two phases' tangents has no race."""
  d = DIRECTIONS[direction]
  plan = _ffi._cuda_launch_plan(d, (8, 37, 45, 32), tangent=True,
                                multiprocessors=1)
  assert plan["lanes"] == 32 and plan["pixel_lanes"] == 8   # 5 or 6 pixels
  for dtype in ("float32", "bfloat16"):
    for guided in (False, True):
      args = tangent_case(dtype, guided, shape=(2, 37, 45, 32))
      want = tangents(d, *args)[1]
      for plan in (dict(multiprocessors=1), dict(multiprocessors=1, order=1),
                   dict(multiprocessors=10**6, order=1)):
        assert_same_bits([tangents(d, *args, **plan)[0]], [want])


@needs_emulator
@pytest.mark.parametrize("direction", ALL)
def test_tangent_launch_plan_is_the_forward_launch(direction):
  """The tangent is one launch in the forward's geometry, with a workspace
  of two phases of float32 (or double) tangents per block."""
  d = DIRECTIONS[direction]
  shape = (64, 32, 48, 32)
  fwd = _ffi._cuda_launch_plan(d, shape)
  tan = _ffi._cuda_launch_plan(d, shape, tangent=True)
  bwd = _ffi._cuda_launch_plan(d, shape, backward=True)
  geometry = ("blocks", "threads", "phases", "lanes", "pixel_lanes", "skew",
              "shared_bytes", "launches")
  assert {k: tan[k] for k in geometry} == {k: fwd[k] for k in geometry}
  slots = fwd["view_width"] if fwd["skew"] == 0 else fwd["view_height"]
  assert tan["workspace_elements"] == fwd["blocks"] * 2 * slots * fwd["lanes"]
  assert 2 * tan["workspace_elements"] == bwd["workspace_elements"]
  with pytest.raises(ValueError, match="different kernels"):
    _ffi._cuda_launch_plan(d, shape, backward=True, tangent=True)


# --------------------------------------------------------------------------
# 2. Lowering for CUDA on a machine without a GPU

needs_cuda_build = pytest.mark.skipif(
    not _ffi.has_kernels("cuda"),
    reason="the CUDA kernels are not built (no nvcc at build time)")


def cuda_hlo(f, *args):
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def custom_call_targets(text):
  return sorted(re.findall(r"custom_call @(\w+)", text))


def has_loop(text):
  return re.search(r"stablehlo\.while|\bwhile\b", text) is not None


@needs_cuda_build
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("direction", ALL)
def test_cuda_lowering_is_our_custom_calls_and_no_loop(direction, guided):
  x = jnp.ones((2, 5, 6, 3), jnp.float32)
  g = jnp.full(x.shape, 0.5, jnp.float32) if guided else None
  suffix = "_guided" if guided else ""

  def fwd(x, g):
    return lmconv_jax.landmark_pool(x, direction, g, implementation="ffi")

  def grad(x, g):
    return jax.grad(lambda x, g: (fwd(x, g) * x).sum(),
                    argnums=(0, 1) if guided else 0)(x, g)

  text = cuda_hlo(fwd, x, g)
  assert custom_call_targets(text) == [f"lmconv_pool_fwd{suffix}"]
  assert not has_loop(text)
  text = cuda_hlo(grad, x, g)
  assert set(custom_call_targets(text)) == {f"lmconv_pool_fwd{suffix}",
                                            f"lmconv_pool_bwd{suffix}"}
  assert not has_loop(text)
  ref = cuda_hlo(lambda x, g: lmconv_jax.landmark_pool_reference(
      x, direction, g), x, g)
  assert has_loop(ref)     # what the kernels replace


@needs_cuda_build
@pytest.mark.parametrize("grouping", ["quadrants", "octants"])
def test_cuda_lowering_of_grouped_pools(grouping):
  x = jnp.ones((2, 8, 8, 16), jnp.float32)
  f = lambda x: lmconv_jax.grouped_landmark_pool(x, grouping,
                                                 implementation="ffi")
  text = cuda_hlo(jax.grad(lambda x: (f(x) * x).sum()), x)
  n = 4 if grouping == "quadrants" else 8
  targets = custom_call_targets(text)
  assert targets.count("lmconv_pool_fwd") == n
  assert targets.count("lmconv_pool_bwd") == n
  assert not has_loop(text)


@needs_cuda_build
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("direction", ALL)
def test_cuda_lowering_of_jvp_is_the_tangent_kernel_and_no_loop(direction,
                                                                guided):
  x = jnp.ones((2, 5, 6, 3), jnp.float32)
  g = jnp.full(x.shape, 0.5, jnp.float32) if guided else None
  suffix = "_guided" if guided else ""

  def jvp(x, g, tx, tg):
    if g is None:
      return jax.jvp(lambda x: lmconv_jax.landmark_pool(
          x, direction, implementation="ffi"), (x,), (tx,))
    return jax.jvp(lambda x, g: lmconv_jax.landmark_pool(
        x, direction, g, implementation="ffi"), (x, g), (tx, tg))

  text = cuda_hlo(jvp, x, g, x, g)
  assert custom_call_targets(text) == [f"lmconv_pool_fwd{suffix}",
                                       f"lmconv_pool_tangent{suffix}"]
  assert not has_loop(text)


# --------------------------------------------------------------------------
# 3. On a GPU

def _gpu():
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:
    return None


def needs_gpu(f):
  f = pytest.mark.skipif(not _ffi.has_kernels("cuda"),
                         reason="the CUDA kernels are not built")(f)
  f = pytest.mark.skipif(_gpu() is None, reason="no GPU visible to JAX")(f)
  return pytest.mark.gpu(f)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ALL)
def test_gpu_kernels_match_reference_and_emulation(direction, dtype):
  """The grid on the GPU against the reference on the GPU, and bit for bit
  against the emulation of the same kernels."""
  d = DIRECTIONS[direction]
  gpu = _gpu()
  x, guides, ct = grid_case(dtype)
  ref = reference_grid(dtype, "gpu")
  for mode in inputs.GUIDE_MODES:
    g = guides.get(mode)
    got = public(d, *jax.device_put((x, g, ct), gpu))
    assert got[0].devices() == {gpu}
    assert_matches_reference(got, ref[direction, mode], dtype, g is not None)
    if _ffi._EMULATOR is not None:
      assert_same_bits([None if a is None else jax.device_get(a) for a in got],
                       emulated(d, x, g, ct))


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_kernels_all_shapes(shape):
  gpu = _gpu()
  shp = SHAPES[shape]
  x = jnp.asarray(inputs.make_x("small_int", shp, 5))
  g = jnp.asarray(inputs.make_guide("full", shp))
  ct = jnp.asarray(inputs.make_ct(shp))
  for direction in ALL:
    d = DIRECTIONS[direction]
    for guide in (None, g):
      got = public(d, *jax.device_put((x, guide, ct), gpu))
      assert_same_bits([None if a is None else jax.device_get(a) for a in got],
                       emulated(d, x, guide, ct))


@needs_gpu
def test_gpu_kernels_index_past_2_to_the_31():
  """64-bit indexing: a float32 tensor of more than 2**31 elements (8.6 GB;
  skipped on a GPU with less than 60 GB). With g = 1 a quadrant is two
  cumulative maxima, which XLA computes independently."""
  gpu = _gpu()
  stats = gpu.memory_stats() or {}
  if stats.get("bytes_limit", 0) < 60 * 2**30:
    pytest.skip("needs a GPU with 60 GB")
  shape = (1, 1024, 1024, 2049)                       # 2**31 + 2**20 elements
  assert np.prod(shape) > 2**31
  key = jax.random.key(0)
  x = jax.device_put(jax.random.normal(key, shape, jnp.float32), gpu)
  d = DIRECTIONS["bottom_right"]
  out = jax.jit(lambda x: lmconv_jax.landmark_pool(
      x, d, implementation="ffi"))(x)
  want = jax.jit(lambda x: jax.lax.cummax(jax.lax.cummax(
      x, axis=1, reverse=True), axis=2, reverse=True))(x)
  assert bool(jnp.array_equal(out, want))
  del out, want
  dx = jax.jit(jax.grad(lambda x: lmconv_jax.landmark_pool(
      x, d, implementation="ffi").sum()))(x)
  # Every pixel's gradient lands on its landmark: the total is the pixel count.
  assert float(jnp.sum(dx, dtype=jnp.float64)) == np.prod(shape)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_tangent_kernels_match_emulation(dtype):
  """jax.jvp on the GPU (lmconv_pool_tangent[_guided]) against the emulation
  of the same kernels, bit for bit, and the CPU tangent kernel."""
  gpu = _gpu()
  for direction in ALL:
    d = DIRECTIONS[direction]
    for guided in (False, True):
      x, g, tx, tg = tangent_case(dtype, guided)
      on_gpu = jax.device_put((x, g, tx, tg), gpu)
      if guided:
        f = lambda x, g: lmconv_jax.landmark_pool(x, d, g,
                                                  implementation="ffi")
        out, tout = jax.jit(lambda *a: jax.jvp(f, a[:2], a[2:]))(
            *on_gpu)
      else:
        f = lambda x: lmconv_jax.landmark_pool(x, d, implementation="ffi")
        out, tout = jax.jit(lambda x, tx: jax.jvp(f, (x,), (tx,)))(
            on_gpu[0], on_gpu[2])
      assert tout.devices() == {gpu}
      got, want = tangents(d, x, g, tx, tg)
      assert_same_bits([jax.device_get(tout)], [got])
      assert_same_bits([jax.device_get(tout)], [want])
