"""The fused MX quantize / dequantize kernels store and read exactly the bits of `lb.quantize` / `lb.dequantize`.

Runs the kernels in Pallas's interpreter on CPU (Triton on a GPU) on small tiles, so the grid has several
programs in both directions and a ragged last row tile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from pallas_kernels import quantize as qk

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


def _bits(a):
  a = np.asarray(a)
  return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ("floor", "ceil", "even", "rceil"))
def test_quantize_matches_xla(fmt, mode):
  x = _inputs(jnp.float32 if mode != "floor" else jnp.bfloat16)
  data, scale = qk.mx_quantize(x, fmt, scale_mode=mode, backend=BACKEND, **TILES)
  ref = lb.quantize(x, fmt, scale_mode=mode)
  assert data.dtype == ref.data.dtype and scale.dtype == ref.scale.dtype
  np.testing.assert_array_equal(_bits(scale), _bits(ref.scale))
  np.testing.assert_array_equal(_bits(data), _bits(ref.data))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16, jnp.float16))
def test_dequantize_matches_xla(fmt, dtype):
  ref = lb.quantize(_inputs(jnp.float32, seed=1), fmt, scale_mode="even")
  out = qk.mx_dequantize(ref.data, ref.scale, fmt, dtype, backend=BACKEND, **TILES)
  expected = lb.dequantize(ref, dtype)
  assert out.dtype == expected.dtype and out.shape == expected.shape
  np.testing.assert_array_equal(_bits(out), _bits(expected))


def test_rejects_unsupported():
  with pytest.raises(ValueError, match="6-bit"):
    qk.mx_quantize(jnp.zeros((8, 64)), "mxfp6_e2m3", backend=BACKEND)
  with pytest.raises(ValueError, match="not an MX format"):
    qk.mx_quantize(jnp.zeros((8, 64)), "nvfp4", backend=BACKEND)
