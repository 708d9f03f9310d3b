"""fake_quant: the forward pass is quantize-then-dequantize exactly, the gradient is the identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.fake_quant import fake_quant

# One of each rule (MX float, MX int, NVFP4, asymmetric and per-channel integers, block FP8), along either axis.
CASES = [("mxfp4", 0), ("mxint8", 1), ("nvfp4", 1), ("int4_g32_asym", 0), ("int8_channel_sym", 1),
         ("fp8_block_1x128", 1)]


@pytest.mark.parametrize("fmt,axis", CASES)
def test_forward_is_quantize_dequantize(fmt, axis):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((40, 128)), jnp.bfloat16)
  y = jax.jit(lambda x: fake_quant(x, fmt, axis=axis))(x)
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y), np.asarray(lb.dequantize(lb.quantize(x, fmt, axis=axis))))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4_g32_asym"])
def test_gradient_is_straight_through(fmt):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, 64)) * 10.0, jnp.float32)  # large values: MX floor scales saturate some
  w = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(fake_quant(x, fmt) * w))(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # Chained: the cotangent at fake_quant's output passes through unchanged.
  g2 = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(fake_quant(x, fmt)))))(x)
  np.testing.assert_allclose(np.asarray(g2), np.asarray(jnp.cos(fake_quant(x, fmt))), rtol=1e-6)


def test_errors():
  with pytest.raises(TypeError, match="floating"):
    fake_quant(jnp.arange(32), "mxfp4")
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    fake_quant(jnp.ones((4, 32)), "mxfp4", axis=2)
  with pytest.raises(ValueError, match="Unknown format"):
    fake_quant(jnp.ones((4, 32)), "mxfp3")
