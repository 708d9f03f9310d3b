"""XLA reference implementations of the quantized ops: dequantize, then XLA's own dot.

Used on CPU and TPU, for shapes and formats the kernels do not take, and as the baseline the kernels are tested
and benchmarked against.
"""

from __future__ import annotations

from jax import lax

from lowbit_jax.qarray import QArray
from lowbit_jax.quantize import dequantize

__all__ = ["dot_general"]


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
  """`lax.dot_general` of operands either of which may be a QArray, dequantized to the other operand's dtype
  (or to its own logical dtype when both are quantized)."""
  if isinstance(lhs, QArray) and isinstance(rhs, QArray):
    lhs, rhs = dequantize(lhs), dequantize(rhs)
  elif isinstance(rhs, QArray):
    rhs = dequantize(rhs, lhs.dtype)
  elif isinstance(lhs, QArray):
    lhs = dequantize(lhs, rhs.dtype)
  kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
