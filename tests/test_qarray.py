"""The format registry, the QArray pytree and its passage through JAX transformations, and input validation."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit_jax as lb

X = jax.random.normal(jax.random.key(1), (6, 96), jnp.float32) * 4


def test_registry_names():
  names = set(lb.formats())
  expected = {"mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4",
              "fp8_block_1x128", "fp8_block_128x128"}
  expected |= {f"int{b}_{g}_{s}" for b in (4, 8) for g in ("g32", "g64", "g128", "channel")
               for s in ("sym", "asym")}
  expected |= {f"int{b}_g{g}_{s}" for b in (2, 3) for g in (32, 64, 128) for s in ("sym", "asym")}
  assert names == expected


@pytest.mark.parametrize("name,bits", [("mxfp8_e4m3", 8.25), ("mxfp6_e2m3", 6.25), ("mxfp4", 4.25),
                                       ("mxint8", 8.25), ("nvfp4", 4.5), ("int4_g128_sym", 4.125),
                                       ("int4_g32_asym", 5.0), ("fp8_block_1x128", 8.25),
                                       ("int8_channel_sym", None), ("int3_g64_sym", 3.25),
                                       ("int3_g128_asym", 3.25), ("int2_g32_asym", 3.0), ("int2_g128_sym", 2.125)])
def test_spec_bits(name, bits):
  assert lb.get_format(name).bits_per_element == bits


def test_spec_fields():
  f = lb.get_format("nvfp4")
  assert (f.element, f.block, f.scale, f.tensor_scale, f.zero_point) == (
      "float4_e2m1fn", (16,), "float8_e4m3fn", True, False)
  assert lb.get_format("int4_g64_asym").zero_point
  assert lb.get_format("fp8_block_128x128").block == (128, 128)


def test_custom_formats_without_registering():
  mxfp4_16 = lb.Format("mxfp4_b16", "float4_e2m1fn", (16,), "float8_e8m0fnu")
  q = lb.quantize(X, mxfp4_16)
  assert q.scale.shape == (6, 6) and q.scale.dtype == jnp.float8_e8m0fnu
  # The same data in 32-blocks: each 16-block scale is at most its 32-block's.
  q32 = lb.quantize(X, "mxfp4")
  s16 = np.asarray(q.scale.astype(jnp.float32)).reshape(6, 3, 2)
  assert np.all(s16 <= np.asarray(q32.scale.astype(jnp.float32))[..., None])
  int4_g256 = lb.Format("int4_g256", "int4", (256,), "bfloat16")
  q = lb.quantize(jnp.ones((2, 300)), int4_g256)
  assert q.scale.shape == (2, 2) and q.shape == (2, 300)
  # The scale is stored in bfloat16, so 1.0 comes back as 7 * bf16(1/7).
  np.testing.assert_array_equal(lb.dequantize(q), 7 * np.float32(ml_dtypes.bfloat16(1 / 7)))


def test_register_and_bad_spec():
  f = lb.register_format(lb.Format("int8_g16_sym_test", "int8", (16,), "float32"))
  assert "int8_g16_sym_test" in lb.formats() and lb.get_format("int8_g16_sym_test") is f
  with pytest.raises(ValueError, match="element"):
    lb.Format("bad", "float5", (32,), "float8_e8m0fnu")
  with pytest.raises(ValueError, match="scale"):
    lb.Format("bad", "int4", (32,), "int8")
  with pytest.raises(ValueError, match="zero point"):
    lb.Format("bad", "float4_e2m1fn", (32,), "bfloat16", zero_point=True)


def test_qarray_properties_and_repr():
  x = X.astype(jnp.bfloat16)
  q = lb.quantize(x, "mxfp4")
  assert q.shape == (6, 96) and q.ndim == 2 and q.dtype == jnp.bfloat16 and q.axis == 1
  assert q.data.shape == (6, 48) and q.data.dtype == np.uint8
  assert q.nbytes == 6 * 48 + 6 * 3 and q.bits_per_element == 4.25
  assert repr(q) == "QArray(mxfp4, shape=(6, 96), axis=1, dtype=bfloat16)"
  assert q.dequantize().dtype == jnp.bfloat16
  assert q.dequantize(jnp.float32).dtype == jnp.float32
  qn = lb.quantize(x, "nvfp4")
  assert qn.tensor_scale.dtype == jnp.float32 and qn.tensor_scale.shape == ()


@pytest.mark.parametrize("fmt,data_shape,nbytes", [("int3_g32_sym", (36, 6), 36 * 6 + 3 * 6 * 2),
                                                    ("int2_g32_asym", (24, 6), 24 * 6 + 3 * 6 * 2 * 2)])
def test_dense_int_storage(fmt, data_shape, nbytes):
  # A (96, 6) weight blocked along K: 3-bit codes take 3 bytes per 8, 2-bit 1 byte per 4; bf16 scales (and zero
  # points).
  q = lb.quantize(X.T, fmt, axis=0)
  assert q.data.shape == data_shape and q.data.dtype == np.uint8 and q.shape == (96, 6)
  assert q.nbytes == nbytes and q.bits_per_element == lb.get_format(fmt).bits_per_element
  assert repr(q) == f"QArray({fmt}, shape=(96, 6), axis=0, dtype=float32)"


@pytest.mark.parametrize("axis", [0, 1, 2, -2])
def test_any_axis_and_ragged(axis):
  x = jax.random.normal(jax.random.key(2), (5, 33, 7))
  q = lb.quantize(x, "mxfp6_e3m2", axis=axis)
  assert q.shape == x.shape and q.axis == axis % 3
  y = lb.dequantize(q)
  # Same numbers as quantizing with the block axis moved last.
  q_last = lb.quantize(jnp.moveaxis(x, axis, -1), "mxfp6_e3m2")
  np.testing.assert_array_equal(jnp.moveaxis(y, axis, -1), lb.dequantize(q_last))


def test_2d_blocks():
  x = jax.random.normal(jax.random.key(3), (3, 130, 260))
  q = lb.quantize(x, "fp8_block_128x128")
  assert q.scale.shape == (3, 2, 3) and q.data.shape == (3, 256, 384) and q.shape == x.shape
  s = np.asarray(q.scale)
  np.testing.assert_allclose(s[1, 0, 0], np.abs(np.asarray(x)[1, :128, :128]).max() / 448, rtol=1e-7)


def test_jit_and_tree_map():
  q = jax.jit(lambda x: lb.quantize(x, "mxfp8_e4m3"))(X)
  y = jax.jit(lb.dequantize)(q)
  np.testing.assert_array_equal(y, lb.dequantize(lb.quantize(X, "mxfp8_e4m3")))
  leaves = jax.tree_util.tree_leaves(q)
  assert len(leaves) == 2  # data and scale; no tensor scale or zero point
  q2 = jax.tree_util.tree_map(lambda a: a, q)
  assert isinstance(q2, lb.QArray) and q2.format == q.format


def test_vmap_over_leading_axes():
  xs = jnp.stack([X, 2 * X, -X])
  qs = jax.vmap(lambda x: lb.quantize(x, "nvfp4"))(xs)
  assert qs.shape == (3, 6, 96) and qs.tensor_scale.shape == (3,)
  ys = jax.vmap(lb.dequantize)(qs)
  for i in range(3):
    np.testing.assert_array_equal(ys[i], lb.dequantize(lb.quantize(xs[i], "nvfp4")))
  # A QArray made outside maps like an array too.
  q = lb.quantize(xs, "mxfp4")
  inner_shapes = jax.vmap(lambda qi: jnp.zeros(qi.shape))(q).shape
  assert inner_shapes == (3, 6, 96)


def test_scan_over_stacked_layers():
  ws = lb.quantize(jax.random.normal(jax.random.key(4), (4, 64, 64)), "int4_g32_sym", axis=1)

  def layer(h, w):
    return jnp.tanh(h @ lb.dequantize(w)), None

  h, _ = jax.lax.scan(layer, jnp.ones((2, 64)), ws)
  ref = jnp.ones((2, 64))
  for i in range(4):
    ref = jnp.tanh(ref @ lb.dequantize(lb.quantize(ws.dequantize()[i], "int4_g32_sym", axis=0)))
  np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)


def test_grad_alongside_float_inputs():
  q = lb.quantize(jax.random.normal(jax.random.key(5), (64, 8)), "mxfp4", axis=0)

  def loss(x, w):
    return jnp.sum(jnp.sin(x @ lb.dequantize(w)))

  x = jnp.ones((3, 64))
  g = jax.grad(loss)(x, q)
  w = lb.dequantize(q)
  np.testing.assert_allclose(g, jnp.cos(x @ w) @ w.T, rtol=1e-5)


def test_device_put_with_sharding():
  devs = jax.devices()
  if len(devs) < 2:
    pytest.skip("needs 2 devices")
  mesh = jax.sharding.Mesh(np.array(devs[:2]), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  q = lb.quantize(X[:4], "mxfp4")
  qs = jax.device_put(q, sharding)
  assert qs.data.sharding == sharding and qs.scale.sharding == sharding
  np.testing.assert_array_equal(lb.dequantize(qs), lb.dequantize(q))


def test_input_dtypes():
  for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
    q = lb.quantize(X.astype(dt), "mxfp8_e4m3")
    assert q.dtype == dt and lb.dequantize(q).dtype == dt
  q = lb.quantize(np.asarray(X), "mxfp4")  # numpy input
  assert q.dtype == np.float32


# ---- bad input ----

@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, jnp.uint8])
def test_non_float_input(dtype):
  with pytest.raises(TypeError, match=str(jnp.dtype(dtype))):
    lb.quantize(jnp.zeros((4, 32), dtype), "mxfp4")


def test_unknown_format_lists_names():
  with pytest.raises(ValueError, match="Unknown format 'mxfp3'.*mxfp4.*nvfp4"):
    lb.quantize(X, "mxfp3")
  with pytest.raises(TypeError, match="fmt"):
    lb.quantize(X, 4)


def test_axis_errors():
  with pytest.raises(ValueError, match="axis 2 is out of range.*rank 2"):
    lb.quantize(X, "mxfp4", axis=2)
  with pytest.raises(ValueError, match="blocks 2 axes"):
    lb.quantize(X[0], "fp8_block_128x128")


def test_stochastic_needs_key_and_bad_options():
  with pytest.raises(ValueError, match="key"):
    lb.quantize(X, "mxfp4", rounding="stochastic")
  with pytest.raises(ValueError, match="rounding"):
    lb.quantize(X, "mxfp4", rounding="up")
  with pytest.raises(ValueError, match="scale_mode"):
    lb.quantize(X, "mxfp4", scale_mode="round")
  with pytest.raises(ValueError, match="scale_mode applies to MX"):
    lb.quantize(X, "nvfp4", scale_mode="ceil")


@pytest.mark.parametrize("g", [0.0, -1.0, float("nan"), float("inf"), np.float16(1.0), np.ones(2, np.float32)])
def test_bad_tensor_scale(g):
  with pytest.raises(ValueError, match="tensor_scale"):
    lb.quantize(X, "nvfp4", tensor_scale=g)


def test_tensor_scale_only_for_tensor_scaled_formats():
  with pytest.raises(ValueError, match="no tensor scale"):
    lb.quantize(X, "mxfp4", tensor_scale=1.0)


def test_given_tensor_scale_is_kept():
  q = lb.quantize(X, "nvfp4", tensor_scale=jnp.float32(0.01))
  assert float(q.tensor_scale) == np.float32(0.01)
  q = jax.jit(lambda x, g: lb.quantize(x, "nvfp4", tensor_scale=g))(X, jnp.float32(0.02))
  assert float(q.tensor_scale) == np.float32(0.02)


def test_dequantize_errors():
  with pytest.raises(TypeError, match="QArray"):
    lb.dequantize(X)
  with pytest.raises(TypeError, match="dtype"):
    lb.dequantize(lb.quantize(X, "mxfp4"), jnp.int8)
