"""Calibrated quantization: HQQ for asymmetric integers and per-block scale search for MX / NVFP4.

The objectives are recomputed here in float64 from the stored bits (through tests/reference.py's unpacking), and
every block is checked against the default round-to-nearest result: never worse on the objective the method
optimises. Stored bits of scale-searched blocks must be exactly the reference rounding under the chosen scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit_jax as lb
from reference import E4M3, ELEMENTS, FORMATS, mx_exponent, unpack_codes

F32 = np.float32
MX_FORMATS = ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8"]
HQQ_FORMATS = ["int4_g32_asym", "int3_g64_asym", "int2_g32_asym"]


def weights(seed, shape=(96, 256), outliers=True):
  """Gaussian weights of a few magnitudes with a heavy tail, as trained layers have."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape) * 2.0 ** rng.integers(-8, 0, (shape[0], 1))
  if outliers:
    w += rng.standard_t(2, shape) * 0.01 * (rng.random(shape) < 0.02)
  return w.astype(F32)


def blocks(a, n):
  """(rows, cols) -> (rows, cols / n, n): blocks along the last axis."""
  return np.asarray(a, np.float64).reshape(a.shape[0], -1, n)


def lp_error(x, v, n, p):
  return np.sum(np.abs(blocks(x, n) - blocks(v, n)) ** p, axis=-1)


def dequantized(q):
  return np.asarray(lb.dequantize(q, jnp.float32))


# ---------------------------------------------------------------------------------------------------------------
# HQQ
@settings(max_examples=6, deadline=None)  # (each example compiles anew: about 1.8 s on a CPU)
@given(seed=st.integers(0, 2 ** 16), fmt=st.sampled_from(HQQ_FORMATS), p=st.sampled_from([0.5, 0.7, 1.0]),
       optimize_scale=st.booleans(), outliers=st.booleans())
def test_hqq_never_worse_than_rtn(seed, fmt, p, optimize_scale, outliers):
  """Per group, the lp error of the HQQ result (as stored) is at most that of round-to-nearest."""
  x = weights(seed, (24, 128), outliers)
  n = FORMATS[fmt]["block"][0]
  rtn = lp_error(x, dequantized(lb.quantize(x, fmt)), n, p)
  q = lb.quantize(x, fmt, calibrate=lb.HQQ(iters=8, p=p, optimize_scale=optimize_scale))
  hqq = lp_error(x, dequantized(q), n, p)
  assert np.all(hqq <= rtn * (1 + 1e-5) + 1e-30), np.max(hqq - rtn)


@pytest.mark.parametrize("fmt", HQQ_FORMATS)
@pytest.mark.parametrize("optimize_scale", [False, True])
def test_hqq_improves_and_stores_a_standard_qarray(fmt, optimize_scale):
  """On heavy-tailed weights HQQ lowers the layer's total lp error; its codes are valid codes of the format
  (the reference unpacks them), and dequantizing them as s * (q - z) gives lb.dequantize."""
  x = weights(1)
  cfg = lb.HQQ(optimize_scale=optimize_scale)
  n, bits = FORMATS[fmt]["block"][0], FORMATS[fmt]["bits"]
  rtn = lp_error(x, dequantized(lb.quantize(x, fmt)), n, cfg.p).sum()
  q = lb.quantize(x, fmt, calibrate=cfg)
  assert q.format == lb.get_format(fmt) and q.data.dtype == jnp.uint8 and q.zero_point.dtype == jnp.bfloat16
  assert lp_error(x, dequantized(q), n, cfg.p).sum() < 0.97 * rtn
  codes = unpack_codes(np.asarray(q.data), FORMATS[fmt]["element"], axis=-1, asym=True)
  assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
  s = np.repeat(np.asarray(q.scale).astype(F32), n, axis=-1)
  z = np.repeat(np.asarray(q.zero_point).astype(F32), n, axis=-1)
  np.testing.assert_array_equal(s * (codes.astype(F32) - z), dequantized(q))


def test_hqq_keeps_special_blocks():
  """All-zero and NaN groups are stored as round-to-nearest stores them."""
  x = weights(2, (8, 128))
  x[0, :32] = 0.0
  x[1, 40] = np.nan
  rtn, q = lb.quantize(x, "int4_g32_asym"), lb.quantize(x, "int4_g32_asym", calibrate="hqq")
  for name in ("data", "scale", "zero_point"):
    a, b = (np.asarray(getattr(r, name)).view(np.uint8).reshape(8, 4, -1) for r in (q, rtn))
    np.testing.assert_array_equal(a[[0, 1], [0, 1]], b[[0, 1], [0, 1]])


def test_hqq_under_jit_and_in_matmul():
  x = weights(3, (128, 64))
  q = jax.jit(lambda w: lb.quantize(w, "int4_g64_asym", axis=0, calibrate="hqq"))(x)
  ref = lb.quantize(x, "int4_g64_asym", axis=0, calibrate="hqq")
  np.testing.assert_array_equal(np.asarray(q.zero_point).view(np.uint16), np.asarray(ref.zero_point).view(np.uint16))
  a = jax.random.normal(jax.random.key(0), (5, 128), jnp.float32).astype(jnp.bfloat16)
  want = jnp.dot(a.astype(jnp.float32), lb.dequantize(q, jnp.float32), precision="highest")
  for backend in ("xla", "interpret"):  # the weight-only kernel takes real-valued zero points
    y = lb.matmul(a, q, backend=backend).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(y - want))) <= 4 * 2.0 ** -8 * float(jnp.max(jnp.abs(want)))
  q3 = lb.quantize(x, "int3_g64_asym", axis=0, calibrate="hqq")
  assert lb.matmul(a, q3).shape == (5, 64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=0.0), "p must be"), (dict(p=1.5), "p must be"), (dict(iters=0), "iters"), (dict(beta=0.0), "beta"),
    (dict(kappa=0.5), "kappa")])
def test_hqq_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lb.HQQ(**kwargs)


def test_calibrate_bad_calls():
  x = jnp.ones((4, 64))
  with pytest.raises(ValueError, match="asymmetric integer formats.*'mxfp4'"):
    lb.quantize(x, "mxfp4", calibrate="hqq")
  with pytest.raises(ValueError, match="asymmetric integer formats.*'int4_g32_sym'"):
    lb.quantize(x, "int4_g32_sym", calibrate=lb.HQQ())
  with pytest.raises(ValueError, match="MX and NVFP4 formats.*'int4_g32_asym'"):
    lb.quantize(x, "int4_g32_asym", calibrate="mse")
  with pytest.raises(ValueError, match="calibrate must be"):
    lb.quantize(x, "mxfp4", calibrate="gptq")
  with pytest.raises(ValueError, match="rounding='nearest'"):
    lb.quantize(x, "mxfp4", calibrate="mse", rounding="stochastic", key=jax.random.key(0))
  with pytest.raises(ValueError, match="leave scale_mode unset"):
    lb.quantize(x, "mxfp4", calibrate="mse", scale_mode="rceil")


# ---------------------------------------------------------------------------------------------------------------
# scale search
def _metric(d, metric):
  return np.sum(d * d if metric == "mse" else np.abs(d), axis=-1)


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_mx_search(fmt, metric):
  """Each block's exponent is floor - 1, floor or floor + 1; its codes are the reference rounding of x / 2^e; its
  error is the smallest of the three candidates (float64, up to float32 summation) and never above floor's."""
  x = weights(4, (32, 256))
  x[0, :32] = np.linspace(-1, 1, 32) * 7.9  # saturates under the floor scale: e + 1 wins
  el = ELEMENTS[FORMATS[fmt]["element"]]
  q = lb.quantize(x, fmt, calibrate=metric)
  e = blocks(np.asarray(q.scale).view(np.uint8), 1)[..., 0].astype(np.int64) - 127
  xb = blocks(x, 32)
  floor = np.vectorize(lambda a: mx_exponent(a, "floor", el))(np.max(np.abs(xb), axis=-1))
  assert np.all(np.abs(e - floor) <= 1)
  codes = blocks(unpack_codes(np.asarray(q.data), FORMATS[fmt]["element"], axis=-1), 32).astype(np.int64)
  np.testing.assert_array_equal(codes, el.nearest(np.ldexp(xb, -e[..., None])))
  errs = [_metric(xb - np.ldexp(el.value(el.nearest(np.ldexp(xb, -(floor + k)[..., None]))), (floor + k)[..., None]),
                  metric) for k in (-1, 0, 1)]
  got = _metric(xb - blocks(dequantized(q), 32), metric)
  assert np.all(got <= np.min(errs, axis=0) * (1 + 1e-5))
  assert np.all(got <= errs[1])
  assert np.sum(e != floor) > 0  # the search changes some blocks


def _nvfp4_candidate(xb, g, top):
  """Reference NVFP4 blocks with the block max mapped to `top` (REFERENCE's float32 operation order)."""
  el = ELEMENTS["float4_e2m1fn"]
  amax = np.max(np.abs(xb), axis=-1, keepdims=True).astype(F32)
  s = np.minimum(amax / F32(top) / g, F32(448)).astype(F32)
  s_b = E4M3.value(E4M3.nearest(s.astype(np.float64))).astype(F32)
  codes = np.where(s_b > 0, el.nearest((xb.astype(F32) / (s_b * g)).astype(np.float64)), 0)
  return codes, s_b, (el.value(codes).astype(F32) * s_b) * g


@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_nvfp4_search(metric):
  """Each block stores exactly one of the two reference candidates (max -> 6 or max -> 4), the better one."""
  x = weights(5, (16, 256))
  q = lb.quantize(x, "nvfp4", calibrate=metric)
  g = F32(q.tensor_scale)
  assert g == F32(lb.quantize(x, "nvfp4").tensor_scale)
  xb = blocks(x, 16).astype(F32)
  c6, s6, v6 = _nvfp4_candidate(xb, g, 6)
  c4, s4, v4 = _nvfp4_candidate(xb, g, 4)
  e6, e4 = _metric(xb - v6, metric), _metric(xb - v4, metric)
  s = np.asarray(q.scale).astype(F32)[..., None]
  codes = blocks(unpack_codes(np.asarray(q.data), "float4_e2m1fn", axis=-1), 16).astype(np.int64)
  pick4 = (s == s4) & (s != s6)
  np.testing.assert_array_equal(codes, np.where(pick4, c4, c6))
  assert np.all(np.where(pick4[..., 0], e4, e6) <= np.minimum(e4, e6) * (1 + 1e-5))
  assert pick4.any() and (~pick4).any()
