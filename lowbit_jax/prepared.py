"""`PreparedWeight`: a K-major weight whose codes are stored in the order the Mosaic GPU decode kernel reads them,
made once from its canonical QArray by `prepare` (as Marlin re-orders GPTQ weights once at load time)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lowbit_jax.formats import Format
from lowbit_jax.qarray import QArray

__all__ = ["PreparedWeight", "canonical", "prepare", "unpreparable"]


@jax.tree_util.register_pytree_node_class
class PreparedWeight:
  """A quantized K-major (N, K) weight, blocked along K, in the Mosaic GPU decode kernel's storage order.

  The kernel widens 4- and 6-bit codes to registers in an order that permutes K within every 32
  (`pallas_kernels.dequant_gemv_mosaic.kernel_order`); with a canonical QArray it permutes the activations to
  match on every call, with a PreparedWeight the codes are stored permuted instead, so the activations pass
  untouched; E2M1 codes (MXFP4, NVFP4) also have their bits placed within each 32-bit word so that the kernel
  decodes most pairs by a rotate and a mask. FP8 codes are permuted as 4-bit ones are (the kernel loads them
  eight at a time), and so are folded MXINT8 ones (below), stored as a sign bit and a 7-bit magnitude; other int8
  codes are stored as they are. Scales are stored as in the QArray.
  `folded` (static, found by `prepare` from the scales' values): the kernel may multiply the power of two its
  float decode leaves on each code into the block scales instead of into every pair of codes, one instruction
  fewer per pair (`pallas_kernels.dequant_gemv_mosaic.folds_scales`: MX weights whose scales are all small
  enough, which real weights' are, and for MXINT8 no code -128; the others decode as a QArray's do).

  A pytree (children: the permuted packed `data`, `scale`, `tensor_scale`), so it lives in model params and passes
  through jit. `lowbit_jax.dot_general` runs the kernel on it where dispatch picks the kernel, and every other path
  (the XLA reference on a CPU, more rows than the kernel takes, quantized activations) on `canonical()`, which
  undoes the permutation. Checkpoints store the canonical form (`lowbit_jax.checkpoint`).

  Example:
    >>> import jax.numpy as jnp, lowbit_jax as lb
    >>> w = lb.quantize(jnp.ones((64, 128), jnp.bfloat16), "int4_g128_sym", axis=1)
    >>> p = lb.prepare(w)
    >>> p
    PreparedWeight(int4_g128_sym, shape=(64, 128), dtype=bfloat16)
    >>> bool((lb.dequantize(p) == lb.dequantize(w)).all())
    True
  """

  __slots__ = ("data", "scale", "tensor_scale", "folded", "_aux")

  def __init__(self, data, scale, tensor_scale, *, aux, folded: bool = False):
    """Low-level constructor: `aux` is the canonical QArray's static metadata (`QArray.tree_flatten`)."""
    self.data, self.scale, self.tensor_scale, self._aux, self.folded = data, scale, tensor_scale, aux, folded

  def tree_flatten(self):
    return (self.data, self.scale, self.tensor_scale), (self._aux, self.folded)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, aux=aux[0], folded=aux[1])

  def _layout(self, data) -> QArray:
    """A QArray with this weight's metadata holding `data` (the canonical one when `data` is canonical)."""
    return QArray.tree_unflatten(self._aux, (data, self.scale, self.tensor_scale, None))

  @property
  def format(self) -> Format:
    return self._aux[0]

  @property
  def shape(self) -> tuple[int, ...]:
    return self._layout(self.data).shape

  @property
  def ndim(self) -> int:
    return len(self.data.shape)

  @property
  def axis(self) -> int:
    """The block axis (K): 1."""
    return self._layout(self.data).axis

  @property
  def blocked_axes(self) -> tuple[int, ...]:
    return (self.axis,)

  @property
  def dtype(self) -> np.dtype:
    return self._aux[3]

  @property
  def nbytes(self) -> int:
    return self._layout(self.data).nbytes

  def canonical(self) -> QArray:
    """The canonical QArray this weight was prepared from (bit-identical)."""
    from pallas_kernels.dequant_gemv_mosaic import kernel_order
    return self._layout(kernel_order(self.data, self.format.element_type, folded=self.folded))

  def dequantize(self, dtype=None) -> jax.Array:
    """`lowbit_jax.dequantize` of the canonical weight."""
    return self.canonical().dequantize(dtype)

  def __repr__(self) -> str:
    return f"PreparedWeight({self.format.name}, shape={self.shape}, dtype={self.dtype.name})"


def unpreparable(w: Any) -> str | None:
  """None if `prepare(w)` applies to `w`, else why not."""
  from pallas_kernels.dequant_gemv_mosaic import supports
  if not isinstance(w, QArray):
    return f"w must be a QArray, got {type(w).__name__}"
  if w.ndim != 2 or w.axis != 1:
    return f"w must be a K-major (N, K) QArray blocked along axis 1 (quantize the transposed weight with axis=1), " \
           f"got {w}"
  reason = supports(w.format, *w.shape)
  return f"the Mosaic GPU kernel's layout does not apply to {reason}" if reason else None


def prepare(w: QArray) -> PreparedWeight:
  """`w`, a K-major (N, K) QArray blocked along axis 1 in a format the Mosaic GPU decode kernel takes (symmetric
  int4 / int8, MXFP4, MXFP6, MXFP8, NVFP4; N a multiple of 64, K of 128), with its codes re-ordered once for the
  kernel. Raises ValueError naming the reason for any other weight. Works on any device (a one-time permutation
  of the packed codes, and for MX weights one reduction over the scales, which needs them concrete: under jit
  the result is not `folded`); the result is bit-identical to `w` through `canonical()`.

  Example:
    >>> import jax.numpy as jnp, lowbit_jax as lb
    >>> w = lb.quantize(jnp.ones((64, 256)), "mxfp4", axis=1)
    >>> lb.prepare(w).shape
    (64, 256)
  """
  from pallas_kernels.dequant_gemv_mosaic import folds_scales, kernel_order
  if isinstance(w, PreparedWeight):
    return w
  reason = unpreparable(w)
  if reason:
    raise (ValueError if isinstance(w, QArray) else TypeError)(f"prepare: {reason}.")
  (data, scale, tensor_scale, _), aux = w.tree_flatten()
  folded = folds_scales(w)
  return PreparedWeight(kernel_order(data, w.format.element_type, inverse=True, folded=folded), scale, tensor_scale,
                        aux=aux, folded=folded)


def canonical(tree: Any) -> Any:
  """`tree` with every PreparedWeight replaced by its canonical QArray."""
  return jax.tree.map(lambda x: x.canonical() if isinstance(x, PreparedWeight) else x, tree,
                      is_leaf=lambda x: isinstance(x, PreparedWeight))
