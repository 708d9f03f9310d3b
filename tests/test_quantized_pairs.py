"""Matmuls with both operands quantized, on-the-fly activation quantization, and the straight-through VJP.

References are computed in float64 from the dequantized operands (the OCP dot: exact products, one sum); the
library accumulates in float32, so results agree within float32 accumulation error.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import dispatch
import pallas_kernels.backend

PAIRS = [("mxfp8_e4m3", "mxfp8_e4m3"), ("mxfp8_e5m2", "mxfp8_e4m3"), ("mxfp8_e4m3", "mxfp4"), ("mxint8", "mxint8"),
         ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4"), ("int8_channel_sym", "int8_channel_sym"),
         ("fp8_block_1x128", "fp8_block_128x128"), ("mxfp8_e4m3", "int4_g32_asym"), ("nvfp4", "mxfp4")]
SHAPES = [(5, 96, 40), (33, 200, 17)]  # (M, K, N); K = 200 is ragged for every block size
DN = (((1,), (0,)), ((), ()))
# The block-FP8 tests force the Triton kernel where jax_triton is installed on a GPU, else its XLA twin (the Mosaic
# GPU kernel, which dispatch takes on Hopper, has its own test below).
FP8_KERNEL = ("jax_triton" if jax.default_backend() == "gpu" and pallas_kernels.backend.jax_triton_available()
              else "interpret")


def operands(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)) * np.exp2(rng.integers(-6, 6, (m, 1)))
  w = rng.standard_normal((k, n)) * np.exp2(rng.integers(-6, 6, (1, n)))
  return jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), jnp.asarray(w, jnp.float32)


def quantized(x, w, fa, fw):
  # 2-D weight blocks (128 x 128) cover both axes of w; the others block w along K.
  return lb.quantize(x, fa, axis=1), lb.quantize(w, fw, axis=1 if fw.endswith("128x128") else 0)


def ocp_dot(qa, qw, k_major=False):
  """(the float64 product of the dequantized operands, that of their magnitudes); `k_major`: qw is (N, K)."""
  a = np.asarray(lb.dequantize(qa, jnp.float32), np.float64)
  b = np.asarray(lb.dequantize(qw, jnp.float32), np.float64)
  b = b.T if k_major else b
  return a @ b, np.abs(a) @ np.abs(b)


@pytest.mark.parametrize("fa, fw", PAIRS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_pairs_match_the_ocp_dot(fa, fw, shape):
  x, w = operands(*shape)
  qa, qw = quantized(x, w, fa, fw)
  y = lb.dot_general(qa, qw, DN, preferred_element_type=jnp.float32)
  ref, mag = ocp_dot(qa, qw)
  assert y.shape == ref.shape and y.dtype == jnp.float32
  # the block-FP8 kernels' MMAs accumulate each 128-deep block in the tensor cores' format (see below)
  tol = 2.0 ** -10 if fa.startswith("fp8_block") and jax.default_backend() == "gpu" else shape[1] * 2.0 ** -23
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), tol * mag + 1e-30)
  assert lb.matmul(qa, qw).dtype == jnp.bfloat16  # lhs's logical dtype by default


@pytest.mark.parametrize("m, k_major, fw, streams", [(300, False, "mxfp4", False), (300, True, "mxfp4", True),
                                                     (4096, True, "mxfp4", False), (2048, True, "mxfp8_e4m3", True)])
def test_mx_pairs_stream_the_weight_below_the_rows_that_dequantize_it(monkeypatch, m, k_major, fw, streams):
  """An MX activation dequantized exactly to bfloat16 times the weight through the weight-only path, below the rows
  from which the pair dequantizes the weight: 256 for (K, N) weights, 4096 for K-major ones (the Mosaic kernel);
  the same OCP dot either way, rounded once to the output dtype."""
  seen, choose = [], dispatch.choose

  def recorded(backend, lhs, *args, **kwargs):
    seen.append(isinstance(lhs, lb.QArray))
    return choose(backend, lhs, *args, **kwargs)

  monkeypatch.setattr(dispatch, "choose", recorded)
  x, w = operands(m, 64, 64)
  qa = lb.quantize(x, "mxfp8_e4m3", axis=1)
  qw = lb.quantize(w.T, fw, axis=1) if k_major else lb.quantize(w, fw, axis=0)
  dn = (((1,), (1 if k_major else 0,)), ((), ()))
  y = lb.dot_general(qa, qw, dn, preferred_element_type=jnp.float32)
  assert seen == [not streams]  # (the call dispatched: a float lhs if the activation was dequantized first)
  ref, mag = ocp_dot(qa, qw, k_major)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 64 * 2.0 ** -23 * mag + 1e-30)
  np.testing.assert_array_equal(lb.dot_general(qa, qw, dn), y.astype(jnp.bfloat16))


def test_int8_pair_is_an_exact_int32_dot():
  """A8W8 (per-token x per-channel int8): the int32 sum of code products, scaled once in float32."""
  x, w = operands(9, 300, 24, seed=1)
  qa, qw = quantized(x, w, "int8_channel_sym", "int8_channel_sym")
  y = lb.dot_general(qa, qw, DN, preferred_element_type=jnp.float32)
  acc = (np.asarray(qa.data, np.int64) @ np.asarray(qw.data, np.int64)).astype(np.float32)
  want = acc * np.asarray(qa.scale, np.float32) * np.asarray(qw.scale, np.float32)
  np.testing.assert_array_equal(np.asarray(y), want)


@pytest.mark.parametrize("act", ["mxfp8_e4m3", "mxint8", "nvfp4", "int8_channel_sym"])
def test_act_format_quantizes_inside_the_call(act):
  x, w = operands(7, 128, 24, seed=2)
  qw = lb.quantize(w, "mxfp4", axis=0)
  y = jax.jit(lambda x, qw: lb.dot_general(x, qw, DN, act_format=act))(x, qw)
  want = lb.dot_general(lb.quantize(x, act, axis=1), qw, DN)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_act_format_gradient_is_straight_through():
  x, w = operands(6, 64, 16, seed=3)
  x = x.astype(jnp.float32)
  qw = lb.quantize(w, "mxfp8_e4m3", axis=0)
  c = jax.random.normal(jax.random.key(0), (6, 16))
  loss = lambda x: jnp.sum(lb.dot_general(x, qw, DN, act_format="mxfp8_e4m3") * c)
  dx = jax.grad(loss)(x)
  np.testing.assert_allclose(dx, c @ lb.dequantize(qw, jnp.float32).T, rtol=1e-6, atol=1e-6)
  # gradients quantized to MXFP8 E5M2 before the backward product
  loss_q = lambda x: jnp.sum(lb.dot_general(x, qw, DN, act_format="mxfp8_e4m3", grad_format="mxfp8_e5m2") * c)
  cq = lb.dequantize(lb.quantize(c, "mxfp8_e5m2", axis=-1), jnp.float32)
  np.testing.assert_allclose(jax.grad(loss_q)(x), cq @ lb.dequantize(qw, jnp.float32).T, rtol=1e-6, atol=1e-6)
  assert not np.allclose(cq, c)  # the E5M2 rounding is visible, so the check above can fail


def test_act_format_with_a_float_weight_differentiates_both():
  x, w = operands(4, 64, 8, seed=4)
  x = x.astype(jnp.float32)
  c = jax.random.normal(jax.random.key(1), (4, 8))
  dx, dw = jax.grad(lambda x, w: jnp.sum(lb.dot_general(x, w, DN, act_format="mxfp4") * c), (0, 1))(x, w)
  xq = lb.dequantize(lb.quantize(x, "mxfp4", axis=1), jnp.float32)
  np.testing.assert_allclose(dx, c @ w.T, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dw, xq.T @ c, rtol=1e-6, atol=1e-6)


def test_errors():
  x, w = operands(4, 64, 8)
  qa, qw = quantized(x, w, "mxfp8_e4m3", "mxfp8_e4m3")
  with pytest.raises(ValueError, match="already a QArray"):
    lb.dot_general(qa, qw, DN, act_format="mxfp8_e4m3")
  with pytest.raises(ValueError, match="grad_format applies with act_format"):
    lb.dot_general(x, qw, DN, grad_format="mxfp8_e5m2")
  with pytest.raises(ValueError, match="Unknown format"):
    lb.dot_general(x, qw, DN, act_format="fp7")
  with pytest.raises(ValueError, match="not a contracting dimension"):
    lb.dot_general(qa, lb.quantize(w, "mxfp8_e4m3", axis=1), DN)


KERNEL = "pallas" if jax.default_backend() == "gpu" else "interpret"


@pytest.mark.parametrize("k_major", [False, True])
@pytest.mark.parametrize("shape", [(5, 100, 40), (130, 96, 300)])
def test_int8_kernel_matches_the_xla_path(k_major, shape):
  """The Pallas A8W8 kernel (int32 MMA, scales in the epilogue) stores exactly the XLA path's values, for (K, N)
  weights and K-major (N, K) ones, on ragged shapes (tiles overhang M, N and K)."""
  m, k, n = shape
  x, w = operands(m, k, n, seed=5)
  qa = lb.quantize(x, "int8_channel_sym", axis=1)
  if k_major:
    qw, dn = lb.quantize(w.T, "int8_channel_sym", axis=1), (((1,), (1,)), ((), ()))
  else:
    qw, dn = lb.quantize(w, "int8_channel_sym", axis=0), DN
  for dtype in (jnp.float32, jnp.bfloat16):
    y = lb.dot_general(qa, qw, dn, preferred_element_type=dtype, backend=KERNEL)
    want = lb.dot_general(qa, qw, dn, preferred_element_type=dtype, backend="xla")
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_pairs_without_a_kernel_refuse_a_forced_kernel():
  x, w = operands(4, 64, 8)
  qa, qw = quantized(x, w, "mxfp8_e4m3", "mxfp8_e4m3")
  with pytest.raises(ValueError, match="kernels for int8 per-token x per-channel and block-FP8"):
    lb.dot_general(qa, qw, DN, backend="interpret")
  qa, qw = quantized(x, w, "fp8_block_1x128", "fp8_block_128x128")
  with pytest.raises(ValueError, match="its kernel is a '(jax_triton|mosaic)' kernel"):
    lb.dot_general(qa, qw, DN, backend="pallas")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      lb.dot_general(qa, qw, DN, backend="jax_triton")


@pytest.mark.parametrize("k_major", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 200, 40), (1, 130, 384, 300)])
def test_block_fp8_kernel_matches_the_ocp_dot(k_major, shape):
  """Block FP8 (1x128 activations x 128x128 weights): every 128-deep block's partial product times its two
  scales, summed in float32. On a GPU with jax_triton this is the Triton kernel, whose FP8 MMAs accumulate a
  block in the tensor cores' own format (about 2^-13 relative per block, hence the looser bound); elsewhere it is
  the kernel's XLA twin (float32 sums). Ragged M, N and K (tiles overhang all three), leading batch dimensions,
  both weight layouts."""
  b, m, k, n = shape
  x, w = operands(b * m, k, n, seed=6)
  qa = lb.quantize(x.reshape(b, m, k), "fp8_block_1x128", axis=-1)
  qw, dn = ((lb.quantize(w.T, "fp8_block_128x128"), (((2,), (1,)), ((), ()))) if k_major
            else (lb.quantize(w, "fp8_block_128x128"), (((2,), (0,)), ((), ()))))
  y = lb.dot_general(qa, qw, dn, preferred_element_type=jnp.float32, backend=FP8_KERNEL)
  ref, mag = (v.reshape(b * m, n) for v in ocp_dot(qa, qw, k_major))
  tol = 2.0 ** -10 if FP8_KERNEL == "jax_triton" else k * 2.0 ** -23
  assert y.shape == (b, m, n)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64).reshape(b * m, n) - ref), tol * mag + 1e-30)
  yb = lb.dot_general(qa, qw, dn, backend=FP8_KERNEL)  # bfloat16 out: the float32 result rounded once
  np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(y.astype(jnp.bfloat16), np.float32))


def test_block_fp8_mosaic_default_config():
  """Three warpgroups with column pairs sharing the activation tile from 1536 rows (where measured), two below;
  the interpreter always gets a configuration it runs."""
  from pallas_kernels.scaled_matmul_mosaic import default_config
  assert default_config(1536, 8192) == (3, (1, 2))
  assert default_config(8192, 8320) == (3, (1, 1))  # 65 column tiles: no pairs
  assert default_config(1535, 8192) == (2, (1, 1))
  assert default_config(8192, 8192, "mosaic_interpret") == (2, (1, 1))


@pytest.mark.parametrize("m, k, n, wgs, cluster", [
    (5, 256, 128, 2, (1, 1)), (130, 384, 100, 3, (1, 1)),
    *[pytest.param(*case, marks=pytest.mark.skipif(
        not pallas_kernels.backend.hopper_available(),
        reason="12 s each in the interpreter; the 5- and 130-row cases cover their paths there"))
      for case in [(130, 384, 100, 2, (1, 1)), (200, 384, 128, 3, (1, 1)), (250, 512, 128, 3, (1, 1))]],
    (5, 256, 256, 2, (2, 2)), (300, 1024, 256, 3, (2, 1)), (130, 640, 256, 3, (1, 2))])
def test_block_fp8_mosaic_kernel_matches_the_ocp_dot(m, k, n, wgs, cluster):
  """The Mosaic GPU block-FP8 kernel (K-major weights): on Hopper the kernel itself, whose FP8 MMAs accumulate a
  block in the tensor cores' format; elsewhere the Mosaic GPU interpreter (float32 sums). Ragged M (a row tile
  overhangs the array, and M < 8 reads past it), N padded to whole tiles, K over more blocks than stages, two and
  three compute warpgroups, clusters of tiles sharing operands by multicast (on Hopper only: the interpreter runs
  no cluster barriers); float32 and bfloat16 outputs."""
  from pallas_kernels import scaled_matmul_mosaic
  from pallas_kernels.backend import hopper_available
  mosaic = "mosaic" if hopper_available() else "mosaic_interpret"
  if cluster != (1, 1) and mosaic == "mosaic_interpret":
    pytest.skip("the Mosaic GPU interpreter runs no cluster barriers")
  x, w = operands(m, k, n, seed=7)
  qa, qw = lb.quantize(x, "fp8_block_1x128", axis=1), lb.quantize(w.T, "fp8_block_128x128")
  call = lambda dtype: scaled_matmul_mosaic.fp8_block_matmul(
      qa.data, qa.scale, qw.data, qw.scale, out_dtype=dtype, backend=mosaic, stages=2, wgs=wgs,
      cluster=cluster)[:, :n]
  y = np.asarray(call(jnp.float32), np.float64)
  ref, mag = ocp_dot(qa, qw, k_major=True)
  tol = 2.0 ** -10 if mosaic == "mosaic" else k * 2.0 ** -23
  assert y.shape == (m, n)
  np.testing.assert_array_less(np.abs(y - ref), tol * mag + 1e-30)
  yb = call(jnp.bfloat16)  # the float32 result rounded once
  np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(y.astype(np.float32).astype(jnp.bfloat16),
                                                                       np.float32))


@pytest.mark.parametrize("fa, fw, m, k, n", [  # (2048 rows: persistent programs)
    ("fp8_block_1x128", "fp8_block_128x128", 130, 4224, 256),
    ("fp8_block_1x128", "fp8_block_128x128", 2048, 1024, 8192),
    ("mxfp8_e4m3", "mxfp8_e4m3", 2048, 1024, 8192), ("mxint8", "mxint8", 130, 512, 256)])
def test_scaled_mosaic_gpu_code_lowers_on_any_machine(fa, fw, m, k, n, cuda_lowering, monkeypatch):
  """The GPU-only code (the scales' loads in the wgmma layouts, clusters, persistent programs, int8 MMAs) lowered
  for CUDA on any machine, which catches its Python-side errors where no GPU runs it; its pipeline step ends in the
  warpgroup barrier that keeps a stage's scales until every warp has read them (the GPU test below)."""
  from pallas_kernels import scaled_matmul_mosaic
  barriers = []
  barrier = pallas_kernels.backend.warpgroup_barrier
  monkeypatch.setattr(pallas_kernels.backend, "warpgroup_barrier", lambda: barriers.append(barrier()))
  x, w = operands(m, k, n)
  mx = fa.startswith("mx")  # (MX weights blocked along K; block FP8's 128 x 128 blocks cover both axes)
  qa, qw = lb.quantize(x, fa, axis=1), (lb.quantize(w.T, fw, axis=1) if mx else lb.quantize(w.T, fw))
  call = scaled_matmul_mosaic.mx_matmul if mx else scaled_matmul_mosaic.fp8_block_matmul
  f = lambda a, sa, b, sb: call(a, sa, b, sb, out_dtype=jnp.bfloat16, backend="mosaic")
  assert "mosaic_gpu" in cuda_lowering(f, qa.data, qa.scale, qw.data, qw.scale)
  assert barriers


@pytest.mark.parametrize("fmt, shape", [  # shape: (batch, M, K, N)
    ("mxfp8_e4m3", (2, 20, 256, 128)), ("mxfp8_e5m2", (1, 5, 256, 128)), ("mxint8", (2, 20, 256, 128))])
def test_mx_mma_kernel_matches_the_ocp_dot(fmt, shape):
  """MX 8-bit pairs on the Mosaic kernel's FP8 / int8 MMAs, promoted per 32-deep block (run when forced: `auto`
  takes the exact bfloat16 route, faster on the H100). On Hopper the kernel itself: int8 MMAs sum a block exactly,
  FP8 ones in the tensor cores' format (2^-15.6 to 2^-16.8 of the magnitudes on the H100, hence the looser bound);
  elsewhere the Mosaic GPU interpreter (float32 sums). Ragged M, leading batch dimensions, both FP8 elements;
  bfloat16 output is the float32 result rounded once."""
  backend = "mosaic" if pallas_kernels.backend.hopper_available() else "interpret"
  b, m, k, n = shape
  x, w = operands(b * m, k, n, seed=8)
  qa, qw = lb.quantize(x.reshape(b, m, k), fmt, axis=-1), lb.quantize(w.T, fmt, axis=1)
  dn = (((2,), (1,)), ((), ()))
  y = lb.dot_general(qa, qw, dn, preferred_element_type=jnp.float32, backend=backend)
  ref, mag = (v.reshape(b * m, n) for v in ocp_dot(qa, qw, k_major=True))
  tol = 2.0 ** -10 if backend == "mosaic" and fmt != "mxint8" else k * 2.0 ** -23
  assert y.shape == (b, m, n)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64).reshape(b * m, n) - ref), tol * mag + 1e-30)
  yb = lb.dot_general(qa, qw, dn, backend=backend)
  np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(y.astype(jnp.bfloat16), np.float32))


def test_mx_pairs_take_the_mma_kernel_only_when_forced(monkeypatch):
  """`auto` runs MX 8-bit pairs by the exact bfloat16 route, with no warning (it is the faster path, not a
  fallback); the MMA kernel takes one element type, K-major weights and K, N multiples of 128."""
  x, w = operands(4, 256, 128)
  qa, qw = lb.quantize(x, "mxint8", axis=1), lb.quantize(w.T, "mxint8", axis=1)
  kdn = (((1,), (1,)), ((), ()))
  assert dispatch.pair_kernel(qa, qw, kdn, 8192) == ("xla", None)
  assert dispatch.pair_kernel(qa, qw, kdn, 8192, forced="mosaic") == ("mosaic", None)
  mixed = lb.quantize(x, "mxfp8_e5m2", axis=1), lb.quantize(w.T, "mxfp8_e4m3", axis=1)
  short = lb.quantize(x[:, :96], "mxint8", axis=1), lb.quantize(w.T[:, :96], "mxint8", axis=1)
  for (a, b), why in [(mixed, "one element type"), (short, "K and N multiples of 128")]:
    kernel, reason = dispatch.pair_kernel(a, b, kdn, 8192)
    assert kernel is None and why in reason
  monkeypatch.setattr(pallas_kernels.backend, "on_gpu", lambda x: True)
  monkeypatch.setattr(pallas_kernels.backend, "hopper_available", lambda: True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert dispatch.choose("auto", qa, qw, kdn, 8192) == "xla"


def test_block_fp8_mosaic_default_programs():
  """Persistent programs (one per SM's worth of clusters) where each gets two tiles or more and the stages divide
  the K blocks; else one program per tile, and always in the interpreter (which hangs in a pipeline of pipelines)."""
  from pallas_kernels.scaled_matmul_mosaic import default_programs, fp8_block_matmul
  assert default_programs(1376, 64, 4, (1, 2), "mosaic") == 66  # M = 8192, N = K = 8192: 21 tiles each
  assert default_programs(1024, 64, 4, (1, 1), "mosaic") == 132
  assert default_programs(4816, 64, 4, (1, 2), "mosaic") == 66  # M = 8192, N = 28672: 73 tiles each
  assert default_programs(131, 64, 4, (1, 1), "mosaic") == 131  # fewer than two tiles each
  assert default_programs(1024, 63, 4, (1, 1), "mosaic") == 1024  # stages do not divide the steps
  assert default_programs(1024, 64, 4, (1, 1), "mosaic_interpret") == 1024
  x, w = operands(256, 256, 512)
  qa, qw = lb.quantize(x, "fp8_block_1x128", axis=1), lb.quantize(w.T, "fp8_block_128x128")
  with pytest.raises(ValueError, match="programs=3 must be"):
    fp8_block_matmul(qa.data, qa.scale, qw.data, qw.scale, out_dtype=jnp.float32, backend="mosaic", programs=3)
  with pytest.raises(ValueError, match="need backend='mosaic'"):
    fp8_block_matmul(qa.data, qa.scale, qw.data, qw.scale, out_dtype=jnp.float32, backend="mosaic_interpret",
                     programs=2)


@pytest.mark.skipif(not pallas_kernels.backend.hopper_available(),
                    reason="persistent programs run on Hopper only (the interpreter hangs in a pipeline of pipelines)")
@pytest.mark.parametrize("m, k, n, wgs, cluster, programs", [
    (1000, 512, 8192, 2, (1, 1), 73), (1000, 512, 8192, 2, (1, 1), 256), (700, 1024, 4096, 3, (1, 2), 21),
    (1500, 1024, 2048, 2, (2, 1), 16)])
def test_block_fp8_mosaic_persistent_programs(m, k, n, wgs, cluster, programs):
  """Persistent programs, each running every `programs`-th tile as one pipeline (tiles per program uneven, ragged
  M, clusters): the OCP dot, and bit for bit what one program per tile computes."""
  from pallas_kernels import scaled_matmul_mosaic
  x, w = operands(m, k, n, seed=3)
  qa, qw = lb.quantize(x, "fp8_block_1x128", axis=1), lb.quantize(w.T, "fp8_block_128x128")
  call = lambda p: np.asarray(scaled_matmul_mosaic.fp8_block_matmul(
      qa.data, qa.scale, qw.data, qw.scale, out_dtype=jnp.float32, backend="mosaic", stages=2, wgs=wgs,
      cluster=cluster, programs=p), np.float64)[:m, :n]
  y = call(programs)
  ref, mag = ocp_dot(qa, qw, k_major=True)
  np.testing.assert_array_less(np.abs(y - ref), 2.0 ** -10 * mag + 1e-30)
  np.testing.assert_array_equal(y, call(scaled_matmul_mosaic.tile_count(m, n, wgs, cluster)))


@pytest.mark.skipif(not pallas_kernels.backend.hopper_available(),
                    reason="clusters and persistent programs run on Hopper only")
@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxint8"])
def test_scaled_mosaic_stages_are_released_after_every_warp_reads_them(fmt):
  """Pallas releases a pipeline stage from one thread of each compute warpgroup; the kernel's last promotion reads
  the stage's scales in every warp, so it synchronizes the warpgroup first. Without that, MX pairs on three
  warpgroups or in clusters returned 16-row groups wrong, different from run to run (H100, BENCHMARKS.md). Each
  configuration three times: the OCP dot, and bit for bit two warpgroups, no cluster, one program per tile."""
  from pallas_kernels import scaled_matmul_mosaic
  m, k, n = 2048, 1024, 4096
  x, w = operands(m, k, n, seed=2)
  qa, qw = lb.quantize(x, fmt, axis=1), lb.quantize(w.T, fmt, axis=1)
  call = lambda wgs, cluster, programs=None: np.asarray(scaled_matmul_mosaic.mx_matmul(
      qa.data, qa.scale, qw.data, qw.scale, out_dtype=jnp.float32, backend="mosaic", wgs=wgs, cluster=cluster,
      programs=programs), np.float64)
  base = call(2, (1, 1), scaled_matmul_mosaic.tile_count(m, n, 2, (1, 1)))
  ref, mag = ocp_dot(qa, qw, k_major=True)
  np.testing.assert_array_less(np.abs(base - ref), 2.0 ** -10 * mag + 1e-30)
  for wgs, cluster, programs in [(3, (1, 2), None), (3, (1, 2), scaled_matmul_mosaic.tile_count(m, n, 3, (1, 2))),
                                 (3, (2, 1), None), (2, (1, 2), None)]:
    for _ in range(3):
      np.testing.assert_array_equal(call(wgs, cluster, programs), base, err_msg=f"{wgs} wgs, cluster {cluster}")


@pytest.mark.parametrize("hopper, triton, m, want", [
    (True, True, 2048, "mosaic"), (True, True, 8192, "mosaic"), (True, True, 65, "mosaic"),
    (True, True, 64, "jax_triton"), (True, False, 16, "mosaic"), (False, True, 8192, "jax_triton"),
    (False, False, 2048, "jax_triton")])
def test_block_fp8_pairs_choose_their_kernel_by_gpu_and_rows(monkeypatch, hopper, triton, m, want):
  """On Hopper the Mosaic kernel from BLOCK_FP8_MOSAIC_FROM_M rows (and below it without jax_triton), else the
  Triton kernel, at any M (no weight-only row limit sends a pair to XLA); a GPU without jax_triton or Hopper has no
  kernel (choose warns, runs XLA)."""
  from lowbit_jax import dispatch
  monkeypatch.setattr(pallas_kernels.backend, "hopper_available", lambda: hopper)
  monkeypatch.setattr(pallas_kernels.backend, "jax_triton_available", lambda: triton)
  x, w = operands(4, 256, 128)
  qa, qw = quantized(x, w, "fp8_block_1x128", "fp8_block_128x128")
  assert dispatch.pair_kernel(qa, qw, DN, m) == (want, None)
  monkeypatch.setattr(pallas_kernels.backend, "on_gpu", lambda x: True)
  runs = want if (hopper if want == "mosaic" else triton) else "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert dispatch.choose("auto", qa, qw, DN, m) == runs


def test_only_block_fp8_pairs_take_either_fp8_kernel():
  """Forcing the other block-FP8 kernel is a choice between two kernels of that pair only: a K-major weight-only
  call (a Mosaic kernel's) refuses backend="jax_triton" rather than run something else."""
  x, w = operands(4, 256, 128)
  qw = lb.quantize(w.T, "int4_g128_sym", axis=1)
  with pytest.raises(ValueError, match="its kernel is a 'mosaic' kernel"):
    lb.dot_general(x, qw, (((1,), (1,)), ((), ())), backend="jax_triton")
