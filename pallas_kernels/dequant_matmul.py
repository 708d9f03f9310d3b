"""Weight-only quantized matmul: y = x @ dequantize(w), decoding packed weights in registers.

Layouts: `x` is (M, K) bfloat16 or float16; `w` is a QArray of logical shape (K, N) blocked along K (axis 0), in
the canonical storage of REFERENCE section 3: packed codes (K * bits / 8, N), scales (K / G, N) for groups of
G along K (per-channel: (1, N)). One program computes a (BM, BN) output tile and loops over K in steps of BK.

Packing groups hold P codes of consecutive k (two nibbles of a byte; four 6-bit codes in three bytes). A K step
loads the (BK / P * bytes, BN) bytes once, splits them into P code tiles (one per position in the group),
decodes and scales each, and rebuilds one (BK, BN) weight tile in K order in registers (join, transpose,
reshape) for a single dot against contiguous activations. Of the schemes measured on an H100 (BENCHMARKS.md:
P separate dots against de-interleaved or strided activations, a gathered K-order load, one dot per scale group
with the scale on the partial sum) this was the fastest at every M.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lowbit_jax import packing
from lowbit_jax.formats import Format
from lowbit_jax.qarray import QArray
from pallas_kernels import backend as _backend
from pallas_kernels import decode

__all__ = ["Config", "dequant_matmul", "supports", "default_config", "k_multiple"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and launch parameters. BK is in elements of K; all sizes are powers of two.

  split_k: programs sharing one output tile, each over a 1/split_k slice of K; their float32 partial sums are
  added afterwards. It gives every SM weights to stream when N / BN programs would leave most of them idle.
  """
  bm: int
  bn: int
  bk: int
  num_warps: int = 4
  num_stages: int = 3
  split_k: int = 1


def supports(fmt: Format) -> str | None:
  """None if the kernel handles `fmt`, else the reason it does not."""
  if fmt.block is not None and len(fmt.block) != 1:
    return f"{fmt.name}: 2-D blocks are not a weight-only format"
  if fmt.element_type.bits not in (4, 6, 8):
    return f"{fmt.name}: {fmt.element_type.bits}-bit elements"
  if fmt.block is not None and (fmt.block[0] & (fmt.block[0] - 1) or fmt.block[0] < 16):
    return f"{fmt.name}: block size {fmt.block[0]} is not a power of two >= 16"
  return None


def default_config(m: int, n: int, fmt: Format) -> Config:
  """Tiles by regime of M (rows of the activation), from the sweeps in BENCHMARKS.md (H100, N = K = 8192);
  `fit_config` then fits them to K."""
  if m <= 16:  # weight streaming: one row block, narrow column tiles so every SM has work
    few_groups = fmt.block is None or fmt.block[0] >= 128
    cfg = Config(16, 64, 512 if few_groups else 256, num_warps=4, num_stages=4, split_k=_split_for(-(-n // 64)))
  elif m <= 64:  # one row block: split K until the launch has about four warps per SM
    cfg = Config(64, 64, 128, num_warps=4, num_stages=3, split_k=_split_for(-(-n // 64), per_sm=1))
  elif m <= 128:
    cfg = Config(128, 128, 128, num_warps=8, num_stages=3, split_k=_split_for(-(-n // 128), per_sm=0.5))
  elif m <= 256:
    cfg = Config(128, 128, 128, num_warps=8, num_stages=3)
  else:
    cfg = Config(128, 256, 32, num_warps=8, num_stages=4)
  return cfg


def k_multiple(fmt: Format) -> int:
  """The kernel walks K in steps with >= 16 rows per sub-product (the smallest MMA), so K is padded to a
  multiple of 16 * P (and of the group size)."""
  p = packing.codes_per_group(fmt.element_type.bits)
  return max(16 * p, fmt.block[0] if fmt.block else 1)


def fit_config(cfg: Config, k: int) -> Config:
  """Shrinks BK to a power of two dividing `k` (a multiple of `k_multiple`), and split_k to divide the steps."""
  bk = cfg.bk
  while k % bk:
    bk //= 2
  split = max(1, min(cfg.split_k, k // bk))
  while (k // bk) % split:
    split -= 1
  return dataclasses.replace(cfg, bk=bk, split_k=split)


def _split_for(programs: int, per_sm: float = 2) -> int:
  """split_k that brings the programs of a weight-streaming launch to about `per_sm` per SM."""
  split = 1
  while programs * split < per_sm * _backend.sm_count() and split < 8:
    split *= 2
  return split


def _interleave(parts: list) -> jax.Array:
  """P tiles (R, N), tile j holding rows k = P*r + j, as one (P*R, N) tile in k order (P in 1, 2, 4)."""
  if len(parts) == 1:
    return parts[0]
  r, n = parts[0].shape
  if len(parts) == 2:
    t = jnp.stack(parts, axis=-1)  # (R, N, 2)
    return jnp.transpose(t, (0, 2, 1)).reshape(2 * r, n)
  lo = jnp.stack([parts[0], parts[1]], axis=-1)  # [r, n, j & 1] for j >> 1 == 0
  hi = jnp.stack([parts[2], parts[3]], axis=-1)
  t = jnp.stack([lo, hi], axis=-1)  # [r, n, j & 1, j >> 1]
  return jnp.transpose(t, (0, 3, 2, 1)).reshape(4 * r, n)


def _kernel(*refs, fmt: Format, group: int, cfg: Config, m: int, n: int, k_total: int, has_zero: bool,
            has_g: bool, post: float, backend: str):
  x_ref, w_ref, s_ref = refs[:3]
  z_ref = refs[3] if has_zero else None
  g_ref = refs[3 + has_zero] if has_g else None
  o_ref = refs[-1]
  el = fmt.element_type
  p, b = packing.codes_per_group(el.bits), packing.bytes_per_group(el.bits)
  bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
  dtype = x_ref.dtype
  # Ragged edges: Pallas's Triton lowering reads and writes whole blocks, so overhanging rows of x and columns
  # of w, the scales and the output are masked (statically absent when the shape divides the tile).
  row_ok = _backend.in_bounds(0, bm, m, dim=0)
  col_ok = _backend.in_bounds(1, bn, n, dim=1)

  def ld(ref, rows, shape, mask):
    idx = (rows, slice(None)) if ref is not x_ref else (slice(None), rows)
    mask = None if mask is None else jnp.broadcast_to(mask, shape)
    return _backend.load(ref, idx, mask, 0, backend=backend)

  def scales(ref, k0, count):
    """float32 scale (or zero point) rows of the `count` groups from k0 on: (count, BN)."""
    t = ld(ref, pl.ds(0 if group >= k_total else k0 // group, count), (count, bn), col_ok)
    if ref is s_ref and fmt.rule == "mx":
      return decode.mx_scale(t)
    if ref is s_ref and fmt.scale == "float8_e4m3fn":
      t = lax.bitcast_convert_type(t, jnp.float8_e4m3fn)
    return t.astype(jnp.float32)

  def values(k0, kk):
    """Exact element values of rows k0 .. k0 + kk as P tiles (kk / P, BN), tile j holding k = k0 + P*r + j
    (one tile for 8-bit elements)."""
    if el.bits == 8:
      return [decode.element_values(ld(w_ref, pl.ds(k0, kk), (kk, bn), col_ok), el)]
    rows = [pl.ds(k0 // p * b + j, kk // p, stride=b) if b > 1 else pl.ds(k0 // p, kk // p) for j in range(b)]
    codes = decode.unpack_groups([ld(w_ref, r, (kk // p, bn), col_ok) for r in rows], el)
    return [decode.element_values(c, el, zero_point_format=has_zero) for c in codes]

  def body(i, acc):
    k0 = i * bk
    count = 1 if group >= bk else bk // group  # scale rows in this step

    def spread(t):  # (count, BN) group rows to the (BK, BN) tile layout
      return jnp.broadcast_to(t[:, None, :], (count, bk // count, bn)).reshape(bk, bn)

    v = _interleave(values(k0, bk)).astype(jnp.float32)
    if has_zero:
      v = v - spread(scales(z_ref, k0, count))
    w = (v * spread(scales(s_ref, k0, count))).astype(dtype)
    return acc + _backend.dot(ld(x_ref, pl.ds(k0, bk), (bm, bk), row_ok), w)

  steps = k_total // bk // cfg.split_k
  first = pl.program_id(2) * steps if cfg.split_k > 1 else 0
  acc = lax.fori_loop(first, first + steps, body, jnp.zeros((bm, bn), jnp.float32))
  if post != 1.0:
    acc = acc * post
  if has_g:
    acc = acc * g_ref[0]
  _backend.store(o_ref, acc.astype(o_ref.dtype), _backend.tile_mask(row_ok, col_ok, (bm, bn)), backend=backend)


@_backend.jit_op("out_dtype", "backend", "config")
def dequant_matmul(x: jax.Array, w: QArray, *, out_dtype=None, backend: str = "triton",
                   config: Config | None = None) -> jax.Array:
  """x (M, K) @ dequantize(w) with w a (K, N) QArray blocked along axis 0; float32 accumulation.

  Returns (M, N) in `out_dtype` (default x.dtype). `backend`: "triton" or "interpret" (see backend.py).
  """
  fmt = w.format
  reason = supports(fmt)
  if reason:
    raise ValueError(f"dequant_matmul does not support {reason}.")
  if w.ndim != 2 or w.axis != 0:
    raise ValueError(f"dequant_matmul: w must be a 2-D QArray blocked along axis 0, got {w}.")
  m, k = x.shape
  if k != w.shape[0]:
    raise ValueError(f"dequant_matmul: x has K = {k} but w has K = {w.shape[0]}.")
  n = w.shape[1]
  el = fmt.element_type
  p, b = packing.codes_per_group(el.bits), packing.bytes_per_group(el.bits)
  kq = w.data.shape[0] // b * p  # K as stored: padded to whole blocks and packing groups
  kp = -(-kq // k_multiple(fmt)) * k_multiple(fmt)
  data, scale, zero = w.data, w.scale, w.zero_point
  data, scale = _backend.byte_bits(data), _backend.byte_bits(scale)  # masked loads fill with a plain 0
  if kp != kq:  # an odd K (fp6 with K % 64, per-channel int4): zero rows cost a copy of the weight
    data = jnp.pad(data, ((0, (kp - kq) // p * b), (0, 0)))
    if fmt.block is not None:
      pad_rows = ((0, kp // fmt.block[0] - scale.shape[0]), (0, 0))
      scale = jnp.pad(scale, pad_rows)
      zero = None if zero is None else jnp.pad(zero, pad_rows)
  if kp != k:
    x = jnp.pad(x, ((0, 0), (0, kp - k)))
  group = kp if fmt.block is None else fmt.block[0]
  cfg = fit_config(config or default_config(m, n, fmt), kp)
  out_dtype = x.dtype if out_dtype is None else out_dtype
  operands = [x, data, scale]
  in_specs = [
      pl.BlockSpec((cfg.bm, kp), lambda i, j: (i, 0)),
      pl.BlockSpec((data.shape[0], cfg.bn), lambda i, j: (0, j)),
      pl.BlockSpec((scale.shape[0], cfg.bn), lambda i, j: (0, j)),
  ]
  if zero is not None:
    operands.append(zero)
    in_specs.append(pl.BlockSpec((scale.shape[0], cfg.bn), lambda i, j: (0, j)))
  if w.tensor_scale is not None:
    operands.append(jnp.reshape(w.tensor_scale, (1,)).astype(jnp.float32))
    in_specs.append(pl.BlockSpec((1,), lambda i, j: (0,)))
  kernel = functools.partial(
      _kernel, fmt=fmt, group=group, cfg=cfg, m=m, n=n, k_total=kp, backend=backend, has_zero=w.zero_point is not None,
      has_g=w.tensor_scale is not None, post=decode.post_factor(el, fmt.rule == "mx"))
  name = f"dequant_matmul_{fmt.name}"
  if cfg.split_k == 1:
    return _backend.call(
        kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, cfg.bm), pl.cdiv(n, cfg.bn)), in_specs=in_specs,
        out_specs=pl.BlockSpec((cfg.bm, cfg.bn), lambda i, j: (i, j)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name=name)(*operands)
  specs3 = [pl.BlockSpec(sp.block_shape, lambda i, j, s, f=sp.index_map: f(i, j)) for sp in in_specs]
  parts = _backend.call(
      kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32),
      grid=(pl.cdiv(m, cfg.bm), pl.cdiv(n, cfg.bn), cfg.split_k), in_specs=specs3,
      out_specs=pl.BlockSpec((None, cfg.bm, cfg.bn), lambda i, j, s: (s, i, j)),
      num_warps=cfg.num_warps, num_stages=cfg.num_stages, name=name)(*operands)
  return jnp.sum(parts, axis=0).astype(out_dtype)
