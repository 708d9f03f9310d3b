"""flax.linen integration: `QDotGeneral`, a `dot_general_cls` for `nn.Dense` and `nn.DenseGeneral`; `QEinsum`, an
`nn.Einsum` with a quantized kernel (nn.Einsum takes no dot_general_cls); and `quantize_params`, which turns a
trained param tree into quantized variables.

Quantized kernels live in their own collection, `"quantized"`, beside the layer that uses them. A layer finds its
kernel there when the collection is passed to `apply`; otherwise it quantizes the float kernel from `params` on
the fly (or, with `qat=True`, fake-quantizes it with a straight-through gradient for training). `quantize_params`
runs the model once to fill the collection and replaces the float kernels in `params` by `KernelPlaceholder`s
(no data), so the served variables hold only packed weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lowbit_jax.fake_quant import fake_quant
from lowbit_jax.flax.nnx import _einsum_labels, _format
from lowbit_jax.formats import Format
from lowbit_jax.ops import dot_general, einsum
from lowbit_jax.prepared import prepare, unpreparable
from lowbit_jax.qarray import QArray
from lowbit_jax.quantize import quantize

__all__ = ["COLLECTION", "KernelPlaceholder", "QDotGeneral", "QEinsum", "prepare_variables", "quantize_params"]

COLLECTION = "quantized"


@jax.tree_util.register_pytree_node_class
class KernelPlaceholder:
  """Stands in `params` for a float kernel whose quantized copy is in the "quantized" collection.

  A pytree with no leaves (nothing is stored or checkpointed), so linen's shape check of an existing parameter
  passes; it converts to a 0-d array of the kernel's dtype (`__jax_array__`), so a layer's dtype promotion sees
  the same dtypes as with the float kernel.
  """

  def __init__(self, shape: tuple[int, ...], dtype: Any):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def tree_flatten(self):
    return (), (self.shape, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*aux)

  def __jax_array__(self):
    return jnp.zeros((), self.dtype)

  def __repr__(self) -> str:
    return f"KernelPlaceholder(shape={self.shape}, dtype={self.dtype.name})"


def _weight(module: nn.Module, kernel, axis: int, weight_format, qat: bool, k_major: bool = False):
  """The kernel the matmul uses: fake-quantized (QAT), the stored QArray, or `kernel` quantized now (stored when
  the collection is mutable outside of init); `k_major` quantizes a 2-D kernel's transpose, along axis 1."""
  if qat:
    fmt = _format(weight_format, kernel.shape[axis], f"{module.path}: weight_format")
    return fake_quant(kernel, fmt, axis=axis)
  if module.has_variable(COLLECTION, "kernel"):
    return module.get_variable(COLLECTION, "kernel")
  if kernel is None or isinstance(kernel, KernelPlaceholder) or jnp.ndim(kernel) == 0:
    raise ValueError(f"{'/'.join(module.path)}: no quantized kernel in the {COLLECTION!r} collection and no float "
                     "kernel in 'params'; apply with the variables returned by quantize_params.")
  if k_major and kernel.ndim != 2:
    raise ValueError(f"{'/'.join(module.path)}: k_major takes a 2-D kernel, got shape {tuple(kernel.shape)}.")
  fmt = _format(weight_format, kernel.shape[axis], f"{'/'.join(module.path)}: weight_format")
  q = quantize(kernel.T, fmt, axis=1) if k_major else quantize(kernel, fmt, axis=axis)
  if module.is_mutable_collection(COLLECTION) and not module.is_initializing():
    module.put_variable(COLLECTION, "kernel", q)
  return q


def _activation(module: nn.Module, x, axis: int, activation_format):
  if activation_format is None:
    return x
  fmt = _format(activation_format, x.shape[axis], f"{'/'.join(module.path)}: activation_format")
  return fake_quant(x, fmt, axis=axis)


class QDotGeneral(nn.Module):
  """A `dot_general_cls` for `nn.Dense` / `nn.DenseGeneral`: a `lowbit_jax.dot_general` with the kernel (rhs)
  quantized along its last contracting axis, held in the "quantized" collection.

  Attributes:
    weight_format: the kernel's format (1-D blocks dividing the contraction length, or per-channel).
    activation_format: if set, the input is quantized and dequantized along its matching contracting axis
      first (numerical emulation).
    qat: fake-quantize the float kernel with a straight-through gradient instead (training).
    k_major: hold a 2-D kernel (in, out) transposed, (out, in) quantized along axis 1: the layout of the Mosaic
      GPU decode kernel (Hopper, int4 / int8 / MXFP4 / MXFP6 / MXFP8 / NVFP4 weights, at most 256 rows per call);
      the same values either way.
    backend: the `lowbit_jax.dot_general` backend (default: automatic).

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn
    >>> from lowbit_jax.flax.linen import QDotGeneral, quantize_params
    >>> dense = nn.Dense(16, dot_general_cls=functools.partial(QDotGeneral, weight_format="mxfp4"))
    >>> x = jnp.ones((2, 64))
    >>> variables = quantize_params(dense, dense.init(jax.random.key(0), x), x)
    >>> variables["quantized"]["QDotGeneral_0"]["kernel"], variables["params"]["kernel"]
    (QArray(mxfp4, shape=(64, 16), axis=0, dtype=float32), KernelPlaceholder(shape=(64, 16), dtype=float32))
    >>> dense.apply(variables, x).shape
    (2, 16)
  """

  weight_format: str | Format
  activation_format: str | Format | None = None
  qat: bool = False
  k_major: bool = False
  backend: str | None = None

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None) -> jax.Array:
    (lc, rc), batch = dimension_numbers
    if not rc:
      raise ValueError(f"{'/'.join(self.path)}: QDotGeneral needs a contracting dimension, got "
                       f"{dimension_numbers}.")
    axis = max(rc)
    k_major = self.k_major and not self.qat
    if k_major and (len(rc) != 1 or batch[1]):
      raise ValueError(f"{'/'.join(self.path)}: k_major takes a 2-D kernel with one contracting dimension and "
                       f"no batch dimensions, got {dimension_numbers}.")
    w = _weight(self, rhs, axis, self.weight_format, self.qat, k_major)
    lhs = _activation(self, lhs, lc[list(rc).index(axis)], self.activation_format)
    if k_major:  # the (out, in) QArray is contracted on its blocked axis
      dimension_numbers = ((lc, (w.axis,)), batch)
    return dot_general(lhs, w, dimension_numbers, precision=precision,
                       preferred_element_type=preferred_element_type, backend=self.backend)


class QEinsum(nn.Einsum):
  """`nn.Einsum` with a quantized kernel, quantized along its last contracted axis and held in the "quantized"
  collection (as with `QDotGeneral`). Same attributes as nn.Einsum plus `weight_format` (required),
  `activation_format`, `qat` and `backend`; `einsum_str` has no ellipsis.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lowbit_jax.flax.linen import QEinsum
    >>> layer = QEinsum((64, 4, 8), "btd,dnh->btnh", weight_format="int8_channel_sym")
    >>> x = jnp.ones((2, 3, 64))
    >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
    (2, 3, 4, 8)
  """

  weight_format: str | Format | None = None
  activation_format: str | Format | None = None
  qat: bool = False
  backend: str | None = None

  @nn.compact
  def __call__(self, inputs, einsum_str: str | None = None) -> jax.Array:
    if self.weight_format is None:
      raise ValueError(f"{'/'.join(self.path)}: QEinsum needs a weight_format.")
    einsum_str = nn.module.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
    sa, sb, out = _einsum_labels(einsum_str, len(self.shape), "QEinsum")
    contracted = [i for i, c in enumerate(sb) if c in sa and c not in out]
    if not contracted:
      raise ValueError(f"QEinsum: einsum_str {einsum_str!r} contracts no kernel axis.")
    axis = contracted[-1]
    kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias_shape = tuple(self.shape[sb.index(c)] for c in out if c in sb)
      bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    w = _weight(self, kernel, axis, self.weight_format, self.qat)
    x = _activation(self, inputs, sa.index(sb[axis]), self.activation_format)
    y = einsum(einsum_str, x, w, backend=self.backend, preferred_element_type=self.preferred_element_type)
    if bias is not None:
      y = y + bias.reshape(tuple(self.shape[sb.index(c)] if c in sb else 1 for c in out))
    return y


def quantize_params(model: nn.Module, variables: dict, *args, method: Any = None, **kwargs) -> dict:
  """Quantized variables for `model` (whose layers use `QDotGeneral` / `QEinsum`) from trained ones.

  Runs `model.apply(variables, *args, **kwargs)` once (any inputs of the right shapes: a batch of one is
  enough) with the "quantized" collection mutable, so each quantized layer stores its kernel there; then
  replaces the float kernels it quantized in `params` by `KernelPlaceholder`s. The result holds every
  collection of `variables` plus "quantized", and applies without re-quantizing. Params trained with plain
  `nn.Dense` / `nn.Einsum` load unchanged into a model that uses these classes (they add no params).

  Example: see `QDotGeneral`.
  """
  _, new = model.apply(variables, *args, method=method, mutable=[COLLECTION], **kwargs)
  quantized = new[COLLECTION]
  is_leaf = lambda path, x: isinstance(x, QArray)
  flat_q = traverse_util.flatten_dict(quantized, is_leaf=is_leaf)
  flat_p = traverse_util.flatten_dict(variables["params"], is_leaf=is_leaf)
  for path, q in flat_q.items():
    # QEinsum stores beside its own kernel; a QDotGeneral inside its Dense, one level below the kernel.
    for cand in (path, path[:-2] + path[-1:]):
      p = flat_p.get(cand)
      if (hasattr(p, "dtype") and not isinstance(p, (QArray, KernelPlaceholder))
          and q.shape in (tuple(p.shape), tuple(p.shape)[::-1])):  # (reversed: a K-major kernel)
        flat_p[cand] = KernelPlaceholder(p.shape, p.dtype)
        break
  return {**variables, "params": traverse_util.unflatten_dict(flat_p), COLLECTION: quantized}


def prepare_variables(variables: dict) -> dict:
  """`variables` with the K-major kernels of the "quantized" collection (`QDotGeneral(k_major=True)`) that the
  Mosaic GPU decode kernel takes stored as `lowbit_jax.PreparedWeight`s (codes re-ordered once for it; the same
  values). Checkpoints store them as canonical QArrays (`lowbit_jax.checkpoint`).

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn
    >>> from lowbit_jax.flax.linen import QDotGeneral, prepare_variables, quantize_params
    >>> dense = nn.Dense(64, dot_general_cls=functools.partial(QDotGeneral, weight_format="mxfp4", k_major=True))
    >>> x = jnp.ones((1, 128))
    >>> variables = prepare_variables(quantize_params(dense, dense.init(jax.random.key(0), x), x))
    >>> variables["quantized"]["QDotGeneral_0"]["kernel"]
    PreparedWeight(mxfp4, shape=(64, 128), dtype=float32)
  """
  quantized = jax.tree_util.tree_map(lambda q: prepare(q) if unpreparable(q) is None else q, variables[COLLECTION],
                                     is_leaf=lambda x: isinstance(x, QArray))
  return {**variables, COLLECTION: quantized}
