"""Chooses an implementation for each quantized matmul call.

`auto` (the default): on an NVIDIA GPU, the Pallas kernel when it takes the format, dtypes and layout (and the
number of rows M is in the range where it wins), else the XLA reference, with a one-time warning that names the
reason when no kernel takes the call; elsewhere the XLA reference (no warning: that is the
implementation for CPU and TPU). `pallas`, `xla` and `interpret` force one.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp

from lowbit_jax.qarray import QArray

__all__ = ["BACKENDS", "choose", "weight_only_reason"]

BACKENDS = ("auto", "pallas", "xla", "interpret")
_warned: set[str] = set()

# Above this many activation rows XLA's dequantize-then-dot (weights materialised once in bf16, then cuBLAS) beats
# a fused kernel on Hopper: measured in BENCHMARKS.md (weight-only matmul).
XLA_FROM_M = 512
# From this many rows on, the Pallas int8 kernel (scales in its epilogue) beats XLA's int8 GEMM plus a separate
# scaling pass; below it XLA's is faster (BENCHMARKS.md, A8W8: kernel at M = 2048 and 8192, XLA at M = 16).
INT8_KERNEL_FROM_M = 512


def weight_only_reason(lhs, rhs: QArray, dimension_numbers) -> str | None:
  """None if the weight-only kernel takes this call, else why not."""
  from pallas_kernels.dequant_matmul import supports
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    return "batch dimensions in dot_general"
  if rhs.ndim != 2 or tuple(rc) != (0,) or tuple(lc) != (lhs.ndim - 1,):
    return "the kernel takes lhs (..., K) @ rhs (K, N) with rhs blocked along K"
  if jnp.dtype(lhs.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"the kernel takes bfloat16/float16 activations, got {jnp.dtype(lhs.dtype)}"
  return supports(rhs.format)


def _warn_once(reason: str) -> None:
  if reason not in _warned:
    _warned.add(reason)
    warnings.warn(f"lowbit_jax: quantized matmul runs on the XLA reference on this GPU: {reason}.",
                  stacklevel=4)


def choose(backend: str | None, lhs, rhs, dimension_numbers, m: int) -> str:
  """Returns "pallas", "interpret" or "xla" for this call."""
  from pallas_kernels.backend import on_gpu
  backend = backend or "auto"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  if backend == "xla":
    return "xla"
  if isinstance(lhs, QArray) and isinstance(rhs, QArray):
    from lowbit_jax.xla import int8_pair
    reason = None if int8_pair(lhs, rhs, dimension_numbers) else (
        "quantized activations have a Pallas kernel for int8 per-token x per-channel pairs only "
        f"(got {lhs.format.name} x {rhs.format.name}; XLA dots the dequantized operands)")
  elif isinstance(lhs, QArray):
    reason = "a quantized lhs needs a quantized rhs"
  else:
    reason = weight_only_reason(lhs, rhs, dimension_numbers)
  if backend in ("pallas", "interpret"):
    if reason:
      raise ValueError(f"backend={backend!r} cannot run this call: {reason}.")
    if backend == "pallas" and not on_gpu(lhs):
      raise ValueError("backend='pallas' needs an NVIDIA GPU; use backend='interpret' to run the kernel on "
                       "this device through Pallas's interpreter.")
    return backend
  if not on_gpu(lhs):
    return "xla"
  if reason:
    _warn_once(reason)
    return "xla"
  if isinstance(lhs, QArray):
    return "pallas" if m >= INT8_KERNEL_FROM_M else "xla"
  return "xla" if m >= XLA_FROM_M else "pallas"
