"""The default device (a GPU on the device machine) stores the same bits as the CPU for every format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb

ON_ACCELERATOR = jax.default_backend() != "cpu"


def _bits(a):
  """Bit patterns, with every NaN read as one pattern (backends differ in NaN payloads, not in NaN-ness)."""
  a = np.asarray(a)
  bits = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).copy()
  if a.dtype.itemsize > 1 or a.dtype.kind == "f" or "float" in a.dtype.name:
    bits[np.isnan(a.astype(np.float32))] = 0xFF
  return bits


@pytest.mark.skipif(not ON_ACCELERATOR, reason="compares an accelerator with the CPU")
@pytest.mark.parametrize("fmt", lb.formats())
def test_same_bits_as_cpu(fmt):
  x = np.asarray(jax.random.normal(jax.random.key(0), (130, 256), jnp.float32))
  x = x * np.exp2(np.random.default_rng(0).integers(-30, 30, size=(130, 1))).astype(np.float32)
  x[3, 5] = np.nan
  x[7, 100] = -np.inf
  x[9, :] = 0
  q_dev = lb.quantize(jnp.asarray(x), fmt)
  with jax.default_device(jax.devices("cpu")[0]):
    q_cpu = lb.quantize(jnp.asarray(x), fmt)
    y_cpu = lb.dequantize(q_cpu)
  for name in ("data", "scale", "zero_point", "tensor_scale"):
    a, b = getattr(q_dev, name), getattr(q_cpu, name)
    if a is not None:
      np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"{fmt}: {name}")
  np.testing.assert_array_equal(_bits(lb.dequantize(q_dev)), _bits(y_cpu), err_msg=f"{fmt}: dequantize")
