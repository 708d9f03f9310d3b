"""Quantized flax.nnx layers, and `quantize_model`, which converts the layers of an existing nnx model in place.

Each layer takes its nnx counterpart's constructor arguments plus `weight_format` (the kernel's format),
`activation_format` (optional) and `qat`:
  - `qat=False` (inference): the kernel is a `QParam` holding a `QArray` quantized along its contraction axis, and
    the layer calls `lowbit_jax.dot_general` (on an NVIDIA GPU, the weight-only Pallas kernel where it applies).
  - `qat=True` (quantization-aware training): the kernel is a float `nnx.Param` and the forward pass uses
    `fake_quant(kernel)`, whose gradient is straight-through; `quantize_model` later turns the layer into an
    inference one.
An `activation_format` quantizes the input along its contraction axis: in `QLinear` and `QLinearGeneral` at
inference, inside the matmul (`dot_general(..., act_format=...)`, so quantized pairs run as such: A8W8 int8 on
the Pallas int8 kernel on a GPU); in QAT, `QEinsum` and `QEmbed.attend`, as a fake quantization (the same values,
straight-through gradients).

Formats must have 1-D blocks (or be per-channel) whose size divides the contraction length.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_embed_init, default_kernel_init

from lowbit_jax.fake_quant import fake_quant
from lowbit_jax.formats import Format, get_format
from lowbit_jax.ops import dot_general, einsum
from lowbit_jax.prepared import PreparedWeight, prepare, unpreparable
from lowbit_jax.qarray import QArray
from lowbit_jax.quantize import dequantize, quantize

__all__ = ["QParam", "QLinear", "QLinearGeneral", "QEinsum", "QEmbed", "quantize_model", "prepare_model",
           "QuantizeReport", "LayerReport", "weight_bytes"]

_EMPTY = MappingProxyType({})


class QParam(nnx.Variable):
  """A parameter holding a `QArray`. nnx.state / split / merge, `nnx.jit` and orbax carry it like any Variable;
  it is not an `nnx.Param`, so gradients and optimizers (`wrt=nnx.Param`) leave the frozen weights alone."""


def _format(fmt: str | Format, length: int, what: str) -> Format:
  """`fmt` resolved, checked to block a contraction axis of `length` (the block must divide it)."""
  fmt = get_format(fmt)
  if fmt.block is not None and len(fmt.block) != 1:
    raise ValueError(f"{what}: format {fmt.name!r} has 2-D blocks {fmt.block}; layers quantize along the "
                     "contraction axis only, so use a 1-D block or per-channel format (e.g. fp8_block_1x128).")
  if fmt.block is not None and length % fmt.block[0]:
    raise ValueError(f"{what}: format {fmt.name!r} has blocks of {fmt.block[0]} along the contraction axis, "
                     f"which do not divide its length {length}; use a format whose block divides {length} or a "
                     "per-channel format (e.g. int8_channel_sym).")
  return fmt


def _formats(weight_format, activation_format, length: int, prefix: str):
  return (_format(weight_format, length, f"{prefix}weight_format"),
          None if activation_format is None else _format(activation_format, length, f"{prefix}activation_format"))


def _kernel(w: jax.Array, fmt: Format, axis: int, qat: bool, metadata, k_major: bool = False) -> nnx.Variable:
  """The kernel variable: `w` as a float Param (QAT), else quantized along `axis`; `k_major` stores a 2-D (in, out)
  kernel transposed, (out, in) quantized along axis 1."""
  if qat:
    return nnx.Param(w, **metadata)
  if k_major:
    return QParam(quantize(w.T, fmt, axis=1), **metadata)
  return QParam(quantize(w, fmt, axis=axis), **metadata)


def _bias(rngs, bias_init, shape, param_dtype, metadata):
  return nnx.Param(bias_init(rngs.params(), shape, param_dtype), **metadata)


def _value_init(value):
  """An initializer returning `value` (used to build a quantized layer from a float one's parameters)."""
  return lambda key, shape, dtype: value


class _QLayer(nnx.Module):
  """Shared forward-pass steps: the (fake-)quantized weight, the activation quantization, dtypes."""

  def _weight(self, axis: int, dtype):
    """The kernel as the matmul sees it: the QArray (dequantized to the input's dtype by the matmul), or in QAT
    mode the fake-quantized float kernel cast to `dtype` (the same values)."""
    k = self.kernel.get_value()
    return fake_quant(k, self.weight_format, axis=axis).astype(dtype) if self.qat else k

  def _promote(self, x, bias):
    """`x` and `bias` in the computation dtype: `dtype`, else promoted from the input, kernel and bias dtypes."""
    dtype = self.dtype
    if dtype is None:
      dtype = jnp.result_type(*(a.dtype for a in (x, self.kernel.get_value(), bias) if a is not None))
    x, bias = self.promote_dtype((x, bias), dtype=dtype)
    return x, bias

  def _activation(self, x, axis: int = -1):
    return x if self.activation_format is None else fake_quant(x, self.activation_format, axis=axis)

  def _matmul(self, x, out_sharding):
    """x (..., in) @ kernel (in, out), or x @ kernel.T for a K-major (out, in) kernel. With an activation format
    (not in QAT) x is quantized inside the call and the quantized pair runs (the int8 kernel for A8W8 on a GPU);
    in QAT the activation is fake-quantized."""
    act = None if self.qat else self.activation_format
    if act is None:
      x = self._activation(x)
    w = self._weight(0, x.dtype)
    k_axis = w.axis if isinstance(w, (QArray, PreparedWeight)) else 0  # a QAT kernel is the float (in, out) one
    return dot_general(x, w, (((x.ndim - 1,), (k_axis,)), ((), ())), precision=self.precision,
                       preferred_element_type=self.preferred_element_type, out_sharding=out_sharding,
                       backend=self.backend, act_format=act)


class QLinear(_QLayer):
  """`nnx.Linear` with a quantized kernel: y = x @ w + b for x (..., in_features) and w (in_features,
  out_features) quantized along axis 0, or with `k_major=True` held as w.T (out_features, in_features) quantized
  along axis 1: contiguous along the contraction, the layout of the Mosaic GPU decode kernel (Hopper, int4 / int8 /
  MXFP4 / NVFP4 weights, at most 256 rows per call). Either way the layer computes the same values.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lowbit_jax.flax import QLinear
    >>> layer = QLinear(64, 16, weight_format="mxfp4", rngs=nnx.Rngs(0))
    >>> layer.kernel.get_value()
    QArray(mxfp4, shape=(64, 16), axis=0, dtype=float32)
    >>> layer(jnp.ones((2, 64))).shape
    (2, 16)
  """

  def __init__(self, in_features: int, out_features: int, *, weight_format: str | Format,
               activation_format: str | Format | None = None, qat: bool = False, k_major: bool = False,
               use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: nnx.Initializer = default_kernel_init, bias_init: nnx.Initializer = default_bias_init,
               promote_dtype: Any = dtypes.promote_dtype, preferred_element_type: Any = None,
               backend: str | None = None, rngs: nnx.Rngs, kernel_metadata: Mapping[str, Any] = _EMPTY,
               bias_metadata: Mapping[str, Any] = _EMPTY):
    self.weight_format, self.activation_format = _formats(weight_format, activation_format, in_features,
                                                          "QLinear ")
    w = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = _kernel(w, self.weight_format, 0, qat, kernel_metadata, k_major)
    self.bias = (_bias(rngs, bias_init, (out_features,), param_dtype, bias_metadata) if use_bias
                 else nnx.data(None))
    self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
    self.qat, self.k_major, self.dtype, self.param_dtype = qat, k_major, dtype, param_dtype
    self.precision = precision
    self.promote_dtype, self.preferred_element_type, self.backend = promote_dtype, preferred_element_type, backend

  @classmethod
  def from_float(cls, layer: nnx.Linear | QLinear, weight_format: str | Format, *,
                 activation_format: str | Format | None = None, qat: bool = False, k_major: bool = False,
                 backend: str | None = None) -> QLinear:
    """A QLinear holding `layer`'s weights (an `nnx.Linear`, or a QLinear in QAT mode)."""
    bias = layer.bias.get_value() if layer.bias is not None else None
    return cls(layer.in_features, layer.out_features, weight_format=weight_format,
               activation_format=activation_format, qat=qat, k_major=k_major, use_bias=bias is not None,
               dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
               kernel_init=_value_init(layer.kernel.get_value()), bias_init=_value_init(bias),
               promote_dtype=layer.promote_dtype, preferred_element_type=layer.preferred_element_type,
               backend=backend, rngs=nnx.Rngs(0))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    x, bias = self._promote(inputs, self.bias.get_value() if self.bias is not None else None)
    y = self._matmul(x, out_sharding)
    return y if bias is None else y + bias


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, Sequence) else (x,)


class QLinearGeneral(_QLayer):
  """`nnx.LinearGeneral` with a quantized kernel, contracting the input axes `axis` with `in_features`.

  The kernel is held flattened as a 2-D (prod(in_features), prod(out_features)) QArray quantized along axis 0
  (blocks run along the flattened contraction axis; per-channel means one scale per output over all of it), so
  the weight-only GPU kernels apply; `k_major=True` holds it transposed, as `QLinear` does. `batch_axis` is not
  supported.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lowbit_jax.flax import QLinearGeneral
    >>> layer = QLinearGeneral(64, (4, 8), weight_format="int4_g32_sym", rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 3, 64))).shape
    (2, 3, 4, 8)
  """

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int], *,
               weight_format: str | Format, activation_format: str | Format | None = None, qat: bool = False,
               k_major: bool = False, axis: int | Sequence[int] = -1, batch_axis: Mapping[int, int] = _EMPTY,
               use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32,
               kernel_init: nnx.Initializer = default_kernel_init, bias_init: nnx.Initializer = default_bias_init,
               precision: Any = None, promote_dtype: Any = dtypes.promote_dtype, preferred_element_type: Any = None,
               backend: str | None = None, rngs: nnx.Rngs, kernel_metadata: Mapping[str, Any] = _EMPTY,
               bias_metadata: Mapping[str, Any] = _EMPTY):
    if batch_axis:
      raise ValueError(f"QLinearGeneral: batch_axis is not supported, got {dict(batch_axis)}.")
    self.in_features, self.out_features, self.axis = _tuple(in_features), _tuple(out_features), _tuple(axis)
    if len(self.in_features) != len(self.axis):
      raise ValueError(f"QLinearGeneral: in_features {self.in_features} and axis {self.axis} must have the same "
                       "length.")
    k, n = math.prod(self.in_features), math.prod(self.out_features)
    self.weight_format, self.activation_format = _formats(weight_format, activation_format, k, "QLinearGeneral ")
    # nnx.LinearGeneral draws its kernel flattened to 2-D too, so the same initializer gives the same weights.
    w = kernel_init(rngs.params(), (k, n), param_dtype)
    self.kernel = _kernel(w, self.weight_format, 0, qat, kernel_metadata, k_major)
    self.bias = (_bias(rngs, lambda key, s, d: bias_init(key, (n,), d).reshape(s), self.out_features,
                       param_dtype, bias_metadata) if use_bias else nnx.data(None))
    self.use_bias, self.qat, self.k_major, self.dtype, self.param_dtype = use_bias, qat, k_major, dtype, param_dtype
    self.precision, self.promote_dtype = precision, promote_dtype
    self.preferred_element_type, self.backend = preferred_element_type, backend

  @classmethod
  def from_float(cls, layer: nnx.LinearGeneral | QLinearGeneral, weight_format: str | Format, *,
                 activation_format: str | Format | None = None, qat: bool = False, k_major: bool = False,
                 backend: str | None = None) -> QLinearGeneral:
    """A QLinearGeneral holding `layer`'s weights (an `nnx.LinearGeneral` without batch axes, or a
    QLinearGeneral in QAT mode)."""
    if getattr(layer, "batch_axis", None):
      raise ValueError(f"QLinearGeneral: batch_axis is not supported, got {dict(layer.batch_axis)}.")
    bias = layer.bias.get_value() if layer.bias is not None else None
    w = layer.kernel.get_value()
    w = w.reshape(math.prod(layer.in_features), -1)
    return cls(layer.in_features, layer.out_features, weight_format=weight_format,
               activation_format=activation_format, qat=qat, k_major=k_major, axis=layer.axis,
               use_bias=bias is not None, dtype=layer.dtype, param_dtype=layer.param_dtype, kernel_init=_value_init(w),
               bias_init=_value_init(bias), precision=layer.precision, promote_dtype=layer.promote_dtype,
               preferred_element_type=layer.preferred_element_type, backend=backend, rngs=nnx.Rngs(0))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    x, bias = self._promote(inputs, self.bias.get_value() if self.bias is not None else None)
    n = len(self.axis)
    axes = [a % x.ndim for a in self.axis]
    x = jnp.moveaxis(x, axes, list(range(x.ndim - n, x.ndim)))
    lead = x.shape[:x.ndim - n]
    y = self._matmul(x.reshape(lead + (math.prod(self.in_features),)), out_sharding)
    y = y.reshape(lead + self.out_features)
    return y if bias is None else y + bias


def _einsum_labels(spec: str, kernel_ndim: int, what: str):
  """(input labels, kernel labels, output labels) of an explicit two-operand einsum."""
  spec = spec.replace(" ", "")
  if "->" not in spec or spec.count(",") != 1 or "." in spec:
    raise ValueError(f"{what}: einsum_str must be explicit with two operands and no ellipsis, like "
                     f"'btd,dnh->btnh', got {spec!r}.")
  ins, out = spec.split("->")
  sa, sb = ins.split(",")
  if len(sb) != kernel_ndim:
    raise ValueError(f"{what}: einsum_str {spec!r} gives the kernel {len(sb)} labels; kernel_shape has rank "
                     f"{kernel_ndim}.")
  return sa, sb, out


class QEinsum(_QLayer):
  """`nnx.Einsum` with a quantized kernel: `einsum(einsum_str, inputs, kernel) + bias`.

  The kernel keeps `kernel_shape` and is quantized along its last contracted axis (a label of both operands
  that is not in the output). `einsum_str` is fixed at construction (it decides that axis).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lowbit_jax.flax import QEinsum
    >>> layer = QEinsum("btd,dnh->btnh", (64, 4, 8), (4, 8), weight_format="mxfp8_e4m3", rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 3, 64))).shape
    (2, 3, 4, 8)
  """

  def __init__(self, einsum_str: str, kernel_shape: Sequence[int], bias_shape: Sequence[int] | None = None, *,
               weight_format: str | Format, activation_format: str | Format | None = None, qat: bool = False,
               dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: nnx.Initializer = default_kernel_init, bias_init: nnx.Initializer = default_bias_init,
               promote_dtype: Any = dtypes.promote_dtype, preferred_element_type: Any = None,
               backend: str | None = None, rngs: nnx.Rngs, kernel_metadata: Mapping[str, Any] = _EMPTY,
               bias_metadata: Mapping[str, Any] = _EMPTY):
    self.kernel_shape = tuple(kernel_shape)
    sa, sb, out = _einsum_labels(einsum_str, len(self.kernel_shape), "QEinsum")
    contracted = [i for i, c in enumerate(sb) if c in sa and c not in out]
    if not contracted:
      raise ValueError(f"QEinsum: einsum_str {einsum_str!r} contracts no kernel axis; there is nothing to "
                       "quantize along.")
    self.kernel_axis = contracted[-1]
    self.input_axis = sa.index(sb[self.kernel_axis])
    length = self.kernel_shape[self.kernel_axis]
    self.weight_format, self.activation_format = _formats(weight_format, activation_format, length, "QEinsum ")
    w = kernel_init(rngs.params(), self.kernel_shape, param_dtype)
    self.kernel = _kernel(w, self.weight_format, self.kernel_axis, qat, kernel_metadata)
    self.bias = (_bias(rngs, bias_init, tuple(bias_shape), param_dtype, bias_metadata) if bias_shape is not None
                 else nnx.data(None))
    self.einsum_str = einsum_str.replace(" ", "")
    self.bias_shape = None if bias_shape is None else tuple(bias_shape)
    self.broadcast_bias_shape = tuple(self.kernel_shape[sb.index(c)] if c in sb else 1 for c in out)
    self.qat, self.dtype, self.param_dtype, self.precision = qat, dtype, param_dtype, precision
    self.promote_dtype, self.preferred_element_type, self.backend = promote_dtype, preferred_element_type, backend

  @classmethod
  def from_float(cls, layer: nnx.Einsum | QEinsum, weight_format: str | Format, *,
                 activation_format: str | Format | None = None, qat: bool = False,
                 backend: str | None = None) -> QEinsum:
    """A QEinsum holding `layer`'s weights (an `nnx.Einsum` built with an `einsum_str`, or a QEinsum in QAT
    mode)."""
    if layer.einsum_str is None:
      raise ValueError("QEinsum: the nnx.Einsum has no einsum_str (it is given at call time); QEinsum needs it at "
                       "construction.")
    bias = layer.bias.get_value() if layer.bias is not None else None
    return cls(layer.einsum_str, layer.kernel_shape, layer.bias_shape, weight_format=weight_format,
               activation_format=activation_format, qat=qat, dtype=layer.dtype, param_dtype=layer.param_dtype,
               precision=layer.precision, kernel_init=_value_init(layer.kernel.get_value()),
               bias_init=_value_init(bias), promote_dtype=layer.promote_dtype,
               preferred_element_type=layer.preferred_element_type, backend=backend, rngs=nnx.Rngs(0))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    x, bias = self._promote(inputs, self.bias.get_value() if self.bias is not None else None)
    x = self._activation(x, self.input_axis)
    y = einsum(self.einsum_str, x, self._weight(self.kernel_axis, x.dtype), backend=self.backend,
               preferred_element_type=self.preferred_element_type)
    return y if bias is None else y + bias.reshape(self.broadcast_bias_shape)


class QEmbed(_QLayer):
  """`nnx.Embed` with a quantized (num_embeddings, features) table, quantized along the features axis (1).

  A lookup gathers the packed rows and their scales and dequantizes only those. `attend(query)` computes
  query @ table.T (a matmul contracting the features, the block axis), e.g. for a tied LM head; an
  `activation_format` applies to that query.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lowbit_jax.flax import QEmbed
    >>> emb = QEmbed(100, 64, weight_format="nvfp4", rngs=nnx.Rngs(0))
    >>> emb(jnp.array([[1, 2, 3]])).shape
    (1, 3, 64)
    >>> emb.attend(jnp.ones((1, 64))).shape
    (1, 100)
  """

  def __init__(self, num_embeddings: int, features: int, *, weight_format: str | Format,
               activation_format: str | Format | None = None, qat: bool = False, dtype: Any = None,
               param_dtype: Any = jnp.float32, embedding_init: nnx.Initializer = default_embed_init,
               promote_dtype: Any = dtypes.promote_dtype, backend: str | None = None, rngs: nnx.Rngs,
               embedding_metadata: Mapping[str, Any] = _EMPTY):
    self.weight_format, self.activation_format = _formats(weight_format, activation_format, features, "QEmbed ")
    table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
    self.embedding = _kernel(table, self.weight_format, 1, qat, embedding_metadata)
    self.num_embeddings, self.features, self.qat = num_embeddings, features, qat
    self.dtype = dtype or table.dtype
    self.param_dtype, self.promote_dtype, self.backend = param_dtype, promote_dtype, backend

  @property
  def kernel(self) -> nnx.Variable:
    return self.embedding

  @classmethod
  def from_float(cls, layer: nnx.Embed | QEmbed, weight_format: str | Format, *,
                 activation_format: str | Format | None = None, qat: bool = False,
                 backend: str | None = None) -> QEmbed:
    """A QEmbed holding `layer`'s table (an `nnx.Embed`, or a QEmbed in QAT mode)."""
    return cls(layer.num_embeddings, layer.features, weight_format=weight_format,
               activation_format=activation_format, qat=qat, dtype=layer.dtype, param_dtype=layer.param_dtype,
               embedding_init=_value_init(layer.embedding.get_value()), promote_dtype=layer.promote_dtype,
               backend=backend, rngs=nnx.Rngs(0))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """The rows `inputs` (integers, any shape) of the table: shape inputs.shape + (features,)."""
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"QEmbed: inputs must be integers, got dtype {inputs.dtype}.")
    table = self.embedding.get_value()
    if self.qat:
      return fake_quant(jnp.take(table, inputs, axis=0), self.weight_format, axis=-1).astype(self.dtype)
    (data, scale, tensor_scale, zero_point), aux = table.tree_flatten()
    take = lambda a: None if a is None else jnp.take(a, inputs, axis=0)
    # The block axis is counted from the end, so the gathered rows are a QArray with the same metadata.
    rows = QArray.tree_unflatten(aux, (take(data), take(scale), tensor_scale, take(zero_point)))
    return dequantize(rows, self.dtype)

  def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
    """query (..., features) @ table.T: shape (..., num_embeddings)."""
    (query,) = self.promote_dtype((query,), dtype=self.dtype)
    query = self._activation(query)
    return dot_general(query, self._weight(1, query.dtype), (((query.ndim - 1,), (1,)), ((), ())),
                       out_sharding=out_sharding, backend=self.backend)


# quantize_model ---------------------------------------------------------------------------------------------------

_CONVERT = {nnx.Linear: QLinear, nnx.LinearGeneral: QLinearGeneral, nnx.Einsum: QEinsum, nnx.Embed: QEmbed}
_QLAYERS = (QLinear, QLinearGeneral, QEinsum, QEmbed)


def _contraction_length(layer) -> int:
  """The length of the axis a layer's kernel is quantized along."""
  if isinstance(layer, (nnx.Linear, QLinear)):
    return layer.in_features
  if isinstance(layer, (nnx.LinearGeneral, QLinearGeneral)):
    return math.prod(layer.in_features)
  if isinstance(layer, (nnx.Embed, QEmbed)):
    return layer.features
  if isinstance(layer, QEinsum):
    return layer.kernel_shape[layer.kernel_axis]
  if layer.einsum_str is None:
    raise ValueError("the nnx.Einsum has no einsum_str (it is given at call time); QEinsum needs it at "
                     "construction.")
  sa, sb, out = _einsum_labels(layer.einsum_str, len(layer.kernel_shape), "nnx.Einsum")
  contracted = [i for i, c in enumerate(sb) if c in sa and c not in out]
  if not contracted:
    raise ValueError(f"einsum_str {layer.einsum_str!r} contracts no kernel axis.")
  return layer.kernel_shape[contracted[-1]]


def _nbytes(x) -> int:
  if isinstance(x, (QArray, PreparedWeight)):
    return sum(_nbytes(c) for c in jax.tree_util.tree_leaves(x))
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def weight_bytes(model: nnx.Module) -> int:
  """Bytes held by a model's parameters (`nnx.Param` and `QParam`), quantized ones at their storage size."""
  state = nnx.state(model, nnx.Any(nnx.Param, QParam))
  return sum(_nbytes(v) for v in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, (QArray, PreparedWeight))))


@dataclasses.dataclass
class LayerReport:
  """One layer seen by `quantize_model`: its path, kind, the format applied (None if skipped) and why not."""
  path: str
  kind: str
  format: str | None
  reason: str = ""
  bytes_before: int = 0
  bytes_after: int = 0


@dataclasses.dataclass
class QuantizeReport:
  """What `quantize_model` did: converted and skipped layers, the model's weight bytes before and after, and
  `k_major_faster`: the converted weight-only QLinear layers held (in, out) that a Hopper GPU would run on its
  faster decode kernel held K-major (counted on such a GPU only)."""
  converted: list[LayerReport]
  skipped: list[LayerReport]
  bytes_before: int
  bytes_after: int
  k_major_faster: int = 0

  def __str__(self) -> str:
    counts: dict[str, int] = {}
    for r in self.converted:
      counts[r.format] = counts.get(r.format, 0) + 1
    fmts = ", ".join(f"{k}: {v}" for k, v in counts.items())
    lines = [f"quantize_model: {len(self.converted)} layers converted" + (f" ({fmts})" if fmts else "")
             + f", {len(self.skipped)} skipped"]
    for r in self.skipped[:8]:
      lines.append(f"  skipped {r.path} ({r.kind}): {r.reason}")
    if len(self.skipped) > 8:
      lines.append(f"  ... and {len(self.skipped) - 8} more skipped")
    ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("inf")
    lines.append(f"  weights: {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} ({ratio:.2f}x smaller)")
    if self.k_major_faster:
      lines.append(f"  {self.k_major_faster} QLinear layers hold (in, out) kernels; on this GPU they run the faster "
                   "decode kernel held K-major: quantize_model(..., k_major=True), then prepare_model")
    return "\n".join(lines)


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


Spec = str | Format | None | Mapping[str, Any]


def _rules(rules) -> list[tuple[str, re.Pattern, Format | None, Format | None]]:
  """(pattern text, compiled, weight format, activation format) for each rule, in order."""
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  out = []
  for item in items:
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
      raise TypeError(f"quantize_model: rules must map regex strings to formats, got the entry {item!r}.")
    pattern, spec = item
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"quantize_model: rule {pattern!r} is not a valid regex: {e}.") from None
    act = None
    if isinstance(spec, Mapping):
      unknown = set(spec) - {"weight", "activation"}
      if unknown or "weight" not in spec:
        raise ValueError(f"quantize_model: rule {pattern!r} maps to {dict(spec)}; a dict rule needs the key "
                         "'weight' and optionally 'activation'.")
      spec, act = spec["weight"], spec.get("activation")
    try:
      weight = None if spec is None else get_format(spec)
      act = None if act is None else get_format(act)
    except (ValueError, TypeError) as e:
      raise ValueError(f"quantize_model: rule {pattern!r}: {e}") from None
    out.append((pattern, compiled, weight, act))
  return out


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _set_child(model, path, value) -> None:
  """Sets the node at `path` (from nnx.iter_graph: attribute names, and keys of lists and dicts) to `value`."""
  indexed = lambda node: hasattr(node, "__setitem__")
  parent = model
  for key in path[:-1]:
    parent = parent[key] if indexed(parent) else getattr(parent, key)
  if indexed(parent):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _progress(i: int, n: int, path: str) -> None:
  """Redraws a one-line progress bar on stderr (a terminal only)."""
  if not sys.stderr.isatty():
    return
  width = 30
  done = width * i // max(n, 1)
  sys.stderr.write(f"\rquantize_model [{'#' * done}{'.' * (width - done)}] {i}/{n} {path[:48]:<48}")
  if i == n:
    sys.stderr.write("\n")
  sys.stderr.flush()


def quantize_model(model: nnx.Module, rules: Mapping[str, Spec] | Sequence[tuple[str, Spec]], *,
                   qat: bool = False, k_major: bool = False, backend: str | None = None,
                   verbose: bool = True) -> QuantizeReport:
  """Replaces, in place, the layers of `model` that a rule matches by their quantized counterparts.

  Layers considered: `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum` and `nnx.Embed` (exact types, not
  subclasses), and the layers of this module in QAT mode (a later call without `qat` freezes them into
  quantized ones). A layer's path is its attribute path joined by "/", e.g. "layers/0/attn/q_proj".
  Rules are tried in order and the first whose regex `re.search`es the path applies; its value is a format name
  or `Format`, None (leave the layer as it is), or {"weight": fmt, "activation": fmt}. Unmatched layers are left
  untouched. The model is checked against every rule before any layer changes: a rule whose regex matches no
  layer, or whose format does not fit a layer it matches, raises a ValueError naming the rule and the layer.

  Args:
    model: an nnx Module; changed in place.
    rules: a mapping (or sequence of pairs) from regex to format spec.
    qat: build QAT layers (float kernels, fake-quantized in the forward pass) instead of quantized ones.
    k_major: hold QLinear / QLinearGeneral kernels (out, in), the layout of the Mosaic GPU decode kernel (on a
      Hopper GPU, int4 / int8 / MXFP4 / MXFP6 / MXFP8 / NVFP4 weights at M <= 256: see `QLinear`).
    backend: the `lowbit_jax.dot_general` backend the new layers use (default: automatic).
    verbose: draw a progress bar over the layers on stderr and print the summary.

  Returns:
    A `QuantizeReport` (its str() is the summary: layers converted and skipped, weight bytes before and after).

  Example:
    >>> from flax import nnx
    >>> from lowbit_jax.flax import quantize_model
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = nnx.Linear(64, 128, rngs=rngs)
    ...     self.down = nnx.Linear(128, 64, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> report = quantize_model(model, {"up": "mxfp4", "down": None}, verbose=False)
    >>> type(model.up).__name__, type(model.down).__name__, len(report.converted), len(report.skipped)
    ('QLinear', 'Linear', 1, 1)
  """
  parsed = _rules(rules)
  candidates = [(path, node) for path, node in nnx.iter_graph(model)
                if type(node) in _CONVERT or (isinstance(node, _QLAYERS) and path)]
  if any(not path for path, _ in candidates):
    raise ValueError("quantize_model: the model is itself a single layer; wrap it in a Module to convert it in "
                     "place.")
  plan, matched = [], set()
  for path, layer in candidates:
    name = _path_str(path)
    hits = [r for r in parsed if r[1].search(name)]
    matched.update(r[0] for r in hits)
    rule = hits[0] if hits else None
    kind = type(layer).__name__
    if rule is None:
      plan.append((path, layer, LayerReport(name, kind, None, "no rule matched"), None))
      continue
    pattern, _, weight, act = rule
    if weight is None:
      plan.append((path, layer, LayerReport(name, kind, None, f"rule {pattern!r} maps it to None"), None))
      continue
    if isinstance(layer, _QLAYERS) and not layer.qat:
      plan.append((path, layer, LayerReport(name, kind, None, "already quantized"), None))
      continue
    try:
      _formats(weight, act, _contraction_length(layer), "")
      if getattr(layer, "batch_axis", None):
        raise ValueError(f"batch_axis {dict(layer.batch_axis)} is not supported by QLinearGeneral")
    except ValueError as e:
      raise ValueError(f"quantize_model: rule {pattern!r} matches layer {name!r} ({kind}), which it cannot "
                       f"convert: {e} Map the layer to None with an earlier rule to leave it unquantized.") from None
    plan.append((path, layer, LayerReport(name, kind, weight.name), (weight, act)))
  for pattern, _, _, _ in parsed:
    if pattern not in matched:
      names = [_path_str(p) for p, _ in candidates]
      shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
      raise ValueError(f"quantize_model: rule {pattern!r} matches no layer; the layers are: {shown or 'none'}.")
  before = weight_bytes(model)
  converted, skipped = [], []
  from pallas_kernels.backend import hopper_available  # (imported on use: the kernels stay off the flax import)
  k_major_faster, supports = 0, None  # supports: the decode kernel's check, where (in, out) layers are counted
  if not (k_major or qat) and hopper_available():
    from pallas_kernels.dequant_gemv_mosaic import supports
  for i, (path, layer, report, spec) in enumerate(plan):
    if verbose:
      _progress(i, len(plan), report.path)
    report.bytes_before = weight_bytes(layer)
    if spec is None:
      report.bytes_after = report.bytes_before
      skipped.append(report)
      continue
    cls = type(layer) if isinstance(layer, _QLAYERS) else _CONVERT[type(layer)]
    layout = {"k_major": k_major} if cls in (QLinear, QLinearGeneral) else {}
    new = cls.from_float(layer, spec[0], activation_format=spec[1], qat=qat, backend=backend, **layout)
    _set_child(model, path, new)
    report.bytes_after = weight_bytes(new)
    converted.append(report)
    if supports and cls is QLinear and new.activation_format is None:  # (weight-only: the decode kernel)
      k_major_faster += supports(new.weight_format, new.out_features, new.in_features) is None
  if verbose:
    _progress(len(plan), len(plan), "")
  result = QuantizeReport(converted, skipped, before, weight_bytes(model), k_major_faster)
  if verbose:
    print(result, file=sys.stderr)
  return result


def prepare_model(model: nnx.Module) -> list[str]:
  """Stores, in place, the K-major kernels of a model's `QLinear` / `QLinearGeneral` layers (`k_major=True`) as
  `lowbit_jax.PreparedWeight`s: codes re-ordered once for the Mosaic GPU decode kernel, so no call permutes its
  activations (the layers compute the same values). Kernels the kernel's layout does not take stay QArrays.
  Checkpoints still store the canonical QArrays (`lowbit_jax.checkpoint`). Returns the paths of the layers
  prepared.

  Example:
    >>> from flax import nnx
    >>> from lowbit_jax.flax import QLinear, prepare_model
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.up = QLinear(128, 256, weight_format="int4_g128_sym", k_major=True, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> prepare_model(model), model.up.kernel.get_value()
    (['up'], PreparedWeight(int4_g128_sym, shape=(256, 128), dtype=float32))
  """
  done = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (QLinear, QLinearGeneral)) and node.k_major and not node.qat:
      w = node.kernel.get_value()
      if unpreparable(w) is None:
        node.kernel.set_value(prepare(w))
        done.append(_path_str(path))
  return done
