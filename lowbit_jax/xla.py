"""XLA reference implementations of the quantized ops: dequantize, then XLA's own dot.

Used on CPU and TPU, for shapes and formats the kernels do not take, and as the baseline the kernels are tested
and benchmarked against. With both operands quantized the product is the OCP dot of the dequantized values:
exact products, float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.prepared import PreparedWeight
from lowbit_jax.qarray import QArray
from lowbit_jax.quantize import dequantize

__all__ = ["blocks_exact_in_bf16", "dot_general", "int8_pair", "matrix_pair", "split_tensor_scale", "swiglu",
           "times_tensor_scales"]


def blocks_exact_in_bf16(q: QArray) -> bool:
  """Element times block scale, before any tensor scale, is exact in bfloat16: MX values are a <= 8-bit significand
  times a power of two (above 2^-126), and NVFP4-style elements of <= 4 significant bits times an E4M3 scale (4 bits)
  fit bfloat16's 8."""
  return q.format.rule == "mx" or (q.format.rule == "nvfp4" and q.format.element_type.mantissa <= 3)


def swiglu(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
  """silu(gate) * up in `dtype`: the two products rounded to `dtype` (as a matmul writing that dtype rounds them),
  then g / (1 + exp(-g)) * u in float32, rounded once. The Mosaic GPU kernel's epilogue computes the same."""
  g, u = (jnp.asarray(a).astype(dtype).astype(jnp.float32) for a in (gate, up))
  return (g / (1.0 + jnp.exp(-g)) * u).astype(dtype)


def split_tensor_scale(q: QArray | PreparedWeight) -> tuple[QArray | PreparedWeight, jax.Array | None]:
  """(q with its tensor scale set to 1, the tensor scale or None): the caller applies it to a float32 product."""
  if q.tensor_scale is None:
    return q, None
  children, aux = q.tree_flatten()
  children = list(children)
  children[2] = jnp.ones((), jnp.float32)  # (the tensor scale is the third child of both)
  return type(q).tree_unflatten(aux, children), q.tensor_scale


def times_tensor_scales(y: jax.Array, *gs) -> jax.Array:
  """y times each tensor scale that is not None, one at a time (NVFP4's scales multiply the float32 sum)."""
  for g in gs:
    y = y if g is None else y * g
  return y


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
  """`lax.dot_general` of operands either of which may be a QArray (or rhs a `PreparedWeight`).

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
    if blocks_exact_in_bf16(lhs) and blocks_exact_in_bf16(rhs):
      (qa, ga), (qw, gw) = split_tensor_scale(lhs), split_tensor_scale(rhs)
      y = lax.dot_general(dequantize(qa, jnp.bfloat16), dequantize(qw, jnp.bfloat16), dimension_numbers,
                          preferred_element_type=jnp.float32, **kwargs)
      return times_tensor_scales(y, ga, gw).astype(out)
    y = lax.dot_general(dequantize(lhs, jnp.float32), dequantize(rhs, jnp.float32), dimension_numbers,
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32, **kwargs)
    return y.astype(out)
  if isinstance(rhs, (QArray, PreparedWeight)):  # (dequantize reads a PreparedWeight through its canonical form)
    rhs = dequantize(rhs, lhs.dtype)
  elif isinstance(lhs, QArray):
    lhs = dequantize(lhs, rhs.dtype)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
