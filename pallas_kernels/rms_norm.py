"""A residual add and the RMSNorm after it, in one kernel, taking the sublayer's output as summands.

In a decode step each RMSNorm follows a residual add of a matmul's output, and the quantized matmul's split-K
partials need a sum first: XLA runs that as two or three ops of 1-4 us each (a decode step's 207 kernels,
BENCHMARKS.md "End-to-end decode"). Here one program per row adds the summands in float32, rounds their sum to
the residual's dtype, adds it to the residual and normalizes the result.

Layouts: x (M, N), the residual stream; summands (S, M, N), any float dtype, whose sum over axis 0 is the
sublayer's output (a matmul's float32 split-K partials from `lowbit_jax.matmul_summands`, or one summand);
scale (N,). Returns (h, y), both (M, N) in x's dtype: h = x + round(sum of the summands) and y = RMSNorm(h) as
`flax.nnx.RMSNorm` computes it with dtype x.dtype: y = h * (rsqrt(mean(h^2) + eps) * scale), the mean and the
products in float32, one rounding at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend

__all__ = ["add_rms_norm"]


def _kernel(x_ref, s_ref, scale_ref, h_ref, y_ref, *, n: int, eps: float, backend: str):
  """One row: x_ref (1, W), s_ref (S, W), scale_ref (1, W); W is N, or the next power of two (Triton's blocks are
  powers of two) with the columns past N masked."""
  width = x_ref.shape[-1]
  ok = lax.broadcasted_iota(jnp.int32, (1, width), 1) < n if width != n else None

  def load(ref):  # float32, zeros past N
    mask = None if ok is None else jnp.broadcast_to(ok, ref.shape)
    return _backend.load(ref, ..., mask, 0, backend=backend).astype(jnp.float32)

  dtype = h_ref.dtype
  total = jnp.sum(load(s_ref), axis=0, keepdims=True)  # the sublayer's output, rounded to dtype as a matmul would
  h = (load(x_ref) + total.astype(dtype).astype(jnp.float32)).astype(dtype)
  hf = h.astype(jnp.float32)
  mul = lax.rsqrt(jnp.sum(hf * hf, axis=1, keepdims=True) / n + eps) * load(scale_ref)
  _backend.store(h_ref, h, ok, backend=backend)
  _backend.store(y_ref, (hf * mul).astype(dtype), ok, backend=backend)


@_backend.jit_op("eps", "backend", "num_warps")
def add_rms_norm(x: jax.Array, summands: jax.Array, scale: jax.Array, *, eps: float = 1e-6,
                 backend: str = "triton", num_warps: int = 16) -> tuple[jax.Array, jax.Array]:
  """(h, y): h = x + the summands' sum (rounded to x's dtype), y = RMSNorm(h) with `scale` (module docstring).

  `backend`: "triton" (NVIDIA GPUs) or "interpret" (any device). One program per row of x, of `num_warps` warps:
  on an H100 16 warps took 1.8 us per call for 8 float32 summands of 2048 columns, 4 warps 2.6 (BENCHMARKS.md).

  Example (two rows of 4; the summands add to 1 in every column):
    >>> x = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 2.0]], jnp.bfloat16)
    >>> parts = jnp.full((2, 2, 4), 0.5, jnp.float32)
    >>> h, y = add_rms_norm(x, parts, jnp.ones(4), backend="interpret")
    >>> h[1].tolist(), y[1].tolist()
    ([1.0, 3.0, 1.0, 3.0], [0.447265625, 1.34375, 0.447265625, 1.34375])
  """
  if x.ndim != 2 or summands.ndim != 3 or summands.shape[1:] != x.shape:
    raise ValueError(f"add_rms_norm: x must be (M, N) and summands (S, M, N) with the same M and N, got "
                     f"{x.shape} and {summands.shape}.")
  m, n = x.shape
  if scale.shape != (n,):
    raise ValueError(f"add_rms_norm: scale must be ({n},), got {scale.shape}.")
  if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in (x, summands, scale)):
    raise TypeError(f"add_rms_norm: x, summands and scale must be float arrays, got {x.dtype}, {summands.dtype} "
                    f"and {scale.dtype}.")
  if backend not in ("triton", "interpret"):
    raise ValueError(f"add_rms_norm runs on the Pallas-Triton or interpret backend, not {backend!r}.")
  s = summands.shape[0]
  if s & (s - 1):  # Triton blocks are powers of two: zero summands fill the block
    summands = jnp.pad(summands, ((0, (1 << s.bit_length()) - s), (0, 0), (0, 0)))
  width = 1 << (n - 1).bit_length()
  row = pl.BlockSpec((1, width), lambda i: (i, 0))
  call = _backend.call(
      functools.partial(_kernel, n=n, eps=eps, backend=backend), backend=backend,
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),) * 2, grid=(m,),
      in_specs=[row, pl.BlockSpec((summands.shape[0], None, width), lambda i: (0, i, 0)),
                pl.BlockSpec((1, width), lambda i: (0, 0))],
      out_specs=(row, row), num_warps=num_warps, num_stages=1, name="add_rms_norm")
  return call(x, summands, scale.reshape(1, n))
