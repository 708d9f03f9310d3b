"""`fake_quant`: quantize-dequantize in the forward pass with a straight-through gradient, for QAT and for
emulating activation quantization."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from lowbit_jax.formats import Format, get_format
from lowbit_jax.quantize import dequantize, quantize

__all__ = ["fake_quant"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fake_quant(x, fmt: Format, axis: int, scale_mode):
  return dequantize(quantize(x, fmt, axis=axis, scale_mode=scale_mode), x.dtype)


def _fwd(x, fmt, axis, scale_mode):
  return _fake_quant(x, fmt, axis, scale_mode), None


def _bwd(fmt, axis, scale_mode, _, g):
  return (g,)


_fake_quant.defvjp(_fwd, _bwd)


def fake_quant(x: jax.Array, fmt: str | Format, *, axis: int = -1,
               scale_mode: Literal["floor", "ceil", "even", "rceil"] | None = None) -> jax.Array:
  """`dequantize(quantize(x, fmt, axis=axis))` in `x`'s dtype, with a straight-through gradient.

  The forward pass is exactly what a model holding `quantize(x)` computes with (same blocks along `axis`, same
  rounding). The backward pass is the identity: the cotangent passes through unchanged, for every element,
  including those that saturate (MX 'floor' scales may clip a block's largest elements to the element maximum;
  block scales follow each block's absmax, so nothing else is clipped). Any format of `lowbit_jax.formats()`.

  Args:
    x: a floating array of any rank.
    fmt: a format name or a `lowbit_jax.Format`.
    axis: the block axis: the contraction axis of the matmul `x` feeds (a (in, out) kernel: 0; activations: -1).
    scale_mode: MX formats only, as in `lowbit_jax.quantize`.

  Example:
    >>> import jax, jax.numpy as jnp, lowbit_jax as lb
    >>> from lowbit_jax.fake_quant import fake_quant
    >>> x = jnp.linspace(-1.0, 1.0, 32)
    >>> bool(jnp.all(fake_quant(x, "mxfp4") == lb.dequantize(lb.quantize(x, "mxfp4"))))
    True
    >>> jax.grad(lambda x: jnp.sum(fake_quant(x, "mxfp4") * 3.0))(x)[:3]
    Array([3., 3., 3.], dtype=float32)
  """
  fmt = get_format(fmt)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"fake_quant: x must be a floating array, got dtype {x.dtype}.")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"fake_quant: axis {axis} is out of range for an input of rank {x.ndim}.")
  return _fake_quant(x, fmt, int(axis) % x.ndim, scale_mode)
