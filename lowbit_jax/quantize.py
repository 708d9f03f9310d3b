"""`quantize` and `dequantize`: jit-compiled grouped quantization for every format (REFERENCE sections 2-3)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import elements, hqq, packing, scale_search, scales
from lowbit_jax.formats import Format, get_format
from lowbit_jax.prepared import PreparedWeight
from lowbit_jax.qarray import QArray

__all__ = ["quantize", "dequantize"]


def _blocked_axes(fmt: Format, ndim: int, axis: int) -> tuple[int, ...]:
  """Non-negative blocked axes: `axis`, and for 2-D blocks the axis before it."""
  if not isinstance(axis, (int, np.integer)):
    raise TypeError(f"axis must be an int, got {type(axis).__name__}.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for an input of rank {ndim}.")
  axis = int(axis) % ndim
  nb = 1 if fmt.block is None else len(fmt.block)
  if axis - nb + 1 < 0:
    raise ValueError(f"format {fmt.name!r} blocks {nb} axes ending at axis {axis}; the input has rank {ndim}.")
  return tuple(range(axis - nb + 1, axis + 1))


def _block_sizes(fmt: Format, shape, axes) -> tuple[int, ...]:
  return tuple(shape[a] for a in axes) if fmt.block is None else fmt.block


def _pad_to(shape, axes, multiples) -> tuple[int, ...]:
  """`shape` with each of `axes` rounded up to a multiple of the matching entry of `multiples`."""
  s = list(shape)
  for a, m in zip(axes, multiples):
    s[a] = -(-s[a] // m) * m
  return tuple(s)


def _split_blocks(x, axes, sizes):
  """Reshapes so that each blocked axis a becomes (a / size, size); returns the array and the size axes."""
  shape, red, offset = [], [], 0
  for i, n in enumerate(x.shape):
    if i in axes:
      b = sizes[axes.index(i)]
      shape += [n // b, b]
      red.append(i + offset + 1)
      offset += 1
    else:
      shape.append(n)
  return x.reshape(shape), tuple(red)


def _quantize(x, key, tensor_scale, *, fmt: Format, axes, scale_mode, rounding, calibrate=None):
  el = fmt.element_type
  dtype = x.dtype
  logical = x.shape
  x = x.astype(jnp.float32)
  g = None
  if fmt.tensor_scale:
    g = scales.nvfp4_tensor_scale(x, el) if tensor_scale is None else jnp.asarray(tensor_scale, jnp.float32)
  elif fmt.rule == "nvfp4":
    g = jnp.float32(1.0)
  sizes = _block_sizes(fmt, logical, axes)
  block_padded = _pad_to(logical, axes, sizes)
  # Padding up to a whole packing group lies past the last block (it matters for per-channel sub-byte formats).
  padded = _pad_to(block_padded, axes[-1:], [packing.codes_per_group(el.bits)])
  x = jnp.pad(x, [(0, p - n) for p, n in zip(block_padded, logical)])
  xb, red = _split_blocks(x, axes, sizes)
  u = None
  if rounding == "stochastic":
    u = jax.random.uniform(key, xb.shape, jnp.float32)
  if calibrate is None:
    q, scale, zero_point = scales.quantize_blocks(xb, red, fmt, scale_mode, g, u)
  elif isinstance(calibrate, hqq.HQQ):
    q, scale, zero_point = hqq.quantize_blocks(xb, red, fmt, calibrate)
  elif fmt.rule == "mx":
    q, scale, zero_point = scale_search.mx(xb, red, fmt.element_type, calibrate)
  else:
    q, scale, zero_point = scale_search.nvfp4(xb, red, fmt.element_type, g, calibrate)
  q = q.reshape(block_padded)
  scale = scale.reshape([s for i, s in enumerate(scale.shape) if i not in red])
  if zero_point is not None:
    zero_point = zero_point.reshape(scale.shape)
  if padded != block_padded:  # per-channel 4/6-bit on an axis of odd length: pad with the codes of zero
    z = 0.0 if zero_point is None else zero_point.astype(jnp.float32)  # (1 along the axis)
    q = jnp.pad(q - z, [(0, p - n) for p, n in zip(padded, block_padded)]) + z
  data = _codes(q, fmt, axes[-1])
  return QArray(data, scale, g if fmt.tensor_scale else None, zero_point, format=fmt,
                axis=axes[-1] - len(logical), lengths=tuple(logical[a] for a in axes), dtype=dtype)


def _codes(q, fmt: Format, axis):
  """Storage of grid values `q` (DESIGN.md): native float8, int8/uint8, or packed sub-byte codes."""
  el = fmt.element_type
  if el.kind == "float":
    if el.bits == 8:
      return q.astype(el.storage_dtype)
    return packing.pack(elements.encode(q, el), el.bits, axis)
  if fmt.rule == "mx":  # fixed point 1.(bits-2) to integer codes
    q = elements.ldexp_fast(q, el.mantissa)
  if el.bits == 8:
    return q.astype(jnp.uint8 if fmt.zero_point else jnp.int8)
  # Sub-byte codes: the low `bits` bits (two's complement for symmetric formats).
  return packing.pack((q.astype(jnp.int32) & ((1 << el.bits) - 1)).astype(jnp.uint8), el.bits, axis)


def _element_values(q: QArray) -> jax.Array:
  """float32 element values (grid units) of the padded tensor."""
  fmt, el = q.format, q.format.element_type
  if el.kind == "float":
    if el.bits == 8:
      return q.data.astype(jnp.float32)
    return elements.decode(packing.unpack(q.data, el.bits, q.axis), el)
  c = packing.unpack(q.data, el.bits, q.axis).astype(jnp.int32)
  if el.bits < 8 and not fmt.zero_point:
    h = 1 << (el.bits - 1)
    c = (c ^ h) - h  # sign-extend the sub-byte two's complement code (int8 data is already signed)
  v = c.astype(jnp.float32)
  return elements.ldexp_fast(v, -el.mantissa) if fmt.rule == "mx" else v


def _dequantize(q: QArray, dtype):
  fmt = q.format
  axes = q.blocked_axes
  sizes = _block_sizes(fmt, q.shape, axes)

  def dequantized(scaled):  # the array of `scaled(element values split into blocks, their size axes)`
    v = _element_values(q)
    v = jax.lax.slice(v, [0] * v.ndim, _pad_to(q.shape, axes, sizes))
    out = scaled(*_split_blocks(v, axes, sizes)).reshape(v.shape)
    return jax.lax.slice(out, [0] * out.ndim, q.shape).astype(dtype)

  if fmt.rule == "mx":
    bits = jax.lax.bitcast_convert_type(q.scale, jnp.uint8).astype(jnp.int32)
    # Results can be subnormal only under scales below 2^(-126 - emin + mantissa); check once per array.
    tiny = jnp.any(bits < 127 - 126 - fmt.element_type.emin + fmt.element_type.mantissa + 1)

    def mx(ldexp):
      def scaled(vb, red):
        e = jnp.expand_dims(bits, red)
        return jnp.where(e == 255, jnp.nan, ldexp(vb, e - 127))
      return dequantized(scaled)

    return elements.ldexp_if(tiny, mx)

  def scaled(vb, red):
    sf = jnp.expand_dims(q.scale, red).astype(jnp.float32)
    if fmt.zero_point:
      return sf * (vb - jnp.expand_dims(q.zero_point, red).astype(jnp.float32))
    return vb * sf * q.tensor_scale if fmt.tensor_scale else vb * sf

  return dequantized(scaled)


# The float dtypes the fused kernels read and write.
_KERNEL_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))


def _fused(x, fmt: Format, shape, axis: int, dtype, rounding: str = "nearest") -> bool:
  """Whether the fused Pallas kernels (pallas_kernels/quantize.py) take this call: an NVIDIA GPU, a format they
  support (MX, NVFP4, per-row int8, block FP8 1 x 128), blocks along the last axis of whole blocks, nearest
  rounding. They store the same bits."""
  if (rounding != "nearest" or not shape or axis != len(shape) - 1 or 0 in shape
      or jnp.dtype(dtype) not in _KERNEL_DTYPES):
    return False
  from pallas_kernels.backend import on_gpu
  from pallas_kernels.quantize import fits, supports
  return on_gpu(x) and supports(fmt) is None and fits(fmt, shape[-1]) is None


def _quantize_fused(x, fmt: Format, scale_mode: str, tensor_scale) -> QArray:
  from pallas_kernels.quantize import quantize_rows
  lead, c = x.shape[:-1], x.shape[-1]
  g = None
  if fmt.tensor_scale:  # a computed g needs the whole array's amax first: one more read of x
    g = _tensor_scale_jit(x, fmt.element_type) if tensor_scale is None else jnp.asarray(tensor_scale, jnp.float32)
  data, scale, g = quantize_rows(x.reshape(-1, c), fmt, g, scale_mode=scale_mode)
  return QArray(data.reshape(lead + data.shape[-1:]), scale.reshape(lead + scale.shape[-1:]), g, None,
                format=fmt, axis=-1, lengths=(c,), dtype=x.dtype)


def _dequantize_fused(q: QArray, dtype) -> jax.Array:
  from pallas_kernels.quantize import dequantize_rows
  y = dequantize_rows(q.data.reshape(-1, q.data.shape[-1]), q.scale.reshape(-1, q.scale.shape[-1]), q.format,
                      dtype, q.tensor_scale)
  return y.reshape(q.shape)


def _fused_cols(q: QArray, dtype) -> bool:
  """Whether `pallas_kernels.quantize.dequantize_cols` takes q (blocked along a non-last axis) on this device."""
  if q.size == 0 or jnp.dtype(dtype) not in _KERNEL_DTYPES:
    return False
  from pallas_kernels.backend import on_gpu
  from pallas_kernels.quantize import supports_cols
  return on_gpu(q.data) and supports_cols(q.format) is None


def _dequantize_cols_fused(q: QArray, dtype) -> jax.Array:
  """Leading axes fold into the block axis (blocks never straddle them: the axis holds whole blocks), trailing
  axes into the columns."""
  from pallas_kernels.quantize import dequantize_cols
  ax = q.axis

  def two_d(a):
    return None if a is None or a.ndim == 0 else a.reshape(-1, math.prod(a.shape[ax + 1:]))

  y = dequantize_cols(two_d(q.data), two_d(q.scale), q.format, dtype, q.tensor_scale, two_d(q.zero_point))
  return y.reshape(q.shape)


_quantize_jit = jax.jit(_quantize, static_argnames=("fmt", "axes", "scale_mode", "rounding", "calibrate"))
_dequantize_jit = jax.jit(_dequantize, static_argnames=("dtype",))
_tensor_scale_jit = jax.jit(lambda x, el: scales.nvfp4_tensor_scale(x.astype(jnp.float32), el),
                            static_argnames=("el",))


def quantize(x: jax.Array, fmt: str | Format, *, axis: int = -1,
             scale_mode: Literal["floor", "ceil", "even", "rceil"] | None = None,
             rounding: Literal["nearest", "stochastic"] = "nearest", key: jax.Array | None = None,
             tensor_scale: jax.Array | float | None = None,
             calibrate: Literal["mse", "mae", "hqq"] | hqq.HQQ | None = None) -> QArray:
  """Quantizes `x` into blocks along `axis` (2-D block formats: the axis before it too).

  Computes in float32 and rounds each element with its block's scale as stored (REFERENCE section 2), so
  `dequantize(quantize(x))` is exactly what a kernel reading the stored bits sees. A ragged block axis is
  zero-padded to whole blocks; the logical shape is kept. On an NVIDIA GPU, MX formats with 8- and 4-bit elements,
  NVFP4, per-row int8 and 1 x 128 block FP8, blocked along the last axis, run a fused Pallas kernel that stores
  the same bits; everything else is an XLA computation.

  Args:
    x: a floating array of any rank (bf16, f16, f32, ...).
    fmt: a format name from `lowbit_jax.formats()` or a `lowbit_jax.Format`.
    axis: the block axis (the contraction axis of a matmul operand).
    scale_mode: MX (E8M0-scaled) formats only: `floor` (OCP, default), `ceil`, `even` or `rceil`.
    rounding: `nearest` (ties to even) or `stochastic` (needs `key`).
    key: a `jax.random` key for stochastic rounding.
    tensor_scale: formats with a tensor scale (NVFP4) only: a positive finite float32 g (static calibration);
      computed from `x` when None.
    calibrate: None for round-to-nearest under the format's scale rule; `"mse"` or `"mae"` for MX and NVFP4
      formats: a per-block search over candidate scales (`lowbit_jax.scale_search`) keeping the one with the
      smallest squared or absolute error; `"hqq"` or an `lb.HQQ(...)` for asymmetric integer formats: zero points
      (and optionally scales) from the HQQ solver (`lowbit_jax.hqq`). Either way the result is a standard QArray,
      never worse than round-to-nearest on the objective, block by block. Runs on XLA (not the fused kernels).

  Returns:
    A `QArray`.

  Example:
    >>> import jax, jax.numpy as jnp, lowbit_jax as lb
    >>> x = jnp.array([[0.1, -2.0, 3.3, 500.0] * 8])
    >>> q = lb.quantize(x, "mxfp4")
    >>> q.scale.astype(jnp.float32)
    Array([[64.]], dtype=float32)
    >>> lb.dequantize(q)[0, :4]
    Array([  0., -0.,   0., 384.], dtype=float32)
  """
  fmt = get_format(fmt)
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    x = jnp.asarray(x)
    dtype = x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"quantize: x must be a floating array (bfloat16, float16, float32), got dtype {dtype}.")
  axes = _blocked_axes(fmt, len(np.shape(x)), axis)
  if scale_mode is None:
    scale_mode = "floor"
  elif fmt.rule != "mx":
    raise ValueError(f"quantize: scale_mode applies to MX (E8M0-scaled) formats only; format {fmt.name!r} has "
                     f"{fmt.scale} scales. Leave scale_mode=None.")
  if scale_mode not in scales.SCALE_MODES:
    raise ValueError(f"quantize: scale_mode must be one of {scales.SCALE_MODES}, got {scale_mode!r}.")
  if rounding not in ("nearest", "stochastic"):
    raise ValueError(f"quantize: rounding must be 'nearest' or 'stochastic', got {rounding!r}.")
  if rounding == "stochastic" and key is None:
    raise ValueError("quantize: rounding='stochastic' needs a PRNG key: pass key=jax.random.key(seed).")
  if rounding == "nearest":
    key = None
  if tensor_scale is not None:
    tensor_scale = _check_tensor_scale(tensor_scale, fmt)
  if calibrate is not None:
    calibrate = _check_calibrate(calibrate, fmt, scale_mode, rounding)
  elif _fused(x, fmt, np.shape(x), axes[-1], dtype, rounding):
    return _quantize_fused(x, fmt, scale_mode, tensor_scale)
  return _quantize_jit(x, key, tensor_scale, fmt=fmt, axes=axes, scale_mode=scale_mode, rounding=rounding,
                       calibrate=calibrate)


def _check_calibrate(calibrate, fmt: Format, scale_mode, rounding):
  """The calibration to run (an HQQ config or a scale-search metric), after checking it fits the call."""
  if rounding != "nearest":
    raise ValueError("quantize: calibrate works with rounding='nearest' only.")
  if calibrate == "hqq":
    calibrate = hqq.HQQ()
  if isinstance(calibrate, hqq.HQQ):
    calibrate.check(fmt)
    return calibrate
  if calibrate not in scale_search.METRICS:
    raise ValueError(f"quantize: calibrate must be None, 'hqq', a lowbit_jax.HQQ, or one of "
                     f"{scale_search.METRICS}, got {calibrate!r}.")
  if fmt.rule not in ("mx", "nvfp4"):
    raise ValueError(f"quantize: calibrate={calibrate!r} (scale search) applies to MX and NVFP4 formats; format "
                     f"{fmt.name!r} has {fmt.scale} scales (use calibrate='hqq' for asymmetric integers).")
  if scale_mode not in (None, "floor"):
    raise ValueError(f"quantize: calibrate={calibrate!r} searches around the floor scale; leave scale_mode unset.")
  return calibrate


def _check_tensor_scale(g, fmt: Format):
  if not fmt.tensor_scale:
    raise ValueError(f"quantize: format {fmt.name!r} has no tensor scale; leave tensor_scale=None.")
  if isinstance(g, (int, float)):
    g = np.float32(g)
  if np.shape(g) != () or np.dtype(getattr(g, "dtype", np.float32)) != np.float32:
    raise ValueError(f"quantize: tensor_scale must be a float32 scalar, got shape {np.shape(g)} and dtype "
                     f"{getattr(g, 'dtype', type(g).__name__)}.")
  if not isinstance(g, jax.core.Tracer) and not (np.isfinite(g) and g > 0):
    raise ValueError(f"quantize: tensor_scale must be positive and finite, got {float(g)}.")
  return g


def dequantize(q: QArray | PreparedWeight, dtype=None) -> jax.Array:
  """The values a QArray (or a `PreparedWeight`) stands for, as an array of its logical shape.

  Computes in float32 (MX: q * 2^e; NVFP4: (q * s_b) * g; integers: s * (q - z); block FP8: q * s) and casts
  to `dtype` (default: the dtype that was quantized).

  >>> import jax.numpy as jnp, lowbit_jax as lb
  >>> q = lb.quantize(jnp.arange(8.0), "mxint8")
  >>> lb.dequantize(q, jnp.float32)
  Array([0., 1., 2., 3., 4., 5., 6., 7.], dtype=float32)
  """
  if isinstance(q, PreparedWeight):
    q = q.canonical()
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize: q must be a QArray (from lowbit_jax.quantize), got {type(q).__name__}.")
  dtype = q.dtype if dtype is None else np.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dequantize: dtype must be a floating dtype, got {dtype}.")
  ax = q.axis
  whole = q.data.shape[ax] * 8 // q.format.element_type.bits == q.shape[ax]  # no padding along the block axis
  # Blocks along the last axis: the fused kernel covers MX and NVFP4 (absmax formats dequantize in one XLA fusion
  # near copy speed). Along an earlier axis (weights blocked along K): XLA's fusion runs at 0.1-0.4 of copy
  # bandwidth there (BENCHMARKS.md), so every format the column kernel takes goes to it.
  if whole and q.format.rule in ("mx", "nvfp4") and _fused(q.data, q.format, q.shape, ax, dtype):
    return _dequantize_fused(q, dtype)
  if whole and ax < q.ndim - 1 and _fused_cols(q, dtype):
    return _dequantize_cols_fused(q, dtype)
  return _dequantize_jit(q, dtype)
