"""GPU kernels for lowbit_jax, written in Pallas. Backend-specific calls live in `backend.py` only."""

from pallas_kernels.dequant_matmul import Config, dequant_matmul
from pallas_kernels.int8_matmul import Int8Config, int8_matmul
from pallas_kernels.quantize import dequantize_rows, quantize_rows

__all__ = ["Config", "Int8Config", "dequant_matmul", "dequantize_rows", "int8_matmul", "quantize_rows"]
