"""pallas_kernels.rms_norm.add_rms_norm (the Triton kernel on a GPU, with poisoned outputs; Pallas's interpreter on
a CPU) against numpy in float64 with ml_dtypes rounding, and against flax.nnx.RMSNorm."""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import backend as _backend
from pallas_kernels.rms_norm import add_rms_norm

BACKEND = "triton" if _backend.gpu_available() else "interpret"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
  monkeypatch.setattr(_backend, "POISON", True)


def _bf16(x):
  return np.asarray(x, np.float64).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _inputs(s, m, n, seed=0, summand_dtype=jnp.float32):
  """Summands on a grid of 1/8 up to 8 (their float32 sums exact in any order), a residual and a scale in bf16."""
  rng = np.random.default_rng(seed)
  parts = jnp.asarray(rng.integers(-64, 65, (s, m, n)) / 8, summand_dtype)
  x = jnp.asarray(rng.standard_normal((m, n)) * 4, jnp.bfloat16)
  scale = jnp.asarray(1 + rng.standard_normal(n) / 4, jnp.bfloat16)
  return x, parts, scale


def reference(x, parts, scale, eps):
  """(h, y unrounded) in float64: h = bf16(x + bf16(sum of parts)); y = h / sqrt(mean(h^2) + eps) * scale."""
  x, parts, scale = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, parts, scale))
  h = _bf16(x + _bf16(parts.sum(0)))
  return h, h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("s,m,n,summand_dtype", [
    (8, 1, 2048, jnp.float32),  # the 1.1B LM's decode step: split-K partials of a d_model row
    (3, 3, 100, jnp.float32),  # S and N not powers of two (padded summands, masked columns)
    (1, 2, 64, jnp.bfloat16),  # one bf16 summand: a float layer's output
])
def test_matches_float64(s, m, n, summand_dtype):
  x, parts, scale = _inputs(s, m, n, summand_dtype=summand_dtype)
  x, parts = x.at[0].multiply(1e-4), parts.at[:, 0].set(0)  # a row with mean(h^2) below eps, where eps matters
  h, y = jax.jit(lambda *a: add_rms_norm(*a, eps=1e-6, backend=BACKEND))(x, parts, scale)
  ref_h, ref_y = reference(x, parts, scale, 1e-6)
  assert h.shape == y.shape == (m, n) and h.dtype == y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(h, np.float64), ref_h)
  # float32 mean, rsqrt and products, one rounding to bfloat16: within half an ulp of the float64 value, plus the
  # float32 error (a bfloat16 ulp is at most 2^-7 of the value)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, rtol=2 ** -8 + 2 ** -18, atol=0)


def test_matches_nnx_rmsnorm():
  """The same values as the example LM's unfused path: a bf16 residual add, then flax.nnx.RMSNorm."""
  x, parts, scale = _inputs(4, 2, 256, seed=1)
  norm = nnx.RMSNorm(256, epsilon=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  norm.scale[...] = scale
  want_h = x + jnp.sum(parts, 0).astype(jnp.bfloat16)
  h, y = add_rms_norm(x, parts, scale, eps=1e-5, backend=BACKEND)
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(want_h, np.float32))
  want, got = np.asarray(norm(want_h), np.float32), np.asarray(y, np.float32)
  np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=0)  # rsqrt's last float32 bit may round differently
  assert np.mean(got == want) > 0.95


def test_bad_input():
  x, parts, scale = _inputs(2, 2, 8)
  with pytest.raises(ValueError, match=r"summands \(S, M, N\) with the same M and N, got \(2, 8\) and \(2, 3, 8\)"):
    add_rms_norm(x, jnp.zeros((2, 3, 8)), scale, backend="interpret")
  with pytest.raises(ValueError, match=r"scale must be \(8,\), got \(4,\)"):
    add_rms_norm(x, parts, scale[:4], backend="interpret")
  with pytest.raises(TypeError, match="must be float arrays, got bfloat16, int32 and bfloat16"):
    add_rms_norm(x, parts.astype(jnp.int32), scale, backend="interpret")
  with pytest.raises(ValueError, match="not 'mosaic'"):
    add_rms_norm(x, parts, scale, backend="mosaic")
