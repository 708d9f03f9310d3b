"""lowbit_jax: low-bit number formats (OCP MX, NVFP4, grouped integers, block FP8) for JAX.

>>> import jax.numpy as jnp, lowbit_jax as lb
>>> q = lb.quantize(jnp.linspace(-1, 1, 64), "mxfp4")
>>> y = lb.dequantize(q)
"""

from lowbit_jax.fake_quant import fake_quant
from lowbit_jax.formats import ELEMENTS, ElementType, Format, formats, get_format, register_format
from lowbit_jax.hqq import HQQ
from lowbit_jax.ops import dot_general, einsum, matmul, matmul_summands, matmul_swiglu
from lowbit_jax.prepared import PreparedWeight, prepare
from lowbit_jax.qarray import QArray
from lowbit_jax.quantize import dequantize, quantize

__all__ = [
    "ELEMENTS", "ElementType", "Format", "HQQ", "PreparedWeight", "QArray", "dequantize", "dot_general", "einsum",
    "fake_quant", "formats", "get_format", "matmul", "matmul_summands", "matmul_swiglu", "prepare", "quantize",
    "register_format",
]
__version__ = "0.1.0"


def __getattr__(name: str):
  """`lowbit_jax.flax` and `lowbit_jax.checkpoint` are imported on first use (they load flax and orbax)."""
  if name in ("flax", "checkpoint"):
    import importlib
    return importlib.import_module(f"lowbit_jax.{name}")
  raise AttributeError(f"module 'lowbit_jax' has no attribute {name!r}")
