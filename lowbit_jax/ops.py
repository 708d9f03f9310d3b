"""Matmuls with quantized operands: `dot_general` (a drop-in for `lax.dot_general`), `matmul` and `einsum`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax import dispatch, xla
from lowbit_jax.formats import Format, get_format
from lowbit_jax.prepared import PreparedWeight
from lowbit_jax.qarray import QArray
from lowbit_jax.quantize import dequantize, quantize

__all__ = ["dot_general", "matmul", "matmul_summands", "matmul_swiglu", "einsum"]


def _check(lhs, rhs, dimension_numbers):
  (lc, rc), (lb, rb) = dimension_numbers
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dot_general: dimension_numbers {dimension_numbers} pair unequal numbers of dimensions.")
  for name, op, dims in (("lhs", lhs, list(lc) + list(lb)), ("rhs", rhs, list(rc) + list(rb))):
    for d in dims:
      if not 0 <= d < op.ndim:
        raise ValueError(f"dot_general: {name} dimension {d} is out of range for rank {op.ndim}.")
  for a, b in zip(list(lc) + list(lb), list(rc) + list(rb)):
    if lhs.shape[a] != rhs.shape[b]:
      raise ValueError(f"dot_general: lhs dimension {a} has size {lhs.shape[a]} but rhs dimension {b} has "
                       f"size {rhs.shape[b]}; contracting and batch sizes must agree.")
  for name, op, dims in (("lhs", lhs, lc), ("rhs", rhs, rc)):
    if isinstance(op, (QArray, PreparedWeight)):
      if op.format.block is not None and not set(op.blocked_axes) & set(dims):
        raise ValueError(f"dot_general: {name} is a QArray blocked along axis {op.axis}, which is not a "
                         f"contracting dimension {tuple(dims)}; quantize it along its contraction axis.")
    elif not jnp.issubdtype(op.dtype, jnp.floating):
      raise TypeError(f"dot_general: {name} must be a floating array or a QArray, got dtype {op.dtype}.")


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None,
                *, backend: str | None = None, act_format: str | Format | None = None,
                grad_format: str | Format | None = None) -> jax.Array:
  """`lax.dot_general` where either operand may be a QArray blocked along a contracting dimension.

  With a float `lhs` (bf16/f16/f32, any leading dimensions) and a quantized weight `rhs` of shape (K, N), or
  K-major (N, K) contracted on its axis 1 (a QArray, or a `PreparedWeight` from `lowbit_jax.prepare`), this is a
  weight-only matmul: on an NVIDIA GPU a Pallas kernel decodes the packed weights in registers; elsewhere the
  weights are dequantized and XLA's dot runs. With both operands
  quantized it is the OCP dot of the two (exact products, float32 accumulation; `lowbit_jax.xla`). The result has
  `lhs`'s (logical) dtype unless `preferred_element_type` says otherwise. Its signature matches
  `lax.dot_general`, so it can be handed to `flax.nnx.Linear(dot_general=...)`.

  Args:
    backend: "auto" (default, see `lowbit_jax.dispatch`), "pallas", "mosaic", "jax_triton", "xla" or "interpret".
    act_format: quantize a float `lhs` to this format along its contracting dimension inside the call (dynamic
      scaling: A8W8, A8W4, A4W4 with a quantized `rhs`). The gradient with respect to `lhs` is straight-through:
      the cotangent times the dequantized `rhs`, in `lhs`'s dtype.
    grad_format: with `act_format`, also quantize the output cotangent to this format (blocks along its last
      axis) before the backward products, e.g. "mxfp8_e5m2"; default: the backward pass stays in full precision.

  Example:
    >>> import jax, jax.numpy as jnp, lowbit_jax as lb
    >>> x = jnp.ones((2, 64), jnp.bfloat16)
    >>> w = lb.quantize(jnp.ones((64, 8)), "mxfp4", axis=0)
    >>> lb.dot_general(x, w, (((1,), (0,)), ((), ()))).shape
    (2, 8)
  """
  if not isinstance(lhs, QArray):
    lhs = jnp.asarray(lhs)
  if not isinstance(rhs, (QArray, PreparedWeight)):
    rhs = jnp.asarray(rhs)
  _check(lhs, rhs, dimension_numbers)
  if act_format is not None:
    if isinstance(lhs, QArray):
      raise ValueError("dot_general: act_format quantizes a float lhs, but lhs is already a QArray.")
    (lc, _), _ = dimension_numbers
    if len(lc) != 1:
      raise ValueError(f"dot_general: act_format needs one contracting dimension of lhs, got {tuple(lc)}.")
    grad = None if grad_format is None else get_format(grad_format)
    return _act_quant_dot(lhs, rhs, _dims(dimension_numbers), get_format(act_format), grad, precision,
                          preferred_element_type, backend)
  if grad_format is not None:
    raise ValueError("dot_general: grad_format applies with act_format (the quantized-forward custom VJP).")
  if not isinstance(lhs, QArray) and not isinstance(rhs, (QArray, PreparedWeight)):
    return xla.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding)
  m = math.prod(lhs.shape[:-1])
  if (isinstance(lhs, QArray) and isinstance(rhs, (QArray, PreparedWeight)) and xla.blocks_exact_in_bf16(lhs)
      and xla.blocks_exact_in_bf16(rhs) and m < dispatch.xla_from_m(rhs.format, k_major=rhs.axis == 1)
      and backend in (None, "auto")):
    # MX / NVFP4 activations, below the rows from which the pair's weight is dequantized (few rows; K-major
    # weights, which the Mosaic kernel takes, up to thousands): dequantize their block values (exact in
    # bfloat16) and stream the weights (prepared ones as they are) through the weight-only path instead of
    # materialising the whole dequantized weight; NVFP4 tensor scales multiply the float32 result. Same OCP dot:
    # exact products, float32 accumulation. Without tensor scales the product is written in the output dtype
    # directly (rounded once from float32, as the cast would): a float32 (M, N) and a cast pass cost 11% at M = 2048
    # (MXFP8 x MXFP4 on 8192^2: 422 against 377 us).
    (qa, ga), (qw, gw) = xla.split_tensor_scale(lhs), xla.split_tensor_scale(rhs)
    out = preferred_element_type or lhs.dtype
    y = _dot(dequantize(qa, jnp.bfloat16), qw, dimension_numbers, precision,
             jnp.float32 if ga is not None or gw is not None else out, out_sharding, backend)
    return xla.times_tensor_scales(y, ga, gw).astype(out)
  if isinstance(lhs, QArray) and isinstance(rhs, PreparedWeight):
    rhs = rhs.canonical()  # (the other quantized-pair paths take QArrays)
  return _dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding, backend)


def _dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding, backend) -> jax.Array:
  """`dot_general` with one or two quantized operands, on the path `dispatch.choose` picks."""
  m = math.prod(lhs.shape[:-1])
  impl = dispatch.choose(backend, lhs, rhs, dimension_numbers, m)
  if impl == "xla":
    return xla.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding)
  out_dtype = preferred_element_type or lhs.dtype
  if isinstance(lhs, QArray):
    return _pair_kernel(lhs, rhs, dimension_numbers, impl, out_dtype)
  if rhs.axis == 1:  # K-major (N, K) weights, canonical or prepared: the Mosaic GPU kernel
    return _mosaic_weight_only(lhs, rhs, impl, out_dtype)
  from pallas_kernels.dequant_matmul import dequant_matmul
  y = dequant_matmul(lhs.reshape(m, lhs.shape[-1]), rhs, out_dtype=out_dtype,
                     backend="triton" if impl == "pallas" else "interpret")
  return y.reshape(lhs.shape[:-1] + (rhs.shape[1],))


def _mosaic_weight_only(x, w: QArray | PreparedWeight, impl: str, out_dtype=None, partials: bool = False,
                        swiglu: bool = False) -> jax.Array:
  """x (..., K) @ w.T on the Mosaic GPU kernel (`impl` "mosaic", or "interpret" for its interpreter): (..., N), or
  with `partials` the kernel's summands (S, ..., N), or with `swiglu` silu(gate) * up (..., N / 2)."""
  from pallas_kernels.dequant_gemv_mosaic import dequant_gemv
  y = dequant_gemv(x.reshape(-1, x.shape[-1]), w, out_dtype=out_dtype, partials=partials, swiglu=swiglu,
                   backend="mosaic" if impl == "mosaic" else "mosaic_interpret")
  return y.reshape(y.shape[:-2] + x.shape[:-1] + y.shape[-1:])


def _pair_kernel(lhs: QArray, rhs: QArray, dimension_numbers, impl: str, out_dtype) -> jax.Array:
  """Both operands quantized, in a pair `dispatch.pair_kernel` gives a kernel: int8 x int8 (Pallas), block FP8
  (Mosaic GPU or jax_triton) or MX 8-bit (Mosaic GPU); `impl` is the chosen backend or "interpret"."""
  (_, rc), _ = dimension_numbers
  k_major = tuple(rc) == (1,)
  a, sa = lhs.data.reshape(-1, lhs.data.shape[-1]), lhs.scale.reshape(-1, lhs.scale.shape[-1])
  n = rhs.shape[0 if k_major else 1]
  if xla.int8_pair(lhs, rhs, dimension_numbers):
    from pallas_kernels.int8_matmul import int8_matmul
    w = rhs.data if k_major else rhs.data.T  # the kernel reads K-major weights; (K, N) pays a transpose
    y = int8_matmul(a, sa, w, rhs.scale.reshape(-1, 1), out_dtype=out_dtype,
                    backend="triton" if impl == "pallas" else "interpret")
  elif lhs.format.rule == "mx":
    from pallas_kernels.scaled_matmul_mosaic import mx_matmul
    y = mx_matmul(a, sa, rhs.data, rhs.scale, out_dtype=out_dtype,
                  backend="mosaic" if impl == "mosaic" else "mosaic_interpret")
  else:
    from pallas_kernels.fp8_block_matmul import fp8_block_matmul
    y = fp8_block_matmul(a, sa, rhs.data, rhs.scale, n=n, k_major=k_major, out_dtype=out_dtype, backend=impl)
  return y.reshape(lhs.shape[:-1] + (n,))


def _dims(dimension_numbers):
  """dimension_numbers as nested tuples (hashable, for a custom_vjp's static arguments)."""
  (lc, rc), (lb, rb) = dimension_numbers
  return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


def _act_quant_dot_fwd(x, rhs, dims, act, grad, precision, preferred_element_type, backend):
  q = quantize(x, act, axis=dims[0][0][0])
  return dot_general(q, rhs, dims, precision, preferred_element_type, backend=backend), (x, q, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _act_quant_dot(x, rhs, dims, act: Format, grad: Format | None, precision, preferred_element_type, backend):
  return _act_quant_dot_fwd(x, rhs, dims, act, grad, precision, preferred_element_type, backend)[0]


def _zero_cotangent(a):
  return np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact) else jnp.zeros_like(a)


def _act_quant_dot_bwd(dims, act, grad, precision, preferred_element_type, backend, res, g):
  """Straight-through: the products of the float dot, with the quantized operands dequantized."""
  x, q, rhs = res
  if grad is not None:
    g = dequantize(quantize(g, grad, axis=-1), g.dtype)
  quantized = isinstance(rhs, (QArray, PreparedWeight))
  w = dequantize(rhs, x.dtype) if quantized else rhs
  _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims, precision=precision), dequantize(q, x.dtype), w)
  dx, dw = vjp(g.astype(x.dtype))
  drhs = jax.tree.map(_zero_cotangent, rhs) if quantized else dw.astype(rhs.dtype)
  return dx, drhs


_act_quant_dot.defvjp(_act_quant_dot_fwd, _act_quant_dot_bwd)


def matmul(x, w, *, backend: str | None = None, preferred_element_type=None) -> jax.Array:
  """x (..., K) @ w (K, N), w a QArray blocked along K (axis 0) or a plain array.

  >>> import jax.numpy as jnp, lowbit_jax as lb
  >>> w = lb.quantize(jnp.eye(32), "mxfp8_e4m3", axis=0)
  >>> lb.matmul(jnp.ones((1, 32), jnp.bfloat16), w)[0, :3]
  Array([1, 1, 1], dtype=bfloat16)
  """
  xnd = len(x.shape)
  return dot_general(x, w, (((xnd - 1,), (0,)), ((), ())), backend=backend,
                     preferred_element_type=preferred_element_type)


def _weight_operands(name: str, x, w) -> tuple[jax.Array, tuple, int]:
  """(x as an array, the dimension numbers of x (..., K) times w, the rows M) for `name`(x, w), w a 2-D quantized
  weight blocked along K; bad operands raise naming `name`."""
  if not isinstance(w, (QArray, PreparedWeight)) or w.ndim != 2:
    raise TypeError(f"{name}: w must be a 2-D QArray or PreparedWeight, got {type(w).__name__}.")
  x = jnp.asarray(x)
  dims = (((x.ndim - 1,), (w.axis,)), ((), ()))
  _check(x, w, dims)
  return x, dims, math.prod(x.shape[:-1])


def matmul_summands(x, w: QArray | PreparedWeight, *, backend: str | None = None) -> jax.Array:
  """x (..., K) times a quantized weight w, (K, N) or K-major (N, K), blocked along K, as float32 summands
  (S, ..., N) whose sum over axis 0 is the product `dot_general` returns before its rounding to x's dtype.

  Where the Mosaic GPU kernel splits K (K-major weights at few rows) the summands are its float32 split-K partial
  sums; elsewhere the product itself (S = 1). For a consumer that adds them inside its own kernel
  (`pallas_kernels.rms_norm.add_rms_norm`, `pallas_kernels.decode_attention`), saving the separate pass that sums
  them. Dispatch (`backend`) as in `dot_general`.

  >>> import jax.numpy as jnp, lowbit_jax as lb
  >>> w = lb.quantize(jnp.ones((64, 8)), "mxfp4", axis=0)
  >>> s = lb.matmul_summands(jnp.ones((2, 64), jnp.bfloat16), w)
  >>> s.shape, s.dtype, float(s.sum(0)[0, 0])
  ((1, 2, 8), dtype('float32'), 64.0)
  """
  x, dims, m = _weight_operands("matmul_summands", x, w)
  impl = dispatch.choose(backend, x, w, dims, m)
  if w.axis == 1 and impl in ("mosaic", "interpret"):
    return _mosaic_weight_only(x, w, impl, jnp.float32, partials=True)
  return dot_general(x, w, dims, preferred_element_type=jnp.float32, backend=backend)[None]


def matmul_swiglu(x, w: QArray | PreparedWeight, *, backend: str | None = None) -> jax.Array:
  """silu(gate) * up, (..., F) in x's dtype, where x (..., K) times a quantized weight w, (K, 2F) or K-major (2F, K)
  blocked along K, gives the gate projection in outputs [0, F) and the up projection in [F, 2F) (a SwiGLU MLP's
  two input projections as one weight). Each product is rounded to x's dtype as `dot_general` returns it, then
  `lowbit_jax.xla.swiglu`: float32 arithmetic, one rounding.

  Where the Mosaic GPU kernel runs (K-major weights, up to 64 rows) it computes the SwiGLU in its epilogue, each
  program taking a gate tile and its up tile, which saves the separate pass over the products; elsewhere
  `dot_general`, then the same arithmetic. Dispatch (`backend`) as in `dot_general`.

  >>> import jax.numpy as jnp, lowbit_jax as lb
  >>> w = lb.quantize(jnp.concatenate([jnp.ones((64, 4)), jnp.full((64, 4), 0.5)], axis=1), "mxfp4", axis=0)
  >>> y = lb.matmul_swiglu(jnp.full((1, 64), 0.125, jnp.bfloat16), w)  # gate 8, up 4
  >>> y.shape, float(y[0, 0])
  ((1, 4), 32.0)
  """
  x, dims, m = _weight_operands("matmul_swiglu", x, w)
  n = w.shape[1 - w.axis]
  if n % 2:
    raise ValueError(f"matmul_swiglu: w must have an even number of outputs (gate, then up), got {n}.")
  impl = dispatch.choose(backend, x, w, dims, m)
  if w.axis == 1 and impl in ("mosaic", "interpret"):
    from pallas_kernels.dequant_gemv_mosaic import swiglu_fits
    if swiglu_fits(n, m):
      return _mosaic_weight_only(x, w, impl, swiglu=True)
  y = dot_general(x, w, dims, backend=backend)
  return xla.swiglu(y[..., :n // 2], y[..., n // 2:], x.dtype)


def einsum(spec: str, a, b, *, backend: str | None = None, preferred_element_type=None) -> jax.Array:
  """Two-operand einsum where either operand may be a QArray (e.g. "btd,df->btf").

  Labels in both inputs and the output are batch dimensions, labels in both inputs only are contracted; the
  result is transposed to the output order.

  >>> import jax.numpy as jnp, lowbit_jax as lb
  >>> w = lb.quantize(jnp.ones((64, 4)), "int8_channel_sym", axis=0)
  >>> lb.einsum("btd,df->btf", jnp.ones((2, 3, 64), jnp.bfloat16), w).shape
  (2, 3, 4)
  """
  if "->" not in spec or spec.count(",") != 1 or "." in spec:
    raise ValueError(f"einsum: spec must be explicit with two operands, like 'ab,bc->ac', got {spec!r}.")
  ins, out = spec.replace(" ", "").split("->")
  sa, sb = ins.split(",")
  for name, s, op in (("first", sa, a), ("second", sb, b)):
    if len(s) != len(op.shape) or len(set(s)) != len(s):
      raise ValueError(f"einsum: {name} operand labels {s!r} do not match its rank {len(op.shape)} "
                       "(or repeat a label).")
  if set(out) - set(sa + sb) or len(set(out)) != len(out):
    raise ValueError(f"einsum: output labels {out!r} must be distinct labels of the inputs.")
  batch = [c for c in sa if c in sb and c in out]
  contract = [c for c in sa if c in sb and c not in out]
  if set(sa) - set(sb) - set(out) or set(sb) - set(sa) - set(out):
    raise ValueError(f"einsum: {spec!r} sums over a label of one operand only; not supported.")
  dn = (([sa.index(c) for c in contract], [sb.index(c) for c in contract]),
        ([sa.index(c) for c in batch], [sb.index(c) for c in batch]))
  y = dot_general(a, b, (tuple(map(tuple, dn[0])), tuple(map(tuple, dn[1]))), backend=backend,
                  preferred_element_type=preferred_element_type)
  got = batch + [c for c in sa if c not in sb] + [c for c in sb if c not in sa]
  return lax.transpose(y, [got.index(c) for c in out]) if got != list(out) else y
