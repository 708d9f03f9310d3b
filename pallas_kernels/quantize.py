"""Fused quantize and dequantize of 2-D arrays blocked along the last axis: MX (blocks of 32), NVFP4, and (quantize
only) per-row int8 and 1 x 128 block FP8; and `dequantize_cols`, the dequantize of weights blocked along their first
axis (K), for every format with power-of-two 1-D blocks.

Layouts (DESIGN.md), for x of shape (R, C), C a multiple of the block B (per-row int8: B = C):
  data: (R, C) float8 (MXFP8, block FP8), (R, C) int8 (MXINT8, int8) or (R, C / 2) uint8 (MXFP4, NVFP4: element 2i
    in the low nibble of byte i, 2i + 1 in the high nibble).
  scale: (R, C / B) float8_e8m0fnu (MX), float8_e4m3fn (NVFP4, B = 16, with a float32 tensor scale g), bfloat16
    or float32 (absmax formats).
One program handles a (block_rows, C_tile) tile of x: it reshapes it to (block_rows, C_tile / B, B), reduces each
block, and writes the matching tiles of data and scale. Kernels move 8-bit values as uint8 bits, scales as bits of
their width, and 4-bit data as little-endian uint32 words of eight codes (wider stores), bitcast outside; they
compute with the exact integer and power-of-two arithmetic of `lowbit_jax.scales` and `lowbit_jax.elements`, so
the stored bits equal those of `lowbit_jax.quantize` (round to nearest even).

NVFP4 and the absmax formats divide (NVFP4: s = amax / 6 / g and x / (s * g); absmax: s = amax / max and x / s),
each an IEEE quotient. Per block the kernel divides with `backend.div_rn` (Triton's own division is 2 ulps off)
and takes the reciprocal with `backend.rcp_rn`; per element `backend.div_by` refines x times the block's
reciprocal to the correctly rounded quotient with fused multiply-adds, after scaling x and the divisor by a power
of two that keeps every step in the normal range. NVFP4's E4M3 block scales round in the hardware conversion.

Exactness limits, left to the caller (fall back to XLA for them):
  - MX quantize: the scales are exact for every block, but the element codes of blocks with 0 < amax < 2^-100 are
    not (float32 subnormal inputs may be flushed; `scales.mx` takes its bit-exact path there).
  - dequantize: values whose float32 result is subnormal (MX scales below 2^-120 or so) may be flushed to zero;
    `lowbit_jax.dequantize` rounds them exactly.
MXFP6 (four codes in three bytes) is not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lowbit_jax import elements, packing, scales
from lowbit_jax.formats import SCALE_GRIDS, ElementType, Format, get_format
from pallas_kernels import backend as _backend
from pallas_kernels import decode

__all__ = ["quantize_rows", "dequantize_rows", "dequantize_cols", "supports", "supports_cols"]

_E4M3 = SCALE_GRIDS["float8_e4m3fn"]
# Scales leave the kernels as bits of their storage width, bitcast outside.
_SCALE_BITS = {"float8_e8m0fnu": jnp.uint8, "float8_e4m3fn": jnp.uint8, "bfloat16": jnp.uint16,
               "float32": jnp.uint32}


def supports(fmt: Format) -> str | None:
  """None if the kernels handle `fmt`, else the reason they do not."""
  if fmt.rule == "mx":
    if fmt.block != (32,):
      return f"{fmt.name}: MX blocks of {fmt.block}, not (32,)"
    if fmt.element_type.bits not in (4, 8):
      return f"{fmt.name}: {fmt.element_type.bits}-bit elements"
    return None
  if fmt.rule == "nvfp4":
    if fmt.block not in ((16,), (32,)) or fmt.element_type.bits != 4:
      return f"{fmt.name}: E4M3-scaled blocks of {fmt.block} with {fmt.element_type.bits}-bit elements"
    return None
  if fmt.rule == "absmax":
    if fmt.element == "int8" and fmt.block is None and fmt.scale in ("bfloat16", "float32"):
      return None  # per-row (per-token) int8
    if fmt.element == "float8_e4m3fn" and fmt.block == (128,) and fmt.scale == "float32":
      return None  # block FP8, 1 x 128
    return f"{fmt.name}: absmax formats other than per-row int8 and 1 x 128 block FP8"
  return f"{fmt.name}: not an MX, NVFP4, per-row int8 or block FP8 format"


def fits(fmt: Format, cols: int) -> str | None:
  """None if the kernels take rows of `cols` elements of `fmt` (whole blocks; a whole row must be a power of two
  of at most 16384 elements for per-row formats), else why not."""
  if fmt.block is None:
    return None if cols & (cols - 1) == 0 and 32 <= cols <= 16384 else (
        f"per-row {fmt.name} needs a power-of-two row length in [32, 16384], got {cols}")
  return None if cols % fmt.block[0] == 0 else f"the last axis ({cols}) is not a multiple of the block {fmt.block[0]}"


def _check(fmt: Format, cols: int) -> int:
  """The block size, after checking that the kernels take `fmt` and `cols`."""
  reason = supports(fmt) or fits(fmt, cols)
  if reason:
    raise ValueError(f"pallas_kernels.quantize does not support {reason}.")
  return cols if fmt.block is None else fmt.block[0]


def _col_tile(cols: int, most: int) -> int:
  """The largest power of two that divides `cols` and is at most `most` (>= 32 as cols % 32 == 0)."""
  t = 1
  while cols % (2 * t) == 0 and 2 * t <= most:
    t *= 2
  return t


def _row_mask(block_rows: int, rows: int, shape):
  """Which rows of the tile lie inside the array (None if every tile is whole)."""
  return _backend.tile_mask(_backend.in_bounds(0, block_rows, rows), None, shape)


def _with_tensor_scale(fmt: Format, tensor_scale, args: list, in_specs: list) -> tuple[list, list]:
  """The kernel operands plus, for NVFP4-rule formats, the float32 tensor scale g as a (1,) operand (1 if None)."""
  if fmt.rule != "nvfp4":
    return args, in_specs
  g = jnp.float32(1.0) if tensor_scale is None else jnp.asarray(tensor_scale, jnp.float32)
  return args + [g.reshape(1)], in_specs + [pl.BlockSpec((1,), lambda i, j: (0,))]


def _f32(bits):
  return lax.bitcast_convert_type(bits, jnp.float32)


def _i32(x):
  return lax.bitcast_convert_type(x, jnp.int32)


def _u32(x):
  return lax.bitcast_convert_type(x, jnp.uint32)


# The bits of 2^23, which the codes of narrow elements carry when `_float_codes` leaves them biased, and what eight
# of them add to a word of nibbles (as int32: the sums wrap).
_CODE_BIAS = 150 << 23
_WORD_BIAS = (_CODE_BIAS * 0x11111111 + 2 ** 31) % 2 ** 32 - 2 ** 31


def _float_codes(y, el: ElementType, *, backend: str, sign=None, biased: bool = False):
  """`elements.encode(elements.round_to_grid(y, el), el)` in one pass, as int32; the sign bit is that of `sign`
  (default y). `biased`: elements of up to three binades keep `_CODE_BIAS` added (`_pack_nibbles` removes it once
  per word instead of once per element).

  Elements with up to three binades (E2M1, E2M3) take the code of |y| as a concave piecewise-linear function:
  in binade e (the subnormals extend emin's line) it is |y| 2^(m - e) + (e - emin) 2^m, and each binade's line
  lies above the others' outside it, so the code is the minimum of the lines, rounded. Adding 2^23 in the same
  fused multiply-add rounds each line to an integer, ties to even, which is the grid's rounding (code parity is
  mantissa parity); saturation comes first. Wider elements round on the integer bits instead: at or above
  2^emin, rounding at mantissa bit 23 - m leaves the exponent and mantissa fields of the code in the high bits
  (a carry into the next binade included); below it, the float adder rounds. Float ops are cheaper than integer
  ones on Hopper.
  """
  m, emin, emax = el.mantissa, el.emin, el.emax
  bits = _i32(y)
  if emax - emin <= 2:
    a = jnp.abs(y)
    a = jnp.where(a < el.max, a, el.max)  # NaN (an overflowed quotient in div_by) saturates too
    lines = [_backend.fma(a, 2.0 ** (m - e), float((e - emin) * 2 ** m + 2 ** 23), backend=backend)
             for e in range(emin, emax + 1)]
    code = _i32(functools.reduce(jnp.minimum, lines)) - (0 if biased else _CODE_BIAS)
  else:
    mag = bits & 0x7FFFFFFF
    sh = 23 - m
    normal = (mag + ((1 << (sh - 1)) - 1) + ((mag >> sh) & 1)) >> sh
    normal = normal - ((127 + emin - 1) << m)
    sub = _i32(_f32(mag) + 2.0 ** (23 - m + emin)) - ((127 + 23 - m + emin) << 23)
    top = int(el.max * 2.0 ** (m - emax)) + ((emax - emin) << m)
    code = jnp.minimum(jnp.where(mag < ((127 + emin) << 23), sub, normal), top)
  sbits = bits if sign is None else _i32(sign)
  return code | (lax.shift_right_logical(sbits, 31) << (el.bits - 1))


def _mx_blocks(x, amax, el: ElementType, mode: str, backend: str):
  """(element codes, E8M0 scale bits, which blocks have codes) of MX blocks x (rows, blocks, B), amax the bits of
  each block's largest magnitude (rows, blocks, 1)."""
  finite = amax < 0x7F800000
  e = scales.mx_exponent(_f32(amax), el, mode)
  sbits = jnp.where(finite, e + 127, 255)
  y = elements.ldexp_fast(x, -e)
  ok = finite & (amax > 0)
  if el.kind == "float":
    return _float_codes(y, el, biased=el.bits == 4, backend=backend), sbits, ok
  # MXINT8: round(y * 2^6) saturated at 127, as round_to_grid then fixed point to integer codes
  n = jnp.minimum(elements.round_half_even(jnp.abs(y) * 2.0 ** el.mantissa), el.int_max)
  return jnp.where(y < 0, -n, n).astype(jnp.int8), sbits, ok


def _quotients(x, d, backend: str):
  """x / d correctly rounded, d > 0 one divisor per block: (x p) / (d p) with p = `elements.unit_scale(d)`, so the
  block's reciprocal and the refinement steps of `backend.div_by` stay in the normal range. Quotients that
  overflow come out inf or NaN; callers saturate them and take signs from x."""
  p = elements.unit_scale(d)
  d = d * p
  return _backend.div_by(x * p, d, _backend.rcp_rn(d, backend=backend), backend=backend)


def _nvfp4_blocks(x, amax, g, el: ElementType, backend: str):
  """As `_mx_blocks` for NVFP4 blocks (`scales.nvfp4`) with E4M3 scale bits, g the tensor scale."""
  div = functools.partial(_backend.div_rn, backend=backend)
  finite = amax < 0x7F800000
  s = jnp.minimum(div(div(_f32(jnp.where(finite, amax, 0)), el.max), g), _E4M3.max)
  # The hardware conversion rounds to nearest even and keeps E4M3 subnormals: `_float_codes(s, _E4M3)` in one
  # instruction where the bit arithmetic took about twenty, once per block on each thread that holds part of it.
  s8 = s.astype(jnp.float8_e4m3fn)
  scode, sf = lax.bitcast_convert_type(s8, jnp.uint8).astype(jnp.int32), s8.astype(jnp.float32)
  ok = finite & (sf > 0)
  y = _quotients(x, jnp.where(ok, sf * g, 1.0), backend)
  return _float_codes(y, el, sign=x, biased=el.bits == 4, backend=backend), jnp.where(finite, scode, 0x7F), ok


def _absmax_blocks(x, amax, el: ElementType, scale: str, backend: str):
  """As `_mx_blocks` for the absmax rule (`scales.absmax`): s = amax / max stored in `scale` (bfloat16 or float32;
  1 for an all-zero block of float elements), elements x / s; scale bits as int32."""
  finite = amax < 0x7F800000
  s = _backend.div_rn(_f32(jnp.where(finite, amax, 0)), el.max if el.kind == "float" else el.int_max,
                      backend=backend)
  if el.kind == "float":
    s = jnp.where(amax > 0, s, 1.0)
  if scale == "bfloat16":  # round to nearest even on the bits; past bfloat16's largest value, saturate (DESIGN)
    b = _i32(s)
    sbits = jnp.minimum((b + 0x7FFF + ((b >> 16) & 1)) >> 16, 0x7F7F)
    sf, nan = _f32(sbits << 16), 0x7FC0
  else:
    sbits, sf, nan = _i32(s), s, 0x7FC00000
  ok = finite & (sf > 0)
  y = _quotients(x, jnp.where(ok, sf, 1.0), backend)
  if el.kind == "float":
    codes = _float_codes(y, el, sign=x, backend=backend)
  else:  # round(|y|) saturated at 127; the sign of x. NaN (an overflowed quotient) saturates too.
    a = jnp.abs(y)
    n = jnp.minimum(elements.round_half_even(jnp.where(a < 2.0 ** 22, a, 2.0 ** 22)), el.int_max)
    codes = jnp.where(x < 0, -n, n).astype(jnp.int8)
  return codes, jnp.where(finite, sbits, nan), ok


def _pack_nibbles(codes, ok):
  """Biased 4-bit codes (rows, blocks, B) to little-endian 32-bit words of eight (rows, blocks * B / 8), blocks
  where `ok` is False cleared (a word at a time: B is a multiple of 8). Words make wider stores; the caller views
  them as bytes. Sums wrap, so the codes' bias leaves the sum as one constant."""
  br, nb, block = codes.shape
  nib = codes.reshape(br, nb, block // 8, 8)
  shifts = 4 * lax.broadcasted_iota(jnp.int32, nib.shape, 3)
  words = jnp.sum(nib << shifts, axis=-1) - _WORD_BIAS
  return _u32(jnp.where(ok, words, 0).reshape(br, nb * block // 8))


def _quantize_kernel(*refs, fmt: Format, mode: str, rows: int, backend: str):
  n_in = 2 if fmt.rule == "nvfp4" else 1  # x, and g for NVFP4-rule formats (`_with_tensor_scale`)
  (x_ref, *g_ref), (d_ref, s_ref, *g_out) = refs[:n_in], refs[n_in:]
  if g_out:  # formats with a tensor scale: the first program copies g to its output (`quantize_rows`)
    @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0))
    def _():
      g_out[0][...] = g_ref[0][...]
  br, ct = x_ref.shape
  el, block = fmt.element_type, (ct if fmt.block is None else fmt.block[0])
  nb = ct // block
  x = _backend.load(x_ref, (slice(None), slice(None)), _row_mask(br, rows, (br, ct)), 0, backend=backend)
  x = x.astype(jnp.float32).reshape(br, nb, block)
  # Block statistics on bit patterns, as `scales._amax`: non-negative floats order like their bits, and above
  # every finite one lie Inf and then NaN, so one max says both amax and whether the block is finite.
  amax = jnp.max(_i32(x) & 0x7FFFFFFF, axis=-1, keepdims=True)
  if fmt.rule == "mx":
    codes, sbits, ok = _mx_blocks(x, amax, el, mode, backend)
  elif fmt.rule == "nvfp4":
    codes, sbits, ok = _nvfp4_blocks(x, amax, g_ref[0][...].reshape(1, 1, 1), el, backend)
  else:
    codes, sbits, ok = _absmax_blocks(x, amax, el, fmt.scale, backend)
  if el.bits == 4:
    codes = _pack_nibbles(codes, ok)
  else:
    codes = jnp.where(ok, codes, 0).reshape(br, nb * block).astype(d_ref.dtype)
  _backend.store(d_ref, codes, _row_mask(br, rows, codes.shape), backend=backend)
  sbits = sbits.astype(s_ref.dtype).reshape(br, nb)
  _backend.store(s_ref, sbits, _row_mask(br, rows, sbits.shape), backend=backend)


@_backend.jit_op("fmt", "scale_mode", "backend", "block_rows", "block_cols", "num_warps")
def quantize_rows(x: jax.Array, fmt: str | Format, tensor_scale: jax.Array | None = None, *,
                  scale_mode: str = "floor", backend: str = "triton", block_rows: int | None = None,
                  block_cols: int = 1024,
                  num_warps: int = 4) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Quantizes x (R, C) (bfloat16, float16 or float32) in blocks along the last axis.

  Returns (data, scale, tensor_scale) with the storage of `lowbit_jax.quantize(x, fmt, scale_mode=scale_mode,
  tensor_scale=tensor_scale)` (module docstring), bit for bit outside the limits listed there; tensor_scale is
  the given g as a float32 scalar written by the kernel (None for formats without one), so that a jitted call
  returning it needs no copy of its input. `fmt`: mxfp8_e4m3,
  mxfp8_e5m2, mxfp4, mxint8, an NVFP4-rule format (E2M1 elements, E4M3 scales), which needs the float32
  `tensor_scale` g when it has one, per-row int8 (`int8_channel_sym`: one scale per row, for per-token
  activations) or 1 x 128 block FP8 (`fp8_block_1x128`). Tiles are (block_rows, C_tile) with C_tile the largest
  power of two dividing C and at most block_cols (per-row formats: the whole row, with fewer rows per tile);
  block_rows and block_cols are powers of two; block_rows defaults to 2 for NVFP4 (2 x 1024 was its fastest tile
  in sweeps on an H100) and 4 otherwise.
  """
  fmt = get_format(fmt)
  if block_rows is None:
    block_rows = 2 if fmt.rule == "nvfp4" else 4
  rows, cols = x.shape
  block = _check(fmt, cols)
  if scale_mode not in scales.SCALE_MODES:
    raise ValueError(f"scale_mode must be one of {scales.SCALE_MODES}, got {scale_mode!r}.")
  el = fmt.element_type
  if fmt.block is None:  # a program holds whole rows: at most 8192 elements of x
    ct, block_rows = cols, max(1, min(block_rows, 8192 // cols))
  else:
    ct = _col_tile(cols, block_cols)
  if fmt.tensor_scale and tensor_scale is None:
    raise ValueError(f"{fmt.name} needs its tensor scale g (lowbit_jax.scales.nvfp4_tensor_scale computes it).")
  args, in_specs = _with_tensor_scale(fmt, tensor_scale, [x], [pl.BlockSpec((block_rows, ct), lambda i, j: (i, j))])
  # 4-bit data leaves the kernel as 32-bit words of 8 codes: (R, C / 8) uint32.
  per_word, data_dtype = (8, jnp.uint32) if el.bits == 4 else (1, jnp.int8 if el.kind == "int" else jnp.uint8)
  out_shape = [jax.ShapeDtypeStruct((rows, cols // per_word), data_dtype),
               jax.ShapeDtypeStruct((rows, cols // block), _SCALE_BITS[fmt.scale])]
  out_specs = [pl.BlockSpec((block_rows, ct // per_word), lambda i, j: (i, j)),
               pl.BlockSpec((block_rows, ct // block), lambda i, j: (i, j))]
  if fmt.tensor_scale:  # g leaves as an output of the kernel too (see `_quantize_kernel`)
    out_shape.append(jax.ShapeDtypeStruct((1,), jnp.float32))
    out_specs.append(pl.BlockSpec((1,), lambda i, j: (0,)))
  kernel = functools.partial(_quantize_kernel, fmt=fmt, mode=scale_mode, rows=rows, backend=backend)
  data, scale, *g = _backend.call(
      kernel, backend=backend, out_shape=tuple(out_shape), grid=(pl.cdiv(rows, block_rows), cols // ct),
      in_specs=in_specs, out_specs=tuple(out_specs), num_warps=num_warps, num_stages=1,
      name=f"quantize_rows_{fmt.name}")(*args)
  if el.bits == 4:
    data = lax.bitcast_convert_type(data, jnp.uint8).reshape(rows, cols // 2)
  elif el.kind == "float":
    data = lax.bitcast_convert_type(data, el.storage_dtype)
  return data, lax.bitcast_convert_type(scale, jnp.dtype(fmt.scale)), (g[0].reshape(()) if g else None)


def _values(c, fmt: Format):
  """float32 element values of codes `c`: int32 codes of sub-byte elements, else the stored bytes (uint8). In
  grid units, except MXINT8's fixed point (scaled by 2^-6), as `lowbit_jax.dequantize` computes them."""
  el = fmt.element_type
  if el.bits < 8:
    top = el.bits - 1
    if el.kind == "float":
      # The sign goes in as a bit: Triton lowers -v as 0 - v, which loses the sign of zero.
      return _f32(_i32(elements.decode(c & ((1 << top) - 1), el)) | ((c >> top) << 31))
    return (c if fmt.zero_point else (c ^ (1 << top)) - (1 << top)).astype(jnp.float32)
  if el.kind == "float":
    return lax.bitcast_convert_type(c, el.storage_dtype).astype(jnp.float32)
  v = (c if fmt.zero_point else lax.bitcast_convert_type(c, jnp.int8)).astype(jnp.float32)
  return elements.ldexp_fast(v, -el.mantissa) if fmt.rule == "mx" else v


def _scaled(v, s, fmt: Format, g=None, z=None):
  """Values `v` times their block scales `s` (broadcastable against v; bits as int32 for float8 scales, else float32)
  by the rule of `fmt`, in `lowbit_jax.dequantize`'s order of operations: MX v * 2^e (NaN where the scale is 0xFF),
  NVFP4 (v * s) * g (E4M3 0x7F / 0xFF is NaN), integers s * (v - z) with zero points `z`, else v * s."""
  if fmt.rule == "mx":
    return jnp.where(s == 255, jnp.nan, elements.ldexp_fast(v, s - 127))
  if fmt.rule == "nvfp4":
    sf = jnp.where((s & 0x7F) == 0x7F, jnp.nan, elements.decode(s & 0x7F, _E4M3))
    return (v * sf) * g
  return s * (v - z) if z is not None else v * s


def _scale_tile(sbits):
  return sbits.astype(jnp.int32) if sbits.dtype == jnp.uint8 else sbits.astype(jnp.float32)


def _dequantize_kernel(*refs, fmt: Format, rows: int, backend: str):
  d_ref, s_ref, *g_ref, o_ref = refs
  el, block = fmt.element_type, fmt.block[0]
  br, ct = o_ref.shape
  nb = ct // block
  d = _backend.load(d_ref, (slice(None), slice(None)), _row_mask(br, rows, d_ref.shape), 0, backend=backend)
  sbits = _backend.load(s_ref, (slice(None), slice(None)), _row_mask(br, rows, s_ref.shape), 0, backend=backend)
  if el.bits == 4:
    d = d.astype(jnp.int32)
    d = jnp.stack([d & 0xF, d >> 4], axis=-1).reshape(br, ct)
  v = _values(d, fmt).reshape(br, nb, block)
  g = g_ref[0][...].reshape(1, 1, 1) if g_ref else None
  out = _scaled(v, _scale_tile(sbits).reshape(br, nb, 1), fmt, g).reshape(br, ct).astype(o_ref.dtype)
  _backend.store(o_ref, out, _row_mask(br, rows, out.shape), backend=backend)


@_backend.jit_op("fmt", "dtype", "backend", "block_rows", "block_cols", "num_warps")
def dequantize_rows(data: jax.Array, scale: jax.Array, fmt: str | Format, dtype=jnp.bfloat16,
                    tensor_scale: jax.Array | None = None, *, backend: str = "triton", block_rows: int = 4,
                    block_cols: int = 1024, num_warps: int = 4) -> jax.Array:
  """The (R, C) array of `dtype` that `data` and `scale` (layouts in the module docstring) stand for.

  Computes in float32 as `lowbit_jax.dequantize` does for a QArray blocked along its last axis (MX: q * 2^e,
  NaN where the scale is 0xFF; NVFP4: (q * s) * g) and casts to `dtype`; bit for bit outside the limits in the
  module docstring. Tiles as in `quantize_rows`.
  """
  fmt = get_format(fmt)
  el = fmt.element_type
  block = _check(fmt, scale.shape[1] * fmt.block[0])
  rows, cols = scale.shape[0], scale.shape[1] * block
  per_byte = 8 // el.bits
  if data.shape != (rows, cols // per_byte):
    raise ValueError(f"data has shape {data.shape}; scale {scale.shape} needs {(rows, cols // per_byte)}.")
  ct = _col_tile(cols, block_cols)
  args, in_specs = _with_tensor_scale(
      fmt, tensor_scale, [_backend.byte_bits(data), _backend.byte_bits(scale)],
      [pl.BlockSpec((block_rows, ct // per_byte), lambda i, j: (i, j)),
       pl.BlockSpec((block_rows, ct // block), lambda i, j: (i, j))])
  kernel = functools.partial(_dequantize_kernel, fmt=fmt, rows=rows, backend=backend)
  return _backend.call(
      kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((rows, cols), dtype),
      grid=(pl.cdiv(rows, block_rows), cols // ct), in_specs=in_specs,
      out_specs=pl.BlockSpec((block_rows, ct), lambda i, j: (i, j)),
      num_warps=num_warps, num_stages=1, name=f"dequantize_rows_{fmt.name}")(*args)


def supports_cols(fmt: Format) -> str | None:
  """None if `dequantize_cols` takes `fmt`, else the reason it does not."""
  if fmt.block is None or len(fmt.block) != 1:
    return f"{fmt.name}: {'per-channel scales' if fmt.block is None else '2-D blocks'}"
  if fmt.block[0] & (fmt.block[0] - 1) or fmt.block[0] < packing.codes_per_group(fmt.element_type.bits):
    return f"{fmt.name}: blocks of {fmt.block[0]} (not a power of two holding whole packing groups)"
  return None


def _dequantize_cols_kernel(*refs, fmt: Format, rows: int, cols: int, backend: str):
  d_ref, s_ref, *rest = refs
  o_ref = rest[-1]
  z_ref = rest[0] if fmt.zero_point else None
  g = rest[-2][...].reshape(1, 1, 1) if fmt.rule == "nvfp4" else None
  el = fmt.element_type
  p, nbytes = packing.codes_per_group(el.bits), packing.bytes_per_group(el.bits)  # per packing group
  tp, ct = d_ref.shape[0] // nbytes, d_ref.shape[1]  # packing groups down the tile, columns
  nb = s_ref.shape[0]
  col_ok = _backend.in_bounds(1, ct, cols, dim=1)

  def mask(total_rows, shape):
    return _backend.tile_mask(_backend.in_bounds(0, shape[0], total_rows), col_ok, shape)

  def ld(ref, total_rows, row_idx=slice(None), shape=None):
    shape = shape or ref.shape
    return _backend.load(ref, (row_idx, slice(None)), mask(total_rows, shape), 0, backend=backend)

  s = _scale_tile(ld(s_ref, rows // fmt.block[0])).reshape(nb, 1, ct)
  z = None if z_ref is None else ld(z_ref, rows // fmt.block[0]).astype(jnp.float32).reshape(nb, 1, ct)
  if el.bits == 8:
    planes = [ld(d_ref, rows)]
  else:  # byte j of every packing group, then the groups' codes
    planes = decode.unpack_groups([ld(d_ref, rows // p, pl.ds(j, tp, stride=nbytes) if nbytes > 1 else slice(None),
                                      (tp, ct)) for j in range(nbytes)], el)
  for j, c in enumerate(planes):  # plane j holds rows k = p * r + j of the output tile
    out = _scaled(_values(c, fmt).reshape(nb, tp // nb, ct), s, fmt, g, z).reshape(tp, ct).astype(o_ref.dtype)
    _backend.store(o_ref, out, mask(rows // p, out.shape), backend=backend,
                   idx=... if p == 1 else (slice(None), j, slice(None)))


@_backend.jit_op("fmt", "dtype", "backend", "block_rows", "block_cols", "num_warps")
def dequantize_cols(data: jax.Array, scale: jax.Array, fmt: str | Format, dtype=jnp.bfloat16,
                    tensor_scale: jax.Array | None = None, zero_point: jax.Array | None = None, *,
                    backend: str = "triton", block_rows: int = 32, block_cols: int = 256,
                    num_warps: int | None = None) -> jax.Array:
  """The (R, C) array of `dtype` that a QArray blocked along axis 0 stands for: a (K, N) weight quantized along K.

  `data` is the packing of REFERENCE section 3 down each column: (R / P * W, C) for packing groups of P codes in W
  bytes (4-bit: row 2i in the low nibble of byte row i, 2i + 1 in the high one; 6-bit: four rows in three byte rows),
  `scale` (R / B, C) for blocks of B rows (`zero_point` likewise for asymmetric integers; NVFP4 rule:
  `tensor_scale` g). Formats: every element width with power-of-two 1-D blocks (MX, NVFP4, grouped integers, block
  FP8 1 x 128). Computes in float32 as `lowbit_jax.dequantize` does and casts to `dtype`: the same
  bits, outside the subnormal limit in the module docstring. One program writes a (block_rows, block_cols) tile;
  sub-byte codes are decoded as P planes of rows, each stored to its own rows (no interleave in registers). The
  default tiles, 32 (or one block) x 256 with 4 warps per 8192 elements, were the fastest of eight shapes swept on an
  H100 (BENCHMARKS.md).
  """
  fmt = get_format(fmt)
  reason = supports_cols(fmt)
  if reason:
    raise ValueError(f"dequantize_cols does not support {reason}.")
  block = fmt.block[0]
  p, nbytes = packing.codes_per_group(fmt.element_type.bits), packing.bytes_per_group(fmt.element_type.bits)
  rows, cols = scale.shape[0] * block, scale.shape[1]
  if data.shape != (rows // p * nbytes, cols):
    raise ValueError(f"data has shape {data.shape}; scale {scale.shape} needs {(rows // p * nbytes, cols)}.")
  if fmt.tensor_scale and tensor_scale is None:
    raise ValueError(f"{fmt.name} needs its tensor scale g.")
  if fmt.zero_point != (zero_point is not None):
    raise ValueError(f"{fmt.name} {'needs' if fmt.zero_point else 'has no'} zero points.")
  tr = max(block_rows, block)
  ct = min(block_cols, pl.next_power_of_2(cols))
  num_warps = num_warps or max(4, tr * ct // 4096)
  operands = [_backend.byte_bits(data), _backend.byte_bits(scale)]
  in_specs = [pl.BlockSpec((tr // p * nbytes, ct), lambda i, j: (i, j)),
              pl.BlockSpec((tr // block, ct), lambda i, j: (i, j))]
  if zero_point is not None:
    operands.append(zero_point)
    in_specs.append(in_specs[-1])
  operands, in_specs = _with_tensor_scale(fmt, tensor_scale, operands, in_specs)
  if p == 1:
    out_shape, out_spec = (rows, cols), pl.BlockSpec((tr, ct), lambda i, j: (i, j))
  else:  # (R / P, P, C) is (R, C) in memory: [r, j] is row P r + j
    out_shape, out_spec = (rows // p, p, cols), pl.BlockSpec((tr // p, p, ct), lambda i, j: (i, 0, j))
  kernel = functools.partial(_dequantize_cols_kernel, fmt=fmt, rows=rows, cols=cols, backend=backend)
  out = _backend.call(
      kernel, backend=backend, out_shape=jax.ShapeDtypeStruct(out_shape, dtype),
      grid=(pl.cdiv(rows, tr), pl.cdiv(cols, ct)), in_specs=in_specs, out_specs=out_spec,
      num_warps=num_warps, num_stages=1, name=f"dequantize_cols_{fmt.name}")(*operands)
  return out.reshape(rows, cols)
