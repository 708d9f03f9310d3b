"""Chooses an implementation for each quantized matmul call.

`auto` (the default): on an NVIDIA GPU, the kernel that takes the format pair, dtypes and layout (and the number
of rows M where it wins), else the XLA reference, with a one-time warning that names the reason when no kernel
takes the call; elsewhere the XLA reference (no warning: that is the implementation for CPU and TPU).
Kernels: weight-only with (K, N) weights and int8 x int8 are Pallas lowered through Triton (`pallas`); weight-only
with K-major (N, K) int4 / int8 / MXFP4 / MXFP6 / MXFP8 / NVFP4 weights (int4 at any M, the others below
KMAJOR_XLA_FROM_M rows) is Pallas lowered through Mosaic GPU (`mosaic`,
Hopper); block FP8 is a Mosaic GPU kernel on Hopper from BLOCK_FP8_MOSAIC_FROM_M rows, and otherwise a Triton
kernel launched by jax_triton (`jax_triton`, the optional `lowbit-jax[triton]` extra; a GPU with neither warns once
and runs XLA). MXFP8 x MXFP8 (one element type) and MXINT8 x MXINT8 pairs with K-major weights have a Mosaic GPU
kernel on FP8 / int8 MMAs that runs only when asked for (`mosaic`): dequantizing MX operands exactly to bfloat16,
which `auto` runs, was faster on the H100 at every shape measured. `pallas`, `mosaic`, `jax_triton`, `xla` and
`interpret` force one; `interpret` runs the kernel's math on any device (the Pallas or Mosaic GPU interpreter, or the
XLA twin of a jax_triton kernel).
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp

from lowbit_jax.prepared import PreparedWeight
from lowbit_jax.qarray import QArray

__all__ = ["BACKENDS", "choose", "pair_kernel", "weight_only_kernel", "xla_from_m"]

BACKENDS = ("auto", "pallas", "mosaic", "jax_triton", "xla", "interpret")
_warned: set[str] = set()

# From this many activation rows on, dequantize-then-dot (the weight dequantized once, then XLA's bf16 GEMM) beats
# the fused kernel on Hopper (BENCHMARKS.md, weight-only matmul): from M = 256 for the formats the column
# dequantize kernel of pallas_kernels/quantize.py takes (at M = 128 the split-K kernel is faster), from M = 512
# for the others (per-channel scales), whose dequantization is an XLA fusion.
XLA_FROM_M = 256
XLA_FROM_M_SLOW_DEQUANT = 512
# K-major weights: the Mosaic kernel (tiles of 256 rows) beat dequantize-then-dot at every M measured for int4
# (1.04-1.31x at M = 2048 and 8192), the others up to M = 2048: MXFP4, NVFP4 and int8 0.99-1.04x (at 4096
# 0.92-1.01x, at 8192 0.90-0.97x), MXFP8 and MXINT8 1.05-1.15x since programs sweep the weights in raster groups of
# 4 activation tiles (`dequant_gemv_mosaic._RASTER`; at 4096 0.97x on (28672, 8192), 1.03-1.06x on 8192^2), MXFP6
# 1.37x (the switch at 4096 not measured for it). Quantized pairs with K-major weights stream them through the
# kernel below the same rows: their XLA path dequantizes both operands and writes float32. BENCHMARKS.md.
KMAJOR_XLA_FROM_M = 4096
# From this many rows on, the Pallas int8 kernel (scales in its epilogue) beats XLA's int8 GEMM plus a separate
# scaling pass; below it XLA's is faster (BENCHMARKS.md, A8W8: kernel at M = 2048 and 8192, XLA at M = 16).
INT8_KERNEL_FROM_M = 512
# Block-FP8 pairs have two kernels, either of which can be forced: Mosaic GPU (Hopper; 1.39-1.65x bf16 at M = 2048
# and 8192 against the Triton kernel's 1.10-1.18x in the same run) and Triton through jax_triton
# (any GPU with FP8 MMAs; 64-row tiles up to M = 64, and faster than the Mosaic kernel on all three shapes at
# M = 16: BENCHMARKS.md). On Hopper the Mosaic kernel runs from this many rows on, and below it without jax_triton.
BLOCK_FP8_KERNELS = ("mosaic", "jax_triton")
BLOCK_FP8_MOSAIC_FROM_M = 65


def weight_only_kernel(lhs, rhs: QArray | PreparedWeight, dimension_numbers, m: int) -> tuple[str, str | None]:
  """(the backend of the weight-only kernel for this call, None if it takes the call, else why not).

  (K, N) weights blocked along K go to the Pallas-Triton kernel; K-major (N, K) weights blocked along K (QArrays
  or `PreparedWeight`s), to the Mosaic GPU kernel (any M)."""
  from pallas_kernels import dequant_gemv_mosaic
  from pallas_kernels.dequant_matmul import supports
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    return "pallas", "batch dimensions in dot_general"
  if rhs.ndim != 2 or tuple(rc) != (rhs.axis,) or tuple(lc) != (lhs.ndim - 1,):
    return "pallas", "the kernels take lhs (..., K) @ rhs (K, N) or K-major rhs (N, K), rhs blocked along K"
  if jnp.dtype(lhs.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "pallas", f"the kernels take bfloat16/float16 activations, got {jnp.dtype(lhs.dtype)}"
  if rhs.axis == 0:
    return "pallas", supports(rhs.format)
  if jnp.dtype(lhs.dtype) != jnp.dtype(jnp.bfloat16):
    return "mosaic", "the Mosaic kernel takes bfloat16 activations"
  return "mosaic", dequant_gemv_mosaic.supports(rhs.format, *rhs.shape)


def _warn_once(reason: str) -> None:
  if reason not in _warned:
    _warned.add(reason)
    warnings.warn(f"lowbit_jax: quantized matmul runs on the XLA reference on this GPU: {reason}.",
                  stacklevel=4)


def mx_mma_pair(lhs: QArray, rhs: QArray, dimension_numbers) -> bool:
  """Whether the MX 8-bit pairs' FP8 / int8 MMA kernel (`scaled_matmul_mosaic.mx_matmul`) takes these operands:
  lhs (..., K) times K-major (N, K) weights, formats as `mx_supports` takes them."""
  from lowbit_jax.xla import matrix_pair
  from pallas_kernels.scaled_matmul_mosaic import mx_supports
  (_, rc), _ = dimension_numbers
  return (matrix_pair(lhs, rhs, dimension_numbers) and tuple(rc) == (1,)
          and mx_supports(lhs.format, rhs.format, lhs.data.shape[-1], rhs.shape[0]) is None)


def pair_kernel(lhs: QArray, rhs: QArray, dimension_numbers, m: int, forced: str | None = None) -> tuple[
    str | None, str | None]:
  """(the backend of the kernel for these two quantized operands and M rows, None if none takes them; why not).
  `forced`: the backend the caller asked for, taken where it is one of several kernels for the pair, or where the
  pair's kernel runs only when asked for (MX 8-bit pairs: "xla" otherwise, their faster exact route)."""
  from lowbit_jax.xla import int8_pair, matrix_pair
  from pallas_kernels.backend import hopper_available, jax_triton_available
  from pallas_kernels.fp8_block_matmul import supports
  if int8_pair(lhs, rhs, dimension_numbers):
    return "pallas", None
  if mx_mma_pair(lhs, rhs, dimension_numbers):
    # MX 8-bit pairs' FP8 / int8 MMA kernel (per-32 promotion) ran at 0.48-0.61x XLA bf16 at M = 2048 and 8192,
    # the exact bfloat16 route at 0.87-0.97x in the same runs (BENCHMARKS.md): `auto` takes that route ("xla" here)
    return ("xla" if forced in (None, "auto") else "mosaic"), None
  if matrix_pair(lhs, rhs, dimension_numbers) and supports(lhs.format, rhs.format) is None:
    if forced in BLOCK_FP8_KERNELS:
      return forced, None
    mosaic = hopper_available() and (m >= BLOCK_FP8_MOSAIC_FROM_M or not jax_triton_available())
    return ("mosaic" if mosaic else "jax_triton"), None
  return None, ("quantized activations have kernels for int8 per-token x per-channel and block-FP8 "
                "(1x128 x 128x128) pairs, and MXFP8 / MXINT8 pairs of one element type with K-major weights, K and N "
                f"multiples of 128 (got {lhs.format.name} x {rhs.format.name}; XLA dots the dequantized operands)")


def choose(backend: str | None, lhs, rhs, dimension_numbers, m: int) -> str:
  """Returns "pallas", "mosaic", "jax_triton", "interpret" or "xla" for this call."""
  from pallas_kernels.backend import on_gpu
  backend = backend or "auto"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  if backend == "xla":
    return "xla"
  kernel = "pallas"
  if isinstance(lhs, QArray) and isinstance(rhs, QArray):
    kernel, reason = pair_kernel(lhs, rhs, dimension_numbers, m, forced=backend)
  elif isinstance(lhs, QArray):
    reason = "a quantized lhs needs a quantized rhs"
  else:
    kernel, reason = weight_only_kernel(lhs, rhs, dimension_numbers, m)
  if backend != "auto":
    if reason:
      raise ValueError(f"backend={backend!r} cannot run this call: {reason}.")
    if backend == "interpret":
      return backend
    if backend != kernel:
      raise ValueError(f"backend={backend!r} cannot run this call: its kernel is a {kernel!r} kernel.")
    if not on_gpu(lhs):
      raise ValueError(f"backend={backend!r} needs an NVIDIA GPU; use backend='interpret' to run the kernel's "
                       "math on this device.")
    missing = _missing(kernel)
    if missing:
      raise ValueError(f"backend={backend!r} cannot run here: {missing}.")
    return backend
  if not on_gpu(lhs):
    return "xla"
  if reason:
    if not isinstance(lhs, QArray) and m >= xla_from_m(rhs.format, k_major=rhs.axis == 1):
      return "xla"  # dequantize-then-dot is the weight-only path from here on anyway: nothing to warn about
    _warn_once(reason)
    return "xla"
  missing = _missing(kernel)
  if missing:
    _warn_once(missing)
    return "xla"
  if isinstance(lhs, QArray):  # pairs: block FP8 always runs its kernel; int8 from INT8_KERNEL_FROM_M rows
    return kernel if kernel != "pallas" or m >= INT8_KERNEL_FROM_M else "xla"
  if kernel == "mosaic":
    return "xla" if m >= xla_from_m(rhs.format, k_major=True) else kernel
  return "xla" if m >= xla_from_m(rhs.format) else "pallas"


def _missing(kernel: str) -> str | None:
  """What this machine lacks for `kernel` (a GPU is given), or None."""
  from pallas_kernels.backend import hopper_available, jax_triton_available
  if kernel == "jax_triton" and not jax_triton_available():
    return "block-FP8 pairs need the Triton kernel, launched by jax_triton: pip install 'lowbit-jax[triton]'"
  if kernel == "mosaic" and not hopper_available():
    return "Mosaic GPU kernels issue wgmma, a Hopper instruction; this GPU runs the XLA path"
  return None


def xla_from_m(fmt, k_major: bool = False) -> float:
  """Activation rows from which a weight-only matmul with weights in `fmt`, (K, N) or K-major (N, K), runs
  dequantize-then-dot on a GPU (inf: never), and from which a quantized pair dequantizes both operands instead of
  streaming its weight through the weight-only path."""
  from pallas_kernels.quantize import supports_cols
  if k_major:
    el = fmt.element_type
    return math.inf if el.kind == "int" and el.bits == 4 else KMAJOR_XLA_FROM_M
  return XLA_FROM_M if supports_cols(fmt) is None else XLA_FROM_M_SLOW_DEQUANT
