"""Packing of sub-byte element codes along one axis (REFERENCE section 3).

4-bit: two codes per byte, element 2i in the low nibble and 2i+1 in the high nibble.
6-bit: four codes per three bytes, a little-endian 24-bit word with element i in bits 6i..6i+5.
The axis stays in place (no transpose), so packing a (K, N) weight along K is a strided pass, not a copy of the
transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["codes_per_group", "bytes_per_group", "pack", "unpack"]

# codes per packing group and bytes per group, by element bits
_GROUPS = {4: (2, 1), 6: (4, 3), 8: (1, 1)}


def codes_per_group(bits: int) -> int:
  """How many codes share one packing group (the axis length is padded to a multiple of this)."""
  return _GROUPS[bits][0]


def bytes_per_group(bits: int) -> int:
  """Bytes of one packing group."""
  return _GROUPS[bits][1]


def _split(x: jax.Array, axis: int, parts: int) -> list[jax.Array]:
  """Views x with `axis` split into (length / parts, parts) and returns the `parts` interleaved slices."""
  s = x.shape
  x = x.reshape(s[:axis] + (s[axis] // parts, parts) + s[axis + 1:])
  return [lax.index_in_dim(x, i, axis + 1, keepdims=False) for i in range(parts)]


def _join(parts: list[jax.Array], axis: int) -> jax.Array:
  """Inverse of `_split`: interleaves equally shaped arrays along `axis`."""
  x = jnp.stack(parts, axis=axis + 1)
  s = x.shape
  return x.reshape(s[:axis] + (s[axis] * s[axis + 1],) + s[axis + 2:])


def pack(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  """Packs uint8 `codes` (each < 2^bits) along `axis` into uint8 bytes."""
  if bits == 8:
    return codes
  if bits == 4:
    lo, hi = _split(codes, axis, 2)
    return lo | (hi << 4)
  if bits == 6:
    c = [p.astype(jnp.uint32) for p in _split(codes, axis, 4)]
    word = c[0] | (c[1] << 6) | (c[2] << 12) | (c[3] << 18)
    return _join([(word >> s).astype(jnp.uint8) for s in (0, 8, 16)], axis)
  raise ValueError(f"pack: bits must be 4, 6 or 8, got {bits}.")


def unpack(data: jax.Array, bits: int, axis: int) -> jax.Array:
  """Inverse of `pack`: uint8 codes along `axis`."""
  if bits == 8:
    return data
  if bits == 4:
    return _join([data & 0xF, data >> 4], axis)
  if bits == 6:
    b = [p.astype(jnp.uint32) for p in _split(data, axis, 3)]
    word = b[0] | (b[1] << 8) | (b[2] << 16)
    return _join([((word >> s) & 0x3F).astype(jnp.uint8) for s in (0, 6, 12, 18)], axis)
  raise ValueError(f"unpack: bits must be 4, 6 or 8, got {bits}.")
