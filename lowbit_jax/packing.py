"""Packing of sub-byte element codes along one axis (REFERENCE section 3).

A packing group is a little-endian word of whole bytes holding consecutive codes, element i of the group in
bits b*i..b*i+b-1 (low bits first):
2-bit: four codes per byte, element 4i+j in bits 2j..2j+1 of byte i.
3-bit: eight codes per three bytes, a little-endian 24-bit word with element i in bits 3i..3i+2.
4-bit: two codes per byte, element 2i in the low nibble and 2i+1 in the high nibble.
6-bit: four codes per three bytes, a little-endian 24-bit word with element i in bits 6i..6i+5.
8-bit codes are stored as they are.
The axis stays in place (no transpose), so packing a (K, N) weight along K is a strided pass, not a copy of the
transpose.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["codes_per_group", "bytes_per_group", "pack", "unpack"]

# codes per packing group and bytes per group (one little-endian word), by element bits
_GROUPS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 6: (4, 3), 8: (1, 1)}


def _group(bits: int, who: str) -> tuple[int, int]:
  if bits not in _GROUPS:
    raise ValueError(f"{who}: bits must be one of {', '.join(map(str, _GROUPS))}, got {bits}.")
  return _GROUPS[bits]


def codes_per_group(bits: int) -> int:
  """How many codes share one packing group (the axis length is padded to a multiple of this)."""
  return _group(bits, "codes_per_group")[0]


def bytes_per_group(bits: int) -> int:
  """Bytes of one packing group."""
  return _group(bits, "bytes_per_group")[1]


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


def _word_dtype(nbytes: int):
  # A one-byte word is computed in uint8 (no widening); three-byte words need 32 bits.
  return jnp.uint8 if nbytes == 1 else jnp.uint32


def pack(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  """Packs uint8 `codes` (each < 2^bits) along `axis` into uint8 bytes."""
  k, n = _group(bits, "pack")
  if bits == 8:
    return codes
  dt = _word_dtype(n)

  def ored(codes):  # k strided slices or-ed together
    return functools.reduce(operator.or_, [c.astype(dt) << (bits * i) for i, c in enumerate(_split(codes, axis, k))])

  def summed(codes):  # a sum over a reshaped axis of disjoint bit fields (sum == or)
    s = codes.shape
    x = codes.reshape(s[:axis] + (s[axis] // k, k) + s[axis + 1:]).astype(dt)
    shifts = (bits * jnp.arange(k, dtype=dt)).reshape((k,) + (1,) * (len(s) - axis - 1))
    return jnp.sum(x << shifts, axis=axis + 1, dtype=dt)

  # Same bits either way. XLA's CPU backend recomputes the fused per-element quantization for every strided slice
  # (the sum is 5-15x faster there); on a GPU the slices are 10-25% faster (H100, 8192^2 int2/3/4 quantize).
  word = lax.platform_dependent(codes, cpu=summed, default=ored)
  return _join([(word >> (8 * j)).astype(jnp.uint8) for j in range(n)], axis)


def unpack(data: jax.Array, bits: int, axis: int) -> jax.Array:
  """Inverse of `pack`: uint8 codes along `axis`."""
  k, n = _group(bits, "unpack")
  if bits == 8:
    return data
  dt = _word_dtype(n)
  word = functools.reduce(operator.or_, [b.astype(dt) << (8 * j) for j, b in enumerate(_split(data, axis, n))])
  mask = (1 << bits) - 1
  return _join([((word >> (bits * i)) & mask).astype(jnp.uint8) for i in range(k)], axis)
