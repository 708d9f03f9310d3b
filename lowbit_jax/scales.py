"""Block scale rules (REFERENCE section 2): each computes stored scales from block statistics and the element
values in grid units.

Divisions go through `elements.div`, which is correctly rounded on every backend (XLA's is not). Every rule
takes float32 `x` reshaped so that each block's elements lie along `red` (reduced axes, kept as size-1
dims in the results) and returns `(q, scale, zero_point)`: `q` the element values on the element grid (float32,
integers for grouped-int rules), `scale` in its storage dtype, `zero_point` or None. Element rounding is
`round(t)` or, stochastic, `floor(t + u)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lowbit_jax import elements
from lowbit_jax.formats import SCALE_GRIDS, ElementType, Format

__all__ = ["SCALE_MODES", "mx", "mx_exponent", "mx_elements", "mx_scale", "nvfp4", "absmax", "asym",
           "nvfp4_tensor_scale"]

SCALE_MODES = ("floor", "ceil", "even", "rceil")
_E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def _round(t, u):
  return jnp.round(t) if u is None else jnp.floor(t + u)


def _store(s, dtype):
  """(s in its storage dtype, the stored value as float32), rounding to nearest even.

  The rounding is done on the float32 grid of the storage type rather than by a convert round trip, which XLA
  may drop on GPUs (it allows excess precision), so the elements are computed with the scale as stored.
  NaN passes through."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return s, s
  v = jnp.where(jnp.isnan(s), s, elements.round_to_grid(s, SCALE_GRIDS[dtype.name]))
  return v.astype(dtype), v


def _amax(x, red):
  """(max |x| over the finite values of each block, whether the whole block is finite).

  Both are computed on bit patterns: XLA's max reduction does not propagate NaN on every backend, and its CPU
  backend flushes subnormal operands to zero, which would lose blocks of float32 subnormals. Non-negative floats
  order like their bits as integers."""
  ok = jnp.isfinite(x)
  bits = jax.lax.bitcast_convert_type(jnp.where(ok, jnp.abs(x), 0.0), jnp.int32)
  amax = jax.lax.bitcast_convert_type(jnp.max(bits, axis=red, keepdims=True), jnp.float32)
  return amax, jnp.all(ok, axis=red, keepdims=True)


def _mantissa(a: float) -> float:
  """The significand of a positive float in [1, 2)."""
  return float(np.frexp(a)[0] * 2)


def _positive(a):
  """a > 0 for non-negative a, read off the bits (exact for subnormals on every backend)."""
  return jax.lax.bitcast_convert_type(a, jnp.int32) > 0


def mx_exponent(amax, el: ElementType, mode: str):
  """The E8M0 exponent e of each block by `mode` (floor, ceil, even, rceil), clamped to [-127, 127]; -127 for
  all-zero blocks. `amax` is the finite block maximum of `_amax`."""
  nonzero = _positive(amax)
  a = jnp.where(nonzero, amax, 1.0)
  fl = elements.floor_log2(a)
  sig = elements.ldexp(a, -fl)  # amax = sig * 2^fl, sig in [1, 2)
  if mode == "floor":
    up = jnp.zeros(fl.shape, jnp.bool_)
  elif mode == "ceil":
    up = sig > 1
  elif mode == "even":  # amax rounded to the element's mantissa width carries into the next binade
    up = elements.round_half_even(elements.ldexp_fast(sig, el.mantissa)) >= 2 ** (el.mantissa + 1)
  elif mode == "rceil":  # smallest e with amax <= max * 2^e, compared exactly on significands
    up = sig > _mantissa(el.max)
  else:
    raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {mode!r}.")
  e = fl + up.astype(jnp.int32) - el.emax
  return jnp.where(nonzero, jnp.clip(e, -127, 127), -127)


def mx_elements(x, e, amax, finite, el: ElementType, u=None):
  """Element values of x * 2^-e on the grid of `el` (zero in non-finite and all-zero blocks)."""
  nonzero = _positive(amax)
  # Subnormal inputs only matter in blocks of tiny amax (elsewhere they round to zero whatever happens to them).
  tiny = jnp.any(nonzero & (amax < 2.0 ** -100))
  return elements.ldexp_if(
      tiny, lambda ldexp: jnp.where(finite & nonzero, elements.round_to_grid(ldexp(x, -e), el, u), 0.0))


def mx_scale(e, finite):
  """E8M0 scales 2^e, NaN (0xFF) for non-finite blocks."""
  return jax.lax.bitcast_convert_type(jnp.where(finite, e + 127, 255).astype(jnp.uint8), jnp.float8_e8m0fnu)


def mx(x, red, el: ElementType, mode: str, u=None):
  """MX: one E8M0 power-of-two scale 2^e per block, e by `mode` (floor, ceil, even, rceil), clamped to
  [-127, 127]; elements round onto the element grid of x * 2^-e."""
  amax, finite = _amax(x, red)
  e = mx_exponent(amax, el, mode)
  return mx_elements(x, e, amax, finite, el, u), mx_scale(e, finite), None


def nvfp4_tensor_scale(x, el: ElementType) -> jax.Array:
  """NVFP4's g = amax / (448 * max_element) over the finite values of x; 1 if that amax is 0."""
  amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0))
  g = elements.div_any(amax, _E4M3_MAX * el.max)
  return jnp.where(amax > 0, g, 1.0).astype(jnp.float32)


def nvfp4(x, red, el: ElementType, g, u=None, top=None):
  """NVFP4: E4M3 block scale s = e4m3(min(amax / top / g, 448)) with top the element max (6) unless given;
  elements x / (s * g)."""
  amax, finite = _amax(x, red)
  s = elements.div_any(elements.div_any(amax, el.max if top is None else top), g)
  s, sf = _store(jnp.where(finite, jnp.minimum(s, _E4M3_MAX), jnp.nan), jnp.float8_e4m3fn)
  ok = finite & (sf > 0)
  # x / d as (x p) / (d p) with d p near 1 (exact scaling) keeps `div` exact for tiny tensor scales; a quotient
  # that overflows saturates as it would. The fused kernel divides the same way.
  d = jnp.where(ok, sf * g, 1.0)
  p = elements.unit_scale(d)
  y = elements.div(x * p, d * p)
  return jnp.where(ok, elements.round_to_grid(jnp.where(ok, y, 0.0), el, u), 0.0), s, None


def absmax(x, red, el: ElementType, scale_dtype, u=None):
  """Symmetric absmax: s = amax / max_element stored in `scale_dtype`; elements x / s (the stored s).

  Float elements (block FP8) take s = 1 for an all-zero block; integer elements a zero scale and zero codes.
  """
  amax, finite = _amax(x, red)
  top = el.max if el.kind == "float" else el.int_max
  s = elements.div_any(amax, top)
  if el.kind == "float":
    s = jnp.where(_positive(amax), s, 1.0)
  s, sf = _store(jnp.where(finite, s, jnp.nan), scale_dtype)
  ok = finite & (sf > 0)
  y = jnp.where(ok, elements.div(x, jnp.where(ok, sf, 1.0)), 0.0)
  if el.kind == "float":
    q = jnp.where(ok, elements.round_to_grid(y, el, u), 0.0)
  else:
    q = jnp.clip(_round(y, u), -el.int_max, el.int_max)
  return jnp.where(finite, q, 0.0), s, None


def asym(x, red, el: ElementType, scale_dtype, u=None):
  """Asymmetric integers: the range [min(x, 0), max(x, 0)] over 2^b - 1 steps; zero point
  z = clamp(round(-lo / s)), codes q = clamp(round(x / s) + z, 0, 2^b - 1), both with the stored s."""
  top = 2 ** el.bits - 1
  finite = jnp.all(jnp.isfinite(x), axis=red, keepdims=True)
  xf = jnp.where(finite, x, 0.0)
  lo = jnp.minimum(jnp.min(xf, axis=red, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(xf, axis=red, keepdims=True), 0.0)
  s, sf = _store(jnp.where(finite, elements.div_any(hi - lo, top), jnp.nan), scale_dtype)
  ok = finite & (sf > 0)
  sd = jnp.where(ok, sf, 1.0)
  z = jnp.where(ok, jnp.clip(jnp.round(elements.div(-lo, sd)), 0, top), 0.0)
  q = jnp.where(ok, jnp.clip(_round(elements.div(x, sd), u) + z, 0, top), 0.0)
  return q, s, z.astype(scale_dtype)


def quantize_blocks(x, red, fmt: Format, mode: str, g, u):
  """Dispatches to the rule of `fmt` (see `Format.rule`)."""
  el = fmt.element_type
  if fmt.rule == "mx":
    return mx(x, red, el, mode, u)
  if fmt.rule == "nvfp4":
    return nvfp4(x, red, el, g, u)
  scale_dtype = jnp.dtype(fmt.scale)
  if fmt.rule == "asym":
    return asym(x, red, el, scale_dtype, u)
  return absmax(x, red, el, scale_dtype, u)
