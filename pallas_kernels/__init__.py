"""GPU kernels for lowbit_jax, written in Pallas. Backend-specific calls live in `backend.py` only."""

from pallas_kernels.dequant_matmul import Config, dequant_matmul
from pallas_kernels.quantize import mx_dequantize, mx_quantize

__all__ = ["Config", "dequant_matmul", "mx_dequantize", "mx_quantize"]
