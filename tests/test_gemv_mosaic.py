"""Weight-only matmul with K-major (N, K) weights, M <= 256 and tiles of more rows: the Mosaic GPU kernel (the Mosaic
GPU interpreter on CPU, which starts outputs as NaN; compiled with poisoned outputs on a Hopper GPU) against the
dequantized weights."""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import dispatch
from pallas_kernels.backend import hopper_available
from pallas_kernels.dequant_gemv_mosaic import Config, _program_tiles, dequant_gemv
from reference import ELEMENTS, pack_codes

KERNEL = "mosaic" if hopper_available() else "interpret"
MOSAIC = "mosaic" if KERNEL == "mosaic" else "mosaic_interpret"  # dequant_gemv's backend for KERNEL
# (E5M2 and E3M2 share their siblings' code paths but the decode constants, which the exhaustive code test checks)
FORMATS = ["int4_g128_sym", "int4_g32_sym", "int4_channel_sym", "int8_g128_sym", "int8_channel_sym", "mxfp4", "nvfp4",
           "mxfp8_e4m3", "mxfp6_e2m3", "mxint8"]
DN = (((1,), (1,)), ((), ()))


def _operands(m, n, k, fmt, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = lb.quantize(jax.random.normal(kw, (n, k), jnp.float32) * 0.1, fmt, axis=1)
  return x, w


def _exact_weights_dot(x, w):
  """x @ W^T with W the bfloat16 weights `lb.dequantize` returns, products exact, float32 sums. NVFP4: W in
  float32, since the kernel takes the element times block scale (exact in bfloat16) and applies g to the sum."""
  dtype = jnp.float32 if w.tensor_scale is not None else jnp.bfloat16
  return jnp.dot(x.astype(jnp.float32), lb.dequantize(w, dtype).astype(jnp.float32).T, precision="highest")


def _kernel_equals_exact_dot(x, w, config=None, prepared=False):
  """The kernel's float32 output (the Mosaic GPU interpreter off a Hopper GPU) against `_exact_weights_dot`: only the
  float32 summation order may differ, so the tolerance is far below a bfloat16 ulp of the weights. `prepared`: the
  kernel reads `lb.prepare(w)`."""
  y = dequant_gemv(x, lb.prepare(w) if prepared else w, out_dtype=jnp.float32, backend=MOSAIC, config=config)
  ref = _exact_weights_dot(x, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  return y


@pytest.mark.parametrize("fmt,m", [
    *[(f, 1) for f in FORMATS],  # every decode and scale layout, activation tiles of 8 rows (up to M = 8)
    # 16 rows (9: a ragged tile) and 64 rows on two warpgroups, which each load their own rows of codes and scales;
    # the tile size is format-independent but for the FP6 codes' own loads (test_warp_specialized runs the others)
    *[(f, 9) for f in ("int4_g128_sym", "nvfp4", "mxfp8_e4m3", "mxfp6_e2m3")],
    *[(f, 40) for f in ("int4_g128_sym", "int4_channel_sym", "int8_g128_sym", "mxfp8_e4m3", "mxfp6_e2m3")]])
def test_kernel_equals_dot_of_dequantized_weights(fmt, m):
  # The kernel rounds v * s to bfloat16 once, as dequantize does (scaling on the float32 sum instead fails this).
  x, w = _operands(m, 128, 512, fmt, seed=m)
  y = _kernel_equals_exact_dot(x, w)
  assert y.shape == (m, 128) and not np.isnan(np.asarray(y)).any()


@pytest.mark.parametrize("split,groups,tiles,wgs", [(1, 1, 1, 1), (4, 1, 1, 1), (1, 4, 2, 1), (2, 2, 2, 1),
                                                    (2, 1, 1, 2)])
def test_split_k_slices_per_step_row_tiles_and_warpgroups(split, groups, tiles, wgs):
  # Odd `groups` take the int4 codes in 64-byte boxes, even ones in 128-byte boxes of two slices.
  x, w = _operands(3, 128, 512, "int4_g128_sym", seed=7)
  _kernel_equals_exact_dot(x, w, Config(split=split, groups=groups, stages=2, tiles=tiles, wgs=wgs))


@pytest.mark.parametrize("fmt,m,cfg", [("int4_g32_sym", 40, None), ("nvfp4", 40, None),  # (nvfp4 at M = 1: partials)
                                        ("mxfp4", 9, Config(split=2, groups=1, stages=2)), ("mxfp6_e2m3", 16, None),
                                        ("mxfp8_e4m3", 3, None), ("mxint8", 9, None),
                                        ("mxfp8_e5m2", 40, Config(split=2, groups=1, stages=2))])
def test_prepared_weights(fmt, m, cfg):
  # Codes stored in the kernel's order (lb.prepare): the activations are read unpermuted, and NVFP4's blocks of 16
  # are picked by the register column itself (one and two warpgroups, split-K); FP8 and folded MXINT8 codes eight
  # to a load.
  _kernel_equals_exact_dot(*_operands(m, 128, 512, fmt, seed=m + 20), cfg, prepared=True)


def test_prepared_mx_weights_whose_scales_do_not_fold():
  # Scales above 2 (weights of 16 and more in MXFP4) leave the decode's 2^126 on each pair of codes.
  x, w = _operands(9, 128, 256, "mxfp4", seed=3)
  w = lb.quantize(lb.dequantize(w, jnp.float32) * 2048, "mxfp4", axis=1)
  assert not lb.prepare(w).folded
  _kernel_equals_exact_dot(x, w, prepared=True)


def test_default_configs_fit_shared_memory():
  from pallas_kernels.backend import HOPPER_SMEM
  from pallas_kernels.dequant_gemv_mosaic import default_config, smem_bytes
  for n, k, m, bits in itertools.product([64, 192, 1024, 28672], [256, 2048, 28672], [1, 9, 33, 100, 200, 256], [4, 8]):
    cfg = default_config(n, k, m, bits)
    assert smem_bytes(cfg, m, bits, 16) <= HOPPER_SMEM, (n, k, m, bits, cfg)


def test_default_config_splits():
  from pallas_kernels.dequant_gemv_mosaic import default_config
  # 8-bit codes at M <= 16 over about one 64-row tile per SM or more: unsplit where the tiles cover the SMs or the
  # float32 partials would be heavy (M = 16), split where they are light and the tiles past one wave (M = 1).
  assert [default_config(n, 8192, m, 8).split for n, m in [(8192, 1), (8192, 16), (28672, 16), (28672, 1)]] == \
      [1, 1, 1, 8]
  assert default_config(8192, 28672, 1, 8).split == 1
  assert default_config(2048, 8192, 1, 8).split == 16  # (32 tiles: a decode step's down projection stays split)
  # 4-bit codes need more programs per SM: about 16 with 8 activation rows, 8 with 16 (partials twice as heavy)
  assert [default_config(n, 8192, m, 4).split for n, m in [(8192, 16), (28672, 1), (28672, 16)]] == [16, 8, 4]


@pytest.mark.parametrize("fmt,m,n", [("int4_g128_sym", 256, 128), ("mxfp4", 100, 128), ("int8_channel_sym", 128, 128),
                                      ("nvfp4", 64, 192)])
def test_prefill_rows(fmt, m, n):
  # The widest activation tiles (wgmma N up to 256), read from M rows up to the next power of two; the default
  # configuration's two warpgroups per program, or one where N is an odd number of 64-row tiles.
  _kernel_equals_exact_dot(*_operands(m, n, 256, fmt, seed=5))


@pytest.mark.parametrize("fmt,m,cfg", [("int4_g128_sym", 300, None),
                                        ("nvfp4", 512, Config(split=2, groups=1, stages=2)),
                                        ("mxfp4", 260, Config(groups=1, stages=2))])
def test_more_rows_than_one_tile(fmt, m, cfg):
  # Past 256 rows, programs take tiles of 256 (the last one ragged: rows past M are read, their outputs dropped):
  # two warpgroups by default; one warpgroup writing whole tiles through TMA; split-K partials.
  x, w = _operands(m, 128, 256, fmt, seed=13)
  assert _kernel_equals_exact_dot(x, w, cfg).shape == (m, 128)


@pytest.mark.parametrize("n_tiles,m_tiles,group", [(64, 8, 8), (3, 20, 8), (5, 3, 8), (4, 7, 2), (2, 5, 1)])
def test_raster_groups_cover_the_grid_once(n_tiles, m_tiles, group):
  # Every (weight tile, activation tile) exactly once, the last group smaller where `group` does not divide the
  # activation tiles; within a group, consecutive programs share a weight tile and run over its activation tiles.
  tiles = [tuple(int(t) for t in _program_tiles(p, n_tiles, m_tiles, group)) for p in range(n_tiles * m_tiles)]
  assert sorted(tiles) == sorted(itertools.product(range(n_tiles), range(m_tiles)))
  size = min(group, m_tiles)
  assert tiles[:size] == [(0, i) for i in range(size)]
  assert all(ni < n_tiles and mi // group == p // (group * n_tiles) for p, (ni, mi) in enumerate(tiles))


@pytest.mark.parametrize("fmt,m,wgs,programs", [("mxfp4", 40, 2, 2), ("nvfp4", 9, 2, 1), ("int8_channel_sym", 64, 3, 1),
                                                 ("int4_g32_sym", 1, 2, 1)])
def test_warp_specialized(fmt, m, wgs, programs):
  # Compute warpgroups with a 64-row weight tile each over one activation tile, a copy warpgroup feeding them (one
  # program per K split where a second adds only interpreter time; two programs over N without a split, which the
  # other cases cover).
  x, w = _operands(m, 64 * wgs * programs, 256, fmt, seed=11)
  _kernel_equals_exact_dot(x, w, Config(split=2 if programs == 1 else 1, groups=1, stages=2, wgs=wgs))


@pytest.mark.parametrize("fmt,prepared", [
    *[(f, False) for f in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxint8")],
    ("mxfp4", True), ("mxfp8_e5m2", True), ("mxfp6_e3m2", True), ("mxint8", True)])
def test_every_code_decodes_exactly(fmt, prepared):
  # Each finite FP8 / FP6 / FP4 code (subnormals, both zeros, the largest) or MXINT8 code (-128 ... 127, q / 64) in
  # every row, under E8M0 scales from 2^-12 to 2^12, read out one weight per output through an identity x: the
  # kernel's decode (GPU: byte permutes, shifts and masks, then two exact bf16 products) against ml_dtypes / numpy.
  # FP8 NaN / Inf codes appear only in NaN-scaled blocks. Prepared, with scales up to 2 (so the decode's power of
  # two moves into the scales: one bf16 product; MXINT8 with scales up to 1 and no code -128, stored as sign and
  # magnitude).
  el = lb.get_format(fmt).element_type
  codes = (np.arange(256)[None, :] + 37 * np.arange(64)[:, None]) % (1 << el.bits)  # (64, 256): every code, every row
  values = (codes.astype(np.uint8).view(np.int8) / 64 if el.kind == "int" else
            codes.astype(np.uint8).view(getattr(ml_dtypes, el.name)).astype(np.float32))  # (FP6: the low 6 bits)
  kept = np.isfinite(values) & ~(prepared & (el.kind == "int") & (codes == 128))
  codes = np.where(kept, codes, 0).astype(np.uint8)
  values = np.where(kept, values, 0)
  top = (1 if el.kind == "int" else 2) if prepared else 13
  exps = 127 + np.random.default_rng(0).integers(-12, top, size=(64, 8))  # E8M0 of 2^-12 ... 2^12
  data = jnp.asarray(pack_codes(codes.astype(np.int64), ELEMENTS[el.name]))  # (FP6: four codes per three bytes)
  _, tree = jax.tree_util.tree_flatten(lb.quantize(jnp.ones((64, 256)), fmt, axis=1))
  w = jax.tree_util.tree_unflatten(tree, [data, jnp.asarray(exps.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu))])
  if prepared:
    w = lb.prepare(w)
    assert w.folded
  y = dequant_gemv(jnp.eye(256, dtype=jnp.bfloat16), w, out_dtype=jnp.float32, backend=MOSAIC)
  want = values * np.exp2(np.repeat(exps, 32, axis=1) - 127.0)
  np.testing.assert_array_equal(np.asarray(y), want.T)


def test_dot_general_leading_dims_jit_and_dispatch():
  x, w = _operands(6, 128, 256, "int4_g128_sym", seed=2)
  x3 = x.reshape(2, 3, 256)
  f = jax.jit(lambda x, w: lb.dot_general(x, w, (((2,), (1,)), ((), ())), backend=KERNEL))
  y = f(x3, w)
  assert y.shape == (2, 3, 128) and y.dtype == jnp.bfloat16
  ref = lb.dot_general(x3, w, (((2,), (1,)), ((), ())), backend="xla")
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)
  for m in (6, 2048, 8192):  # (int4 K-major weights take the kernel at any M)
    assert dispatch.choose(None, x, w, DN, m) == ("mosaic" if KERNEL == "mosaic" else "xla")
  mx = lb.quantize(w.dequantize(jnp.float32), "mxfp4", axis=1)
  assert dispatch.choose(None, x, mx, DN, 4096) == "xla"  # (the others: dequantize-then-dot from 4096 rows)
  assert dispatch.choose(None, x, mx, DN, 2048) == ("mosaic" if KERNEL == "mosaic" else "xla")
  for f8 in ("mxfp8_e4m3", "mxint8"):  # (8-bit MX weights as well)
    mx8 = lb.quantize(w.dequantize(jnp.float32), f8, axis=1)
    assert dispatch.choose(None, x, mx8, DN, 4096) == "xla"
    assert dispatch.choose(None, x, mx8, DN, 2048) == ("mosaic" if KERNEL == "mosaic" else "xla")


def test_partials_and_summands():
  """`partials`: the float32 split-K partial sums as the programs write them (NVFP4's g applied to each), adding
  up to the product; `lb.matmul_summands` returns them for K-major weights and the product as one summand for
  (K, N) weights."""
  fmt = "nvfp4"
  x, w = _operands(1, 128, 512, fmt, seed=5)
  w = lb.prepare(w)
  parts = dequant_gemv(x, w, out_dtype=jnp.float32, backend=MOSAIC, partials=True)
  assert parts.shape == (2, 1, 128) and parts.dtype == jnp.float32  # (the default splits K = 512 in two)
  ref = _exact_weights_dot(x, w.canonical())
  np.testing.assert_allclose(np.asarray(parts.sum(0)), np.asarray(ref), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  assert not np.allclose(np.asarray(parts[0]), np.asarray(ref), rtol=0.1)  # (a partial is not the product)
  x3 = x.reshape(1, 1, 512)
  np.testing.assert_array_equal(np.asarray(lb.matmul_summands(x3, w, backend=KERNEL)), np.asarray(parts)[:, None])
  kn = lb.quantize(w.dequantize(jnp.float32).T, fmt, axis=0)  # (K, N): one summand, the float32 product
  got = lb.matmul_summands(x3, kn, backend="xla")
  assert got.shape == (1, 1, 1, 128) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(lb.dot_general(
      x3, kn, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32, backend="xla")))
  with pytest.raises(TypeError, match="matmul_summands: w must be a 2-D QArray or PreparedWeight, got ArrayImpl"):
    lb.matmul_summands(x3, x)


def _swiglu_reference(x, w) -> np.ndarray:
  """silu(gate) * up in float64 from the exact products (`_exact_weights_dot`) rounded to bfloat16 (ml_dtypes)."""
  full = np.asarray(_exact_weights_dot(x, w), np.float32)
  g, u = (h.astype(ml_dtypes.bfloat16).astype(np.float64) for h in np.split(full, 2, axis=-1))
  return g / (1 + np.exp(-g)) * u


@pytest.mark.parametrize("fmt,m", [("nvfp4", 9), ("int8_channel_sym", 40)])
def test_swiglu_epilogue(fmt, m):
  """`swiglu`: each program a gate tile and its up tile (two programs here), NVFP4's g on both, per-channel scales,
  40 rows (one 64-row tile); then silu(gate) * up rounded once. Against float64 from the rounded products: the
  kernel's float32 sums may round a product the other way, so up to two bfloat16 ulps. (Prepared int4:
  test_matmul_swiglu.)"""
  x, w = _operands(m, 256, 256, fmt, seed=3)
  y = dequant_gemv(x, w, backend=MOSAIC, swiglu=True)
  assert y.shape == (m, 128) and y.dtype == jnp.bfloat16
  ref = _swiglu_reference(x, w)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -7, atol=1e-6 * np.abs(ref).max())


def test_matmul_swiglu():
  """`lb.matmul_swiglu`: the kernel's epilogue for a K-major weight at few rows (prepared int4, as the example LM
  holds its MLP), XLA's product then the same arithmetic for a (K, N) weight; bad weights and configurations
  refused."""
  x, w = _operands(3, 256, 256, "int4_g128_sym", seed=4)
  x3 = x.reshape(1, 3, 256)
  got = lb.matmul_swiglu(x3, lb.prepare(w), backend=KERNEL)
  assert got.shape == (1, 3, 128)
  np.testing.assert_allclose(np.asarray(got[0], np.float64), _swiglu_reference(x, w), rtol=2 ** -7, atol=1e-6)
  kn = lb.quantize(w.dequantize(jnp.float32).T, "int4_g128_sym", axis=0)  # the same weights, (K, N)
  y = lb.dot_general(x3, kn, (((2,), (0,)), ((), ())), backend="xla")
  np.testing.assert_array_equal(np.asarray(lb.matmul_swiglu(x3, kn, backend="xla")),
                                np.asarray(lb.xla.swiglu(y[..., :128], y[..., 128:], jnp.bfloat16)))
  with pytest.raises(ValueError, match="matmul_swiglu: w must have an even number of outputs"):
    lb.matmul_swiglu(x, _operands(3, 135, 256, "mxfp4")[1])
  with pytest.raises(ValueError, match="swiglu=True\\) takes N a multiple of 128, M <= 64"):
    dequant_gemv(x, w, backend=MOSAIC, swiglu=True, config=Config(split=2))
  with pytest.raises(TypeError, match="matmul_swiglu: w must be a 2-D QArray or PreparedWeight"):
    lb.matmul_swiglu(x, x)


@pytest.mark.parametrize("fmt,m,k", [
    *[(f, 9, 512) for f in ("int4_g128_sym", "int8_channel_sym", "mxfp4", "int4_g32_sym", "nvfp4", "mxfp8_e4m3",
                            "mxfp6_e2m3", "mxint8")],  # every decode, x padded to whole 8-row tiles
    *[("nvfp4", m, k) for m, k in ((4, 512), (64, 256), (300, 256))]])  # x unpadded (NVFP4: with its g);
def test_gpu_code_lowers_on_any_machine(fmt, m, k, cuda_lowering):  # two warpgroups; tiles of 256 rows
  # The GPU-only code (the int4 decode in Mosaic GPU's lane-level IR, register-layout loads, TMA's rules for the
  # activation tiles) is not run by the interpreter; lowering it for CUDA on a CPU catches its Python-side errors
  # where no GPU is present.
  x, w = _operands(m, 256, k, fmt)
  assert "mosaic_gpu" in cuda_lowering(lambda x, w: dequant_gemv(x, w, backend="mosaic"), x, w)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp6_e3m2", "mxint8", "mxfp8_e5m2"])
def test_gpu_code_lowers_with_prepared_weights(fmt, cuda_lowering):
  x, w = _operands(9, 256, 512, fmt)
  assert "mosaic_gpu" in cuda_lowering(lambda x, w: dequant_gemv(x, w, backend="mosaic"), x, lb.prepare(w))


@pytest.mark.parametrize("m,n,fmt,dtype,backend,match", [
    (2, 128, "int4_g128_asym", jnp.bfloat16, "interpret", "symmetric int4 / int8, MXFP4, MXFP6, MXFP8, MXINT8"),
    (2, 128, "int2_g32_sym", jnp.bfloat16, "interpret", "MXFP8, MXINT8 and NVFP4"),
    (2, 128, "int8_g32_sym", jnp.bfloat16, "interpret", "groups of 128"),
    (2, 96, "int8_channel_sym", jnp.bfloat16, "interpret", "multiples of 64 and 128"),
    (2, 128, "int4_g128_sym", jnp.bfloat16, "pallas", "its kernel is a 'mosaic' kernel"),
    (2, 128, "int4_g128_sym", jnp.float16, "interpret", "bfloat16 activations"),
])
def test_what_the_kernel_does_not_take(m, n, fmt, dtype, backend, match):
  x, w = _operands(m, n, 256, fmt)
  with pytest.raises(ValueError, match=match):
    lb.dot_general(x.astype(dtype), w, DN, backend=backend)


@pytest.mark.parametrize("dtype,power", [("float8_e8m0fnu", 0), ("float8_e4m3fn", 0), ("float8_e8m0fnu", 126),
                                         ("float8_e8m0fnu", 112), ("float8_e4m3fn", 118), ("float8_e8m0fnu", -6)])
def test_scales_widen_exactly(dtype, power):
  # Every byte of a one-byte scale (the kernel's own conversion: Hopper has none for E8M0) times 2^power against
  # ml_dtypes: the E8M0 bf16 subnormal 2^-127 and NaN, E4M3 subnormals, NaN and negative zero; MXINT8's 2^-6
  # (scales 2^-133 ... 2^-127 bf16 subnormals); with the float decode's power of two folded in (E8M0 scales up to
  # 2^(127 - power) and no NaN, which `folds_scales` requires; NVFP4's E4M3 ones times 2^118, all of them).
  from pallas_kernels.dequant_gemv_mosaic import _scale_bf16
  bits = np.arange(256, dtype=np.uint8)
  stored = bits if dtype == "float8_e8m0fnu" else bits.view(ml_dtypes.float8_e4m3fn)
  got = np.asarray(jax.jit(_scale_bf16, static_argnums=1)(jnp.asarray(stored), power)).view(np.uint16)
  kept = bits >= 0
  if dtype == "float8_e8m0fnu":
    kept = (bits.astype(int) + power <= 254) | (bits == 255) & (power <= 0)
  want = (bits[kept].view(getattr(ml_dtypes, dtype)).astype(np.float64) * 2.0 ** power).astype(ml_dtypes.bfloat16)
  got = got[kept]
  nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(got[~nan], want[~nan].view(np.uint16))
  assert np.isnan(got.view(ml_dtypes.bfloat16).astype(np.float32)[nan]).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4_g128_sym", "int8_channel_sym", "mxfp8_e4m3", "mxfp8_e5m2",
                                 "mxfp6_e2m3", "mxfp6_e3m2", "mxint8"])
def test_special_weights(fmt):
  # NaN and Inf in a block (NaN scales), a row at the smallest E8M0 scale (2^-127, a bf16 subnormal), a row near
  # the float32 limit: each output column against its own exact dot, so tiny columns are not lost beside huge ones.
  w = np.asarray(jax.random.normal(jax.random.key(3), (128, 256), jnp.float32)) * 0.1
  w[0, 5], w[1, 40], w[2], w[3] = np.nan, np.inf, 2.0**-125, 1e30
  w = lb.quantize(jnp.asarray(w), fmt, axis=1)
  x = jax.random.normal(jax.random.key(4), (5, 256), jnp.float32).astype(jnp.bfloat16)
  y = np.asarray(dequant_gemv(x, w, out_dtype=jnp.float32, backend=MOSAIC))
  ref = np.asarray(_exact_weights_dot(x, w))
  assert np.isnan(ref[:, 0]).all()
  # XLA:CPU flushes subnormal operands, so the interpreter's MX v * 2^-127 (row 2) is 0 there; the GPU keeps it.
  for j in [j for j in range(ref.shape[1]) if KERNEL == "mosaic" or not fmt.startswith("mx") or j != 2]:
    np.testing.assert_allclose(y[:, j], ref[:, j], rtol=0, atol=1e-5 * np.nanmax(np.abs(ref[:, j]), initial=0))
