"""XLA reference implementations of the quantized ops: dequantize, then XLA's own dot.

Used on CPU and TPU, for shapes and formats the kernels do not take, and as the baseline the kernels are tested
and benchmarked against. With both operands quantized the product is the OCP dot of the dequantized values:
exact products, float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.qarray import QArray
from lowbit_jax.quantize import dequantize

__all__ = ["dot_general", "exact_in_bf16", "int8_pair", "matrix_pair"]


def exact_in_bf16(q: QArray) -> bool:
  """MX values are a <= 8-bit significand times a power of two: bfloat16 holds them exactly (above 2^-126)."""
  return q.format.rule == "mx"


def _blocks_exact_in_bf16(q: QArray) -> bool:
  """Element times block scale, before any tensor scale, is exact in bfloat16: MX, and NVFP4-style formats with
  elements of <= 4 significant bits (their product with an E4M3 scale, 4 bits, fits bfloat16's 8)."""
  return exact_in_bf16(q) or (q.format.rule == "nvfp4" and q.format.element_type.mantissa <= 3)


def _block_values(q: QArray, dtype) -> jax.Array:
  """The dequantized values without the tensor scale (which the caller applies to the product)."""
  if q.tensor_scale is None:
    return dequantize(q, dtype)
  children, aux = q.tree_flatten()
  data, scale, _, zero = children
  return dequantize(QArray.tree_unflatten(aux, (data, scale, jnp.ones((), jnp.float32), zero)), dtype)


def matrix_pair(lhs, rhs, dimension_numbers) -> bool:
  """Whether the call is lhs (..., K) times a 2-D rhs, (K, N) or K-major (N, K): the layout the pair kernels take."""
  (lc, rc), (lb, rb) = dimension_numbers
  return not lb and not rb and rhs.ndim == 2 and tuple(rc) in ((0,), (1,)) and tuple(lc) == (lhs.ndim - 1,)


def int8_pair(lhs: QArray, rhs: QArray, dimension_numbers) -> bool:
  """Whether lhs (..., K) and rhs (K, N) or (N, K) (K-major) are symmetric int8 with one scale per row of lhs and
  per output channel of rhs (per-token x per-channel, A8W8): their product is an int32 dot scaled once per
  output."""
  return matrix_pair(lhs, rhs, dimension_numbers) and all(
      q.format.element == "int8" and q.format.rule == "absmax" and q.format.block is None for q in (lhs, rhs))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
  """`lax.dot_general` of operands either of which may be a QArray.

  One quantized operand is dequantized to the other operand's dtype. Two quantized operands give the OCP dot in
  float32, cast to `preferred_element_type` (default: lhs's logical dtype): int8 per-token x per-channel pairs
  as an exact int32 dot scaled in float32; MX pairs dequantized to bfloat16 (exact) for XLA's bf16 GEMM with
  float32 accumulation, and likewise NVFP4 pairs without their tensor scales, which then multiply the float32
  result; other pairs dequantized to float32 (dot at HIGHEST precision).
  """
  kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
  if isinstance(lhs, QArray) and isinstance(rhs, QArray):
    out = preferred_element_type or lhs.dtype
    if int8_pair(lhs, rhs, dimension_numbers):
      acc = lax.dot_general(lhs.data, rhs.data, dimension_numbers, preferred_element_type=jnp.int32, **kwargs)
      sw = rhs.scale.astype(jnp.float32).reshape(-1)  # (1, N) or (N, 1): one scale per output column
      return (acc.astype(jnp.float32) * lhs.scale.astype(jnp.float32) * sw).astype(out)
    if _blocks_exact_in_bf16(lhs) and _blocks_exact_in_bf16(rhs):
      y = lax.dot_general(_block_values(lhs, jnp.bfloat16), _block_values(rhs, jnp.bfloat16), dimension_numbers,
                          preferred_element_type=jnp.float32, **kwargs)
      for q in (lhs, rhs):  # NVFP4's tensor scales multiply the float32 sum, one at a time
        y = y if q.tensor_scale is None else y * q.tensor_scale
      return y.astype(out)
    y = lax.dot_general(dequantize(lhs, jnp.float32), dequantize(rhs, jnp.float32), dimension_numbers,
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32, **kwargs)
    return y.astype(out)
  if isinstance(rhs, QArray):
    rhs = dequantize(rhs, lhs.dtype)
  elif isinstance(lhs, QArray):
    lhs = dequantize(lhs, rhs.dtype)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
