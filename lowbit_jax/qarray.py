"""`QArray`: a quantized tensor as a pytree of packed data and scales with static format metadata."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from lowbit_jax.formats import Format

__all__ = ["QArray"]


@jax.tree_util.register_pytree_node_class
class QArray:
  """A quantized tensor (layout: docs/DESIGN.md, REFERENCE section 3).

  Children (arrays): `data` (packed element codes, padded to whole blocks), `scale` (one per block),
  `tensor_scale` (float32 scalar, or None), `zero_point` (shaped like `scale`, or None).
  Static metadata: `format`, the block axis, the logical lengths of the blocked axes, and the logical dtype.
  The logical shape is derived from `data.shape`, so a QArray maps over leading axes under `vmap` and `lax.scan`
  like any array. Build one with `lowbit_jax.quantize`.

  Example:
    >>> import jax.numpy as jnp, lowbit_jax as lb
    >>> q = lb.quantize(jnp.ones((4, 64), jnp.bfloat16), "mxfp4")
    >>> q
    QArray(mxfp4, shape=(4, 64), axis=1, dtype=bfloat16)
    >>> q.bits_per_element
    4.25
  """

  __slots__ = ("data", "scale", "tensor_scale", "zero_point", "format", "_axis", "_lengths", "_dtype")

  def __init__(self, data, scale, tensor_scale, zero_point, *, format: Format, axis: int,
               lengths: tuple[int, ...], dtype: Any):
    """Low-level constructor; `axis` is negative (counted from the end), `lengths` the logical lengths of the
    blocked axes ending at `axis`."""
    self.data = data
    self.scale = scale
    self.tensor_scale = tensor_scale
    self.zero_point = zero_point
    self.format = format
    self._axis = axis
    self._lengths = tuple(lengths)
    self._dtype = np.dtype(dtype)

  def tree_flatten(self):
    return ((self.data, self.scale, self.tensor_scale, self.zero_point),
            (self.format, self._axis, self._lengths, self._dtype))

  @classmethod
  def tree_unflatten(cls, aux, children):
    fmt, axis, lengths, dtype = aux
    return cls(*children, format=fmt, axis=axis, lengths=lengths, dtype=dtype)

  @property
  def ndim(self) -> int:
    return len(self.data.shape)

  @property
  def axis(self) -> int:
    """The block axis, non-negative (for 2-D blocks, the last of the two blocked axes)."""
    return self.ndim + self._axis

  @property
  def blocked_axes(self) -> tuple[int, ...]:
    return tuple(range(self.axis - len(self._lengths) + 1, self.axis + 1))

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical (unpadded, unpacked) shape."""
    s = list(self.data.shape)
    for a, n in zip(self.blocked_axes, self._lengths):
      s[a] = n
    return tuple(s)

  @property
  def dtype(self) -> np.dtype:
    """The logical dtype: what `dequantize` returns by default (the dtype that was quantized)."""
    return self._dtype

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held by all children."""
    return sum(int(np.prod(c.shape)) * np.dtype(c.dtype).itemsize
               for c in jax.tree_util.tree_leaves(self.tree_flatten()[0]))

  @property
  def bits_per_element(self) -> float:
    """Storage bits per logical element, scales, zero points and padding included."""
    return self.nbytes * 8 / self.size

  def dequantize(self, dtype=None) -> jax.Array:
    """The dequantized tensor in `dtype` (default: `self.dtype`). See `lowbit_jax.dequantize`."""
    from lowbit_jax.quantize import dequantize
    return dequantize(self, dtype)

  def __repr__(self) -> str:
    return f"QArray({self.format.name}, shape={self.shape}, axis={self.axis}, dtype={self.dtype.name})"
