"""The fused MX / NVFP4 quantize and dequantize kernels store and read exactly the bits of `lb.quantize` /
`lb.dequantize`.

Runs the kernels in Pallas's interpreter on CPU (Triton on a GPU) on small tiles, so the grid has several
programs in both directions and a ragged last row tile.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.formats import ELEMENTS
from pallas_kernels import quantize as qk
from test_exact import canon_bits, nvfp4_tie_blocks

BACKEND = "interpret" if jax.default_backend() == "cpu" else "triton"
FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp4", "mxint8")
TILES = dict(block_rows=8, block_cols=128)


def _inputs(dtype, rows=20, cols=256, seed=0):
  """Blocks of 32 along the last axis of many magnitudes (2^-20 .. 2^20), plus special blocks: ties on every
  element grid (k / 32 for integers |k| < 256), powers of two, a NaN, an Inf, an all-zero and a -0.0 block."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, cols // 32, 32)).astype(np.float32)
  x *= 2.0 ** rng.integers(-20, 21, (rows, cols // 32, 1))
  x[0, 0] = rng.integers(-255, 256, 32) / 32
  x[0, 1] = rng.integers(-255, 256, 32) / 32 * 2.0 ** 7
  x[1, 0] = 2.0 ** rng.integers(-8, 9, 32) * rng.choice([-1, 1], 32)
  x[2, 0, 5] = np.nan
  x[2, 1, 7] = -np.inf
  x[3, 0] = 0.0
  x[3, 1] = -0.0
  x[4, 0, :16] = 0.0  # a half-zero block
  return jnp.asarray(x.reshape(rows, cols)).astype(dtype)


def xla_quantize(x, fmt, **kw):
  """`lb.quantize` computed on the CPU, where it is the XLA computation (on a GPU it would run these kernels), and
  put back on the default device."""
  return jax.device_put(lb.quantize(jax.device_put(x, jax.devices("cpu")[0]), fmt, **kw), jax.devices()[0])


def xla_dequantize(q, dtype):
  """`lb.dequantize` on the CPU, where it is the XLA computation (on a GPU it would run these kernels). NaN payloads
  differ between backends, so results are compared through `canon_bits`."""
  return lb.dequantize(jax.device_put(q, jax.devices("cpu")[0]), dtype)


def _bits(a):
  a = np.asarray(a)
  return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ("floor", "ceil", "even", "rceil"))
def test_quantize_matches_xla(fmt, mode):
  x = _inputs(jnp.float32 if mode != "floor" else jnp.bfloat16)
  data, scale, _ = qk.quantize_rows(x, fmt, scale_mode=mode, backend=BACKEND, **TILES)
  ref = xla_quantize(x, fmt, scale_mode=mode)
  assert data.dtype == ref.data.dtype and scale.dtype == ref.scale.dtype
  np.testing.assert_array_equal(_bits(scale), _bits(ref.scale))
  np.testing.assert_array_equal(_bits(data), _bits(ref.data))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16, jnp.float16))
def test_dequantize_matches_xla(fmt, dtype):
  ref = lb.quantize(_inputs(jnp.float32, seed=1), fmt, scale_mode="even")
  out = qk.dequantize_rows(ref.data, ref.scale, fmt, dtype, backend=BACKEND, **TILES)
  expected = xla_dequantize(ref, dtype)
  assert out.dtype == expected.dtype and out.shape == expected.shape
  np.testing.assert_array_equal(canon_bits(out), canon_bits(expected))


def test_rejects_unsupported():
  with pytest.raises(ValueError, match="6-bit"):
    qk.quantize_rows(jnp.zeros((8, 64)), "mxfp6_e2m3", backend=BACKEND)
  with pytest.raises(ValueError, match="absmax formats other than"):
    qk.quantize_rows(jnp.zeros((8, 64)), "int4_g32_sym", backend=BACKEND)
  with pytest.raises(ValueError, match="needs its tensor scale"):
    qk.quantize_rows(jnp.zeros((8, 64)), "nvfp4", backend=BACKEND)


NVFP4_NOSCALE = lb.Format("nvfp4_b32_no_g", "float4_e2m1fn", (32,), "float8_e4m3fn")


@pytest.mark.parametrize("g", [None, 1.0, 0.3, 2.0 ** -20, 1.7e-3, 2.0 ** -60, 2.0 ** -100, 1.5 * 2.0 ** 100])
def test_nvfp4_matches_xla(g):
  """Given and computed tensor scales; E4M3 and E2M1 rounding ties; scales that round to zero or clamp at 448;
  quotients beyond float32 (g = 2^-60 with elements of 1e30 saturate); g below 2^-80 and above 2^100 (divisors
  that the kernel rescales by large powers of two)."""
  x = np.array(_inputs(jnp.float32, rows=40, cols=256, seed=2))
  gg = np.float32(g) if g is not None else np.float32(np.max(np.abs(x[np.isfinite(x)]))) / np.float32(2688)
  tb = nvfp4_tie_blocks(gg)
  x[8:8 + -(-len(tb) // 16)].reshape(-1, 16)[:len(tb)] = tb
  x[5, :16] = 1e-30  # s rounds to zero unless g is tiny
  x[6, :32] = np.linspace(-1e30, 1e30, 32)
  x = jnp.asarray(x)
  ref = xla_quantize(x, "nvfp4", tensor_scale=g)
  data, scale, _ = qk.quantize_rows(x, "nvfp4", ref.tensor_scale, backend=BACKEND, **TILES)
  np.testing.assert_array_equal(_bits(scale), _bits(ref.scale))
  np.testing.assert_array_equal(_bits(data), _bits(ref.data))
  for dtype in (jnp.float32, jnp.bfloat16):
    out = qk.dequantize_rows(ref.data, ref.scale, "nvfp4", dtype, ref.tensor_scale, backend=BACKEND, **TILES)
    np.testing.assert_array_equal(canon_bits(out), canon_bits(xla_dequantize(ref, dtype)))


def test_nvfp4_rule_without_tensor_scale():
  x = _inputs(jnp.bfloat16, seed=3)
  ref = xla_quantize(x, NVFP4_NOSCALE)
  data, scale, _ = qk.quantize_rows(x, NVFP4_NOSCALE, backend=BACKEND, **TILES)
  np.testing.assert_array_equal(_bits(scale), _bits(ref.scale))
  np.testing.assert_array_equal(_bits(data), _bits(ref.data))
  out = qk.dequantize_rows(ref.data, ref.scale, NVFP4_NOSCALE, jnp.float32, backend=BACKEND, **TILES)
  np.testing.assert_array_equal(canon_bits(out), canon_bits(xla_dequantize(ref, jnp.float32)))


def _quotients(x, d):
  """In a kernel: (x / d by a per-block reciprocal (`rcp_rn`) and `div_by`, x / d by `div_rn`)."""
  from jax.experimental import pallas as pl
  from pallas_kernels import backend as kb

  def kernel(x_ref, d_ref, q_ref, e_ref):
    x, d = x_ref[...], d_ref[...]
    q_ref[...] = kb.div_by(x, d, kb.rcp_rn(d, backend=BACKEND), backend=BACKEND)
    e_ref[...] = kb.div_rn(x, d, backend=BACKEND)

  rows, cols = x.shape
  spec = pl.BlockSpec((8, cols), lambda i: (i, 0))
  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return kb.call(kernel, backend=BACKEND, out_shape=(out, out), grid=(rows // 8,), in_specs=[spec, spec],
                 out_specs=(spec, spec))(x, d)


def test_kernel_division_is_correctly_rounded():
  """The NVFP4 kernel's quotients against numpy's (float64 division rounded to float32 is the correctly rounded
  float32 quotient: 53 >= 2 * 24 + 2 bits). Divisors are E4M3 values times a tensor scale; numerators are random,
  and exact midpoints k/2 * d, k/4 * d of the E2M1 grid nudged by up to 3 ulps."""
  rows = 512 if BACKEND == "triton" else 16
  rng = np.random.default_rng(5)
  e4m3 = np.arange(1, 127, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)
  d = (rng.choice(e4m3, (rows, 1)) * np.float32(0.3) * np.exp2(rng.integers(-40, 40, (rows, 1)))).astype(np.float32)
  d = np.broadcast_to(d, (rows, 1024)).copy()
  x = (rng.standard_normal((rows, 1024)) * d * 3).astype(np.float32)
  mids = (rng.integers(-13, 14, (rows, 512)) / rng.choice([2.0, 4.0], (rows, 512)) * d[:, :512]).astype(np.float32)
  nudged = (mids.view(np.int32) + rng.integers(-3, 4, mids.shape).astype(np.int32)).view(np.float32)
  x[:, :512] = np.where(mids == 0, mids, nudged)
  x[:, 600] = -0.0
  q, e = _quotients(jnp.asarray(x), jnp.asarray(d))
  want = (x.astype(np.float64) / d.astype(np.float64)).astype(np.float32)
  np.testing.assert_array_equal(_bits(e), _bits(want))
  nonzero = x != 0  # div_by loses the sign of a zero numerator (the kernel takes signs from x)
  np.testing.assert_array_equal(_bits(q)[nonzero], _bits(want)[nonzero])


@pytest.mark.parametrize("fmt", ["int8_channel_sym", "fp8_block_1x128"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_absmax_rows_match_xla(fmt, dtype):
  """Per-row int8 (per-token activations) and 1 x 128 block FP8: ties of the integer grid (k + 1/2 times a
  power-of-two scale), saturation, NaN / Inf rows, zero and -0.0 rows, tiny rows."""
  x = np.array(_inputs(jnp.float32, rows=24, cols=256, seed=4))
  x[5] = (np.arange(256) - 128 + 0.5) * 2.0 ** -3  # s = 127.5 / 8 / 127 is not a power of two: quotients near ties
  x[6] = np.round(np.linspace(-127, 127, 256)) * 2.0 ** -5  # amax = 127 * 2^-5: s = 2^-5, every tie exact
  x[6, 1::7] += 2.0 ** -6
  x[7] = 0.0
  x[8] = -0.0
  x[9] *= 2.0 ** -100  # (float32-subnormal scales are a CPU limitation of the XLA path: README)
  x = jnp.asarray(x).astype(dtype)
  ref = lb.quantize(x, fmt)
  tiles = dict(block_rows=4, block_cols=128)
  data, scale, _ = qk.quantize_rows(x, fmt, backend=BACKEND, **tiles)
  assert data.dtype == ref.data.dtype and scale.dtype == ref.scale.dtype and scale.shape == ref.scale.shape
  np.testing.assert_array_equal(_bits(scale), _bits(ref.scale))
  np.testing.assert_array_equal(_bits(data), _bits(ref.data))


def test_absmax_row_length_limits():
  with pytest.raises(ValueError, match="power-of-two row length"):
    qk.quantize_rows(jnp.ones((4, 96)), "int8_channel_sym", backend=BACKEND)
  with pytest.raises(ValueError, match="absmax formats other than"):
    qk.quantize_rows(jnp.ones((4, 128)), "int4_channel_sym", backend=BACKEND)


@pytest.mark.parametrize("fmt,dtype", [
    ("mxfp8_e4m3", jnp.bfloat16), ("mxfp8_e5m2", jnp.float32), ("mxfp4", jnp.bfloat16), ("mxint8", jnp.float16),
    ("nvfp4", jnp.bfloat16), ("int4_g32_asym", jnp.bfloat16), ("int4_g128_sym", jnp.float32),
    ("int8_g64_sym", jnp.bfloat16), ("int8_g32_asym", jnp.float32), ("fp8_block_1x128", jnp.bfloat16),
    ("mxfp6_e2m3", jnp.bfloat16), ("mxfp6_e3m2", jnp.float32), ("int2_g64_asym", jnp.bfloat16),
    ("int3_g32_sym", jnp.float32)])
def test_dequantize_cols_matches_xla(fmt, dtype):
  """Weights blocked along axis 0 (K): the column kernel reads the stored bits as `lb.dequantize` does, on tiles
  that overhang both axes (K = 384 in tiles of 256 rows, 20 columns in tiles of 8), with the special blocks of
  `_inputs` (ties, NaN, Inf, zero and -0.0 blocks) running down the columns."""
  x = jnp.asarray(np.array(_inputs(jnp.float32, rows=20, cols=384, seed=6)).T)
  ref = lb.quantize(x, fmt, axis=0)
  out = qk.dequantize_cols(ref.data, ref.scale, fmt, dtype, ref.tensor_scale, ref.zero_point, backend=BACKEND,
                           block_rows=256, block_cols=8)
  expected = xla_dequantize(ref, dtype)
  assert out.dtype == expected.dtype and out.shape == expected.shape == x.shape
  np.testing.assert_array_equal(canon_bits(out), canon_bits(expected))


def test_dequantize_cols_rejects():
  q = lb.quantize(jnp.ones((64, 8)), "mxfp4", axis=0)
  with pytest.raises(ValueError, match="not a power of two"):
    qk.dequantize_cols(q.data, q.scale, lb.Format("mxfp4_b48", "float4_e2m1fn", (48,), "float8_e8m0fnu"),
                       backend=BACKEND)
  with pytest.raises(ValueError, match="per-channel"):
    qk.dequantize_cols(q.data, q.scale, "int4_channel_sym", backend=BACKEND)
  with pytest.raises(ValueError, match="needs"):
    qk.dequantize_cols(q.data[:8], q.scale, "mxfp4", backend=BACKEND)
  with pytest.raises(ValueError, match="zero points"):
    qk.dequantize_cols(q.data, q.scale.astype(jnp.bfloat16), "int4_g32_asym", backend=BACKEND)


@pytest.mark.parametrize("element", ["float4_e2m1fn", "float6_e2m3fn", "float8_e4m3fn", "float8_e5m2"])
def test_element_codes_match_ml_dtypes(element):
  """The kernels' element encoder against ml_dtypes' round-to-nearest-even cast of the value clipped to the
  largest element: every grid value and midpoint within 4 float32 ulps either side, both signs, values past
  the largest element, float32 subnormals, random values of many magnitudes; NaN saturates, keeping its sign."""
  el = ELEMENTS[element]
  ml = np.dtype(getattr(ml_dtypes, element))
  grid = np.arange(2 ** (el.bits - 1), dtype=np.uint8).view(ml).astype(np.float32)
  grid = grid[np.isfinite(grid)]
  base = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, np.float32([1.5, 4, 1e30]) * el.max, [2.0 ** -140]])
  near = (base.astype(np.float32).view(np.int32)[:, None] + np.arange(-4, 5)).ravel()
  rng = np.random.default_rng(7)
  rand = rng.standard_normal(20000).astype(np.float32) * np.exp2(rng.uniform(-30, 10, 20000)).astype(np.float32)
  y = np.concatenate([near[near >= 0].view(np.float32), rand, [0.0]]).astype(np.float32)
  y = np.concatenate([y, -y])
  want = np.copysign(np.minimum(np.abs(y), np.float32(el.max)), y).astype(ml).view(np.uint8)
  got = np.asarray(qk._float_codes(jnp.asarray(y), el, backend="interpret"))
  np.testing.assert_array_equal(got, want.astype(np.int32))
  top = int(np.float32(el.max).astype(ml).view(np.uint8))
  nan = np.float32([np.nan, np.copysign(np.nan, -1)])
  got = np.asarray(qk._float_codes(jnp.asarray(nan), el, backend="interpret"))
  np.testing.assert_array_equal(got, [top, top | 1 << el.bits - 1])
