"""Weight-only quantized matmul: the Pallas kernel (interpret mode on CPU, compiled on a GPU) and the XLA path
against a float32 reference (weights dequantized in float32, dot at HIGHEST precision)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from pallas_kernels import Config, dequant_matmul
from pallas_kernels.backend import gpu_available
from pallas_kernels.dequant_matmul import supports

KERNEL = "pallas" if gpu_available() else "interpret"
WEIGHT_FORMATS = ["mxfp4", "nvfp4", "int4_g32_sym", "int4_g64_asym", "int4_g128_sym", "int4_g128_asym",
                  "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "int8_channel_sym", "mxint8",
                  "int4_channel_asym"]
# (M, K, N): one per regime of M, with ragged N and K (K not a multiple of 128, or of the block).
SHAPES = [(1, 256, 96), (13, 320, 64), (40, 128, 200), (300, 192, 72)]


def reference(x, w):
  return jnp.dot(x.astype(jnp.float32), lb.dequantize(w, jnp.float32), precision="highest")


def assert_close(y, ref, dtype):
  # Error within the output's rounding: a few ulps of the output dtype at the output's scale.
  eps = float(jnp.finfo(dtype).eps)
  tol = 4 * eps * float(jnp.max(jnp.abs(ref)))
  err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)))
  assert err <= tol, f"max error {err} > {tol}"


def _operands(m, k, n, fmt, dtype=jnp.bfloat16, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = lb.quantize(jax.random.normal(kw, (k, n), jnp.float32) * 0.1, fmt, axis=0)
  return x, w


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_every_format_and_regime(fmt, shape):
  m, k, n = shape
  x, w = _operands(m, k, n, fmt)
  if KERNEL == "interpret":  # small tiles keep the interpreter fast; the regimes' tile logic is the same code
    y = dequant_matmul(x, w, backend="interpret", config=Config(16, 32, 64))
  else:
    y = lb.matmul(x, w, backend="pallas")
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  assert_close(y, reference(x, w), jnp.bfloat16)


@pytest.mark.parametrize("cfg", [Config(16, 64, 256), Config(64, 64, 128), Config(128, 128, 64)])
def test_kernel_default_tile_shapes(cfg):
  x, w = _operands(5, 512, 128, "mxfp4", seed=3)
  y = dequant_matmul(x, w, backend="triton" if KERNEL == "pallas" else "interpret", config=cfg)
  assert_close(y, reference(x, w), jnp.bfloat16)


@pytest.mark.parametrize("split_k", [2, 3])
def test_kernel_split_k(split_k):
  # Partial sums over slices of K; 3 does not divide the 8 K steps and is fitted down to 2.
  x, w = _operands(3, 512, 72, "nvfp4", seed=4)
  cfg = Config(16, 32, 64, split_k=split_k)
  y = dequant_matmul(x, w, backend="triton" if KERNEL == "pallas" else "interpret", config=cfg)
  assert_close(y, reference(x, w), jnp.bfloat16)


def test_kernel_float16_and_output_dtype():
  x, w = _operands(4, 128, 64, "int4_g32_asym", dtype=jnp.float16)
  y = lb.matmul(x, w, backend=KERNEL)
  assert y.dtype == jnp.float16
  assert_close(y, reference(x, w), jnp.float16)
  y32 = lb.matmul(x, w, backend=KERNEL, preferred_element_type=jnp.float32)
  assert y32.dtype == jnp.float32


def test_nonfinite_block_poisons_its_columns():
  x, _ = _operands(2, 64, 32, "mxfp4")
  wf = jax.random.normal(jax.random.key(9), (64, 32)).at[5, 3].set(jnp.nan)
  w = lb.quantize(wf, "mxfp4", axis=0)
  y = np.asarray(lb.matmul(x, w, backend=KERNEL).astype(jnp.float32))
  assert np.isnan(y[:, 3]).all() and np.isfinite(np.delete(y, 3, axis=1)).all()


def test_leading_batch_dims_and_jit():
  x = jax.random.normal(jax.random.key(1), (2, 3, 128), jnp.float32).astype(jnp.bfloat16)
  w = lb.quantize(jax.random.normal(jax.random.key(2), (128, 64)), "mxfp4", axis=0)
  y = jax.jit(lambda x, w: lb.matmul(x, w, backend=KERNEL))(x, w)
  assert y.shape == (2, 3, 64)
  assert_close(y.reshape(6, 64), reference(x.reshape(6, 128), w), jnp.bfloat16)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4_g128_asym", "fp8_block_1x128"])
def test_xla_path(fmt):
  x, w = _operands(8, 256, 64, fmt, dtype=jnp.float32)
  y = lb.dot_general(x, w, (((1,), (0,)), ((), ())), precision="highest", backend="xla")
  np.testing.assert_allclose(y, reference(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int3_g128_asym", "int2_g64_sym"])
def test_dense_int_weights_fall_back_to_xla(fmt):
  # The kernel takes 4-, 6- and 8-bit codes only: lb.matmul runs the XLA path (on a GPU with a warning).
  x, w = _operands(5, 256, 48, fmt)
  bits = lb.get_format(fmt).element_type.bits
  assert supports(w.format) == f"{fmt}: {bits}-bit elements"
  ctx = pytest.warns(UserWarning, match=f"{bits}-bit elements") if gpu_available() else contextlib.nullcontext()
  with ctx:
    y = lb.matmul(x, w)
  assert_close(y, reference(x, w), jnp.bfloat16)


def test_dot_general_general_dimension_numbers_on_xla():
  # rhs (N, K) blocked along K, contracted as a @ b.T
  x = jax.random.normal(jax.random.key(0), (4, 3, 64))
  w = lb.quantize(jax.random.normal(jax.random.key(1), (16, 64)), "mxfp8_e4m3", axis=1)
  y = lb.dot_general(x, w, (((2,), (1,)), ((), ())), precision="highest")
  ref = jnp.einsum("btk,nk->btn", x, lb.dequantize(w), precision="highest")
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_einsum():
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  w = lb.quantize(jax.random.normal(jax.random.key(1), (64, 8)), "mxfp4", axis=0)
  wd = lb.dequantize(w)
  # float32 dots on a GPU default to reduced precision on both sides: compare loosely.
  tol = dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(lb.einsum("btd,df->btf", x, w), jnp.einsum("btd,df->btf", x, wd), **tol)
  np.testing.assert_allclose(lb.einsum("btd,df->fbt", x, w), jnp.einsum("btd,df->fbt", x, wd), **tol)
  # Batch dimensions on both sides.
  wb = lb.quantize(jax.random.normal(jax.random.key(2), (2, 64, 8)), "mxfp4", axis=1)
  np.testing.assert_allclose(lb.einsum("btd,bdf->btf", x, wb),
                             jnp.einsum("btd,bdf->btf", x, lb.dequantize(wb)), **tol)


def test_plain_arrays_pass_through():
  a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
  np.testing.assert_array_equal(lb.dot_general(a, b, (((1,), (0,)), ((), ()))), a @ b)


# ---- bad input ----

def test_contraction_sizes_disagree():
  w = lb.quantize(jnp.ones((64, 8)), "mxfp4", axis=0)
  with pytest.raises(ValueError, match="size 32 but rhs dimension 0 has size 64"):
    lb.matmul(jnp.ones((2, 32), jnp.bfloat16), w)


def test_blocked_along_non_contraction_axis():
  w = lb.quantize(jnp.ones((64, 64)), "mxfp4", axis=1)
  with pytest.raises(ValueError, match="blocked along axis 1, which is not a contracting"):
    lb.matmul(jnp.ones((2, 64), jnp.bfloat16), w)


def test_unsupported_dtypes_and_backends():
  w = lb.quantize(jnp.ones((64, 8)), "mxfp4", axis=0)
  with pytest.raises(TypeError, match="lhs must be a floating array"):
    lb.matmul(jnp.ones((2, 64), jnp.int8), w)
  with pytest.raises(ValueError, match="bfloat16/float16 activations"):
    lb.matmul(jnp.ones((2, 64), jnp.float32), w, backend="interpret")
  with pytest.raises(ValueError, match="backend must be one of"):
    lb.matmul(jnp.ones((2, 64), jnp.bfloat16), w, backend="cuda")
  if not gpu_available():
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      lb.matmul(jnp.ones((2, 64), jnp.bfloat16), w, backend="pallas")


def test_einsum_errors():
  w = lb.quantize(jnp.ones((64, 8)), "mxfp4", axis=0)
  with pytest.raises(ValueError, match="explicit"):
    lb.einsum("bd,df", jnp.ones((2, 64)), w)
  with pytest.raises(ValueError, match="rank"):
    lb.einsum("btd,df->btf", jnp.ones((2, 64)), w)
