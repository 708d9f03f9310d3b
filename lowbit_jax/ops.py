"""Matmuls with quantized operands: `dot_general` (a drop-in for `lax.dot_general`), `matmul` and `einsum`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax import dispatch, xla
from lowbit_jax.qarray import QArray

__all__ = ["dot_general", "matmul", "einsum"]


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
    if isinstance(op, QArray):
      if op.format.block is not None and op.axis not in dims:
        raise ValueError(f"dot_general: {name} is a QArray blocked along axis {op.axis}, which is not a "
                         f"contracting dimension {tuple(dims)}; quantize it along its contraction axis.")
    elif not jnp.issubdtype(op.dtype, jnp.floating):
      raise TypeError(f"dot_general: {name} must be a floating array or a QArray, got dtype {op.dtype}.")


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None,
                *, backend: str | None = None) -> jax.Array:
  """`lax.dot_general` where either operand may be a QArray blocked along a contracting dimension.

  With a float `lhs` (bf16/f16/f32, any leading dimensions) and a quantized weight `rhs` of shape (K, N), this is
  a weight-only matmul: on an NVIDIA GPU a Pallas kernel decodes the packed weights in registers; elsewhere the
  weights are dequantized and XLA's dot runs. The result has `lhs`'s dtype unless `preferred_element_type` says
  otherwise. Its signature matches `lax.dot_general`, so it can be handed to `flax.nnx.Linear(dot_general=...)`.

  Args:
    backend: "auto" (default, see `lowbit_jax.dispatch`), "pallas", "xla" or "interpret".

  Example:
    >>> import jax, jax.numpy as jnp, lowbit_jax as lb
    >>> x = jnp.ones((2, 64), jnp.bfloat16)
    >>> w = lb.quantize(jnp.ones((64, 8)), "mxfp4", axis=0)
    >>> lb.dot_general(x, w, (((1,), (0,)), ((), ()))).shape
    (2, 8)
  """
  if not isinstance(lhs, QArray):
    lhs = jnp.asarray(lhs)
  if not isinstance(rhs, QArray):
    rhs = jnp.asarray(rhs)
  _check(lhs, rhs, dimension_numbers)
  if not isinstance(lhs, QArray) and not isinstance(rhs, QArray):
    return xla.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding)
  m = math.prod(lhs.shape[:-1]) if not isinstance(lhs, QArray) else 0
  impl = dispatch.choose(backend, lhs, rhs, dimension_numbers, m)
  if impl == "xla":
    return xla.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding)
  from pallas_kernels.dequant_matmul import dequant_matmul
  out_dtype = preferred_element_type or lhs.dtype
  x2 = lhs.reshape(m, lhs.shape[-1])
  y = dequant_matmul(x2, rhs, out_dtype=out_dtype, backend="triton" if impl == "pallas" else "interpret")
  return y.reshape(lhs.shape[:-1] + (rhs.shape[1],))


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
