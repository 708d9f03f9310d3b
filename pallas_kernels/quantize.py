"""Fused MX quantize and dequantize of 2-D arrays blocked along the last axis (blocks of 32).

Layouts (DESIGN.md), for x of shape (R, C), C a multiple of 32:
  data: (R, C) float8 (MXFP8), (R, C) int8 (MXINT8) or (R, C / 2) uint8 (MXFP4: element 2i in the low nibble of
    byte i, 2i + 1 in the high nibble).
  scale: (R, C / 32) float8_e8m0fnu.
One program handles a (block_rows, C_tile) tile of x: it reshapes it to (block_rows, C_tile / 32, 32), reduces each
block of 32, and writes the matching tiles of data and scale. Kernels move 8-bit values as uint8 bits, and MXFP4
data as little-endian uint32 words of eight codes (wider stores), bitcast outside; they compute with the exact integer and power-of-two arithmetic of `lowbit_jax.scales.mx` and
`lowbit_jax.elements`, so the stored bits equal those of `lowbit_jax.quantize` (round to nearest even).

Exactness limits, left to the caller (fall back to XLA for them):
  - quantize: the scales are exact for every block, but the element codes of blocks with 0 < amax < 2^-100 are not
    (float32 subnormal inputs may be flushed; `scales.mx` takes its bit-exact path there).
  - dequantize: values whose float32 result q * 2^e is subnormal (scales below 2^-120 or so) may be flushed to
    zero; `lowbit_jax.dequantize` rounds them exactly.
MXFP6 (four codes in three bytes) is not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lowbit_jax import elements, scales
from lowbit_jax.formats import ElementType, Format, get_format
from pallas_kernels import backend as _backend

__all__ = ["mx_quantize", "mx_dequantize", "supports"]

_BLOCK = 32


def supports(fmt: Format) -> str | None:
  """None if the kernels handle `fmt`, else the reason they do not."""
  if fmt.rule != "mx" or fmt.block != (_BLOCK,):
    return f"{fmt.name}: not an MX format with blocks of {_BLOCK}"
  if fmt.element_type.bits not in (4, 8):
    return f"{fmt.name}: {fmt.element_type.bits}-bit elements"
  return None


def _check(fmt: Format, cols: int) -> None:
  reason = supports(fmt)
  if reason:
    raise ValueError(f"pallas_kernels.quantize does not support {reason}.")
  if cols % _BLOCK:
    raise ValueError(f"the last axis ({cols}) must be a multiple of {_BLOCK}.")


def _col_tile(cols: int, most: int) -> int:
  """The largest power of two that divides `cols` and is at most `most` (>= 32 as cols % 32 == 0)."""
  t = 1
  while cols % (2 * t) == 0 and 2 * t <= most:
    t *= 2
  return t


def _row_mask(block_rows: int, rows: int, shape):
  """Which rows of the tile lie inside the array (None if every tile is whole)."""
  if rows % block_rows == 0:
    return None
  ok = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0) < rows
  return jnp.broadcast_to(ok, shape)


def _f32(bits):
  return lax.bitcast_convert_type(bits, jnp.float32)


def _i32(x):
  return lax.bitcast_convert_type(x, jnp.int32)


def _u32(x):
  return lax.bitcast_convert_type(x, jnp.uint32)


def _rne(a):
  """round(a) as int32 for float32 0 <= a < 2^22, ties to even (Pallas's Triton lowering has no round, and XLA
  folds the add-and-subtract-2^23 trick): the integer part and the exact fraction of a."""
  n = a.astype(jnp.int32)  # truncates
  frac = a - n.astype(jnp.float32)
  return n + ((frac > 0.5) | ((frac == 0.5) & ((n & 1) == 1))).astype(jnp.int32)


def _float_codes(y, el: ElementType):
  """`elements.encode(elements.round_to_grid(y, el), el)` in one pass: with e the binade of |y| (emin for the
  subnormal range, which float32 subnormals fall in), r = round(|y| * 2^(m - e)) holds the implicit bit, so
  r + ((e - emin) << m) is the magnitude code, a carry of r included; saturation clamps the code at that of
  el.max. The sign bit is y's."""
  m = el.mantissa
  bits = _i32(y)
  mag = bits & 0x7FFFFFFF
  e = jnp.maximum((mag >> 23) - 127, el.emin)
  r = _rne(_f32(mag) * elements.exp2i(m - e))  # exact: a power of two in the normal range
  top = int(el.max * 2.0 ** (m - el.emax)) + ((el.emax - el.emin) << m)
  code = jnp.minimum(r + ((e - el.emin) << m), top)
  return (code | (lax.shift_right_logical(bits, 31) << (el.bits - 1))).astype(jnp.uint8)


def _exponent(amax, el: ElementType, mode: str):
  """The unclamped scale exponent of `scales.mx` for amax > 0 (float32, subnormals included)."""
  fl = elements.floor_log2(amax)
  sig = elements.ldexp(amax, -fl)  # amax = sig * 2^fl, sig in [1, 2)
  if mode == "floor":
    up = jnp.zeros(fl.shape, jnp.bool_)
  elif mode == "ceil":
    up = sig > 1
  elif mode == "even":
    up = _rne(elements.ldexp_fast(sig, el.mantissa)) >= 2 ** (el.mantissa + 1)
  else:  # rceil
    up = sig > scales._mantissa(el.max)
  return fl + up.astype(jnp.int32) - el.emax


def _quantize_kernel(x_ref, d_ref, s_ref, *, el: ElementType, mode: str, rows: int, backend: str):
  br, ct = x_ref.shape
  nb = ct // _BLOCK
  x = _backend.load(x_ref, (slice(None), slice(None)), _row_mask(br, rows, (br, ct)), 0, backend=backend)
  x = x.astype(jnp.float32).reshape(br, nb, _BLOCK)
  # Block statistics on bit patterns, as `scales._amax`: non-negative floats order like their bits, and above
  # every finite one lie Inf and then NaN, so one max says both amax and whether the block is finite.
  amax = jnp.max(_i32(x) & 0x7FFFFFFF, axis=-1, keepdims=True)
  all_finite = amax < 0x7F800000
  nonzero = amax > 0
  e = _exponent(_f32(jnp.where(nonzero, amax, 0x3F800000)), el, mode)
  e = jnp.where(nonzero, jnp.clip(e, -127, 127), -127)
  sbits = jnp.where(all_finite, e + 127, 255)
  y = elements.ldexp_fast(x, -e)
  ok = all_finite & nonzero
  if el.kind == "float":
    codes = jnp.where(ok, _float_codes(y, el), 0)
  else:  # MXINT8: round(y * 2^6) saturated at 127, as round_to_grid then fixed point to integer codes
    n = jnp.minimum(_rne(jnp.abs(y) * 2.0 ** el.mantissa), el.int_max)
    codes = jnp.where(ok, jnp.where(y < 0, -n, n), 0).astype(jnp.int8)
  codes = codes.reshape(br, ct)
  if el.bits == 4:
    # Eight nibbles to a little-endian 32-bit word (wider stores); the caller views the words as bytes.
    nib = codes.reshape(br, ct // 8, 8).astype(jnp.int32)
    codes = _u32(jnp.sum(nib << (4 * lax.broadcasted_iota(jnp.int32, nib.shape, 2)), axis=-1))
  _backend.store(d_ref, codes, _row_mask(br, rows, codes.shape), backend=backend)
  sbits = sbits.astype(jnp.uint8).reshape(br, nb)
  _backend.store(s_ref, sbits, _row_mask(br, rows, sbits.shape), backend=backend)


@functools.partial(jax.jit, static_argnames=("fmt", "scale_mode", "backend", "block_rows", "block_cols",
                                             "num_warps"))
def mx_quantize(x: jax.Array, fmt: str | Format, *, scale_mode: str = "floor", backend: str = "triton",
                block_rows: int = 4, block_cols: int = 1024, num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
  """MX quantization of x (R, C) (bfloat16, float16 or float32) in blocks of 32 along the last axis.

  Returns (data, scale) with the storage of `lowbit_jax.quantize(x, fmt, scale_mode=scale_mode)` (module
  docstring), bit for bit outside the limits listed there. `fmt`: mxfp8_e4m3, mxfp8_e5m2, mxfp4 or mxint8.
  Tiles are (block_rows, C_tile) with C_tile the largest power of two dividing C and at most block_cols;
  block_rows and block_cols are powers of two.
  """
  fmt = get_format(fmt)
  rows, cols = x.shape
  _check(fmt, cols)
  if scale_mode not in scales.SCALE_MODES:
    raise ValueError(f"scale_mode must be one of {scales.SCALE_MODES}, got {scale_mode!r}.")
  el = fmt.element_type
  ct = _col_tile(cols, block_cols)
  per_byte = 8 // el.bits
  # MXFP4 data leaves the kernel as 32-bit words of 8 codes: (R, C / 8) uint32.
  per_word, data_dtype = (8, jnp.uint32) if el.bits == 4 else (1, jnp.int8 if el.kind == "int" else jnp.uint8)
  kernel = functools.partial(_quantize_kernel, el=el, mode=scale_mode, rows=rows, backend=backend)
  data, scale = _backend.call(
      kernel, backend=backend,
      out_shape=(jax.ShapeDtypeStruct((rows, cols // per_word), data_dtype),
                 jax.ShapeDtypeStruct((rows, cols // _BLOCK), jnp.uint8)),
      grid=(pl.cdiv(rows, block_rows), cols // ct),
      in_specs=[pl.BlockSpec((block_rows, ct), lambda i, j: (i, j))],
      out_specs=(pl.BlockSpec((block_rows, ct // per_word), lambda i, j: (i, j)),
                 pl.BlockSpec((block_rows, ct // _BLOCK), lambda i, j: (i, j))),
      num_warps=num_warps, num_stages=1, name=f"mx_quantize_{fmt.name}")(x)
  if el.bits == 4:
    data = lax.bitcast_convert_type(data, jnp.uint8).reshape(rows, cols // per_byte)
  elif el.kind == "float":
    data = lax.bitcast_convert_type(data, el.storage_dtype)
  return data, lax.bitcast_convert_type(scale, jnp.float8_e8m0fnu)


def _dequantize_kernel(d_ref, s_ref, o_ref, *, el: ElementType, rows: int, backend: str):
  br, ct = o_ref.shape
  nb = ct // _BLOCK
  d = _backend.load(d_ref, (slice(None), slice(None)), _row_mask(br, rows, d_ref.shape), 0, backend=backend)
  sbits = _backend.load(s_ref, (slice(None), slice(None)), _row_mask(br, rows, s_ref.shape), 0, backend=backend)
  if el.bits == 4:
    d = d.astype(jnp.int32)
    c = jnp.stack([d & 0xF, d >> 4], axis=-1).reshape(br, ct)
    # The sign goes in as a bit: Triton lowers -v as 0 - v, which loses the sign of zero.
    v = _f32(_i32(elements.decode(c & 7, el)) | ((c >> 3) << 31))
  elif el.kind == "float":
    v = lax.bitcast_convert_type(d, el.storage_dtype).astype(jnp.float32)
  else:  # MXINT8 codes are fixed point 1.6
    v = elements.ldexp_fast(lax.bitcast_convert_type(d, jnp.int8).astype(jnp.float32), -el.mantissa)
  s = sbits.astype(jnp.int32).reshape(br, nb, 1)
  out = jnp.where(s == 255, jnp.nan, elements.ldexp_fast(v.reshape(br, nb, _BLOCK), s - 127))
  out = out.reshape(br, ct).astype(o_ref.dtype)
  _backend.store(o_ref, out, _row_mask(br, rows, out.shape), backend=backend)


@functools.partial(jax.jit, static_argnames=("fmt", "dtype", "backend", "block_rows", "block_cols", "num_warps"))
def mx_dequantize(data: jax.Array, scale: jax.Array, fmt: str | Format, dtype=jnp.bfloat16, *,
                  backend: str = "triton", block_rows: int = 4, block_cols: int = 1024,
                  num_warps: int = 4) -> jax.Array:
  """The (R, C) array of `dtype` that MX `data` and `scale` (layouts in the module docstring) stand for.

  Computes q * 2^e in float32 (NaN where the scale is 0xFF) and casts to `dtype`, as `lowbit_jax.dequantize`
  does for a QArray blocked along its last axis; bit for bit outside the limits in the module docstring.
  Tiles as in `mx_quantize`.
  """
  fmt = get_format(fmt)
  el = fmt.element_type
  rows, cols = scale.shape[0], scale.shape[1] * _BLOCK
  _check(fmt, cols)
  per_byte = 8 // el.bits
  if data.shape != (rows, cols // per_byte):
    raise ValueError(f"data has shape {data.shape}; scale {scale.shape} needs {(rows, cols // per_byte)}.")
  ct = _col_tile(cols, block_cols)
  kernel = functools.partial(_dequantize_kernel, el=el, rows=rows, backend=backend)
  return _backend.call(
      kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((rows, cols), dtype),
      grid=(pl.cdiv(rows, block_rows), cols // ct),
      in_specs=[pl.BlockSpec((block_rows, ct // per_byte), lambda i, j: (i, j)),
                pl.BlockSpec((block_rows, ct // _BLOCK), lambda i, j: (i, j))],
      out_specs=pl.BlockSpec((block_rows, ct), lambda i, j: (i, j)),
      num_warps=num_warps, num_stages=1, name=f"mx_dequantize_{fmt.name}")(
          lax.bitcast_convert_type(data, jnp.uint8), lax.bitcast_convert_type(scale, jnp.uint8))
