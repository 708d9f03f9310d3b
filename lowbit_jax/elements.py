"""Exact float32 arithmetic on element grids: rounding onto a grid, and element codes to and from values.

Everything here is integer and power-of-two arithmetic on float32 bit patterns, so it is exact and identical on
every backend (no `log2`, no lookup tables, no reliance on how a backend converts to sub-byte types).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.formats import ElementType

__all__ = ["exp2i", "floor_log2", "round_half_even", "ldexp", "ldexp_fast", "ldexp_if", "unit_scale",
           "round_to_grid", "encode", "decode", "div", "div_any"]


def exp2i(n: jax.Array) -> jax.Array:
  """2^n as float32 for integer n in [-126, 127], built from its bit pattern."""
  return lax.bitcast_convert_type(((n + 127) << 23).astype(jnp.int32), jnp.float32)


def ldexp_fast(x: jax.Array, n) -> jax.Array:
  """x * 2^n by two multiplies by normal powers of two; exact when x and the result are normal floats."""
  n = jnp.asarray(n, jnp.int32)
  n1 = n >> 1
  return x * exp2i(n1) * exp2i(n - n1)


def ldexp(x: jax.Array, n) -> jax.Array:
  """x * 2^n rounded to nearest even, computed on the bits: exact for subnormal inputs and outputs alike.

  Float multiplies cannot be used at the subnormal end because XLA's CPU backend flushes subnormal operands
  and results to zero. Infinities, NaN and zeros pass through; overflow gives infinity.
  """
  x = jnp.asarray(x, jnp.float32)
  n = jnp.asarray(n, jnp.int32)
  bits = lax.bitcast_convert_type(x, jnp.int32)
  sign = bits & jnp.int32(-0x80000000)
  mag = bits & 0x7FFFFFFF
  biased = mag >> 23
  sig = jnp.where(biased == 0, mag, (mag & 0x7FFFFF) | 0x800000)  # x = sig * 2^(e - 23)
  lz = jnp.maximum(lax.clz(sig) - 8, 0)  # normalise subnormal significands to 24 bits
  sig = sig << lz
  e = jnp.where(biased == 0, -126, biased - 127) - lz + n
  normal = sign | ((jnp.clip(e, -126, 128) + 127) << 23) | (sig & 0x7FFFFF)
  inf = sign | 0x7F800000
  shift = jnp.clip(-126 - e, 1, 31)  # subnormal result: drop `shift` bits, ties to even
  kept = sig >> shift
  rem = sig & ((1 << shift) - 1)
  half = 1 << (shift - 1)
  kept = kept + ((rem > half) | ((rem == half) & ((kept & 1) == 1))).astype(jnp.int32)
  out = jnp.where(e > 127, inf, jnp.where(e >= -126, normal, sign | kept))
  out = jnp.where((biased == 255) | (mag == 0), bits, out)
  return lax.bitcast_convert_type(out, jnp.float32)


def ldexp_if(tiny: jax.Array, f: Callable[[Callable], jax.Array]) -> jax.Array:
  """`f(ldexp)` where `tiny` (a scalar: may anything be subnormal?) says it is needed, else `f(ldexp_fast)`.

  A branch on the whole computation `f`, so the common case pays for two multiplies instead of the bit arithmetic,
  and each branch stays one fused loop over what `f` reads (a branch on the scaled array alone made XLA write its
  operands and result out whole: MX dequantize ran 4-10x slower than NVFP4's on a CPU)."""
  return lax.cond(tiny, lambda: f(ldexp), lambda: f(ldexp_fast))


def unit_scale(d: jax.Array) -> jax.Array:
  """A power of two p with d * p normal and near 1, for float32 d > 0, from d's exponent bits alone: 2^(127 - E)
  for biased exponent E >= 1 (d * p in [1, 2)), 2^127 for subnormal d, 2^-126 from 2^127 on.

  Dividing by d as (x p) / (d p) is then exact scaling that keeps a division's intermediates normal."""
  return lax.bitcast_convert_type(jnp.maximum(254 - (lax.bitcast_convert_type(d, jnp.int32) >> 23), 1) << 23,
                                  jnp.float32)


def floor_log2(a: jax.Array) -> jax.Array:
  """floor(log2(a)) as int32 for finite a > 0, float32 subnormals included (read off the bits)."""
  bits = lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF
  biased = bits >> 23
  sub = (31 - lax.clz(bits)) - 149  # a = mantissa * 2^-149
  return jnp.where(biased == 0, sub, biased - 127)


def round_half_even(a: jax.Array) -> jax.Array:
  """round(a) as int32 for float32 0 <= a < 2^22, ties to even, from the integer part and the exact fraction.

  Kernels use it too: Pallas's Triton lowering has no round, and XLA folds the add-and-subtract-2^23 trick."""
  n = a.astype(jnp.int32)  # truncates
  frac = a - n.astype(jnp.float32)
  return n + ((frac > 0.5) | ((frac == 0.5) & ((n & 1) == 1))).astype(jnp.int32)


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
  t = ldexp_fast(y, el.mantissa - e)  # y is normal or rounds to zero anyway
  r = jnp.round(t) if u is None else jnp.floor(t + u)
  return jnp.clip(ldexp_fast(r, e - el.mantissa), -el.max, el.max)


def encode(q: jax.Array, el: ElementType) -> jax.Array:
  """Element codes (uint8) of grid values `q` of a float element with at most 8 bits (sign-magnitude)."""
  a = jnp.abs(q)
  e = jnp.maximum(floor_log2(a), el.emin)
  mag = ldexp_fast(a, el.mantissa - e) + ((e - el.emin) << el.mantissa).astype(jnp.float32)
  sign = (lax.bitcast_convert_type(q, jnp.uint32) >> 31).astype(jnp.uint8)
  return (sign << (el.bits - 1)) | mag.astype(jnp.uint8)


def decode(codes: jax.Array, el: ElementType) -> jax.Array:
  """float32 values of uint8 codes of a float element (inverse of `encode`)."""
  c = codes.astype(jnp.int32)
  m = el.mantissa
  exp_field = (c >> m) & ((1 << (el.bits - 1 - m)) - 1)
  sig = (c & ((1 << m) - 1)) + jnp.where(exp_field > 0, 1 << m, 0)
  v = sig.astype(jnp.float32) * exp2i(jnp.maximum(exp_field, 1) + el.emin - 1 - m)
  return jnp.where((c >> (el.bits - 1)) & 1 == 1, -v, v)


def _clear_low_mantissa(q: jax.Array, bits: int) -> jax.Array:
  """q with its lowest `bits` mantissa bits cleared (exact, by masking)."""
  m = lax.bitcast_convert_type(q, jnp.uint32) & jnp.uint32((0xFFFFFFFF << bits) & 0xFFFFFFFF)
  return lax.bitcast_convert_type(m, jnp.float32)


def div(a: jax.Array, b: jax.Array) -> jax.Array:
  """a / b correctly rounded (IEEE round-to-nearest-even) in float32.

  XLA does not promise a correctly rounded division (its CPU backend rewrites division by a constant as a
  multiplication by the reciprocal and is an ulp off in many quotients; its GPU backend is up to 2 ulps off), and
  quantization must match the IEEE quotient. So XLA's quotient is corrected, an ulp per step, with an exact
  residual a - q*b: q and b are split on mantissa bits into 12-bit halves whose four products are exact, and the
  subtractions cancel exactly (Sterbenz).
  On XLA's CPU backend that needs |a| and |b| above about 2^-60 (`div_any` lifts it, at a branch per call).
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return _div(a, b)


def div_any(a: jax.Array, b: jax.Array) -> jax.Array:
  """`div` for operands of any magnitude, for per-block arrays (it branches on the whole array).

  Finite nonzero operands outside [2^-50, 2^50] are divided as a * 2^-ea / (b * 2^-eb), both in [1, 2), and the
  quotient scaled back, all on the bits, so the residual and half-ulp bounds of `div` stay normal (XLA's CPU
  backend flushes subnormal intermediates) and every quotient lies in [2^-100, 2^100], the range `div` corrects.
  A quotient that ends subnormal is rounded twice (no format stores one).
  """
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))

  def far(v):
    m = jnp.abs(v)
    return ((m < 2.0 ** -50) | (m >= 2.0 ** 50)) & (m > 0) & jnp.isfinite(m)

  def normalised(a, b):
    ea, eb = (jnp.where(far(v), floor_log2(jnp.abs(v)), 0) for v in (a, b))
    return ldexp(_div(ldexp(a, -ea), ldexp(b, -eb)), ea - eb)

  return lax.cond(jnp.any(far(a) | far(b) | (b == 0)), normalised, _div, a, b)


def _div(a, b):
  q = a / b
  sign = jnp.sign(q)
  aa, bb = jnp.abs(a), jnp.abs(b)
  # Only finite, normal, nonzero quotients need (and allow) the correction; a below 2^127 keeps q * b finite.
  qa = jnp.abs(q)
  ok = jnp.isfinite(qa) & (qa >= 2.0 ** -100) & (qa <= 2.0 ** 126) & (aa < 2.0 ** 127) & (bb > 0)
  qa = jnp.where(ok, qa, 1.0)
  # Two steps: XLA's GPU backend divides to within 2 ulps, and each step moves q by at most one.
  for _ in range(2):
    qa = _nearer(aa, bb, qa)
  return jnp.where(ok, sign * qa, q)


def _nearer(aa, bb, qa):
  """qa moved one ulp towards aa / bb when the exact residual aa - qa * bb says it is more than half an ulp off
  (or exactly half, towards the even neighbour); aa, bb, qa > 0."""
  qh, bh = _clear_low_mantissa(qa, 12), _clear_low_mantissa(bb, 12)
  ql, bl = qa - qh, bb - bh
  r = (((aa - qh * bh) - qh * bl) - ql * bh) - ql * bl  # aa - qa * bb, exactly
  e = floor_log2(qa)
  u = exp2i(jnp.maximum(e - 23, -126))  # ulp of qa (qa >= 2^-100 here)
  u_down = jnp.where(qa == exp2i(jnp.clip(e, -126, 127)), u * 0.5, u)  # below a power of two the spacing halves
  half_up, half_down = u * bb * 0.5, u_down * bb * 0.5  # powers of two times b: exact
  odd = (lax.bitcast_convert_type(qa, jnp.uint32) & 1) == 1
  up = (r > half_up) | ((r == half_up) & odd)
  down = (-r > half_down) | ((-r == half_down) & odd)
  return jnp.where(up, qa + u, jnp.where(down, qa - u_down, qa))
