"""Property tests (hypothesis) for lowbit_jax quantization: laws that must hold whatever the exact bits are.

- round-trip error bound (half an element ulp times the block scale; saturated elements: amax - max * scale), and
  the scale law of each format written as inequalities;
- idempotence: quantize(dequantize(q)) == q, where it provably holds (see test_idempotence);
- sign symmetry of the symmetric formats;
- power-of-two equivariance: quantize(x * 2^k) has the same element codes, scales multiplied by 2^k;
- stochastic rounding: unbiased, and always one of the two neighbouring grid values.

Inputs stay clear of float32 subnormals (|x| >= 2^-60 or 0): XLA:CPU flushes them, which test_exact covers.
"""
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import lowbit_jax as lb
from reference import ELEMENTS, FORMATS, MX_MODES, grid_neighbours, unpack_codes
from test_exact import as_input, block_len, edge_blocks

F32 = np.float32
CASES = [(f, m) for f in FORMATS for m in (MX_MODES if FORMATS[f]["kind"] == "mx" else (None,))]
CASE_IDS = [f if m is None else f"{f}-{m}" for f, m in CASES]
# no shrinking: a failure message names the elements, and shrinking through jit calls can take minutes
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------------------------------
# inputs
def input_shape(fmt):
  """The shape of test_exact's edge-case array for fmt: quantizing at that shape reuses its compiled functions
  (each new shape, format and mode costs a compile of about half a second)."""
  return as_input(edge_blocks(fmt), fmt).shape


def embed(rows, fmt):
  """Generated rows (blocks along the last axis) placed in a zero array of input_shape(fmt); for 128x128 tiles a
  scaled copy also goes into the second tile."""
  x = np.zeros(input_shape(fmt), np.float32)
  n = rows.shape[1]
  x[:len(rows), :n] = rows
  if len(FORMATS[fmt]["block"] or ()) == 2:
    x[128:128 + len(rows), :n] = rows * F32(2.0 ** -7)
  else:
    x[len(rows):2 * len(rows), n:] = rows[:, :x.shape[1] - n] * F32(3.0)  # the ragged tail column
  return x


@st.composite
def inputs(draw, fmt, nrows=12):
  shape = (nrows, block_len(fmt))
  kind = draw(st.sampled_from(["hypothesis", "normal", "grid", "outliers"]))
  if kind == "hypothesis":  # hypothesis' own floats: boundaries, repeated values, mixed binades
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-2.0 ** 40, 2.0 ** 40, width=32, allow_subnormal=False)))
    x = x * F32(2.0 ** draw(st.integers(-20, 20)))
  else:
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    mags = 2.0 ** rng.uniform(-30, 30, (shape[0], -(-shape[1] // 16)))
    mags = np.repeat(mags, 16, axis=1)[:, :shape[1]]
    if kind == "normal":
      x = rng.standard_normal(shape) * mags
    elif kind == "grid":  # small multiples of 1/8: many exact ties
      x = rng.integers(-64, 65, shape) / 8.0 * 2.0 ** np.floor(np.log2(mags))
    else:
      x = rng.standard_normal(shape) * mags
      x[rng.random(shape) < 0.05] *= 2.0 ** 20
      x[rng.random(shape) < 0.2] = 0.0
  x = np.asarray(x, np.float32)
  x[np.abs(x) < 2.0 ** -60] = 0.0
  return embed(x, fmt)


# ----------------------------------------------------------------------------------------------------------------
# helpers: per-element scale and element ulp, from the stored bits
def fmt_info(fmt):
  f = FORMATS[fmt]
  return f["kind"], ELEMENTS[f["element"]]


def q_and_v(x, fmt, mode=None, **kw):
  q = lb.quantize(jnp.asarray(x), fmt, scale_mode=mode, **kw)
  return q, np.asarray(lb.dequantize(q, jnp.float32))


def block_reduce(x, fmt, fn):
  """fn over each block (blocked axes last; zero padding), in the scale's layout."""
  b = FORMATS[fmt]["block"]
  if b is None:
    return fn(x, axis=-1, keepdims=True)
  pad = [(0, 0)] * (x.ndim - len(b)) + [(0, -n % B) for n, B in zip(x.shape[-len(b):], b)]
  xp = np.pad(x, pad)
  if len(b) == 1:
    return fn(xp.reshape(xp.shape[:-1] + (-1, b[0])), axis=-1)
  r, c = xp.shape[-2:]
  return fn(xp.reshape(xp.shape[:-2] + (r // b[0], b[0], c // b[1], b[1])), axis=(-3, -1))


def expand(a, fmt, shape):
  """Per-block array (scale layout) -> per-element array of `shape`."""
  b = FORMATS[fmt]["block"]
  a = np.asarray(a)
  if b is None:
    return np.broadcast_to(a, shape)
  for ax, n in zip(range(len(shape) - len(b), len(shape)), b):
    a = np.repeat(a, n, axis=ax)
  return a[tuple(slice(0, n) for n in shape)]


def decoded_scale(q, fmt):
  """Per-block float64 scale as a kernel reads it (MX: 2^e; NVFP4: s_b * g in float32; others: s)."""
  kind, _ = fmt_info(fmt)
  s = np.asarray(q.scale)
  if kind == "mx":
    e = s.view(np.uint8).astype(np.float64)
    return np.where(e == 255, np.nan, 2.0 ** (e - 127))
  if kind == "nvfp4":
    return (s.astype(np.float32) * np.float32(q.tensor_scale)).astype(np.float64)
  return s.astype(np.float32).astype(np.float64)


def elem_ulp(t, el):
  """Spacing of the element grid at |t| (t in element units, at most the element max)."""
  if el.is_int:
    return np.full(np.shape(t), el.values[1])
  emin = math.log2(el.values[2 ** el.mbits])  # the first code with exponent field 1 is the min normal
  p = np.floor(np.log2(np.maximum(np.abs(t), 2.0 ** emin)))
  return 2.0 ** (p - el.mbits)


def elem_values(q, fmt, shape):
  """Element values (element units) of the logical elements, from the stored codes."""
  el = FORMATS[fmt]["element"]
  c = unpack_codes(np.asarray(q.data), el, -1, FORMATS[fmt].get("asym", False))
  return ELEMENTS[el].value(c)[tuple(slice(0, n) for n in shape)]


def same_bits(a, b):
  a, b = np.asarray(a), np.asarray(b)
  u = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(u), b.view(u))


# ----------------------------------------------------------------------------------------------------------------
# 1. round-trip bound and the scale law of each format
@pytest.mark.parametrize("fmt,mode", CASES, ids=CASE_IDS)
@SETTINGS
@given(data=st.data())
def test_round_trip_bound(fmt, mode, data):
  x = data.draw(inputs(fmt))
  kind, el = fmt_info(fmt)
  q, v = q_and_v(x, fmt, mode)
  x64, v64 = x.astype(np.float64), v.astype(np.float64)
  err = np.abs(v64 - x64)
  S = expand(decoded_scale(q, fmt), fmt, x.shape)
  slack = np.zeros(x.shape) if kind == "mx" else (np.abs(x64) + np.abs(v64)) * 2.0 ** -23  # float32 x/s and s*q roundings
  if kind == "int" and FORMATS[fmt]["asym"]:
    z = expand(np.asarray(q.zero_point).astype(np.float64), fmt, x.shape)
    lo_lim, hi_lim = -z * S, (2 ** FORMATS[fmt]["bits"] - 1 - z) * S  # representable range
    sat = (x64 > hi_lim + S / 2) | (x64 < lo_lim - S / 2)
    over = expand(np.maximum(block_reduce(x64, fmt, np.max), 0), fmt, x.shape)
    under = expand(np.minimum(block_reduce(x64, fmt, np.min), 0), fmt, x.shape)
    bound = np.where(sat, np.maximum(over - hi_lim, lo_lim - under), S / 2)
  else:
    amax = expand(block_reduce(np.abs(x64), fmt, np.max), fmt, x.shape)
    t = np.abs(x64) / np.where(S > 0, S, 1)
    top = el.max + elem_ulp(el.max, el) / 2  # beyond this, nearest rounding saturates
    sat = t > top
    bound = np.where(sat, amax - el.max * S, S * elem_ulp(np.minimum(t, el.max), el) / 2)
    if sat.any():  # a saturated element is +-max * scale
      assert np.all(np.abs(np.abs(v64[sat]) - el.max * S[sat]) <= slack[sat]), "saturated element is not max"
  zero = S == 0  # NVFP4 s_b rounded to 0 (or an all-zero block): the block is zeros
  ok = (err <= bound + slack) | zero
  bad = np.argwhere(~ok)[:4].tolist()
  assert ok.all(), f"error above bound at {bad}: x={x[~ok][:4]} v={v[~ok][:4]} bound={bound[~ok][:4]}"
  assert np.all(v[zero] == 0)
  check_scale_law(q, fmt, mode, x64)


def check_scale_law(q, fmt, mode, x):
  kind, el = fmt_info(fmt)
  s = np.asarray(q.scale)
  amax = block_reduce(np.abs(x), fmt, np.max)
  assert amax.shape == s.shape
  if kind == "mx":
    e = s.view(np.uint8).astype(np.int64) - 127
    assert np.all(e[amax == 0] == -127), "all-zero block must get e = -127"
    nz = (amax > 0) & (e > -127) & (e < 127)
    E, A, top = e[nz].astype(np.float64), amax[nz], 2.0 ** el.emax
    if mode == "floor":  # e = floor(log2 amax) - emax
      ok = (top * 2.0 ** E <= A) & (A < 2 * top * 2.0 ** E)
    elif mode == "ceil":  # e = ceil(log2 amax) - emax
      ok = (top * 2.0 ** E / 2 < A) & (A <= top * 2.0 ** E)
    elif mode == "even":  # amax rounded to mbits first: the binade edges move down by a quarter ulp
      lo = top * 2.0 ** E * (1 - 2.0 ** -(el.mbits + 2))
      ok = (lo <= A) & (A < 2 * lo)
    else:  # rceil: smallest e with amax <= max * 2^e
      ok = (el.max * 2.0 ** (E - 1) < A) & (A <= el.max * 2.0 ** E)
    assert ok.all(), f"{mode} scale law broken: amax={A[~ok][:4]} e={E[~ok][:4]}"
  elif kind == "nvfp4":
    g = float(q.tensor_scale)
    gmax = np.abs(x).max()
    assert (gmax == 0 and g == 1) or abs(g - gmax / 2688) <= 2.0 ** -22 * g, "g is not amax / 2688"
    sb = s.astype(np.float64)
    want = np.minimum(amax / 6 / g, 448)
    ok = np.abs(sb - want) <= np.maximum(want * 2.0 ** -4, 2.0 ** -10) * (1 + 2.0 ** -18)  # half an E4M3 ulp
    assert ok.all(), f"NVFP4 block scale off: s_b={sb[~ok][:4]} amax_b/6/g={want[~ok][:4]}"
  elif kind == "int":
    sv = s.astype(np.float64)
    if FORMATS[fmt]["asym"]:
      qmax = 2 ** FORMATS[fmt]["bits"] - 1
      lo = np.minimum(block_reduce(x, fmt, np.min), 0)
      want = (np.maximum(block_reduce(x, fmt, np.max), 0) - lo) / qmax
      z = np.asarray(q.zero_point).astype(np.float64)
      assert np.all((z == np.round(z)) & (z >= 0) & (z <= qmax)), "zero point not an integer code"
      zz = np.where(sv > 0, -lo / np.where(sv > 0, sv, 1), 0)
      assert np.all(np.abs(z - np.clip(zz, 0, qmax)) <= 0.5 + 1e-6), "zero point is not RNE(-lo / s)"
    else:
      want = amax / (2 ** (FORMATS[fmt]["bits"] - 1) - 1)
    assert np.all(np.abs(sv - want) <= want * 2.0 ** -8), "bfloat16 scale is not the rounded amax rule"
  else:
    want = np.where(amax > 0, amax / 448, 1.0)
    assert np.all(np.abs(s.astype(np.float64) - want) <= want * 2.0 ** -23), "block FP8 scale is not amax / 448"


# ----------------------------------------------------------------------------------------------------------------
# 2. idempotence
IDEM_CASES = [(f, m) for f, m in CASES if not FORMATS[f].get("asym")]


@pytest.mark.parametrize("fmt,mode", IDEM_CASES, ids=[f if m is None else f"{f}-{m}" for f, m in IDEM_CASES])
@SETTINGS
@given(data=st.data())
def test_idempotence(fmt, mode, data):
  """quantize(dequantize(q)) == q where that provably holds:
  - MX floor and even: same bits. rceil: same values; same bits on blocks whose largest element exceeds max/2
    (a block whose elements all round to <= max/2 re-derives e - 1 with doubled elements, same values; always
    for MXINT8). ceil: same values only (amax just above 2^(e+emax-1) can round down onto it, and e drops by 1).
  - symmetric int: same bits (amax/s rounds to qmax exactly, and s * qmax / qmax == s).
  - NVFP4 with the tensor scale passed back: same bits on blocks with a normal E4M3 scale (or 0); a recomputed g
    may move by an ulp (amax of the dequantized tensor is 6 * 448 * g rounded), so it is passed.
  - block FP8: same element codes; the scale may move by an ulp (fl(fl(448 s) / 448) != s in general).
  Asymmetric int is not idempotent: the dequantized range need not span all 2^b codes, so s and z move."""
  x = data.draw(inputs(fmt))
  kind, el = fmt_info(fmt)
  q1, v1 = q_and_v(x, fmt, mode)
  kw = {"tensor_scale": q1.tensor_scale} if kind == "nvfp4" else {}
  q2, v2 = q_and_v(v1, fmt, mode, **kw)
  values_same = np.array_equal(v1, v2)
  if kind == "mx":
    assert values_same, "MX: dequantize(quantize(y)) != y for y already on the grid"
    if mode in ("floor", "even"):
      assert same_bits(q1.data, q2.data) and same_bits(q1.scale, q2.scale)
    elif mode == "rceil":
      big = block_reduce(np.abs(elem_values(q1, fmt, x.shape)), fmt, np.max) > el.max / 2
      assert np.array_equal(np.asarray(q1.scale).view(np.uint8)[big], np.asarray(q2.scale).view(np.uint8)[big])
      c1, c2 = (unpack_codes(np.asarray(q.data), FORMATS[fmt]["element"], -1) for q in (q1, q2))
      eb = expand(big, fmt, c1.shape[:-1] + (x.shape[-1],))
      assert np.array_equal(c1[..., :x.shape[-1]][eb], c2[..., :x.shape[-1]][eb])
  elif kind == "int":
    assert same_bits(q1.data, q2.data) and same_bits(q1.scale, q2.scale) and values_same
  elif kind == "nvfp4":
    sb = np.asarray(q1.scale).astype(np.float32)
    okb = (sb == 0) | (sb >= 2.0 ** -6)
    assert same_bits(q1.tensor_scale, q2.tensor_scale)
    assert np.array_equal(np.asarray(q1.scale).view(np.uint8)[okb], np.asarray(q2.scale).view(np.uint8)[okb])
    c1, c2 = (unpack_codes(np.asarray(q.data), "float4_e2m1fn", -1)[..., :x.shape[-1]] for q in (q1, q2))
    eb = expand(okb, fmt, x.shape)
    assert np.array_equal(c1[eb], c2[eb])
  else:
    assert same_bits(q1.data, q2.data)
    s1, s2 = (np.asarray(q.scale).astype(np.float64) for q in (q1, q2))
    assert np.all(np.abs(s1 - s2) <= s1 * 2.0 ** -23)


# ----------------------------------------------------------------------------------------------------------------
# 3. sign symmetry of the symmetric formats
SYM_CASES = IDEM_CASES


@pytest.mark.parametrize("fmt,mode", SYM_CASES, ids=[f if m is None else f"{f}-{m}" for f, m in SYM_CASES])
@SETTINGS
@given(data=st.data())
def test_sign_symmetry(fmt, mode, data):
  x = data.draw(inputs(fmt))
  _, v = q_and_v(x, fmt, mode)
  _, vn = q_and_v(-x, fmt, mode)
  ok = vn == -v  # == : a zero's sign is test_exact's business
  assert ok.all(), f"quantize(-x) != -quantize(x) at {np.argwhere(~ok)[:4].tolist()}: {x[~ok][:4]}"


# ----------------------------------------------------------------------------------------------------------------
# 4. power-of-two equivariance: codes unchanged, scales times 2^k (MX: exponent + k)
@pytest.mark.parametrize("fmt,mode", CASES, ids=CASE_IDS)
@SETTINGS
@given(data=st.data(), k=st.integers(-20, 20))
def test_power_of_two_equivariance(fmt, mode, data, k):
  x = data.draw(inputs(fmt))
  kind, _ = fmt_info(fmt)
  xs = (x * np.float32(2.0 ** k)).astype(np.float32)
  assert np.array_equal(xs / np.float32(2.0 ** k), x)  # exact: inputs stay normal
  q1, v1 = q_and_v(x, fmt, mode)
  q2, v2 = q_and_v(xs, fmt, mode)
  assert same_bits(q1.data, q2.data), "element codes changed under x -> x * 2^k"
  assert np.array_equal(v2, (v1 * np.float32(2.0 ** k)).astype(np.float32)), "values not scaled by 2^k"
  if kind == "mx":
    e1 = np.asarray(q1.scale).view(np.uint8).astype(np.int64)
    e2 = np.asarray(q2.scale).view(np.uint8).astype(np.int64)
    nz = block_reduce(np.abs(x), fmt, np.max) > 0
    assert np.array_equal(e2[nz], e1[nz] + k), "MX scale exponent not shifted by k"
    assert np.array_equal(e2[~nz], e1[~nz])
  else:
    s1 = np.asarray(q1.scale).astype(np.float64)
    s2 = np.asarray(q2.scale).astype(np.float64)
    if kind == "nvfp4":
      assert float(q2.tensor_scale) == float(q1.tensor_scale) * 2.0 ** k or np.abs(x).max() == 0
      assert same_bits(q1.scale, q2.scale)
    else:
      nz = block_reduce(np.abs(x), fmt, np.max) > 0
      assert np.array_equal(s2[nz], s1[nz] * 2.0 ** k), "scale not multiplied by 2^k"
    if q1.zero_point is not None:
      assert same_bits(q1.zero_point, q2.zero_point)


# ----------------------------------------------------------------------------------------------------------------
# 5. stochastic rounding: unbiased and always one of the two neighbouring grid values
DRAWS = 4096  # per element


def anchored_row(fmt, n, rng):
  """One block's worth of values with the scale pinned (x / scale is then exact) and the other values strictly
  inside the representable range. Returns (row, kwargs for quantize)."""
  kind, el = fmt_info(fmt)
  if kind == "mx":
    unit, kw = 2.0 ** -3, {}
    lo, hi, head = -el.max * unit, el.max * unit, [el.max * unit]
  elif kind == "nvfp4":
    unit, kw = 0.75, {"tensor_scale": 1.0}  # s_b = 0.75 (an E4M3 value), g = 1
    lo, hi, head = -6 * unit, 6 * unit, [6 * unit]
  elif kind == "fp8block":
    unit, kw = 2.0 ** 5, {}
    lo, hi, head = -448 * unit, 448 * unit, [448 * unit]
  else:
    b = FORMATS[fmt]["bits"]
    unit, kw = 2.0 ** -4, {}
    if FORMATS[fmt]["asym"]:
      z = 2 ** (b - 1) - 3
      lo, hi = -z * unit, (2 ** b - 1 - z) * unit
      head = [lo, hi]
    else:
      lo, hi = -(2 ** (b - 1) - 1) * unit, (2 ** (b - 1) - 1) * unit
      head = [hi]
  body = rng.uniform(lo, hi, n - len(head)) * 0.999
  body[:4] = [lo * 0.3, hi * 0.01, hi * 0.5, 0.0]  # include a grid value (0) and a tiny value
  return np.array(head + list(body), np.float32), kw


# one format per scale kind, a spread of element types and groupings (a stochastic compile costs about 1.5 s)
STOCHASTIC_FORMATS = ["mxfp8_e5m2", "mxfp4", "mxint8", "nvfp4", "int4_g64_asym", "fp8_block_128x128"]


@pytest.mark.parametrize("fmt", STOCHASTIC_FORMATS)
def test_stochastic_rounding(fmt):
  kind, el = fmt_info(fmt)
  n = block_len(fmt)
  row, kw = anchored_row(fmt, n, np.random.default_rng(1))
  shape = input_shape(fmt)
  rows = shape[0]  # every row one draw of the same block (rows are independent blocks); the tail stays 0
  x = np.zeros(shape, np.float32)
  x[:, :n] = row
  qn = lb.quantize(jnp.asarray(x), fmt, **kw)
  keys = jax.random.split(jax.random.key(0), -(-DRAWS // rows))
  vals = []
  for i, key in enumerate(keys):
    q = lb.quantize(jnp.asarray(x), fmt, rounding="stochastic", key=key, **kw)
    assert same_bits(q.scale, qn.scale), "scales must be round-to-nearest under stochastic rounding"
    if q.zero_point is not None:
      assert same_bits(q.zero_point, qn.zero_point)
    if kind == "nvfp4":
      assert same_bits(q.tensor_scale, qn.tensor_scale)
    vals.append(np.asarray(lb.dequantize(q, jnp.float32))[:, :n])
    if i == 0:  # the same key gives the same draw
      assert same_bits(lb.quantize(jnp.asarray(x), fmt, rounding="stochastic", key=key, **kw).data, q.data)
  vals = np.stack(vals).reshape(-1, n).astype(np.float64)[:DRAWS]  # (4096, n)
  assert not np.array_equal(vals[:rows], vals[rows:2 * rows]), "different keys gave identical draws"
  # the two neighbours of each x on the grid, as dequantize computes them
  S_blocks = decoded_scale(qn, fmt)[:, 0]  # the first block column holds the row (the tail is zeros)
  S = float(S_blocks[0])
  assert np.all(S_blocks == S)
  if el.is_int and kind == "int":
    t = row.astype(np.float64) / S
    lo_c, hi_c = np.floor(t), np.ceil(t)
  else:
    t = row.astype(np.float64) / S
    lo_c, hi_c = grid_neighbours(t, FORMATS[fmt]["element"])
  lo_v = (np.float32(S) * lo_c.astype(np.float32)).astype(np.float64)
  hi_v = (np.float32(S) * hi_c.astype(np.float32)).astype(np.float64)
  if kind == "mx":
    lo_v, hi_v = lo_c * S, hi_c * S
  is_lo, is_hi = vals == lo_v, vals == hi_v
  assert np.all(is_lo | is_hi), f"a stochastic result is not a neighbour: {np.argwhere(~(is_lo | is_hi))[:3]}"
  # unbiased: the mean of 4096 draws is within 5 standard errors of x
  gap = hi_v - lo_v
  p = np.where(gap > 0, (row - lo_v) / np.where(gap > 0, gap, 1), 0)
  se = gap * np.sqrt(np.maximum(p * (1 - p), 1.0 / len(vals)) / len(vals))
  mean = vals.mean(0)
  ok = np.abs(mean - row) <= 5 * se + np.abs(row) * 2.0 ** -22
  assert ok.all(), f"biased: x={row[~ok][:4]} mean={mean[~ok][:4]} se={se[~ok][:4]}"
  # and it is not round-to-nearest in disguise: values strictly between neighbours take both
  inside = (gap > 0) & (p > 0.05) & (p < 0.95)
  assert np.all(is_lo[:, inside].any(0) & is_hi[:, inside].any(0))
