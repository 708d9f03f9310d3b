"""Flax integration: quantized flax.nnx layers and `quantize_model` (`lowbit_jax.flax.nnx`), and a linen
`dot_general_cls` with a param-tree converter (`lowbit_jax.flax.linen`).

>>> from flax import nnx
>>> from lowbit_jax.flax import QLinear
>>> QLinear(32, 8, weight_format="mxfp4", rngs=nnx.Rngs(0)).kernel.get_value()
QArray(mxfp4, shape=(32, 8), axis=0, dtype=float32)
"""

from lowbit_jax.flax import linen
from lowbit_jax.flax.nnx import (LayerReport, QEinsum, QEmbed, QLinear, QLinearGeneral, QParam, QuantizeReport,
                                 prepare_model, quantize_model, weight_bytes)

__all__ = ["LayerReport", "QEinsum", "QEmbed", "QLinear", "QLinearGeneral", "QParam", "QuantizeReport", "linen",
           "prepare_model", "quantize_model", "weight_bytes"]
