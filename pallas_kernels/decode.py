"""In-register decoding of packed weight tiles, shared by the kernels.

Functions take loaded tiles (jnp arrays inside a Pallas kernel) and return float32 element values; they use only
shifts, masks, bitcasts and converts, which lower to a few integer ops per element (no table lookups in memory).
Sub-byte floats are decoded through float16: a code of E <= 5 exponent and M <= 10 mantissa bits, shifted into the
float16 exponent and mantissa fields, is the element value times 2^(bias - 15) exactly, subnormals included
(float16 subnormals are never flushed). Kernels multiply that factor back in once, on the accumulator.
"""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
from jax import lax

from lowbit_jax import packing
from lowbit_jax.formats import ElementType

__all__ = ["element_values", "post_factor", "mx_scale", "unpack_groups"]


def unpack_groups(byte_tiles: list, el: ElementType) -> list:
  """Codes (int32) of the P = codes_per_group elements of each packing group, one tile per position in the
  group, from the B = bytes_per_group byte tiles of the groups (uint8): the little-endian word of the B bytes
  holds code i in bits [bits * i, bits * (i + 1)) (REFERENCE section 3)."""
  b = [t.astype(jnp.int32) for t in byte_tiles]
  word = functools.reduce(operator.or_, [t << (8 * j) for j, t in enumerate(b)])
  if el.bits == 8:
    return [word]
  mask = (1 << el.bits) - 1
  return [(word >> (el.bits * i)) & mask for i in range(packing.codes_per_group(el.bits))]


def element_values(codes, el: ElementType, *, zero_point_format: bool = False):
  """Exact values of element codes: sub-byte floats as float16 scaled by 2^(bias - 15) (see `post_factor`),
  8-bit floats as float32, integers as float32.

  `codes`: int32 codes for sub-byte elements; for 8-bit ones the stored bytes (uint8, float8 codes as uint8).
  """
  if el.kind == "float":
    if el.bits == 8:
      return lax.bitcast_convert_type(codes, el.storage_dtype).astype(jnp.float32)
    m = el.mantissa
    sign = (codes >> (el.bits - 1)) << 15
    mag = (codes & ((1 << (el.bits - 1)) - 1)) << (10 - m)
    return lax.bitcast_convert_type((sign | mag).astype(jnp.uint16), jnp.float16)
  if el.bits == 4 and not zero_point_format:
    codes = (codes ^ 8) - 8  # sign-extend the nibble
  elif el.bits == 8 and not zero_point_format:
    codes = lax.bitcast_convert_type(codes, jnp.int8)
  return codes.astype(jnp.float32)


def post_factor(el: ElementType, mx: bool) -> float:
  """The constant a kernel multiplies its accumulator by: 2^(15 - bias) undoes the float16 decoding of sub-byte
  floats; MX integers are fixed point with (bits - 2) fraction bits."""
  if el.kind == "float":
    return 1.0 if el.bits == 8 else 2.0 ** (15 - (1 - el.emin))
  return 2.0 ** -el.mantissa if mx else 1.0


def mx_scale(ebits):
  """float32 2^(e - 127) from E8M0 bits (uint8); 0xFF is NaN. The code 0x00 (2^-127, a float32 subnormal) reads
  as 0: it only scales blocks whose values are all below 2^-125."""
  e = ebits.astype(jnp.int32)
  s = lax.bitcast_convert_type(e << 23, jnp.float32)
  return jnp.where(e == 255, jnp.nan, s)
