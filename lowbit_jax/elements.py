"""Exact float32 arithmetic on element grids: rounding onto a grid, and element codes to and from values.

Everything here is integer and power-of-two arithmetic on float32 bit patterns, so it is exact and identical on
every backend (no `log2`, no lookup tables, no reliance on how a backend converts to sub-byte types).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.formats import ElementType

__all__ = ["floor_log2", "ldexp", "round_to_grid", "encode", "decode"]


def _exp2i(n: jax.Array) -> jax.Array:
  """2^n as float32 for integer n in [-126, 127], built from its bit pattern."""
  return lax.bitcast_convert_type(((n + 127) << 23).astype(jnp.int32), jnp.float32)


def ldexp(x: jax.Array, n) -> jax.Array:
  """x * 2^n, exact whenever the result is representable; n an int array in [-252, 252].

  Two multiplies by normal powers of two, so no factor is ever a float32 subnormal (which some backends flush).
  """
  n = jnp.asarray(n, jnp.int32)
  n1 = n >> 1
  return x * _exp2i(n1) * _exp2i(n - n1)


def floor_log2(a: jax.Array) -> jax.Array:
  """floor(log2(a)) as int32 for finite a > 0, float32 subnormals included (read off the bits)."""
  bits = lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF
  biased = bits >> 23
  sub = (31 - lax.clz(bits)) - 149  # a = mantissa * 2^-149
  return jnp.where(biased == 0, sub, biased - 127)


def round_to_grid(y: jax.Array, el: ElementType, u: jax.Array | None = None) -> jax.Array:
  """Rounds float32 `y` onto the MX grid of `el` (float element, or integer as 1.(bits-2) fixed point),
  saturating at +-el.max.

  Nearest-even when `u` is None, else stochastic: floor(t + u) with t in units of the local grid spacing.
  The sign of `y` is kept (a negative value rounding to zero gives -0.0).
  """
  if el.kind == "float":
    e = jnp.maximum(floor_log2(y), el.emin)  # the binade whose spacing applies; subnormals share emin's
  else:
    e = jnp.zeros(y.shape, jnp.int32)
  t = ldexp(y, el.mantissa - e)
  r = jnp.round(t) if u is None else jnp.floor(t + u)
  return jnp.clip(ldexp(r, e - el.mantissa), -el.max, el.max)


def encode(q: jax.Array, el: ElementType) -> jax.Array:
  """Element codes (uint8) of grid values `q` of a float element with at most 8 bits (sign-magnitude)."""
  a = jnp.abs(q)
  e = jnp.maximum(floor_log2(a), el.emin)
  mag = ldexp(a, el.mantissa - e) + ((e - el.emin) << el.mantissa).astype(jnp.float32)
  sign = (lax.bitcast_convert_type(q, jnp.uint32) >> 31).astype(jnp.uint8)
  return (sign << (el.bits - 1)) | mag.astype(jnp.uint8)


def decode(codes: jax.Array, el: ElementType) -> jax.Array:
  """float32 values of uint8 codes of a float element (inverse of `encode`)."""
  c = codes.astype(jnp.int32)
  m = el.mantissa
  exp_field = (c >> m) & ((1 << (el.bits - 1 - m)) - 1)
  sig = (c & ((1 << m) - 1)) + jnp.where(exp_field > 0, 1 << m, 0)
  v = sig.astype(jnp.float32) * _exp2i(jnp.maximum(exp_field, 1) + el.emin - 1 - m)
  return jnp.where((c >> (el.bits - 1)) & 1 == 1, -v, v)
